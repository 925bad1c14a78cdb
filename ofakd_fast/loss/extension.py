"""Finds the compiled kernels: the installed extension, else a just-in-time build, else none.

The C++ CPU kernel defines and registers ``torch.ops.ofakd_fast_C.fused_forward``. When the
installed module is missing (a source checkout that was never built, a changed torch) it is built
once with ``torch.utils.cpp_extension.load`` (cached by torch under ~/.cache/torch_extensions).
If no compiler works either, :func:`cpu_extension_error` says why, and the package falls back
to the PyTorch reference after one warning.

The CUDA kernel (``ofakd_fast._C_cuda``, imported after ``ofakd_fast._C``) registers the CUDA
implementation of the same op. :func:`cuda_extension_error` imports it, else builds it just in
time if a GPU is present (there is nothing to run it on otherwise), else says why not.
"""
import functools
import importlib
import warnings
from typing import Optional

import torch

from . import build


def _last_line(error: Exception) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[-1] if text else ''}"


def _build_just_in_time(kernel: str, missing: str, fallback: str, fix: str, **load_options) -> Optional[str]:
    """Builds an extension with torch's just-in-time loader: None once built, else why not (warned once)."""
    try:
        from torch.utils.cpp_extension import load

        load(verbose=False, **load_options)
        return None
    except Exception as build_error:  # any compiler or linker failure means: no such kernel
        reason = f"{missing}, and building it just in time from {build.CSRC} failed ({_last_line(build_error)})"
        warnings.warn(f"ofakd_fast: {kernel} is unavailable: {reason}. {fallback} Fix: {fix}, then "
                      "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=3)
        return reason


@functools.cache
def cpu_extension_error() -> Optional[str]:
    """None once ``torch.ops.ofakd_fast_C.fused_forward`` is registered, else why it is not."""
    try:
        importlib.import_module(build.CPU_EXTENSION)
        return None
    except ImportError as installed_error:
        missing = f"the installed extension {build.CPU_EXTENSION} could not be imported ({installed_error})"
    return _build_just_in_time(
        "the fused CPU kernel", missing, "Falling back to the PyTorch reference (slow).",
        "install a C++ compiler and ninja", name="ofakd_fast_C_jit", sources=build.cpu_sources(),
        extra_cflags=build.cxx_flags(), extra_ldflags=build.link_flags())


@functools.cache
def cuda_extension_error() -> Optional[str]:
    """None once the CUDA kernel of ``ofakd_fast_C::fused_forward`` is registered, else why it is not."""
    cpu_error = cpu_extension_error()
    if cpu_error is not None:
        return f"the op is not defined, because the C++ extension {build.CPU_EXTENSION} is missing: {cpu_error}"
    try:
        importlib.import_module(build.CUDA_EXTENSION)
        return None
    except ImportError as installed_error:
        missing = f"the CUDA extension {build.CUDA_EXTENSION} is not installed ({installed_error})"
    if not torch.cuda.is_available():
        return f"{missing}; no CUDA GPU here to build it for just in time"
    try:
        should_build, why_not = build.cuda_build_decision()
    except RuntimeError as error:  # OFAKD_BUILD_CUDA=1 but impossible
        should_build, why_not = False, str(error)
    if not should_build:
        return f"{missing}, and it cannot be built here: {why_not}"
    build.configure_cuda_build()
    return _build_just_in_time(
        "the CUDA kernel", missing, "backend='auto' uses Triton or the PyTorch reference on CUDA tensors.",
        "install the CUDA toolkit (nvcc)", name="ofakd_fast_C_cuda_jit", sources=build.cuda_sources(),
        extra_cflags=build.cuda_cxx_flags(), extra_cuda_cflags=build.nvcc_flags())

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


@functools.cache
def cpu_extension_error() -> Optional[str]:
    """None once ``torch.ops.ofakd_fast_C.fused_forward`` is registered, else why it is not."""
    try:
        importlib.import_module(build.CPU_EXTENSION)
        return None
    except ImportError as installed_error:
        missing = f"the installed extension {build.CPU_EXTENSION} could not be imported ({installed_error})"
    sources = build.cpu_sources()
    try:
        from torch.utils.cpp_extension import load

        load(name="ofakd_fast_C_jit", sources=sources, extra_cflags=build.cxx_flags(),
             extra_ldflags=build.link_flags(), verbose=False)
        return None
    except Exception as build_error:  # any compiler or linker failure means: no CPU kernel
        reason = f"{missing}, and building it just in time from {build.CSRC} failed ({_last_line(build_error)})"
        warnings.warn(
            f"ofakd_fast: the fused CPU kernel is unavailable: {reason}. Falling back to the PyTorch "
            "reference (slow). Fix: install a C++ compiler and ninja, then `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=2)
        return reason


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
    try:
        from torch.utils.cpp_extension import load

        build.configure_cuda_build()
        load(name="ofakd_fast_C_cuda_jit", sources=build.cuda_sources(), extra_cflags=build.cuda_cxx_flags(),
             extra_cuda_cflags=build.nvcc_flags(), verbose=False)
        return None
    except Exception as build_error:  # any compiler or linker failure means: no CUDA kernel
        reason = f"{missing}, and building it just in time from {build.CSRC} failed ({_last_line(build_error)})"
        warnings.warn(
            f"ofakd_fast: the CUDA kernel is unavailable: {reason}. backend='auto' uses Triton or the PyTorch "
            "reference on CUDA tensors. Fix: install the CUDA toolkit (nvcc), then "
            "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)
        return reason

"""Finds the compiled kernels: the installed extension, else a just-in-time build, else none.

The C++ CPU kernel registers ``torch.ops.ofakd_fast_C.fused_forward``. When the installed
module is missing (a source checkout that was never built, a changed torch) it is built once
with ``torch.utils.cpp_extension.load`` (cached by torch under ~/.cache/torch_extensions).
If no compiler works either, :func:`cpu_extension_error` says why, and the package falls back
to the PyTorch reference after one warning.
"""
import functools
import importlib
import warnings
from typing import Optional

from . import _build


@functools.cache
def cpu_extension_error() -> Optional[str]:
    """None once ``torch.ops.ofakd_fast_C.fused_forward`` is registered, else why it is not."""
    try:
        importlib.import_module(_build.CPU_EXTENSION)
        return None
    except ImportError as installed_error:
        missing = f"the installed extension {_build.CPU_EXTENSION} could not be imported ({installed_error})"
    sources = _build.cpu_sources()
    try:
        from torch.utils.cpp_extension import load

        load(name="ofakd_fast_C_jit", sources=sources, extra_cflags=_build.cxx_flags(),
             extra_ldflags=_build.link_flags(), verbose=False)
        return None
    except Exception as build_error:  # any compiler or linker failure means: no CPU kernel
        reason = (f"{missing}, and building it just in time from {_build.CSRC} failed "
                  f"({type(build_error).__name__}: {str(build_error).strip().splitlines()[-1] if str(build_error).strip() else ''})")
        warnings.warn(
            f"ofakd_fast: the fused CPU kernel is unavailable: {reason}. Falling back to the PyTorch "
            "reference (slow). Fix: install a C++ compiler and ninja, then `pip install --no-build-isolation -e .`.",
            RuntimeWarning, stacklevel=2)
        return reason

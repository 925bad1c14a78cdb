"""Which implementation computes the loss, and why the others cannot run here.

Backends: ``cpu`` (the C++ kernel, CPU tensors), ``cuda`` (the CUDA kernel, CUDA tensors),
``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``reference``
(plain PyTorch, anywhere). ``auto`` picks the fastest that can run on the tensors' device and
falls back quietly; an explicit request that cannot run raises and says why. The environment
variable ``OFAKD_BACKEND`` replaces ``auto``.
"""
import os
from typing import Callable, Optional

import torch

from .extension import cpu_extension_error, cuda_extension_error

BACKENDS = ("cpu", "cuda", "triton", "reference")
_CUDA_OP = "ofakd_fast_C::fused_forward"


def _cuda_kernel_error() -> Optional[str]:
    error = cuda_extension_error()
    if error is not None:
        return error
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_CUDA_OP, "CUDA"):
        return f"{_CUDA_OP} has no CUDA kernel although the CUDA extension was imported"
    return None


def _triton_error(device: torch.device) -> Optional[str]:
    try:
        from ..kernels.ofa_loss_triton import triton_unavailable_reason
    except ImportError as error:
        return f"the Triton kernels cannot be imported ({error})"
    return triton_unavailable_reason(device)


def backend_error(name: str, device: torch.device) -> Optional[str]:
    """None when backend `name` can compute the loss on tensors of `device`, else the reason."""
    device = torch.device(device)
    if name == "reference":
        return None
    if name == "cpu":
        if device.type != "cpu":
            return f"backend='cpu' needs CPU tensors, got {device.type} tensors"
        return cpu_extension_error()
    if name == "cuda":
        if device.type != "cuda":
            return f"backend='cuda' needs CUDA tensors, got {device.type} tensors"
        return _cuda_kernel_error()
    if name == "triton":
        return _triton_error(device)
    raise ValueError(f"backend must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")


def available_backends() -> dict:
    """Each backend with 'available' or the reason it cannot run on this machine."""
    devices = [torch.device("cuda")] if torch.cuda.is_available() else []
    devices.append(torch.device("cpu"))
    report = {}
    for name in BACKENDS:
        errors = [backend_error(name, device) for device in devices]
        report[name] = "available" if None in errors else "; ".join(errors)
    return report


def resolve_backend(requested: str, device: torch.device) -> str:
    """The backend that will run: `requested`, or for 'auto' the fastest that works on `device`."""
    requested = requested or "auto"
    if requested == "auto":
        requested = os.environ.get("OFAKD_BACKEND", "auto") or "auto"
        if requested not in ("auto", *BACKENDS):
            raise ValueError(f"the environment variable OFAKD_BACKEND={requested!r}: expected one of 'auto', "
                             f"{', '.join(map(repr, BACKENDS))} (or unset it)")
    return _resolve(requested, torch.device(device).type)


@torch.compiler.assume_constant_result
def _resolve(requested: str, device_type: str) -> str:
    # A constant for torch.compile: it checks imports and registrations, which it cannot trace.
    device = torch.device(device_type)
    if requested == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
        return next((name for name in order if backend_error(name, device) is None), "reference")
    error = backend_error(requested, device)
    if error is not None:
        raise RuntimeError(f"ofakd_fast backend {requested!r} cannot run: {error}")
    return requested


def fused_forward(name: str) -> Callable:
    """The fused kernel entry of a backend, with the signature of ofakd_fast_C::fused_forward."""
    if name == "triton":
        from ..kernels.ofa_loss_triton import ofa_fused_forward_triton

        return ofa_fused_forward_triton
    return torch.ops.ofakd_fast_C.fused_forward


def fused_forward_sparse(name: str) -> Callable:
    """The sparse-teacher kernel entry of a backend, with the signature of ofakd_fast_C::fused_forward_sparse:
    (branches, teacher_logits [B, k], teacher_indices [B, k] int64, teacher_lse [B], target, eps, temperature,
    grad_scale) -> (loss rows [K, B], branch gradients [K, B, C] or empty)."""
    if name == "triton":
        from ..kernels.ofa_loss_triton import ofa_fused_forward_sparse_triton

        return ofa_fused_forward_sparse_triton
    return torch.ops.ofakd_fast_C.fused_forward_sparse

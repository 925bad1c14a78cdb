"""ofakd_fast: the OFA-KD distillation loss fused over all projector branches, with C++, Triton and
CUDA kernels behind one autograd-aware custom op, and distillers built on it."""
import importlib

import torch

from .backends import available_backends
from .ofa_loss import OFALoss, ofa_loss, ofa_loss_multi

# The distillers need timm; they are imported on first use so the loss alone stays light.
_DISTILLER_NAMES = ("OFADistiller", "KDDistiller", "VanillaDistiller", "BaseDistiller", "build_distiller",
                    "total_loss")


def __getattr__(name):
    if name in _DISTILLER_NAMES:
        return getattr(importlib.import_module(".distiller", __name__), name)
    raise AttributeError(f"module 'ofakd_fast' has no attribute {name!r}")


def empty_cache() -> int:
    """Frees the reusable CPU gradient buffers not in use; returns the bytes released."""
    from ._extension import cpu_extension_error

    return 0 if cpu_extension_error() else int(torch.ops.ofakd_fast_C.release_buffers())


__all__ = ["OFALoss", "ofa_loss", "ofa_loss_multi", "available_backends", "empty_cache", *_DISTILLER_NAMES]

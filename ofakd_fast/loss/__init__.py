"""The fused OFA loss library: importable without timm.

``ofa_loss`` (the original's drop-in), ``ofa_loss_multi`` (K branches in one fused call) and the
``OFALoss`` module, over one custom op with C++, CUDA and Triton backends and a PyTorch reference.
"""
import torch

from .api import OFALoss, ofa_loss, ofa_loss_multi
from .backends import available_backends
from .sparse import SparseTeacher, sparse_teacher


def empty_cache() -> int:
    """Frees the reusable CPU gradient buffers not in use; returns the bytes released."""
    from .extension import cpu_extension_error

    return 0 if cpu_extension_error() else int(torch.ops.ofakd_fast_C.release_buffers())


__all__ = ["OFALoss", "ofa_loss", "ofa_loss_multi", "available_backends", "empty_cache", "SparseTeacher", "sparse_teacher"]

"""ofakd_fast: the OFA-KD distillation loss fused over all projector branches, with C++, Triton and
CUDA kernels behind one autograd-aware custom op."""
import torch

from .backends import available_backends
from .ofa_loss import OFALoss, ofa_loss, ofa_loss_multi


def empty_cache() -> int:
    """Frees the reusable CPU gradient buffers not in use; returns the bytes released."""
    from ._extension import cpu_extension_error

    return 0 if cpu_extension_error() else int(torch.ops.ofakd_fast_C.release_buffers())


__all__ = ["OFALoss", "ofa_loss", "ofa_loss_multi", "available_backends", "empty_cache"]

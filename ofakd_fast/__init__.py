"""ofakd_fast: the OFA-KD distillation loss fused over all projector branches, with C++, Triton and
CUDA kernels behind one autograd-aware custom op, and distillers and a trainer built on it.

Subpackages, each importing only the ones after it: ``demo`` -> ``train`` -> ``distill`` -> ``loss``.
"""
import importlib

from .loss import OFALoss, available_backends, empty_cache, ofa_loss, ofa_loss_multi

# The distillers need timm; they are imported on first use so the loss alone stays light.
_DISTILLER_NAMES = ("OFADistiller", "KDDistiller", "VanillaDistiller", "BaseDistiller", "build_distiller",
                    "total_loss")


def __getattr__(name):
    if name in _DISTILLER_NAMES:
        return getattr(importlib.import_module(".distill", __name__), name)
    raise AttributeError(f"module 'ofakd_fast' has no attribute {name!r}")


__all__ = ["OFALoss", "ofa_loss", "ofa_loss_multi", "available_backends", "empty_cache", *_DISTILLER_NAMES]

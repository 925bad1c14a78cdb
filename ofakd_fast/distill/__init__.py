"""Distillers (a student, a frozen teacher and the training losses in one module): OFA-KD with its
projectors, and the baselines the paper compares against (KD, BKD, DKD, DIST, FitNet, CC, RKD, CRD)."""
from typing import Optional

from torch import nn

from .base import BaseDistiller, VanillaDistiller, model_input_size, model_name, total_loss
from .correlation import CC
from .crd import CRD
from .fitnet import FitNet
from .kd import KDDistiller
from .logit_baselines import BKD, DIST, DKD
from .ofa import OFADistiller, stage_indices
from .rkd import RKD

DISTILLERS = {"ofa": OFADistiller, "kd": KDDistiller, "bkd": BKD, "dkd": DKD, "dist": DIST, "fitnet": FitNet,
              "cc": CC, "rkd": RKD, "crd": CRD, "vanilla": VanillaDistiller}


def build_distiller(name: str, student: nn.Module, teacher: Optional[nn.Module], **kwargs) -> BaseDistiller:
    """The distiller registered as `name` (a key of DISTILLERS), built with `kwargs`."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}: expected one of {', '.join(map(repr, DISTILLERS))}")
    return DISTILLERS[name](student, teacher, **kwargs)


__all__ = ["BaseDistiller", "VanillaDistiller", "KDDistiller", "BKD", "DKD", "DIST", "FitNet", "CC", "RKD", "CRD",
           "OFADistiller", "DISTILLERS",
           "build_distiller", "model_input_size", "model_name", "stage_indices", "total_loss"]

"""The ground-truth criterion of the distiller (``BaseDistiller(gt_criterion=...)``) from the flags.

By default (None) the distiller uses cross-entropy: soft mixup/cutmix targets as they come (smoothed
by timm's Mixup), label smoothing on hard labels. ``--bce-loss`` uses timm's BinaryCrossEntropy
instead, as the original OFA-KD train.py does for its "stronger" recipe: with mixup/cutmix active
the targets come smoothed already, otherwise BCE smooths the hard labels itself; ``--bce-target-thresh``
binarizes the (soft) targets at that threshold. One difference from the original: it fell back to
plain cross-entropy when --bce-loss was given without mixup/cutmix and without smoothing; here
``--bce-loss`` always means BCE.
"""
import argparse
from typing import Optional

from torch import nn


def gt_criterion_from_args(args: argparse.Namespace, mixup_active: bool) -> Optional[nn.Module]:
    if not getattr(args, "bce_loss", False):
        return None
    from timm.loss import BinaryCrossEntropy

    smoothing = 0.0 if mixup_active else args.smoothing
    return BinaryCrossEntropy(smoothing=smoothing, target_threshold=args.bce_target_thresh)

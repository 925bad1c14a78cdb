"""FitNet (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015) for any pair of families."""
from typing import Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from .features import FeatureDistiller


class HintAdapter(nn.Module):
    """The FitNet regressor of one stage: a bias-free 1x1 convolution from the student's channels to the
    teacher's (as OFA-KD's distillers/fitnet.py, Kaiming fan-out init as its utils.init_weights), then a
    resampling of the map to the teacher's grid: adaptive average pooling where the student's grid is at
    least as fine in both directions, bilinear interpolation otherwise. A bias-free 1x1 convolution
    commutes with either, so the pooling runs first (on fewer pixels) and the interpolation last."""

    def __init__(self, in_chans: int, out_chans: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, out_chans, 1, bias=False)
        nn.init.kaiming_normal_(self.proj.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor, size: Tuple[int, int]) -> Tensor:
        height, width = x.shape[-2:]
        if (height, width) == tuple(size):
            return self.proj(x)
        if height >= size[0] and width >= size[1]:
            return self.proj(F.adaptive_avg_pool2d(x, size))
        return F.interpolate(self.proj(x), size=size, mode="bilinear", align_corners=False)


class FitNet(FeatureDistiller):
    """FitNet hints (Romero et al., ICLR 2015): for each stage, the MSE between the student's stage
    feature, mapped by a :class:`HintAdapter`, and the teacher's feature of the same stage, summed over
    the stages; plus the ground-truth loss.

    OFA-KD's distillers/fitnet.py accepts CNN pairs only. Here every stage feature of either side is a
    [B, C, H, W] map, whatever the family: timm's ``forward_intermediates(output_fmt="NCHW")`` gives a
    ViT's or MLP-Mixer's patch tokens (prefix tokens left out) as a map on the patch grid and a Swin
    stage as a map too. The adapter maps the student's channels to the teacher's with a 1x1 convolution
    and resamples to the teacher's grid, so any student stage fits any teacher stage.

    Args:
        stages: the stages (1-4, see :func:`~ofakd_fast.distill.ofa.stage_indices`) hinted on both
            sides; OFA-KD's train.py default ``--fitnet-stage 1 2 3 4``.
        loss_weights: 'gt' and 'fitnet' (``--fitnet-loss-weight``, default 1, OFA-KD train.py).
        input_size, and the rest: see :class:`~ofakd_fast.distill.features.FeatureDistiller`.
    """

    default_loss_weights = {"gt": 1.0, "fitnet": 1.0}  # --gt-loss-weight, --fitnet-loss-weight (train.py)
    loss_names = ("loss_gt", "loss_fitnet")

    def __init__(self, student: nn.Module, teacher: nn.Module, stages: Sequence[int] = (1, 2, 3, 4),
                 input_size: Optional[Sequence[int]] = None, **kwargs):
        super().__init__(student, teacher, stages=tuple(stages), input_size=input_size, **kwargs)
        self.stages = tuple(stages)
        self.adapters = nn.ModuleDict({
            f"stage{stage}": HintAdapter(student_shape[0], teacher_shape[0])
            for stage, student_shape, teacher_shape in zip(self.stages, self.student_shapes[1],
                                                           self.teacher_shapes[1])})

    def forward(self, images: Tensor, labels: Tensor):
        _, teacher_stages = self.teacher_features(images)
        logits, _, student_stages = self.student_features(images)
        loss = sum(F.mse_loss(adapter(feature, target.shape[-2:]).float(), target.float())
                   for adapter, feature, target in zip(self.adapters.values(), student_stages, teacher_stages))
        return logits, self.weighted(logits, labels, "fitnet", loss)

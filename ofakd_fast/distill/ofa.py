"""OFA-KD (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023): projector heads on intermediate student stages plus the
student's own logits, all distilled against the teacher in one fused
:func:`~ofakd_fast.loss.ofa_loss_multi` call."""
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch
from timm.models.beit import Beit
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mlp_mixer import MlpMixer
from timm.models.resnet import ResNet
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ..loss import ofa_loss_multi
from .base import BaseDistiller, HyperParameter, model_input_size, model_name
from .projectors import SpatialProjector, TokenProjector, init_projector, merges_toward_final_grid

PAPER_BLOCK_TAPS = (1, 3, 9, 11)  # blocks (from 0) a 12-block ViT exposes as stages 1-4 in the paper


@dataclass(frozen=True)
class OriginalFamily:
    """How the original implementation (Hao840/OFAKD) taps and projects a model family.

    tokens: the original's ``stage_info`` gives (tokens, width) shapes, so ``is_cnn_model`` is false and
        the student gets the token projector (distillers/utils.py, distillers/ofa.py), at the width of
        the student's final features (``stage_info(-1)``).
    stage4_is_head: stage 4 is the output of the head conv (the final features), not of the last block.
    """
    tokens: bool
    stage4_is_head: bool = False


# The families the original's custom_forward/*.py define ``stage_info`` for, keyed by timm model class
# (subclasses included: DeiT distilled is a VisionTransformer). Its stage taps agree with timm's
# forward_intermediates / feature_info except where noted; its custom models (MobileNetV1, CycleMLP,
# Hire-MLP, ViP) are not timm classes and keep the form-based choice, like every family not listed.
ORIGINAL_FAMILIES = {
    ResNet: OriginalFamily(tokens=False),  # custom_forward/resnet.py: layer1..layer4 outputs
    ConvNeXt: OriginalFamily(tokens=False),  # custom_forward/convnext.py: stages[0..3] outputs
    # custom_forward/efficientnet.py (mobilenetv2_100): stages 1-3 end blocks[1], blocks[2], blocks[4]
    # (24, 32, 96 channels: timm's stage ends), stage 4 is conv_head + bn2 (1280 channels, index 17)
    EfficientNet: OriginalFamily(tokens=False, stage4_is_head=True),
    # custom_forward/swin_transformer.py: the last block of each stage, as (L, C) tokens, e.g. Swin-T
    # stage 1 (3136, 96), stage 4 (49, 768), final width 768
    SwinTransformer: OriginalFamily(tokens=True),
    VisionTransformer: OriginalFamily(tokens=True),  # custom_forward/vision_transformer.py: blocks 1, 3, 9, 11
    Beit: OriginalFamily(tokens=True),  # custom_forward/beit.py: blocks 1, 3, 9, 11 (24 blocks: 1, 3, 21, 23)
    MlpMixer: OriginalFamily(tokens=True),  # custom_forward/mlp_mixer.py (Mixer, ResMLP): blocks 1, 3, 9, 11
}


def original_family(model: nn.Module) -> Optional[OriginalFamily]:
    """The :data:`ORIGINAL_FAMILIES` entry of the model's class or its nearest listed base class, if any."""
    return next((ORIGINAL_FAMILIES[cls] for cls in type(model).__mro__ if cls in ORIGINAL_FAMILIES), None)


def stage_indices(model: nn.Module, stages: Sequence[int]) -> List[Optional[int]]:
    """Index of each stage's feature among the levels of ``model.forward_intermediates``; None for a stage
    that is the model's final features (the first result of ``forward_intermediates``).

    Hierarchical models (features at several strides; CNNs, Swin): stage k is the last feature
    of the k-th of the four deepest strides, i.e. the output of stage k of a 4-stage network
    (a ResNet's stem level is skipped); for EfficientNet / MobileNetV2 stage 4 is the head conv's
    output (None), as in the original (see :data:`ORIGINAL_FAMILIES`). Isotropic models (one stride;
    ViT, MLP-Mixer): the blocks the paper taps in a 12-block ViT, (1, 3, 9, 11), at the same relative
    depth; for the original's families with D >= 12 blocks its rule (1, 3, D - 3, D - 1).
    """
    if not stages or len(set(stages)) != len(stages) or any(stage not in (1, 2, 3, 4) for stage in stages):
        raise ValueError(f"stages must be distinct values among 1, 2, 3, 4; got {tuple(stages)}")
    family = original_family(model)
    reductions = [level["reduction"] for level in model.feature_info]
    last_level_at = {reduction: index for index, reduction in enumerate(reductions)}
    if len(last_level_at) == 1:
        depth = len(reductions)
        if family is not None and depth >= 12:  # custom_forward/vision_transformer.py, mlp_mixer.py, beit.py
            return [(1, 3, depth - 3, depth - 1)[stage - 1] for stage in stages]
        scale = (depth - 1) / PAPER_BLOCK_TAPS[-1]
        return [math.floor(PAPER_BLOCK_TAPS[stage - 1] * scale + 0.5) for stage in stages]
    stage_ends = [last_level_at[reduction] for reduction in sorted(last_level_at)]
    first = len(stage_ends) - 4  # position of stage 1; stage 4 is the deepest stride
    if first + min(stages) - 1 < 0:
        raise ValueError(f"{model_name(model)} has {len(stage_ends)} feature strides, too few for stages "
                         f"{tuple(stages)} (stage 4 is the deepest stride)")
    head_stage = 4 if family is not None and family.stage4_is_head else None
    return [None if stage == head_stage else stage_ends[first + stage - 1] for stage in stages]


class OFADistiller(BaseDistiller):
    """OFA-KD: a projector per student stage maps its features to logits; every projector and the
    student's final logits are distilled against the teacher with the OFA loss, in one fused call.

    Args:
        student: a timm model with ``forward_intermediates``, ``forward_head`` and ``feature_info``.
        teacher: any model returning logits [B, classes]; its ``num_features`` (if any) sets the
            width of the convolutional projectors, as in the paper. It is not run at construction.
        stages: student stages (1-4) that get a projector; see :func:`stage_indices`.
        eps: the OFA exponent, one value or one per stage plus one for the final logits.
        temperature: the OFA temperature.
        loss_weights: 'gt' (ground truth), 'kd' (OFA loss of the final logits: ``loss_ofa_logits``), 'ofa'
            (the sum over the projector branches: ``loss_ofa_stages``), named as the original's flags.
        gt_criterion, label_smoothing: see :meth:`BaseDistiller.gt_loss`.
        input_size: [C, H, W] of one probe pass at construction that reads the form and shape of the
            student's features; defaults to :func:`model_input_size`. It fixes the patch merging
            of token projectors, so pass the training resolution for token students.
        backend: the OFA loss backend ('auto', 'cpu', 'cuda', 'triton', 'reference').

    Projectors follow the original implementation (Hao840/OFAKD distillers/ofa.py) for the families
    it covers (:data:`ORIGINAL_FAMILIES`): CNNs (ResNet, ConvNeXt, MobileNetV2) get a
    :class:`SpatialProjector` widening to max(student, teacher ``num_features``); ViT / DeiT, BEiT,
    MLP-Mixer / ResMLP and Swin get a :class:`TokenProjector` at the student's final width
    (``num_features``): merges of the patch grid toward 7x7 (the first one to that width), ``max(4 -
    stage, 1)`` blocks, a classifier. Other families keep the form-based choice: final features that
    are a token sequence [B, N, C] get a :class:`TokenProjector` at the tapped feature's width, maps get
    a :class:`SpatialProjector`. Intermediates are always requested as NCHW maps, the format every timm
    ``forward_intermediates`` accepts; prefix tokens (class, distillation, register) are passed along.

    The token classifier reads the class token whenever the student has one (``cls_token``), as the
    original does (it reads the first ``num_tokens`` tokens), else the mean of the patch tokens. For a
    DeiT student with a distillation token, where the original leaves a todo, it reads the class token
    alone: the distillation token passes through the blocks as context, so every projector keeps one
    classifier of the student's width.
    """

    reads_teacher_logits_only = True

    default_loss_weights = {"gt": 1.0, "kd": 1.0, "ofa": 1.0}
    loss_names = ("loss_gt", "loss_ofa_logits", "loss_ofa_stages")
    hyper_parameters = (HyperParameter("temperature", "--ofa-temperature", 1.0, "OFA temperature", low_open=True),)

    def __init__(self, student: nn.Module, teacher: nn.Module, stages: Sequence[int] = (1, 2, 3, 4),
                 eps: Union[float, Sequence[float]] = 1.0, temperature: float = 1.0,
                 input_size: Optional[Sequence[int]] = None, backend: str = "auto", **kwargs):
        missing = [attr for attr in ("forward_intermediates", "forward_head", "feature_info")
                   if not hasattr(student, attr)]
        if missing:
            raise TypeError(f"OFADistiller: student model {model_name(student)} lacks {', '.join(missing)}. "
                            "The projectors read stage features from timm's forward_intermediates(), the logits "
                            "from forward_head() and the stage layout from feature_info: use a timm model that "
                            "provides them (most timm >= 1.0 models do) or add them to this one.")
        super().__init__(student, teacher, **kwargs)
        self.stages = tuple(stages)
        num_branches = len(self.stages) + 1
        self.eps = [float(eps)] * num_branches if isinstance(eps, (int, float)) else [float(e) for e in eps]
        if len(self.eps) != num_branches:
            raise ValueError(f"eps: expected one value or {num_branches} (one per stage {self.stages} plus one "
                             f"for the final logits), got {len(self.eps)}")
        self.temperature = self.hyper_parameters[0].check(temperature, type(self).__name__)
        self.backend = backend

        indices = stage_indices(student, self.stages)
        self._levels = sorted({i for i in indices if i is not None})  # a shallow ViT may map two stages to one block
        self._level_of_stage = [None if i is None else self._levels.index(i) for i in indices]
        self._prefix_tokens = False  # the probe reads plain maps; set for real from its result
        final, features = self._probe(tuple(input_size) if input_size is not None else model_input_size(student))
        family = original_family(student)
        tokens = family.tokens if family is not None else final.dim() == 3
        self._prefix_tokens = tokens and getattr(student, "num_prefix_tokens", 0) > 0

        self.projectors = nn.ModuleDict()
        reductions = [level["reduction"] for level in student.feature_info]
        conv_width = max(student.num_features, getattr(teacher, "num_features", 0))
        use_class_token = getattr(student, "cls_token", None) is not None
        for stage, index, feature in zip(self.stages, indices, features):
            chans, height, width = feature.shape[1:]
            if tokens:
                # distillers/ofa.py: merges toward a 7x7 grid, max(4 - stage, 1) blocks, at the final width
                token_width = student.num_features if family is not None else chans
                projector = TokenProjector(chans, merges_toward_final_grid(min(height, width)), max(4 - stage, 1),
                                           student.num_classes, use_class_token, out_dim=token_width)
            else:
                # halvings down to the last stride: the original's 4 - stage for its CNNs (distillers/ofa.py)
                reduction = reductions[-1 if index is None else index]
                halvings = round(math.log2(reductions[-1] / reduction))
                projector = SpatialProjector(chans, halvings, conv_width, student.num_classes)
            self.projectors[f"stage{stage}"] = projector
        init_projector(self.projectors)

    @torch.no_grad()
    def _probe(self, input_size: Tuple[int, int, int]):
        """One eval-mode pass of a zero image through the student: its final features and the stage features."""
        param = next(self.student.parameters())
        was_training = self.student.training
        self.student.eval()
        try:
            return self._student_features(torch.zeros(1, *input_size, dtype=param.dtype, device=param.device))
        finally:
            self.student.train(was_training)

    def _student_features(self, images: Tensor):
        """The student's final features and one feature per stage, from a single forward pass.

        A stage feature is a [B, C, H, W] map, or a (patch map, prefix tokens [B, P, C]) pair
        for a token student with class/distillation/register tokens; a stage at index None is the
        final features (MobileNetV2's head conv output).
        """
        if not self._levels:  # every stage is the final features (MobileNetV2 stage 4 alone)
            final = self.student.forward_features(images)
            return final, [final] * len(self._level_of_stage)
        extra = {"return_prefix_tokens": True} if self._prefix_tokens else {}
        final, levels = self.student.forward_intermediates(images, indices=self._levels, output_fmt="NCHW", **extra)
        return final, [final if i is None else levels[i] for i in self._level_of_stage]

    def forward(self, images: Tensor, labels: Tensor):
        logits_teacher = self.teacher_output(images)  # dense logits, or a cache's SparseTeacher
        final, features = self._student_features(images)
        logits = self.student.forward_head(final)
        branches = [projector(f) for projector, f in zip(self.projectors.values(), features)] + [logits]
        weights = self.loss_weights
        # grad_weights: how total_loss() will weight each branch, so the CPU kernel's gradients
        # from the forward pass are the final ones.
        branch_losses = ofa_loss_multi(branches, logits_teacher, labels, self.eps, self.temperature,
                                       backend=self.backend,
                                       grad_weights=[weights["ofa"]] * len(self.projectors) + [weights["kd"]])
        return logits, {"loss_gt": weights["gt"] * self.gt_loss(logits, labels),
                        "loss_ofa_logits": weights["kd"] * branch_losses[-1],
                        "loss_ofa_stages": weights["ofa"] * branch_losses[:-1].sum()}

"""OFA-KD (Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in
Knowledge Distillation", NeurIPS 2023): projector heads on intermediate student stages plus the
student's own logits, all distilled against the teacher in one fused
:func:`~ofakd_fast.loss.ofa_loss_multi` call."""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..loss import ofa_loss_multi
from .base import BaseDistiller, HyperParameter, model_input_size, model_name
from .projectors import SpatialProjector, TokenProjector, init_projector, merges_toward_final_grid

PAPER_BLOCK_TAPS = (1, 3, 9, 11)  # blocks (from 0) a 12-block ViT exposes as stages 1-4 in the paper


def stage_indices(model: nn.Module, stages: Sequence[int]) -> list:
    """Index of each stage's feature among the levels of ``model.forward_intermediates``.

    Hierarchical models (features at several strides; CNNs, Swin): stage k is the last feature
    of the k-th of the four deepest strides, i.e. the output of stage k of a 4-stage network
    (a ResNet's stem level is skipped). Isotropic models (one stride; ViT, MLP-Mixer): the
    blocks the paper taps in a 12-block ViT, (1, 3, 9, 11), at the same relative depth.
    """
    if not stages or len(set(stages)) != len(stages) or any(stage not in (1, 2, 3, 4) for stage in stages):
        raise ValueError(f"stages must be distinct values among 1, 2, 3, 4; got {tuple(stages)}")
    reductions = [level["reduction"] for level in model.feature_info]
    last_level_at = {reduction: index for index, reduction in enumerate(reductions)}
    if len(last_level_at) == 1:
        scale = (len(reductions) - 1) / PAPER_BLOCK_TAPS[-1]
        return [math.floor(PAPER_BLOCK_TAPS[stage - 1] * scale + 0.5) for stage in stages]
    stage_ends = [last_level_at[reduction] for reduction in sorted(last_level_at)]
    first = len(stage_ends) - 4  # position of stage 1; stage 4 is the deepest stride
    if first + min(stages) - 1 < 0:
        raise ValueError(f"{model_name(model)} has {len(stage_ends)} feature strides, too few for stages "
                         f"{tuple(stages)} (stage 4 is the deepest stride)")
    return [stage_ends[first + stage - 1] for stage in stages]



class OFADistiller(BaseDistiller):
    """OFA-KD: a projector per student stage maps its features to logits; every projector and the
    student's final logits are distilled against the teacher with the OFA loss, in one fused call.

    Args:
        student: a timm model with ``forward_intermediates``, ``forward_head`` and ``feature_info``.
        teacher: any model returning logits [B, classes]; its ``num_features`` (if any) sets the
            width of the convolutional projectors, as in the paper.
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

    The projector's form follows the form of the student's final features: a token sequence
    [B, N, C] (ViT, MLP-Mixer) gets a :class:`TokenProjector` (prefix tokens are passed along),
    a map (CNNs [B, C, H, W], Swin [B, H, W, C]) gets a :class:`SpatialProjector`. Intermediates
    are always requested as NCHW maps, the format every timm ``forward_intermediates`` accepts.
    Token projectors keep the tapped feature's width (the student's width for ViT and Mixer, as
    in the paper); convolutional ones widen to max(student, teacher ``num_features``).
    """

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
        self._levels = sorted(set(indices))  # a shallow ViT may map two stages to one block
        self._level_of_stage = [self._levels.index(i) for i in indices]
        self._prefix_tokens = False  # the probe reads plain maps; set for real from its result
        final, features = self._probe(tuple(input_size) if input_size is not None else model_input_size(student))
        tokens = final.dim() == 3
        self._prefix_tokens = tokens and getattr(student, "num_prefix_tokens", 0) > 0

        self.projectors = nn.ModuleDict()
        reductions = [level["reduction"] for level in student.feature_info]
        conv_width = max(student.num_features, getattr(teacher, "num_features", 0))
        use_class_token = getattr(student, "global_pool", None) == "token"
        for stage, index, feature in zip(self.stages, indices, features):
            chans, height, width = feature.shape[1:]
            if tokens:
                projector = TokenProjector(chans, merges_toward_final_grid(min(height, width)), max(4 - stage, 1),
                                           student.num_classes, use_class_token)
            else:
                halvings = round(math.log2(reductions[-1] / reductions[index]))
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
        for a token student with class/distillation/register tokens.
        """
        extra = {"return_prefix_tokens": True} if self._prefix_tokens else {}
        final, levels = self.student.forward_intermediates(images, indices=self._levels, output_fmt="NCHW", **extra)
        return final, [levels[i] for i in self._level_of_stage]

    def forward(self, images: Tensor, labels: Tensor):
        logits_teacher = self.teacher_logits(images)
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

"""Distillers: a student, a frozen teacher and the training losses in one ``nn.Module``.

``forward(images, labels)`` returns the student logits and a dict of losses. Entries named
``loss_*`` carry gradients and sum to the training loss (:func:`total_loss`); any other entry
is a detached value for logging.

* :class:`OFADistiller`: OFA-KD (Hao et al., NeurIPS 2023). Projector heads on intermediate
  student stages plus the student's own logits are distilled against the teacher in one fused
  :func:`~ofakd_fast.ofa_loss.ofa_loss_multi` call.
* :class:`KDDistiller`: Hinton KD. :class:`VanillaDistiller`: ground truth only.

The teacher is not a registered submodule: ``parameters()``, ``state_dict()``, ``train()`` and a
DDP wrapper see only the student and the projectors, so the teacher stays frozen, in eval mode
and out of checkpoints (load it separately). ``_apply`` forwards ``.to()``, ``.cuda()``,
``.half()`` and ``.to(memory_format=...)`` to it so it always sits with the student.
"""
import math
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import to_2tuple
from torch import Tensor, nn

from .ofa_loss import ofa_loss_multi
from .projectors import SpatialProjector, TokenProjector, init_projector, merges_toward_final_grid

PAPER_BLOCK_TAPS = (1, 3, 9, 11)  # blocks (from 0) a 12-block ViT exposes as stages 1-4 in the paper


def total_loss(losses: Dict[str, Tensor]) -> Tensor:
    """The training loss: the sum of the ``loss_*`` entries of a distiller's loss dict."""
    return sum(value for key, value in losses.items() if key.startswith("loss_"))


def model_name(model: nn.Module) -> str:
    """The timm architecture name if the model has one, else its class name."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


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


def model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The [C, H, W] a model is built for: its patch embedding's img_size if it has one, else timm's data config;
    the channels of its first convolution (timm's config says 3 for a model built with in_chans=1)."""
    channels, height, width = resolve_model_data_config(model)["input_size"]
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), channels)
    img_size = next((m.img_size for m in model.modules() if getattr(m, "img_size", None) is not None), None)
    if img_size is not None:
        height, width = to_2tuple(img_size)
    return channels, height, width


class BaseDistiller(nn.Module):
    """A registered student, a frozen unregistered teacher (see the module docstring) and the ground-truth loss."""

    default_loss_weights = {"gt": 1.0}

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module], loss_weights: Optional[dict] = None,
                 gt_criterion: Optional[nn.Module] = None, label_smoothing: float = 0.0):
        super().__init__()
        unknown = set(loss_weights or {}) - set(self.default_loss_weights)
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown loss weights {sorted(unknown)}; "
                             f"expected keys among {sorted(self.default_loss_weights)}")
        self.loss_weights = {**self.default_loss_weights, **{k: float(v) for k, v in (loss_weights or {}).items()}}
        self.student = student
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        object.__setattr__(self, "_teacher", teacher)  # plain attribute: not registered
        self.gt_criterion = gt_criterion
        self.label_smoothing = float(label_smoothing)

    @property
    def teacher(self) -> Optional[nn.Module]:
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        """Device, dtype and memory-format moves reach the unregistered teacher as well."""
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    @torch.no_grad()
    def teacher_logits(self, images: Tensor) -> Tensor:
        return self._teacher(images)

    def gt_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """`gt_criterion` if given; else cross-entropy, with soft labels [B, C] (mixup, cutmix) as soft
        targets and label smoothing applied to hard labels [B] only (soft labels come smoothed)."""
        if self.gt_criterion is not None:
            return self.gt_criterion(logits, labels)
        smoothing = self.label_smoothing if labels.dim() == 1 else 0.0
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class VanillaDistiller(BaseDistiller):
    """Baseline without distillation: the ground-truth loss only. A teacher passed in is not kept."""

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, **kwargs):
        super().__init__(student, None, **kwargs)

    def forward(self, images: Tensor, labels: Tensor):
        logits = self.student(images)
        return logits, {"loss_gt": self.loss_weights["gt"] * self.gt_loss(logits, labels)}


class KDDistiller(BaseDistiller):
    """Hinton KD: KL(teacher || student) at temperature T, times T**2, plus the ground-truth loss."""

    default_loss_weights = {"gt": 1.0, "kd": 1.0}

    def __init__(self, student: nn.Module, teacher: nn.Module, temperature: float = 1.0, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.temperature = float(temperature)

    def forward(self, images: Tensor, labels: Tensor):
        logits_teacher = self.teacher_logits(images)
        logits = self.student(images)
        t = self.temperature
        loss_kd = F.kl_div(F.log_softmax(logits / t, dim=-1), F.log_softmax(logits_teacher / t, dim=-1),
                           reduction="batchmean", log_target=True) * t * t
        return logits, {"loss_gt": self.loss_weights["gt"] * self.gt_loss(logits, labels),
                        "loss_kd": self.loss_weights["kd"] * loss_kd}


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
        loss_weights: 'gt' (ground truth), 'kd' (OFA loss of the final logits), 'ofa' (applied to
            the sum over the projector branches, as in the original).
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
        self.temperature = float(temperature)
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
        losses = {"loss_gt": weights["gt"] * self.gt_loss(logits, labels),
                  "loss_kd": weights["kd"] * branch_losses[-1],
                  "loss_ofa": weights["ofa"] * branch_losses[:-1].sum()}
        names = [f"ofa_{name}" for name in self.projectors] + ["ofa_logits"]
        losses.update(zip(names, branch_losses.detach()))
        return logits, losses


DISTILLERS = {"ofa": OFADistiller, "kd": KDDistiller, "vanilla": VanillaDistiller}


def build_distiller(name: str, student: nn.Module, teacher: Optional[nn.Module], **kwargs) -> BaseDistiller:
    """The distiller called `name` ('ofa', 'kd' or 'vanilla'), built with `kwargs`."""
    if name not in DISTILLERS:
        raise ValueError(f"unknown distiller {name!r}: expected one of {', '.join(map(repr, DISTILLERS))}")
    return DISTILLERS[name](student, teacher, **kwargs)

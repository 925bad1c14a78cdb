"""The distiller contract and the baseline without distillation.

A distiller is one ``nn.Module`` holding a student, a frozen teacher and its training losses.
``forward(images, labels)`` returns the student logits and a dict with exactly the entries named
in ``loss_names``; they carry gradients and sum to the training loss (:func:`total_loss`).
Everything the distiller trains besides the student (projectors, ...) is in ``extra_state()``,
so a checkpoint holds the student's weights on their own (``ofakd-eval`` and timm read them)
and the rest beside them.

The teacher is not a registered submodule: ``parameters()``, ``state_dict()``, ``train()`` and a
DDP wrapper see only what is trained, so the teacher stays frozen, in eval mode and out of
checkpoints (load it separately). ``_apply`` forwards ``.to()``, ``.cuda()``, ``.half()`` and
``.to(memory_format=...)`` to it so it always sits with the student.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from timm.layers import to_2tuple
from torch import Tensor, nn

from ..loss.sparse import SparseTeacher, dense_log_probs


@dataclass(frozen=True)
class HyperParameter:
    """One hyper-parameter of a distiller: its constructor argument, its ofakd-train flag (which the
    trainer adds for every registered distiller) and default, and the values it accepts."""
    argument: str
    flag: str
    default: float
    help: str
    low: Optional[float] = 0.0  # the smallest value accepted (None: any)
    low_open: bool = False  # True: `low` itself is refused
    kind: type = float  # float, int, or bool (a switch: --flag sets it)

    def check(self, value, owner: str) -> float:
        """`value` converted to `kind`; a ValueError naming the argument and flag when out of range."""
        value = self.kind(value)
        if self.kind is not bool and self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            bound = f"> {self.low}" if self.low_open else f">= {self.low}"
            raise ValueError(f"{owner}: {self.argument} ({self.flag}) must be {bound}, got {value}")
        return value


def total_loss(losses: Dict[str, Tensor]) -> Tensor:
    """The training loss: the sum of a distiller's loss entries (in their order)."""
    return sum(losses.values())


def model_name(model: nn.Module) -> str:
    """The timm architecture name if the model has one, else its class name."""
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """The [C, H, W] a model is built for: its patch embedding's img_size if it has one, else timm's data config;
    the channels of its first convolution (timm's config says 3 for a model built with in_chans=1)."""
    channels, height, width = resolve_model_data_config(model)["input_size"]
    channels = next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), channels)
    img_size = next((m.img_size for m in model.modules() if getattr(m, "img_size", None) is not None), None)
    if img_size is not None:
        height, width = to_2tuple(img_size)
    return channels, height, width


TEACHER_INPUT_SCALE, TEACHER_INPUT_SHIFT = "ofakd_input_scale", "ofakd_input_shift"


def set_teacher_input_normalization(teacher: nn.Module, data_mean, data_std, teacher_mean, teacher_std) -> None:
    """Makes :meth:`BaseDistiller.teacher_logits` feed `teacher` images normalized with its own statistics:
    x_t = (x * std_d + mean_d - mean_t) / std_t, as timm's ``DistillationTeacher.normalize_input`` does
    (timm/task/distillation.py), folded into x * scale + shift. Non-persistent buffers on the teacher:
    they move with it and stay out of its state_dict."""
    def column(values):
        return torch.as_tensor(values, dtype=torch.float64).reshape(1, -1, 1, 1)

    scale = column(data_std) / column(teacher_std)
    shift = (column(data_mean) - column(teacher_mean)) / column(teacher_std)
    teacher.register_buffer(TEACHER_INPUT_SCALE, scale.float(), persistent=False)
    teacher.register_buffer(TEACHER_INPUT_SHIFT, shift.float(), persistent=False)


def teacher_input(teacher: nn.Module, images: Tensor) -> Tensor:
    """The images as `teacher` reads them: renormalized if :func:`set_teacher_input_normalization` was called."""
    scale = getattr(teacher, TEACHER_INPUT_SCALE, None)
    if scale is None:
        return images
    shift = getattr(teacher, TEACHER_INPUT_SHIFT)
    return torch.addcmul(shift.to(images.dtype), images, scale.to(images.dtype))


def run_teacher(teacher: nn.Module, images: Tensor) -> Tensor:
    """The teacher's logits of `images` (the one place they are computed: distillers and ofakd-cache-teacher)."""
    return teacher(teacher_input(teacher, images))


class BaseDistiller(nn.Module):
    """A registered student, a frozen unregistered teacher (see the module docstring) and the ground-truth loss."""

    default_loss_weights = {"gt": 1.0}
    loss_names: Tuple[str, ...] = ("loss_gt",)
    hyper_parameters: Tuple[HyperParameter, ...] = ()
    needs_teacher = True  # False: trains without one (the teacher flags are ignored)
    needs_sample_index = False  # True: forward(images, labels, sample_index) gets the dataset index of each image
    reads_teacher_logits_only = False  # True: a teacher cache can stand in for the teacher (no features)

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

    def no_weight_decay(self) -> set:
        """Parameter names that get no weight decay (timm's optimizer factory reads this)."""
        skip = getattr(self.student, "no_weight_decay", None)
        return {f"student.{name}" for name in skip()} if skip is not None else set()

    def extra_state(self) -> Dict[str, Tensor]:
        """What this distiller trains besides the student, as a state dict (empty for KD)."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith("student.")}

    def load_extra_state(self, state: Dict[str, Tensor]) -> None:
        """Loads :meth:`extra_state` of a checkpoint; a ValueError naming the keys that do not fit."""
        expected = self.extra_state()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        mismatched = [key for key in set(expected) & set(state) if expected[key].shape != state[key].shape]
        if missing or unexpected or mismatched:
            raise ValueError(f"{type(self).__name__}: the saved distiller state does not fit: missing "
                             f"{missing[:4]}, unexpected {unexpected[:4]}, other shapes {sorted(mismatched)[:4]}")
        self.load_state_dict(state, strict=False)

    def teacher_inputs(self, images: Tensor) -> Tensor:
        return teacher_input(self._teacher, images)

    def use_teacher_output(self, output: Union[Tensor, SparseTeacher, None]) -> None:
        """Makes the next forward read `output` (a teacher cache's rows) instead of running the teacher."""
        object.__setattr__(self, "_given_teacher_output", output)

    @torch.no_grad()
    def teacher_output(self, images: Tensor) -> Union[Tensor, SparseTeacher]:
        """The teacher's logits of `images`, or the output :meth:`use_teacher_output` handed in (used once)."""
        given = getattr(self, "_given_teacher_output", None)
        if given is not None:
            self.use_teacher_output(None)
            return given
        return run_teacher(self._teacher, images)

    def teacher_logits(self, images: Tensor) -> Tensor:
        """Dense teacher logits [B, C]: a sparse cached teacher becomes T * log p of the teacher it stands
        for (softmax at the cache's temperature T gives p back; -inf kept finite for the losses' sake)."""
        output = self.teacher_output(images)
        if not isinstance(output, SparseTeacher):
            return output
        classes = self.student.num_classes
        log_p = dense_log_probs(output, classes, self.teacher_temperature)
        return log_p.clamp_min(-1e4) * self.teacher_temperature  # exp(-1e4) is 0 in any dtype

    @property
    def teacher_temperature(self) -> float:
        """The temperature the distillation loss reads the teacher at (a sparse cache must match it)."""
        return float(getattr(self, "temperature", 1.0))

    def gt_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """`gt_criterion` if given; else cross-entropy, with soft labels [B, C] (mixup, cutmix) as soft
        targets and label smoothing applied to hard labels [B] only (soft labels come smoothed)."""
        if self.gt_criterion is not None:
            return self.gt_criterion(logits, labels)
        smoothing = self.label_smoothing if labels.dim() == 1 else 0.0
        return F.cross_entropy(logits, labels, label_smoothing=smoothing)


class VanillaDistiller(BaseDistiller):
    """Baseline without distillation: the ground-truth loss only. A teacher passed in is not kept."""

    needs_teacher = False

    def __init__(self, student: nn.Module, teacher: Optional[nn.Module] = None, **kwargs):
        super().__init__(student, None, **kwargs)

    def forward(self, images: Tensor, labels: Tensor):
        logits = self.student(images)
        return logits, {"loss_gt": self.loss_weights["gt"] * self.gt_loss(logits, labels)}

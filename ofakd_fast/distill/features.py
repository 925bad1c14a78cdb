"""Feature reading shared by the feature-based baselines (FitNet, CC, RKD, CRD).

Both sides are read through timm's own API, for every family alike (CNN, ViT, MLP-Mixer, Swin):
stage features from ``forward_intermediates(images, indices=..., output_fmt="NCHW")`` (token
models give their patch grid as a [B, C, H, W] map, prefix tokens left out), the final features
from ``forward_features`` (or the same ``forward_intermediates`` call) and the pooled embedding of
the final features from ``forward_head(final, pre_logits=True)``: the feature the OFA-KD code
feeds its CC, RKD and CRD (``feat[-1]``, whose width is ``stage_info(-1)``). The teacher is read
under ``torch.no_grad``; a probe pass at construction reads the shapes both sides give.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .base import BaseDistiller, model_input_size, model_name
from .ofa import stage_indices


def full_precision(like: Tensor):
    """A context without autocast on `like`'s device: distances, exponentials and memory-bank
    updates run in the float32 of their inputs (cast them) instead of float16/bfloat16."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class FeatureReader:
    """Reads one model's stage features (NCHW maps) and its final features in one forward pass.

    ``stages`` (1-4, see :func:`~ofakd_fast.distill.ofa.stage_indices`) may be empty: then only
    the final features are read, with ``forward_features``.
    """

    def __init__(self, model: nn.Module, stages: Sequence[int], role: str, owner: str):
        needed = ("forward_features", "forward_head") + (("forward_intermediates", "feature_info") if stages else ())
        missing = [attr for attr in needed if not hasattr(model, attr)]
        if missing:
            raise TypeError(f"{owner}: {role} model {model_name(model)} lacks {', '.join(missing)}; its features "
                            "are read with timm's forward_intermediates()/forward_features() and pooled with "
                            "forward_head(pre_logits=True): use a timm model that provides them")
        self.stages = tuple(stages)
        indices = stage_indices(model, self.stages) if self.stages else []
        self._levels = sorted(set(indices))  # a shallow isotropic model may map two stages to one block
        self._position = [self._levels.index(index) for index in indices]

    def __call__(self, model: nn.Module, images: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The final features and one [B, C, H, W] map per stage."""
        if not self._levels:
            return model.forward_features(images), []
        final, levels = model.forward_intermediates(images, indices=self._levels, output_fmt="NCHW")
        return final, [levels[p] for p in self._position]


def pooled_embedding(model: nn.Module, final: Tensor) -> Tensor:
    """The model's pooled pre-logits feature [B, D] of its final features."""
    return model.forward_head(final, pre_logits=True).flatten(1)


class FeatureDistiller(BaseDistiller):
    """A distiller reading student and teacher features with :class:`FeatureReader`.

    Keyword arguments named by ``hyper_parameters`` are taken out of ``kwargs`` (their default when
    left out), checked and kept as attributes of that name; the rest go to :class:`BaseDistiller`.
    ``stages``: the stages whose features both sides give (none: pooled embeddings only).
    ``input_size``: [C, H, W] of the probe pass (default :func:`model_input_size` of the student);
    :attr:`student_shapes` and :attr:`teacher_shapes` hold what it read: (embedding width D,
    [(C, H, W) of each stage map]).
    """

    default_loss_weights = {"gt": 1.0, "kd": 1.0}  # --gt-loss-weight, --kd-loss-weight (OFA-KD train.py)
    loss_names = ("loss_gt", "loss_kd")

    def __init__(self, student: nn.Module, teacher: nn.Module, stages: Sequence[int] = (),
                 input_size: Optional[Sequence[int]] = None, **kwargs):
        owner = type(self).__name__
        values = {hp.argument: kwargs.pop(hp.argument, hp.default) for hp in self.hyper_parameters}
        if teacher is None:
            raise TypeError(f"{owner} needs a teacher model")
        super().__init__(student, teacher, **kwargs)
        for hp in self.hyper_parameters:
            setattr(self, hp.argument, hp.check(values[hp.argument], owner))
        self._student_reader = FeatureReader(student, stages, "student", owner)
        self._teacher_reader = FeatureReader(teacher, stages, "teacher", owner)
        size = tuple(input_size) if input_size is not None else model_input_size(student)
        self.student_shapes = self._probe(student, self._student_reader, size)
        self.teacher_shapes = self._probe(teacher, self._teacher_reader, size)

    @staticmethod
    @torch.no_grad()
    def _probe(model: nn.Module, reader: FeatureReader, input_size) -> Tuple[int, List[Tuple[int, int, int]]]:
        """One eval-mode pass of a zero image: (embedding width, [(C, H, W) of each stage map])."""
        param = next(model.parameters())
        was_training = model.training
        model.eval()
        try:
            final, stages = reader(model, torch.zeros(1, *input_size, dtype=param.dtype, device=param.device))
            return pooled_embedding(model, final).shape[1], [tuple(stage.shape[1:]) for stage in stages]
        finally:
            model.train(was_training)

    def student_features(self, images: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """The student's (logits, pooled embedding, stage maps), from one forward pass."""
        final, stages = self._student_reader(self.student, images)
        return self.student.forward_head(final), pooled_embedding(self.student, final), stages

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> Tuple[Tensor, List[Tensor]]:
        """The teacher's (pooled embedding, stage maps), without gradients."""
        final, stages = self._teacher_reader(self.teacher, self.teacher_inputs(images))
        return pooled_embedding(self.teacher, final), stages

    def weighted(self, logits: Tensor, labels: Tensor, key: str, loss: Tensor) -> dict:
        """The loss entries: ``loss_gt`` and ``loss_<key>``, each times its weight."""
        return {"loss_gt": self.loss_weights["gt"] * self.gt_loss(logits, labels),
                f"loss_{key}": self.loss_weights[key] * loss}


def require_pairs(embedding: Tensor, owner: str) -> None:
    """Relations between samples (CC, RKD) need two of them."""
    if embedding.shape[0] < 2:
        raise ValueError(f"{owner}: its loss relates the samples of a batch and needs at least 2, "
                         f"got a batch of {embedding.shape[0]}")

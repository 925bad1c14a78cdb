"""The sparse teacher: a teacher row kept as its top-k logits, their classes and its log-sum-exp.

A teacher cache stores ``SparseTeacher(indices [B, k], logits [B, k], lse [B])`` per sample instead
of C logits (TinyViT and FKD store top-k soft labels the same way). ``lse`` is
``logsumexp(t / T)`` over all C classes, so the stored probabilities ``exp(t / T - lse)`` are exact
and the rest's mass ``1 - sum`` is known; the loss spreads it evenly over the C - k other classes
(``shared/docs/ofa-loss.md``, "A sparse teacher"). Every loss entry point takes a SparseTeacher
where it takes dense teacher logits; the fused kernels read it without building a [B, C] row.
"""
from typing import NamedTuple

import torch
from torch import Tensor


class SparseTeacher(NamedTuple):
    """Top-k teacher logits of each row, their class indices and the full row's logsumexp(t / T)."""
    indices: Tensor  # [B, k], any integer dtype, distinct classes per row
    logits: Tensor   # [B, k], floating point
    lse: Tensor      # [B], logsumexp(t / T) over all C classes

    @property
    def k(self) -> int:
        return self.indices.shape[-1]


def sparse_teacher(logits_teacher: Tensor, k: int, temperature: float = 1.0) -> SparseTeacher:
    """The top-k form of dense teacher logits [B, C] at `temperature` (k = C keeps every class)."""
    classes = logits_teacher.shape[-1]
    if not 1 <= k <= classes:
        raise ValueError(f"k: expected 1 <= k <= C = {classes}, got {k}")
    values, indices = logits_teacher.topk(k, dim=-1)
    lse = torch.logsumexp(logits_teacher.to(torch.promote_types(logits_teacher.dtype, torch.float32)) / temperature, dim=-1)
    return SparseTeacher(indices, values, lse)


def dense_log_probs(teacher: SparseTeacher, classes: int, temperature: float = 1.0) -> Tensor:
    """log p [B, C] of the teacher a SparseTeacher stands for: stored classes exact, the rest's
    mass spread evenly over the C - k others (-inf where it is 0). The oracle's view; the kernels
    never build it."""
    dtype = torch.promote_types(teacher.logits.dtype, torch.float32)
    log_p_stored = teacher.logits.to(dtype) / temperature - teacher.lse.to(dtype)[:, None]
    rest = (1 - log_p_stored.exp().sum(dim=-1)).clamp_min(0)
    others = max(classes - teacher.k, 1)
    log_p = (rest / others).log()[:, None].expand(-1, classes)
    return log_p.scatter(-1, teacher.indices.long(), log_p_stored)

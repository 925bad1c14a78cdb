"""The logit-based baselines OFA-KD compares against: BKD, DKD and DIST.

Each distills from the teacher's logits alone, so it works for any student/teacher pairing with the
same classes. Facts and defaults come from the original OFA-KD code (github.com/Hao840/OFAKD):
``distillers/kd.py`` (BKD), ``distillers/dkd.py``, ``distillers/dist.py`` and the flags of ``train.py``.
As there, the loss entries are ``loss_gt`` (the ground-truth loss) and ``loss_kd`` (the distillation
loss), weighted by ``--gt-loss-weight`` and ``--kd-loss-weight`` (both 1 by default, train.py).
The losses are computed in float32 whatever the logits' dtype (AMP), as Pearson's eps and DKD's
binary split lose too much in half precision.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import BaseDistiller, HyperParameter


def hard_targets(labels: Tensor) -> Tensor:
    """Class indices [B]: the labels themselves, or the argmax of soft labels [B, C] (mixup), as OFA-KD does."""
    return labels.argmax(dim=1) if labels.dim() == 2 else labels


def bkd_loss(logits_student: Tensor, logits_teacher: Tensor) -> Tensor:
    """Binary KD: every class an independent binary problem, the student's sigmoid against the teacher's
    softmax probability (distillers/kd.py, class BKD); mean binary cross-entropy over batch and classes."""
    return F.binary_cross_entropy_with_logits(logits_student.float(), logits_teacher.float().softmax(dim=1))


def split_target(logits: Tensor, target: Tensor) -> Tuple[Tensor, Tensor]:
    """(the target logit [B], the other logits [B, C-1] in class order)."""
    is_target = F.one_hot(target, logits.shape[1]).bool()
    return logits[is_target], logits[~is_target].view(logits.shape[0], -1)


def binary_log_probs(logits: Tensor, target: Tensor) -> Tensor:
    """log [p_target, 1 - p_target] [B, 2] of softmax(logits), without forming 1 - p (stable)."""
    target_logit, other_logits = split_target(logits, target)
    both = torch.stack([target_logit, torch.logsumexp(other_logits, dim=1)], dim=1)
    return both.log_softmax(dim=1)


def kl_batchmean(log_p_student: Tensor, log_p_teacher: Tensor) -> Tensor:
    """KL(teacher || student) summed over classes, averaged over the batch."""
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def dkd_parts(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, temperature: float) -> Tuple[Tensor, Tensor]:
    """(TCKD, NCKD) of Zhao et al. at temperature T, each times T**2 (distillers/dkd.py).

    TCKD: KL between the binary distributions [p_target, 1 - p_target] of teacher and student.
    NCKD: KL between the softmaxes over the non-target classes only. The original masks the target with
    -1000 before the softmax; here it is left out, the same up to exp(-1000). The original takes the log of
    the binary probabilities (infinite once p_target rounds to 1); here they come from log-sum-exps."""
    s, t = logits_student.float() / temperature, logits_teacher.float() / temperature
    tckd = kl_batchmean(binary_log_probs(s, target), binary_log_probs(t, target))
    nckd = kl_batchmean(split_target(s, target)[1].log_softmax(dim=1), split_target(t, target)[1].log_softmax(dim=1))
    return tckd * temperature ** 2, nckd * temperature ** 2


def dkd_loss(logits_student: Tensor, logits_teacher: Tensor, target: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:
    """alpha * TCKD + beta * NCKD (see :func:`dkd_parts`)."""
    tckd, nckd = dkd_parts(logits_student, logits_teacher, target, temperature)
    return alpha * tckd + beta * nckd


def pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of a with the same row of b [B]; eps joins the denominator
    (distillers/dist.py)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def dist_parts(logits_student: Tensor, logits_teacher: Tensor, tau: float) -> Tuple[Tensor, Tensor]:
    """(inter-class, intra-class) relation losses of Huang et al. at temperature tau, each times tau**2
    (distillers/dist.py): 1 - the mean Pearson correlation of the softmaxes, per image across classes
    (inter) and per class across the batch (intra)."""
    y_s, y_t = (logits_student.float() / tau).softmax(dim=1), (logits_teacher.float() / tau).softmax(dim=1)
    inter = 1 - pearson_rows(y_s, y_t).mean()
    intra = 1 - pearson_rows(y_s.t(), y_t.t()).mean()
    return inter * tau ** 2, intra * tau ** 2


def dist_loss(logits_student: Tensor, logits_teacher: Tensor, beta: float, gamma: float, tau: float) -> Tensor:
    """beta * inter-class + gamma * intra-class relation loss (see :func:`dist_parts`)."""
    inter, intra = dist_parts(logits_student, logits_teacher, tau)
    return beta * inter + gamma * intra


class LogitDistiller(BaseDistiller):
    """A distiller whose distillation loss reads only the student's and the teacher's logits (and the
    hard targets): ``loss_gt`` and ``loss_kd``. Subclasses define :meth:`kd_loss`."""

    reads_teacher_logits_only = True

    default_loss_weights = {"gt": 1.0, "kd": 1.0}  # --gt-loss-weight, --kd-loss-weight (train.py)
    loss_names = ("loss_gt", "loss_kd")

    def __init__(self, student: nn.Module, teacher: nn.Module, **kwargs):
        """`kwargs`: each of `hyper_parameters` by its argument name (its default when left out), then the
        keyword arguments of :class:`BaseDistiller`. Each value is checked and kept under its argument name."""
        values = {hp.argument: kwargs.pop(hp.argument, hp.default) for hp in self.hyper_parameters}
        super().__init__(student, teacher, **kwargs)
        for hp in self.hyper_parameters:
            setattr(self, hp.argument, hp.check(values[hp.argument], type(self).__name__))

    def kd_loss(self, logits: Tensor, logits_teacher: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, images: Tensor, labels: Tensor):
        logits_teacher = self.teacher_logits(images)
        logits = self.student(images)
        return logits, {"loss_gt": self.loss_weights["gt"] * self.gt_loss(logits, labels),
                        "loss_kd": self.loss_weights["kd"] * self.kd_loss(logits, logits_teacher, labels)}


class BKD(LogitDistiller):
    """Binary KD, the BKD baseline of OFA-KD (Hao et al., "One-for-All: Bridge the Gap Between
    Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023; distillers/kd.py): binary
    cross-entropy of the student's per-class sigmoid against the teacher's softmax probabilities (not its
    sigmoid), averaged over batch and classes. No temperature and no other hyper-parameters."""

    def kd_loss(self, logits: Tensor, logits_teacher: Tensor, labels: Tensor) -> Tensor:
        return bkd_loss(logits, logits_teacher)


class DKD(LogitDistiller):
    """Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022): alpha * TCKD + beta * NCKD
    at temperature T (see :func:`dkd_parts`); soft labels use their argmax as the target class.

    The authors' code (mdistiller) scales the DKD loss by min(epoch / warmup, 1) (20 warmup epochs). OFA-KD's
    distillers/dkd.py has no warmup, and this trainer does not tell a distiller the epoch, so there is none here."""

    hyper_parameters = (  # defaults: OFA-KD train.py
        HyperParameter("alpha", "--dkd-alpha", 1.0, "DKD weight of the target-class term (TCKD)"),
        HyperParameter("beta", "--dkd-beta", 2.0, "DKD weight of the non-target-class term (NCKD)"),
        HyperParameter("temperature", "--dkd-temperature", 1.0, "DKD temperature", low_open=True),
    )

    def kd_loss(self, logits: Tensor, logits_teacher: Tensor, labels: Tensor) -> Tensor:
        return dkd_loss(logits, logits_teacher, hard_targets(labels), self.alpha, self.beta, self.temperature)


class DIST(LogitDistiller):
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): beta * inter-class
    + gamma * intra-class relation loss, 1 - Pearson correlation of the softmaxes at temperature tau (see
    :func:`dist_parts`). The intra-class term correlates across the batch: for a batch of one it is the
    constant 1 (no gradient), as in the original."""

    hyper_parameters = (  # defaults: OFA-KD train.py
        HyperParameter("beta", "--dist-beta", 1.0, "DIST weight of the inter-class relation loss"),
        HyperParameter("gamma", "--dist-gamma", 1.0, "DIST weight of the intra-class relation loss"),
        HyperParameter("tau", "--dist-tau", 1.0, "DIST temperature", low_open=True),
    )

    @property
    def teacher_temperature(self) -> float:
        return float(self.tau)

    def kd_loss(self, logits: Tensor, logits_teacher: Tensor, labels: Tensor) -> Tensor:
        return dist_loss(logits, logits_teacher, self.beta, self.gamma, self.tau)

"""The OFA loss written plainly in PyTorch: the one oracle every backend is tested against.

Two forms of the same math (see ``shared/docs/ofa-loss.md``):

* :func:`ofa_loss_original` computes it the way the paper's code does,
  ``softmax -> pow -> log(softmax)``. It returns NaN once a student probability
  underflows to zero while its weight is not zero (large logits, large eps).
* :func:`ofa_loss_log_domain` keeps every quantity in the log domain
  (``p ** eps = exp(eps * log_softmax(t))``, ``(1 + p_y) ** eps - 1 = expm1(eps * log1p(p_y))``)
  and stays finite for logits of any magnitude.

Both take one student branch ``[B, C]``, the teacher ``[B, C]`` and int64 targets ``[B]`` and
return the per-row loss ``[B]``; gradients come from autograd. The log-domain form also takes a
:class:`.sparse.SparseTeacher` in place of the teacher logits. :func:`ofa_loss_soft_mask` is the
oracle of the general form, for any mask ``[B, C]`` (mixup, label smoothing): the one ``ofa_loss``
runs for masks that are not one-hot.
"""
import torch
import torch.nn.functional as F

from .sparse import SparseTeacher, dense_log_probs


def ofa_loss_original(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
                      eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-row OFA loss, computed as the original OFA-KD code does (may be NaN at large eps)."""
    mask = F.one_hot(target, logits_student.shape[-1]).to(logits_student.dtype)
    pred_student = F.softmax(logits_student / temperature, dim=-1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=-1)
    weight = (pred_teacher + mask) ** eps - mask
    return -(weight * torch.log(pred_student)).sum(dim=-1)


def ofa_loss_log_domain(logits_student: torch.Tensor, logits_teacher, target: torch.Tensor,
                        eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-row OFA loss in the log domain: finite wherever the true loss is. `logits_teacher` is
    dense [B, C] or a :class:`.sparse.SparseTeacher` (its dense view: the rest's mass spread evenly)."""
    log_q = F.log_softmax(logits_student / temperature, dim=-1)
    if isinstance(logits_teacher, SparseTeacher):
        log_p = dense_log_probs(logits_teacher, logits_student.shape[-1], temperature).to(log_q.dtype)
    else:
        log_p = F.log_softmax(logits_teacher / temperature, dim=-1)
    weight = torch.exp(eps * log_p)
    p_target = log_p.gather(-1, target[:, None]).exp()
    target_weight = torch.expm1(eps * torch.log1p(p_target))
    weight = weight.scatter(-1, target[:, None], target_weight)
    return -(weight * log_q).sum(dim=-1)


def ofa_loss_soft_mask(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target_mask: torch.Tensor,
                       eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-row OFA loss for any mask m >= 0 [B, C], weighting every class by (p + m) ** eps - m as the
    original ``ofa_loss`` does (Hao840/OFAKD distillers/ofa.py), in the log domain.

    Where m > 0, (p + m) ** eps - m = m ** eps * expm1(eps * log(1 + p / m)) + m * expm1((eps - 1) * log m):
    m is subtracted inside expm1 instead of from a rounded power (at eps = 1 the weight is m * expm1(log1p(p / m))
    = p to full precision, where (p + m) - m keeps only the bits of p above m's), finite where p or q underflow.
    Where m = 0 it is p ** eps = exp(eps * log p). m = 1 gives :func:`ofa_loss_log_domain`.
    """
    log_q = F.log_softmax(logits_student / temperature, dim=-1)
    log_p = F.log_softmax(logits_teacher / temperature, dim=-1)
    mask = target_mask.to(log_p.dtype)
    positive = mask > 0
    log_m = torch.where(positive, mask, torch.ones_like(mask)).log()  # 0 where m = 0: no inf in either branch
    log1p_ratio = torch.logaddexp(log_p - log_m, torch.zeros_like(log_p))  # log(1 + p / m), exact softplus
    masked = torch.exp(eps * log_m) * torch.expm1(eps * log1p_ratio) + mask * torch.expm1((eps - 1.0) * log_m)
    weight = torch.where(positive, masked, torch.exp(eps * log_p))
    return -(weight * log_q).sum(dim=-1)


def ofa_loss_multi_reference(branch_logits, logits_teacher: torch.Tensor, target: torch.Tensor, eps,
                             temperature: float = 1.0, reduction: str = "mean",
                             form=ofa_loss_log_domain) -> torch.Tensor:
    """Loop over the K branches, as the original code does; returns [K] ('mean'/'sum') or [K, B] ('none')."""
    branch_logits = list(branch_logits)
    eps_values = [float(eps)] * len(branch_logits) if isinstance(eps, (int, float)) else [float(e) for e in eps]
    rows = torch.stack([form(s, logits_teacher, target, e, temperature)
                        for s, e in zip(branch_logits, eps_values)])
    if reduction == "none":
        return rows
    return rows.sum(dim=1) if reduction == "sum" else rows.mean(dim=1)

"""The OFA loss written plainly in PyTorch: the one oracle every backend is tested against.

Two forms of the same math (see ``shared/docs/ofa-loss.md``):

* :func:`ofa_loss_original` computes it the way the paper's code does,
  ``softmax -> pow -> log(softmax)``. It returns NaN once a student probability
  underflows to zero while its weight is not zero (large logits, large eps).
* :func:`ofa_loss_log_domain` keeps every quantity in the log domain
  (``p ** eps = exp(eps * log_softmax(t))``, ``(1 + p_y) ** eps - 1 = expm1(eps * log1p(p_y))``)
  and stays finite for logits of any magnitude.

Both take one student branch ``[B, C]``, the teacher ``[B, C]`` and int64 targets ``[B]`` and
return the per-row loss ``[B]``; gradients come from autograd.
"""
import torch
import torch.nn.functional as F


def ofa_loss_original(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
                      eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-row OFA loss, computed as the original OFA-KD code does (may be NaN at large eps)."""
    mask = F.one_hot(target, logits_student.shape[-1]).to(logits_student.dtype)
    pred_student = F.softmax(logits_student / temperature, dim=-1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=-1)
    weight = (pred_teacher + mask) ** eps - mask
    return -(weight * torch.log(pred_student)).sum(dim=-1)


def ofa_loss_log_domain(logits_student: torch.Tensor, logits_teacher: torch.Tensor, target: torch.Tensor,
                        eps: float, temperature: float = 1.0) -> torch.Tensor:
    """Per-row OFA loss in the log domain: finite wherever the true loss is."""
    log_q = F.log_softmax(logits_student / temperature, dim=-1)
    log_p = F.log_softmax(logits_teacher / temperature, dim=-1)
    weight = torch.exp(eps * log_p)
    p_target = log_p.gather(-1, target[:, None]).exp()
    target_weight = torch.expm1(eps * torch.log1p(p_target))
    weight = weight.scatter(-1, target[:, None], target_weight)
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

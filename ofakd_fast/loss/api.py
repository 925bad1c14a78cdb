"""The public loss API: ``ofa_loss`` (the original's drop-in), ``ofa_loss_multi`` and ``OFALoss``.

Every entry checks its inputs (:mod:`.checks`), picks a backend (:mod:`.backends`) and runs the
fused custom op (:mod:`.op`); ``backend='reference'`` runs the plain PyTorch oracle instead.
"""
import functools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backends import resolve_backend
from .checks import (PRESCALE_BELOW_TEMPERATURE, as_branches, branch_count, check_inputs, check_soft_mask,
                     eps_values, is_one_hot)
from .op import REDUCTIONS, EagerOFALoss, loss_dtype, ofa_loss_op, row_grad_scale, teacher_tensors
from .reference import ofa_loss_multi_reference, ofa_loss_soft_mask
from .sparse import SparseTeacher


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, dtype: torch.dtype, device: Optional[torch.device] = None) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _cached_upstream(values: tuple, dtype: torch.dtype, reduction: int, batch: int) -> tuple:
    """The announced upstream gradient [K] and the row factors the kernel scales gradients by (eager CPU)."""
    upstream = _cached_constant(values, dtype)
    return upstream, row_grad_scale(upstream, reduction, batch)


def _constant_tensor(values: tuple, dtype: torch.dtype, device: Optional[torch.device] = None) -> Tensor:
    """A small tensor of `values` that nothing writes to (eps, branch weights), made once per distinct
    value and device in eager mode: a training loop passes the same few every step, and on a GPU a
    host-to-device copy per step would cost a synchronisation point. Traced afresh under
    torch.compile, where it becomes a constant of the graph."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, dtype, device)


@functools.lru_cache(maxsize=64)
def _checked_eps(eps, num_branches: int) -> Tensor:
    """eps (a float or a tuple) checked as check_inputs does, as the op's float64 tensor; once per value."""
    return _cached_constant(tuple(eps_values(eps if isinstance(eps, float) else list(eps), num_branches)),
                            torch.float64)


def _eager_op_loss(branch_logits, logits_teacher, target, eps, temperature, reduction, backend,
                   expected_upstream: Optional[Sequence[float]]) -> Optional[Tensor]:
    """The losses from the C++ autograd op (``ofakd_fast_C::ofa_loss``), or None where it does not apply.

    The eager path of the C++ kernels with a dense teacher, int64 class indices and one dtype: the
    op's own checks (op_inputs.h, the kernel's target range) stand in for check_inputs, whose Python
    costs as much as the kernel's gap to its floor at ImageNet-1k sizes. Where the op refuses the
    inputs, None: the checked path then names what is wrong, or converts what it may (a teacher of
    another dtype, strided rows, int32 targets) and runs.
    """
    if torch.compiler.is_compiling() or not isinstance(logits_teacher, Tensor) or not isinstance(target, Tensor):
        return None
    if target.dim() != 1 or target.dtype != torch.int64 or not isinstance(eps, (int, float, list, tuple)):
        return None
    temperature = float(temperature)
    if not PRESCALE_BELOW_TEMPERATURE <= temperature < float("inf"):
        return None
    if resolve_backend(backend, logits_teacher.device) not in ("cpu", "cuda"):
        return None
    branches = as_branches(branch_logits)
    if any(entry.dtype != logits_teacher.dtype for entry in branches):
        return None
    num_branches = sum(branch_count(entry) for entry in branches)
    eps_tensor = _checked_eps(float(eps) if isinstance(eps, (int, float)) else tuple(eps), num_branches)
    if expected_upstream is not None and len(expected_upstream) != num_branches:
        return None  # the checked path names the mismatch
    upstream = grad_scale = None
    if logits_teacher.device.type == "cpu":  # the kernel writes the gradients in the forward pass
        values = expected_upstream if expected_upstream is not None else [1.0] * num_branches
        upstream, grad_scale = _cached_upstream(tuple(values), loss_dtype(logits_teacher.dtype),
                                                REDUCTIONS[reduction], target.shape[0])
    try:
        return torch.ops.ofakd_fast_C.ofa_loss(branches, logits_teacher, target, eps_tensor, temperature,
                                               REDUCTIONS[reduction], upstream, grad_scale)
    except RuntimeError:
        return None


def _fused_ofa_loss(branch_logits, logits_teacher, target, eps, temperature, reduction, backend,
                    expected_upstream: Optional[Sequence[float]]) -> Tensor:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    loss = _eager_op_loss(branch_logits, logits_teacher, target, eps, temperature, reduction, backend,
                          expected_upstream)
    if loss is not None:
        return loss
    branches, teacher, target, eps_values, temperature = check_inputs(
        branch_logits, logits_teacher, target, eps, temperature)
    if expected_upstream is not None and len(expected_upstream) != len(eps_values):
        raise ValueError(f"grad_weights: expected {len(eps_values)} values (one per branch), "
                         f"got {len(expected_upstream)}")
    device = target.device
    name = resolve_backend(backend, device)
    if name == "reference":
        split = [b for entry in branches for b in (entry.unbind(0) if entry.dim() == 3 else [entry])]
        return ofa_loss_multi_reference(split, teacher, target, eps_values, temperature, reduction)
    teacher = teacher_tensors(teacher)
    teacher_grad = torch.is_grad_enabled() and len(teacher) == 1 and teacher[0].requires_grad
    needs_grad = teacher_grad or (torch.is_grad_enabled() and any(b.requires_grad for b in branches))
    precompute = needs_grad and device.type == "cpu" and not torch.compiler.is_compiling()
    upstream = grad_scale = None
    if precompute:
        values = expected_upstream if expected_upstream is not None else [1.0] * len(eps_values)
        upstream, grad_scale = _cached_upstream(tuple(values), loss_dtype(branches[0].dtype),
                                                REDUCTIONS[reduction], target.shape[0])
    eps_tensor = _constant_tensor(tuple(eps_values), torch.float64)
    args = (target, eps_tensor, temperature, REDUCTIONS[reduction], name, upstream, teacher_grad)
    if torch.compiler.is_compiling():
        loss, _, _ = ofa_loss_op(branches, teacher, *args)
    else:
        loss, _, _ = EagerOFALoss.apply(teacher[0], tuple(teacher[1:]), *args, grad_scale, *branches)
    return loss


def ofa_loss_multi(branch_logits: Union[Tensor, Sequence[Tensor]], logits_teacher: Tensor, target: Tensor,
                   eps: Union[float, Sequence[float]], temperature: float = 1.0, reduction: str = "mean",
                   backend: str = "auto", grad_weights: Optional[Sequence[float]] = None) -> Tensor:
    """OFA losses of K student branches against one teacher, all in one fused kernel call.

    Args:
        branch_logits: K tensors [B, C], or one [K, B, C] tensor (read in place, not copied).
        logits_teacher: [B, C], or a :class:`.sparse.SparseTeacher` (top-k logits, their classes and
            the row's logsumexp: a teacher cache's form, read without building a [B, C] row).
            Gradients flow to dense logits only if they require grad.
        target: int64 class indices [B], or one-hot / soft labels [B, C] (their argmax is the target).
        eps: the exponent, one float or one per branch (each > 0).
        temperature: T > 0.
        reduction: 'mean' or 'sum' over rows gives [K]; 'none' gives [K, B].
        backend: 'auto', 'cpu', 'cuda', 'triton' or 'reference' (see ``available_backends()``).
        grad_weights: optional, one float per branch: the weight the caller gives each loss in the
            training objective (default: all 1, as in ``losses.sum()``). A hint, not a weighting:
            the losses are returned unweighted. On CPU the gradients are computed in the forward
            pass for this upstream gradient; any other upstream is still exact (recomputed).
    """
    if grad_weights is not None:
        grad_weights = [float(w) for w in grad_weights]
    return _fused_ofa_loss(branch_logits, logits_teacher, target, eps, temperature, reduction, backend,
                           grad_weights)


def ofa_loss(logits_student: Tensor, logits_teacher: Tensor, target_mask: Tensor, eps: float,
             temperature: float = 1.0, backend: str = "auto") -> Tensor:
    """Drop-in for the original OFA-KD ``ofa_loss``: the mean over rows of one branch's loss.

    `target_mask` is class indices [B] or any mask [B, C]. One-hot masks and indices run the fused
    kernel; any other mask (mixup, label smoothing) weights every class by (p + m) ** eps - m, as
    the original does, through :func:`.reference.ofa_loss_soft_mask` (PyTorch, log domain, autograd).
    Telling the two apart costs one host sync for a [B, C] mask on a GPU.
    """
    if isinstance(target_mask, Tensor) and target_mask.dim() == 2 and not is_one_hot(target_mask):
        if isinstance(logits_teacher, SparseTeacher):
            raise ValueError("target_mask: a soft mask (not one-hot) needs dense teacher logits [B, C], "
                             "got a SparseTeacher")
        branches, teacher, _, eps_values, temperature = check_inputs(
            [logits_student], logits_teacher, target_mask, [eps], temperature)
        check_soft_mask(target_mask)
        compute = loss_dtype(teacher.dtype)
        rows = ofa_loss_soft_mask(branches[0].to(compute), teacher.to(compute), target_mask.to(compute),
                                  eps_values[0], temperature)
        return rows.mean()
    return ofa_loss_multi([logits_student], logits_teacher, target_mask, [eps], temperature, "mean", backend)[0]


class OFALoss(nn.Module):
    """Weighted sum of the OFA losses of K branches, computed in one fused call.

    ``forward(branch_logits, logits_teacher, target)`` returns ``sum_k weights[k] * L_k``
    (a scalar; [B] for reduction='none'); ``last_losses`` keeps the detached per-branch L_k.
    """

    def __init__(self, eps: Union[float, Sequence[float]] = 1.0, temperature: float = 1.0,
                 weights: Optional[Sequence[float]] = None, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        self.eps = eps
        self.temperature = temperature
        self.weights = None if weights is None else [float(w) for w in weights]
        self.reduction = reduction
        self.backend = backend
        self.last_losses: Optional[Tensor] = None

    def forward(self, branch_logits, logits_teacher: Tensor, target: Tensor) -> Tensor:
        num_branches = sum(branch_count(entry) for entry in as_branches(branch_logits))
        weights = self.weights if self.weights is not None else [1.0] * num_branches
        if len(weights) != num_branches:
            raise ValueError(f"weights: expected {num_branches} values (one per branch), got {len(weights)}")
        losses = _fused_ofa_loss(branch_logits, logits_teacher, target, self.eps, self.temperature,
                                 self.reduction, self.backend, weights)
        self.last_losses = losses.detach()
        weight_tensor = _constant_tensor(tuple(weights), losses.dtype, losses.device)
        if self.reduction == "none":
            return (losses * weight_tensor[:, None]).sum(dim=0)
        return (losses * weight_tensor).sum()

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, temperature={self.temperature}, weights={self.weights}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")

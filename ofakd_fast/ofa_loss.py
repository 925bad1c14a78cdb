"""The fused multi-branch OFA loss: input checks, one autograd-aware custom op, the public API.

``torch.ops.ofakd_fast.ofa_loss`` computes K branch losses against one teacher in one fused
kernel call and is registered with ``torch.library.custom_op`` (fake + autograd), so
``torch.compile(fullgraph=True)`` keeps it in the graph.

Where the gradient is computed:

* On CPU, in eager mode, the forward kernel writes the gradients in the same pass that
  computes the loss, scaled for the upstream gradient the caller announces (ones for
  ``ofa_loss_multi(...).sum()``, the branch weights for :class:`OFALoss`). Backward hands that
  buffer to autograd once; if the real upstream differs, or backward runs a second time
  (``retain_graph``), it recomputes. One pass over the logits instead of two, and the CPU's
  exp throughput is the bottleneck.
* On CUDA, and under torch.compile, the forward saves only its inputs and backward recomputes
  the gradients with the upstream folded in (no host synchronisation, no saved K x B x C buffer).
"""
import functools
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .backends import fused_forward, resolve_backend
from .reference import ofa_loss_multi_reference

_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _branch_count(entry: Tensor) -> int:
    return entry.shape[0] if entry.dim() == 3 else 1


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _row_grad_scale(upstream: Tensor, reduction: int, batch: int) -> Tensor:
    """The factor of each (branch, row) gradient, from a per-branch [K] or per-row [K, B] upstream."""
    if upstream.dim() == 2:
        return upstream
    scale = upstream[:, None]
    return scale / batch if reduction == _REDUCTIONS["mean"] else scale


def _reduce(loss_rows: Tensor, reduction: int) -> Tensor:
    if reduction == _REDUCTIONS["none"]:
        return loss_rows
    return loss_rows.sum(dim=1) if reduction == _REDUCTIONS["sum"] else loss_rows.mean(dim=1)


def _run_kernel(branches: list, teacher: Tensor, target: Tensor, eps: Tensor, temperature: float, reduction: int,
                backend: str, grad_scale: Optional[Tensor], teacher_grad: bool) -> tuple:
    """Branch losses, plus the gradients for the row factors `grad_scale` when given (else empty)."""
    loss_rows, grad_branches, grad_teacher = fused_forward(backend)(
        branches, teacher, target, eps, temperature, grad_scale, teacher_grad)
    return _reduce(loss_rows, reduction), grad_branches, grad_teacher


def _ofa_loss_forward(branches: list, teacher: Tensor, target: Tensor, eps: Tensor, temperature: float,
                      reduction: int, backend: str, expected_upstream: Optional[Tensor],
                      teacher_grad: bool) -> tuple:
    """Branch losses, plus the gradients for `expected_upstream` when it is given (else empty)."""
    grad_scale = None if expected_upstream is None else _row_grad_scale(
        expected_upstream, reduction, teacher.shape[0])
    return _run_kernel(branches, teacher, target, eps, temperature, reduction, backend, grad_scale, teacher_grad)


_ofa_loss_op = torch.library.custom_op("ofakd_fast::ofa_loss", _ofa_loss_forward, mutates_args=(), schema=(
    "(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, float temperature, int reduction, "
    "str backend, Tensor? expected_upstream, bool teacher_grad) -> (Tensor, Tensor, Tensor)"))


@_ofa_loss_op.register_fake
def _ofa_loss_fake(branches, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad):
    num_branches = sum(_branch_count(entry) for entry in branches)
    batch, classes = teacher.shape
    loss_shape = (num_branches, batch) if reduction == _REDUCTIONS["none"] else (num_branches,)
    loss = teacher.new_empty(loss_shape, dtype=_loss_dtype(teacher.dtype))
    want_grad = expected_upstream is not None
    grad_branches = teacher.new_empty((num_branches, batch, classes) if want_grad else (0,))
    grad_teacher = teacher.new_empty((batch, classes) if want_grad and teacher_grad else (0,))
    return loss, grad_branches, grad_teacher


@torch.library.custom_op("ofakd_fast::ofa_loss_backward", mutates_args=())
def _ofa_loss_backward_op(branches: list[Tensor], teacher: Tensor, target: Tensor, eps: Tensor, temperature: float,
                          reduction: int, backend: str, grad_loss: Tensor,
                          teacher_grad: bool) -> tuple[Tensor, Tensor]:
    """Gradients of the branch losses for the upstream gradient `grad_loss`, recomputed."""
    grad_scale = _row_grad_scale(grad_loss.to(_loss_dtype(teacher.dtype)), reduction, teacher.shape[0])
    _, grad_branches, grad_teacher = fused_forward(backend)(
        branches, teacher, target, eps, temperature, grad_scale, teacher_grad)
    return grad_branches, grad_teacher


@_ofa_loss_backward_op.register_fake
def _ofa_loss_backward_fake(branches, teacher, target, eps, temperature, reduction, backend, grad_loss, teacher_grad):
    num_branches = sum(_branch_count(entry) for entry in branches)
    batch, classes = teacher.shape
    grad_teacher = teacher.new_empty((batch, classes) if teacher_grad else (0,))
    return teacher.new_empty((num_branches, batch, classes)), grad_teacher


def _setup_context(ctx, inputs, output):
    branches, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad = inputs
    ctx.save_for_backward(teacher, target, eps, *branches)
    ctx.options = (temperature, reduction, backend, teacher_grad)
    ctx.branch_counts = [_branch_count(entry) for entry in branches]
    ctx.branch_is_stacked = [entry.dim() == 3 for entry in branches]
    ctx.mark_non_differentiable(output[1], output[2])
    # Eager CPU only: gradients computed by the forward for this upstream, handed out once.
    ctx.precomputed = None if expected_upstream is None else (expected_upstream, output[1], output[2])


def _backward(ctx, grad_loss, _grad_of_grad_branches, _grad_of_grad_teacher):
    teacher, target, eps, *branches = ctx.saved_tensors
    temperature, reduction, backend, teacher_grad = ctx.options
    precomputed, ctx.precomputed = ctx.precomputed, None
    if precomputed is not None and torch.equal(
            grad_loss, precomputed[0] if reduction else precomputed[0][:, None].expand_as(grad_loss)):
        grad_branches, grad_teacher = precomputed[1], precomputed[2]
    else:
        grad_branches, grad_teacher = _ofa_loss_backward_op(
            branches, teacher, target, eps, temperature, reduction, backend, grad_loss, teacher_grad)
    if not any(ctx.branch_is_stacked):  # the common case: one view per [B, C] branch, in one op
        grads = list(grad_branches.unbind(0))
    else:
        per_entry = grad_branches.split(ctx.branch_counts)
        grads = [g if stacked else g[0] for g, stacked in zip(per_entry, ctx.branch_is_stacked)]
    return grads, (grad_teacher if teacher_grad else None), None, None, None, None, None, None, None


_ofa_loss_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerOFALoss(torch.autograd.Function):
    """The custom op's forward, setup_context and backward, called directly in eager mode.

    torch.library's Python dispatch of the custom op costs ~0.5 ms a call, as much as the
    kernel itself at ImageNet-1k sizes; torch.compile uses the op (it needs its fake kernel).
    Branch tensors come last, as varargs, so autograd sees each of them as an input.
    """

    @staticmethod
    def forward(ctx, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad,
                grad_scale, *branches):
        # grad_scale: _row_grad_scale(expected_upstream, ...), made once per distinct value by the caller.
        branches = list(branches)
        inputs = (branches, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad)
        output = _run_kernel(branches, teacher, target, eps, temperature, reduction, backend, grad_scale,
                             teacher_grad)
        _setup_context(ctx, inputs, output)
        # The gradient outputs get no gradient: without this autograd zero-fills a K x B x C
        # tensor for them in every backward (150 of 170 ms at 256x21841x5, and 1x extra memory).
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_of_grad_branches, grad_of_grad_teacher):
        if grad_loss is None:  # no gradient reached the losses (grads are not materialised)
            return (None,) * (9 + len(ctx.branch_counts))
        grads, grad_teacher, *_ = _backward(ctx, grad_loss, grad_of_grad_branches, grad_of_grad_teacher)
        return (grad_teacher, None, None, None, None, None, None, None, None, *grads)


# ----------------------------------------------------------------------------- input checks

def _as_branches(branch_logits) -> list:
    if isinstance(branch_logits, Tensor):
        if branch_logits.dim() != 3:
            raise ValueError("branch_logits: expected one [K, B, C] tensor or a sequence of [B, C] tensors, "
                             f"got a tensor of shape {tuple(branch_logits.shape)}")
        return [branch_logits]
    branches = list(branch_logits)
    if not branches:
        raise ValueError("branch_logits: expected at least one branch, got an empty sequence")
    for k, entry in enumerate(branches):
        if not isinstance(entry, Tensor):
            raise TypeError(f"branch_logits[{k}]: expected a Tensor, got {type(entry).__name__}")
        if entry.dim() != 2:
            raise ValueError(f"branch_logits[{k}]: expected shape [B, C], got {tuple(entry.shape)}")
    return branches


def _eps_values(eps, num_branches: int) -> list:
    if isinstance(eps, Tensor):
        eps = eps.tolist()
    values = [eps] * num_branches if isinstance(eps, (int, float)) else list(eps)
    if len(values) != num_branches:
        raise ValueError(f"eps: expected one value or {num_branches} values (one per branch), got {len(values)}")
    values = [float(v) for v in values]
    for k, value in enumerate(values):
        if not value > 0 or value == float("inf"):
            raise ValueError(f"eps: every value must be a finite number > 0, got eps[{k}] = {value}")
    return values


def _target_indices(target: Tensor, batch: int, classes: int, device: torch.device) -> Tensor:
    if not isinstance(target, Tensor):
        raise TypeError(f"target: expected a Tensor of class indices [B] or labels [B, C], got {type(target).__name__}")
    if target.device != device:
        raise ValueError(f"target: expected a tensor on {device} like the logits, got one on {target.device}")
    if target.dim() == 2:
        if tuple(target.shape) != (batch, classes):
            raise ValueError(f"target: a label tensor must be [B, C] = [{batch}, {classes}], got {tuple(target.shape)}")
        return target.argmax(dim=1)
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(f"target: expected class indices of shape [{batch}] or labels [{batch}, {classes}], "
                         f"got {tuple(target.shape)}")
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"target: class indices must be an integer tensor, got {target.dtype}")
    target = target.long()
    # Checked on the host for CPU tensors only (no GPU sync); under torch.compile the kernel checks.
    if device.type == "cpu" and not torch.compiler.is_compiling() and target.numel():
        lowest, highest = torch.aminmax(target)
        if int(lowest) < 0 or int(highest) >= classes:
            bad = target[(target < 0) | (target >= classes)][0].item()
            raise ValueError(f"target: class indices must lie in [0, {classes}), got {bad}")
    return target


def _rows_contiguous(t: Tensor) -> Tensor:
    """Keeps any row stride (slices of larger tensors are read in place); only the class dim must be dense."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _check_inputs(branch_logits, logits_teacher, target, eps, temperature):
    branches = _as_branches(branch_logits)
    if not isinstance(logits_teacher, Tensor) or logits_teacher.dim() != 2:
        got = tuple(logits_teacher.shape) if isinstance(logits_teacher, Tensor) else type(logits_teacher).__name__
        raise ValueError(f"logits_teacher: expected a [B, C] tensor, got {got}")
    batch, classes = logits_teacher.shape
    dtype, device = branches[0].dtype, branches[0].device
    for k, entry in enumerate(branches):
        if entry.device != device or logits_teacher.device != device:
            raise ValueError(f"branch_logits[{k}] is on {entry.device} but logits_teacher is on "
                             f"{logits_teacher.device}: all logits must be on one device")
        if tuple(entry.shape[-2:]) != (batch, classes):
            what = "class count" if entry.shape[-2] == batch else "shape"
            raise ValueError(f"branch_logits[{k}]: {what} mismatch, expected [B, C] = [{batch}, {classes}] like "
                             f"logits_teacher, got {tuple(entry.shape[-2:])}")
        if entry.dtype != dtype or not entry.dtype.is_floating_point:
            raise TypeError(f"branch_logits[{k}]: expected floating-point logits of one dtype ({dtype}), got {entry.dtype}")
    if not logits_teacher.dtype.is_floating_point:
        raise TypeError(f"logits_teacher: expected floating-point logits, got {logits_teacher.dtype}")
    temperature = float(temperature)
    if not temperature > 0 or temperature == float("inf"):
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature}")
    num_branches = sum(_branch_count(entry) for entry in branches)
    eps_values = _eps_values(eps, num_branches)
    target = _target_indices(target, batch, classes, device)
    # The teacher is read in the students' dtype: one kernel instantiation per dtype.
    teacher = _rows_contiguous(logits_teacher.to(dtype))
    return [_rows_contiguous(entry) for entry in branches], teacher, target, eps_values, temperature


# ----------------------------------------------------------------------------- public API

@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple, dtype: torch.dtype) -> Tensor:
    return torch.tensor(values, dtype=dtype)


@functools.lru_cache(maxsize=64)
def _cached_upstream(values: tuple, dtype: torch.dtype, reduction: int, batch: int) -> tuple:
    """The announced upstream gradient [K] and the row factors the kernel scales gradients by (eager CPU)."""
    upstream = _cached_constant(values, dtype)
    return upstream, _row_grad_scale(upstream, reduction, batch)


def _constant_tensor(values: tuple, dtype: torch.dtype) -> Tensor:
    """A small CPU tensor of `values` that nothing writes to (eps, upstream weights), made once per
    distinct value in eager mode: a training loop passes the same few every step. Traced afresh
    under torch.compile, where it becomes a constant of the graph."""
    return torch.tensor(values, dtype=dtype) if torch.compiler.is_compiling() else _cached_constant(values, dtype)


def _fused_ofa_loss(branch_logits, logits_teacher, target, eps, temperature, reduction, backend,
                    expected_upstream: Optional[Sequence[float]]) -> Tensor:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    branches, teacher, target, eps_values, temperature = _check_inputs(
        branch_logits, logits_teacher, target, eps, temperature)
    if expected_upstream is not None and len(expected_upstream) != len(eps_values):
        raise ValueError(f"grad_weights: expected {len(eps_values)} values (one per branch), "
                         f"got {len(expected_upstream)}")
    name = resolve_backend(backend, teacher.device)
    if name == "reference":
        split = [b for entry in branches for b in (entry.unbind(0) if entry.dim() == 3 else [entry])]
        return ofa_loss_multi_reference(split, teacher, target, eps_values, temperature, reduction)
    needs_grad = torch.is_grad_enabled() and (teacher.requires_grad or any(b.requires_grad for b in branches))
    precompute = needs_grad and teacher.device.type == "cpu" and not torch.compiler.is_compiling()
    upstream = grad_scale = None
    if precompute:
        values = expected_upstream if expected_upstream is not None else [1.0] * len(eps_values)
        upstream, grad_scale = _cached_upstream(tuple(values), _loss_dtype(teacher.dtype), _REDUCTIONS[reduction],
                                                teacher.shape[0])
    eps_tensor = _constant_tensor(tuple(eps_values), torch.float64)
    args = (teacher, target, eps_tensor, temperature, _REDUCTIONS[reduction], name, upstream,
            needs_grad and teacher.requires_grad)
    if torch.compiler.is_compiling():
        loss, _, _ = _ofa_loss_op(branches, *args)
    else:
        loss, _, _ = _EagerOFALoss.apply(*args, grad_scale, *branches)
    return loss


def ofa_loss_multi(branch_logits: Union[Tensor, Sequence[Tensor]], logits_teacher: Tensor, target: Tensor,
                   eps: Union[float, Sequence[float]], temperature: float = 1.0, reduction: str = "mean",
                   backend: str = "auto", grad_weights: Optional[Sequence[float]] = None) -> Tensor:
    """OFA losses of K student branches against one teacher, all in one fused kernel call.

    Args:
        branch_logits: K tensors [B, C], or one [K, B, C] tensor (read in place, not copied).
        logits_teacher: [B, C]. Gradients flow to it only if it requires grad.
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

    `target_mask` is a one-hot or soft label tensor [B, C] (argmax is the target), or class indices [B].
    """
    return ofa_loss_multi([logits_student], logits_teacher, target_mask, [eps], temperature, "mean", backend)[0]


class OFALoss(nn.Module):
    """Weighted sum of the OFA losses of K branches, computed in one fused call.

    ``forward(branch_logits, logits_teacher, target)`` returns ``sum_k weights[k] * L_k``
    (a scalar; [B] for reduction='none'); ``last_losses`` keeps the detached per-branch L_k.
    """

    def __init__(self, eps: Union[float, Sequence[float]] = 1.0, temperature: float = 1.0,
                 weights: Optional[Sequence[float]] = None, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
        self.eps = eps
        self.temperature = temperature
        self.weights = None if weights is None else [float(w) for w in weights]
        self.reduction = reduction
        self.backend = backend
        self.last_losses: Optional[Tensor] = None

    def forward(self, branch_logits, logits_teacher: Tensor, target: Tensor) -> Tensor:
        num_branches = sum(_branch_count(entry) for entry in _as_branches(branch_logits))
        weights = self.weights if self.weights is not None else [1.0] * num_branches
        if len(weights) != num_branches:
            raise ValueError(f"weights: expected {num_branches} values (one per branch), got {len(weights)}")
        losses = _fused_ofa_loss(branch_logits, logits_teacher, target, self.eps, self.temperature,
                                 self.reduction, self.backend, weights)
        self.last_losses = losses.detach()
        weight_tensor = torch.tensor(weights, dtype=losses.dtype, device=losses.device)
        if self.reduction == "none":
            return (losses * weight_tensor[:, None]).sum(dim=0)
        return (losses * weight_tensor).sum()

    def extra_repr(self) -> str:
        return (f"eps={self.eps}, temperature={self.temperature}, weights={self.weights}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")

"""The fused multi-branch OFA loss as one autograd-aware custom op (the public functions are in api.py).

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
from typing import Optional

import torch
from torch import Tensor

from .backends import fused_forward, fused_forward_sparse
from .checks import branch_count
from .reference import ofa_loss_multi_reference
from .sparse import SparseTeacher

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_grad_scale(upstream: Tensor, reduction: int, batch: int) -> Tensor:
    """The factor of each (branch, row) gradient, from a per-branch [K] or per-row [K, B] upstream."""
    if upstream.dim() == 2:
        return upstream
    scale = upstream[:, None]
    return scale / batch if reduction == REDUCTIONS["mean"] else scale


def _reduce(loss_rows: Tensor, reduction: int) -> Tensor:
    if reduction == REDUCTIONS["none"]:
        return loss_rows
    return loss_rows.sum(dim=1) if reduction == REDUCTIONS["sum"] else loss_rows.mean(dim=1)


def teacher_tensors(teacher) -> list:
    """The op's ``Tensor[] teacher``: [logits [B, C]] (dense) or [logits, indices, lse] (a SparseTeacher)."""
    return [teacher.logits, teacher.indices, teacher.lse] if isinstance(teacher, SparseTeacher) else [teacher]


def as_teacher(tensors: list):
    """The dense logits or the SparseTeacher that :func:`teacher_tensors` made `tensors` from."""
    return tensors[0] if len(tensors) == 1 else SparseTeacher(tensors[1], tensors[0], tensors[2])


def _kernel(branches: list, teacher: list, target: Tensor, eps: Tensor, temperature: float, backend: str,
            grad_scale: Optional[Tensor], teacher_grad: bool) -> tuple:
    """(loss rows [K, B], branch gradients, teacher gradient) from the backend's dense or sparse kernel."""
    if len(teacher) == 1:
        return fused_forward(backend)(branches, teacher[0], target, eps, temperature, grad_scale, teacher_grad)
    loss_rows, grad_branches = fused_forward_sparse(backend)(
        branches, *teacher, target, eps, temperature, grad_scale)
    return loss_rows, grad_branches, grad_branches.new_empty((0,))


def run_kernel(branches: list, teacher: list, target: Tensor, eps: Tensor, temperature: float, reduction: int,
               backend: str, grad_scale: Optional[Tensor], teacher_grad: bool) -> tuple:
    """Branch losses, plus the gradients for the row factors `grad_scale` when given (else empty)."""
    loss_rows, grad_branches, grad_teacher = _kernel(
        branches, teacher, target, eps, temperature, backend, grad_scale, teacher_grad)
    return _reduce(loss_rows, reduction), grad_branches, grad_teacher


def _ofa_loss_forward(branches: list, teacher: list, target: Tensor, eps: Tensor, temperature: float,
                      reduction: int, backend: str, expected_upstream: Optional[Tensor],
                      teacher_grad: bool) -> tuple:
    """Branch losses, plus the gradients for `expected_upstream` when it is given (else empty)."""
    grad_scale = None if expected_upstream is None else row_grad_scale(
        expected_upstream, reduction, target.shape[0])
    return run_kernel(branches, teacher, target, eps, temperature, reduction, backend, grad_scale, teacher_grad)


ofa_loss_op = torch.library.custom_op("ofakd_fast::ofa_loss", _ofa_loss_forward, mutates_args=(), schema=(
    "(Tensor[] branches, Tensor[] teacher, Tensor target, Tensor eps, float temperature, int reduction, "
    "str backend, Tensor? expected_upstream, bool teacher_grad) -> (Tensor, Tensor, Tensor)"))


@ofa_loss_op.register_fake
def _ofa_loss_fake(branches, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad):
    num_branches = sum(branch_count(entry) for entry in branches)
    batch, classes = target.shape[0], branches[0].shape[-1]
    loss_shape = (num_branches, batch) if reduction == REDUCTIONS["none"] else (num_branches,)
    loss = branches[0].new_empty(loss_shape, dtype=loss_dtype(branches[0].dtype))
    want_grad = expected_upstream is not None
    grad_branches = branches[0].new_empty((num_branches, batch, classes) if want_grad else (0,))
    grad_teacher = branches[0].new_empty((batch, classes) if want_grad and teacher_grad else (0,))
    return loss, grad_branches, grad_teacher


@torch.library.custom_op("ofakd_fast::ofa_loss_backward", mutates_args=())
def _ofa_loss_backward_op(branches: list[Tensor], teacher: list[Tensor], target: Tensor, eps: Tensor, temperature: float,
                          reduction: int, backend: str, grad_loss: Tensor,
                          teacher_grad: bool) -> tuple[Tensor, Tensor]:
    """Gradients of the branch losses for the upstream gradient `grad_loss`, recomputed."""
    grad_scale = row_grad_scale(grad_loss.to(loss_dtype(branches[0].dtype)), reduction, target.shape[0])
    _, grad_branches, grad_teacher = _kernel(branches, teacher, target, eps, temperature, backend, grad_scale,
                                             teacher_grad)
    return grad_branches, grad_teacher


@_ofa_loss_backward_op.register_fake
def _ofa_loss_backward_fake(branches, teacher, target, eps, temperature, reduction, backend, grad_loss, teacher_grad):
    num_branches = sum(branch_count(entry) for entry in branches)
    batch, classes = target.shape[0], branches[0].shape[-1]
    grad_teacher = branches[0].new_empty((batch, classes) if teacher_grad else (0,))
    return branches[0].new_empty((num_branches, batch, classes)), grad_teacher


def _setup_context(ctx, inputs, output):
    branches, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad = inputs
    ctx.save_for_backward(target, eps, *teacher, *branches)
    ctx.options = (temperature, reduction, backend, teacher_grad)
    ctx.teacher_tensors = len(teacher)
    ctx.branch_counts = [branch_count(entry) for entry in branches]
    ctx.branch_is_stacked = [entry.dim() == 3 for entry in branches]
    ctx.mark_non_differentiable(output[1], output[2])
    # Eager CPU only: gradients computed by the forward for this upstream, handed out once.
    ctx.precomputed = None if expected_upstream is None else (expected_upstream, output[1], output[2])


def _saved_inputs(ctx) -> tuple:
    """(target, eps, teacher tensors, branches) as `_setup_context` saved them."""
    target, eps, *rest = ctx.saved_tensors
    return target, eps, rest[:ctx.teacher_tensors], rest[ctx.teacher_tensors:]


def _teacher_grads(ctx, grad_logits: Optional[Tensor]) -> list:
    """The gradient of the op's ``Tensor[] teacher``: the logits' (or None), None for indices and lse."""
    return [grad_logits] + [None] * (ctx.teacher_tensors - 1)


def graph_grads(branches: list, teacher: list, target: Tensor, eps: Tensor, temperature: float, reduction: int,
                grad_loss: Tensor, teacher_grad: bool) -> list:
    """Gradients that have a graph themselves (``create_graph=True``: a gradient penalty, double
    backward), from autograd over the reference: the fused kernels write first-order gradients only,
    and a gradient detached from its graph would be silently wrong. One per entry of `branches`
    (None where it needs none), then the teacher logits' when `teacher_grad`."""
    split = [b for entry in branches for b in (entry.unbind(0) if entry.dim() == 3 else [entry])]
    reduction_name = next(name for name, code in REDUCTIONS.items() if code == reduction)
    losses = ofa_loss_multi_reference(split, as_teacher(teacher), target, eps.tolist(), temperature, reduction_name)
    inputs = [*branches, teacher[0]] if teacher_grad else branches
    wanted = [x for x in inputs if x.requires_grad]
    found = iter(torch.autograd.grad(losses, wanted, grad_loss, create_graph=True, allow_unused=True))
    grads = [next(found) if x.requires_grad else None for x in inputs]
    return [torch.zeros_like(x) if g is None and x.requires_grad else g for g, x in zip(grads, inputs)]


def _differentiable_backward(ctx, grad_loss) -> tuple:
    """The custom op's backward under ``create_graph=True`` (see :func:`graph_grads`)."""
    target, eps, teacher, branches = _saved_inputs(ctx)
    temperature, reduction, _, teacher_grad = ctx.options
    grads = graph_grads(branches, teacher, target, eps, temperature, reduction, grad_loss, teacher_grad)
    return grads[:len(branches)], _teacher_grads(ctx, grads[-1] if teacher_grad else None), *(None,) * 7


# The C++ autograd op's backward under create_graph=True (csrc/ofa_loss_autograd.cpp): graph_grads
# for a dense teacher, with an empty tensor where an entry needs no gradient (a Tensor[] holds no None).
_LIBRARY = torch.library.Library("ofakd_fast", "FRAGMENT")
_LIBRARY.define("ofa_loss_graph_backward(Tensor[] branches, Tensor teacher, Tensor target, Tensor eps, "
                "float temperature, int reduction, Tensor grad_loss, bool teacher_grad) -> Tensor[]")


def _graph_backward_op(branches, teacher, target, eps, temperature, reduction, grad_loss, teacher_grad):
    grads = graph_grads(list(branches), [teacher], target, eps, temperature, reduction, grad_loss, teacher_grad)
    return [x.new_empty((0,)) if g is None else g for g, x in zip(grads, [*branches, teacher])]


_LIBRARY.impl("ofa_loss_graph_backward", _graph_backward_op, "CompositeImplicitAutograd")


def _backward(ctx, grad_loss, _grad_of_grad_branches, _grad_of_grad_teacher):
    if torch.is_grad_enabled():  # backward with create_graph=True
        ctx.precomputed = None
        return _differentiable_backward(ctx, grad_loss)
    target, eps, teacher, branches = _saved_inputs(ctx)
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
    return grads, _teacher_grads(ctx, grad_teacher if teacher_grad else None), *(None,) * 7


ofa_loss_op.register_autograd(_backward, setup_context=_setup_context)


class EagerOFALoss(torch.autograd.Function):
    """The custom op's forward, setup_context and backward, called directly in eager mode.

    torch.library's Python dispatch of the custom op costs ~0.5 ms a call, as much as the
    kernel itself at ImageNet-1k sizes; torch.compile uses the op (it needs its fake kernel).
    Branch tensors come last, as varargs, so autograd sees each of them as an input; the teacher's
    logits come first (they get a gradient when they require one), a sparse teacher's indices and
    lse in `teacher_extra` (a tuple, empty for a dense teacher).
    """

    @staticmethod
    def forward(ctx, teacher_logits, teacher_extra, target, eps, temperature, reduction, backend, expected_upstream,
                teacher_grad, grad_scale, *branches):
        # grad_scale: row_grad_scale(expected_upstream, ...), made once per distinct value by the caller.
        branches, teacher = list(branches), [teacher_logits, *teacher_extra]
        inputs = (branches, teacher, target, eps, temperature, reduction, backend, expected_upstream, teacher_grad)
        output = run_kernel(branches, teacher, target, eps, temperature, reduction, backend, grad_scale,
                             teacher_grad)
        _setup_context(ctx, inputs, output)
        # The gradient outputs get no gradient: without this autograd zero-fills a K x B x C
        # tensor for them in every backward (150 of 170 ms at 256x21841x5, and 1x extra memory).
        ctx.set_materialize_grads(False)
        return output

    @staticmethod
    def backward(ctx, grad_loss, grad_of_grad_branches, grad_of_grad_teacher):
        if grad_loss is None:  # no gradient reached the losses (grads are not materialised)
            return (None,) * (10 + len(ctx.branch_counts))
        grads, (grad_teacher, *_), *_ = _backward(ctx, grad_loss, grad_of_grad_branches, grad_of_grad_teacher)
        return (grad_teacher, None, None, None, None, None, None, None, None, None, *grads)

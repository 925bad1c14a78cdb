"""The eager path's autograd node in C++ (csrc/ofa_loss_autograd.cpp, api._eager_op_loss).

The fused CPU call runs ``ofakd_fast_C::ofa_loss`` when its inputs are the kernel's own (a dense
teacher, int64 class indices, one dtype, dense rows); anything else takes the checked Python path.
Both must give the same bits, and the C++ node must keep every behaviour of the Python one.
"""
import pytest
import torch

from conftest import make_case
from ofakd_fast import OFALoss, ofa_loss_multi
from ofakd_fast.loss.extension import cpu_extension_error
from ofakd_fast.loss.reference import ofa_loss_multi_reference

pytestmark = pytest.mark.skipif(cpu_extension_error() is not None, reason=f"no CPU kernel: {cpu_extension_error()}")

CPP_NODE = "OFALossFunction"


def _graph_nodes(loss) -> set:
    """The names of every autograd node behind `loss`."""
    names, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.add(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def _takes_cpp_node(loss) -> bool:
    return any(CPP_NODE in name for name in _graph_nodes(loss))


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kernel_inputs_take_the_cpp_node(stacked, teacher_grad):
    students, teacher, target = make_case(6, 40, 3)
    teacher.requires_grad_(teacher_grad)
    eps = [1.2, 1.2, 0.8]
    stack = torch.stack([s.detach() for s in students]).requires_grad_()
    loss = ofa_loss_multi(stack if stacked else students, teacher, target, eps)
    assert _takes_cpp_node(loss)
    leaves = [stack] if stacked else students
    got = torch.autograd.grad(loss.sum(), leaves + ([teacher] if teacher_grad else []))
    got_students = list(got[0].unbind(0)) if stacked else list(got[:3])

    ref_students = [s.detach().double().requires_grad_() for s in students]
    ref_teacher = teacher.detach().double().requires_grad_(teacher_grad)
    ref = ofa_loss_multi_reference(ref_students, ref_teacher, target, eps)
    want = torch.autograd.grad(ref.sum(), ref_students + ([ref_teacher] if teacher_grad else []))
    for g, w in zip(got_students + ([got[-1]] if teacher_grad else []), want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-7)


def _converted(kind, students, teacher, target):
    """Inputs the C++ op refuses and the checked path converts: the same problem in another form."""
    if kind == "int32 target":
        return students, teacher, target.int()
    if kind == "one-hot labels":
        return students, teacher, torch.nn.functional.one_hot(target, teacher.shape[1]).float()
    # Every other class of a wider row: a class stride of 2, which the kernel does not read.
    strided = [torch.stack([s.detach(), s.detach()], dim=2).flatten(1)[:, ::2].requires_grad_() for s in students]
    assert strided[0].stride(1) == 2
    return strided, teacher, target


@pytest.mark.parametrize("kind", ["int32 target", "one-hot labels", "strided rows"])
def test_refused_inputs_take_the_checked_path_with_the_same_bits(kind):
    students, teacher, target = make_case(5, 30, 2)
    fast = ofa_loss_multi(students, teacher, target, 1.3)
    fast_grads = torch.autograd.grad(fast.sum(), students)
    other_students, other_teacher, other_target = _converted(kind, students, teacher, target)
    other = ofa_loss_multi(other_students, other_teacher, other_target, 1.3)
    assert not _takes_cpp_node(other)
    other_grads = torch.autograd.grad(other.sum(), other_students)
    assert torch.equal(fast, other)
    for g, h in zip(fast_grads, other_grads):
        assert torch.equal(g, h)


def test_bad_input_from_the_fast_path_is_named_by_the_checked_path():
    students, teacher, target = make_case(4, 10, 2)
    with pytest.raises(ValueError, match=r"target: class indices must lie in \[0, 10\), got 10"):
        ofa_loss_multi(students, teacher, torch.tensor([0, 1, 10, 2]), 1.0)
    with pytest.raises(ValueError, match="eps: every value must be a finite number > 0"):
        ofa_loss_multi(students, teacher, target, [1.0, -1.0])


def test_inference_mode_gives_the_losses():
    students, teacher, target = make_case(4, 20, 2)
    with torch.inference_mode():
        loss = ofa_loss_multi([s.detach().clone() for s in students], teacher.clone(), target.clone(), 1.1)
    assert torch.equal(loss, ofa_loss_multi(students, teacher, target, 1.1).detach())


def test_module_upstream_is_precomputed_and_a_second_backward_recomputes():
    """OFALoss announces its weights: the first backward takes the forward's gradients, a retained
    second backward with another upstream computes them again (both exact)."""
    students, teacher, target = make_case(8, 25, 2)
    total = OFALoss(eps=1.2, weights=[0.5, 2.0])(students, teacher, target)
    assert _takes_cpp_node(total)
    first = torch.autograd.grad(total, students, retain_graph=True)
    second = torch.autograd.grad(-total, students)
    for g1, g2 in zip(first, second):
        assert torch.equal(g2, -g1)

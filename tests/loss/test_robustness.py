"""Inputs that once gave a quietly wrong result: second-order gradients, a teacher wider than the
students, extreme temperatures, boolean labels, a misspelt OFAKD_BACKEND."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_case
from ofakd_fast import OFALoss, ofa_loss_multi
from ofakd_fast.loss.reference import ofa_loss_multi_reference


def test_second_order_gradients_match_the_reference(backend):
    students, teacher, target = make_case(3, 5, 2, dtype=torch.float64)
    teacher.requires_grad_()

    def losses(a, b, t):
        return ofa_loss_multi([a, b], t, target, [1.2, 0.8], 2.0, backend=backend)

    assert torch.autograd.gradgradcheck(losses, (*students, teacher))
    # A gradient penalty trains on both terms: its gradient equals the reference's.
    def penalty(loss_fn):
        first = loss_fn(students, teacher, target, [1.2, 0.8], 2.0).sum()
        grads = torch.autograd.grad(first, students, create_graph=True)
        return torch.autograd.grad(first + sum((g ** 2).sum() for g in grads), students)

    fused = penalty(lambda *a: ofa_loss_multi(*a, backend=backend))
    for got, expected in zip(fused, penalty(ofa_loss_multi_reference)):
        torch.testing.assert_close(got, expected)


def test_a_float32_teacher_is_not_narrowed_to_float16_students(backend):
    students, teacher, target = make_case(4, 10, 1)
    teacher[0, 0] = 1e5  # inf in float16
    half = [s.detach().half().requires_grad_() for s in students]
    loss = ofa_loss_multi(half, teacher, target, 1.2, backend=backend)
    expected = ofa_loss_multi_reference([h.detach().float() for h in half], teacher, target, 1.2)
    torch.testing.assert_close(loss, expected)
    loss.sum().backward()
    assert half[0].grad.dtype == torch.float16 and torch.isfinite(half[0].grad).all()


@pytest.mark.parametrize("temperature", [1e-9, 1e-30, 0.005])
def test_tiny_temperatures_stay_finite(backend, temperature):
    students, teacher, target = make_case(4, 10, 2)
    loss = ofa_loss_multi(students, teacher, target, 1.2, temperature, backend=backend)
    expected = ofa_loss_multi_reference(students, teacher, target, 1.2, temperature)
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, expected)
    grads = torch.autograd.grad(loss.sum(), students)
    reference = torch.autograd.grad(expected.sum(), students)
    for got, want in zip(grads, reference):
        torch.testing.assert_close(got, want)


def test_boolean_label_masks_are_read_as_one_hot(backend):
    students, teacher, target = make_case(4, 10, 1)
    mask = F.one_hot(target, 10).bool()
    torch.testing.assert_close(ofa_loss_multi(students, teacher, mask, 1.2, backend=backend),
                               ofa_loss_multi(students, teacher, target, 1.2, backend=backend))


def test_a_misspelt_backend_variable_is_named(monkeypatch):
    students, teacher, target = make_case(2, 4, 1)
    monkeypatch.setenv("OFAKD_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="environment variable OFAKD_BACKEND='nonsense': expected one of 'auto'"):
        ofa_loss_multi(students, teacher, target, 1.0)
    with pytest.raises(ValueError, match="OFAKD_BACKEND='nonsense'"):
        OFALoss(1.0)(students, teacher, target)

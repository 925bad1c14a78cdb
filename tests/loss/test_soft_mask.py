"""``ofa_loss`` with soft masks (mixup, label smoothing) against the original formula, in float64."""
import pytest
import torch
import torch.nn.functional as F

from conftest import make_case
from ofakd_fast import ofa_loss, ofa_loss_multi
from ofakd_fast.loss.reference import ofa_loss_log_domain, ofa_loss_soft_mask

EPS_CHOICES = (0.5, 1.0, 1.3, 2.0)


def original_ofa_loss(logits_student, logits_teacher, target_mask, eps, temperature=1.0):
    """The formula of the original ``ofa_loss`` (Hao840/OFAKD distillers/ofa.py), mask as given."""
    pred_student = F.softmax(logits_student / temperature, dim=1)
    pred_teacher = F.softmax(logits_teacher / temperature, dim=1)
    prod = (pred_teacher + target_mask) ** eps
    return torch.sum(-(prod - target_mask) * torch.log(pred_student), dim=-1).mean()


def random_soft(batch, classes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, classes, generator=gen, dtype=torch.float64).softmax(dim=1)


def mixup_two_hot(target, classes, lam=0.7):
    """Mixup / cutmix of the batch with its flip, as timm's Mixup mixes labels."""
    one_hot = F.one_hot(target, classes).double()
    return lam * one_hot + (1 - lam) * one_hot.flip(0)


def label_smoothed(target, classes, smoothing=0.1):
    """timm's smoothing: off = smoothing / C, on = 1 - smoothing + off."""
    off = smoothing / classes
    return F.one_hot(target, classes).double() * (1 - smoothing) + off


MASKS = {
    "random": lambda target, classes: random_soft(len(target), classes),
    "mixup": lambda target, classes: mixup_two_hot(target, classes),
    "smoothed": lambda target, classes: label_smoothed(target, classes),
    "mixup_smoothed": lambda target, classes: 0.6 * label_smoothed(target, classes)
    + 0.4 * label_smoothed(target.flip(0), classes),
}


@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("eps", EPS_CHOICES)
@pytest.mark.parametrize("temperature", (1.0, 2.0))
def test_soft_masks_match_original_formula(kind, eps, temperature):
    students, teacher, target = make_case(16, 10, 1, dtype=torch.float64)
    mask = MASKS[kind](target, 10)
    student = students[0]
    want = original_ofa_loss(student, teacher, mask, eps, temperature)
    got = ofa_loss(student, teacher, mask, eps, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    want_grad, = torch.autograd.grad(want, student)
    got_grad, = torch.autograd.grad(got, student)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-10, atol=1e-12)


def test_float32_soft_mask_matches_float64():
    students, teacher, target = make_case(32, 100, 1)
    mask = mixup_two_hot(target, 100).float()
    got = ofa_loss(students[0], teacher, mask, 1.3, 2.0)
    assert got.dtype == torch.float32
    want = original_ofa_loss(students[0].detach().double(), teacher.double(), mask.double(), 1.3, 2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("eps", EPS_CHOICES)
def test_one_hot_masks_take_the_fused_path_exactly(eps):
    students, teacher, target = make_case(16, 50, 1)
    fused = ofa_loss_multi(students, teacher, target, eps)[0]
    for mask in (F.one_hot(target, 50).float(), F.one_hot(target, 50).bool(), F.one_hot(target, 50), target):
        assert torch.equal(ofa_loss(students[0], teacher, mask, eps), fused)


def test_oracle_on_one_hot_is_the_log_domain_form():
    students, teacher, target = make_case(8, 20, 1, dtype=torch.float64)
    for eps in EPS_CHOICES:
        torch.testing.assert_close(ofa_loss_soft_mask(students[0], teacher, F.one_hot(target, 20), eps),
                                   ofa_loss_log_domain(students[0], teacher, target, eps))


def test_multi_and_module_keep_argmax_for_soft_labels():
    students, teacher, target = make_case(8, 20, 1)
    soft = label_smoothed(target, 20).float()
    assert torch.equal(ofa_loss_multi(students, teacher, soft, 1.3), ofa_loss_multi(students, teacher, target, 1.3))


def test_stable_where_the_original_is_not():
    """A student probability underflows: the original gives inf/NaN, the oracle stays finite."""
    student = torch.tensor([[40.0, 0.0, -800.0]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[40.0, 0.0, -800.0]], dtype=torch.float64)
    mask = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64)
    assert not torch.isfinite(original_ofa_loss(student, teacher, mask, 2.0))
    loss = ofa_loss(student, teacher, mask, 2.0)
    grad, = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_eps_one_weight_keeps_small_probabilities():
    """At eps = 1 the weight is p itself, even where p is far below m (no (p + m) - m rounding)."""
    teacher = torch.tensor([[0.0, -40.0]], dtype=torch.float64)  # p1 = e^-40, far below m1 = 0.5
    student = torch.tensor([[0.0, -700.0]], dtype=torch.float64)  # the loss is ~ 700 * w1: w1 alone counts
    mask = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    want = -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1)
    torch.testing.assert_close(ofa_loss_soft_mask(student, teacher, mask, 1.0), want, rtol=1e-14, atol=0)
    assert original_ofa_loss(student, teacher, mask, 1.0) < want / 2  # (p1 + m1) - m1 rounds to 0


@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("eps", (0.7, 1.0, 1.6))
def test_gradcheck(kind, eps):
    students, teacher, target = make_case(4, 6, 1, dtype=torch.float64)
    teacher.requires_grad_()
    mask = MASKS[kind](target, 6)
    assert torch.autograd.gradcheck(lambda s, t: ofa_loss(s, t, mask, eps, 1.5), (students[0], teacher))
    assert torch.autograd.gradgradcheck(lambda s, t: ofa_loss(s, t, mask, eps, 1.5), (students[0], teacher))


def test_soft_mask_errors():
    students, teacher, target = make_case(4, 6, 1)
    with pytest.raises(ValueError, match="target_mask: expected finite values >= 0"):
        ofa_loss(students[0], teacher, -label_smoothed(target, 6).float(), 1.0)
    with pytest.raises(ValueError, match="target: a label tensor must be"):
        ofa_loss(students[0], teacher, torch.full((4, 7), 0.5), 1.0)

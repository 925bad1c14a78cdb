"""The logit baselines BKD, DKD and DIST: their losses against hand-computed and textbook formulas, and one
training step each on tiny heterogeneous timm pairings (CNN, ViT, MLP), CPU, 32x32 images, 10 classes."""
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from ofakd_fast.distill.base import total_loss
from ofakd_fast.distill.logit_baselines import (BKD, DIST, DKD, bkd_loss, dist_loss, dist_parts, dkd_loss, dkd_parts,
                                                hard_targets)

CLASSES, BATCH, IMG = 10, 4, 32


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# --- DKD ------------------------------------------------------------------------------------------------------

def dkd_by_hand(z_s, z_t, target, temperature):
    """TCKD and NCKD of one sample from the paper's definitions (Zhao et al., Eq. 1-4), times T**2."""
    p_s, p_t = softmax([v / temperature for v in z_s]), softmax([v / temperature for v in z_t])
    b_s, b_t = [p_s[target], 1 - p_s[target]], [p_t[target], 1 - p_t[target]]
    others = [i for i in range(len(z_s)) if i != target]
    hat_s = [p_s[i] / (1 - p_s[target]) for i in others]  # the softmax over the non-target classes
    hat_t = [p_t[i] / (1 - p_t[target]) for i in others]
    return kl(b_t, b_s) * temperature ** 2, kl(hat_t, hat_s) * temperature ** 2, p_t[target]


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("target", [0, 1, 2])
def test_dkd_split_on_three_classes_by_hand(temperature, target):
    z_s, z_t = [2.0, 1.0, -0.5], [0.5, 3.0, -1.0]
    tckd, nckd, p_target = dkd_by_hand(z_s, z_t, target, temperature)
    args = torch.tensor([z_s]), torch.tensor([z_t]), torch.tensor([target])
    got_tckd, got_nckd = dkd_parts(*args, temperature)
    assert got_tckd.item() == pytest.approx(tckd, rel=1e-5, abs=1e-7)
    assert got_nckd.item() == pytest.approx(nckd, rel=1e-5, abs=1e-7)
    assert dkd_loss(*args, 0.5, 3.0, temperature).item() == pytest.approx(0.5 * tckd + 3.0 * nckd, rel=1e-5, abs=1e-7)
    # The paper's Eq. 5: KD = TCKD + (1 - p_target of the teacher) * NCKD.
    p_s, p_t = softmax([v / temperature for v in z_s]), softmax([v / temperature for v in z_t])
    assert kl(p_t, p_s) * temperature ** 2 == pytest.approx(tckd + (1 - p_target) * nckd, rel=1e-9)


def test_dkd_batch_mean_and_extreme_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7) * 3, torch.randn(5, 7) * 3
    target = torch.randint(0, 7, (5,))
    expected = [dkd_by_hand(s[i].tolist(), t[i].tolist(), int(target[i]), 2.0)[:2] for i in range(5)]
    tckd, nckd = dkd_parts(s, t, target, 2.0)
    assert tckd.item() == pytest.approx(sum(e[0] for e in expected) / 5, rel=1e-5)
    assert nckd.item() == pytest.approx(sum(e[1] for e in expected) / 5, rel=1e-5)
    # A near-certain student (p_target -> 1) keeps finite losses and gradients: no log(1 - p).
    s = torch.tensor([[60.0, 0.0, -5.0]], requires_grad=True)
    loss = dkd_loss(s, torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0]), 1.0, 2.0, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


def test_dkd_soft_labels_use_their_argmax():
    soft = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.2, 0.3]])
    assert hard_targets(soft).tolist() == [1, 0]
    hard = torch.tensor([2, 0])
    assert hard_targets(hard) is hard


# --- DIST -----------------------------------------------------------------------------------------------------

def pearson(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1]


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_dist_terms_against_direct_pearson(tau):
    torch.manual_seed(1)
    s, t = torch.randn(6, 5, dtype=torch.float64) * 2, torch.randn(6, 5, dtype=torch.float64) * 2
    y_s, y_t = (s / tau).softmax(1), (t / tau).softmax(1)
    inter = 1 - torch.stack([pearson(y_s[i], y_t[i]) for i in range(6)]).mean()  # per image, across classes
    intra = 1 - torch.stack([pearson(y_s[:, c], y_t[:, c]) for c in range(5)]).mean()  # per class, across images
    got_inter, got_intra = dist_parts(s, t, tau)
    assert got_inter.item() == pytest.approx(tau ** 2 * inter.item(), rel=1e-5)
    assert got_intra.item() == pytest.approx(tau ** 2 * intra.item(), rel=1e-5)
    assert dist_loss(s, t, 2.0, 0.5, tau).item() == pytest.approx(tau ** 2 * (2 * inter + 0.5 * intra).item(), rel=1e-5)


def test_dist_is_zero_for_matching_and_two_for_reversed_relations():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 4.0]])
    assert dist_loss(t, t, 1.0, 1.0, 1.0).item() == pytest.approx(0.0, abs=1e-5)  # float32, eps
    # Over two images, Pearson is +-1: swapping the student's images reverses every class's relation.
    inter, intra = dist_parts(t.flip(0), t, 1.0)
    assert intra.item() == pytest.approx(2.0, abs=1e-5) and 0.0 < inter.item() < 2.0


# --- BKD ------------------------------------------------------------------------------------------------------

def test_bkd_against_explicit_binary_cross_entropy():
    z_s, z_t = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]], [[2.0, 0.0, 1.0], [-1.0, 0.5, 0.5]]
    total = 0.0
    for row_s, row_t in zip(z_s, z_t):
        for z, q in zip(row_s, softmax(row_t)):  # teacher softmax as the target of each class's sigmoid
            sig = 1 / (1 + math.exp(-z))
            total -= q * math.log(sig) + (1 - q) * math.log(1 - sig)
    assert bkd_loss(torch.tensor(z_s), torch.tensor(z_t)).item() == pytest.approx(total / 6, rel=1e-6)


def test_losses_are_float32_under_half_precision_logits():
    s, t = torch.randn(3, 5).bfloat16(), torch.randn(3, 5).bfloat16()
    target = torch.tensor([0, 4, 2])
    for loss in (bkd_loss(s, t), dkd_loss(s, t, target, 1.0, 2.0, 1.0), dist_loss(s, t, 1.0, 1.0, 1.0)):
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- the distillers on heterogeneous pairings -----------------------------------------------------------------

def make_model(family: str) -> nn.Module:
    """Tiny members of each family for 32x32 inputs, random weights."""
    if family == "cnn":
        return timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES, channels=(8, 16, 32, 64),
                                 stem_width=8)
    if family == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, img_size=IMG,
                                 patch_size=8, embed_dim=32, depth=2, num_heads=2)
    if family == "mlp":  # the mixer_* factories fix width and depth: build the class
        return MlpMixer(num_classes=CLASSES, img_size=IMG, patch_size=8, num_blocks=2, embed_dim=32)
    raise ValueError(family)


def make_labels(kind: str) -> torch.Tensor:
    hard = torch.randint(0, CLASSES, (BATCH,))
    if kind == "hard":
        return hard
    return 0.7 * F.one_hot(hard, CLASSES).float() + 0.3 / CLASSES  # mixup-like soft labels


PAIRINGS = [("cnn", "vit", "hard"), ("vit", "cnn", "soft"), ("cnn", "mlp", "soft"),
            ("mlp", "cnn", "hard"), ("vit", "mlp", "hard"), ("mlp", "vit", "soft")]
DISTILLERS = {  # class, non-default hyper-parameters, the loss on (student logits, teacher logits, labels)
    "bkd": (BKD, {}, lambda s, t, y: bkd_loss(s, t)),
    "dkd": (DKD, {"alpha": 0.5, "beta": 4.0, "temperature": 2.0},
            lambda s, t, y: dkd_loss(s, t, hard_targets(y), 0.5, 4.0, 2.0)),
    "dist": (DIST, {"beta": 2.0, "gamma": 0.5, "tau": 4.0}, lambda s, t, y: dist_loss(s, t, 2.0, 0.5, 4.0)),
}


@pytest.mark.parametrize("name", list(DISTILLERS))
@pytest.mark.parametrize("student_family, teacher_family, label_kind", PAIRINGS,
                         ids=[f"{s}-from-{t}-{y}" for s, t, y in PAIRINGS])
def test_step_on_heterogeneous_pairing(name, student_family, teacher_family, label_kind):
    torch.manual_seed(0)
    cls, kwargs, reference = DISTILLERS[name]
    student, teacher = make_model(student_family), make_model(teacher_family)
    distiller = cls(student, teacher, loss_weights={"kd": 0.5}, **kwargs).train()
    images, labels = torch.randn(BATCH, 3, IMG, IMG), make_labels(label_kind)

    logits, losses = distiller(images, labels)
    assert logits.shape == (BATCH, CLASSES) and tuple(losses) == cls.loss_names == ("loss_gt", "loss_kd")
    with torch.no_grad():
        expected = 0.5 * reference(logits, teacher(images), labels)
    torch.testing.assert_close(losses["loss_kd"], expected)
    torch.testing.assert_close(losses["loss_gt"], F.cross_entropy(logits, labels))
    total_loss(losses).backward()

    missing = [n for n, p in student.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no finite gradient for {missing[:5]}"
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert list(distiller.parameters()) == list(student.parameters())  # no teacher, nothing extra
    assert distiller.extra_state() == {}


@pytest.mark.parametrize("name", list(DISTILLERS))
def test_kd_loss_alone_reaches_the_student_only(name):
    """With the ground-truth weight 0 the distillation term alone still trains every student parameter."""
    torch.manual_seed(2)
    cls, kwargs, _ = DISTILLERS[name]
    student, teacher = make_model("vit"), make_model("cnn")
    distiller = cls(student, teacher, loss_weights={"gt": 0.0}, **kwargs)
    _, losses = distiller(torch.randn(BATCH, 3, IMG, IMG), make_labels("hard"))
    assert losses["loss_gt"].item() == 0.0
    losses["loss_kd"].backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


# --- hyper-parameters -----------------------------------------------------------------------------------------

ORIGINAL_DEFAULTS = {  # OFA-KD train.py
    DKD: {"--dkd-alpha": 1.0, "--dkd-beta": 2.0, "--dkd-temperature": 1.0},
    DIST: {"--dist-beta": 1.0, "--dist-gamma": 1.0, "--dist-tau": 1.0},
    BKD: {},
}


@pytest.mark.parametrize("cls", list(ORIGINAL_DEFAULTS), ids=lambda c: c.__name__)
def test_flags_and_defaults_follow_the_original(cls):
    assert {hp.flag: hp.default for hp in cls.hyper_parameters} == ORIGINAL_DEFAULTS[cls]
    assert cls.default_loss_weights == {"gt": 1.0, "kd": 1.0}
    # The trainer passes each hyper-parameter by its argument name; the defaults agree with the constructor's.
    distiller = cls(nn.Linear(3, 3), nn.Linear(3, 3), **{hp.argument: hp.default for hp in cls.hyper_parameters})
    for hp in cls.hyper_parameters:
        assert getattr(distiller, hp.argument) == hp.default == getattr(cls(nn.Linear(3, 3), nn.Linear(3, 3)),
                                                                         hp.argument)


@pytest.mark.parametrize("cls, argument, value, flag, bound", [
    (DIST, "tau", -1.0, "--dist-tau", "> 0.0"),
    (DIST, "tau", 0.0, "--dist-tau", "> 0.0"),
    (DIST, "beta", -0.1, "--dist-beta", ">= 0.0"),
    (DIST, "gamma", -2.0, "--dist-gamma", ">= 0.0"),
    (DKD, "temperature", 0.0, "--dkd-temperature", "> 0.0"),
    (DKD, "alpha", -1.0, "--dkd-alpha", ">= 0.0"),
    (DKD, "beta", -1.0, "--dkd-beta", ">= 0.0"),
])
def test_bad_hyper_parameters_are_refused_clearly(cls, argument, value, flag, bound):
    with pytest.raises(ValueError, match=f"{cls.__name__}: {argument} \\({flag}\\) must be {bound}, got {value}"):
        cls(nn.Linear(3, 3), nn.Linear(3, 3), **{argument: value})


def test_zero_weights_are_accepted_and_unknown_loss_weights_refused():
    distiller = DKD(nn.Linear(3, 3), nn.Linear(3, 3), alpha=0, beta=0)
    assert (distiller.alpha, distiller.beta) == (0.0, 0.0)
    with pytest.raises(ValueError, match="unknown loss weights \\['ofa'\\]"):
        BKD(nn.Linear(3, 3), nn.Linear(3, 3), loss_weights={"ofa": 1.0})


def test_misspelt_hyper_parameter_is_a_type_error():
    with pytest.raises(TypeError, match="temprature"):
        DKD(nn.Linear(3, 3), nn.Linear(3, 3), temprature=2.0)

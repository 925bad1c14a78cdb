"""Distillers on small timm models: CPU, 32x32 images, 10 classes, one step each.

The OFA step is checked against a per-branch loop over the reference loss
(``ofakd_fast.reference.ofa_loss_log_domain``): branch losses and branch gradients.
"""
import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from ofakd_fast.distill import (KDDistiller, OFADistiller, VanillaDistiller, build_distiller, stage_indices,
                                  total_loss)
from ofakd_fast.distill.projectors import SpatialProjector, TokenProjector, merges_toward_final_grid
from ofakd_fast.loss.reference import ofa_loss_log_domain

CLASSES, BATCH, IMG = 10, 3, 32


def make_model(family: str, **kwargs) -> nn.Module:
    """Small members of each family, sized for 32x32 inputs."""
    if family == "cnn":
        return timm.create_model("resnet10t", pretrained=False, num_classes=CLASSES)
    if family == "vit":  # 16x16 patch grid: the projectors merge it once
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=CLASSES, img_size=IMG,
                                 patch_size=2, embed_dim=64, num_heads=2, **{"depth": 4, **kwargs})
    if family == "deit":  # class + distillation token; 8x8 grid: no merging
        return timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=CLASSES,
                                 img_size=IMG, patch_size=4, depth=4, embed_dim=64, num_heads=2)
    if family == "mlp":  # mixer_* factories fix the width and depth, so build the class
        return MlpMixer(num_classes=CLASSES, img_size=IMG, patch_size=4, num_blocks=4, embed_dim=64)
    if family == "swin":
        return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=CLASSES, img_size=IMG,
                                 window_size=2, depths=(1, 1, 1, 1), embed_dim=32, num_heads=(1, 2, 4, 8),
                                 drop_path_rate=0.0)  # deterministic, to compare with a second forward
    raise ValueError(family)


def make_labels(kind: str) -> torch.Tensor:
    if kind == "hard":
        return torch.randint(0, CLASSES, (BATCH,))
    mixed = 0.7 * F.one_hot(torch.randint(0, CLASSES, (BATCH,)), CLASSES) + 0.3 / CLASSES  # mixup-like soft labels
    return mixed.float()


def expand_eps(eps, num_branches):
    return [eps] * num_branches if isinstance(eps, (int, float)) else list(eps)


PAIRS = [  # (student, teacher, labels, OFADistiller kwargs): each pair also varies eps, T, weights or labels
    ("cnn", "vit", "hard", {}),
    ("cnn", "mlp", "soft", {"eps": (1.1, 1.2, 1.3, 1.4, 1.5), "temperature": 2.0}),
    ("vit", "cnn", "hard", {"eps": 1.3, "loss_weights": {"ofa": 0.1}, "label_smoothing": 0.1}),
    ("vit", "mlp", "soft", {"eps": (1.5, 1.4, 1.3, 1.2, 1.1)}),
    ("mlp", "cnn", "hard", {"temperature": 4.0}),
    ("mlp", "vit", "hard", {"eps": 1.2, "loss_weights": {"kd": 0.5, "ofa": 2.0}}),
    ("swin", "cnn", "soft", {"eps": (1.0, 1.1, 1.2, 1.3, 1.4)}),
    ("deit", "vit", "hard", {"eps": 1.4, "stages": (2, 4)}),
]


@pytest.mark.parametrize("student_family, teacher_family, label_kind, kwargs", PAIRS,
                         ids=[f"{s}-from-{t}" for s, t, _, _ in PAIRS])
def test_ofa_step_matches_reference(student_family, teacher_family, label_kind, kwargs):
    torch.manual_seed(0)
    student, teacher = make_model(student_family), make_model(teacher_family)
    distiller = OFADistiller(student, teacher, **kwargs).to(memory_format=torch.channels_last)
    images = torch.randn(BATCH, 3, IMG, IMG).contiguous(memory_format=torch.channels_last)
    labels = make_labels(label_kind)

    captured = {}

    def capture(name):
        def hook(module, inputs, output):
            if output.requires_grad:  # the projectors' logits; the teacher's run under no_grad
                output.retain_grad()
            captured[name] = (inputs[0], output)
        return hook

    for name, projector in distiller.projectors.items():
        projector.register_forward_hook(capture(name))
    teacher.register_forward_hook(capture("teacher"))

    logits, losses = distiller(images, labels)
    logits.retain_grad()
    total_loss(losses).backward()

    # Shapes, and the single-pass logits equal the student's own forward.
    names = list(distiller.projectors)
    assert len(names) == len(kwargs.get("stages", (1, 2, 3, 4)))
    branches = [captured[name][1] for name in names] + [logits]
    assert all(branch.shape == (BATCH, CLASSES) for branch in branches)
    with torch.no_grad():
        torch.testing.assert_close(logits, student(images), rtol=1e-4, atol=1e-5)
    prefix_tokens = getattr(student, "num_prefix_tokens", 0)
    for name in names:
        feature = captured[name][0]
        assert isinstance(feature, tuple) == (prefix_tokens > 0)
        if prefix_tokens:
            assert feature[1].shape[:2] == (BATCH, prefix_tokens)

    # Gradients reach every projector and every student parameter (some are exactly zero at init: timm
    # zero-initializes ResNet's last BN in each block), none reach the teacher.
    for module in [*distiller.projectors.values(), student]:
        for param_name, param in module.named_parameters():
            assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert sum(param.grad.abs().sum() for param in module.parameters()) > 0
    assert all(param.grad is None and not param.requires_grad for param in teacher.parameters())
    assert not teacher.training

    # The fused losses and branch gradients match a per-branch loop over the reference loss.
    eps = expand_eps(kwargs.get("eps", 1.0), len(branches))
    temperature = kwargs.get("temperature", 1.0)
    weights = {"gt": 1.0, "kd": 1.0, "ofa": 1.0, **kwargs.get("loss_weights", {})}
    target = labels if labels.dim() == 1 else labels.argmax(dim=1)
    leaves = [branch.detach().requires_grad_() for branch in branches]
    logits_teacher = captured["teacher"][1]
    reference = [ofa_loss_log_domain(s, logits_teacher, target, e, temperature).mean() for s, e in zip(leaves, eps)]
    assert tuple(losses) == distiller.loss_names
    torch.testing.assert_close(losses["loss_ofa_stages"].detach(), weights["ofa"] * sum(reference[:-1]).detach())
    torch.testing.assert_close(losses["loss_ofa_logits"].detach(), weights["kd"] * reference[-1].detach())
    smoothing = kwargs.get("label_smoothing", 0.0) if labels.dim() == 1 else 0.0
    loss_gt = F.cross_entropy(leaves[-1], labels, label_smoothing=smoothing)
    torch.testing.assert_close(losses["loss_gt"].detach(), loss_gt.detach())
    (weights["ofa"] * sum(reference[:-1]) + weights["kd"] * reference[-1] + loss_gt).backward()
    for branch, leaf in zip(branches, leaves):
        torch.testing.assert_close(branch.grad, leaf.grad, rtol=1e-4, atol=1e-6)


def test_stage_indices_follow_stage_ends_and_paper_taps():
    assert stage_indices(make_model("cnn"), (1, 2, 3, 4)) == [1, 2, 3, 4]  # level 0 is the stem
    assert stage_indices(make_model("swin"), (1, 2, 3, 4)) == [0, 1, 2, 3]
    assert stage_indices(make_model("cnn"), (2, 4)) == [2, 4]
    assert stage_indices(make_model("vit", depth=12), (1, 2, 3, 4)) == [1, 3, 9, 11]
    assert stage_indices(make_model("vit", depth=4), (1, 2, 3, 4)) == [0, 1, 2, 3]
    assert stage_indices(make_model("mlp"), (1, 2, 3, 4)) == [0, 1, 2, 3]
    for bad in [(0, 5), (2, 2), ()]:
        with pytest.raises(ValueError, match="stages must be distinct values among 1, 2, 3, 4"):
            stage_indices(make_model("cnn"), bad)


def test_shallow_student_maps_two_stages_to_one_block():
    student = make_model("vit", depth=2)
    assert stage_indices(student, (1, 2, 3, 4)) == [0, 0, 1, 1]
    distiller = OFADistiller(student, make_model("cnn"))
    logits, losses = distiller(torch.randn(BATCH, 3, IMG, IMG), make_labels("hard"))
    assert logits.shape == (BATCH, CLASSES) and torch.isfinite(total_loss(losses))


def test_teacher_is_frozen_unregistered_and_moves_with_the_distiller():
    student, teacher = make_model("mlp"), make_model("cnn")
    distiller = OFADistiller(student, teacher)
    assert distiller.student is student and distiller.teacher is teacher
    assert isinstance(distiller.projectors, nn.ModuleDict)
    teacher_ids = {id(p) for p in teacher.parameters()}
    assert not teacher_ids & {id(p) for p in distiller.parameters()}
    assert all(key.startswith(("student.", "projectors.")) for key in distiller.state_dict())
    distiller.train()
    assert student.training and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())

    distiller.to(memory_format=torch.channels_last)
    assert teacher.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    distiller.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in teacher.parameters())
    logits, losses = distiller(torch.randn(BATCH, 3, IMG, IMG, dtype=torch.float64), make_labels("hard"))
    assert logits.dtype == torch.float64 and torch.isfinite(total_loss(losses))


def test_student_without_forward_intermediates_is_refused_by_name():
    class TinyNet(nn.Sequential):
        pass

    student = TinyNet(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, CLASSES))
    with pytest.raises(TypeError, match=r"TinyNet lacks forward_intermediates.*forward_intermediates\(\)"):
        OFADistiller(student, make_model("cnn"))


def test_eps_must_cover_every_stage_and_the_logits():
    with pytest.raises(ValueError, match="eps: expected one value or 3"):
        OFADistiller(make_model("mlp"), make_model("cnn"), stages=(3, 4), eps=(1.0, 1.1))


def test_kd_and_vanilla_baselines():
    torch.manual_seed(0)
    student, teacher = make_model("mlp"), make_model("cnn")
    images, labels = torch.randn(BATCH, 3, IMG, IMG), make_labels("hard")

    kd = build_distiller("kd", student, teacher, temperature=4.0, loss_weights={"kd": 0.5})
    assert isinstance(kd, KDDistiller)
    logits, losses = kd(images, labels)
    assert set(losses) == {"loss_gt", "loss_kd"}
    with torch.no_grad():
        p_teacher = F.softmax(teacher(images) / 4.0, dim=1)
    kl = (p_teacher * (p_teacher.log() - F.log_softmax(logits / 4.0, dim=1))).sum(dim=1).mean()
    torch.testing.assert_close(losses["loss_kd"], 0.5 * 16.0 * kl)
    torch.testing.assert_close(losses["loss_gt"], F.cross_entropy(logits, labels))
    total_loss(losses).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())

    vanilla = build_distiller("vanilla", student, teacher, label_smoothing=0.1)
    assert isinstance(vanilla, VanillaDistiller) and vanilla.teacher is None
    logits, losses = vanilla(images, labels)
    assert set(losses) == {"loss_gt"}
    torch.testing.assert_close(losses["loss_gt"], F.cross_entropy(logits, labels, label_smoothing=0.1))

    assert isinstance(build_distiller("ofa", student, teacher), OFADistiller)
    with pytest.raises(ValueError, match="unknown distiller 'no_such_method'"):
        build_distiller("no_such_method", student, teacher)
    with pytest.raises(ValueError, match="unknown loss weights"):
        build_distiller("kd", student, teacher, loss_weights={"ofa": 1.0})


def test_soft_labels_use_soft_target_cross_entropy():
    distiller = VanillaDistiller(make_model("mlp"), label_smoothing=0.1)  # smoothing applies to hard labels only
    labels = make_labels("soft")
    logits, losses = distiller(torch.randn(BATCH, 3, IMG, IMG), labels)
    torch.testing.assert_close(losses["loss_gt"], -(labels * F.log_softmax(logits, dim=1)).sum(dim=1).mean())


def test_projector_shapes():
    assert [merges_toward_final_grid(g) for g in (7, 8, 13, 14, 15, 28, 56)] == [0, 0, 0, 1, 1, 2, 3]
    projector = TokenProjector(32, num_merges=2, num_blocks=1, num_classes=CLASSES, use_class_token=True)
    patches, prefix = torch.randn(2, 32, 27, 27), torch.randn(2, 1, 32)  # odd grids are zero-padded
    assert projector((patches, prefix)).shape == (2, CLASSES)
    assert projector(patches).shape == (2, CLASSES)  # no prefix: mean of the patch tokens
    assert SpatialProjector(16, num_halvings=0, width=24, num_classes=CLASSES)(torch.randn(2, 16, 5, 5)).shape == (
        2, CLASSES)
    assert SpatialProjector(16, num_halvings=2, width=24, num_classes=CLASSES)(torch.randn(2, 16, 8, 8)).shape == (
        2, CLASSES)

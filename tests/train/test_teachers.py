"""Teachers as users bring them: --teacher-pretrained (a file through timm's pretrained path, or timm's
own weights), --teacher-checkpoint, the EMA choice, and the teacher's own input normalization.

Nothing downloads: weights are tiny timm models saved to tmp_path; the hub case records its call.
"""
import argparse
from types import SimpleNamespace

import pytest
import timm
import torch
from torch import nn

from ofakd_fast.distill.base import BaseDistiller, set_teacher_input_normalization
from ofakd_fast.train.data import DatasetInfo
from ofakd_fast.train.errors import UsageError
from ofakd_fast.train.loop import Trainer
from ofakd_fast.train.models import HUB_WEIGHTS, build_teacher

KWARGS = {"channels": (8, 16, 32, 64), "stem_width": 8}
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def info(num_classes=5, stats=IMAGENET):
    return DatasetInfo(num_classes=num_classes, in_chans=3, native_size=None, mean=stats[0], std=stats[1])


def teacher_args(pretrained="", checkpoint=None, use_ema=False, name="resnet10t", kwargs=KWARGS):
    return argparse.Namespace(teacher=name, teacher_kwargs=dict(kwargs), img_size=32, teacher_pretrained=pretrained,
                              teacher_checkpoint=checkpoint, use_ema_teacher=use_ema)


def tiny_state(seed, num_classes=5):
    torch.manual_seed(seed)
    return timm.create_model("resnet10t", num_classes=num_classes, **KWARGS).state_dict()


def assert_weights(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


@pytest.fixture
def original_checkpoint(tmp_path):
    """A checkpoint as timm's CheckpointSaver writes the original's: both weights and the run's args."""
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 3, "arch": "resnet10t", "state_dict": tiny_state(1), "state_dict_ema": tiny_state(2),
                "args": argparse.Namespace(model="resnet10t", lr=0.1), "version": 2}, path)
    return path


def test_pretrained_file_loads_through_timms_pretrained_path(tmp_path):
    state = tiny_state(0)
    path = tmp_path / "teacher.pth"
    torch.save(state, path)
    logs = []
    teacher = build_teacher(teacher_args(str(path)), info(), logs.append)
    assert_weights(teacher, state)
    assert teacher.pretrained_cfg["file"] == str(path) and "state_dict" not in teacher.pretrained_cfg
    timm_file = timm.create_model("resnet10t", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(
        file=str(path), num_classes=5), **KWARGS)  # timm's own file override gives the same weights
    assert_weights(timm_file, teacher.state_dict())
    assert not any("random weights" in line for line in logs)


@pytest.mark.parametrize("flag", ["pretrained", "checkpoint"])
@pytest.mark.parametrize("use_ema", [False, True])
def test_ema_choice_from_a_checkpoint_holding_both(original_checkpoint, flag, use_ema):
    """The original's default: the non-EMA weights; --use-ema-teacher: the EMA ones (its train.py)."""
    path = str(original_checkpoint)
    args = teacher_args(pretrained=path if flag == "pretrained" else "",
                        checkpoint=path if flag == "checkpoint" else None, use_ema=use_ema)
    teacher = build_teacher(args, info(), lambda line: None)
    assert_weights(teacher, tiny_state(2 if use_ema else 1))


def test_pretrained_file_with_other_classes_is_a_usage_error(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save(tiny_state(0, num_classes=7), path)
    with pytest.raises(UsageError, match=r"check that --teacher-pretrained .* holds resnet10t weights for 5 classes"):
        build_teacher(teacher_args(str(path)), info(), lambda line: None)


def test_hub_weights_ask_timm_for_pretrained(monkeypatch):
    calls = []
    create = timm.create_model

    def recording(name, **kwargs):
        calls.append(kwargs)
        return create(name, **{**kwargs, "pretrained": False})  # no download in tests

    monkeypatch.setattr(timm, "create_model", recording)
    build_teacher(teacher_args(HUB_WEIGHTS), info(), lambda line: None)
    assert calls[-1]["pretrained"] is True and "pretrained_cfg_overlay" not in calls[-1]


def test_no_weights_warns_and_both_sources_are_refused(original_checkpoint):
    logs = []
    teacher = build_teacher(teacher_args(), info(), logs.append)
    assert any("random weights" in line for line in logs)
    assert not hasattr(teacher, "ofakd_input_scale")
    with pytest.raises(UsageError, match="pass one"):
        build_teacher(teacher_args(str(original_checkpoint), str(original_checkpoint)), info(), logs.append)


def test_trainer_builds_the_teacher(original_checkpoint):
    """Trainer._build_models hands the teacher flags to build_teacher (flags read with getattr)."""
    args = SimpleNamespace(model="resnet10t", model_kwargs=dict(KWARGS), drop=0.0, drop_path=None,
                           initial_checkpoint=None, distiller="kd", **vars(teacher_args(str(original_checkpoint))))
    student, teacher = Trainer._build_models(SimpleNamespace(args=args, info=info(), log=lambda line: None))
    assert_weights(teacher, tiny_state(1))
    del args.teacher_pretrained, args.use_ema_teacher  # a namespace from before the flags existed
    args.teacher_checkpoint = str(original_checkpoint)
    student, teacher = Trainer._build_models(SimpleNamespace(args=args, info=info(), log=lambda line: None))
    assert_weights(teacher, tiny_state(1))


def test_renormalization_formula():
    """x_t = (x * std_s + mean_s - mean_t) / std_t, as timm's DistillationTeacher.normalize_input."""
    class Echo(nn.Module):
        def forward(self, x):
            return x

    teacher = Echo()
    mean_s, std_s = torch.tensor(IMAGENET[0]), torch.tensor(IMAGENET[1])
    mean_t, std_t = torch.full((3,), 0.5), torch.full((3,), 0.5)
    set_teacher_input_normalization(teacher, mean_s.tolist(), std_s.tolist(), mean_t.tolist(), std_t.tolist())
    distiller = BaseDistiller(nn.Linear(1, 1), teacher)
    x = torch.randn(2, 3, 4, 4)
    col = lambda v: v.view(1, 3, 1, 1)  # noqa: E731
    want = (x * col(std_s) + col(mean_s) - col(mean_t)) / col(std_t)
    torch.testing.assert_close(distiller.teacher_logits(x), want)
    pixels = x * col(std_s) + col(mean_s)  # what the teacher sees is its own normalization of the same pixels
    torch.testing.assert_close(distiller.teacher_logits(x), (pixels - 0.5) / 0.5)
    assert "ofakd_input_scale" not in teacher.state_dict()
    distiller.to(torch.float64)
    assert distiller.teacher_logits(x.double()).dtype == torch.float64


def test_pretrained_teacher_gets_its_own_statistics(tmp_path):
    """A ViT teacher (mean = std = 0.5) on ImageNet-normalized data is renormalized; a ResNet is not,
    unless the data is normalized otherwise (CIFAR statistics)."""
    vit_kwargs = dict(patch_size=8, embed_dim=16, depth=1, num_heads=2)
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, **vit_kwargs)
    vit_path, resnet_path = tmp_path / "vit.pth", tmp_path / "resnet.pth"
    torch.save(vit.state_dict(), vit_path)
    torch.save(tiny_state(0), resnet_path)
    logs = []
    teacher = build_teacher(teacher_args(str(vit_path), name="vit_tiny_patch16_224", kwargs=vit_kwargs), info(),
                            logs.append)
    assert timm.data.resolve_model_data_config(teacher)["mean"] == (0.5, 0.5, 0.5)
    torch.testing.assert_close(teacher.ofakd_input_scale.flatten(), torch.tensor(IMAGENET[1]) / 0.5)
    assert any("renormalized" in line for line in logs)
    assert not hasattr(build_teacher(teacher_args(str(resnet_path)), info(), logs.append), "ofakd_input_scale")
    cifar = build_teacher(teacher_args(str(resnet_path)), info(stats=CIFAR), logs.append)
    torch.testing.assert_close(cifar.ofakd_input_shift.flatten(),
                               (torch.tensor(CIFAR[0]) - torch.tensor(IMAGENET[0])) / torch.tensor(IMAGENET[1]))

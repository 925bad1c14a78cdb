"""Every registered distiller through ofakd-train: its flags reach it, it trains, it resumes."""
import pytest
import torch

from ofakd_fast.distill import DISTILLERS
from ofakd_fast.train import parse_args, train
from train_helpers import base_flags, teacher_file, tree  # noqa: F401


@pytest.mark.parametrize("name", sorted(DISTILLERS))
def test_each_distiller_trains_through_the_cli(name, tree, teacher_file, tmp_path):
    hp_flags = []
    for hp in DISTILLERS[name].hyper_parameters:  # a non-default value of each, to see it arrive
        if hp.kind is bool:
            hp_flags.append(hp.flag)
        else:
            hp_flags += [hp.flag, str(hp.kind(hp.default * 2 if hp.default else 1))]
    out = tmp_path / "run"
    result = train(parse_args(base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "1",
                                         "--steps-per-epoch", "2", "--distiller", name, *hp_flags)))
    distiller = result["distiller"]
    assert type(distiller) is DISTILLERS[name] and result["global_step"] == 2
    for hp in distiller.hyper_parameters:
        expected = True if hp.kind is bool else hp.kind(hp.default * 2 if hp.default else 1)
        assert getattr(distiller, hp.argument) == expected, hp.flag
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert [f"train_{n}" for n in distiller.loss_names] == header[2:2 + len(distiller.loss_names)]
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["distiller"].keys() == distiller.extra_state().keys()


def test_a_crd_run_resumes_bit_for_bit(tree, teacher_file, tmp_path):
    """CRD's memory bank (keyed by dataset index) and its negative sampling continue exactly."""
    flags = ["--teacher-checkpoint", str(teacher_file), "--epochs", "2", "--distiller", "crd", "--crd-k", "5"]
    whole = train(parse_args(base_flags(tree, tmp_path / "whole", *flags)))
    out = tmp_path / "interrupted"
    train(parse_args(base_flags(tree, out, *flags, "--stop-after-steps", "4")))
    resumed = train(parse_args(base_flags(tree, out, *flags, "--resume", str(out))))
    assert resumed["global_step"] == whole["global_step"] == 6
    expected = whole["distiller"].state_dict()
    assert any("memory" in key or "bank" in key for key in expected), sorted(expected)[:8]
    for key, value in resumed["distiller"].state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

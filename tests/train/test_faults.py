"""Runs under faults and bad input: nothing of an earlier run is lost, no checkpoint holds a diverged
state, resume refuses flags that would change the run, and user errors are one clear line."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ofakd_fast.train import main, parse_args, train
from ofakd_fast.train import loop as loop_module
from ofakd_fast.train.checkpoint import load_checkpoint
from ofakd_fast.train.errors import CheckpointError, DataError, DivergedError, UsageError
from train_helpers import STUDENT, TEACHER, base_flags, teacher_file, tree, write_tree  # noqa: F401

SHORT = ["--epochs", "1", "--steps-per-epoch", "2"]


def test_existing_run_directory_is_refused_and_left_untouched(tree, teacher_file, tmp_path):
    out = tmp_path / "run"
    flags = base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), *SHORT)
    train(parse_args(flags))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UsageError, match=r"--output .*run: holds a run \(last.pth, best.pth, summary.csv\); "
                                         r"continue it with --resume"):
        train(parse_args(flags + ["--lr", "2e-3"]))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    result = train(parse_args(flags + ["--overwrite"]))  # explicitly replaced: a fresh run, one summary row
    assert result["global_step"] == 2 and len((out / "summary.csv").read_text().strip().splitlines()) == 2


def test_diverged_run_keeps_its_last_good_checkpoint(tree, teacher_file, tmp_path, monkeypatch):
    calls = []
    real_total_loss = loop_module.total_loss

    def nan_at_third_step(losses):
        calls.append(1)
        loss = real_total_loss(losses)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(loop_module, "total_loss", nan_at_third_step)
    out = tmp_path / "run"
    flags = base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "2",
                       "--checkpoint-interval", "1", "--log-interval", "100")
    with pytest.raises(DivergedError, match=r"epoch 1 step 3 \(step 3 of the run\): the loss is not finite"):
        train(parse_args(flags))
    state = load_checkpoint(out)
    assert state["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_corrupt_validation_image_does_not_cost_the_epoch(tmp_path, teacher_file):
    data = write_tree(tmp_path / "tree")
    bad = data / "val" / "dog" / "broken.png"
    bad.write_bytes(b"not an image")
    out = tmp_path / "run"
    with pytest.raises(DataError, match=rf"evaluation split: cannot read image file {bad}.*epoch 1 is saved"):
        train(parse_args(base_flags(data, out, "--teacher-checkpoint", str(teacher_file), *SHORT)))
    assert load_checkpoint(out)["epoch"] == 1


@pytest.mark.parametrize("change, refused", [
    (["--batch-size", "2"], "--batch-size 4 -> 2"), (["--seed", "7"], "--seed 42 -> 7"),
    (["--lr", "5e-4"], "--lr 0.001 -> 0.0005"), (["--distiller", "kd"], "--distiller 'ofa' -> 'kd'"),
    (["--ofa-stages", "3", "4"], "--ofa-stages [1, 2, 3, 4] -> [3, 4]"),
    (["--model-kwargs", "patch_size=4", "embed_dim=48", "depth=2", "num_heads=2"], "--model-kwargs"),
])
def test_resume_refuses_flags_that_change_the_run(tree, teacher_file, tmp_path, change, refused):
    out = tmp_path / "run"
    flags = base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "2")
    train(parse_args(flags + ["--stop-after-steps", "1"]))
    with pytest.raises(UsageError, match=f"--resume: .*{refused}".replace("[", r"\[").replace("]", r"\]")):
        train(parse_args(flags + ["--resume", str(out)] + change))


def test_resume_allows_and_logs_a_longer_schedule(tree, teacher_file, tmp_path, capsys):
    out = tmp_path / "run"
    flags = base_flags(tree, out, "--teacher-checkpoint", str(teacher_file))
    train(parse_args(flags + ["--epochs", "1"]))
    result = train(parse_args(flags + ["--epochs", "2", "--resume", str(out)]))
    assert result["global_step"] == 6
    assert "resuming with changed flags: --epochs 1 -> 2" in capsys.readouterr().out


@pytest.mark.parametrize("content", [b"", b"hello, this is text\n", b"PK\x03\x04garbage"])
def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path, content, capsys):
    path = tmp_path / "last.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"--resume: .*last.pth is not a PyTorch checkpoint, or it is truncated"):
        load_checkpoint(path)
    with pytest.raises(SystemExit) as info:
        main(["--dataset", "synthetic", "--img-size", "16", *STUDENT, "--distiller", "vanilla", "--resume",
              str(path), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and len(err.splitlines()) == 1 and "weights_only" not in err


def test_empty_class_folder_names_the_split_and_path(tmp_path):
    data = write_tree(tmp_path / "tree")
    (data / "val" / "emu").mkdir(exist_ok=True)
    for image in (data / "val" / "emu").iterdir():
        image.unlink()
    with pytest.raises(DataError, match=rf"the val split at {data / 'val'}: .*emu"):
        train(parse_args(base_flags(data, tmp_path / "run", "--distiller", "vanilla", *SHORT)))


def test_bad_teacher_kwargs_are_a_usage_error(tree, tmp_path):
    flags = base_flags(tree, tmp_path / "run", *SHORT)
    flags[flags.index("stem_width=8")] = "stem_width=banana"
    with pytest.raises(UsageError, match="--teacher resnet10t: timm.create_model failed .*check --teacher-kwargs"):
        train(parse_args(flags))


def test_other_errors_keep_their_traceback(tree, tmp_path, monkeypatch):
    def broken(self):
        raise ValueError("a bug, not a usage error")

    monkeypatch.setattr(loop_module.Trainer, "run", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(base_flags(tree, tmp_path / "run", "--distiller", "vanilla", *SHORT))


def _kill_during_training(command: list, log: Path, delay: float) -> None:
    """Starts a training process, waits for its first logged step, then kill -9 after `delay` seconds."""
    start_lines = len(log.read_text().splitlines()) if log.exists() else 0
    proc = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[2])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        lines = log.read_text().splitlines()[start_lines:] if log.exists() else []
        if any(" step " in line for line in lines):
            break
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_at_random_points_always_leaves_an_exactly_resumable_checkpoint(tree, teacher_file, tmp_path):
    flags = base_flags(tree, tmp_path / "whole", "--teacher-checkpoint", str(teacher_file), "--epochs", "20",
                       "--checkpoint-interval", "1", "--drop-path", "0.1")
    whole = train(parse_args(flags))
    expected = {k: v.clone() for k, v in whole["distiller"].state_dict().items()}
    out = tmp_path / "killed"
    run_flags = [f if f != str(tmp_path / "whole") else str(out) for f in flags]
    rng, interrupted = random.Random(0), 0
    for _ in range(4):  # kills at random points of the ~60 steps, several inside checkpoint writes
        resume = ["--resume", str(out)] if (out / "last.pth").exists() else []
        _kill_during_training([sys.executable, "-m", "ofakd_fast.train", *run_flags, *resume], out / "log.txt",
                              rng.uniform(0.0, 1.5))
        if (out / "last.pth").exists():
            interrupted += load_checkpoint(out)["global_step"] < 60  # always loadable
    assert interrupted >= 2, "the kills should land inside the training"
    resumed = train(parse_args(run_flags + ["--resume", str(out)]))
    assert resumed["global_step"] == 60
    for key, value in resumed["distiller"].state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)

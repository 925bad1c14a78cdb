"""ofakd-cache-teacher and ofakd-train --teacher-cache: what a cache stores, what it refuses, and that a
student trained from a full float32 cache ends with the live-teacher run's parameters bit for bit."""
import json

import numpy as np
import pytest
import torch

from ofakd_fast.loss import SparseTeacher
from ofakd_fast.train import parse_args, train
from ofakd_fast.train.cache_teacher import main as cache_main
from ofakd_fast.train.teacher_cache import EpochWriter, TeacherCache, epoch_dir, index_dtype
from train_helpers import base_flags, teacher_file, tree  # noqa: F401  (fixtures)


def run_flags(tree, out, teacher_file, *extra):
    return base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "2", "--quiet",
                      "--eval-interval", "0", *extra)


def make_cache(tmp_path, tree, teacher_file, *cache_flags, run_extra=()):
    cache = tmp_path / "cache"
    cache_main(["--cache-dir", str(cache), *cache_flags, "--",
                *run_flags(tree, tmp_path / "unused", teacher_file, *run_extra)])
    return cache


def student_state(path):
    return torch.load(path / "last.pth", weights_only=True)["model"]


@pytest.mark.parametrize("distiller", ["ofa", "kd"])
def test_full_float32_cache_gives_the_live_run_bit_for_bit(tmp_path, tree, teacher_file, distiller):
    cache = make_cache(tmp_path, tree, teacher_file, "--cache-dtype", "float32", run_extra=("--distiller", distiller))
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(parse_args(run_flags(tree, live, teacher_file, "--distiller", distiller)))
    train(parse_args(run_flags(tree, cached, teacher_file, "--distiller", distiller, "--teacher-cache", str(cache))))
    a, b = student_state(live), student_state(cached)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_top_k_cache_stores_exact_probabilities_and_trains(tmp_path, tree, teacher_file):
    cache = make_cache(tmp_path, tree, teacher_file, "--cache-topk", "2", "--cache-dtype", "bfloat16",
                       run_extra=("--distiller", "ofa"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["topk"] == 2 and manifest["dtype"] == "bfloat16" and manifest["epochs"] == 2
    rows = TeacherCache(cache).rows(1, torch.arange(12))
    assert isinstance(rows, SparseTeacher) and rows.indices.shape == (12, 2) and rows.lse.shape == (12,)
    stored_p = (rows.logits - rows.lse[:, None]).exp()
    assert bool((stored_p.sum(dim=1) <= 1 + 1e-2).all()) and bool((stored_p > 0).all())
    assert np.load(epoch_dir(cache, 0) / "indices.npy", mmap_mode="r").dtype == np.uint8
    for distiller in ("ofa", "kd", "dkd"):
        result = train(parse_args(run_flags(tree, tmp_path / distiller, teacher_file, "--distiller", distiller,
                                            "--teacher-cache", str(cache))))
        assert np.isfinite(result["final_top1"])


def test_a_mismatching_run_is_refused_by_field(tmp_path, tree, teacher_file, capsys):
    cache = make_cache(tmp_path, tree, teacher_file, run_extra=("--distiller", "ofa"))
    for extra, field in ((("--seed", "3"), "seed"), (("--scale", "0.5", "1"), "data"), (("--epochs", "3"), "epochs")):
        with pytest.raises(SystemExit):
            from ofakd_fast.train.cli import main as train_main
            train_main(run_flags(tree, tmp_path / "bad", teacher_file, "--distiller", "ofa", "--teacher-cache",
                                 str(cache), *extra))
        assert f"{field}:" in capsys.readouterr().err


def test_top_k_cache_refuses_another_loss_temperature(tmp_path, tree, teacher_file, capsys):
    cache = make_cache(tmp_path, tree, teacher_file, "--cache-topk", "2", run_extra=("--distiller", "kd"))
    from ofakd_fast.train.cli import main as train_main
    with pytest.raises(SystemExit):
        train_main(run_flags(tree, tmp_path / "kd4", teacher_file, "--distiller", "kd", "--kd-temperature", "4",
                             "--teacher-cache", str(cache)))
    assert "--cache-temperature 4.0" in capsys.readouterr().err


def test_feature_distillers_need_the_live_teacher(tmp_path, tree, teacher_file, capsys):
    with pytest.raises(SystemExit):
        parse_args(run_flags(tree, tmp_path / "f", teacher_file, "--distiller", "fitnet", "--teacher-cache", "x"))
    assert "needs the live teacher" in capsys.readouterr().err


def test_a_killed_epoch_resumes_where_it_stopped(tmp_path):
    manifest = {"topk": 3, "num_classes": 300, "dtype": "float16"}
    logits = torch.randn(10, 300) * 4
    writer = EpochWriter(tmp_path, 0, 10, manifest)
    writer.write(0, logits[:4], 1.0, torch.float16)
    del writer  # killed here: the partial folder and rows_done remain
    resumed = EpochWriter(tmp_path, 0, 10, manifest)
    assert resumed.rows_done == 4
    resumed.write(4, logits[4:], 1.0, torch.float16)
    resumed.finish()
    assert not epoch_dir(tmp_path, 0, partial=True).exists()
    indices = np.load(epoch_dir(tmp_path, 0) / "indices.npy")
    assert indices.dtype == index_dtype(300) == np.int16
    assert torch.equal(torch.from_numpy(indices.astype(np.int64)), logits.topk(3).indices)
    lse = torch.from_numpy(np.load(epoch_dir(tmp_path, 0) / "lse.npy"))
    torch.testing.assert_close(lse, torch.logsumexp(logits, dim=1))


def test_the_same_command_resumes_a_cache_and_another_is_refused(tmp_path, tree, teacher_file, capsys):
    cache = make_cache(tmp_path, tree, teacher_file, run_extra=("--distiller", "ofa"))
    make_cache(tmp_path, tree, teacher_file, run_extra=("--distiller", "ofa"))  # complete: nothing to do
    with pytest.raises(SystemExit):
        make_cache(tmp_path, tree, teacher_file, "--cache-topk", "2", run_extra=("--distiller", "ofa"))
    assert "topk" in capsys.readouterr().err and cache.exists()

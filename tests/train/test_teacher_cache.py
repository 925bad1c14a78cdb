"""ofakd-cache-teacher and ofakd-train --teacher-cache: what a cache stores, what it refuses, and that a
student trained from a full float32 cache ends with the live-teacher run's parameters bit for bit."""
import json

import numpy as np
import pytest
import torch

import ofakd_fast.distill.base as distill_base
import ofakd_fast.train.cache_teacher as cache_teacher
from ofakd_fast.loss import SparseTeacher
from ofakd_fast.train import parse_args, train
from ofakd_fast.train.cache_teacher import main as cache_main
from ofakd_fast.train.teacher_cache import EpochWriter, TeacherCache, epoch_dir, index_dtype
from train_helpers import base_flags, teacher_file, tree  # noqa: F401  (fixtures)

RUN_TEACHER = distill_base.run_teacher


def run_flags(tree, out, teacher_file, *extra):
    return base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "2", "--quiet",
                      "--eval-interval", "0", *extra)


def make_cache(tmp_path, tree, teacher_file, *cache_flags, run_extra=()):
    cache = tmp_path / "cache"
    cache_main(["--cache-dir", str(cache), *cache_flags, "--",
                *run_flags(tree, tmp_path / "unused", teacher_file, *run_extra)])
    return cache


def run_teacher_image_by_image(teacher, images):
    """The teacher's logits of each image alone: the same bits whatever batch the image came in."""
    return torch.cat([RUN_TEACHER(teacher, image[None]) for image in images])


def student_state(path):
    return torch.load(path / "last.pth", weights_only=True)["model"]


MIXING = ("--mixup", "0.4", "--cutmix", "1.0", "--mixup-switch-prob", "0.5")


@pytest.mark.parametrize("distiller, extra", [("ofa", ()), ("kd", ()), ("ofa", MIXING), ("kd", ("--aug-repeats", "2")),
                                              ("ofa", (*MIXING, "--aug-repeats", "3"))],
                         ids=["ofa", "kd", "ofa-mixup-cutmix", "kd-repeats", "ofa-mixup-repeats"])
def test_full_float32_cache_gives_the_live_run_bit_for_bit(tmp_path, tree, teacher_file, distiller, extra,
                                                            monkeypatch):
    """Position rows replay the run's batches. Sample rows hold each image's logits from the cache's own
    batches, and a CPU GEMM may round a row by its place in the batch (seen: the teacher head on an Intel
    Xeon, 4e-9; exact on an AMD EPYC), so there the teacher runs image by image in both runs."""
    if not extra:
        monkeypatch.setattr(distill_base, "run_teacher", run_teacher_image_by_image)
        monkeypatch.setattr(cache_teacher, "run_teacher", run_teacher_image_by_image)
    flags = ("--distiller", distiller, *extra)
    cache = make_cache(tmp_path, tree, teacher_file, "--cache-dtype", "float32", run_extra=flags)
    live, cached = tmp_path / "live", tmp_path / "cached"
    train(parse_args(run_flags(tree, live, teacher_file, *flags)))
    train(parse_args(run_flags(tree, cached, teacher_file, *flags, "--teacher-cache", str(cache))))
    a, b = student_state(live), student_state(cached)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((cache / "manifest.json").read_text())["rows"] == ("position" if extra else "sample")


def test_a_mixing_cache_holds_the_runs_mixed_batches(tmp_path, tree, teacher_file):
    """Position rows: row (rank * steps + step) * batch + j is the teacher on image j of that mixed batch,
    for each of the run's processes; the run's batch size and process count are part of the manifest."""
    from ofakd_fast.train.cache_teacher import epoch_plan

    cache = tmp_path / "cache"
    cache_main(["--cache-dir", str(cache), "--cache-world-size", "2", "--cache-dtype", "float32", "--",
                *run_flags(tree, tmp_path / "unused", teacher_file, *MIXING)])
    manifest = json.loads((cache / "manifest.json").read_text())
    assert (manifest["world_size"], manifest["batch_size"], manifest["mixup"]["cutmix"]) == (2, 4, 1.0)
    args = parse_args(run_flags(tree, tmp_path / "unused", teacher_file, *MIXING))
    plan = epoch_plan(args, manifest, 12, 1, 0, 256)
    assert [place for _, place in plan] == [(0, 0), (0, 1)]  # 12 samples, 2 processes of batch 4: 1 step each
    dealt = [index for items, _ in plan for _, index in items]
    assert len(dealt) == 8 and len(set(dealt)) == 8
    assert np.load(epoch_dir(cache, 1) / "logits.npy").shape == (8, 3)


def test_mixing_is_a_function_of_the_batch_place_and_leaves_numpy_alone():
    from types import SimpleNamespace

    from ofakd_fast.train.sampling import build_mixup

    args = SimpleNamespace(mixup=0.8, cutmix=1.0, mixup_prob=1.0, mixup_switch_prob=0.5, smoothing=0.1, seed=5)
    mixup, images, target = build_mixup(args, 3), torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    np.random.seed(1)
    before = np.random.get_state()[1].copy()
    first = [mixup(images.clone(), target, 2, step, 0) for step in range(6)]
    assert np.array_equal(np.random.get_state()[1], before)
    again = [mixup(images.clone(), target, 2, step, 0) for step in range(6)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other_rank = mixup(images.clone(), target, 2, 0, 1)
    assert len({tuple(x[1][:, 0].tolist()) for x in first + [other_rank]}) > 1  # not one draw for all places


def test_top_k_cache_stores_exact_probabilities_and_trains(tmp_path, tree, teacher_file):
    cache = make_cache(tmp_path, tree, teacher_file, "--cache-topk", "2", "--cache-dtype", "bfloat16",
                       run_extra=("--distiller", "ofa"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["topk"] == 2 and manifest["dtype"] == "bfloat16" and manifest["epochs"] == 2
    rows = TeacherCache(cache).rows(1, np.arange(12))
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
    for extra, field in ((("--seed", "3"), "seed"), (("--scale", "0.5", "1"), "data"), (("--epochs", "3"), "epochs"),
                         (MIXING, "rows")):
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

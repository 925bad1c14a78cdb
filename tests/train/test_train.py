"""The trainer (ofakd-train), the evaluator (ofakd-eval), the data and checkpoint helpers.

Tiny timm models on 16x16 images written to tmp_path; every run is a handful of steps on CPU.
"""
import gzip
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ofakd_fast.train import evaluate as evaluate_cli
from ofakd_fast.train import create_model, list_presets, parse_args, train
from ofakd_fast.train.checkpoint import load_weights, save_checkpoint
from ofakd_fast.train.errors import CheckpointError, CorruptImageError, DataError
from ofakd_fast.train.mnist import load_mnist
from ofakd_fast.train.sampling import EpochSampler

from train_helpers import CLASSES, IMG, STUDENT, TEACHER, base_flags, teacher_file, tree, write_tree  # noqa: F401

def test_two_steps_on_image_folder(tree, teacher_file, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(parse_args(base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "1",
                                         "--steps-per-epoch", "2", "--channels-last")))
    assert result["global_step"] == 2 and result["epochs_done"] == 1
    log = capsys.readouterr().out
    assert "step 2/2 loss" in log and "img/s" in log and "eta" in log
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["distiller"] == "ofa" and config["model_kwargs"]["embed_dim"] == 32
    header, row = (out / "summary.csv").read_text().strip().splitlines()
    # timm's summary layout; the OFA loss of the final logits has a name of its own (not KD's).
    assert header.split(",") == ["epoch", "train_loss", "train_loss_gt", "train_loss_ofa_logits",
                                 "train_loss_ofa_stages", "train_img_per_sec", "train_epoch_seconds", "eval_loss",
                                 "eval_top1", "eval_top5", "lr"]
    values = dict(zip(header.split(","), row.split(",")))
    assert all(values.values())
    state = torch.load(out / "last.pth", weights_only=True)
    assert {"model", "distiller", "optimizer", "scheduler", "epoch", "rng"} <= set(state)
    assert state["distiller"] and all(key.startswith("projectors.") for key in state["distiller"])
    assert state["epoch"] == 1 and state["global_step"] == 2 and (out / "best.pth").is_file()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]

    metrics = evaluate_cli.run(evaluate_cli.build_parser().parse_args(["--checkpoint", str(out), "--workers", "0"]))
    assert metrics["images"] == len(CLASSES) and metrics["top1"] == pytest.approx(float(values["eval_top1"]), abs=1e-2)


def final_state(result) -> dict:
    distiller = result["distiller"]
    return {k: v.detach().clone() for k, v in distiller.state_dict().items()}


def test_resume_matches_uninterrupted_run(tree, teacher_file, tmp_path):
    # Augmentation, drop-path, mixup and EMA all draw random numbers: the resumed run must redo them exactly.
    flags = ["--teacher-checkpoint", str(teacher_file), "--epochs", "2", "--drop-path", "0.1", "--mixup", "0.4",
             "--smoothing", "0.1", "--model-ema", "--model-ema-decay", "0.9", "--sched-on-updates", "--hflip", "0.5"]
    whole = train(parse_args(base_flags(tree, tmp_path / "whole", *flags)))
    assert whole["global_step"] == 6  # 12 images / batch 4 = 3 steps per epoch

    run = tmp_path / "interrupted"
    # Stopped in the middle of epoch 2; the resumed part uses 2 loader workers (augmentation does not depend on them).
    stopped = train(parse_args(base_flags(tree, run, *flags, "--stop-after-steps", "4")))
    assert stopped["stopped"] and stopped["global_step"] == 4
    state = torch.load(run / "last.pth", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"]) == (1, 1)
    resumed = train(parse_args(base_flags(tree, run, *flags, "--resume", str(run), "--workers", "2")))
    assert resumed["global_step"] == 6

    expected, got = final_state(whole), final_state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    ema_whole = torch.load(tmp_path / "whole" / "last.pth", weights_only=True)["model_ema"]
    ema_resumed = torch.load(run / "last.pth", weights_only=True)["model_ema"]
    for key in ema_whole:
        torch.testing.assert_close(ema_resumed[key], ema_whole[key], rtol=0, atol=0, msg=key)
    rows = (run / "summary.csv").read_text().strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]


DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from ofakd_fast.train import parse_args, train
    result = train(parse_args(sys.argv[2:]))
    torch.save(result["distiller"].state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
""")


def test_torchrun_two_processes_stay_in_sync(tree, teacher_file, tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT)
    out = tmp_path / "ddp"
    flags = base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "1", "--steps-per-epoch",
                       "2", "--batch-size", "2", "--drop-path", "0.1")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(tmp_path), *flags], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "step 2/2" in proc.stdout
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = create_model("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2},
                           len(CLASSES), 3, IMG, "--model")
    for key in rank0:
        torch.testing.assert_close(rank1[key], rank0[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(rank0["student.head.weight"], initial.head.weight)  # it did train
    state = torch.load(out / "last.pth", weights_only=True)
    assert state["global_step"] == 2 and len(state["rng"]) == 2


def test_corrupt_image_is_reported_with_its_path(tmp_path, teacher_file):
    tree = write_tree(tmp_path / "tree", per_class_train=2)
    bad = tree / "train" / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises((CorruptImageError, RuntimeError)) as info:
        train(parse_args(base_flags(tree, tmp_path / "run", "--epochs", "1", "--workers", "1", "--distiller",
                                    "vanilla", "--batch-size", "7")))  # one batch holds all 7 images
    assert str(bad) in str(info.value) and "cannot read image file" in str(info.value)


def write_preset(tmp_path, text: str) -> str:
    path = tmp_path / "preset.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


@pytest.mark.parametrize("flags, expected", [
    (["--lr", "-1"], "argument --lr: expected a positive number, got '-1'"),
    (["--lr", "fast"], "argument --lr: expected a positive number, got 'fast'"),
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["--smoothing", "1.5"], "argument --smoothing: expected a number in [0, 1), got '1.5'"),
    (["--distiller", "no_such_method"], "argument --distiller: invalid choice: 'no_such_method'"),
    (["--ofa-eps", "1", "2"], "--ofa-eps: expected 1 value or 5"),
    (["--ofa-stages", "1", "5"], "argument --ofa-stages: expected an integer in [1, 4], got '5'"),
    (["--ofa-stages", "2", "2"], "--ofa-stages: expected distinct stages"),
    (["--distiller", "kd", "--teacher", ""], "--distiller kd needs --teacher"),
    (["--model", "resnet_9000"], "--model: unknown timm model 'resnet_9000'"),
    (["--mixup", "0.8", "--batch-size", "3"], "--batch-size 3: expected an even batch size"),
    (["--amp", "--amp-dtype", "float16", "--device", "cpu"], "--amp-dtype float16: expected a CUDA device"),
    (["--config", "no_such_preset"], "--config: unknown preset 'no_such_preset'; expected one of"),
    (["--model-kwargs", "img_size"], "argument --model-kwargs: expected key=value, got 'img_size'"),
])
def test_bad_flags_give_clear_errors(flags, expected, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--dataset", "synthetic", "--teacher", "resnet10t", *flags])
    assert info.value.code == 2
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [
    ("lr: fast\n", "key 'lr': expected a positive number, got 'fast'"),
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("opt: rmsprop\n", "key 'opt': invalid choice 'rmsprop'; expected one of sgd, momentum, adamw, adam"),
    ("amp: yes please\n", "key 'amp': expected true or false"),
    ("scale: [0.5]\n", "key 'scale': expected 2 values"),
    ("- lr\n- 0.1\n", "expected a mapping of flag names to values"),
    ("lr: [0.1\n", "not valid YAML"),
])
def test_bad_presets_give_clear_errors(text, expected, tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "synthetic", "--teacher", "resnet10t", "--config", write_preset(tmp_path, text)])
    assert expected in capsys.readouterr().err


def test_presets_parse_and_flags_override_them(tmp_path):
    # The original OFA-KD configs (tests/train/test_recipes.py checks their values) and a 32-px extra.
    assert {"cifar_cnn", "cifar_vit_mlp", "imagenet_cnn", "imagenet_vit_mlp", "imagenet_stronger",
            "cifar100_cnn_32px"} <= set(list_presets())
    for name in list_presets():
        args = parse_args(["--config", name, "--data-dir", str(tmp_path), "--teacher", "resnet18"])
        assert args.config == name
    args = parse_args(["--config", "imagenet_vit_mlp", "--data-dir", str(tmp_path), "--teacher", "resnet18",
                       "--lr", "1e-3", "--epochs", "5"])
    assert (args.opt, args.sched, args.lr, args.epochs, args.mixup, args.model_ema) == \
        ("adamw", "cosine", 1e-3, 5, 0.8, True)
    args = parse_args(["--config", "imagenet_cnn", "--data-dir", str(tmp_path), "--teacher", "resnet18"])
    assert (args.opt, args.lr, args.sched, args.decay_epochs, args.epochs) == ("sgd", 0.1, "step", 30, 100)


def test_teacher_checkpoint_errors(tmp_path, teacher_file, capsys):
    teacher = create_model("resnet10t", {"channels": (8, 16, 32, 64), "stem_width": 8}, 7, 3, IMG, "--teacher")
    with pytest.raises(CheckpointError, match=r"--teacher-checkpoint: the weights in .* do not fit the teacher "
                                              r"resnet10t.*shape mismatches \(fc.weight: file \(3, 64\) vs model \(7, 64\)"):
        load_weights(teacher, teacher_file, "--teacher-checkpoint", "teacher")
    with pytest.raises(CheckpointError, match="--teacher-checkpoint: file not found: .*missing.pth"):
        load_weights(teacher, tmp_path / "missing.pth", "--teacher-checkpoint", "teacher")
    other = torch.nn.Linear(3, 3).state_dict()
    save_checkpoint({"state_dict": other}, tmp_path / "timm_style.pth")  # a timm checkpoint of another model
    with pytest.raises(CheckpointError, match=r"missing keys \(e.g. conv1.0.weight.*unexpected keys \(e.g. weight"):
        load_weights(teacher, tmp_path / "timm_style.pth", "--teacher-checkpoint", "teacher")

    from ofakd_fast.train import main
    with pytest.raises(SystemExit):
        main(["--dataset", "synthetic", "--img-size", str(IMG), "--train-subset", "8", *STUDENT, *TEACHER,
              "--teacher-checkpoint", str(tmp_path / "nope.safetensors"), "--output", str(tmp_path / "run")])
    assert "ofakd-train: error: --teacher-checkpoint: file not found" in capsys.readouterr().err


def write_idx(path: Path, array: np.ndarray) -> None:
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    for stem, n in (("train", 6), ("t10k", 4)):
        write_idx(tmp_path / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(tmp_path / f"{stem}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    images, labels = load_mnist("train", str(tmp_path))
    assert images.shape == (6, 28, 28) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not a valid IDX file"):
        load_mnist("test", str(tmp_path))


def test_epoch_sampler_shards_and_resumes():
    full = list(EpochSampler(20, 3, num_replicas=2, rank=1, seed=5))
    assert len(full) == 9 and len({i for _, i in full}) == 9  # 20 // (2 * 3) = 3 batches of 3
    other = {i for _, i in EpochSampler(20, 3, num_replicas=2, rank=0, seed=5)}
    assert not other & {i for _, i in full}
    later = EpochSampler(20, 3, num_replicas=2, rank=1, seed=5)
    later.set_epoch(0, skip_batches=2)
    assert list(later) == full[6:]
    evaluation = [list(EpochSampler(7, 2, num_replicas=2, rank=r, shuffle=False)) for r in (0, 1)]
    assert sorted(i for shard in evaluation for _, i in shard) == list(range(7))


def test_cifar100_pickle_reader(tmp_path):
    import pickle

    from ofakd_fast.train.data import load_cifar100

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 3)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(n)),
                 "coarse_labels": [0] * n}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)]}, f)
    images, labels = load_cifar100(str(tmp_path), "train")
    assert images.shape == (5, 32, 32, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    raw = pickle.load(open(folder / "train", "rb"))["data"][1]
    assert torch.equal(images[1, :, :, 0].flatten(), torch.from_numpy(raw[:1024]))  # the red plane comes first
    with pytest.raises(DataError, match="no CIFAR-100 python release found"):
        load_cifar100(str(tmp_path / "elsewhere"), "test")

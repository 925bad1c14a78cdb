"""The original OFA-KD recipes: presets, its flag names and args.yaml, LAMB, BCE, repeated augmentation,
and timm's transforms on CIFAR-100 and MNIST. Tiny data written to tmp_path; nothing downloads."""
import gzip
import pickle
import textwrap

import numpy as np
import pytest
import torch
import yaml

from ofakd_fast.train import parse_args, train
from ofakd_fast.train.data import DataConfig, build_dataset, dataset_info
from ofakd_fast.train.sampling import EpochSampler, SeededDataset, sample_key

from train_helpers import base_flags, teacher_file, tree  # noqa: F401

# ---------------------------------------------------------------------------------------------- presets

# Values transcribed from Hao840/OFAKD configs/*/*.yaml, and train.py's defaults where a config sets none.
ORIGINAL_RECIPES = {
    "cifar_cnn": dict(dataset="cifar100", img_size=224, epochs=300, batch_size=128, lr=0.05, min_lr=1e-3, opt="sgd",
                      weight_decay=2e-3, sched="cosine", warmup_epochs=3, warmup_lr=1e-4, color_jitter=0.0,
                      smoothing=0.1, momentum=0.9, hflip=0.5, train_interpolation="random", interpolation="bilinear",
                      aa=None, reprob=0.0, mixup=0.0, model_ema=False),
    "cifar_vit_mlp": dict(dataset="cifar100", img_size=224, epochs=300, batch_size=128, lr=5e-4, min_lr=1e-5,
                          opt="adamw", weight_decay=0.05, sched="cosine", warmup_epochs=20, warmup_lr=5e-7,
                          clip_grad=5.0, smoothing=0.1, color_jitter=0.4, reprob=0.25, remode="pixel",
                          aa="rand-m9-mstd0.5-inc1", mixup=0.8, cutmix=1.0, model_ema=False, drop_path=None),
    "imagenet_cnn": dict(dataset="imagefolder", epochs=100, batch_size=64, lr=0.1, min_lr=1e-6, opt="sgd",
                         weight_decay=1e-4, sched="step", decay_epochs=30, decay_rate=0.1, warmup_epochs=3,
                         warmup_lr=1e-4, color_jitter=0.0, smoothing=0.1, train_interpolation="random"),
    "imagenet_vit_mlp": dict(epochs=300, batch_size=128, lr=5e-4, min_lr=1e-6, opt="adamw", weight_decay=0.05,
                             sched="cosine", warmup_epochs=20, warmup_lr=5e-7, clip_grad=5.0, drop=0.0, drop_path=0.0,
                             smoothing=0.1, color_jitter=0.4, reprob=0.25, remode="pixel", aa="rand-m9-mstd0.5-inc1",
                             mixup=0.8, cutmix=1.0, model_ema=True, model_ema_decay=0.99996),
    "imagenet_stronger": dict(epochs=300, batch_size=256, lr=5e-3, opt="lamb", sched="cosine", weight_decay=0.02,
                              warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-6, smoothing=0.0, drop=0.0, drop_path=0.05,
                              aug_repeats=3, aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0, color_jitter=0.0,
                              crop_pct=0.95, bce_loss=True, bce_target_thresh=None, reprob=0.0, model_ema=True,
                              model_ema_decay=0.9998),
}


@pytest.mark.parametrize("name", sorted(ORIGINAL_RECIPES))
def test_presets_hold_the_original_values(name, tmp_path):
    args = parse_args(["--config", name, "--data-dir", str(tmp_path), "--teacher", "resnet18"])
    got = {key: getattr(args, key) for key in ORIGINAL_RECIPES[name]}
    assert got == ORIGINAL_RECIPES[name]
    assert (args.distiller, args.ofa_eps, args.ofa_stages, args.ofa_temperature) == ("ofa", [1.0], [1, 2, 3, 4], 1.0)
    assert (args.scale, args.seed, args.workers) == ([0.08, 1.0], 42, 8)


def test_extra_32px_preset_is_marked_as_not_the_papers(tmp_path):
    from ofakd_fast.train.cli import resolve_preset

    assert "NOT the paper's" in resolve_preset("cifar100_cnn_32px").read_text()
    args = parse_args(["--config", "cifar100_cnn_32px", "--data-dir", str(tmp_path), "--teacher", "resnet18"])
    assert (args.img_size, args.epochs, args.decay_milestones) == (32, 240, [150, 180, 210])


# ---------------------------------------------------------------------------------------------- the original's flags

def test_original_flag_names_are_aliases(tmp_path):
    args = parse_args([str(tmp_path), "-d", "cifar100", "--teacher", "resnet18", "--ofa-stage", "2", "3",
                       "-vb", "32", "--dr", "0.5", "--teacher-pretrained", "t.pth", "--use-ema-teacher",
                       "--train-interpolation", "random", "--bce-loss", "--bce-target-thresh", "0.2",
                       "--aug-repeats", "3", "--opt", "lamb", "--remode", "pixel", "--reprob", "0.1"])
    assert (args.data_dir, args.dataset, args.ofa_stages, args.eval_batch_size, args.decay_rate) == \
        (str(tmp_path), "cifar100", [2, 3], 32, 0.5)
    assert (args.teacher_pretrained, args.use_ema_teacher, args.train_interpolation) == ("t.pth", True, "random")
    assert (args.bce_loss, args.bce_target_thresh, args.aug_repeats, args.opt, args.remode) == \
        (True, 0.2, 3, "lamb", "pixel")
    assert not hasattr(args, "data_dir_positional")
    assert parse_args(["--dataset", "synthetic", "--teacher", "resnet18", "--validation-batch-size", "8"]
                      ).eval_batch_size == 8
    defaults = parse_args(["--dataset", "synthetic", "--teacher", "resnet18"])
    assert (defaults.teacher_pretrained, defaults.use_ema_teacher, defaults.aug_repeats, defaults.bce_loss) == \
        ("", False, 0, False)


def original_args_yaml(**changes) -> dict:
    """What the original train.py writes to args.yaml: every flag's default (transcribed from its parser)."""
    args = dict(
        model="resnet18", teacher="deit_tiny_patch16_224", teacher_pretrained="", use_ema_teacher=False,
        distiller="ofa", gt_loss_weight=1.0, kd_loss_weight=1.0, kd_temperature=1, ofa_eps=[1], ofa_stage=[1, 2, 3, 4],
        ofa_loss_weight=1, ofa_temperature=1, dist_beta=1, dist_gamma=1, dist_tau=1, dkd_alpha=1, dkd_beta=2,
        dkd_temperature=1, correlation_scale=0.02, correlation_feat_dim=128, crd_feat_dim=128, crd_k=16384,
        crd_momentum=0.5, crd_temperature=0.07, rkd_distance_weight=25, rkd_angle_weight=50, rkd_eps=1e-12,
        rkd_squared=False, fitnet_stage=[1, 2, 3, 4], fitnet_loss_weight=1, speedtest=False, eval_interval=1,
        eval_interval_end=0.75, data_dir="/data/imagenet", dataset="", train_split="train", val_split="validation",
        dataset_download=False, class_map="", pretrained=False, initial_checkpoint="", num_classes=1000, gp=None,
        img_size=None, input_size=None, crop_pct=None, mean=None, std=None, interpolation="", batch_size=128,
        validation_batch_size=None, opt="sgd", opt_eps=None, opt_betas=None, momentum=0.9, weight_decay=2e-5,
        clip_grad=None, clip_mode="norm", layer_decay=None, sched="cosine", lr=0.05, lr_noise=None, lr_noise_pct=0.67,
        lr_noise_std=1.0, lr_cycle_mul=1.0, lr_cycle_decay=0.5, lr_cycle_limit=1, lr_k_decay=1.0, warmup_lr=0.0001,
        min_lr=1e-6, epochs=300, epoch_repeats=0.0, start_epoch=None, decay_epochs=100, warmup_epochs=3,
        cooldown_epochs=0, patience_epochs=10, decay_rate=0.1, no_aug=False, scale=[0.08, 1.0],
        ratio=[3 / 4, 4 / 3], hflip=0.5, vflip=0.0, color_jitter=0.4, aa=None, aug_repeats=0, aug_splits=0,
        jsd_loss=False, bce_loss=False, bce_target_thresh=None, reprob=0.0, remode="pixel", recount=1,
        resplit=False, mixup=0.0, cutmix=0.0, cutmix_minmax=None, mixup_prob=1.0, mixup_switch_prob=0.5,
        mixup_mode="batch", mixup_off_epoch=0, smoothing=0.1, train_interpolation="random", drop=0.0,
        drop_connect=None, drop_path=None, drop_block=None, bn_momentum=None, bn_eps=None, sync_bn=False,
        dist_bn="reduce", split_bn=False, model_ema=False, model_ema_force_cpu=False, model_ema_decay=[0.9998],
        seed=42, worker_seeding="all", log_interval=200, recovery_interval=0, checkpoint_hist=10, workers=8,
        save_images=False, amp=False, apex_amp=False, native_amp=False, no_ddp_bb=False, pin_mem=False,
        no_prefetcher=False, output="", experiment="", eval_metric="top1", tta=0, local_rank=0, dist_url="env://",
        use_multi_epochs_loader=False)
    args.update(changes)
    return args


def test_original_args_yaml_is_read(tmp_path):
    # A run of configs/imagenet/stronger.yaml, as its args.yaml records it (floats where argparse made them).
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(original_args_yaml(
        model="resnet50", teacher="vit_base_patch16_224", epochs=300, batch_size=256, lr=5e-3, opt="lamb",
        weight_decay=0.02, warmup_epochs=5, warmup_lr=1e-6, smoothing=0.0, drop_path=0.05, aug_repeats=3.0,
        aa="rand-m7-mstd0.5", mixup=0.1, cutmix=1.0, color_jitter=0.0, crop_pct=0.95, bce_loss=True, model_ema=True,
        model_ema_decay=[0.9998], ofa_stage=[2, 3, 4], validation_batch_size=64, dkd_alpha=5.0,
        output="/runs", experiment="stronger")))
    args = parse_args(["--config", str(path)])
    assert (args.model, args.teacher, args.dataset, args.data_dir, args.num_classes) == \
        ("resnet50", "vit_base_patch16_224", "imagefolder", "/data/imagenet", 1000)
    assert (args.opt, args.lr, args.weight_decay, args.aug_repeats, args.bce_loss, args.crop_pct) == \
        ("lamb", 5e-3, 0.02, 3, True, 0.95)
    assert (args.ofa_stages, args.eval_batch_size, args.model_ema_decay, args.remode) == ([2, 3, 4], 64, 0.9998, "const")
    assert (args.train_interpolation, args.interpolation, args.initial_checkpoint, args.img_size) == \
        ("random", "bilinear", None, 224)  # '' and null: our defaults
    assert (args.log_interval, args.workers, args.seed, args.teacher_pretrained) == (200, 8, 42, "")
    args = parse_args(["--config", str(path), "--lr", "1e-3", "--data-dir", str(tmp_path)])  # flags still win
    assert (args.lr, args.data_dir) == (1e-3, str(tmp_path))


def test_original_args_yaml_with_unimplemented_settings_is_refused_in_one_error(tmp_path, capsys):
    path = tmp_path / "args.yaml"
    path.write_text(yaml.safe_dump(original_args_yaml(jsd_loss=True, vflip=0.5, input_size=[3, 256, 256],
                                                      my_own_flag=3, crd_k=4096, rkd_squared=True)))
    with pytest.raises(SystemExit):
        parse_args(["--config", str(path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    err = errors[0]
    assert "unknown key 'my_own_flag'" in err
    assert "train.py that ofakd-train does not implement: " in err
    assert "jsd_loss: True (implemented only at its default False)" in err
    assert "vflip: 0.5" in err and "input_size: [3, 256, 256]" in err
    # At defaults that do nothing, and CRD's / RKD's settings in a run of another distiller: ignored.
    for ignored in ("recount", "dist_bn", "lr_noise_pct", "output", "crd_k", "rkd_squared", "no_aug"):
        assert f"{ignored}:" not in err


# ---------------------------------------------------------------------------------------------- LAMB and BCE

def test_lamb_and_bce_train_a_step(tree, teacher_file, tmp_path):
    from timm.loss import BinaryCrossEntropy

    out = tmp_path / "run"
    result = train(parse_args(base_flags(tree, out, "--teacher-checkpoint", str(teacher_file), "--epochs", "1",
                                         "--steps-per-epoch", "1", "--opt", "lamb", "--bce-loss",
                                         "--bce-target-thresh", "0.2", "--smoothing", "0.1")))
    assert result["global_step"] == 1
    criterion = result["distiller"].gt_criterion
    assert isinstance(criterion, BinaryCrossEntropy) and criterion.target_threshold == 0.2
    assert criterion.smoothing == 0.1
    groups = torch.load(out / "last.pth", weights_only=True)["optimizer"]["param_groups"]
    assert "always_adapt" in groups[0] and groups[0]["max_grad_norm"] == 1.0  # timm's Lamb
    state = torch.load(out / "last.pth", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


# ---------------------------------------------------------------------------------------------- repeated augmentation

@pytest.mark.parametrize("length, replicas, repeats, batch", [(10, 1, 3, 2), (10, 3, 3, 2), (13, 2, 2, 3),
                                                              (600, 2, 3, 16), (700, 4, 3, 8)])
def test_aug_repeats_shard_like_timm(length, replicas, repeats, batch):
    from timm.data.distributed_sampler import RepeatAugSampler

    class Sized:
        def __len__(self):
            return length

    for rank in range(replicas):
        ours = EpochSampler(length, batch, replicas, rank, seed=0, repeats=repeats)  # seed 0: timm's permutation
        theirs = list(RepeatAugSampler(Sized(), replicas, rank, num_repeats=repeats))
        usable = len(theirs) // batch * batch  # the loader's drop_last
        assert ours.batches_per_epoch() == len(theirs) // batch
        assert [index for _, index in ours] == theirs[:usable]


def test_aug_repeats_give_each_copy_its_own_key():
    items = list(EpochSampler(10, 2, seed=7, repeats=3))
    assert len(items) == 10
    first = items[:3]
    assert len({index for _, index in first}) == 1 and len({key for key, _ in first}) == 3
    index = first[0][1]
    assert [key for key, _ in first] == [sample_key(7, 0, index * 3 + r) for r in range(3)]
    spread = [next(iter(EpochSampler(10, 2, 3, rank, seed=7, repeats=3))) for rank in range(3)]
    assert len({index for _, index in spread}) == 1  # the copies of a sample go to different ranks


def write_fake_cifar(root):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": [i % 100 for i in range(n)],
                 "coarse_labels": [0] * n}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [f"c{i}" for i in range(100)]}))
    return root


def write_fake_mnist(root):
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for stem, n in (("train", 6), ("t10k", 4)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
                            ("labels-idx1", rng.integers(0, 10, (n,), dtype=np.uint8))):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (root / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return root


def seeded_sample(config: DataConfig, split: str = "train", key: int = 123, index: int = 1) -> torch.Tensor:
    dataset = SeededDataset(build_dataset(config, dataset_info(config), split))
    return dataset[(key, index)][0]


def test_aug_repeats_copies_are_augmented_differently(tmp_path):
    config = DataConfig(dataset="cifar100", data_dir=str(write_fake_cifar(tmp_path)), img_size=32)
    dataset = SeededDataset(build_dataset(config, dataset_info(config), "train"))
    copies = [dataset[item][0] for item in list(EpochSampler(len(dataset.base), 2, seed=3, repeats=3))[:3]]
    assert all(not torch.equal(copies[a], copies[b]) for a, b in ((0, 1), (0, 2), (1, 2)))


def test_aug_repeats_resume_matches_uninterrupted_run(tree, teacher_file, tmp_path):
    flags = ["--teacher-checkpoint", str(teacher_file), "--epochs", "2", "--aug-repeats", "3", "--drop-path", "0.1",
             "--sched-on-updates", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--remode", "pixel"]
    whole = train(parse_args(base_flags(tree, tmp_path / "whole", *flags)))
    assert whole["global_step"] == 6  # 12 images, 1 process: 12 samples per epoch (4 images x 3 copies), 3 steps
    run = tmp_path / "interrupted"
    train(parse_args(base_flags(tree, run, *flags, "--stop-after-steps", "4")))
    resumed = train(parse_args(base_flags(tree, run, *flags, "--resume", str(run))))
    assert resumed["global_step"] == 6
    expected, got = whole["distiller"].state_dict(), resumed["distiller"].state_dict()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------- CIFAR / MNIST transforms

@pytest.mark.parametrize("change", [dict(aa="rand-m9-mstd0.5-inc1"), dict(reprob=1.0), dict(scale=(0.3, 0.5)),
                                    dict(ratio=(0.5, 0.6)), dict(color_jitter=0.8), dict(interpolation="nearest"),
                                    dict(train_interpolation="bicubic"), dict(hflip=1.0)])
@pytest.mark.parametrize("dataset", ["cifar100", "mnist"])
def test_small_image_transforms_honour_the_flags(dataset, change, tmp_path):
    root = write_fake_cifar(tmp_path / "c") if dataset == "cifar100" else write_fake_mnist(tmp_path / "m")
    common = dict(dataset=dataset, data_dir=str(root), img_size=24, hflip=0.0, color_jitter=0.0)
    base, changed = seeded_sample(DataConfig(**common)), seeded_sample(DataConfig(**{**common, **change}))
    assert base.shape == changed.shape == (3 if dataset == "cifar100" else 1, 24, 24)
    assert not torch.equal(base, changed), change


def test_mnist_flip_is_off_unless_asked_and_crop_pct_acts(tmp_path):
    common = dict(dataset="mnist", data_dir=str(write_fake_mnist(tmp_path / "m")), img_size=28, color_jitter=0.0,
                  scale=(1.0, 1.0), ratio=(1.0, 1.0))
    plain = seeded_sample(DataConfig(**common))
    assert torch.equal(seeded_sample(DataConfig(**common), key=5), plain)  # no flip at any key by default
    assert torch.equal(seeded_sample(DataConfig(**common, hflip=1.0)), plain.flip(-1))
    whole, cropped = (seeded_sample(DataConfig(**common, crop_pct=pct), split="eval") for pct in (None, 0.5))
    assert not torch.equal(whole, cropped)
    assert torch.equal(seeded_sample(DataConfig(**common, crop_pct=1.0), split="eval"), whole)


@pytest.mark.parametrize("flags, expected", [
    (["--dataset", "synthetic", "--aa", "rand-m9-mstd0.5"], "--aa: --dataset synthetic is not augmented"),
    (["--dataset", "synthetic", "--reprob", "0.2", "--crop-pct", "0.9"],
     "--reprob, --crop-pct: --dataset synthetic is not augmented"),
    (["--dataset", "synthetic", "--hflip", "0.5"], "--hflip: --dataset synthetic is not augmented"),
    (["--dataset", "mnist", "--aa", "randaugment-for-digits"], "--aa randaugment-for-digits: not a timm auto-augment"),
    (["--dataset", "mnist", "--remode", "pixel"], "--remode pixel: acts only with random erasing"),
    (["--dataset", "mnist", "--bce-target-thresh", "0.2"], "--bce-target-thresh: acts only with --bce-loss"),
    (["--dataset", "mnist", "--interpolation", "random"], "--interpolation random: evaluation needs one fixed"),
    (["--dataset", "mnist", "--aug-repeats", "1.5"], "argument --aug-repeats: expected a whole number >= 0"),
])
def test_flags_that_cannot_act_are_refused(flags, expected, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--teacher", "resnet10t", *flags])
    assert expected in capsys.readouterr().err


def test_positional_dir_and_data_dir_must_agree(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([str(tmp_path), "--data-dir", str(tmp_path / "other"), "--teacher", "resnet10t"])
    assert "give the dataset folder once" in capsys.readouterr().err


def test_config_file_idle_original_default_is_dropped(tmp_path):
    # remode: pixel is the original's default and does nothing without reprob: ignored, not refused.
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent("""\
        dataset: synthetic
        remode: pixel
        teacher: resnet10t
    """))
    assert parse_args(["--config", str(path)]).remode == "const"

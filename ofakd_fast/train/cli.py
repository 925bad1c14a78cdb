"""ofakd-train: distill a timm teacher into a timm student with OFA-KD, KD, or no distillation.

    ofakd-train --config imagenet_cnn --data-dir /data/imagenet --model resnet18 \\
        --teacher deit_tiny_patch16_224 --teacher-checkpoint deit_t.pth --output runs/r18_deit
    torchrun --nproc_per_node=8 -m ofakd_fast.train --config imagenet_vit_mlp ...
    ofakd-train --dataset synthetic --model resnet50 --teacher resnet101 --amp --channels-last  # throughput

A preset (``--config NAME`` from ofakd_fast/train/configs/, or a YAML path) sets defaults; every flag
given on the command line overrides it. The presets are the original OFA-KD repository's configs.
For users of the original train.py: its flag names are accepted as aliases (``--ofa-stage``,
``-vb/--validation-batch-size``, ``-d``, ``--dr``, the positional DIR, ...), and the ``args.yaml``
one of its runs wrote can be given to ``--config`` (see :func:`preset_defaults` for what is used,
what is ignored and what is refused). The run directory (``--output``) gets the resolved
``config.yaml``, ``summary.csv`` (one row per epoch), ``log.txt`` and the checkpoints ``last.pth``
and ``best.pth``; ``--resume RUN_DIR_or_FILE`` continues where a run stopped, mid-epoch included.
Under torchrun the distiller (student + projectors; the teacher is not a registered submodule) is
wrapped once in DistributedDataParallel, on nccl with GPUs and gloo on CPUs; rank 0 logs and saves.
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from ..distill import DISTILLERS
from .data import DATASETS
from .distributed import resolve_device
from .errors import UsageError, exit_on_user_error
from .flags import (MergeKwargs, kwargs_pair, nonneg_float, nonneg_int, number, positive_float, positive_int,
                    probability, smoothing_value, ema_decay, stage_value, whole_number)
from .sampling import mixing_active

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
OPTIMIZERS = ("sgd", "momentum", "adamw", "adam", "lamb")  # timm names: 'sgd' is SGD with Nesterov momentum
SCHEDULERS = ("step", "multistep", "cosine", "constant")


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofakd-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", "-c", default=None, metavar="NAME_or_PATH",
        help=f"YAML preset: a name from {CONFIG_DIR} ({', '.join(list_presets())}) or a file path, such as "
             "the args.yaml of a run of the original OFA-KD train.py")
    add("data_dir_positional", nargs="?", default=None, metavar="DIR",
        help="the original train.py's positional dataset folder: the same as --data-dir")
    _add_data_flags(parser)
    _add_model_flags(parser)
    _add_distillation_flags(parser)
    _add_optimization_flags(parser)
    _add_speed_flags(parser)
    _add_run_flags(parser)
    return parser


def _add_alias(group, action: argparse.Action, *names: str) -> None:
    """The original train.py's spelling of a flag: the same dest and value, its own name in error messages."""
    group.add_argument(*names, dest=action.dest, type=action.type, nargs=action.nargs, choices=action.choices,
                       default=argparse.SUPPRESS, help=f"the original train.py's name of {action.option_strings[0]}")


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    _add_alias(g, g.add_argument("--dataset", default="imagefolder", choices=DATASETS), "-d")
    g.add_argument("--data-dir", default=None, help="imagefolder: the folder with train/ and val/; cifar100: the "
                   "folder with cifar-100-python/; mnist: optional folder with the IDX files")
    g.add_argument("--img-size", type=positive_int, default=224)
    g.add_argument("--in-chans", type=positive_int, default=None, help="image channels (default: the dataset's)")
    g.add_argument("--num-classes", type=positive_int, default=None, help="classes (default: the dataset's)")
    g.add_argument("--train-subset", type=nonneg_int, default=0,
                   help="train on this many images (class-balanced for cifar100/mnist); 0 = all")
    g.add_argument("--subset-seed", type=int, default=0)
    g.add_argument("--batch-size", "-b", type=positive_int, default=128, help="per process")
    _add_alias(g, g.add_argument("--eval-batch-size", type=positive_int, default=None,
                                 help="per process (default: 2x batch size)"), "-vb", "--validation-batch-size")
    g.add_argument("--workers", "-j", type=nonneg_int, default=4)
    g.add_argument("--aug-repeats", type=whole_number("repeat count"), default=0,
                   help="repeated augmentation: N differently augmented copies of each sample, dealt to different "
                        "processes, with the epoch length of timm's RepeatAugSampler (0 = off)")
    # Augmentation: timm's create_transform for every dataset but synthetic, at any resolution.
    g.add_argument("--scale", type=probability, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                   help="random-resized-crop area range")
    g.add_argument("--ratio", type=positive_float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"))
    g.add_argument("--hflip", type=probability, default=None,
                   help="horizontal-flip probability (default: 0.5; 0 on mnist, whose digits are not symmetric)")
    g.add_argument("--color-jitter", type=nonneg_float, default=0.4,
                   help="brightness, contrast and saturation jitter (timm turns it off when --aa is given; on "
                        "greyscale images saturation has nothing to act on)")
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=probability, default=0.0, help="random-erasing probability")
    g.add_argument("--remode", default="const", choices=("const", "rand", "pixel"),
                   help="random-erasing fill (with --reprob; the original train.py's default is pixel)")
    g.add_argument("--crop-pct", type=number(float, "crop fraction", 0, 1, low_open=True), default=None,
                   help="evaluation center-crop fraction (default: 0.875 for imagefolder, 1 for cifar100/mnist)")
    g.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic", "nearest", "random"),
                   help="resize interpolation of evaluation, and of training unless --train-interpolation")
    g.add_argument("--train-interpolation", default=None, choices=("bilinear", "bicubic", "nearest", "random"),
                   help="training resize interpolation; random: bilinear or bicubic at random (the original's "
                        "default)")
    g.add_argument("--mixup", type=nonneg_float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=nonneg_float, default=0.0, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    g.add_argument("--smoothing", type=smoothing_value, default=0.0, help="label smoothing")
    g.add_argument("--bce-loss", action="store_true",
                   help="ground-truth loss: timm's BinaryCrossEntropy instead of cross-entropy")
    g.add_argument("--bce-target-thresh", type=probability, default=None,
                   help="with --bce-loss: binarize the (soft) targets at this threshold")


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("models")
    g.add_argument("--model", default="resnet18", help="student: a timm model name")
    g.add_argument("--model-kwargs", type=kwargs_pair, nargs="*", action=MergeKwargs, default={},
                   metavar="KEY=VALUE", help="extra timm.create_model arguments of the student")
    g.add_argument("--initial-checkpoint", default=None, help="initial student weights")
    g.add_argument("--drop", type=probability, default=0.0, help="student dropout rate")
    g.add_argument("--drop-path", type=probability, default=None, help="student drop-path rate")
    g.add_argument("--teacher", default=None, help="teacher: a timm model name (needed by ofa and kd)")
    g.add_argument("--teacher-kwargs", type=kwargs_pair, nargs="*", action=MergeKwargs, default={},
                   metavar="KEY=VALUE")
    g.add_argument("--teacher-checkpoint", default=None,
                   help="teacher weights: a state_dict or timm/ofakd checkpoint, .pth or .safetensors")
    g.add_argument("--teacher-pretrained", default="", metavar="PATH_or_timm",
                   help="the original train.py's teacher weights flag: a checkpoint file (loaded through timm's "
                        "pretrained-config file override), 'timm' for timm's released weights from the hub, "
                        "empty (default): none")
    g.add_argument("--teacher-cache", default=None, metavar="DIR",
                   help="read the teacher's outputs from a cache of ofakd-cache-teacher instead of running it "
                        "(logit distillers only; the teacher flags must be the cache's)")
    g.add_argument("--use-ema-teacher", action="store_true",
                   help="load the EMA weights of the teacher's checkpoint (default: its non-EMA weights)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the student under DDP")


def _add_distillation_flags(parser: argparse.ArgumentParser) -> None:
    """--distiller, OFA's stages and eps, and every registered distiller's hyper-parameters and loss weights."""
    g = parser.add_argument_group("distillation")
    g.add_argument("--distiller", default="ofa", choices=list(DISTILLERS))
    g.add_argument("--ofa-eps", type=positive_float, nargs="+", default=[1.0],
                   help="OFA exponent: one value, or one per stage plus one for the logits")
    _add_alias(g, g.add_argument("--ofa-stages", type=stage_value, nargs="+", default=[1, 2, 3, 4]), "--ofa-stage")
    _add_alias(g, g.add_argument("--fitnet-stages", type=stage_value, nargs="+", default=[1, 2, 3, 4],
                                 help="the stages FitNet hints (--distiller fitnet)"), "--fitnet-stage")
    seen = set()
    for name, distiller in DISTILLERS.items():
        for hp in distiller.hyper_parameters:
            if hp.flag in seen:
                continue
            seen.add(hp.flag)
            where = f"--distiller {name}"
            if hp.kind is bool:
                g.add_argument(hp.flag, action="store_true", help=f"{hp.help} ({where})")
            else:
                g.add_argument(hp.flag, type=number(hp.kind, hp.flag, hp.low, low_open=hp.low_open),
                               default=hp.default, help=f"{hp.help} ({where}; default {hp.default})")
    for key in sorted({key for distiller in DISTILLERS.values() for key in distiller.default_loss_weights}):
        g.add_argument(f"--{key}-loss-weight", type=nonneg_float, default=None,
                       help=f"weight of the '{key}' loss (default: the distiller's own, see ofakd_fast/distill/)")


def _add_optimization_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=100)
    g.add_argument("--opt", default="sgd", choices=OPTIMIZERS,
                   help="timm optimizer: sgd (Nesterov momentum), momentum (plain momentum), adamw, adam, lamb")
    g.add_argument("--lr", type=positive_float, default=0.1)
    g.add_argument("--momentum", type=number(float, "momentum", 0, 1, high_open=True), default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    g.add_argument("--clip-grad", type=positive_float, default=None, help="clip the gradient norm to this")
    g.add_argument("--sched", default="step", choices=SCHEDULERS)
    g.add_argument("--decay-epochs", type=positive_float, default=30, help="step: decay every this many epochs")
    g.add_argument("--decay-milestones", type=positive_int, nargs="+", default=[30, 60, 90])
    _add_alias(g, g.add_argument("--decay-rate", type=positive_float, default=0.1), "--dr")
    g.add_argument("--warmup-epochs", type=nonneg_int, default=0)
    g.add_argument("--warmup-lr", type=nonneg_float, default=1e-5)
    g.add_argument("--min-lr", type=nonneg_float, default=0.0)
    g.add_argument("--sched-on-updates", action="store_true", help="update the lr every step, not every epoch")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the student (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=ema_decay, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true")


def _add_speed_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("speed")
    g.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="float16 (with a GradScaler) needs CUDA")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the distiller")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch intra-op CPU threads (0 = torch's default); 1 is faster on a busy machine")


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("run")
    g.add_argument("--output", default=None, help="run directory (default: runs/<time>-<distiller>-<model>, or "
                   "the resumed checkpoint's directory)")
    g.add_argument("--resume", default=None, help="checkpoint file or run directory (its last.pth) to continue")
    g.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --output (its checkpoints, summary and log); without it an "
                        "existing run directory is refused unless --resume continues it")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=positive_int, default=50, help="progress line every N steps")
    g.add_argument("--eval-interval", type=nonneg_int, default=1, help="evaluate every N epochs (0 = last only)")
    g.add_argument("--checkpoint-interval", type=nonneg_int, default=0,
                   help="also save last.pth every N steps inside an epoch (0 = at epoch ends only)")
    g.add_argument("--steps-per-epoch", type=nonneg_int, default=0, help="cap the steps of each epoch (0 = all)")
    g.add_argument("--stop-after-steps", type=nonneg_int, default=0,
                   help="stop after this many steps in total, saving last.pth, as an interrupted run would")
    g.add_argument("--quiet", action="store_true", help="no progress lines, only epoch summaries")


def list_presets():
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_preset(name: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or os.sep in name:
        if not path.is_file():
            raise UsageError(f"--config: preset file not found: {name}")
        return path
    path = CONFIG_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UsageError(f"--config: unknown preset {name!r}; expected one of {', '.join(list_presets())} "
                         "or a path to a .yaml file")
    return path


# The original OFA-KD train.py (github.com/Hao840/OFAKD, train.py), for its args.yaml: the defaults of its
# flags that ofakd-train has no flag for. At these values the original did what ofakd-train does, so the
# key is ignored; at any other value it is refused (listed in one UsageError).
ORIGINAL_DEFAULTS = {
    "pretrained": False, "train_split": "train", "val_split": "validation", "dataset_download": False,
    "class_map": "", "gp": None, "input_size": None, "mean": None, "std": None, "opt_eps": None, "opt_betas": None,
    "clip_mode": "norm", "layer_decay": None, "lr_noise": None, "lr_noise_pct": 0.67, "lr_noise_std": 1.0,
    "lr_cycle_mul": 1.0, "lr_cycle_decay": 0.5, "lr_cycle_limit": 1, "lr_k_decay": 1.0, "epoch_repeats": 0.0,
    "start_epoch": None, "cooldown_epochs": 0, "patience_epochs": 10, "no_aug": False, "vflip": 0.0,
    "aug_splits": 0, "jsd_loss": False, "recount": 1, "resplit": False, "cutmix_minmax": None, "mixup_mode": "batch",
    "mixup_off_epoch": 0, "drop_connect": None, "drop_block": None, "bn_momentum": None, "bn_eps": None,
    "split_bn": False, "model_ema_force_cpu": False, "speedtest": False, "eval_metric": "top1", "tta": 0,
    "apex_amp": False, "native_amp": False, "no_ddp_bb": False,
    # Under DDP the original averaged the students' BatchNorm buffers at each epoch end; ofakd-train's DDP
    # broadcasts rank 0's at every step (as the original's DDP did too): the same up to one epoch's drift.
    "dist_bn": "reduce",
    "eval_interval_end": 0.75,  # with eval_interval 1 (its default) it changed nothing
}
# Keys of the original's args.yaml about where and how it ran (output folders, loader and launcher
# mechanics): ignored at any value; they do not change what is trained (give --output for the run dir).
ORIGINAL_RUN_KEYS = {"output", "experiment", "local_rank", "dist_url", "pin_mem", "no_prefetcher",
                     "use_multi_epochs_loader", "worker_seeding", "save_images", "recovery_interval", "checkpoint_hist"}
# The hyper-parameters of the original's other distillers: ignored when the file's distiller is not theirs
# (they did nothing in that run); a distiller ofakd-train lacks is refused by --distiller itself.
ORIGINAL_DISTILLER_KEYS = {
    "kd": ("kd_temperature",), "dist": ("dist_beta", "dist_gamma", "dist_tau"),
    "dkd": ("dkd_alpha", "dkd_beta", "dkd_temperature"), "correlation": ("correlation_scale", "correlation_feat_dim"),
    "crd": ("crd_feat_dim", "crd_k", "crd_momentum", "crd_temperature"),
    "rkd": ("rkd_distance_weight", "rkd_angle_weight", "rkd_eps", "rkd_squared"),
    "fitnet": ("fitnet_stage", "fitnet_loss_weight"),
}
# Our flags at the original's default value that do nothing given the file's other values: ignored.
ORIGINAL_IDLE = {"remode": ("pixel", lambda data: not data.get("reprob"))}
_UNSET = object()


def _config_key_actions(parser: argparse.ArgumentParser) -> dict:
    """Every name a config key may use for a flag: its dest and each long option spelling (aliases included)."""
    names = {}
    for action in parser._actions:
        if action.dest in ("help", "config") or not action.option_strings:
            continue
        names.setdefault(action.dest, action)
        for option in action.option_strings:
            if option.startswith("--"):
                names.setdefault(option[2:].replace("-", "_"), action)
    return names


def _original_key_ignored(name: str, value, data: dict) -> Optional[bool]:
    """For a key that names none of our flags: True (ignore it), False (refuse it: not implemented at this
    value) or None (not a key of the original train.py either)."""
    if name in ORIGINAL_RUN_KEYS:
        return True
    for distiller, keys in ORIGINAL_DISTILLER_KEYS.items():
        if name in keys:
            return data.get("distiller", "ofa") != distiller
    if name in ORIGINAL_DEFAULTS:
        return value == ORIGINAL_DEFAULTS[name]
    return None


def _config_value(dest: str, value, data: dict):
    """A config value as our flag takes it: null and '' (the original's 'unset') leave our default."""
    if dest == "dataset" and value == "":
        return "imagefolder"  # the original's empty --dataset: an image folder
    if value is None or (isinstance(value, str) and value == ""):
        return _UNSET
    idle = ORIGINAL_IDLE.get(dest)
    if idle is not None and value == idle[0] and idle[1](data):
        return _UNSET
    return value


def preset_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The values of a config file, each checked and converted like the flag it stands for.

    A key is a flag's dest or long name, aliases included (``ofa_stage``, ``validation_batch_size``),
    so the ``args.yaml`` of a run of the original train.py is read as well: null and '' mean "unset"
    (our default). A key that names none of our flags is ignored when it is one of the original's keys
    (:data:`ORIGINAL_DEFAULTS`) at its default value, where the original did what ofakd-train does;
    a run-mechanics key (:data:`ORIGINAL_RUN_KEYS`); or a hyper-parameter of another distiller than
    the file's. Every other such key is listed in one :class:`UsageError`: the unknown ones, and the
    original's keys at values ofakd-train does not implement.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got a {type(data).__name__}")
    data = {str(key).lstrip("-").replace("-", "_"): value for key, value in data.items()}
    actions = _config_key_actions(parser)
    out, unknown, unimplemented = {}, [], []
    for name, value in data.items():
        action = actions.get(name)
        if action is None:
            ignored = _original_key_ignored(name, value, data)
            if ignored is None:
                unknown.append(repr(name))
            elif not ignored:
                unimplemented.append(f"{name}: {value!r} (implemented only at its default "
                                     f"{ORIGINAL_DEFAULTS.get(name)!r})" if name in ORIGINAL_DEFAULTS else
                                     f"{name}: {value!r}")
            continue
        value = _config_value(action.dest, value, data)
        if value is not _UNSET:
            out[action.dest] = _preset_value(action, value, f"--config {path}: key {name!r}")
    problems = []
    if unknown:
        problems.append(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; expected flag names "
                        f"such as {', '.join(sorted(actions)[:8])}, ... (see ofakd-train --help)")
    if unimplemented:
        problems.append("keys of the original OFA-KD train.py that ofakd-train does not implement: "
                        f"{'; '.join(unimplemented)}; remove them (or set them to the default) to train without")
    if problems:
        raise UsageError(f"--config {path}: " + "; and ".join(problems))
    return out


def _preset_value(action: argparse.Action, value, where: str):
    if value is None:
        return None
    if action.nargs == 0:  # store_true
        if not isinstance(value, bool):
            raise UsageError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(action, MergeKwargs):
        if not isinstance(value, dict):
            raise UsageError(f"{where}: expected a mapping of argument names to values, got {value!r}")
        return {str(k).replace("-", "_"): v for k, v in value.items()}
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = list(value) if isinstance(value, (list, tuple)) else [value]  # one item: a single flag's value too
    if not many and len(items) != 1:
        raise UsageError(f"{where}: expected one value, got the list {value!r}")
    if isinstance(action.nargs, int) and len(items) != action.nargs:
        raise UsageError(f"{where}: expected {action.nargs} values, got {value!r}")
    if action.nargs == "+" and not items:
        raise UsageError(f"{where}: expected at least one value, got an empty list")
    converted = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise UsageError(f"{where}: expected a plain value, got {item!r}")
        if action.type is not None:
            try:
                item = action.type(item if isinstance(item, str) else str(item) if not isinstance(item, bool)
                                   else item)
            except argparse.ArgumentTypeError as error:
                raise UsageError(f"{where}: {error}") from None
        elif not isinstance(item, str):
            raise UsageError(f"{where}: expected text, got {item!r}")
        if action.choices is not None and item not in action.choices:
            raise UsageError(f"{where}: invalid choice {item!r}; expected one of "
                             f"{', '.join(map(str, action.choices))}")
        converted.append(item)
    return converted if many else converted[0]


def check_args(args: argparse.Namespace) -> None:
    """Cross-flag checks, once every value has its type; :class:`UsageError` on the first problem."""
    stages = list(args.ofa_stages)
    if len(set(stages)) != len(stages):
        raise UsageError(f"--ofa-stages: expected distinct stages among 1 2 3 4, got {' '.join(map(str, stages))}")
    if len(args.ofa_eps) not in (1, len(stages) + 1):
        raise UsageError(f"--ofa-eps: expected 1 value or {len(stages) + 1} (one per stage of --ofa-stages "
                         f"{' '.join(map(str, stages))} plus one for the logits), got {len(args.ofa_eps)}")
    if DISTILLERS[args.distiller].needs_teacher and not args.teacher:
        raise UsageError(f"--distiller {args.distiller} needs --teacher (a timm model name); "
                         "use --distiller vanilla to train without a teacher")
    if args.teacher_checkpoint and not args.teacher:
        raise UsageError("--teacher-checkpoint needs --teacher (the timm model name the weights belong to)")
    if args.teacher_cache and not DISTILLERS[args.distiller].reads_teacher_logits_only:
        raise UsageError(f"--teacher-cache: --distiller {args.distiller} reads the teacher's features or runs "
                         "without a teacher, so it needs the live teacher; drop --teacher-cache (a cache serves ofa, "
                         "kd and the logit baselines bkd, dkd, dist)")
    if args.amp and args.amp_dtype == "float16" and resolve_device(args.device).type != "cuda":
        raise UsageError("--amp-dtype float16: expected a CUDA device (float16 autocast with a GradScaler runs on "
                         "GPUs only); use --amp-dtype bfloat16 on CPU")
    if mixing_active(args) and args.batch_size % 2:
        raise UsageError(f"--batch-size {args.batch_size}: expected an even batch size with --mixup/--cutmix "
                         "(timm's Mixup mixes a batch with its reverse)")
    if args.scale[0] > args.scale[1] or args.ratio[0] > args.ratio[1]:
        raise UsageError("--scale/--ratio: expected MIN <= MAX")
    if args.sched == "multistep" and sorted(args.decay_milestones) != list(args.decay_milestones):
        raise UsageError(f"--decay-milestones: expected increasing epochs, got {args.decay_milestones}")
    _check_augmentation_args(args)
    if args.bce_target_thresh is not None and not args.bce_loss:
        raise UsageError("--bce-target-thresh: acts only with --bce-loss (it binarizes the BCE targets)")
    if args.dataset in ("imagefolder", "cifar100") and not args.data_dir:
        raise UsageError(f"--dataset {args.dataset}: expected --data-dir (the dataset folder); "
                         "only mnist (embedded) and synthetic need none")
    import timm

    for flag, name in (("--model", args.model), ("--teacher", args.teacher)):
        if name and not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:6]
            raise UsageError(f"{flag}: unknown timm model {name!r}" +
                             (f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"))


def _check_augmentation_args(args: argparse.Namespace) -> None:
    """Augmentation flags that could not act: a :class:`UsageError` saying why."""
    if args.interpolation == "random":
        raise UsageError("--interpolation random: evaluation needs one fixed interpolation; use "
                         "--train-interpolation random for training (and --interpolation bilinear or bicubic)")
    if args.remode != "const" and not args.reprob:
        raise UsageError(f"--remode {args.remode}: acts only with random erasing; give --reprob > 0")
    if args.dataset == "synthetic":
        given = [flag for flag, value in (("--aa", args.aa), ("--reprob", args.reprob), ("--crop-pct", args.crop_pct),
                                          ("--hflip", args.hflip), ("--train-interpolation", args.train_interpolation))
                 if value]
        if given:
            raise UsageError(f"{', '.join(given)}: --dataset synthetic is not augmented (its images are random "
                             "tensors); drop the flag or use a real dataset")
    if args.aa:
        from timm.data import create_transform

        try:  # timm parses the policy when building the transform
            create_transform(32, is_training=True, auto_augment=args.aa)
        except Exception as error:  # AssertionError, KeyError, ValueError: from inside timm's parser
            raise UsageError(f"--aa {args.aa}: not a timm auto-augment policy ({type(error).__name__}: {error}); "
                             "expected e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, 3a") from None


def _merge_positional_data_dir(args: argparse.Namespace, argv) -> None:
    """The original train.py's positional DIR is --data-dir; both on the command line must agree."""
    positional = args.__dict__.pop("data_dir_positional", None)
    if positional is None:
        return
    given = list(argv if argv is not None else sys.argv[1:])
    if any(a == "--data-dir" or a.startswith("--data-dir=") for a in given) and args.data_dir != positional:
        raise UsageError(f"DIR {positional} and --data-dir {args.data_dir}: give the dataset folder once")
    args.data_dir = positional


def parse_args(argv=None) -> argparse.Namespace:
    """Flags over preset over defaults. Bad values exit with status 2 and a message naming the flag."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", "-c", default=None)
    pre, _ = config_parser.parse_known_args(argv)
    try:
        if pre.config:
            parser.set_defaults(**preset_defaults(parser, resolve_preset(pre.config)))
        args = parser.parse_args(argv)
        _merge_positional_data_dir(args, argv)
        check_args(args)
    except UsageError as error:
        parser.error(str(error))
    return args


@exit_on_user_error("ofakd-train")
def main(argv=None):
    from .loop import train

    train(parse_args(argv))


if __name__ == "__main__":
    main()

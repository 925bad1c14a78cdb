"""ofakd-train: distill a timm teacher into a timm student with OFA-KD, KD, or no distillation.

    ofakd-train --config imagenet_cnn --data-dir /data/imagenet --model resnet18 \\
        --teacher deit_tiny_patch16_224 --teacher-checkpoint deit_t.pth --output runs/r18_deit
    torchrun --nproc_per_node=8 -m ofakd_fast.train --config imagenet_vit ...
    ofakd-train --dataset synthetic --model resnet50 --teacher resnet101 --amp --channels-last  # throughput

A preset (``--config NAME`` from ofakd_fast/configs/, or a YAML path) sets defaults; every flag
given on the command line overrides it. The run directory (``--output``) gets the resolved
``config.yaml``, ``summary.csv`` (one row per epoch), ``log.txt`` and the checkpoints ``last.pth``
and ``best.pth``; ``--resume RUN_DIR_or_FILE`` continues where a run stopped, mid-epoch included.
Under torchrun the distiller (student + projectors; the teacher is not a registered submodule) is
wrapped once in DistributedDataParallel, on nccl with GPUs and gloo on CPUs; rank 0 logs and saves.
"""
import argparse
import ast
import csv
import datetime
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import yaml
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, load_weights, rng_state, save_checkpoint, set_rng_state
from .data import DATASETS, CorruptImageError, build_datasets, build_loader, dataset_info

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DISTILLER_NAMES = ("ofa", "kd", "vanilla")
OPTIMIZERS = ("sgd", "momentum", "adamw", "adam")  # timm names: 'sgd' is SGD with Nesterov momentum
SCHEDULERS = ("step", "multistep", "cosine", "constant")
LOSS_KEYS = ("loss_gt", "loss_kd", "loss_ofa")
SUMMARY_FIELDS = ("epoch", "lr", "train_loss", "train_loss_gt", "train_loss_kd", "train_loss_ofa", "eval_loss",
                  "eval_top1", "eval_top5", "ema_top1", "ema_top5", "img_per_sec", "epoch_seconds")


class UsageError(ValueError):
    """A bad flag or preset value; the message says which, what was wrong and what was expected."""


# ---------------------------------------------------------------------------------------------- flag types

def _number(kind, name, low=None, high=None, low_open=False, high_open=False, expected=None):
    """An argparse type: `kind` (int or float) within [low, high] (open ends as flagged); clear messages."""
    if expected is not None:
        pass
    elif low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        expected = {(0, True): "a positive number", (0, False): "a number >= 0",
                    (1, False): "a number >= 1"}.get((low, low_open), f"a number {'>' if low_open else '>='} {low}")
    else:
        expected = "a number"
    if kind is int and expected.startswith("a number"):
        expected = expected.replace("a number", "an integer")

    def convert(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if low is not None and (value < low or (low_open and value == low)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if high is not None and (value > high or (high_open and value == high)):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    convert.__name__ = name  # argparse names the type in its messages
    return convert


positive_int = _number(int, "positive integer", 1, expected="a positive integer")
nonneg_int = _number(int, "integer >= 0", 0)
positive_float = _number(float, "positive number", 0, low_open=True)
nonneg_float = _number(float, "number >= 0", 0)
probability = _number(float, "probability", 0, 1)
smoothing_value = _number(float, "smoothing", 0, 1, high_open=True)
ema_decay = _number(float, "decay", 0, 1, low_open=True, high_open=True)
stage_value = _number(int, "stage", 1, 4)


def kwargs_pair(text):
    """``key=value`` with a Python literal value (``img_size=28``, ``depths=(2,2)``) or a plain string."""
    if isinstance(text, dict):
        return text
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return {key.strip().replace("-", "_"): value}


class MergeKwargs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        merged = {}
        for pair in values:
            merged.update(pair)
        setattr(namespace, self.dest, merged)


# ---------------------------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ofakd-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", "-c", default=None, metavar="NAME_or_PATH",
        help=f"YAML preset: a name from {CONFIG_DIR} ({', '.join(list_presets())}) or a file path")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    g.add_argument("--data-dir", default=None, help="imagefolder: the folder with train/ and val/; cifar100: the "
                   "folder with cifar-100-python/; mnist: optional folder with the IDX files")
    g.add_argument("--img-size", type=positive_int, default=224)
    g.add_argument("--in-chans", type=positive_int, default=None, help="image channels (default: the dataset's)")
    g.add_argument("--num-classes", type=positive_int, default=None, help="classes (default: the dataset's)")
    g.add_argument("--train-subset", type=nonneg_int, default=0,
                   help="train on this many images (class-balanced for cifar100/mnist); 0 = all")
    g.add_argument("--subset-seed", type=int, default=0)
    g.add_argument("--batch-size", "-b", type=positive_int, default=128, help="per process")
    g.add_argument("--eval-batch-size", type=positive_int, default=None, help="per process (default: 2x batch size)")
    g.add_argument("--workers", "-j", type=nonneg_int, default=4)
    g.add_argument("--scale", type=probability, nargs=2, default=[0.08, 1.0], metavar=("MIN", "MAX"),
                   help="imagefolder: random-resized-crop area range")
    g.add_argument("--ratio", type=positive_float, nargs=2, default=[3 / 4, 4 / 3], metavar=("MIN", "MAX"))
    g.add_argument("--hflip", type=probability, default=0.5)
    g.add_argument("--color-jitter", type=nonneg_float, default=0.4)
    g.add_argument("--aa", default=None, help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1")
    g.add_argument("--reprob", type=probability, default=0.0, help="random-erasing probability")
    g.add_argument("--crop-pct", type=_number(float, "crop fraction", 0, 1, low_open=True), default=None)
    g.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic", "nearest", "random"))
    g.add_argument("--mixup", type=nonneg_float, default=0.0, help="mixup alpha (0 = off)")
    g.add_argument("--cutmix", type=nonneg_float, default=0.0, help="cutmix alpha (0 = off)")
    g.add_argument("--mixup-prob", type=probability, default=1.0)
    g.add_argument("--mixup-switch-prob", type=probability, default=0.5)
    g.add_argument("--smoothing", type=smoothing_value, default=0.0, help="label smoothing")

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
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm in the student under DDP")

    g = parser.add_argument_group("distillation")
    g.add_argument("--distiller", default="ofa", choices=DISTILLER_NAMES)
    g.add_argument("--ofa-eps", type=positive_float, nargs="+", default=[1.0],
                   help="OFA exponent: one value, or one per stage plus one for the logits")
    g.add_argument("--ofa-stages", type=stage_value, nargs="+", default=[1, 2, 3, 4])
    g.add_argument("--ofa-temperature", type=positive_float, default=1.0)
    g.add_argument("--kd-temperature", type=positive_float, default=1.0, help="temperature of --distiller kd")
    g.add_argument("--gt-loss-weight", type=nonneg_float, default=1.0)
    g.add_argument("--kd-loss-weight", type=nonneg_float, default=1.0)
    g.add_argument("--ofa-loss-weight", type=nonneg_float, default=1.0)

    g = parser.add_argument_group("optimization")
    g.add_argument("--epochs", type=positive_int, default=100)
    g.add_argument("--opt", default="sgd", choices=OPTIMIZERS,
                   help="timm optimizer: sgd (Nesterov momentum), momentum (plain momentum), adamw, adam")
    g.add_argument("--lr", type=positive_float, default=0.1)
    g.add_argument("--momentum", type=_number(float, "momentum", 0, 1, high_open=True), default=0.9)
    g.add_argument("--weight-decay", type=nonneg_float, default=1e-4)
    g.add_argument("--clip-grad", type=positive_float, default=None, help="clip the gradient norm to this")
    g.add_argument("--sched", default="step", choices=SCHEDULERS)
    g.add_argument("--decay-epochs", type=positive_float, default=30, help="step: decay every this many epochs")
    g.add_argument("--decay-milestones", type=positive_int, nargs="+", default=[30, 60, 90])
    g.add_argument("--decay-rate", type=positive_float, default=0.1)
    g.add_argument("--warmup-epochs", type=nonneg_int, default=0)
    g.add_argument("--warmup-lr", type=nonneg_float, default=1e-5)
    g.add_argument("--min-lr", type=nonneg_float, default=0.0)
    g.add_argument("--sched-on-updates", action="store_true", help="update the lr every step, not every epoch")
    g.add_argument("--model-ema", action="store_true", help="keep an EMA of the student (timm ModelEmaV3)")
    g.add_argument("--model-ema-decay", type=ema_decay, default=0.9998)
    g.add_argument("--model-ema-warmup", action="store_true")

    g = parser.add_argument_group("speed")
    g.add_argument("--amp", action="store_true", help="mixed precision (torch.autocast)")
    g.add_argument("--amp-dtype", default="bfloat16", choices=("bfloat16", "float16"),
                   help="float16 (with a GradScaler) needs CUDA")
    g.add_argument("--channels-last", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the distiller")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    g.add_argument("--threads", type=nonneg_int, default=0,
                   help="torch intra-op CPU threads (0 = torch's default); 1 is faster on a busy machine")

    g = parser.add_argument_group("run")
    g.add_argument("--output", default=None, help="run directory (default: runs/<time>-<distiller>-<model>, or "
                   "the resumed checkpoint's directory)")
    g.add_argument("--resume", default=None, help="checkpoint file or run directory (its last.pth) to continue")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--log-interval", type=positive_int, default=50, help="progress line every N steps")
    g.add_argument("--eval-interval", type=nonneg_int, default=1, help="evaluate every N epochs (0 = last only)")
    g.add_argument("--checkpoint-interval", type=nonneg_int, default=0,
                   help="also save last.pth every N steps inside an epoch (0 = at epoch ends only)")
    g.add_argument("--steps-per-epoch", type=nonneg_int, default=0, help="cap the steps of each epoch (0 = all)")
    g.add_argument("--stop-after-steps", type=nonneg_int, default=0,
                   help="stop after this many steps in total, saving last.pth, as an interrupted run would")
    g.add_argument("--quiet", action="store_true", help="no progress lines, only epoch summaries")
    return parser


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


def preset_defaults(parser: argparse.ArgumentParser, path: Path) -> dict:
    """The preset's values, each checked and converted like the flag it stands for."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"--config {path}: not valid YAML: {error}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values, got a {type(data).__name__}")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in data.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in actions:
            raise UsageError(f"--config {path}: unknown key {key!r}; expected flag names such as "
                             f"{', '.join(sorted(actions)[:8])}, ... (see ofakd-train --help)")
        out[dest] = _preset_value(actions[dest], value, f"--config {path}: key {key!r}")
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
    items = list(value) if isinstance(value, (list, tuple)) else [value]
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
    if args.distiller in ("ofa", "kd") and not args.teacher:
        raise UsageError(f"--distiller {args.distiller} needs --teacher (a timm model name); "
                         "use --distiller vanilla to train without a teacher")
    if args.teacher_checkpoint and not args.teacher:
        raise UsageError("--teacher-checkpoint needs --teacher (the timm model name the weights belong to)")
    if args.amp and args.amp_dtype == "float16" and resolve_device(args.device).type != "cuda":
        raise UsageError("--amp-dtype float16: expected a CUDA device (float16 autocast with a GradScaler runs on "
                         "GPUs only); use --amp-dtype bfloat16 on CPU")
    if (args.mixup > 0 or args.cutmix > 0) and args.batch_size % 2:
        raise UsageError(f"--batch-size {args.batch_size}: expected an even batch size with --mixup/--cutmix "
                         "(timm's Mixup mixes a batch with its reverse)")
    if args.scale[0] > args.scale[1] or args.ratio[0] > args.ratio[1]:
        raise UsageError("--scale/--ratio: expected MIN <= MAX")
    if args.sched == "multistep" and sorted(args.decay_milestones) != list(args.decay_milestones):
        raise UsageError(f"--decay-milestones: expected increasing epochs, got {args.decay_milestones}")
    if args.dataset in ("imagefolder", "cifar100") and not args.data_dir:
        raise UsageError(f"--dataset {args.dataset}: expected --data-dir (the dataset folder); "
                         "only mnist (embedded) and synthetic need none")
    import timm

    for flag, name in (("--model", args.model), ("--teacher", args.teacher)):
        if name and not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:6]
            raise UsageError(f"{flag}: unknown timm model {name!r}" +
                             (f"; similar names: {', '.join(close)}" if close else "; see timm.list_models()"))


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
        check_args(args)
    except UsageError as error:
        parser.error(str(error))
    return args


# ---------------------------------------------------------------------------------------------- runtime

def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: expected a CUDA device, none is available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Distributed:
    """Rank, world size and device, from torchrun's environment (a single process without it)."""

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = resolve_device(device_name)
        if device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        self.device = device
        self.enabled = self.world_size > 1
        self.owns_group = False
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, values):
        """Elementwise sum over ranks of a list of floats."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


class Logger:
    """Prints on rank 0 and appends to the run's log.txt."""

    def __init__(self, main: bool, path: Optional[Path]):
        self.main, self.path = main, path

    def __call__(self, message: str):
        if not self.main:
            return
        print(message, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(message + "\n")


def create_model(name: str, kwargs: dict, num_classes: int, in_chans: int, img_size: int, flag: str, **extra):
    """timm.create_model(pretrained=False); img_size is passed to models that take it, unless given in kwargs."""
    import timm

    options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans,
               **{k: v for k, v in extra.items() if v is not None}, **kwargs}
    if "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=img_size, **options)
        except TypeError as error:
            if "img_size" not in str(error):
                raise UsageError(f"{flag} {name}: timm.create_model failed with {options}: {error}") from None
    try:
        return timm.create_model(name, **options)
    except (TypeError, ValueError, AssertionError) as error:
        raise UsageError(f"{flag} {name}: timm.create_model failed with {options}: {error}") from None


def build_distiller_from_args(args, student: nn.Module, teacher: Optional[nn.Module], input_size, mixup_active: bool):
    from .distiller import build_distiller

    weights = {"gt": args.gt_loss_weight, "kd": args.kd_loss_weight, "ofa": args.ofa_loss_weight}
    common = {"label_smoothing": 0.0 if mixup_active else args.smoothing}
    if args.distiller == "vanilla":
        return build_distiller("vanilla", student, None, loss_weights={"gt": weights["gt"]}, **common)
    if args.distiller == "kd":
        return build_distiller("kd", student, teacher, temperature=args.kd_temperature,
                               loss_weights={"gt": weights["gt"], "kd": weights["kd"]}, **common)
    eps = args.ofa_eps[0] if len(args.ofa_eps) == 1 else list(args.ofa_eps)
    try:
        return build_distiller("ofa", student, teacher, stages=tuple(args.ofa_stages), eps=eps,
                               temperature=args.ofa_temperature, input_size=input_size, loss_weights=weights, **common)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--distiller ofa with --model {args.model}: {error}") from None


def param_groups(distiller: nn.Module, weight_decay: float):
    """No weight decay on biases, norms (1-d parameters) and the student's no_weight_decay() names."""
    skip = set()
    student = distiller.student
    if hasattr(student, "no_weight_decay"):
        skip = {f"student.{name}" for name in student.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in distiller.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.endswith(".bias") or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, topk=(1, 5)):
    k = min(max(topk), logits.shape[1])
    pred = logits.topk(k, dim=1).indices
    hits = pred.eq(target[:, None])
    return [hits[:, :min(t, k)].any(dim=1).sum().item() for t in topk]


@torch.no_grad()
def evaluate(model: nn.Module, loader, device, amp_ctx, channels_last: bool, ddp: Distributed) -> Dict[str, float]:
    """Top-1, top-5 (in %) and cross-entropy of `model` over the whole loader, summed over ranks."""
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, count = 0.0, 0.0, 0.0, 0.0
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_ctx():
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        c1, c5 = accuracy_counts(logits, target)
        top1, top5, count = top1 + c1, top5 + c5, count + len(target)
    model.train(was_training)
    loss_sum, top1, top5, count = ddp.all_sum([loss_sum, top1, top5, count])
    count = max(count, 1)
    return {"loss": loss_sum / count, "top1": 100.0 * top1 / count, "top5": 100.0 * top5 / count}


def default_run_dir(args) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{args.distiller}-{args.model}"


def plain(value):
    """Namespace values as YAML-friendly plain types."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def trim_summary(path: Path, last_epoch: int) -> None:
    """Keeps the summary rows of the epochs a resumed checkpoint has completed."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("epoch") and int(row["epoch"]) <= last_epoch]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def append_summary(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_FIELDS})


# ---------------------------------------------------------------------------------------------- training

def train(args: argparse.Namespace) -> dict:
    """Runs a training job described by parsed `args`; returns its final metrics (on every rank)."""
    from timm.data import Mixup
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3

    from .distiller import total_loss

    job_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    ddp = Distributed(args.device)
    device = ddp.device
    try:
        resume_state = load_checkpoint(args.resume, "--resume") if args.resume else None
        if args.output:
            run_dir = Path(args.output)
        elif args.resume:
            run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        else:
            run_dir = default_run_dir(args)
        if ddp.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with open(run_dir / "config.yaml", "w") as f:
                yaml.safe_dump({k: plain(v) for k, v in sorted(vars(args).items())}, f, sort_keys=False)
        log = Logger(ddp.main, run_dir / "log.txt")

        torch.manual_seed(args.seed)  # the same initial weights on every rank
        info = dataset_info(args)
        input_size = (info.in_chans, args.img_size, args.img_size)
        student = create_model(args.model, args.model_kwargs, info.num_classes, info.in_chans, args.img_size,
                               "--model", drop_rate=args.drop or None, drop_path_rate=args.drop_path)
        if args.initial_checkpoint:
            load_weights(student, args.initial_checkpoint, "--initial-checkpoint", "student")
        teacher = None
        if args.teacher and args.distiller != "vanilla":
            teacher = create_model(args.teacher, args.teacher_kwargs, info.num_classes, info.in_chans, args.img_size,
                                   "--teacher")
            if args.teacher_checkpoint:
                load_weights(teacher, args.teacher_checkpoint, "--teacher-checkpoint", "teacher", prefer_ema=True)
            else:
                log(f"warning: --teacher {args.teacher} has random weights (no --teacher-checkpoint): "
                    "fine for throughput runs, useless for distillation")
        train_set, eval_set = build_datasets(args, info)
        pin = device.type == "cuda"
        train_loader = build_loader(train_set, args.batch_size, True, args.workers, args.seed, ddp.rank,
                                    ddp.world_size, pin)
        eval_loader = build_loader(eval_set, args.eval_batch_size or 2 * args.batch_size, False, args.workers,
                                   args.seed, ddp.rank, ddp.world_size, pin)
        steps_per_epoch = train_loader.sampler.batches_per_epoch()
        if args.steps_per_epoch:
            steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)

        mixup_active = args.mixup > 0 or args.cutmix > 0
        distiller = build_distiller_from_args(args, student, teacher, input_size, mixup_active)
        if args.sync_bn and ddp.enabled:
            distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
        distiller.to(device)
        if args.channels_last:
            distiller.to(memory_format=torch.channels_last)  # the teacher follows (BaseDistiller._apply)

        optimizer = create_optimizer_v2(param_groups(distiller, args.weight_decay), opt=args.opt, lr=args.lr,
                                        weight_decay=args.weight_decay, momentum=args.momentum)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            decay_milestones=list(args.decay_milestones), decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, step_on_epochs=not args.sched_on_updates,
            updates_per_epoch=steps_per_epoch)
        amp_dtype = torch.bfloat16 if args.amp_dtype == "bfloat16" else torch.float16
        use_scaler = args.amp and amp_dtype == torch.float16
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None

        def amp_ctx():
            return torch.autocast(device.type, dtype=amp_dtype) if args.amp else nullcontext()

        ema = ModelEmaV3(distiller.student, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup) \
            if args.model_ema else None
        mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                      switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                      num_classes=info.num_classes) if mixup_active else None

        start_epoch, start_step, global_step = 0, 0, 0
        best = {"metric": None, "epoch": None}
        partial = None
        if resume_state is not None:
            distiller.student.load_state_dict(resume_state["model"])
            if "projectors" in resume_state and hasattr(distiller, "projectors"):
                distiller.projectors.load_state_dict(resume_state["projectors"])
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
            if scaler is not None and resume_state.get("scaler"):
                scaler.load_state_dict(resume_state["scaler"])
            if ema is not None and resume_state.get("model_ema"):
                ema.module.load_state_dict(resume_state["model_ema"])
            start_epoch, start_step = resume_state["epoch"], resume_state["step_in_epoch"]
            global_step = resume_state["global_step"]
            best = {"metric": resume_state.get("best_metric"), "epoch": resume_state.get("best_epoch")}
            partial = resume_state.get("partial_epoch")
            if ddp.main:
                trim_summary(run_dir / "summary.csv", start_epoch)
            log(f"resumed from {args.resume}: epoch {start_epoch}, step {start_step} of {steps_per_epoch}")

        model = distiller
        if ddp.enabled:
            model = nn.parallel.DistributedDataParallel(
                distiller, device_ids=[device.index] if device.type == "cuda" else None)
        if args.compile:
            model = torch.compile(model)

        # Per-rank RNG streams for dropout, drop-path and mixup, continued exactly on resume.
        saved_rng = (resume_state or {}).get("rng")
        if saved_rng and len(saved_rng) == ddp.world_size:
            set_rng_state(saved_rng[ddp.rank])
        else:
            if saved_rng:
                log(f"warning: the checkpoint holds RNG states of {len(saved_rng)} processes, this run has "
                    f"{ddp.world_size}; reseeding")
            import random

            import numpy as np

            seed = args.seed + ddp.rank + 1000 * start_epoch
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)

        num_params = sum(p.numel() for p in distiller.parameters())
        log(f"run dir {run_dir} | {ddp.world_size} process(es) on {device} | {args.distiller}: student "
            f"{args.model}, teacher {args.teacher if teacher is not None else '-'} | {num_params / 1e6:.2f}M trainable "
            f"| train {len(train_set)} images, eval {len(eval_set)} | {steps_per_epoch} steps/epoch of "
            f"{args.batch_size} x {ddp.world_size}")

        total_steps = args.epochs * steps_per_epoch
        images_per_step = args.batch_size * ddp.world_size
        run_steps, run_train_seconds = 0, 0.0
        last_eval: Dict[str, float] = {}
        stopped = False

        def checkpoint_state(epoch_done: int, step_in_epoch: int, metrics: dict, partial_epoch=None):
            state = {"model": distiller.student.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                     "model_ema": ema.module.state_dict() if ema is not None else None,
                     "epoch": epoch_done, "step_in_epoch": step_in_epoch, "global_step": global_step,
                     "best_metric": best["metric"], "best_epoch": best["epoch"], "metrics": metrics,
                     "partial_epoch": partial_epoch, "arch": args.model,
                     "args": {k: plain(v) for k, v in vars(args).items()}}
            if hasattr(distiller, "projectors"):
                state["projectors"] = distiller.projectors.state_dict()
            return state

        def save(name: str, state: dict, rngs):
            if ddp.main:
                state["rng"] = rngs
                save_checkpoint(state, run_dir / name)

        for epoch in range(start_epoch, args.epochs):
            skip = start_step if epoch == start_epoch else 0
            if skip >= steps_per_epoch:
                continue
            train_loader.sampler.set_epoch(epoch, skip)
            scheduler.step(epoch)
            scheduler.step_update(global_step)
            model.train()
            sums = torch.zeros(len(LOSS_KEYS) + 1, dtype=torch.float64, device=device)
            if partial is not None and epoch == start_epoch:
                sums += torch.tensor(partial["sums"], dtype=torch.float64, device=device)
                steps_in_sums = partial["steps"]
            else:
                steps_in_sums = 0
            partial = None
            epoch_start = time.perf_counter()
            epoch_images = 0
            step = skip
            for images, target in train_loader:
                if step >= steps_per_epoch:
                    break
                images = images.to(device, non_blocking=True)
                target = target.to(device, non_blocking=True)
                if args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if mixup is not None:
                    images, target = mixup(images, target)
                with amp_ctx():
                    _, losses = model(images, target)
                loss = total_loss(losses)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    if args.clip_grad:
                        scaler.unscale_(optimizer)
                        nn.utils.clip_grad_norm_(distiller.parameters(), args.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    if args.clip_grad:
                        nn.utils.clip_grad_norm_(distiller.parameters(), args.clip_grad)
                    optimizer.step()
                global_step += 1
                step += 1
                if ema is not None:
                    ema.update(distiller.student, step=global_step)
                scheduler.step_update(global_step)
                with torch.no_grad():
                    sums += torch.stack([loss.detach().double()] + [
                        losses[k].detach().double() if k in losses else torch.zeros((), dtype=torch.float64,
                                                                                      device=device)
                        for k in LOSS_KEYS])
                steps_in_sums += 1
                epoch_images += images_per_step
                run_steps += 1

                if step % args.log_interval == 0 or step == steps_per_epoch:
                    mean = (sums / steps_in_sums).tolist()
                    if not math.isfinite(mean[0]):
                        raise FloatingPointError(f"epoch {epoch + 1} step {step}: the loss is {mean[0]}; lower "
                                                 "--lr, use --clip-grad, or check the data and teacher")
                    if not args.quiet:
                        elapsed = run_train_seconds + time.perf_counter() - epoch_start
                        rate = run_steps * images_per_step / max(elapsed, 1e-9)
                        remaining = (total_steps - global_step) * elapsed / max(run_steps, 1)
                        parts = " ".join(f"{k[5:]} {v:.4f}" for k, v in zip(LOSS_KEYS, mean[1:]) if k in losses)
                        log(f"epoch {epoch + 1}/{args.epochs} step {step}/{steps_per_epoch} loss {mean[0]:.4f} "
                            f"({parts}) lr {optimizer.param_groups[0]['lr']:.3g} {rate:.1f} img/s "
                            f"eta {format_seconds(remaining)}")
                stop_now = args.stop_after_steps and global_step >= args.stop_after_steps
                periodic = args.checkpoint_interval and global_step % args.checkpoint_interval == 0
                if (stop_now or periodic) and step < steps_per_epoch:
                    rngs = ddp.gather(rng_state())
                    save("last.pth", checkpoint_state(epoch, step, last_eval,
                                                      {"sums": sums.tolist(), "steps": steps_in_sums}), rngs)
                if stop_now:
                    stopped = True
                    break
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - epoch_start
            run_train_seconds += epoch_seconds
            if stopped and step < steps_per_epoch:
                log(f"stopped after step {global_step} (--stop-after-steps); resume with --resume {run_dir}")
                break

            means = [v / max(steps_in_sums, 1) for v in ddp.all_sum((sums).tolist())]
            means = [v / ddp.world_size for v in means]
            epoch_done = epoch + 1
            do_eval = epoch_done == args.epochs or (args.eval_interval and epoch_done % args.eval_interval == 0) \
                or stopped
            row = {"epoch": epoch_done, "lr": f"{optimizer.param_groups[0]['lr']:.6g}",
                   "train_loss": f"{means[0]:.6f}",
                   "img_per_sec": f"{epoch_images / max(epoch_seconds, 1e-9):.1f}",
                   "epoch_seconds": f"{epoch_seconds:.2f}"}
            for key, value in zip(LOSS_KEYS, means[1:]):
                row[f"train_{key}"] = f"{value:.6f}" if key in losses else None
            message = f"epoch {epoch_done}/{args.epochs} train loss {means[0]:.4f}"
            if do_eval:
                last_eval = evaluate(distiller.student, eval_loader, device, amp_ctx, args.channels_last, ddp)
                row.update(eval_loss=f"{last_eval['loss']:.6f}", eval_top1=f"{last_eval['top1']:.3f}",
                           eval_top5=f"{last_eval['top5']:.3f}")
                message += f" | eval top-1 {last_eval['top1']:.2f} top-5 {last_eval['top5']:.2f}"
                metric = last_eval["top1"]
                if ema is not None:
                    ema_eval = evaluate(ema.module, eval_loader, device, amp_ctx, args.channels_last, ddp)
                    last_eval.update(ema_top1=ema_eval["top1"], ema_top5=ema_eval["top5"])
                    row.update(ema_top1=f"{ema_eval['top1']:.3f}", ema_top5=f"{ema_eval['top5']:.3f}")
                    message += f" | ema top-1 {ema_eval['top1']:.2f}"
                    metric = ema_eval["top1"]  # as timm: the EMA's accuracy picks the best checkpoint
            message += f" | {row['img_per_sec']} img/s | {epoch_seconds:.1f} s"
            log(message)
            if ddp.main:
                append_summary(run_dir / "summary.csv", row)
            improved = do_eval and (best["metric"] is None or metric > best["metric"])
            if improved:
                best = {"metric": metric, "epoch": epoch_done}
            rngs = ddp.gather(rng_state())
            state = checkpoint_state(epoch_done, 0, dict(last_eval))
            save("last.pth", state, rngs)
            if improved:
                save("best.pth", state, rngs)
            if stopped:
                log(f"stopped after step {global_step} (--stop-after-steps); resume with --resume {run_dir}")
                break

        result = {"run_dir": str(run_dir), "epochs_done": min(global_step // max(steps_per_epoch, 1), args.epochs),
                  "global_step": global_step, "stopped": stopped, "best_top1": best["metric"],
                  "best_epoch": best["epoch"], **{f"final_{k}": v for k, v in last_eval.items()},
                  "train_seconds": run_train_seconds, "train_images": run_steps * images_per_step,
                  "img_per_sec": run_steps * images_per_step / max(run_train_seconds, 1e-9),
                  "wall_seconds": time.perf_counter() - job_start, "distiller": distiller}
        log(f"done: {result['train_images']} training images in {format_seconds(run_train_seconds)} "
            f"= {result['img_per_sec']:.1f} img/s over {ddp.world_size} process(es); wall time "
            f"{result['wall_seconds']:.1f} s; best top-1 {best['metric'] if best['metric'] is not None else '-'} "
            f"(epoch {best['epoch']})")
        return result
    finally:
        ddp.close()


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, CheckpointError, FileNotFoundError, CorruptImageError, ValueError) as error:
        print(f"ofakd-train: error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

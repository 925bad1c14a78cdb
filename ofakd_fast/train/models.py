"""The models of a run: timm's student and teacher, and the distiller built from the flags."""
import argparse
import inspect
from typing import Callable, Optional

from torch import nn

from ..distill import DISTILLERS, BaseDistiller, build_distiller
from ..distill.base import set_teacher_input_normalization
from .checkpoint import load_weights, read_state_dict
from .criteria import gt_criterion_from_args
from .errors import UsageError


def create_model(name: str, kwargs: dict, num_classes: int, in_chans: int, img_size: int, flag: str,
                 pretrained: bool = False, pretrained_cfg_overlay: Optional[dict] = None,
                 hint: Optional[str] = None, **extra):
    """timm.create_model (pretrained=False unless asked); img_size is passed to models that take it, unless
    given in kwargs. Any failure inside timm (bad model kwargs, weights that do not fit, no network for
    timm's weights) is a :class:`UsageError` naming the flag; `hint` says what to check (default its kwargs)."""
    import timm

    options = {"pretrained": pretrained, "num_classes": num_classes, "in_chans": in_chans,
               **{k: v for k, v in extra.items() if v is not None}, **kwargs}
    overlay = {} if pretrained_cfg_overlay is None else {"pretrained_cfg_overlay": pretrained_cfg_overlay}
    attempts = [options] if "img_size" in kwargs else [{**options, "img_size": img_size}, options]
    for attempt in attempts:
        try:
            model = timm.create_model(name, **attempt, **overlay)
        except Exception as error:  # bad kwargs fail anywhere inside timm's constructors
            if isinstance(error, TypeError) and "img_size" in str(error) and attempt is not attempts[-1]:
                continue  # a model that takes no img_size
            raise UsageError(f"{flag} {name}: timm.create_model failed with {options} ({type(error).__name__}: "
                             f"{error}); check {hint or flag + '-kwargs'}") from None
        for attribute in ("pretrained_cfg", "default_cfg"):  # timm keeps an overlaid state_dict there: a 2nd copy
            cfg = getattr(model, attribute, None)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)
        return model


def distiller_from_args(args: argparse.Namespace, student: nn.Module, teacher: Optional[nn.Module],
                        input_size, mixup_active: bool, num_data: int) -> BaseDistiller:
    """The distiller of ``--distiller`` with its hyper-parameter and loss-weight flags; soft mixup labels
    come smoothed already, so label smoothing applies to hard labels only. Constructors that ask for
    them get the training resolution (`input_size`) and the training-set size (`num_data`: CRD's memory)."""
    cls = DISTILLERS[args.distiller]
    kwargs = {hp.argument: getattr(args, hp.flag[2:].replace("-", "_")) for hp in cls.hyper_parameters}
    weights = {key: getattr(args, f"{key}_loss_weight") for key in cls.default_loss_weights}
    kwargs["loss_weights"] = {key: value for key, value in weights.items() if value is not None}
    kwargs["label_smoothing"] = 0.0 if mixup_active else args.smoothing
    kwargs["gt_criterion"] = gt_criterion_from_args(args, mixup_active)  # None: cross-entropy; --bce-loss: BCE
    wanted = inspect.signature(cls.__init__).parameters
    kwargs.update({name: value for name, value in (("input_size", input_size), ("num_data", num_data))
                   if name in wanted})
    if args.distiller == "ofa":
        kwargs.update(stages=tuple(args.ofa_stages), eps=args.ofa_eps[0] if len(args.ofa_eps) == 1 else list(args.ofa_eps))
    if args.distiller == "fitnet":
        kwargs["stages"] = tuple(args.fitnet_stages)
    try:
        return build_distiller(args.distiller, student, teacher if cls.needs_teacher else None, **kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--distiller {args.distiller} with --model {args.model}: {error}") from None


HUB_WEIGHTS = "timm"  # --teacher-pretrained timm: timm's own released weights of --teacher (pretrained=True)


def build_teacher(args: argparse.Namespace, info, log: Callable[[str], None]) -> nn.Module:
    """The teacher of ``--teacher`` with its weights, mirroring Hao840/OFAKD train.py:
    ``--teacher-pretrained PATH`` is a checkpoint file, loaded with its non-EMA
    weights unless ``--use-ema-teacher`` (its ``load_checkpoint(teacher, path, use_ema=...)``);
    here through timm's pretrained path (``pretrained_cfg_overlay``, the head kept at the dataset's
    classes as timm's DistillationTeacher does), or ``timm`` for timm's released weights; empty: none.
    ``--teacher-checkpoint`` (this trainer's weights) loads strictly with the same EMA choice. Weights
    from ``--teacher-pretrained`` were trained with the statistics of their pretrained config: the
    teacher's input is renormalized to them where they differ from the dataset's."""
    pretrained = getattr(args, "teacher_pretrained", "") or ""
    use_ema = bool(getattr(args, "use_ema_teacher", False))
    if pretrained and args.teacher_checkpoint:
        raise UsageError("--teacher-pretrained and --teacher-checkpoint both give the teacher's weights: pass one")
    overlay, hint = None, None
    if pretrained and pretrained != HUB_WEIGHTS:
        # timm's CheckpointSaver files (the original's) load too: timm allows their argparse.Namespace args
        state = read_state_dict(pretrained, "--teacher-pretrained", prefer_ema=use_ema)
        overlay = dict(file=str(pretrained), state_dict=state, num_classes=info.num_classes)
        hint = f"that --teacher-pretrained {pretrained} holds {args.teacher} weights for {info.num_classes} classes"
    elif pretrained:
        hint = f"that timm has weights for {args.teacher} and can reach the hub (--teacher-pretrained timm)"
    teacher = create_model(args.teacher, args.teacher_kwargs, info.num_classes, info.in_chans, args.img_size,
                           "--teacher", pretrained=bool(pretrained), pretrained_cfg_overlay=overlay, hint=hint)
    if args.teacher_checkpoint:
        load_weights(teacher, args.teacher_checkpoint, "--teacher-checkpoint", "teacher", prefer_ema=use_ema)
    elif not pretrained:
        log(f"warning: --teacher {args.teacher} has random weights (no --teacher-pretrained or --teacher-checkpoint): "
            "fine for throughput runs, useless for distillation")
    if pretrained:
        renormalize_teacher_input(teacher, info, log)
    return teacher


def renormalize_teacher_input(teacher: nn.Module, info, log: Callable[[str], None]) -> None:
    """Gives the teacher the mean/std of its pretrained config (timm's resolve_model_data_config) where
    they differ from the dataset's, which the data pipeline normalizes with."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(teacher)
    mean, std = tuple(map(float, config["mean"])), tuple(map(float, config["std"]))
    data_mean, data_std = tuple(map(float, info.mean)), tuple(map(float, info.std))
    if (mean, std) == (data_mean, data_std):
        return
    if len(mean) != len(data_mean) or len(std) != len(data_std):
        log(f"warning: the teacher's pretrained mean/std {mean}/{std} are for {len(mean)} channels, the data has "
            f"{len(data_mean)}: its input keeps the dataset's normalization")
        return
    set_teacher_input_normalization(teacher, data_mean, data_std, mean, std)
    log(f"teacher input renormalized from the dataset's mean {data_mean} std {data_std} to its pretrained "
        f"mean {mean} std {std}")

"""The models of a run: timm's student and teacher, and the distiller built from the flags."""
import argparse
import inspect
from typing import Optional

from torch import nn

from ..distill import DISTILLERS, BaseDistiller, build_distiller
from .errors import UsageError


def create_model(name: str, kwargs: dict, num_classes: int, in_chans: int, img_size: int, flag: str, **extra):
    """timm.create_model(pretrained=False); img_size is passed to models that take it, unless given in kwargs.
    Any failure inside timm (bad model kwargs) is a :class:`UsageError` naming the flag."""
    import timm

    options = {"pretrained": False, "num_classes": num_classes, "in_chans": in_chans,
               **{k: v for k, v in extra.items() if v is not None}, **kwargs}
    attempts = [options] if "img_size" in kwargs else [{**options, "img_size": img_size}, options]
    for attempt in attempts:
        try:
            return timm.create_model(name, **attempt)
        except Exception as error:  # bad kwargs fail anywhere inside timm's constructors
            if isinstance(error, TypeError) and "img_size" in str(error) and attempt is not attempts[-1]:
                continue  # a model that takes no img_size
            raise UsageError(f"{flag} {name}: timm.create_model failed with {options} ({type(error).__name__}: "
                             f"{error}); check {flag}-kwargs") from None


def distiller_from_args(args: argparse.Namespace, student: nn.Module, teacher: Optional[nn.Module],
                        input_size, mixup_active: bool) -> BaseDistiller:
    """The distiller of ``--distiller`` with its hyper-parameter and loss-weight flags; soft mixup labels
    come smoothed already, so label smoothing applies to hard labels only."""
    cls = DISTILLERS[args.distiller]
    kwargs = {hp.argument: getattr(args, hp.flag[2:].replace("-", "_")) for hp in cls.hyper_parameters}
    weights = {key: getattr(args, f"{key}_loss_weight") for key in cls.default_loss_weights}
    kwargs["loss_weights"] = {key: value for key, value in weights.items() if value is not None}
    kwargs["label_smoothing"] = 0.0 if mixup_active else args.smoothing
    if "input_size" in inspect.signature(cls.__init__).parameters:
        kwargs["input_size"] = input_size
    if args.distiller == "ofa":
        kwargs.update(stages=tuple(args.ofa_stages), eps=args.ofa_eps[0] if len(args.ofa_eps) == 1 else list(args.ofa_eps))
    try:
        return build_distiller(args.distiller, student, teacher if cls.needs_teacher else None, **kwargs)
    except (TypeError, ValueError) as error:
        raise UsageError(f"--distiller {args.distiller} with --model {args.model}: {error}") from None

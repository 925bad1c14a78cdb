"""The trainer and evaluator: CLI and presets, the training loop, data and sampling, checkpoints.

``python -m ofakd_fast.train`` (or ``ofakd-train``, or ``torchrun -m ofakd_fast.train``) trains;
``ofakd-eval`` evaluates a checkpoint. In code: ``train(parse_args([...]))``.
"""
from .cli import list_presets, main, parse_args
from .errors import CheckpointError, CorruptImageError, DataError, UsageError
from .loop import Trainer, train
from .models import create_model

__all__ = ["CheckpointError", "CorruptImageError", "DataError", "Trainer", "UsageError", "create_model",
           "list_presets", "main", "parse_args", "train"]

"""What a resumed run may change: the saved flags of a checkpoint against the new ones.

A run continues exactly only with the flags that shaped its batches, models and optimizer
(``--batch-size``, ``--seed``, ``--lr``, the models, ``--distiller``, ``--ofa-stages``, ...): those
must match, and a difference is refused with the flag named. Flags about length, logging, speed
and where files go may change; each change is logged.
"""
from typing import List

from .errors import UsageError

MAY_CHANGE = frozenset({
    "config", "resume", "output", "overwrite", "epochs", "log_interval", "eval_interval", "checkpoint_interval",
    "stop_after_steps", "quiet", "workers", "threads", "eval_batch_size", "device", "compile", "data_dir",
    "teacher_checkpoint", "initial_checkpoint", "teacher_cache"})


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def check_resume_args(saved: dict, current: dict) -> List[str]:
    """A :class:`UsageError` listing every flag that must match but differs; else the allowed changes."""
    refused, changed = [], []
    for key, value in sorted(current.items()):
        if key not in saved or saved[key] == value:
            continue
        (changed if key in MAY_CHANGE else refused).append(f"{flag(key)} {saved[key]!r} -> {value!r}")
    if refused:
        raise UsageError(f"--resume: the checkpoint was written with other values of flags a resumed run must keep: "
                         f"{'; '.join(refused)}. Pass the saved values (see the run's config.yaml), or start a new "
                         "run with another --output")
    return changed

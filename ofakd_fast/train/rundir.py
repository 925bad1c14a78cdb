"""The run directory: config.yaml, log.txt and summary.csv (one row per epoch, timm's format)."""
import csv
import datetime
from pathlib import Path
from typing import Optional

import yaml


def default_run_dir(distiller: str, model: str) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{distiller}-{model}"


def plain(value):
    """Namespace values as YAML-friendly plain types."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def write_config(run_dir: Path, args) -> None:
    """The resolved flags of a run as ``config.yaml`` (``--config`` reads it back)."""
    with open(run_dir / "config.yaml", "w") as f:
        yaml.safe_dump({k: plain(v) for k, v in sorted(vars(args).items())}, f, sort_keys=False)


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


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


def append_summary(path: Path, epoch: int, train_metrics: dict, eval_metrics: dict, lr: float) -> None:
    """One epoch's row, written by timm's ``update_summary``: epoch, train_*, eval_*, lr (empty when None)."""
    from timm.utils import update_summary

    blank = {k: ("" if v is None else v) for k, v in train_metrics.items()}
    update_summary(epoch, blank, {k: ("" if v is None else v) for k, v in eval_metrics.items()}, str(path), lr=lr)


def trim_summary(path: Path, last_epoch: int) -> None:
    """Keeps the summary rows of the epochs a resumed checkpoint has completed."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = [row for row in reader if row.get("epoch") and int(row["epoch"]) <= last_epoch]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)

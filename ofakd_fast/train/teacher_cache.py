"""The teacher cache: the teacher's outputs for every training sample and epoch, computed once.

Augmentation here is a pure function of (seed, epoch, sample index) (:mod:`.sampling`), so the
teacher's output for a sample in an epoch can be computed ahead and read by any number of student
runs. A cache directory holds ``manifest.json`` (everything the outputs depend on) and one folder
per epoch, ``epoch_0001/`` .. (written as ``epoch_0001.partial/``, renamed when complete), with
memory-mapped ``.npy`` arrays, one row per sample index:

* full (``--cache-topk 0``): ``logits`` [N, C] in fp16, bf16 (stored as its raw 16 bits) or fp32;
* top-k: ``logits`` [N, k], ``indices`` [N, k] (the narrowest integer type that holds C) and ``lse``
  [N] fp32, ``logsumexp(t / T)`` over all C classes at the cache's temperature, so the stored
  probabilities are exact and the rest's mass is known (:class:`ofakd_fast.loss.SparseTeacher`).

Rows are indexed by sample (``rows: sample``), except where a run's batches are not a function of its
samples alone: with mixup/cutmix (a batch's images are mixed with each other) or ``--aug-repeats`` (a
sample is seen several times per epoch, each time augmented anew) they are indexed by position
(``rows: position``): row ``(rank * B_r + step) * batch_size + j`` holds the teacher's output for image j of
step `step` of process `rank` (``B_r`` steps per process), so the cache is tied to the batch size and
the number of processes, which the manifest records.

A partial epoch keeps ``rows_done`` (written atomically after each flushed chunk): a killed run
resumes there. Under torchrun, process r computes the epochs e with e % world_size == r.
"""
import argparse
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..loss.sparse import SparseTeacher
from .data import DataConfig
from .errors import DataError
from .sampling import mixing_active

FORMAT_VERSION = 2  # 2: rows by sample or by position (mixup, cutmix, repeats)
DTYPES = {"float16": (np.float16, torch.float16), "bfloat16": (np.uint16, torch.bfloat16),
          "float32": (np.float32, torch.float32)}


def index_dtype(classes: int):
    """The narrowest integer type of numpy that holds class indices below `classes`."""
    return next(t for t in (np.uint8, np.int16, np.int32) if classes - 1 <= np.iinfo(t).max)


def state_dict_hash(module: torch.nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes and bytes): which weights produced a cache."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def indexed_by_position(args: argparse.Namespace) -> bool:
    """Whether a run's cache rows go by position in the epoch (mixup, cutmix, repeats) or by sample."""
    return mixing_active(args) or bool(args.aug_repeats)


def run_fields(args: argparse.Namespace, teacher: torch.nn.Module, num_samples: int, num_classes: int,
               world_size: int) -> dict:
    """The manifest fields a student run of `world_size` processes determines (the trainer recomputes them
    to check a cache)."""
    by_position = indexed_by_position(args)
    fields = {"format_version": FORMAT_VERSION, "teacher": args.teacher, "teacher_kwargs": dict(args.teacher_kwargs),
              "teacher_weights_sha256": state_dict_hash(teacher),
              "data": _plain(asdict(DataConfig.from_namespace(args))), "num_samples": num_samples,
              "num_classes": num_classes, "seed": args.seed, "epochs": args.epochs,
              "amp": bool(args.amp) and args.amp_dtype, "channels_last": bool(args.channels_last),
              "rows": "position" if by_position else "sample"}
    if by_position:
        fields.update(batch_size=args.batch_size, world_size=world_size, aug_repeats=args.aug_repeats,
                      mixup={"mixup": args.mixup, "cutmix": args.cutmix, "prob": args.mixup_prob,
                             "switch_prob": args.mixup_switch_prob})
    return fields


def batch_rows(manifest: dict, sample_index: Tensor, rank: int, step: int, steps_per_rank: int) -> np.ndarray:
    """The cache rows of step `step` of process `rank`, whose samples are `sample_index`."""
    if manifest["rows"] == "sample":
        return sample_index.cpu().numpy()
    start = (rank * steps_per_rank + step) * manifest["batch_size"]
    return np.arange(start, start + len(sample_index))


def _plain(values: dict) -> dict:
    return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


def epoch_dir(root: Path, epoch: int, partial: bool = False) -> Path:
    return Path(root) / (f"epoch_{epoch + 1:04d}" + (".partial" if partial else ""))


def _write_json_atomically(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(root: Path) -> Optional[dict]:
    path = Path(root) / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(root: Path, manifest: dict) -> None:
    Path(root).mkdir(parents=True, exist_ok=True)
    _write_json_atomically(Path(root) / "manifest.json", manifest)


def manifest_mismatches(saved: dict, expected: dict) -> list:
    """'field: cache has A, this run has B' for every field of `expected` the two disagree on (epochs: the
    cache must hold at least the run's)."""
    problems, expected = [], json.loads(json.dumps(expected))  # tuples as lists, as the manifest holds them
    for field in sorted(expected):
        if field == "epochs":
            if saved.get(field, 0) < expected.get(field, 0):
                problems.append(f"epochs: the cache holds {saved.get(field)}, this run trains {expected[field]}")
        elif saved.get(field) != expected.get(field):
            problems.append(f"{field}: cache has {saved.get(field)!r}, this run has {expected.get(field)!r}")
    return problems


class EpochWriter:
    """Writes one epoch's arrays in chunks of rows; :meth:`finish` publishes the folder atomically."""

    def __init__(self, root: Path, epoch: int, rows: int, manifest: dict):
        self.final, self.partial = epoch_dir(root, epoch), epoch_dir(root, epoch, partial=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        self.topk, classes = manifest["topk"], manifest["num_classes"]
        width = self.topk or classes
        store = DTYPES[manifest["dtype"]][0]
        self.arrays = {"logits": self._open("logits", store, (rows, width))}
        if self.topk:
            self.arrays["indices"] = self._open("indices", index_dtype(classes), (rows, width))
            self.arrays["lse"] = self._open("lse", np.float32, (rows,))
        progress = self.partial / "rows_done.json"
        self.rows_done = json.loads(progress.read_text())["rows_done"] if progress.exists() else 0

    def _open(self, name: str, dtype, shape):
        path = self.partial / f"{name}.npy"
        if path.exists():
            array = np.load(path, mmap_mode="r+")
            if array.shape == shape and array.dtype == dtype:
                return array
        return np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)

    def write(self, start: int, logits: Tensor, temperature: float, store_dtype: torch.dtype) -> None:
        """Rows start.. of the teacher's logits [n, C] (float32), then flushed and recorded as done."""
        stop = start + logits.shape[0]
        if self.topk:
            values, indices = logits.topk(self.topk, dim=-1)
            self.arrays["indices"][start:stop] = indices.numpy().astype(self.arrays["indices"].dtype)
            self.arrays["lse"][start:stop] = torch.logsumexp(logits / temperature, dim=-1).numpy()
        else:
            values = logits
        values = values.to(store_dtype)
        raw = values.view(torch.int16).numpy().view(np.uint16) if store_dtype == torch.bfloat16 else values.numpy()
        self.arrays["logits"][start:stop] = raw
        for array in self.arrays.values():
            array.flush()
        self.rows_done = stop
        _write_json_atomically(self.partial / "rows_done.json", {"rows_done": stop})

    def finish(self) -> None:
        (self.partial / "rows_done.json").unlink()
        self.arrays.clear()
        os.replace(self.partial, self.final)


class TeacherCache:
    """Reads a cache directory: :meth:`rows` gives the teacher output of rows (:func:`batch_rows`) of an epoch, as
    dense logits [B, C] (float32) or a :class:`SparseTeacher`, on the host (the loop moves it)."""

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        if self.manifest is None:
            raise DataError(f"--teacher-cache {root}: no manifest.json there (write one with ofakd-cache-teacher)")
        self._epochs = {}

    def check(self, expected: dict) -> None:
        """A DataError naming every manifest field that differs from this run's."""
        problems = manifest_mismatches(self.manifest, expected)
        if problems:
            raise DataError(f"--teacher-cache {self.root} was made for another run: " + "; ".join(problems))

    def _epoch(self, epoch: int) -> dict:
        if epoch not in self._epochs:
            folder = epoch_dir(self.root, epoch)
            if not folder.is_dir():
                raise DataError(f"--teacher-cache {self.root}: epoch {epoch + 1} is missing ({folder} not found; "
                                "is ofakd-cache-teacher still running or was it stopped?)")
            self._epochs = {epoch: {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}}
        return self._epochs[epoch]

    def rows(self, epoch: int, index: np.ndarray) -> Union[Tensor, SparseTeacher]:
        arrays = self._epoch(epoch)
        raw = torch.from_numpy(np.ascontiguousarray(arrays["logits"][index]))
        logits = (raw.view(torch.bfloat16) if self.manifest["dtype"] == "bfloat16" else raw).float()
        if not self.manifest["topk"]:
            return logits
        indices = torch.from_numpy(arrays["indices"][index].astype(np.int64))
        return SparseTeacher(indices, logits, torch.from_numpy(np.ascontiguousarray(arrays["lse"][index])))


def teacher_output_to(output: Union[Tensor, SparseTeacher], device: torch.device):
    if isinstance(output, SparseTeacher):
        return SparseTeacher(*(t.to(device, non_blocking=True) for t in output))
    return output.to(device, non_blocking=True)

"""Checkpoints: atomic saving, loading with ``weights_only=True``, weight files of any common form
fitted to a model with a clear error, and the RNG states as plain types.

A training checkpoint (``last.pth``, ``best.pth``) is a dict of plain types and tensors:
``model`` (the student's state_dict), ``distiller`` (what the distiller trains besides it), ``optimizer``, ``scheduler``, ``scaler``,
``model_ema``, ``epoch`` (epochs completed), ``step_in_epoch``, ``global_step``, ``best_metric``,
``best_epoch``, ``metrics``, ``rng`` and ``args``. ``torch.load(path, weights_only=True)`` reads it.
"""
import os
import random
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError

def save_checkpoint(state: dict, path) -> Path:
    """Writes `state` to `path` atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path, flag: str = "--resume") -> dict:
    """A checkpoint dict loaded on CPU with ``weights_only=True``; one clear line for a missing, empty,
    truncated or foreign file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise CheckpointError(f"{flag}: checkpoint file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # empty (EOFError), text (UnpicklingError), truncated zip (RuntimeError), ...
        raise CheckpointError(f"{flag}: {path} is not a PyTorch checkpoint, or it is truncated "
                              f"({path.stat().st_size} bytes; torch.load raised {type(error).__name__})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{flag}: {path} holds a {type(state).__name__}, not a checkpoint or state_dict dict")
    return state


def read_state_dict(path, flag: str = "--checkpoint", prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights of a file, read by :func:`timm.models.load_state_dict`: a plain state_dict or a
    checkpoint holding one (timm's ``state_dict`` / ``state_dict_ema``, this trainer's ``model`` /
    ``model_ema``), ``.pth``/``.pt``/``.bin`` or ``.safetensors``, DDP and torch.compile prefixes removed."""
    from timm.models import load_state_dict

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag}: file not found: {path}")
    try:
        state = load_state_dict(str(path), use_ema=prefer_ema, device="cpu")
    except Exception as error:
        if path.suffix != ".safetensors":
            load_checkpoint(path, flag)  # raises its one-line error for a file torch cannot read
        raise CheckpointError(f"{flag}: cannot read weights from {path}: {type(error).__name__}: {error}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = sorted(state)[:10] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{flag}: {path} is neither a state_dict nor a checkpoint with one under state_dict, "
                              f"model, state_dict_ema or model_ema; its keys: {keys}")
    return state


def load_weights(model: nn.Module, path, flag: str = "--checkpoint", what: str = "model",
                 prefer_ema: bool = False) -> None:
    """Loads a weight file into `model` strictly; a :class:`CheckpointError` listing what does not fit."""
    state = read_state_dict(path, flag, prefer_ema)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:4])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:4])})")
        raise CheckpointError(f"{flag}: the weights in {path} do not fit the {what} {name} "
                              f"(check the model name, --num-classes / dataset, --in-chans and model kwargs): "
                              + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def rng_state() -> dict:
    """The RNG states of this process as plain types (loadable with weights_only=True)."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt), gauss],
             "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                       float(np_gauss)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Optional[dict]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

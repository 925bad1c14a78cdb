"""Checkpoints: atomic saving, loading with ``weights_only=True``, weight files of any common form
fitted to a model with a clear error, and the RNG states as plain types.

A training checkpoint (``last.pth``, ``best.pth``) is a dict of plain types and tensors:
``model`` (the student's state_dict), ``projectors``, ``optimizer``, ``scheduler``, ``scaler``,
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

STATE_DICT_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")  # in order of preference
STRIP_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable, or whose weights do not fit the model."""


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
    """A checkpoint loaded on CPU with ``weights_only=True``; clear errors for a missing or unreadable file."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pth"
    if not path.is_file():
        raise CheckpointError(f"{flag}: checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{flag}: cannot load checkpoint {path} with torch.load(weights_only=True): "
                              f"{type(error).__name__}: {error}") from error


def read_state_dict(path, flag: str = "--checkpoint", prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """The model weights of a file: a plain state_dict or a checkpoint holding one (timm's ``state_dict``
    / ``state_dict_ema``, this trainer's ``model`` / ``model_ema``), ``.pth``/``.pt``/``.bin`` or
    ``.safetensors``; DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes are removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag}: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except Exception as error:
            raise CheckpointError(f"{flag}: cannot read safetensors file {path}: {error}") from error
    else:
        state = load_checkpoint(path, flag)
    if not isinstance(state, dict):
        raise CheckpointError(f"{flag}: {path} holds a {type(state).__name__}, not a state_dict or checkpoint dict")
    keys = ("model_ema", "state_dict_ema") + STATE_DICT_KEYS if prefer_ema else STATE_DICT_KEYS
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        nested = next((k for k in keys if isinstance(state.get(k), dict) and state[k]), None)
        if nested is None:
            raise CheckpointError(f"{flag}: {path} is neither a state_dict nor a checkpoint with one of the keys "
                                  f"{', '.join(STATE_DICT_KEYS)}; its keys: {sorted(state)[:10]}")
        state = state[nested]
    return strip_prefixes(state)


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


def strip_prefixes(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The keys of `state` without leading DDP (``module.``) and torch.compile (``_orig_mod.``) prefixes."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in STRIP_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


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

"""Checkpoints as safetensors + JSON, never pickles.

Reading weights safely (a truncated or corrupt file fails here with a sentence), checksums, an
optimizer state that needs no pickle, and the ONE training-state format that backbone
pretraining, segmenter training and text pretraining resume from: ``state.safetensors`` (every
tensor: weights, optimizer moments, RNG states) + ``state.json`` (step/epoch, settings, the
tensors' sha256), swapped in as a whole directory. accelerate's ``save_state`` is not used: it
pickles the optimizer and RNG states.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from fasttextdiff.utils.atomic import atomic_write_json, staged_dir
from fasttextdiff.utils.errors import CheckpointError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"


def sha256_file(path: str | os.PathLike) -> str:
    """Checksum of a weights file, recorded at save and compared at load (bit rot, partial copies)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is corrupt: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def check_safetensors(path: Path) -> None:
    """Open the header and compare declared sizes with the file, so truncation fails loudly here."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {exc}") from exc
    if not keys:
        raise CheckpointError(f"{path} holds no tensors; the weights file is empty or corrupt")


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    check_safetensors(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} could not be read as safetensors (truncated or corrupt): {exc}") from exc


def verify_sha256(path: Path, expected: str | None, remedy: str) -> None:
    """Compare a file with the sha256 recorded when it was saved (no record: nothing to compare)."""
    if expected is not None and sha256_file(path) != expected:
        raise CheckpointError(f"{path} does not match the checksum recorded when it was saved: the file is corrupt "
                              f"or was modified; {remedy}")


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer's state as (tensors for safetensors, JSON-able rest): resumable without pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    """Inverse of `optimizer_state_tensors` (other tensors in the same file are ignored)."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_state(directory: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write the training state into ``directory`` as a whole (the previous state stays until it is complete)."""
    with staged_dir(directory) as staging:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(staging / STATE_TENSORS))
        atomic_write_json(staging / STATE_JSON, dict(meta, sha256=sha256_file(staging / STATE_TENSORS)))


def load_training_state(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The state ``save_training_state`` wrote, checked; None when there is none; CheckpointError when damaged."""
    if not directory.is_dir():
        return None
    weights, meta_path = directory / STATE_TENSORS, directory / STATE_JSON
    if not (weights.is_file() and meta_path.is_file()):
        raise CheckpointError(
            f"training checkpoint {directory} is incomplete (needs {STATE_TENSORS} and {STATE_JSON}); "
            "delete it or start over without resuming"
        )
    meta = read_json(meta_path)
    tensors = load_tensors(weights)
    verify_sha256(weights, meta.get("sha256"), "delete it or start over without resuming")
    return tensors, meta

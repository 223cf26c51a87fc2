"""Publishing finished model directories so that readers never see a half-written model.

A training run writes into a staging directory beside its target. Only when it has finished does
it become visible, either by renaming onto the target (`replace_dir`, for CLI outputs) or by
swapping a `current` symlink inside a model root (`publish`, for the server, where the model is
read while the next one trains: the swap is one `os.replace`, so there is no moment without a model).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

CURRENT = "current"
VERSIONS = "versions"


def staging_dir(target: str | os.PathLike) -> Path:
    """A fresh empty directory next to `target` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-"))


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move a finished directory onto `target`, replacing an older one."""
    staging, target = Path(staging), Path(target)
    if target.is_symlink() or not target.exists():
        os.replace(staging, target)
        return target
    aside = target.with_name(f".{target.name}.old-{os.getpid()}-{time.time_ns()}")
    os.replace(target, aside)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def publish(staging: str | os.PathLike, root: str | os.PathLike, keep: int = 3) -> Path:
    """Make `staging` the current model of `root` (root/current -> versions/<stamp>)."""
    root = Path(root)
    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
    os.replace(staging, final)
    link_tmp = root / f".{CURRENT}.{os.getpid()}.{time.time_ns()}"
    os.symlink(os.path.relpath(final, root), link_tmp)
    os.replace(link_tmp, root / CURRENT)
    _prune(versions, keep, protect=final)
    return final


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Accept a model directory or a published root (its `current` link)."""
    path = Path(path)
    current = path / CURRENT
    if current.exists():
        return current.resolve()
    return path


def _prune(versions: Path, keep: int, protect: Path) -> None:
    old = sorted((p for p in versions.iterdir() if p.is_dir() and p != protect), key=lambda p: p.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """Checksum of a weights file, recorded at save and compared at load (bit rot, partial copies)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def optimizer_state_tensors(optimizer) -> tuple[dict, dict]:
    """An optimizer's state as (tensors for safetensors, JSON-able rest): resumable without pickle."""
    import torch

    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(optimizer, tensors: dict, meta: dict) -> None:
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

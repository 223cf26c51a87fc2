"""Writing files and directories so that a reader never sees half of one, and publishing models.

Files go through a temporary name beside the target and one ``os.replace``. Directories are built
beside the target and swapped in whole (``replace_dir``: CLI outputs, checkpoints), or published
into a model root by swapping its ``current`` symlink (``publish``: the server reads the model
while the next one trains, and the swap leaves no moment without a model).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CURRENT = "current"
VERSIONS = "versions"


def _process_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _process_umask()  # read once at import (os.umask can only be read by setting it)


def _user_mode(path: Path) -> None:
    """mkstemp creates 0600 files; the finished file gets the mode a plain open() would give (0666 & ~umask)."""
    os.chmod(path, 0o666 & ~UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file name beside ``path``; what is written there replaces ``path`` (flushed to disk)
    when the block ends without error, and is removed otherwise. For writers that want a file name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        _user_mode(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, suffix: str = ".tmp") -> None:
    with atomic_path(path, suffix) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def atomic_copy(src: str | os.PathLike, dest: str | os.PathLike, suffix: str = ".partial") -> None:
    """Copy a file so that ``dest`` changes only once the copy is complete and flushed."""
    with atomic_path(dest, suffix) as tmp:
        shutil.copyfile(src, tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def staging_dir(target: str | os.PathLike) -> Path:
    """A fresh empty directory beside ``target`` (same filesystem, so the final rename is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


def is_leftover(name: str) -> bool:
    """A staging or set-aside directory of an interrupted write (ours, safe to drop)."""
    return re.fullmatch(r".+\.(tmp|old)-[0-9a-f]{12}", name) is not None


def check_replaceable(target: Path, allowed: set[str], what: str) -> None:
    """Refuse to swap out a directory that holds more than ours: a typo must not move a user's files."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    foreign = sorted(e.name for e in target.iterdir() if e.name not in allowed and not is_leftover(e.name))
    if foreign:
        raise ValueError(
            f"{target} already holds files that are not part of a {what} ({foreign[:5]}); "
            f"save into a new or empty directory, or an existing {what} directory"
        )


def replace_dir(staging: str | os.PathLike, target: str | os.PathLike, keep_foreign: bool = False) -> Path:
    """Swap a finished staging directory into place (old one set aside, new one moved in, old deleted):
    readers see the whole old or the whole new one. With ``keep_foreign`` the old one's entries the
    new one lacks (e.g. a training ``checkpoint/`` next to backbone files) move into the new one."""
    staging, target = Path(staging), Path(target)
    for path in staging.rglob("*"):  # a rename must never publish data still in the page cache
        if path.is_file():
            _fsync(path)
    if target.is_symlink() or not target.exists():
        os.replace(staging, target)
        return target
    if keep_foreign and target.is_dir():
        for entry in target.iterdir():
            if not (staging / entry.name).exists() and not is_leftover(entry.name):
                os.replace(entry, staging / entry.name)
    aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(target, aside)
    os.replace(staging, target)
    if aside.is_dir():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink(missing_ok=True)
    return target


@contextmanager
def staged_dir(target: str | os.PathLike, keep_foreign: bool = False) -> Iterator[Path]:
    """``with staged_dir(target) as staging:`` what is written there replaces ``target`` if the block succeeds."""
    staging = staging_dir(target)
    try:
        yield staging
        replace_dir(staging, target, keep_foreign)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def publish(staging: str | os.PathLike, root: str | os.PathLike, keep: int = 3) -> Path:
    """Make ``staging`` the current model of ``root`` (root/current -> versions/<stamp>), keeping ``keep`` versions."""
    root = Path(root)
    versions = root / VERSIONS
    versions.mkdir(parents=True, exist_ok=True)
    final = versions / f"{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 10**9:09d}"
    os.replace(staging, final)
    link_tmp = root / f".{CURRENT}.{os.getpid()}.{time.time_ns()}"
    os.symlink(os.path.relpath(final, root), link_tmp)
    os.replace(link_tmp, root / CURRENT)
    old = sorted((p for p in versions.iterdir() if p.is_dir() and p != final), key=lambda p: p.name)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """Accept a model directory or a published root (its ``current`` link)."""
    path = Path(path)
    current = path / CURRENT
    if current.exists():
        return current.resolve()
    return path

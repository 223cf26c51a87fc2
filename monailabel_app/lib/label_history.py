"""Every human label that is replaced or deleted, kept: a version folder per label in the app's state.

A saved label never destroys the one it replaces. Before the datastore overwrites, deletes or
detaches a human label (a tag other than the machine tags `original` and `uncertainty`), the file
moves here with who replaced it, when, why and the label info it had:

    <state>/label-history/<tag>/<image id>/<version>/label<.ext>
                                                    /version.json

`version` sorts by time (`20261207T221800123456-1a2b3c`). Restoring a version saves it again
through the datastore, so the label it replaces is kept too and nothing is ever lost. Replaced and
deleted images are kept the same way under the pseudo-tag `_image`, and replaced report texts under
`_report` (not valid tags, so no label folder can collide with them); they can be listed, not
restored over HTTP.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

from fasttextdiff.utils.atomic import atomic_write_json

IMAGE_KIND = "_image"
REPORT_KIND = "_report"
_VERSION = re.compile(r"[0-9]{8}T[0-9]{12}-[0-9a-f]{6}")
RECORD = "version.json"


class LabelHistory:
    """The kept versions under `root` (the datastore's lock orders the writers)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    @staticmethod
    def new_version() -> str:
        now = time.time()
        return time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{int(now * 1e6) % 1_000_000:06d}-" \
            + uuid.uuid4().hex[:6]

    def _folder(self, kind: str, image_id: str) -> Path:
        return self.root / kind / image_id

    def keep(self, path: str | os.PathLike, kind: str, image_id: str, reason: str, who: str | None = None,
             info: Dict[str, Any] | None = None, move: bool = True) -> Dict[str, Any]:
        """Move (or, with `move=False`, copy: the caller is about to write over `path`) the file into a new
        version of (`kind`, `image_id`); returns its record. The record is written first, so a version
        folder with a file always says what the file was; a failed copy (a full disk) raises OSError
        with `path` untouched."""
        path = Path(path)
        version = self.new_version()
        folder = self._folder(kind, image_id) / version
        folder.mkdir(parents=True, exist_ok=False)
        name = path.name
        ext = name[len(image_id):] if name.startswith(image_id) else "".join(path.suffixes)
        record = {"version": version, "tag": kind, "image": image_id, "ext": ext,
                  "file": (kind.lstrip("_") if kind.startswith("_") else "label") + ext, "reason": reason,
                  "replaced_by": who,
                  "replaced_ts": int(time.time()), "info": dict(info or {}), "bytes": path.stat().st_size}
        try:
            atomic_write_json(folder / RECORD, record)
            if move:
                shutil.move(str(path), str(folder / record["file"]))
            else:
                shutil.copy2(str(path), str(folder / record["file"]))
        except OSError:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return record

    def keep_bytes(self, data: bytes, ext: str, kind: str, image_id: str, reason: str,
                   who: str | None = None) -> Dict[str, Any]:
        """Keep content that lives in no file of its own (a report in the image info)."""
        import tempfile

        self.root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.root, prefix=".keep-") as folder:
            path = Path(folder) / f"{image_id}{ext}"
            path.write_bytes(data)
            return self.keep(path, kind, image_id, reason, who=who)

    def versions(self, kind: str, image_id: str) -> List[Dict[str, Any]]:
        """Kept versions of one label, newest first."""
        folder = self._folder(kind, image_id)
        if not folder.is_dir():
            return []
        out = []
        for entry in sorted(folder.iterdir(), reverse=True):
            if not _VERSION.fullmatch(entry.name):
                continue
            try:
                record = json.loads((entry / RECORD).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # a version whose move never finished
            if record.get("file") and (entry / record["file"]).is_file():
                out.append(record)
        return out

    def path_of(self, record: Dict[str, Any]) -> Path:
        """The kept file of a version record (one of `versions`)."""
        return self._folder(record["tag"], record["image"]) / record["version"] / record["file"]

    def tags(self, image_id: str) -> List[str]:
        """The tags with kept versions for `image_id`."""
        if not self.root.is_dir():
            return []
        return sorted(t.name for t in self.root.iterdir() if not t.name.startswith(("_",
                                                                                    ".")) and (t / image_id).is_dir()
                      and self.versions(t.name, image_id))

    def file_of(self, kind: str, image_id: str, version: str) -> tuple[Path, Dict[str, Any]]:
        """(the kept file, its record); KeyError when there is no such version."""
        if not isinstance(version, str) or not _VERSION.fullmatch(version):
            raise KeyError(version)
        for record in self.versions(kind, image_id):
            if record["version"] == version:
                return self.path_of(record), record
        raise KeyError(version)

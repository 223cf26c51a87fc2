"""MONAI Label's LocalDatastore, checking what comes in before it changes anything.

The stock datastore copies any upload under a name derived from the request (so `../x` escapes
the studies folder), accepts files no reader can open, and stores any `text`. Here each change is
checked first — safe ids and tags, a readable image, a label of the image's size, a report that
is UTF-8 text within the size limit — and refused with HTTP 4xx otherwise, the datastore unchanged.
Report text is kept in the image info under `text`, where MONAI Label returns it with
`/datastore/image/info` and `/activelearning/*`.

Writes are crash- and disk-full-safe, and serialised: the stock datastore copies a new label
straight over the previous one and rewrites `datastore_v2.json` in place, so a full disk (or a
kill) mid-write leaves a truncated label or an empty datastore file. Here every file goes to a
temporary name beside its target and is renamed over it only when complete (os.replace), and a
failed write answers HTTP 507 with the previous file untouched. One lock per datastore orders the
writes of the server's threads (threaded /infer saves uncertainty maps and scores while the event
loop saves labels); the file lock of MONAI Label orders them with other processes.

An upload to an existing id is refused (409) unless the client asks to replace it. A replacement
keeps the old image file in the label history (whatever its extension), keeps the report unless a
new one is given, and, under the same lock and before the datastore record changes, moves every
label file of that id whose shape no longer fits out of the studies folder: MONAI Label's
auto-reload watcher would otherwise attach them to the new image again. Removals update the
record at once, so no listed image or label is missing.

Nothing a person saved is lost (lib/label_history.py). Labels have two owners: the model writes
only the machine tags (`original`, `uncertainty`; `save_label`, the method MONAI Label's own infer
and batch infer call, and `store_label`), a person every other tag (`save_human_label`, behind
`PUT /datastore/label`). A human label that is replaced, deleted, or no longer fits a replaced
image moves to the label history first, and can be restored from there. Tags are one canonical
(lower) case; a label is one file per image and tag (saving another format replaces the old file
in the same step, never leaves twins). Upper-case extensions (`CT.NII.GZ`, `IMG.DCM`) are the
same formats as their lower-case twins and are stored under the lower-case name.
"""

from __future__ import annotations

import contextvars
import errno
import json
import logging
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path
from typing import Any, Dict

from fasttextdiff.utils.atomic import atomic_copy, atomic_write_bytes
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore

from lib.label_history import IMAGE_KIND, REPORT_KIND, LabelHistory
from lib.validation import (MACHINE_TAGS, bad_request, check_human_tag, check_image_id, check_int, check_json_value,
                            check_label_tag, check_machine_tag, check_text, without_folders)

logger = logging.getLogger(__name__)
_internal: contextvars.ContextVar[bool] = contextvars.ContextVar("fasttextdiff_internal", default=False)

TEXT_KEY = "text"
SCORE_KEY = "fasttextdiff_uncertainty"  # the scoring method's name, and its entry in an image's info
# image info keys that clients may not set (the app owns them)
_RESERVED = {"name", "ts", "path", SCORE_KEY, "strategy"}
_RESERVED_LABEL = {"name", "ts"}
UNCERTAINTY_TAG = "uncertainty"  # model output for the image: dropped, not kept aside, when the image is replaced
# what uploads and the studies folder may hold: every single-file format the library reads
# (detached headers such as .nhdr/.mhd are refused on upload; a DICOM series comes as a .zip)
IMAGE_EXTENSIONS = ("*.nii.gz", "*.nii", "*.nrrd", "*.mha", "*.png", "*.jpg", "*.jpeg", "*.bmp", "*.tif", "*.tiff",
                    "*.dcm")


def _canonical(tag: Any) -> Any:
    return tag.lower() if isinstance(tag, str) else tag


class FastTextDiffDatastore(LocalDatastore):
    """A LocalDatastore with input checks; report text lives in image info `text`."""

    def __init__(self, datastore_path: str, *args: Any, max_text_bytes: int = 65536, history_dir: str | None = None,
                 **kwargs: Any):
        self.max_text_bytes = max_text_bytes
        self.max_info_bytes = max(4 * max_text_bytes, 256 * 1024)  # one image's or label's info, as JSON
        # replaced and deleted human labels (and images); by default in the studies' hidden state folder
        self.history = LabelHistory(history_dir or os.path.join(datastore_path, ".fasttextdiff", "label-history"))
        self._mutex = threading.RLock()
        super().__init__(datastore_path, *args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:  # auto-reload: files now arrive by rename, which the stock handler ignores
            handler.on_moved = self._on_moved_event
            for name in ("on_created", "on_deleted", "on_modified", "on_moved"):
                setattr(handler, name, self._outside_hidden(getattr(handler, name)))
            self._watch_datastore_only(handler)
        if not kwargs.get("read_only"):
            self.remove_stale_partials()

    def _watch_datastore_only(self, handler) -> None:
        """MONAI Label watches the whole studies tree; the app's state folder inside it (`.fasttextdiff/`,
        training scratch renamed in and out) is no business of the datastore's, so watch the studies
        folder itself and the labels tree only."""
        observer = getattr(self, "_observer", None)
        labels = self._datastore.label_path(None)
        if observer is None or not os.path.isdir(labels):
            return
        try:
            observer.unschedule_all()
            observer.schedule(handler, path=self._datastore_path, recursive=False)
            observer.schedule(handler, path=labels, recursive=True)
        except OSError as exc:  # the stock recursive watch is gone: say so, as MONAI Label does
            logger.error("cannot watch the studies folder (%s); files moved in by hand are seen on restart", exc)

    def _outside_hidden(self, callback):
        """`callback` for files of the datastore only: the watcher's patterns (`<studies>/*.png`, fnmatch)
        also match files in hidden subfolders, such as the app's state folder `.fasttextdiff/`, whose
        training scratch would otherwise rescan the datastore for every file written."""
        root = os.path.realpath(self._datastore_path)

        def call(event) -> None:
            for path in (getattr(event, "src_path", ""), getattr(event, "dest_path", "")):
                if not path:
                    continue
                rel = os.path.relpath(os.path.realpath(path), root)
                parts = rel.split(os.sep)[:-1]
                if any(part.startswith(".") and part not in (".", "..") for part in parts):
                    return
            callback(event)

        return call

    def _on_moved_event(self, event) -> None:
        """A file renamed into place: datastore_v2.json written by another process (reload it), or an
        image/label (rescan, as MONAI Label does for a created file)."""
        dest = getattr(event, "dest_path", "")
        if dest == self._datastore_config_path:
            self._init_from_datastore_file()
        elif dest and not os.path.basename(dest).startswith("."):
            self._on_any_event(event)

    def remove_stale_partials(self, older_than_s: float = 3600.0) -> int:
        """Delete temp files (`.<name>.<random>.partial`) that a killed process left behind.
        Only old ones: a younger one may belong to a write in progress in another process."""
        removed = 0
        cutoff = time.time() - older_than_s
        for folder, subfolders, files in os.walk(self._datastore_path):
            # the app's state folder is not the datastore's
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for name in files:
                if name.startswith(".") and name.endswith(".partial"):
                    path = os.path.join(folder, name)
                    try:
                        if os.stat(path).st_mtime < cutoff:
                            os.unlink(path)
                            removed += 1
                    except OSError:
                        pass
        if removed:
            logger.info("removed %d stale partial file(s) of interrupted writes from the datastore", removed)
        return removed

    @staticmethod
    def _storage_error(exc: OSError, what: str):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return bad_request(507, f"could not store the {what}: {os.strerror(exc.errno)}; "
                                    "the previous version is unchanged (free disk space and retry)")
        return bad_request(500, f"could not store the {what}: {exc.strerror or exc}")

    def _update_datastore_file(self, lock=True):
        """datastore_v2.json written to a temp file and renamed: never half-written."""

        def write() -> None:
            self._ignore_event_config = True
            data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            path = self._datastore_config_path
            atomic_write_bytes(path, data.encode("utf-8"), suffix=".partial")
            self._config_ts = os.stat(path).st_mtime

        with self._mutex:
            if lock:
                with FileLock(self._lock_file):
                    write()
            else:
                write()

    def _reload_locked(self) -> None:
        """Re-read datastore_v2.json if another process changed it (caller holds the file lock)."""
        from monailabel.datastore.local import LocalDatastoreModel

        path = self._datastore_config_path
        if os.path.exists(path) and os.stat(path).st_mtime != self._config_ts:
            with open(path, encoding="utf-8") as fp:
                self._datastore = LocalDatastoreModel.model_validate_json(fp.read())
            self._datastore.base_path = self._datastore_path
            self._config_ts = os.stat(path).st_mtime

    def _init_from_datastore_file(self, throw_exception=False):
        with self._mutex:
            return super()._init_from_datastore_file(throw_exception)

    def _reconcile_datastore(self):
        with self._mutex:
            return super()._reconcile_datastore()

    def datalist(self, full_path=True):
        with self._mutex:
            return super().datalist(full_path)

    def json(self):
        with self._mutex:
            return super().json()

    # -------------------------------------------------------------- helpers
    def _image_geometry(self, path: str, what: str):
        from fasttextdiff.data.io import read_image
        from fasttextdiff.utils.errors import ImageReadError

        try:
            return read_image(path)
        except ImageReadError as exc:
            raise bad_request(415, f"cannot read the {what}: {without_folders(str(exc))}") from exc
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad upload, not a server bug
            raise bad_request(415,
                              f"cannot read the {what}: {type(exc).__name__}: {without_folders(str(exc))}") from exc

    def _to_id(self, file: str) -> tuple:
        """(id, extension) of a file name, the extension matched in any case and returned in lower case
        (MONAI Label's own match is case-sensitive and replaces the extension anywhere in the name)."""
        lower = file.lower()
        for ext in sorted((e.replace("*", "") for e in self._extensions), key=len, reverse=True):
            if lower.endswith(ext):
                return file[: -len(ext)], ext
        return super()._to_id(file)

    def _supported(self, filename: str) -> bool:
        return any(filename.lower().endswith(e.replace("*", "")) for e in self._extensions)

    @staticmethod
    def _label_shape(image) -> tuple:
        """The shape a label of `image` must have (a colour image's labels have no channel axis)."""
        return tuple(image.array.shape[: 3 if image.is_volume else 2])

    def _check_info_size(self, info: Dict[str, Any], what: str) -> None:
        size = len(json.dumps(info, default=str).encode("utf-8"))
        if size > self.max_info_bytes:
            raise bad_request(413,
                              f"the {what} would be {size} bytes of JSON; the limit is {self.max_info_bytes} bytes")

    def _checked_info(self, info: Dict[str, Any] | None) -> Dict[str, Any]:
        if info is None:
            return {}
        if not isinstance(info, dict):
            raise bad_request(400, f"image info must be a JSON object, got {type(info).__name__}")
        info = dict(info)
        reserved = sorted(set(info) & _RESERVED)
        if reserved:
            raise bad_request(400, f"image info keys {reserved} are set by the server and cannot be given")
        if TEXT_KEY in info:
            info[TEXT_KEY] = check_text(info[TEXT_KEY], self.max_text_bytes)
        return check_json_value(info, "image info")

    def has_image(self, image_id: str) -> bool:
        return image_id in self._datastore.objects

    # -------------------------------------------------------------- checked writes
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        """MONAI Label's API: a new image (an existing id is refused, see add_image_checked)."""
        return self.add_image_checked(image_id, image_filename, image_info)["image"]

    def add_image_checked(self, image_id: str, image_filename: str, image_info: Dict[str, Any] | None,
                          replace: bool = False) -> Dict[str, Any]:
        """Store an uploaded image under `image_id` (or its file name); with `replace`, over an existing
        one (see the module doc). Returns {"image": id} plus, for a replacement, what happened."""
        id_from_file, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_image_id(image_id or id_from_file)
        if not self._supported(image_filename):
            raise bad_request(415, f"unsupported image file type {ext!r} ({os.path.basename(image_filename)!r}); "
                                   f"supported: {', '.join(e.replace('*', '') for e in self._extensions)} "
                                   "or a .zip of one DICOM series")
        info = self._checked_info(image_info)
        new_shape = self._label_shape(self._image_geometry(image_filename, "uploaded image"))
        name = self._filename(image_id, ext)
        dest = os.path.realpath(os.path.join(self._datastore.image_path(), name))
        with self._mutex, FileLock(self._lock_file):
            self._reload_locked()  # other processes' writes since our last read survive ours
            previous = self._datastore.objects.get(image_id)
            if previous is not None and not replace:
                raise bad_request(409, f"image {image_id!r} already exists; to replace it, upload again with params "
                                       '{"replace": true} (the report is kept unless a new one is given; labels that '
                                       "no longer fit the new image are moved aside)")
            if previous is not None and TEXT_KEY not in info and previous.image.info.get(TEXT_KEY):
                info[TEXT_KEY] = previous.image.info[TEXT_KEY]
            self._check_info_size(info, f"info of image {image_id!r}")
            from monailabel.datastore.local import ImageLabelModel

            try:
                for old in self._files_of(self._datastore.image_path(), image_id) if previous is not None else []:
                    self.history.keep(old, IMAGE_KIND, image_id, "replaced by an upload", info=previous.image.info,
                                      move=False)  # removed below once the new image is in place
                kept, moved = self._settle_labels(image_id, new_shape) if previous is not None else ({}, [])
                atomic_copy(image_filename, dest)
                for stale in self._files_of(self._datastore.image_path(), image_id):
                    if os.path.realpath(stale) != dest:
                        os.unlink(stale)  # an image file of this id under another extension, not in the record
                info = dict(info, ts=int(time.time()), name=name)
                record = ImageLabelModel(image=DataModel(info=info, ext=ext))
                record.labels.update(kept)
                self._datastore.objects[image_id] = record
                self._update_datastore_file(lock=False)
            except OSError as exc:
                if previous is None:
                    self._datastore.objects.pop(image_id, None)
                else:
                    self._datastore.objects[image_id] = previous
                raise self._storage_error(exc, f"image {image_id!r}") from exc
        logger.info("%s image %s (%s)", "replaced" if previous is not None else "added", image_id, name)
        result: Dict[str, Any] = {"image": image_id}
        if previous is not None:
            result.update(replaced=True, labels_kept=sorted(kept), labels_moved_aside=moved)
        return result

    def _files_of(self, folder: str, image_id: str) -> list[str]:
        """The files in `folder` that MONAI Label would take for `image_id` (any known extension)."""
        if not os.path.isdir(folder):
            return []
        return [entry.path for entry in os.scandir(folder)
                if entry.is_file() and self._supported(entry.name) and self._to_id(entry.name)[0] == image_id]

    def _settle_labels(self, image_id: str, new_shape: tuple) -> tuple[Dict[str, DataModel], list]:
        """Before a replaced image's record changes (caller holds the locks): keep each label file of
        `image_id` that fits `new_shape`, move the others out of the studies folder (human labels into
        the label history, the model's output deleted). Returns the kept labels' records and a list of
        what was moved where."""
        labels_dir = self._datastore.label_path(None)
        obj = self._datastore.objects.get(image_id)
        kept: Dict[str, DataModel] = {}
        moved = []
        tags = [t for t in os.listdir(labels_dir) if os.path.isdir(os.path.join(labels_dir, t))] \
            if os.path.isdir(labels_dir) else []
        for tag in sorted(tags):
            for path in self._files_of(os.path.join(labels_dir, tag), image_id):
                fits = False
                if tag != UNCERTAINTY_TAG:
                    try:
                        fits = tuple(self._image_geometry(path, "label").array.shape) == new_shape
                    except Exception:  # noqa: BLE001 - an unreadable label cannot fit either
                        fits = False
                record = obj.labels.get(tag) if obj is not None else None
                if fits and record is not None and self._filename(image_id, record.ext) == os.path.basename(path):
                    kept[tag] = record
                    continue
                if fits and record is None:
                    _, ext = self._to_id(os.path.basename(path))
                    kept[tag] = DataModel(info={"ts": int(time.time()), "name": os.path.basename(path)}, ext=ext)
                    continue
                if tag in MACHINE_TAGS:
                    os.unlink(path)
                    moved.append({"tag": tag, "file": os.path.basename(path), "to": None})
                    continue
                kept_version = self.history.keep(path, tag, image_id, "does not fit the replaced image",
                                                 info=record.info if record is not None else None)
                target = self.history.path_of(kept_version)
                moved.append({"tag": tag, "file": os.path.basename(path), "to": str(target),
                              "version": kept_version["version"]})
                logger.info("kept label %s/%s in the label history (version %s): it does not fit the replaced image",
                            tag, os.path.basename(path), kept_version["version"])
        return kept, moved

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        """MONAI Label's API, which its infer and batch infer call with the model's output: only machine
        tags (a 400 for any other, `final` included). A person's label goes through save_human_label."""
        label_tag = check_machine_tag(label_tag)
        label_info = self._checked_label(image_id, label_filename, label_tag, label_info)
        return self._store(image_id, label_filename, label_tag, label_info, who=None)

    def save_human_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any] | None,
                         who: str | None = None) -> str:
        """A label a person saved (`PUT /datastore/label`): any tag but the machine ones. The label it
        replaces is kept in the label history."""
        label_tag = check_human_tag(label_tag)
        label_info = self._checked_label(image_id, label_filename, label_tag, label_info)
        if who:
            label_info = dict(label_info, user=who)
        return self._store(image_id, label_filename, label_tag, label_info, who=who)

    def _checked_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Any) -> Dict[str, Any]:
        """The label's params, checked, once the label is known to fit its image (else 4xx)."""
        check_image_id(image_id)
        if not self.has_image(image_id):
            raise bad_request(404, f"image {image_id!r} is not in the datastore")
        if not self._supported(os.path.basename(label_filename)):
            name = os.path.basename(label_filename)
            raise bad_request(415, f"unsupported image file type {name[name.find('.'):]!r} for a label ({name!r}); "
                                   f"supported: {', '.join(e.replace('*', '') for e in self._extensions)}")
        if label_info is not None and not isinstance(label_info, dict):
            raise bad_request(400, "label params must be a JSON object")
        label_info = check_json_value(dict(label_info or {}), "label params")
        reserved = sorted(set(label_info) & _RESERVED_LABEL)
        if reserved:
            raise bad_request(400, f"label params {reserved} are set by the server and cannot be given")
        self._check_info_size(label_info, f"info of label {label_tag!r} of {image_id!r}")
        label = self._image_geometry(label_filename, "label")
        image = self._image_geometry(self.get_image_uri(image_id), "image of this label")
        label_shape = tuple(label.array.shape)
        image_shape = self._label_shape(image)
        if label_shape != image_shape:
            raise bad_request(422,
                              f"label {os.path.basename(label_filename)!r} has shape {label_shape}, which does not "
                                   f"match image {image_id!r} of shape {image_shape}")
        return label_info

    def store_label(self, image_id: str, label_filename: str, label_tag: str,
                    label_info: Dict[str, Any] | None) -> str:
        """The model's own output file (unchecked: the app made it), under a machine tag only."""
        return self._store(image_id, label_filename, check_machine_tag(label_tag), label_info, who=None)

    def _store(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any] | None,
               who: str | None) -> str:
        """Write the label atomically as the one file of (image, tag). A human tag's previous file(s) are
        copied to the label history first; other-format twins are removed only once the new file is in
        place, so a failed write (507 on a full disk) leaves the previous label as it was."""
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        human = label_tag not in MACHINE_TAGS
        with self._mutex, FileLock(self._lock_file):
            self._reload_locked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise bad_request(404, f"image {image_id!r} is not in the datastore")
            previous = obj.labels.get(label_tag)
            olds = self._files_of(label_path, image_id)
            try:
                if human:
                    for old in olds:
                        self.history.keep(old, label_tag, image_id, "replaced", who=who,
                                          info=previous.info if previous is not None else None, move=False)
                os.makedirs(label_path, exist_ok=True)
                atomic_copy(label_filename, dest)
                for twin in olds:  # the same label in another format: gone with the write, kept above if human
                    if os.path.realpath(twin) != os.path.realpath(dest):
                        self._unlink(twin)
                info = dict(label_info or {}, ts=int(time.time()), name=name)
                obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
                self._update_datastore_file(lock=False)
            except OSError as exc:
                if previous is not None:
                    obj.labels[label_tag] = previous
                else:
                    obj.labels.pop(label_tag, None)
                raise self._storage_error(exc, f"label {label_tag!r} of {image_id!r}") from exc
        logger.info("saved label %s of %s%s", label_tag, image_id, f" (by {who})" if who else "")
        return image_id

    def label_history(self, image_id: str, label_tag: str | None = None) -> Dict[str, Any]:
        """The kept versions of an image's labels (one tag, or every tag) and its replaced reports, newest first."""
        check_image_id(image_id)
        tags = [check_label_tag(label_tag)] if label_tag is not None else self.history.tags(image_id)
        reports = []
        for record in self.history.versions(REPORT_KIND, image_id):
            text = self.history.path_of(record).read_text(encoding="utf-8", errors="replace")
            reports.append(dict(record, text=text))
        return {"image": image_id, "versions": {tag: self.history.versions(tag, image_id) for tag in tags},
                "reports": reports}

    def restore_label(self, image_id: str, label_tag: str, version: str, who: str | None = None) -> Dict[str, Any]:
        """Save a kept version again as the current label (the label it replaces is kept in turn)."""
        import tempfile

        check_image_id(image_id)
        label_tag = check_human_tag(label_tag)
        try:
            path, record = self.history.file_of(label_tag, image_id, version)
        except KeyError:
            raise bad_request(404, f"no kept version {str(version)[:40]!r} of label {label_tag!r} of {image_id!r}; "
                                   f"list them with GET /datastore/label/history?image={image_id}") from None
        with tempfile.TemporaryDirectory(prefix="fasttextdiff-restore-") as folder:
            copy = os.path.join(folder, image_id + record["ext"])
            shutil.copyfile(path, copy)  # the kept version stays in the history
            info = {k: v for k, v in record.get("info", {}).items() if k not in _RESERVED_LABEL}
            info["restored_from"] = version
            self._checked_label(image_id, copy, label_tag, info)
            self._store(image_id, copy, label_tag, info, who=who)
        logger.info("restored label %s of %s from version %s", label_tag, image_id, version)
        return {"image": image_id, "tag": label_tag, "restored": version}

    # reads take a tag in any case, as writes do
    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return super().get_label_uri(label_id, _canonical(label_tag))

    def get_label_info(self, label_id: str, label_tag: str) -> Dict[str, Any]:
        return super().get_label_info(label_id, _canonical(label_tag))

    def get_labeled_images(self, label_tag=None, labels=None):
        return super().get_labeled_images(_canonical(label_tag), labels)

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return super().get_unlabeled_images(_canonical(label_tag), labels)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        if not self.has_image(image_id):
            raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        checked = self._checked_info(info) if not _internal.get() else dict(info)
        # reload, update and write under one lock hold: other processes' and threads' writes survive
        with self._mutex, FileLock(self._lock_file):
            self._reload_locked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
            previous = dict(obj.image.info)
            if not _internal.get():
                self._check_info_size(dict(previous, **checked), f"info of image {str(image_id)[:80]!r}")
            obj.image.info.update(checked)
            try:
                old_text = previous.get(TEXT_KEY)
                if TEXT_KEY in checked and old_text and old_text != checked[TEXT_KEY]:  # a person's report, kept
                    self.history.keep_bytes(str(old_text).encode("utf-8"), ".txt", REPORT_KIND, image_id, "replaced")
                self._update_datastore_file(lock=False)
            except OSError as exc:
                obj.image.info.clear()
                obj.image.info.update(previous)
                raise self._storage_error(exc, f"info of image {image_id!r}") from exc

    def read_report_files(self) -> int:
        """At start: an image without a report takes the text of `<id>.txt` beside it in the studies folder
        (what `fasttextdiff import-studies` writes, or a user's own files); returns how many were read.
        A report that is not UTF-8 text within the size limit is skipped with a warning naming the file."""
        from fastapi import HTTPException

        count = 0
        folder = self._datastore.image_path()
        for image_id in sorted(self._datastore.objects):
            obj = self._datastore.objects.get(image_id)
            report = os.path.join(folder, f"{image_id}.txt")
            if obj is None or obj.image.info.get(TEXT_KEY) or not os.path.isfile(report):
                continue
            try:
                with open(report, "rb") as fh:
                    raw = fh.read(self.max_text_bytes + 1)
                self.update_image_info(image_id, {TEXT_KEY: check_text(raw, self.max_text_bytes,
                                                                       f"report file {image_id}.txt")})
                count += 1
            except HTTPException as exc:
                logger.warning("not using %s.txt as the report of %s: %s", image_id, image_id, exc.detail)
            except OSError as exc:
                logger.warning("cannot read %s.txt: %s", image_id, exc)
        if count:
            logger.info("read %d report(s) from <id>.txt files in the studies folder", count)
        return count

    def update_image_info_internal(self, image_id: str, info: Dict[str, Any]) -> None:
        """For the app's own keys (scores): no client-key checks."""
        token = _internal.set(True)
        try:
            self.update_image_info(image_id, info)
        finally:
            _internal.reset(token)

    def remove_image(self, image_id: str, who: str | None = None) -> None:
        """The image, its labels and its record, removed together (MONAI Label's own removal left the
        record to the file watcher, so the datastore briefly listed files that were gone). The image and
        its human labels are kept in the label history."""
        if not self.has_image(image_id):
            raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        with self._mutex, FileLock(self._lock_file):
            self._reload_locked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:
                raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
            for tag, label in obj.labels.items():
                self._drop_label(image_id, tag, label, "image deleted", who)
            image_file = os.path.join(self._datastore.image_path(), self._filename(image_id, obj.image.ext))
            if os.path.isfile(image_file):
                self.history.keep(image_file, IMAGE_KIND, image_id, "image deleted", who=who, info=obj.image.info)
            self._datastore.objects.pop(image_id, None)
            self._update_datastore_file(lock=False)
        logger.info("removed image %s and its labels", image_id)

    def remove_label(self, label_id: str, label_tag: str, who: str | None = None) -> None:
        """DELETE /datastore/label: a human label moves to the label history (restorable), the model's
        output is deleted."""
        label_tag = check_label_tag(label_tag)
        with self._mutex, FileLock(self._lock_file):
            self._reload_locked()
            obj, label = self._existing_label(label_id, label_tag)
            self._drop_label(label_id, label_tag, label, "deleted", who)
            obj.labels.pop(label_tag, None)
            self._update_datastore_file(lock=False)

    def _drop_label(self, image_id: str, tag: str, label: DataModel, reason: str, who: str | None) -> None:
        """Every file of (image, tag) out of the studies folder: kept if a person made it (caller holds the locks)."""
        for path in self._files_of(self._datastore.label_path(tag), image_id):
            if tag in MACHINE_TAGS:
                self._unlink(path)
            else:
                self.history.keep(path, tag, image_id, reason, who=who, info=label.info)

    def _existing_label(self, label_id: str, label_tag: str):
        """(image record, label record) of a stored label, or a 404; call with the lock held."""
        obj = self._datastore.objects.get(label_id)
        label = obj.labels.get(label_tag) if obj is not None else None
        if label is None:
            raise bad_request(404, f"no label {str(label_id)[:80]!r} with tag {label_tag!r}")
        return obj, label

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        label_tag = check_label_tag(label_tag)
        if not isinstance(info, dict):
            raise bad_request(400, f"label info must be a JSON object, got {type(info).__name__}")
        info = check_json_value(dict(info), "label info")
        reserved = sorted(set(info) & _RESERVED_LABEL)
        if reserved:
            raise bad_request(400, f"label info keys {reserved} are set by the server and cannot be given")
        with self._mutex, FileLock(self._lock_file):
            self._reload_locked()
            _, label = self._existing_label(label_id, label_tag)
            self._check_info_size(dict(label.info, **info), f"info of label {label_tag!r} of {label_id!r}")
            previous = dict(label.info)
            label.info.update(info)
            try:
                self._update_datastore_file(lock=False)
            except OSError as exc:
                label.info.clear()
                label.info.update(previous)
                raise self._storage_error(exc, f"info of label {label_tag!r} of {label_id!r}") from exc

    def write_dataset_archive(self, dest: Path, limit_cases: int | None = None) -> Path:
        """The images with a final label, those labels and the datastore record, as a zip at `dest`
        (MONAI Label's get_dataset_archive, written where the caller says instead of a leaked /tmp file)."""
        items = self.datalist()
        if not items:
            raise bad_request(404, "no image has a final label yet: there is nothing to put in the archive")
        if limit_cases:
            items = items[: check_int(limit_cases, "limit_cases", 1, 10**6)]
        with zipfile.ZipFile(dest, mode="x") as archive:
            for item in items:
                for key, path in item.items():
                    if isinstance(path, str) and os.path.isfile(path):
                        archive.write(path, arcname=f"{key}/{os.path.basename(path)}")
            with self._mutex:
                archive.writestr("metadata.json", self._datastore.model_dump_json(exclude={"base_path"}))
        return dest

    # -------------------------------------------------------------- checked reads
    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        info = super().get_image_info(image_id)
        if not info and not self.has_image(image_id):
            raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        return info


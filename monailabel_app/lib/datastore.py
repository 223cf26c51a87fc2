"""MONAI Label's LocalDatastore, checking what comes in before it changes anything.

The stock datastore copies any upload under a name derived from the request (so `../x` escapes
the studies folder), accepts files no reader can open, and stores any `text`. Here each change is
checked first — safe ids and tags, a readable image, a label of the image's size, a report that
is UTF-8 text within the size limit — and refused with HTTP 4xx otherwise, the datastore unchanged.
Report text is kept in the image info under `text`, where MONAI Label returns it with
`/datastore/image/info` and `/activelearning/*`.
"""

from __future__ import annotations

import contextvars
import logging
import os
from typing import Any, Dict

from monailabel.datastore.local import LocalDatastore

from lib.validation import bad_request, check_image_id, check_label_tag, check_text

logger = logging.getLogger(__name__)
_internal: contextvars.ContextVar[bool] = contextvars.ContextVar("fasttextdiff_internal", default=False)

TEXT_KEY = "text"
# image info keys that clients may not set (the app owns them)
_RESERVED = {"name", "ts", "path", "fasttextdiff_uncertainty"}


class FastTextDiffDatastore(LocalDatastore):
    """A LocalDatastore with input checks; report text lives in image info `text`."""

    def __init__(self, *args: Any, max_text_bytes: int = 65536, **kwargs: Any):
        self.max_text_bytes = max_text_bytes
        super().__init__(*args, **kwargs)

    # -------------------------------------------------------------- helpers
    def _image_geometry(self, path: str, what: str):
        from fasttextdiff.data.io import read_image
        from fasttextdiff.errors import ImageReadError

        try:
            return read_image(path)
        except ImageReadError as exc:
            raise bad_request(415, f"cannot read the {what}: {exc}") from exc
        except Exception as exc:  # noqa: BLE001 - any reader failure is a bad upload, not a server bug
            raise bad_request(415, f"cannot read the {what}: {type(exc).__name__}: {exc}") from exc

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
        return info

    def has_image(self, image_id: str) -> bool:
        return image_id in self._datastore.objects

    def image_text(self, image_id: str) -> str:
        return str(self.get_image_info(image_id).get(TEXT_KEY) or "")

    # -------------------------------------------------------------- checked writes
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        id_from_file, ext = self._to_id(os.path.basename(image_filename))
        image_id = check_image_id(image_id or id_from_file)
        if not any(image_filename.endswith(e.replace("*", "")) for e in self._extensions):
            raise bad_request(415, f"unsupported image file type {ext!r}; supported: {list(self._extensions)}")
        info = self._checked_info(image_info)
        self._image_geometry(image_filename, "uploaded image")
        return super().add_image(image_id, image_filename, info)

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        check_image_id(image_id)
        check_label_tag(label_tag)
        if not self.has_image(image_id):
            raise bad_request(404, f"image {image_id!r} is not in the datastore")
        if label_info is not None and not isinstance(label_info, dict):
            raise bad_request(400, "label params must be a JSON object")
        label = self._image_geometry(label_filename, "label")
        image = self._image_geometry(self.get_image_uri(image_id), "image of this label")
        label_shape = tuple(label.array.shape)
        image_shape = tuple(image.array.shape[: 3 if image.is_volume else 2])
        if label_shape != image_shape:
            raise bad_request(422, f"label shape {label_shape} does not match image {image_id!r} shape {image_shape}")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        if not self.has_image(image_id):
            raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        checked = self._checked_info(info) if not _internal.get() else dict(info)
        super().update_image_info(image_id, checked)

    def update_image_info_internal(self, image_id: str, info: Dict[str, Any]) -> None:
        """For the app's own keys (scores); reloads the file first so other processes' writes survive."""
        token = _internal.set(True)
        try:
            self._init_from_datastore_file()
            self.update_image_info(image_id, info)
        finally:
            _internal.reset(token)

    def remove_image(self, image_id: str) -> None:
        if not self.has_image(image_id):
            raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        super().remove_image(image_id)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        check_label_tag(label_tag)
        if not self.get_label_uri(label_id, label_tag):
            raise bad_request(404, f"no label {str(label_id)[:80]!r} with tag {label_tag!r}")
        super().remove_label(label_id, label_tag)

    # -------------------------------------------------------------- checked reads
    def get_image_info(self, image_id: str) -> Dict[str, Any]:
        info = super().get_image_info(image_id)
        if not info and not self.has_image(image_id):
            raise bad_request(404, f"image {str(image_id)[:80]!r} is not in the datastore")
        return info


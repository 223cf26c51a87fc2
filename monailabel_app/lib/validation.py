"""Request checks that turn bad input into HTTP 4xx with a sentence, before anything is changed.

Raised as `fastapi.HTTPException` so that, from wherever inside a MONAI Label endpoint they come,
FastAPI answers with the status and `{"detail": reason}`. Outside the server (train subprocesses)
they are ordinary exceptions with the same message.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from fastapi import HTTPException

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,199}$")
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def bad_request(status: int, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail=reason)


def check_image_id(image_id: Any) -> str:
    """Image ids become file names in the studies folder: no separators, no `..`, no hidden files."""
    if not isinstance(image_id, str) or not _ID.match(image_id) or ".." in image_id:
        raise bad_request(400, f"invalid image id {str(image_id)[:80]!r}: use letters, digits, '.', '_' or '-' "
                               "(no path separators, no '..', not starting with '.')")
    return image_id


def check_label_tag(tag: Any) -> str:
    if not isinstance(tag, str) or not _TAG.match(tag):
        raise bad_request(400, f"invalid label tag {str(tag)[:40]!r}: use letters, digits, '_' or '-'")
    return tag


def check_text(text: Any, max_bytes: int, field: str = "text") -> str:
    """A report must be a UTF-8 string of printable text within the size limit."""
    if text is None:
        return ""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise bad_request(400, f"{field} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not isinstance(text, str):
        raise bad_request(400, f"{field} must be a string, got {type(text).__name__}")
    if "\ufffd" in text:  # what a form decoder leaves of invalid UTF-8 bytes
        raise bad_request(400, f"{field} is not valid UTF-8 (it contains undecodable bytes)")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates from JSON "\udcxx" escapes
        raise bad_request(400, f"{field} is not valid Unicode text ({exc.reason})") from exc
    if size > max_bytes:
        raise bad_request(413, f"{field} is {size} bytes; the limit is {max_bytes} bytes (--conf max_text_bytes)")
    bad = [c for c in text if unicodedata.category(c) == "Cc" and c not in "\n\r\t"]
    if bad:
        raise bad_request(400, f"{field} contains control characters (e.g. U+{ord(bad[0]):04X})")
    return text


def check_int(value: Any, name: str, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise bad_request(400, f"{name} must be an integer in [{low}, {high}], got {value!r}")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise bad_request(400, f"{name} must be an integer in [{low}, {high}], got {str(value)[:40]!r}") from None
    if number != value and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise bad_request(400, f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise bad_request(400, f"{name} must be in [{low}, {high}], got {number}")
    return number

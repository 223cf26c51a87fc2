"""Request checks that turn bad input into HTTP 4xx with a sentence, before anything is changed.

Raised as `fastapi.HTTPException` so that, from wherever inside a MONAI Label endpoint they come,
FastAPI answers with the status and `{"detail": reason}`. Outside the server (train subprocesses)
they are ordinary exceptions with the same message.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from typing import Any

from fastapi import HTTPException

# full matches only (re.fullmatch): `$` would also match before a trailing newline
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,199}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,63}")
_SESSION_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # MONAI Label's uuid1
MAX_JSON_DEPTH = 32  # client JSON deeper than this is refused (nothing the app takes nests beyond 3)


def bad_request(status: int, reason: str) -> HTTPException:
    return HTTPException(status_code=status, detail=reason)


def check_image_id(image_id: Any) -> str:
    """Image ids become file names in the studies folder: no separators, no `..`, no hidden files."""
    if not isinstance(image_id, str) or not _ID.fullmatch(image_id) or ".." in image_id:
        raise bad_request(400, f"invalid image id {str(image_id)[:80]!r}: use letters, digits, '.', '_' or '-' "
                               "(no path separators, no '..', not starting with '.')")
    return image_id


# tags that hold the model's output; every other tag holds labels a person saved
MACHINE_TAGS = ("original", "uncertainty")


def check_label_tag(tag: Any) -> str:
    """Label tags become folder names under labels/: one canonical (lower) case, so `FINAL` is `final`
    on every file system (on a case-insensitive one they would be the same folder anyway)."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise bad_request(400, f"invalid label tag {str(tag)[:40]!r}: use letters, digits, '_' or '-'")
    return tag.lower()


def check_machine_tag(tag: Any) -> str:
    """Where the model may write: never a tag that holds a person's labels."""
    tag = check_label_tag(tag)
    if tag not in MACHINE_TAGS:
        raise bad_request(400, f"the model's output is saved only under the tags {list(MACHINE_TAGS)}, not {tag!r}: "
                               f"{tag!r} holds labels a person saved, and a prediction would replace them")
    return tag


def check_human_tag(tag: Any) -> str:
    """Where a person's label may be saved: not a tag that holds the model's output."""
    tag = check_label_tag(tag)
    if tag in MACHINE_TAGS:
        raise bad_request(400, f"tag {tag!r} holds the model's output and cannot be saved by hand; save a reviewed "
                               "label with tag 'final' (or another tag of your own)")
    return tag


def check_session_id(session_id: Any) -> str:
    """Session ids become folder names in the session store: only the ids the server hands out."""
    if not isinstance(session_id, str) or not _SESSION_ID.fullmatch(session_id):
        raise bad_request(404, f"no session {str(session_id)[:80]!r} (session ids look like "
                               "'0f8fad5b-d9cb-11ef-9e1f-0242ac120002')")
    return session_id


def check_upload_name(name: Any, field: str = "file") -> str:
    """The name an uploaded file is stored under in the server's private upload folder: the last
    component of the name the client sent (MONAI Label's client sends its whole local path),
    refused when that is empty, `.` or `..`, or has control characters (NUL included)."""
    if not isinstance(name, str) or not name.strip():
        raise bad_request(400, f"the uploaded {field} has no file name; send it with one (e.g. scan.nii.gz)")
    shown = repr(name[:80])
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise bad_request(400, f"the uploaded {field}'s name {shown} contains control characters (e.g. NUL)")
    base = re.split(r"[\\/]", name)[-1]
    if base in ("", ".", ".."):
        raise bad_request(400, f"the uploaded {field}'s name {shown} does not end in a file name (it is empty, "
                               "'.' or '..')")
    if len(base.encode("utf-8", "surrogatepass")) > 200:
        raise bad_request(400, f"the uploaded {field}'s name is longer than 200 bytes")
    return base


_FOLDERS = re.compile(r"(?:[A-Za-z]:)?[/\\](?:[^\s'\"/\\]+[/\\])+(?=[^\s'\"/\\])")


def without_folders(message: str) -> str:
    """A reader's message with the folders of every path removed: clients see their file's name,
    never where the server keeps it (its private upload folder, the studies or state folders)."""
    return _FOLDERS.sub("", message)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def check_json_value(value: Any, field: str, depth: int = 0) -> Any:
    """Parsed client JSON the app may store or echo: finite numbers, nesting within MAX_JSON_DEPTH.
    (A NaN stored in the datastore would make every later JSON answer fail to encode.)"""
    if depth > MAX_JSON_DEPTH:
        raise bad_request(400, f"{field} is nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise bad_request(400, f"{field} contains {value!r}; numbers must be finite")
    if isinstance(value, dict):
        for key, item in value.items():
            check_json_value(item, field, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            check_json_value(item, field, depth + 1)
    return value


def parse_json_object(text: Any, field: str) -> dict:
    """A form field that must hold a JSON object: 400 with the reason for anything else (malformed,
    NaN/Infinity, numbers too large for a float, nested too deeply, not an object)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if text is None or not str(text).strip():
        return {}
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise bad_request(400, f"form field {field!r} is not valid JSON: {exc.msg} at position {exc.pos}") from None
    except ValueError as exc:
        raise bad_request(400, f"form field {field!r}: {exc}") from None
    except RecursionError:
        raise bad_request(400, f"form field {field!r} is nested too deeply") from None
    if not isinstance(value, dict):
        raise bad_request(400, f"form field {field!r} must be a JSON object, got {type(value).__name__}")
    return check_json_value(value, f"form field {field!r}")


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
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise bad_request(400, f"{name} must be an integer in [{low}, {high}], got {str(value)[:40]!r}") from None
    if number != value and not (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        raise bad_request(400, f"{name} must be a whole number, got {value!r}")
    if not low <= number <= high:
        raise bad_request(400, f"{name} must be in [{low}, {high}], got {number}")
    return number

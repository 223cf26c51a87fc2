"""Report text handling, shared by the Slicer logic and plain-Python callers.

A report is the free-text description of one image ("Bilateral pulmonary infection, two
infected areas, upper left lung and upper right lung."). The module keeps it on the volume
node as a MRML attribute (saved with the scene) and in the server's datastore as the image
info field ``text``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Optional

from .errors import ReportSegmentError

#: MRML node attribute holding the report text (saved with the scene).
REPORT_ATTRIBUTE = "FastTextDiff.Report"
#: MRML node attribute holding the datastore image id the volume was uploaded as.
IMAGE_ID_ATTRIBUTE = "FastTextDiff.ImageId"
#: Datastore image info key that holds the report (what the server reads).
DATASTORE_TEXT_KEY = "text"

#: Largest report the server accepts by default, in UTF-8 bytes (the FastTextDiff app's
#: ``--conf max_text_bytes``; the client reads the server's actual value from ``/info/``).
MAX_REPORT_BYTES = 65536
#: A .txt file bigger than this is refused before it is read (4 bytes per character at worst).
MAX_REPORT_FILE_BYTES = 4 * MAX_REPORT_BYTES

# Control characters other than tab and newline carry no meaning in a report and upset
# tokenizers and XML scene files alike.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def normalize_report(text: Optional[str]) -> str:
    """Return the report as it is stored and sent: NFC Unicode, ``\\n`` line ends, no byte-order
    mark or control characters, no trailing spaces, at most one blank line in a row, no leading
    or trailing blank space. ``None`` becomes "" (an image without a report)."""
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ReportSegmentError(f"The report must be text, not {type(text).__name__}.")
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text + "\n")
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def validate_report(text: Optional[str], max_bytes: int = MAX_REPORT_BYTES) -> str:
    """Normalise the report and check it fits the server's limit (UTF-8 bytes); return the
    normalised text."""
    text = normalize_report(text)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:  # lone surrogates
        raise ReportSegmentError(f"The report contains characters that are not valid Unicode ({exc.reason}).") from exc
    if size > max_bytes:
        raise ReportSegmentError(
            f"The report is {size:,} bytes long; the server accepts at most {max_bytes:,} bytes."
        )
    return text


def decode_report_bytes(data: bytes) -> str:
    """Decode report file content: UTF-8 (with or without BOM), UTF-16/32 with a BOM, then
    Windows-1252, then Latin-1 (which never fails)."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return data.decode("utf-32")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            continue
    return data.decode("latin-1")


def read_report_file(path: str) -> str:
    """Read a report from a text file (any common encoding) and return it normalised."""
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ReportSegmentError(f"Cannot read the report file {path}: {exc.strerror or exc}.") from exc
    if size > MAX_REPORT_FILE_BYTES:
        raise ReportSegmentError(
            f"The report file {os.path.basename(path)} is {size:,} bytes; a report is at most "
            f"{MAX_REPORT_BYTES:,} bytes of text."
        )
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise ReportSegmentError(f"Cannot read the report file {path}: {exc.strerror or exc}.") from exc
    if b"\x00" in data and not data.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        raise ReportSegmentError(f"The report file {os.path.basename(path)} is not a text file.")
    return validate_report(decode_report_bytes(data))


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def image_id_from_name(name: str) -> str:
    """A datastore image id derived from a node or file name: letters, digits, ``.``, ``_`` and
    ``-`` only (MONAI Label uses the id as a file name), no known image extension."""
    base = os.path.basename(name or "").strip()
    for ext in (".nii.gz", ".seg.nrrd", ".nii", ".nrrd", ".mha", ".mhd", ".png", ".jpg", ".jpeg", ".dcm"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    safe = _ID_UNSAFE.sub("_", base).strip("._-")
    return safe[:120] or "image"


def summarize_report(text: str, width: int = 60) -> str:
    """One line for labels and tooltips: the report's first characters, or "(no report)"."""
    flat = " ".join(normalize_report(text).split())
    if not flat:
        return "(no report)"
    return flat if len(flat) <= width else flat[: max(1, width - 1)].rstrip() + "\u2026"

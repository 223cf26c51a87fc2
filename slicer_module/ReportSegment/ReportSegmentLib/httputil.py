"""Small HTTP helpers on the standard library: server URL checks, multipart/form-data encoding
and decoding, download file names. No third-party packages, so it runs in Slicer's Python as is."""

from __future__ import annotations

import email.message
import json
import mimetypes
import os
import re
import uuid
from typing import Dict, List, Mapping, NamedTuple, Optional, Tuple, Union
from urllib.parse import urlsplit, urlunsplit

from .errors import ReportSegmentError

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def normalize_server_url(url: Optional[str]) -> str:
    """Check a server URL and return it in canonical form (scheme added when missing, no trailing
    slash). Raises ReportSegmentError with a sentence saying what is wrong."""
    text = (url or "").strip()
    if not text:
        raise ReportSegmentError("Enter the FastTextDiff server URL, for example http://127.0.0.1:8000.")
    if "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port  # raises ValueError for a non-numeric or out-of-range port
    except ValueError as exc:
        raise ReportSegmentError(f"'{url}' is not a valid server URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise ReportSegmentError(f"'{url}' is not a valid server URL: it must start with http:// or https://.")
    if not parts.hostname:
        raise ReportSegmentError(f"'{url}' is not a valid server URL: it names no host.")
    if any(ch.isspace() for ch in text):
        raise ReportSegmentError(f"'{url}' is not a valid server URL: it contains spaces.")
    if parts.query or parts.fragment:
        raise ReportSegmentError(f"'{url}' is not a valid server URL: leave out the '?' or '#' part.")
    del port
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    return host in LOOPBACK_HOSTS


FileSpec = Union[str, Tuple[str, bytes]]


def encode_multipart(
    fields: Mapping[str, str], files: Optional[Mapping[str, FileSpec]] = None
) -> Tuple[bytes, str]:
    """Encode form fields and files as multipart/form-data. A file is a path or a
    ``(filename, content)`` pair. Returns ``(body, content_type)``."""
    boundary = "ReportSegment-" + uuid.uuid4().hex
    chunks: List[bytes] = []
    for name, value in fields.items():
        chunks.append(f"--{boundary}\r\n".encode("ascii"))
        chunks.append(f'Content-Disposition: form-data; name="{_quote(name)}"\r\n'.encode("utf-8"))
        chunks.append(b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
        chunks.append(str(value).encode("utf-8"))
        chunks.append(b"\r\n")
    for name, spec in (files or {}).items():
        if isinstance(spec, tuple):
            filename, content = spec
        else:
            filename = os.path.basename(spec)
            with open(spec, "rb") as handle:
                content = handle.read()
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        chunks.append(f"--{boundary}\r\n".encode("ascii"))
        chunks.append(
            f'Content-Disposition: form-data; name="{_quote(name)}"; filename="{_quote(filename)}"\r\n'.encode("utf-8")
        )
        chunks.append(f"Content-Type: {mime}\r\n\r\n".encode("ascii"))
        chunks.append(content)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode("ascii"))
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


class Part(NamedTuple):
    name: Optional[str]
    filename: Optional[str]
    content_type: Optional[str]
    data: bytes


def _header_params(header_name: str, value: str) -> email.message.Message:
    message = email.message.Message()
    message[header_name] = value
    return message


def boundary_of(content_type: str) -> Optional[str]:
    message = _header_params("content-type", content_type or "")
    boundary = message.get_param("boundary", header="content-type")
    return str(boundary) if boundary else None


def decode_multipart(body: bytes, content_type: str) -> List[Part]:
    """Split a multipart response (what MONAI Label's /infer returns) into its parts."""
    boundary = boundary_of(content_type)
    if not boundary:
        raise ReportSegmentError("The server sent a multipart answer without a boundary.")
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    parts: List[Part] = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):
            break  # closing delimiter
        if piece.startswith(b"\r\n"):
            piece = piece[2:]
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            continue
        if data.endswith(b"\r\n"):
            data = data[:-2]
        headers: Dict[str, str] = {}
        for line in head.decode("utf-8", errors="replace").split("\r\n"):
            key, colon, value = line.partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        disposition = headers.get("content-disposition", "")
        message = _header_params("content-disposition", disposition)
        name = message.get_param("name", header="content-disposition")
        parts.append(
            Part(
                name=str(name) if name else None,
                filename=message.get_filename(),
                content_type=headers.get("content-type"),
                data=data,
            )
        )
    return parts


def filename_from_disposition(value: Optional[str], fallback: str) -> str:
    """A safe local file name from a Content-Disposition header (RFC 6266/2231 aware)."""
    name = None
    if value:
        name = _header_params("content-disposition", value).get_filename()
    return safe_filename(name or fallback)


_UNSAFE_FILENAME = re.compile(r"[^A-Za-z0-9._ -]+")


def safe_filename(name: str) -> str:
    base = os.path.basename(name.replace("\\", "/")).strip()
    base = _UNSAFE_FILENAME.sub("_", base).lstrip(".")
    return base or "download.bin"


def json_or_none(data: bytes):
    try:
        return json.loads(data.decode("utf-8")) if data else None
    except (UnicodeDecodeError, ValueError):
        return None


def server_reason(data: bytes, limit: int = 300) -> str:
    """The server's reason from an error body: FastAPI's ``detail`` (a string, or a list of
    validation errors), else the body's text, on one line."""
    payload = json_or_none(data)
    reason = None
    if isinstance(payload, dict) and "detail" in payload:
        detail = payload["detail"]
        if isinstance(detail, list):
            items = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(x) for x in item.get("loc", []) if x not in ("body", "query"))
                    msg = item.get("msg", "")
                    items.append(f"{loc}: {msg}" if loc else str(msg))
                else:
                    items.append(str(item))
            reason = "; ".join(items)
        else:
            reason = str(detail)
    elif isinstance(payload, str):
        reason = payload
    if reason is None:
        text = data.decode("utf-8", errors="replace")
        text = re.sub(r"<[^>]+>", " ", text)  # an HTML error page from a proxy
        reason = text
    reason = " ".join(reason.split())
    if len(reason) > limit:
        reason = reason[: limit - 1].rstrip() + "\u2026"
    return reason

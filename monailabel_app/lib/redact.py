"""Keep report text (patient data) out of INFO logs.

MONAI Label's endpoints log whole requests and image infos at INFO ("Infer Request: {...}",
"Next sample: {...}", "Image: ...; params: {...}"), and those carry our `text`. This filter
rewrites every `'text': '...'` / `"text": "..."` in a log message to its length and a short
hash, so logs stay useful (which report was used) without the words themselves.
"""

from __future__ import annotations

import hashlib
import logging
import re

# a quoted value after a text key, with escaped quotes inside; both repr (') and JSON (") styles
_PATTERNS = [
    re.compile(r"""(?P<key>['"]?text['"]?\s*[:=]\s*)'(?P<val>(?:[^'\\]|\\.)*)'""", re.S),
    re.compile(r"""(?P<key>['"]?text['"]?\s*[:=]\s*)"(?P<val>(?:[^"\\]|\\.)*)\"""", re.S),
    re.compile(r"""(?P<key>\\"text\\"\s*:\s*)\\"(?P<val>(?:[^"\\]|\\[^"]|\\\\)*?)\\\"""", re.S),  # JSON in a string
]

LOGGERS = (
    "monailabel.endpoints.infer",
    "monailabel.endpoints.datastore",
    "monailabel.endpoints.activelearning",
    "monailabel.endpoints.batch_infer",
    "monailabel.interfaces.app",
    "monailabel.interfaces.tasks.batch_infer",
    "monailabel.utils.async_tasks.task",
    "monailabel.utils.async_tasks.utils",
    "monailabel.datastore.local",
    "monailabel.tasks.infer.basic_infer",
    "task_train",
    "task_scoring",
    "task_batch_infer",
    "uvicorn.access",
    "lib.endpoints",  # the app's own versions of MONAI Label's endpoints log requests the same way
)


def redact(message: str) -> str:
    """Replace each report value in `message` by `<report: N chars, sha256 xxxxxxxx>`."""

    def repl(m: re.Match) -> str:
        val = m.group("val")
        digest = hashlib.sha256(val.encode("utf-8", "replace")).hexdigest()[:8]
        return f"{m.group('key')}'<report: {len(val)} chars, sha256 {digest}>'"

    for pattern in _PATTERNS:
        message = pattern.sub(repl, message)
    return message


class ReportRedactionFilter(logging.Filter):
    """A logging filter: formats the record once, redacts, and freezes the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string is not ours to fix
            return True
        if "text" in message:
            record.msg = redact(message)
            record.args = None
        return True


_FILTER = ReportRedactionFilter()


def install(extra: tuple[str, ...] = ()) -> None:
    """Attach the filter to MONAI Label's request-logging loggers and to the handlers that write
    the server's log (console, app.log), so a record from any other logger is redacted too
    (a logger's filter does not see its children's records; a handler's does). Idempotent."""
    for name in LOGGERS + tuple(extra):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "monailabel"):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)

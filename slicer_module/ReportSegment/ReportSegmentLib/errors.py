"""The one exception type the module shows to the user."""

from __future__ import annotations

from typing import Optional


class ReportSegmentError(Exception):
    """A user-facing failure, worded as one sentence.

    ``status`` is the HTTP status when the server answered (None when it could not be
    reached); ``reason`` is the server's own reason (FastAPI's ``detail``) when it gave one.
    """

    def __init__(self, message: str, status: Optional[int] = None, reason: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason

    def __str__(self) -> str:
        return self.message

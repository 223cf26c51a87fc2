"""Where the request being handled comes from, for checks deep inside MONAI Label's call chain.

MONAI Label passes an infer request's `image` on as either a datastore id or a server path, and
reads a path directly. Over HTTP only two paths are legitimate: the file this request uploaded
and the image of the session it names. The endpoints record that one path here; the app refuses
any other path (a client-supplied `/etc/passwd` in `params` is a datastore id that does not exist).
"""

from __future__ import annotations

import contextvars

# "http" while an HTTP request is handled; None in task subprocesses, scripts and tests
REQUEST_ORIGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("fasttextdiff_origin", default=None)
# the server path of this request's own upload (or its session's image); None when it has none
REQUEST_UPLOAD: contextvars.ContextVar[str | None] = contextvars.ContextVar("fasttextdiff_upload", default=None)

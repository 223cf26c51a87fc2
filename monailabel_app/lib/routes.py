"""Adapt MONAI Label 0.8.5's FastAPI routes: 4xx for bad input, /infer off the event loop.

Two gaps in the server we are served by:

* Its endpoints are `async def` functions that call the app synchronously, so a running
  `/infer` holds the event loop and every other request (even `/info`) waits for it.
* Exceptions other than `HTTPException` become HTTP 500: a malformed `params` JSON, an unknown
  image id in the datastore, an unknown model or strategy.

MONAI Label gives an app no hook for either, and middleware cannot be added once the server is
running, so the app re-registers those routes once, at init, with the same path, parameters and
auth dependency: each wrapper translates known error types into 4xx with the message, and the
`/infer` wrapper runs MONAI Label's own `run_inference` in the thread pool. Everything else of the
request handling is MONAI Label's code, unchanged.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import json
import logging
import os
from typing import Any, Callable

from fastapi import HTTPException
from fastapi.routing import APIRoute, APIRouter
from starlette.concurrency import run_in_threadpool

logger = logging.getLogger(__name__)

_MARK = "_fasttextdiff_hardened"
_TOKEN = object()  # this import of the module; MONAI Label re-imports `lib` for each app instance

# set while an HTTP request is handled: "http", or "http-upload" when it carries an image file.
# MONAI Label reads an `image` that is an existing server path directly; over HTTP the app allows
# that only for the file MONAI Label itself saved from this request's upload.
REQUEST_ORIGIN: contextvars.ContextVar[str | None] = contextvars.ContextVar("fasttextdiff_origin", default=None)


def translate(exc: BaseException) -> HTTPException | None:
    """The 4xx an exception stands for, or None when it is a genuine server error."""
    from monailabel.interfaces.exception import (
        ImageNotFoundException,
        LabelNotFoundException,
        MONAILabelError,
        MONAILabelException,
    )

    if isinstance(exc, HTTPException):
        return exc
    if isinstance(exc, (ImageNotFoundException, LabelNotFoundException)):
        return HTTPException(404, detail=str(exc.msg))
    if isinstance(exc, MONAILabelException):
        if exc.error in (MONAILabelError.INVALID_INPUT, MONAILabelError.APP_INIT_ERROR):
            return HTTPException(404 if "no" in exc.msg.lower() else 400, detail=str(exc.msg))
        return None
    if isinstance(exc, json.JSONDecodeError):
        return HTTPException(400, detail=f"request parameters are not valid JSON: {exc.msg} at position {exc.pos}")
    if isinstance(exc, UnicodeDecodeError):
        return HTTPException(400, detail=f"request is not valid UTF-8 ({exc.reason})")
    try:
        from fasttextdiff.errors import (
            CheckpointError,
            FastTextDiffError,
            ImageReadError,
            ModelNotFoundError,
            ReportError,
        )
    except ImportError:  # pragma: no cover - library missing
        return None
    if isinstance(exc, ImageReadError):
        return HTTPException(415, detail=f"cannot read the image: {exc}")
    if isinstance(exc, ReportError):
        return HTTPException(400, detail=f"cannot use the report text: {exc}")
    if isinstance(exc, (ModelNotFoundError, CheckpointError)):
        return HTTPException(503, detail=f"model is not available: {exc}")
    if isinstance(exc, FastTextDiffError):
        return HTTPException(400, detail=str(exc))
    return None


def _opened(result: Any) -> Any:
    """A FileResponse opened now, sized from the open file.

    Starlette's FileResponse stats the path for Content-Length and opens it later; a label saved
    in between (atomically replaced by another request) then makes the body disagree with the
    header and the client sees a broken download. Opening once and sizing from that descriptor
    serves one consistent version of the file.
    """
    from starlette.responses import FileResponse, StreamingResponse

    if not isinstance(result, FileResponse):
        return result
    try:
        handle = open(result.path, "rb")  # noqa: SIM115 - closed by the generator
    except FileNotFoundError:
        raise HTTPException(404, detail="the file was removed while it was requested") from None
    size = os.fstat(handle.fileno()).st_size

    def chunks():
        with handle:
            while True:
                block = handle.read(1 << 20)
                if not block:
                    return
                yield block

    headers = {k: v for k, v in result.headers.items() if k.lower() not in ("content-length", "content-type")}
    headers["content-length"] = str(size)
    return StreamingResponse(chunks(), status_code=result.status_code, headers=headers,
                             media_type=result.media_type, background=result.background)


def _check_json_object_fields(kwargs: dict) -> None:
    """MONAI Label indexes the `params`/`info` form fields as dicts: a JSON list or number there
    was a 500 (TypeError); refuse it as a bad request."""
    for key in ("params", "info"):
        value = kwargs.get(key)
        if isinstance(value, str) and value.strip():
            parsed = json.loads(value)  # malformed JSON: translated to 400 below
            if not isinstance(parsed, dict):
                raise HTTPException(400, detail=f"form field {key!r} must be a JSON object, got {type(parsed).__name__}")


def _wrap(endpoint: Callable, in_thread: Callable | None = None) -> Callable:
    """Same signature as `endpoint` (FastAPI reads it via __wrapped__), errors translated."""

    @functools.wraps(endpoint)
    async def wrapper(**kwargs: Any) -> Any:
        # an uploaded file, or a MONAI Label session (an image the client uploaded earlier)
        uploaded = bool(kwargs.get("file") or kwargs.get("session_id"))
        token = REQUEST_ORIGIN.set("http-upload" if uploaded else "http")
        try:
            _check_json_object_fields(kwargs)
            if in_thread is not None:
                kwargs.pop("user", None)
                return _opened(await run_in_threadpool(in_thread, **kwargs))
            return _opened(await endpoint(**kwargs))
        except Exception as exc:  # noqa: BLE001 - translated or re-raised
            http = translate(exc)
            if http is None:
                raise
            if http is not exc:
                logger.info("request refused (%s): %s", http.status_code, http.detail)
            raise http from exc
        finally:
            REQUEST_ORIGIN.reset(token)

    setattr(wrapper, _MARK, _TOKEN)
    return wrapper


_FORM_ROUTES = ("/infer/{model}", "/datastore/image", "/datastore/image/info", "/datastore/label",
                "/datastore/label/info", "/datastore/")


class FormFieldChecker:
    """Streams a multipart body and finds the first non-file form field that is not UTF-8.

    Starlette decodes an undecodable form field as Latin-1 and carries on, so a report sent in a
    wrong encoding would be stored as mojibake; so the raw field bytes are checked first, with an
    incremental decoder per field (constant memory, however large the body).
    """

    def __init__(self, content_type: bytes):
        import codecs

        from python_multipart.multipart import MultipartParser, parse_options_header

        ctype, options = parse_options_header(content_type)
        self.reason: str | None = None
        self.parser = None
        if ctype != b"multipart/form-data" or b"boundary" not in options:
            return
        state: dict[str, Any] = {"header": b"", "name": b"", "decoder": None}

        def fail(exc: UnicodeDecodeError) -> None:
            if self.reason is None:
                name = state["name"].split(b"name=")[-1].split(b";")[0].strip(b'"').decode("latin-1")[:40]
                self.reason = f"form field {name!r} is not valid UTF-8 ({exc.reason} at byte {state['offset'] + exc.start})"
            state["decoder"] = None

        def on_part_begin():
            state.update(name=b"", decoder=codecs.getincrementaldecoder("utf-8")(), offset=0)

        def on_header_field(data, start, end):
            state["header"] = data[start:end].lower()

        def on_header_value(data, start, end):
            if state["header"] == b"content-disposition":
                state["name"] = data[start:end]
                if b"filename=" in data[start:end]:
                    state["decoder"] = None  # a file: any bytes

        def on_part_data(data, start, end):
            if state["decoder"] is not None:
                try:
                    state["decoder"].decode(data[start:end])
                    state["offset"] += end - start
                except UnicodeDecodeError as exc:
                    fail(exc)

        def on_part_end():
            if state["decoder"] is not None:
                try:
                    state["decoder"].decode(b"", final=True)
                except UnicodeDecodeError as exc:
                    fail(exc)

        self.parser = MultipartParser(options[b"boundary"], {
            "on_part_begin": on_part_begin, "on_header_field": on_header_field,
            "on_header_value": on_header_value, "on_part_data": on_part_data, "on_part_end": on_part_end})

    def write(self, chunk: bytes) -> None:
        if self.parser is not None and self.reason is None:
            try:
                self.parser.write(chunk)
            except Exception:  # noqa: BLE001 - malformed bodies are left to Starlette's own checks
                self.parser = None

    def finish(self) -> str | None:
        if self.parser is not None and self.reason is None:
            try:
                self.parser.finalize()
            except Exception:  # noqa: BLE001
                return None
        return self.reason


def non_utf8_form_field(content_type: bytes, body: bytes) -> str | None:
    """The reason a multipart body is refused (a form field that is not UTF-8), or None."""
    checker = FormFieldChecker(content_type)
    checker.write(body)
    return checker.finish()


# largest request body accepted on the form routes (uploads); set by `harden` from --conf max_upload_mb
MAX_BODY_BYTES = [1024 * 1024 * 1024]
SPOOL_IN_MEMORY = 4 * 1024 * 1024  # larger bodies are spooled to a temp file, not held in memory


class _Utf8FormRoute(APIRoute):
    """An APIRoute whose handler reads the raw body first, bounded by --conf max_upload_mb and
    spooled to disk beyond a few MiB, refuses non-UTF-8 form fields, then replays the body to
    MONAI Label's endpoint."""

    def get_route_handler(self) -> Callable:
        inner = super().get_route_handler()

        async def handler(request):
            import tempfile

            from starlette.requests import Request
            from starlette.responses import JSONResponse

            limit = MAX_BODY_BYTES[0]
            too_big = JSONResponse({"detail": f"request body is larger than the upload limit of {limit // 2**20} MiB "
                                              "(--conf max_upload_mb)"}, status_code=413)
            declared = request.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > limit:
                return too_big
            checker = FormFieldChecker(request.headers.get("content-type", "").encode("latin-1"))
            spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
            try:
                size = 0
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        return too_big
                    spool.write(chunk)
                    checker.write(chunk)
                reason = checker.finish()
                if reason:
                    return JSONResponse({"detail": reason}, status_code=400)
                spool.seek(0)
                original_receive = request.receive

                async def replay():
                    if spool.tell() < size:
                        data = spool.read(1 << 20)
                        return {"type": "http.request", "body": data, "more_body": spool.tell() < size}
                    if size == 0 and not getattr(replay, "sent_empty", False):
                        replay.sent_empty = True
                        return {"type": "http.request", "body": b"", "more_body": False}
                    return await original_receive()  # after the body: wait for the disconnect

                return await inner(Request(request.scope, replay))
            finally:
                spool.close()

        return handler


def _walk(router: Any, threaded_infer: bool, seen: set[int]) -> int:
    """Replace the APIRoutes of `router` and, recursively, of routers it includes (FastAPI keeps
    included routers either flattened into `routes` or wrapped, depending on its version)."""
    from monailabel.endpoints import infer as infer_endpoints

    if id(router) in seen:
        return 0
    seen.add(id(router))
    count = 0
    routes = router.routes
    for index, route in enumerate(list(routes)):
        included = getattr(route, "original_router", None)
        if included is not None:
            count += _walk(included, threaded_infer, seen)
            continue
        if not isinstance(route, APIRoute):
            continue
        mark = getattr(route.endpoint, _MARK, None)
        if mark is _TOKEN:
            continue
        endpoint = route.endpoint.__wrapped__ if mark is not None else route.endpoint  # re-wrap after a re-import
        if "kwargs" in inspect.signature(endpoint).parameters:
            continue
        in_thread = None
        if threaded_infer and endpoint is infer_endpoints.api_run_inference:
            in_thread = infer_endpoints.run_inference
        form_route = any(route.path.endswith(p) for p in _FORM_ROUTES) and bool({"PUT", "POST"} & set(route.methods))
        # the app's dependency_overrides must reach the new route (the auth fix in lib/security.py)
        provider = getattr(route, "dependency_overrides_provider", None)
        fresh = APIRouter(route_class=_Utf8FormRoute if form_route else APIRoute, dependency_overrides_provider=provider)
        fresh.add_api_route(
            route.path,
            _wrap(endpoint, in_thread),
            methods=sorted(route.methods),
            name=route.name,
            summary=route.summary,
            description=route.description,
            tags=route.tags,
            responses=route.responses,
            include_in_schema=route.include_in_schema,
            deprecated=route.deprecated,
            response_class=route.response_class,
        )
        routes[index] = fresh.routes[0]
        count += 1
    if count and hasattr(router, "_mark_routes_changed"):
        router._mark_routes_changed()
    return count


def harden(app: Any, threaded_infer: bool = True, max_body_bytes: int | None = None) -> int:
    """Re-register MONAI Label's routes on `app` (monailabel.app.app); returns how many. Idempotent."""
    if max_body_bytes is not None:
        MAX_BODY_BYTES[0] = int(max_body_bytes)
    count = _walk(app.router, threaded_infer, set())
    app.openapi_schema = None
    logger.info("FastTextDiff: %d MONAI Label routes answer bad input with 4xx%s", count,
                "; /infer runs in a worker thread" if threaded_infer else "")
    return count

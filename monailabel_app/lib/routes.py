"""FastTextDiff's HTTP layer on MONAI Label 0.8.5's FastAPI app, installed before it serves (server.py):
4xx with a reason for bad input, slow work off the event loop, uploads that leave nothing behind.

* `BodyGuard` (middleware): the body is bounded (--conf max_upload_mb for multipart, 1 MiB
  otherwise) and multipart form fields must be UTF-8 before any endpoint sees the request;
* exception handlers: known exception types become 4xx (`translate`), so only genuine server
  faults are 500, and validation errors get a 422 that can always be encoded (FastAPI's own
  handler echoes the input, and fails on a bare NaN or 1e400 body);
* routes listed in `lib/endpoints.REPLACEMENTS` answer with the app's own function (uploads in
  private temp folders, checked bodies, run in FastAPI's thread pool), `ADDITIONS` are added;
  every endpoint keeps its path, parameters and role (RBAC dependency) and is wrapped (`_guard`):
  JSON form fields and bodies are checked first (malformed, NaN/Infinity, nested too deeply, not
  an object: 400) and the request is marked as coming over HTTP (lib/origin.py).

MONAI Label builds its routes when `monailabel.app` is imported, and loads a fresh `lib` for each
app instance, so the endpoints are registered again for each instance (`install`).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os
from typing import Any, Callable

from fastapi import HTTPException
from fastapi.routing import APIRoute, APIRouter

from lib.origin import REQUEST_ORIGIN

logger = logging.getLogger(__name__)

_MARK = "_fasttextdiff_guarded"

MAX_JSON_BYTES = 1024 * 1024  # JSON and other non-multipart bodies (no route takes more)
SPOOL_IN_MEMORY = 4 * 1024 * 1024  # larger bodies are spooled to a temp file, not held in memory
_JSON_FORM_FIELDS = ("params", "info", "wsi")


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
    if isinstance(exc, ValueError) and "null byte" in str(exc):  # a NUL in a value that reached a file name
        return HTTPException(400, detail="the request contains a NUL character where a name is expected")
    if isinstance(exc, RecursionError):
        return HTTPException(400, detail="request parameters are nested too deeply")
    if isinstance(exc, UnicodeDecodeError):
        return HTTPException(400, detail=f"request is not valid UTF-8 ({exc.reason})")
    from fasttextdiff.utils.errors import (CheckpointError, FastTextDiffError, ImageReadError, ModelNotFoundError,
                                           ReportError)

    if isinstance(exc, ImageReadError):
        from lib.validation import without_folders

        return HTTPException(415, detail=f"cannot read the image: {without_folders(str(exc))}")
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
    from starlette.responses import FileResponse

    if not isinstance(result, FileResponse):
        return result
    try:
        handle = open(result.path, "rb")  # noqa: SIM115 - closed by stream_file
    except FileNotFoundError:
        raise HTTPException(404, detail="the file was removed while it was requested") from None
    headers = {k: v for k, v in result.headers.items() if k.lower() not in ("content-length", "content-type")}
    return stream_file(handle, result.media_type, headers, result.status_code, result.background)


def stream_file(handle: Any, media_type: str | None, headers: dict, status_code: int = 200, background=None):
    """Send an open file (its path may already be gone), sized from the descriptor; closed afterwards."""
    from starlette.responses import StreamingResponse

    def chunks():
        with handle:
            while block := handle.read(1 << 20):
                yield block

    headers = dict(headers, **{"content-length": str(os.fstat(handle.fileno()).st_size)})
    return StreamingResponse(chunks(), status_code=status_code, headers=headers, media_type=media_type,
                             background=background)


def _check_request_values(kwargs: dict) -> None:
    """JSON form fields must hold a JSON object and parsed bodies finite numbers within the nesting
    limit, before MONAI Label stores or indexes them (else: 500s, or a NaN in the datastore that
    makes every later answer fail to encode)."""
    from lib.validation import check_json_value, parse_json_object

    for key, value in kwargs.items():
        if key in _JSON_FORM_FIELDS and isinstance(value, (str, bytes)):
            parse_json_object(value, key)
        elif isinstance(value, (dict, list)):
            check_json_value(value, f"the request {'body' if key == 'params' else key}")


def _guard(endpoint: Callable, inline: bool = False) -> Callable:
    """`endpoint` with the request checks; same signature (FastAPI reads it
    via __wrapped__). A plain `def` stays one (FastAPI runs it in its thread pool) unless `inline`."""

    if inspect.iscoroutinefunction(endpoint) or inline:
        @functools.wraps(endpoint)
        async def wrapper(**kwargs: Any) -> Any:
            token = REQUEST_ORIGIN.set("http")
            try:
                _check_request_values(kwargs)
                result = endpoint(**kwargs)
                return _opened(await result if inspect.isawaitable(result) else result)
            finally:
                REQUEST_ORIGIN.reset(token)
    else:
        @functools.wraps(endpoint)
        def wrapper(**kwargs: Any) -> Any:
            token = REQUEST_ORIGIN.set("http")
            try:
                _check_request_values(kwargs)
                return _opened(endpoint(**kwargs))
            finally:
                REQUEST_ORIGIN.reset(token)

    setattr(wrapper, _MARK, True)
    return wrapper


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
                self.reason = (f"form field {name!r} is not valid UTF-8 "
                               f"({exc.reason} at byte {state['offset'] + exc.start})")
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

        try:
            self.parser = MultipartParser(options[b"boundary"], {
                "on_part_begin": on_part_begin, "on_header_field": on_header_field,
                "on_header_value": on_header_value, "on_part_data": on_part_data, "on_part_end": on_part_end})
        except Exception as exc:  # noqa: BLE001 - e.g. a boundary over 256 characters
            self.reason = f"the multipart body cannot be parsed: {exc}"

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



def max_upload_bytes(instance: Any) -> int:
    """The largest upload body the app instance accepts (--conf max_upload_mb)."""
    return instance.app_conf.max_upload_mb * 1024 * 1024


def _safe_validation_errors(errors: Any) -> list:
    """FastAPI's 422 body without the offending input (which may be NaN, huge, or the whole body)."""
    return [{"loc": [str(part)[:80] for part in error.get("loc", ())], "msg": str(error.get("msg", ""))[:200],
             "type": str(error.get("type", ""))[:80]} for error in list(errors)[:20]]


class BodyGuard:
    """ASGI middleware: reads the raw body first, bounded (--conf max_upload_mb for multipart
    bodies, 1 MiB otherwise) and spooled to disk beyond a few MiB, refuses non-UTF-8 form fields
    and malformed multipart headers, then replays the body to the app."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        import tempfile

        from starlette.datastructures import Headers
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        content_type = headers.get("content-type", "")
        multipart = content_type.lower().startswith("multipart/")
        limit = max_upload_bytes(scope["app"].state.fasttextdiff_app) if multipart else MAX_JSON_BYTES
        what = f"the upload limit of {limit // 2**20} MiB (--conf max_upload_mb)" if multipart else \
            f"the limit of {limit // 2**20} MiB for a request that is not a file upload"
        too_big = JSONResponse({"detail": f"request body is larger than {what}"}, status_code=413)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await too_big(scope, receive, send)
        checker = FormFieldChecker(content_type.encode("latin-1", "replace"))
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)  # unlinked at once by the OS
        try:
            size, more = 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunk, more = message.get("body", b""), message.get("more_body", False)
                size += len(chunk)
                if size > limit:
                    return await too_big(scope, receive, send)
                spool.write(chunk)
                checker.write(chunk)
            reason = checker.finish()
            if reason:
                return await JSONResponse({"detail": reason}, status_code=400)(scope, receive, send)
            spool.seek(0)
            sent_all = False

            async def replay():
                nonlocal sent_all
                if not sent_all:
                    data = spool.read(1 << 20)
                    sent_all = spool.tell() >= size
                    return {"type": "http.request", "body": data, "more_body": not sent_all}
                return await receive()  # after the body: wait for the disconnect

            await self.app(scope, replay, send)
        finally:
            spool.close()


def install_once(app: Any) -> None:
    """The middleware and exception handlers, added to `app` before it first serves (they outlive app
    instances: they use nothing from `lib` but `translate`, which reads only exception types)."""
    from fastapi.exceptions import RequestValidationError
    from monailabel.interfaces.exception import MONAILabelException
    from starlette.middleware import Middleware
    from starlette.responses import JSONResponse

    from fasttextdiff.utils.errors import FastTextDiffError

    if getattr(app.state, "fasttextdiff_http", False):
        return
    if app.middleware_stack is not None:
        raise RuntimeError("the HTTP layer must be installed before the app serves (see server.py)")

    async def refused(request: Any, exc: Exception):
        http = translate(exc)
        if http is None:
            raise exc
        if http is not exc:
            logger.info("request refused (%s): %s", http.status_code, http.detail)
        return JSONResponse({"detail": http.detail}, status_code=http.status_code, headers=http.headers)

    async def invalid(request: Any, exc: RequestValidationError):
        return JSONResponse({"detail": _safe_validation_errors(exc.errors())}, status_code=422)

    for kind in (MONAILabelException, FastTextDiffError, ValueError, RecursionError):
        app.add_exception_handler(kind, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.user_middleware.append(Middleware(BodyGuard))  # inside MONAI Label's CORS middleware, as routes were
    app.state.fasttextdiff_http = True


def install(app: Any, threaded_infer: bool = True) -> int:
    """Install the HTTP layer on `app` (monailabel.app.app) for this app instance: the replacement
    endpoints (`lib/endpoints.REPLACEMENTS`), the additional routes (`ADDITIONS`), every endpoint
    wrapped (`_guard`); returns how many routes were registered."""
    from monailabel.config import settings

    from lib import endpoints

    install_once(app)
    prefix = settings.MONAI_LABEL_API_STR or ""
    additions = {(method, prefix + path): (endpoint, summary)
                 for method, path, endpoint, summary in endpoints.ADDITIONS}
    fresh = APIRouter(dependency_overrides_provider=app)
    kept = []
    for route in _routes(app.router):
        if not isinstance(route, APIRoute):
            kept.append(route)
            continue
        methods = sorted(route.methods)
        key = (methods[0], route.path[len(prefix):] if route.path.startswith(prefix) else route.path)
        endpoint = route.endpoint.__wrapped__ if getattr(route.endpoint, _MARK, False) else route.endpoint
        endpoint = (endpoints.REPLACEMENTS.get(key) if len(methods) == 1 else None) or endpoint
        additions.pop((methods[0], route.path), None)
        fresh.add_api_route(route.path, _guard(endpoint, endpoint is endpoints.run_inference and not threaded_infer),
                            methods=methods, name=route.name, summary=route.summary, description=route.description,
                            tags=route.tags, responses=route.responses, include_in_schema=route.include_in_schema,
                            deprecated=route.deprecated, response_class=route.response_class)
    for (method, path), (endpoint, summary) in additions.items():
        fresh.add_api_route(path, _guard(endpoint), methods=[method], summary=summary, tags=["Datastore"],
                            name=endpoint.__name__)
    app.router.routes[:] = kept + fresh.routes
    getattr(app.router, "_mark_routes_changed", lambda: None)()  # FastAPI >= 0.13x caches by a version
    app.openapi_schema = None
    logger.info("FastTextDiff: %d routes installed (checked input, slow work in threads)", len(fresh.routes))
    return len(fresh.routes)


def _routes(router: Any) -> list:
    """The routes of `router`, with those of included routers (FastAPI keeps them flattened or nested,
    depending on its version)."""
    found = []
    for route in router.routes:
        included = getattr(route, "original_router", None)
        found += _routes(included) if included is not None else [route]
    return found

"""REST client for the FastTextDiff MONAI Label server, on the Python standard library only.

Every failure comes out as :class:`ReportSegmentError` with a one-sentence message that names
what was being done and carries the server's own reason (``error.reason``) and HTTP status
(``error.status``; None when the server could not be reached).

Endpoints used (MONAI Label 0.8.5):

=====================================  =============================================
``GET  /info/``                        models, labels, strategies, train stats
``GET  /auth/``, ``POST /auth/token``  is a login needed; log in (bearer token)
``GET  /datastore/?output=all``        every image with its info (report) and label tags
``HEAD /datastore/image``              does an image id exist
``PUT  /datastore/image``              upload an image (``params`` carries ``text``)
``GET/PUT /datastore/image/info``      read / update the image info (the report)
``GET  /datastore/image``              download an image
``POST /infer/{model}``                segment (multipart answer: params + label)
``POST /activelearning/{strategy}``    next image to label (with its info/report)
``PUT  /datastore/label``              save a label (tag ``final``)
``POST/GET/DELETE /train/``            start / status / stop training
=====================================  =============================================
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.client import HTTPException as _HTTPClientException
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import quote, urlencode

from .errors import ReportSegmentError
from .httputil import (
    decode_multipart,
    encode_multipart,
    filename_from_disposition,
    is_loopback,
    json_or_none,
    normalize_server_url,
    safe_filename,
    server_reason,
)
from .report import DATASTORE_TEXT_KEY, MAX_REPORT_BYTES, validate_report

DEFAULT_MODEL = "fasttextdiff"
DEFAULT_STRATEGY = "uncertainty"
#: Short calls (info, status polls) never wait longer than this, so a UI poll cannot hang.
QUICK_TIMEOUT = 15.0


@dataclass
class SegmentationResult:
    """What one ``segment`` call produced; files live in ``out_dir`` (the caller's to delete)."""

    image_id: str
    label_path: Optional[str]
    uncertainty_path: Optional[str]
    labels: Dict[str, int]
    summary: Dict[str, Any]
    params: Dict[str, Any]
    out_dir: str

    @property
    def label_names(self) -> List[str]:
        """Foreground label names in label-value order."""
        return [name for name, value in sorted(self.labels.items(), key=lambda kv: kv[1]) if value != 0]

    @property
    def uncertainty_mean(self) -> Optional[float]:
        value = self.summary.get("uncertainty_mean")
        return float(value) if isinstance(value, (int, float)) else None


@dataclass
class Sample:
    """The image an active-learning strategy picked, with its report."""

    image_id: str
    report: str
    image_path: Optional[str]
    info: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DatastoreImage:
    """One image of the server's datastore: its report and the tags of its labels."""

    image_id: str
    report: str
    label_tags: List[str]
    info: Dict[str, Any] = field(default_factory=dict)

    @property
    def labeled(self) -> bool:
        """True when a reviewed (``final``) label is stored."""
        return "final" in self.label_tags


@dataclass
class TrainProgress:
    """Training state in the shape a progress bar needs."""

    state: str  # "NONE", "SUBMITTED", "RUNNING", "DONE", "ERROR", "STOPPED"
    running: bool
    percent: int
    epoch: Optional[int]
    total_epochs: Optional[int]
    best_metric: Optional[float]
    message: str


class FastTextDiffClient:
    """Talks to one FastTextDiff MONAI Label server.

    >>> client = FastTextDiffClient("http://127.0.0.1:8000")      # doctest: +SKIP
    >>> image_id = client.upload_image("chest.nii.gz", text="Left lower lobe opacity.")  # doctest: +SKIP
    >>> result = client.segment(image_id)                           # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        timeout: float = 300.0,
        tmpdir: Optional[str] = None,
        client_id: str = "slicer-reportsegment",
        token: Optional[str] = None,
    ):
        self.url = normalize_server_url(url)
        #: bearer token for a server with MONAI Label authentication on (see login())
        self.token = token
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ReportSegmentError(f"The timeout must be a positive number of seconds, not {timeout!r}.")
        self.timeout = float(timeout)
        self.tmpdir = tmpdir
        self.client_id = client_id
        #: the server's report size limit (UTF-8 bytes); updated from /info/ by info()
        self.max_report_bytes = MAX_REPORT_BYTES
        handlers: List[urllib.request.BaseHandler] = []
        if is_loopback(self.url):
            handlers.append(urllib.request.ProxyHandler({}))  # never send 127.0.0.1 through a proxy
        self._opener = urllib.request.build_opener(*handlers)

    def __repr__(self) -> str:
        return f"FastTextDiffClient({self.url!r}, timeout={self.timeout})"

    # ------------------------------------------------------------------ transport
    def _request(
        self,
        method: str,
        path: str,
        what: str,
        query: Optional[Mapping[str, Any]] = None,
        body: Optional[bytes] = None,
        content_type: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Tuple[int, Any, bytes]:
        """Send one request; return ``(status, headers, body)`` for 2xx, else raise
        ReportSegmentError. ``what`` completes "... failed to <what>" style sentences."""
        url = self.url + path
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json, multipart/form-data, */*"}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if content_type:
            headers["Content-Type"] = content_type
        request = urllib.request.Request(url, data=body, method=method, headers=headers)
        wait = self.timeout if timeout is None else min(timeout, self.timeout)
        try:
            with self._opener.open(request, timeout=wait) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            data = b""
            try:
                data = exc.read() or b""
            except (OSError, _HTTPClientException):
                pass
            raise self._http_error(what, exc.code, data) from None
        except urllib.error.URLError as exc:
            raise self._connection_error(what, exc.reason, wait) from None
        except (socket.timeout, TimeoutError) as exc:
            raise self._connection_error(what, exc, wait) from None
        except (ConnectionError, _HTTPClientException, OSError) as exc:
            raise self._connection_error(what, exc, wait) from None

    def _connection_error(self, what: str, reason: Any, wait: float) -> ReportSegmentError:
        if isinstance(reason, (socket.timeout, TimeoutError)) or "timed out" in str(reason):
            message = f"The server at {self.url} did not answer within {wait:g} seconds while trying to {what}."
        elif isinstance(reason, ConnectionRefusedError):
            message = (
                f"Cannot connect to the FastTextDiff server at {self.url}: nothing is listening there "
                f"(start it with `make serve`, or check the URL and port)."
            )
        elif isinstance(reason, socket.gaierror):
            message = f"Cannot find the server host in {self.url}; check the URL."
        elif isinstance(reason, ssl.SSLError):
            message = f"A secure connection to {self.url} failed ({getattr(reason, 'reason', None) or reason})."
        else:
            detail = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
            message = f"Cannot {what}: the connection to {self.url} failed ({detail})."
        return ReportSegmentError(message, status=None, reason=str(reason))

    def _http_error(self, what: str, status: int, data: bytes) -> ReportSegmentError:
        reason = server_reason(data) or f"HTTP {status}"
        tail = reason if reason.endswith((".", "!", "?")) else reason + "."
        if status == 503:
            message = f"The server cannot {what} yet: {tail}"
        elif status == 429:
            message = f"The server is busy and cannot {what} now: {tail}"
        elif status in (401, 403):
            message = f"The server refused to {what} (HTTP {status}, authentication needed): {tail}"
        elif status == 404 and reason.lower() in ("not found", "http 404"):
            message = (
                f"The server at {self.url} has no such endpoint (HTTP 404) while trying to {what}; "
                f"is it a FastTextDiff MONAI Label server?"
            )
        elif 400 <= status < 500:
            message = f"The server refused to {what} (HTTP {status}): {tail}"
        else:
            message = f"The server failed to {what} (HTTP {status}): {tail}"
        return ReportSegmentError(message, status=status, reason=reason)

    def _json(self, data: bytes, what: str) -> Any:
        if not data:
            return None
        payload = json_or_none(data)
        if payload is None and data.strip() not in (b"null", b""):
            raise ReportSegmentError(f"The server sent an answer that is not JSON while trying to {what}.")
        return payload

    def _new_dir(self, out_dir: Optional[str]) -> str:
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            return out_dir
        return tempfile.mkdtemp(prefix="reportsegment-", dir=self.tmpdir)

    # ------------------------------------------------------------------ server
    def info(self) -> Dict[str, Any]:
        """The server's ``/info/``: name, version, labels, models, trainers, strategies, scoring,
        train_stats and datastore counts."""
        _, _, data = self._request("GET", "/info/", "connect", timeout=QUICK_TIMEOUT)
        payload = self._json(data, "connect")
        if not isinstance(payload, dict) or "models" not in payload:
            raise ReportSegmentError(f"The server at {self.url} does not look like a MONAI Label server.")
        limit = ((payload.get("fasttextdiff") or {}).get("conf") or {}).get("max_text_bytes")
        if isinstance(limit, int) and limit > 0:
            self.max_report_bytes = limit
        return payload

    def auth_enabled(self) -> bool:
        """True when the server has MONAI Label's authentication (Keycloak) switched on (a server
        without the ``/auth/`` endpoints has none)."""
        try:
            _, _, data = self._request("GET", "/auth/", "check whether the server needs a login",
                                       timeout=QUICK_TIMEOUT)
        except ReportSegmentError as exc:
            if exc.status == 404:
                return False
            raise
        payload = self._json(data, "check whether the server needs a login")
        return bool(isinstance(payload, dict) and payload.get("enabled"))

    def login(self, username: str, password: str) -> str:
        """Get a bearer token from the server's ``/auth/token`` (MONAI Label forwards the user name
        and password to its Keycloak realm); later requests send it. Returns the token."""
        if not username or not password:
            raise ReportSegmentError("A user name and a password are needed to log in.")
        body = urlencode({"username": username, "password": password, "grant_type": "password"}).encode("utf-8")
        no_login = ReportSegmentError(f"The server at {self.url} has no login: its authentication is switched off.")
        try:
            _, _, data = self._request(
                "POST", "/auth/token", "log in", body=body, content_type="application/x-www-form-urlencoded",
                timeout=60.0
            )
        except ReportSegmentError as exc:
            if exc.status == 404:
                raise no_login from None
            raise
        payload = self._json(data, "log in")
        token = payload.get("access_token") if isinstance(payload, dict) else None
        if not token:
            raise no_login
        self.token = str(token)
        return self.token

    def model_state(self, info: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """The FastTextDiff model's state from /info/ (``{"state": "ready" | "preparing" | ...}``);
        {} for a server that does not report one."""
        info = self.info() if info is None else info
        state = (info.get("fasttextdiff") or {}).get("model")
        return dict(state) if isinstance(state, dict) else {}

    # ------------------------------------------------------------------ datastore
    def list_images(self) -> List[DatastoreImage]:
        """Every image of the datastore with its report and label tags, sorted by id."""
        _, _, data = self._request(
            "GET", "/datastore/", "list the datastore", query={"output": "all"}, timeout=QUICK_TIMEOUT
        )
        payload = self._json(data, "list the datastore")
        objects = payload.get("objects") if isinstance(payload, dict) else None
        if not isinstance(objects, dict):
            raise ReportSegmentError("The server's datastore listing has no 'objects'.")
        images = []
        for image_id, entry in objects.items():
            entry = entry if isinstance(entry, dict) else {}
            info = (entry.get("image") or {}).get("info") or {}
            report = info.get(DATASTORE_TEXT_KEY) if isinstance(info, dict) else None
            tags = sorted(str(tag) for tag in (entry.get("labels") or {}))
            images.append(
                DatastoreImage(str(image_id), report if isinstance(report, str) else "", tags, dict(info or {}))
            )
        return sorted(images, key=lambda image: image.image_id)

    def image_exists(self, image_id: str) -> bool:
        _require_id(image_id)
        try:
            self._request(
                "HEAD", "/datastore/image", "look up the image", query={"image": image_id}, timeout=QUICK_TIMEOUT
            )
        except ReportSegmentError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def unused_image_id(self, base: str) -> str:
        """``base`` when the datastore has no image of that id, else ``base_2``, ``base_3``, ...
        (so a new volume never lands on someone else's image of the same name)."""
        _require_id(base)
        candidate = base
        number = 1
        while self.image_exists(candidate):
            number += 1
            if number > 1000:
                raise ReportSegmentError(f"Too many images named like '{base}' in the datastore; rename the volume.")
            candidate = f"{base}_{number}"
        return candidate

    def upload_image(
        self, path: str, image_id: Optional[str] = None, text: Optional[str] = None, replace: bool = False
    ) -> str:
        """Put an image with its report into the datastore; returns the image id.

        When ``image_id`` is already in the datastore and ``replace`` is False, the image is not
        sent again (that would drop its labels): only the report is updated."""
        if not os.path.isfile(path):
            raise ReportSegmentError(f"The image file {path} does not exist.")
        report = None if text is None else validate_report(text, self.max_report_bytes)
        if image_id:
            _require_id(image_id)
            if not replace and self.image_exists(image_id):
                if report is not None:
                    self.set_report(image_id, report)
                return image_id
        params: Dict[str, Any] = {"client_id": self.client_id}
        if replace:
            params["replace"] = True  # the server refuses an existing id (409) unless asked to replace it
        if report is not None:
            params[DATASTORE_TEXT_KEY] = report
        body, content_type = encode_multipart({"params": json.dumps(params)}, {"file": path})
        _, _, data = self._request(
            "PUT",
            "/datastore/image",
            "upload the image",
            query={"image": image_id} if image_id else None,
            body=body,
            content_type=content_type,
        )
        payload = self._json(data, "upload the image")
        if not isinstance(payload, dict) or not payload.get("image"):
            raise ReportSegmentError("The server accepted the upload but returned no image id.")
        return str(payload["image"])

    def image_info(self, image_id: str) -> Dict[str, Any]:
        _require_id(image_id)
        _, _, data = self._request(
            "GET", "/datastore/image/info", "read the image info", query={"image": image_id}, timeout=QUICK_TIMEOUT
        )
        payload = self._json(data, "read the image info")
        if not payload:
            # stock MONAI Label answers {} for an unknown id
            raise ReportSegmentError(f"The image '{image_id}' is not in the server's datastore.", status=404)
        if not isinstance(payload, dict):
            raise ReportSegmentError("The server sent image info that is not a JSON object.")
        return payload

    def set_report(self, image_id: str, text: str) -> str:
        """Store (or replace) the report of an image already in the datastore; returns the stored
        (normalised) text."""
        _require_id(image_id)
        report = validate_report(text, self.max_report_bytes)
        body, content_type = encode_multipart({"info": json.dumps({DATASTORE_TEXT_KEY: report})})
        self._request(
            "PUT",
            "/datastore/image/info",
            "save the report",
            query={"image": image_id},
            body=body,
            content_type=content_type,
        )
        return report

    def get_report(self, image_id: str) -> str:
        """The report stored for an image ("" when it has none)."""
        value = self.image_info(image_id).get(DATASTORE_TEXT_KEY)
        return value if isinstance(value, str) else ""

    def download_image(self, image_id: str, out_dir: Optional[str] = None) -> str:
        """Download an image of the datastore; returns the local file path."""
        _require_id(image_id)
        _, headers, data = self._request("GET", "/datastore/image", "download the image", query={"image": image_id})
        directory = self._new_dir(out_dir)
        name = filename_from_disposition(headers.get("Content-Disposition"), image_id)
        path = os.path.join(directory, name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    # ------------------------------------------------------------------ infer
    def segment(
        self,
        image_id: str,
        text: Optional[str] = None,
        model: str = DEFAULT_MODEL,
        out_dir: Optional[str] = None,
        params: Optional[Mapping[str, Any]] = None,
    ) -> SegmentationResult:
        """Segment a datastore image. ``text`` conditions the model on this report; without it the
        server uses the report stored for the image. Returns the label file, the uncertainty map
        (when the server provides it), the label names and the uncertainty summary."""
        _require_id(image_id)
        _require_id(model, "model")
        request: Dict[str, Any] = {"client_id": self.client_id}
        request.update(params or {})
        if text is not None:
            request[DATASTORE_TEXT_KEY] = validate_report(text, self.max_report_bytes)
        body, content_type = encode_multipart({"params": json.dumps(request)})
        _, headers, data = self._request(
            "POST",
            f"/infer/{quote(model, safe='')}",
            "segment the image",
            query={"image": image_id},
            body=body,
            content_type=content_type,
        )
        directory = self._new_dir(out_dir)
        answer_type = headers.get("Content-Type", "")
        result_params: Dict[str, Any] = {}
        label_path = None
        extra_files: Dict[str, str] = {}
        if answer_type.startswith("multipart/"):
            for part in decode_multipart(data, answer_type):
                if part.filename is None and part.name == "params":
                    loaded = json_or_none(part.data)
                    if isinstance(loaded, str):
                        loaded = json_or_none(loaded.encode("utf-8"))
                    result_params = loaded if isinstance(loaded, dict) else {}
                elif part.filename is not None:
                    path = os.path.join(directory, safe_filename(part.filename))
                    with open(path, "wb") as handle:
                        handle.write(part.data)
                    if part.name in ("image", "label", "file") and label_path is None:
                        label_path = path
                    else:
                        extra_files[part.name or part.filename] = path
        else:
            loaded = self._json(data, "segment the image")
            result_params = loaded if isinstance(loaded, dict) else {}
        labels = _label_map(result_params.get("labels"))
        summary = _summary(result_params)
        uncertainty_path = extra_files.get("uncertainty")
        if uncertainty_path is None:
            uncertainty_path = self._fetch_uncertainty(image_id, model, result_params, directory)
        return SegmentationResult(
            image_id=image_id,
            label_path=label_path,
            uncertainty_path=uncertainty_path,
            labels=labels,
            summary=summary,
            params=result_params,
            out_dir=directory,
        )

    def _fetch_uncertainty(
        self, image_id: str, model: str, params: Mapping[str, Any], directory: str
    ) -> Optional[str]:
        """Download the uncertainty map the infer result points at (a datastore label id and tag:
        ``params["uncertainty"]["map"]`` in the FastTextDiff app), when it names one."""
        ref = params.get("uncertainty")
        if not isinstance(ref, dict):
            return None
        if isinstance(ref.get("map"), dict):
            ref = ref["map"]
        label_id = ref.get("label") or ref.get("id")
        tag = ref.get("tag")
        if not label_id or not tag:
            return None
        _, headers, data = self._request(
            "GET",
            "/datastore/label",
            "download the uncertainty map",
            query={"label": label_id, "tag": tag},
        )
        name = filename_from_disposition(headers.get("Content-Disposition"), f"{image_id}_uncertainty.nii.gz")
        path = os.path.join(directory, "uncertainty_" + name if not name.startswith("uncertainty") else name)
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    # ------------------------------------------------------------------ active learning
    def next_sample(
        self, strategy: str = DEFAULT_STRATEGY, out_dir: Optional[str] = None, download: bool = True
    ) -> Sample:
        """Ask a strategy for the next image to label; download it (unless ``download`` is False)
        and return it with its report."""
        _require_id(strategy, "strategy")
        body = json.dumps({"client_id": self.client_id}).encode("utf-8")
        _, _, data = self._request(
            "POST",
            f"/activelearning/{quote(strategy, safe='')}",
            "pick the next sample",
            body=body,
            content_type="application/json",
        )
        payload = self._json(data, "pick the next sample")
        if not isinstance(payload, dict) or not payload.get("id"):
            raise ReportSegmentError(
                f"The '{strategy}' strategy has no image to offer: every image in the datastore is labeled."
            )
        image_id = str(payload["id"])
        report = payload.get(DATASTORE_TEXT_KEY)
        path = self.download_image(image_id, out_dir) if download else None
        return Sample(image_id=image_id, report=report if isinstance(report, str) else "", image_path=path,
                      info=payload)

    # ------------------------------------------------------------------ labels
    def submit_label(
        self,
        image_id: str,
        label_path: str,
        tag: str = "final",
        label_info: Optional[List[Dict[str, Any]]] = None,
    ) -> Dict[str, Any]:
        """Save a label file for a datastore image (``tag`` "final" = reviewed ground truth)."""
        _require_id(image_id)
        _require_id(tag, "tag")
        if not os.path.isfile(label_path):
            raise ReportSegmentError(f"The label file {label_path} does not exist.")
        params: Dict[str, Any] = {"client_id": self.client_id}
        if label_info:
            params["label_info"] = label_info
        body, content_type = encode_multipart({"params": json.dumps(params)}, {"label": label_path})
        _, _, data = self._request(
            "PUT",
            "/datastore/label",
            "save the label",
            query={"image": image_id, "tag": tag},
            body=body,
            content_type=content_type,
        )
        payload = self._json(data, "save the label")
        return payload if isinstance(payload, dict) else {}

    # ------------------------------------------------------------------ training
    def train(self, model: str = DEFAULT_MODEL, params: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
        """Start a training run in the background; returns the server's task record."""
        _require_id(model, "model")
        body = json.dumps(dict(params or {})).encode("utf-8")
        _, _, data = self._request(
            "POST",
            f"/train/{quote(model, safe='')}",
            "start training",
            body=body,
            content_type="application/json",
            timeout=60.0,
        )
        payload = self._json(data, "start training")
        return payload if isinstance(payload, dict) else {}

    def train_status(self, all: bool = False) -> Optional[Any]:
        """The latest training task (or all of them); None when no training ever ran."""
        try:
            _, _, data = self._request(
                "GET",
                "/train/",
                "report the training status",
                query={"all": "true" if all else "false"},
                timeout=QUICK_TIMEOUT,
            )
        except ReportSegmentError as exc:
            if exc.status == 404:
                return None
            raise
        return self._json(data, "report the training status")

    def is_training(self) -> bool:
        try:
            self._request(
                "GET",
                "/train/",
                "report the training status",
                query={"check_if_running": "true"},
                timeout=QUICK_TIMEOUT,
            )
        except ReportSegmentError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def stop_train(self) -> Optional[Dict[str, Any]]:
        """Stop the running training task; returns it, or None when none was running."""
        _, _, data = self._request("DELETE", "/train/", "stop training", timeout=60.0)
        payload = self._json(data, "stop training")
        return payload if isinstance(payload, dict) else None

    def train_progress(self, model: str = DEFAULT_MODEL) -> TrainProgress:
        """Training state for a progress bar: task status plus the model's train stats."""
        task = self.train_status()
        stats: Dict[str, Any] = {}
        if task is not None and isinstance(task, dict) and task.get("status") in ("RUNNING", "SUBMITTED", "DONE"):
            try:
                stats = (self.info().get("train_stats") or {}).get(model) or {}
            except ReportSegmentError:
                stats = {}
        return progress_from_status(task if isinstance(task, dict) else None, stats)

    def wait_for_training(self, timeout: float = 600.0, poll: float = 2.0) -> TrainProgress:
        """Block until the running training task ends (for scripts and tests, not for the UI)."""
        deadline = time.monotonic() + timeout
        progress = self.train_progress()
        while progress.running:
            if time.monotonic() > deadline:
                raise ReportSegmentError(f"Training did not finish within {timeout:g} seconds.")
            time.sleep(poll)
            progress = self.train_progress()
        return progress


# ---------------------------------------------------------------------- helpers
def _require_id(value: Any, what: str = "image id") -> None:
    if not isinstance(value, str) or not value.strip():
        raise ReportSegmentError(f"A {what} is needed.")
    if any(ch in value for ch in "\r\n\x00"):
        raise ReportSegmentError(f"The {what} '{value!r}' contains line breaks.")


def _label_map(labels: Any) -> Dict[str, int]:
    """Normalise the labels of an infer result to ``{name: value}`` (a dict as MONAI Label
    infer tasks report it, or a list of names meaning values 1..N)."""
    if isinstance(labels, dict):
        out: Dict[str, int] = {}
        for name, value in labels.items():
            try:
                out[str(name)] = int(value)
            except (TypeError, ValueError):
                continue
        return out
    if isinstance(labels, (list, tuple)):
        names = [str(n) for n in labels if str(n).lower() != "background"]
        return {name: index + 1 for index, name in enumerate(names)}
    return {}


def _summary(params: Mapping[str, Any]) -> Dict[str, Any]:
    """The uncertainty summary of an infer result as flat keys: ``uncertainty_mean``,
    ``uncertainty_per_label``, ``foreground_fraction`` (+ ``n_noise``, ``text_source``)."""
    summary: Dict[str, Any] = dict(params["summary"]) if isinstance(params.get("summary"), dict) else {}
    for key in ("uncertainty_mean", "uncertainty_per_label", "foreground_fraction", "text_source", "text_chars"):
        if key in params and key not in summary:
            summary[key] = params[key]
    unc = params.get("uncertainty")
    if isinstance(unc, dict):  # FastTextDiff app: {"mean", "per_label", "n_noise", "map"}
        summary.setdefault("uncertainty_mean", unc.get("mean"))
        summary.setdefault("uncertainty_per_label", unc.get("per_label"))
        if "n_noise" in unc:
            summary.setdefault("n_noise", unc["n_noise"])
    elif isinstance(unc, (int, float)):
        summary.setdefault("uncertainty_mean", unc)
    return summary


def progress_from_status(task: Optional[Mapping[str, Any]], stats: Optional[Mapping[str, Any]]) -> TrainProgress:
    """Turn MONAI Label's train task record and a trainer's stats into progress-bar values."""
    stats = stats or {}
    if not task:
        return TrainProgress("NONE", False, 0, None, None, None, "No training has run on this server yet.")
    state = str(task.get("status") or "SUBMITTED").upper()
    running = state in ("SUBMITTED", "RUNNING")
    last = stats.get("last") if isinstance(stats.get("last"), dict) else {}
    epoch = _int_or_none(stats.get("epoch", last.get("epoch")))
    total = _int_or_none(stats.get("total_epochs") or stats.get("max_epochs") or stats.get("epochs"))
    best = stats.get("best_metric")
    if best is None:
        best = stats.get("best_val_dice", last.get("best_val_dice", last.get("val_dice")))
    best = float(best) if isinstance(best, (int, float)) else None
    if state == "DONE":
        percent = 100
    elif running and epoch is not None and total:
        percent = max(1, min(99, int(100 * epoch / total)))
    else:
        percent = 0
    if state == "SUBMITTED":
        message = "Training is queued on the server."
    elif state == "RUNNING":
        message = "Training" + (f": epoch {epoch} of {total}" if epoch is not None and total else " is running")
        message += f", best Dice {best:.3f}." if best is not None else "."
    elif state == "DONE":
        message = "Training finished" + (f"; best Dice {best:.3f}." if best is not None else ".")
    elif state == "STOPPED":
        message = "Training was stopped; the published model is unchanged."
    elif state == "ERROR":
        details = task.get("details") or []
        last = str(list(details)[-1]).strip() if details else ""
        message = "Training failed on the server" + (f": {last[:200]}" if last else "; see the server log.")
        if not message.endswith("."):
            message += "."
    else:
        message = f"Training state: {state}."
    return TrainProgress(state, running, percent, epoch, total, best, message)


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def describe_server(info: Mapping[str, Any]) -> str:
    """One line for the 'server info' label: app, models, labels, strategies, datastore counts."""
    name = info.get("name") or "MONAI Label"
    version = info.get("version")
    models = ", ".join(sorted((info.get("models") or {}).keys())) or "none yet"
    labels = info.get("labels") or []
    if isinstance(labels, dict):
        labels = [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
    labels = [str(x) for x in labels if str(x).lower() != "background"]
    strategies = ", ".join(sorted((info.get("strategies") or {}).keys())) or "none"
    datastore = info.get("datastore") or {}
    total = datastore.get("total")
    done = datastore.get("completed")
    parts = [f"{name}" + (f" {version}" if version else ""), f"models: {models}"]
    model = (info.get("fasttextdiff") or {}).get("model")
    if isinstance(model, dict) and model.get("state"):
        parts.append(f"model {model['state']}")
    parts.append(f"labels: {', '.join(labels) if labels else 'none'}")
    parts.append(f"strategies: {strategies}")
    if total is not None:
        parts.append(f"images: {total}" + (f" ({done} labeled)" if done is not None else ""))
    return "; ".join(parts)

"""The app's own versions of the MONAI Label 0.8.5 endpoints that take files or do slow work.

`lib/routes.py` (from server.py, before the server serves) registers each function here in place of
MONAI Label's endpoint of the same path and method, with the same parameters and the same role
(RBAC, when auth is on). Why each one is replaced:

* uploads (`PUT /datastore/image`, `PUT /datastore/label`, `POST /infer/{model}`, `PUT /session/`)
  are written into a per-request temporary folder under the client's own (checked) file name,
  removed on every path (see lib/uploads.py); a session archive is unpacked only after every
  member is checked;
* work that takes seconds (uploads read the whole image, `run_sync` train/batch/scoring, the
  dataset zip) is a plain `def`, which FastAPI runs in its thread pool: the event loop keeps
  answering `/info` meanwhile;
* request bodies are checked before MONAI Label merges them into the request (`{"model": ...}` or
  `{"strategy": []}` in a body used to override the path), and its raw busy answers
  ("++++++++++ Scoring Task is Already Running", 429) become a sentence with 409;
* routes that cannot work here answer a 4xx with the reason instead of failing or leaking:
  `PUT /model/{name}` (models are published by training), whole-slide infer, the DICOMweb proxy
  with a local studies folder, `/logs/gpu` without `nvidia-smi`, `POST /reload`.

Everything else stays MONAI Label's code, called from here after the checks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, List, Optional

from fastapi import Depends, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, Response, StreamingResponse
from monailabel.config import settings
from monailabel.endpoints import batch_infer as ml_batch_infer
from monailabel.endpoints import datastore as ml_datastore
from monailabel.endpoints import logs as ml_logs
from monailabel.endpoints import proxy as ml_proxy
from monailabel.endpoints import scoring as ml_scoring
from monailabel.endpoints import train as ml_train
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import get_mime_type

from lib.datastore import FastTextDiffDatastore
from lib.origin import REQUEST_ORIGIN, REQUEST_UPLOAD
from lib.routes import max_upload_bytes, stream_file
from lib.uploads import ARCHIVE_SUFFIXES, extract_archive, is_archive_name, save_upload, upload_folder
from lib.validation import (bad_request, check_human_tag, check_image_id, check_int, check_json_value,
                            check_label_tag, check_machine_tag, check_session_id, parse_json_object)

logger = logging.getLogger(__name__)

USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
ANNOTATOR = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
ADMIN = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))

ARCHIVE_EXPANSION = 4  # an unpacked archive may be this many times the upload limit

# infer params that would redirect MONAI Label's handling of the request
_INFER_RESERVED = ("image", "model", "session", "session_id", "label", "label_tag", "save_label", "description")


# ---------------------------------------------------------------------------------------------- helpers
def _stream(handle, filename: str, media_type: str) -> StreamingResponse:
    """Send an open file (its path may already be gone) as an attachment named `filename`."""
    from urllib.parse import quote

    return stream_file(handle, media_type, {"content-disposition": f"attachment; filename*=utf-8''{quote(filename)}"})


def _open_and_unlink(path: str):
    """Open a server-made result file and remove its name at once: nothing is left whatever
    happens to the response (a client that disconnects mid-download included)."""
    handle = open(path, "rb")  # noqa: SIM115 - closed by _stream or the caller
    os.unlink(path)
    return handle


def _body(params: Any, what: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(400, f"the {what} body must be a JSON object, got {type(params).__name__}")
    return check_json_value(dict(params), f"the {what} body")


def _no_override(params: dict, **given: Any) -> None:
    """MONAI Label merges the body into the request after the path: a body key must not change what
    the path (or query) already says."""
    for key, value in given.items():
        if key in params and params[key] != value:
            raise bad_request(400, f"{key!r} is given by the request's path or query ({value!r}); remove it from "
                                   "the body")


def _busy(kind: str, route: str) -> HTTPException:
    return bad_request(409, f"a {kind} task is already running; see its progress with GET {route} or stop it with "
                            f"DELETE {route}, then try again")


def _run_task(call, kind: str, route: str):
    """Start (or, with run_sync, run) a MONAI Label task. Its work is the app's own, not the client's:
    a batch infer reads and labels datastore images by id, as a task subprocess would. MONAI Label's
    starters raise 429 with '++++++++++ ... Already Running'; that becomes a 409 with a sentence."""
    token = REQUEST_ORIGIN.set(None)
    try:
        return call()
    except HTTPException as exc:
        if exc.status_code == 429:
            raise _busy(kind, route) from None
        raise
    finally:
        REQUEST_ORIGIN.reset(token)


# ---------------------------------------------------------------------------------------------- datastore
def add_image(image: Optional[str] = None, params: str = Form("{}"), file: UploadFile = File(...),
              user: User = ANNOTATOR):
    """Upload an image. An existing id is refused (409) unless `params` has `"replace": true`."""
    save_params = parse_json_object(params, "params")
    replace = save_params.pop("replace", False)
    if not isinstance(replace, bool):
        raise bad_request(400, f"'replace' must be true or false, got {replace!r}")
    if user and user.username:
        save_params["user"] = user.username
    datastore = app_instance().datastore()
    with upload_folder() as folder:
        path = save_upload(file, folder, "image")
        if is_archive_name(path.name):
            path = _series_from_archive(path, folder)
        if isinstance(datastore, FastTextDiffDatastore):
            return datastore.add_image_checked(image or "", str(path), save_params, replace=replace)
        return {"image": datastore.add_image(image or "", str(path), save_params)}


def _series_from_archive(archive: Path, folder: Path) -> Path:
    """A .zip/.tar of one DICOM series, unpacked (checked) and stored as one NIfTI volume named after
    the archive (the datastore keeps single files)."""
    from fasttextdiff.data.io import read_image, write_image
    from fasttextdiff.utils.errors import ImageReadError

    unpacked = folder / "unpacked"
    unpacked.mkdir()
    extract_archive(archive, unpacked, ARCHIVE_EXPANSION * max_upload_bytes(app_instance()))
    series = unpacked
    while True:  # a zip of a folder: descend while there is one folder and no file
        entries = list(series.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            series = entries[0]
            continue
        break
    try:
        volume = read_image(series)
    except ImageReadError as exc:
        raise bad_request(415,
                          "cannot read the uploaded image: " + str(exc).replace(str(series), repr(archive.name))) \
            from None
    stem = archive.name
    for suffix in sorted(ARCHIVE_SUFFIXES, key=len, reverse=True):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return write_image(folder / f"{stem}.nii.gz", volume.array, like=volume)


def _who(user: Any) -> Optional[str]:
    """Who made a change, when authentication says who (without it MONAI Label calls everyone 'admin')."""
    return (getattr(user, "username", None) or None) if settings.MONAI_LABEL_AUTH_ENABLE else None


def _local_datastore():
    datastore = app_instance().datastore()
    if not isinstance(datastore, FastTextDiffDatastore):
        raise bad_request(404, "this server's studies are not a local folder: labels are kept by its DICOMweb server")
    return datastore


def save_label(image: str, params: str = Form("{}"), tag: str = DefaultLabelTag.FINAL.value,
               label: UploadFile = File(...), user: User = ANNOTATOR):
    """A person's label (any tag but the model's `original`/`uncertainty`); the one it replaces is kept
    in the label history."""
    save_params = parse_json_object(params, "params")
    tag = check_human_tag(tag or DefaultLabelTag.FINAL.value)
    instance = app_instance()
    datastore = _local_datastore()
    with upload_folder() as folder:
        path = save_upload(label, folder, "label")
        label_id = datastore.save_human_label(image, str(path), tag, save_params, who=_who(user))
    res = instance.on_save_label(image, label_id) or {}
    res.update({"image": image, "label": label_id, "tag": tag})
    return res


def remove_label(id: str, tag: str, user: User = ADMIN):  # noqa: A002 - MONAI Label's parameter name
    """MONAI Label's DELETE /datastore/label: a person's label moves to the label history (a DICOMweb
    datastore deletes as MONAI Label does: its server keeps the series)."""
    datastore = app_instance().datastore()
    if isinstance(datastore, FastTextDiffDatastore):
        datastore.remove_label(id, tag, who=_who(user))
    else:
        datastore.remove_label(id, tag)
    return {}


def remove_image(id: str, user: User = ADMIN):  # noqa: A002 - MONAI Label's parameter name
    """MONAI Label's DELETE /datastore/image: the image and its human labels move to the label history
    (a DICOMweb datastore deletes as MONAI Label does)."""
    datastore = app_instance().datastore()
    if isinstance(datastore, FastTextDiffDatastore):
        datastore.remove_image(id, who=_who(user))
    else:
        datastore.remove_image(id)
    return {}


def label_history(image: str, tag: Optional[str] = None, user: User = USER):
    """The kept versions of an image's labels (replaced, deleted, or no longer fitting), newest first."""
    datastore = _local_datastore()
    if not datastore.has_image(check_image_id(image)) and not datastore.history.tags(image):
        raise bad_request(404, f"image {image!r} is not in the datastore and has no kept labels")
    return datastore.label_history(image, tag)


def restore_label(image: str, version: str, tag: str = DefaultLabelTag.FINAL.value, user: User = ANNOTATOR):
    """Make a kept version the current label again; the label it replaces is kept in turn."""
    instance = app_instance()
    datastore = _local_datastore()
    if not datastore.has_image(check_image_id(image)):
        raise bad_request(404, f"image {image!r} is not in the datastore (upload it again, then restore its label)")
    result = datastore.restore_label(image, tag, version, who=_who(user))
    instance.on_save_label(image, image)
    return result


def check_image(image: str, check_sum: Optional[str] = None, user: User = USER):
    if check_sum:
        algo = check_sum.split(":")[0] if ":" in check_sum else "SHA256"
        if algo not in ("SHA256", "SHA512", "MD5"):
            raise bad_request(400, f"unsupported checksum algorithm {algo[:20]!r}; use SHA256, SHA512 or MD5")
    return ml_datastore.download_image(image, check_only=True, check_sum=check_sum)


def download_dataset(limit_cases: Optional[int] = None, user: User = ANNOTATOR):
    """The labeled images, their final labels and the datastore record as one zip."""
    datastore = app_instance().datastore()
    if not isinstance(datastore, FastTextDiffDatastore):
        raise bad_request(404, "this datastore cannot be downloaded as a zip archive")
    with tempfile.TemporaryDirectory(prefix="fasttextdiff-dataset-") as folder:
        path = datastore.write_dataset_archive(Path(folder) / "dataset.zip", limit_cases)
        handle = open(path, "rb")  # noqa: SIM115 - the folder goes now; the open file stays readable
    return _stream(handle, "dataset.zip", "application/zip")


# ---------------------------------------------------------------------------------------------- infer
def run_inference(model: str, image: str = "", session_id: str = "", params: str = Form("{}"),
                  file: UploadFile = File(None), label: UploadFile = File(None),
                  output: Optional[ResultType] = None, user: User = USER):
    """MONAI Label's /infer with the uploads in a private folder and the result file removed once read."""
    p = parse_json_object(params, "params")
    reserved = sorted(set(p) & set(_INFER_RESERVED))
    if reserved:
        raise bad_request(400, f"params may not set {reserved}: the image comes from ?image=, an uploaded file or "
                               "?session_id=, and an infer never saves labels (save a reviewed label with "
                               "PUT /datastore/label)")
    if output == ResultType.dicom_seg:
        raise bad_request(400, "output=dicom_seg is not supported by this app; use output=image or output=json")
    if not file and not image and not session_id:
        raise bad_request(400, "give an image: ?image=<datastore id>, an uploaded file, or ?session_id=")
    instance = app_instance()
    request: dict = {"model": model, "image": image}
    with upload_folder() as folder:
        upload = None
        if file:
            upload = request["image"] = str(save_upload(file, folder, "file"))
        if label:  # a label may have the image's own file name
            (folder / "label").mkdir()
            request["label"] = str(save_upload(label, folder / "label", "label"))
        request.update(instance.info().get("config", {}).get("infer", {}))
        request.update(p)
        if session_id:
            check_session_id(session_id)
            session = instance.sessions().get_session(session_id) if instance.sessions() else None
            if not session:
                raise bad_request(404, f"no session {session_id!r} (it may have expired)")
            upload = request["image"] = session.image
            request["session"] = session.to_json()
        logger.info("Infer Request: %s", request)  # as MONAI Label logs it; report text is redacted (lib/redact.py)
        token = REQUEST_UPLOAD.set(upload)
        try:
            result = instance.infer(request)
        finally:
            REQUEST_UPLOAD.reset(token)
    return _infer_response(instance, result, output)


def _infer_response(instance, result: dict, output: Optional[ResultType]):
    res_json = result.get("params")
    res_img = result.get("file") or result.get("label")
    handle = name = None
    if res_img and os.path.exists(res_img):  # a result file this request made: read it and remove it
        name = os.path.basename(res_img)
        handle = _open_and_unlink(res_img)
    elif res_img:
        path = instance.datastore().get_label_uri(res_img, result.get("tag"))
        if path and os.path.isfile(path):
            name, handle = os.path.basename(path), open(path, "rb")  # noqa: SIM115
    if output == ResultType.json or handle is None:
        if handle is not None:
            handle.close()
        return res_json
    if output == ResultType.image:
        return _stream(handle, name, get_mime_type(name))
    from requests_toolbelt import MultipartEncoder

    with handle:
        data = handle.read()
    encoder = MultipartEncoder(fields={"params": (None, json.dumps(res_json), "application/json"),
                                       "image": (name, data, get_mime_type(name))})
    return Response(content=encoder.to_string(), media_type=encoder.content_type)


def no_wsi_inference(model: str, user: User = USER):
    raise bad_request(404, "this app serves no whole-slide (WSI) models; use POST /infer/{model}")


# ---------------------------------------------------------------------------------------------- tasks
def _known(kind: str, name: str, names) -> None:
    """Refuse an unknown task name before MONAI Label starts a subprocess for it."""
    if name not in names:
        raise bad_request(404, f"unknown {kind} {str(name)[:40]!r}; available: {sorted(names)}")


def batch_infer_run(model: str, images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
                    params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = ADMIN):
    _known("model", model, app_instance().info().get("models", {}))
    body = _body(params, "batch infer") if params is not None else dict(_BATCH_DEFAULTS)
    _no_override(body, model=model, images=images)
    body["label_tag"] = check_machine_tag(body.get("label_tag") or DefaultLabelTag.ORIGINAL.value)
    return _run_task(lambda: ml_batch_infer.run(model, images, body, run_sync), "batch inference", "/batch/infer")


def train_run_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = ADMIN):
    """Every train task in turn (queued), each with `params[<task>]` (MONAI Label's 'ALL' in Slicer)."""
    body = _body(params, "train")
    trainers = app_instance().info().get("trainers", {})
    for key, value in body.items():
        if key in trainers and not isinstance(value, dict):
            raise bad_request(400, f"params[{key!r}] must be a JSON object of that task's options")
    if "model" in body:
        raise bad_request(400, "'model' cannot be given here; use POST /train/{model} for one task")
    app_instance().check_can_train(sorted(trainers))  # 409 with the reason instead of SUBMITTED, then ERROR
    return _run_task(lambda: ml_train.run(body, run_sync), "training", "/train/")


def train_run_model(model: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                    enqueue: Optional[bool] = False, user: User = ADMIN):
    instance = app_instance()
    _known("train task", model, instance.info().get("trainers", {}))
    body = _body(params, "train")
    _no_override(body, model=model)
    instance.check_can_train([model])  # 409 with the reason instead of SUBMITTED, then ERROR
    return _run_task(lambda: ml_train.run_model(model, body, run_sync, enqueue), "training", "/train/")


def scoring_run_all(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = ANNOTATOR):
    body = _body(params, "scoring")
    methods = app_instance().info().get("scoring", {})
    for key, value in body.items():
        if key in methods and not isinstance(value, dict):
            raise bad_request(400, f"params[{key!r}] must be a JSON object of that method's options")
    if "method" in body:
        raise bad_request(400, "'method' cannot be given here; use POST /scoring/{method} for one method")
    return _run_task(lambda: ml_scoring.run(body, run_sync), "scoring", "/scoring/")


def scoring_run_method(method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False,
                       user: User = ANNOTATOR):
    _known("scoring method", method, app_instance().info().get("scoring", {}))
    body = _body(params, "scoring")
    _no_override(body, method=method)
    return _run_task(lambda: ml_scoring.run_method(method, body, run_sync), "scoring", "/scoring/")


def next_sample(strategy: str, params: Optional[dict] = None, user: User = USER):
    """MONAI Label's /activelearning/{strategy} with a checked body; the hand-out time is recorded
    by the app itself (`strategy` is an image info key clients cannot set)."""
    import time

    instance = app_instance()
    _known("strategy", strategy, instance.info().get("strategies", {}))
    body = _body(params, "active learning")
    _no_override(body, strategy=strategy)
    client_id = body.get("client_id")
    if client_id is not None and not (isinstance(client_id, str) and len(client_id) <= 200):
        raise bad_request(400, "client_id must be a string of at most 200 characters")
    if body.get("label_tag") is not None:
        body["label_tag"] = check_label_tag(body["label_tag"])
    labels = body.get("labels")
    if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
        raise bad_request(400, "labels must be a list of label names")
    request = {"strategy": strategy, **instance.info().get("config", {}).get("activelearning", {}), **body}
    result = instance.next_sample(request)
    if not result:
        return {}
    datastore = instance.datastore()
    image_id = result["id"]
    info = datastore.get_image_info(image_id)
    handed_out = dict(info.get("strategy") or {})
    handed_out[strategy] = {"ts": int(time.time()), "client_id": client_id or (user.username if user else None)}
    update = getattr(datastore, "update_image_info_internal", None) or datastore.update_image_info
    update(image_id, {"strategy": handed_out})
    result.update(info)
    return result


# ---------------------------------------------------------------------------------------------- sessions
def _sessions():
    sessions = app_instance().sessions()
    if sessions is None:
        raise bad_request(406, "sessions are turned off on this server (MONAI_LABEL_SESSIONS=false)")
    return sessions


def create_session(uncompress: bool = False, expiry: int = 0, files: List[UploadFile] = File(...),
                   user: User = USER):
    """Keep uploaded file(s) for later requests (`?session_id=`): one file, several files (a folder),
    or one .zip/.tar archive unpacked with `uncompress=true`."""
    sessions = _sessions()
    if not files:
        raise bad_request(400, "no files were uploaded")
    with upload_folder() as folder:
        received = folder / "files"
        received.mkdir()
        saved = [save_upload(f, received, "file") for f in files]
        if uncompress:
            if len(saved) != 1:
                raise bad_request(400, f"uncompress=true takes one archive, got {len(saved)} files")
            source = folder / "unpacked"
            source.mkdir()
            if extract_archive(saved[0], source, ARCHIVE_EXPANSION * max_upload_bytes(app_instance())) == 0:
                raise bad_request(400, f"archive {saved[0].name!r} holds no files")
        else:
            source = saved[0] if len(saved) == 1 else received
        session_id, info = sessions.add_session(str(source), expiry, uncompress=False)
    logger.info("session %s created (%d file(s))", session_id, len(saved))
    return {"session_id": session_id, "session_info": info.to_json()}


def get_session(session_id: str, update_ts: bool = False, image: bool = False, user: User = USER):
    check_session_id(session_id)
    info = _sessions().get_session(session_id, update_ts=update_ts)
    if not info:
        raise bad_request(404, f"no session {session_id!r} (it may have expired)")
    if not image:
        return info.to_json()
    if os.path.isdir(info.image):
        count = sum(len(files) for _, _, files in os.walk(info.image))
        raise bad_request(400, f"session {session_id} holds a folder of {count} files (several files or an unpacked "
                               "archive), not one image; use it with POST /infer/{model}?session_id=")
    return FileResponse(info.image, media_type=get_mime_type(info.image), filename=os.path.basename(info.image))


def remove_session(session_id: str, user: User = USER):
    check_session_id(session_id)
    sessions = _sessions()
    info = sessions.get_session(session_id)
    if not info:
        raise bad_request(404, f"no session {session_id!r} (it may have expired)")
    sessions.remove_session(session_id)
    return info.to_json()


# ---------------------------------------------------------------------------------------------- others
def update_model(model: str, user: User = ANNOTATOR):
    raise HTTPException(405, detail="model files cannot be uploaded to this app: models are trained and published "
                                    "by its train tasks (POST /train/{model})", headers={"Allow": "GET, DELETE"})


def get_logs(lines: Optional[int] = 300, html: Optional[bool] = True, text: Optional[bool] = False,
             refresh: Optional[int] = 0, user: User = ADMIN):
    lines = check_int(300 if lines is None else lines, "lines", 0, 100_000)
    refresh = check_int(refresh or 0, "refresh", 0, 86_400)
    path = os.path.join(settings.MONAI_LABEL_APP_DIR, "logs", "app.log")
    if not os.path.isfile(path):
        raise bad_request(404, "this server writes no log file (it logs to its console)")
    return ml_logs.get_logs(path, lines, html, text, refresh)


def gpu_info(user: User = ADMIN):
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise bad_request(404, "nvidia-smi is not installed on the server: there is no NVIDIA GPU information")
    try:
        done = subprocess.run([exe], capture_output=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise bad_request(503, f"nvidia-smi did not answer ({type(exc).__name__})") from None
    if done.returncode != 0:
        raise bad_request(503, f"nvidia-smi failed (exit {done.returncode}): "
                               f"{done.stdout.decode('utf-8', 'replace').strip()[:200]}")
    return Response(content=done.stdout.decode("utf-8", "replace"), media_type="text/plain")


def _proxy(op: str):
    async def proxy(request: Request, path: str, user: User = USER):
        if not str(settings.MONAI_LABEL_STUDIES).startswith(("http://", "https://")):
            raise bad_request(404, "this server's studies are a local folder: there is no DICOMweb server to proxy")
        return await ml_proxy.proxy_dicom(request, op, path)

    proxy.__name__ = f"proxy_{op or 'dicom'}"
    return proxy


def get_ohif(path: str, user: User = USER):
    """The OHIF viewer's files, only from its own folder (MONAI Label served a folder there: a 500)."""
    root = os.path.realpath(os.path.join(os.path.dirname(ml_logs.__file__), "static", "ohif"))
    index = os.path.join(root, "index.html")
    if not os.path.isfile(index):
        raise bad_request(404, "the OHIF viewer is not installed with this server")
    if any(ord(c) < 32 for c in path):
        raise bad_request(404, "no such file in the OHIF viewer")
    target = os.path.realpath(os.path.join(root, path)) if path else index
    if not target.startswith(root + os.sep) or not os.path.isfile(target):
        target = index
    return FileResponse(target, media_type=get_mime_type(target))


def no_reload():
    raise bad_request(403, "reloading the app over HTTP is turned off; restart the server instead")


_BATCH_DEFAULTS = {"device": "cuda", "multi_gpu": True, "gpus": "all", "logging": "WARNING", "save_label": True,
                   "label_tag": DefaultLabelTag.ORIGINAL.value, "max_workers": 1, "max_batch_size": 0}

# (method, path without the API prefix) -> the function that answers it instead of MONAI Label's
REPLACEMENTS = {
    ("PUT", "/datastore/image"): add_image,
    ("PUT", "/datastore/"): add_image,
    ("PUT", "/datastore/label"): save_label,
    ("DELETE", "/datastore/label"): remove_label,
    ("DELETE", "/datastore/image"): remove_image,
    ("DELETE", "/datastore/"): remove_image,
    ("HEAD", "/datastore/image"): check_image,
    ("GET", "/datastore/dataset"): download_dataset,
    ("POST", "/infer/{model}"): run_inference,
    ("POST", "/infer/wsi/{model}"): no_wsi_inference,
    ("POST", "/infer/wsi_v2/{model}"): no_wsi_inference,
    ("POST", "/batch/infer/{model}"): batch_infer_run,
    ("POST", "/train/"): train_run_all,
    ("POST", "/train/{model}"): train_run_model,
    ("POST", "/scoring/"): scoring_run_all,
    ("POST", "/scoring/{method}"): scoring_run_method,
    ("POST", "/activelearning/{strategy}"): next_sample,
    ("PUT", "/session/"): create_session,
    ("GET", "/session/{session_id}"): get_session,
    ("DELETE", "/session/{session_id}"): remove_session,
    ("PUT", "/model/{model}"): update_model,
    ("GET", "/logs/"): get_logs,
    ("GET", "/logs/gpu"): gpu_info,
    ("GET", "/ohif/{path:path}"): get_ohif,
    ("POST", "/reload"): no_reload,
}
# routes MONAI Label does not have: (method, path without the API prefix, function, summary)
ADDITIONS = [
    ("GET", "/datastore/label/history", label_history,
     "The kept versions of an image's labels (a saved label never destroys the one it replaces)"),
    ("POST", "/datastore/label/restore", restore_label, "Make a kept version of a label the current one again"),
]
for _op in ("wado", "qido", "stow", ""):
    for _method in ("GET", "POST"):
        REPLACEMENTS[(_method, f"/proxy/dicom/{_op + '/' if _op else ''}{{path:path}}")] = _proxy(_op)

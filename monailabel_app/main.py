"""FastTextDiff as a MONAI Label app: report-conditioned segmentation, training and active learning.

    monailabel start_server --app monailabel_app --studies studies/demo --host 127.0.0.1 --port 8000 \
        [--conf model_dir DIR] [--conf n_noise 8] ...

See docs/SERVER.md for every `--conf` option, the endpoints and client examples.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Dict

_APP_DIR = os.path.dirname(os.path.realpath(__file__))
if _APP_DIR not in sys.path:  # `lib.*` must be this app's lib, also in MONAI Label's task subprocesses
    sys.path.insert(0, _APP_DIR)
# MONAI Label removes one copy after loading main.py; keep one for later imports of `lib.*`
if sys.path.count(_APP_DIR) < 2:
    sys.path.append(_APP_DIR)
from fasttextdiff.utils.environment import apply_process_defaults  # noqa: E402

apply_process_defaults()  # offline and passive-OpenMP defaults, before torch loads

from monailabel.config import settings  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402

from lib import redact  # noqa: E402
from lib.configs.app_conf import AppConf  # noqa: E402
from lib.configs.fasttextdiff import SCORING, FastTextDiffConfig  # noqa: E402
from lib.datastore import IMAGE_EXTENSIONS, FastTextDiffDatastore  # noqa: E402
from lib.default_model import DefaultModelBuilder  # noqa: E402
from lib.infers.batch import FastTextDiffBatchInfer  # noqa: E402
from lib.model_manager import ModelManager, ModelPaths  # noqa: E402
from lib.security import check_bind_host  # noqa: E402
from lib.validation import bad_request, check_image_id  # noqa: E402

logger = logging.getLogger(__name__)


class FastTextDiffApp(MONAILabelApp):
    """One model (`fasttextdiff`), two train tasks, four strategies, one scoring method."""

    def __init__(self, app_dir: str, studies: str, conf: Dict[str, str]):
        redact.install()
        self.app_conf = AppConf.from_conf(conf)  # a bad option stops the start with a sentence
        check_bind_host(sys.argv, self.app_conf.allow_remote, settings.MONAI_LABEL_AUTH_ENABLE)
        self.paths = ModelPaths.from_conf(self.app_conf, studies, app_dir)
        os.makedirs(self.paths.state, exist_ok=True)
        self.manager = ModelManager(self.app_conf, self.paths)
        self.task_config = FastTextDiffConfig(self.app_conf, self.paths, self.manager, lambda: self._datastore)
        self._builder: DefaultModelBuilder | None = None
        self._scoring_lock = threading.Lock()
        self._scoring_thread: threading.Thread | None = None
        self._scoring_again = False
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="FastTextDiff",
            description="Report-conditioned, label-efficient diffusion segmentation (2D images and volumes)",
            version="0.1.0",
        )

    # ------------------------------------------------------------------ MONAI Label hooks
    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        datastore = FastTextDiffDatastore(
            self.studies,
            extensions=list(IMAGE_EXTENSIONS),
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
            max_text_bytes=self.app_conf.max_text_bytes,
            history_dir=os.path.join(self.paths.state, "label-history"),
        )
        if not settings.MONAI_LABEL_DATASTORE_READ_ONLY:
            datastore.read_report_files()  # `<id>.txt` beside an image without a report
        return datastore

    def _load_sessions(self, load=False):
        """MONAI Label keeps session uploads in ~/.cache/monailabel/sessions; here they live in the
        app's state folder (unless MONAI_LABEL_SESSION_PATH says otherwise), beside its other files."""
        if not load:
            return None
        from monailabel.utils.sessions import Sessions

        store = settings.MONAI_LABEL_SESSION_PATH or os.path.join(self.paths.state, "sessions")
        return Sessions(store, settings.MONAI_LABEL_SESSION_EXPIRY)

    def init_infers(self):
        return self.task_config.infers()

    def init_trainers(self):
        return self.task_config.trainers()

    def init_strategies(self):
        return self.task_config.strategies()

    def init_scoring_methods(self):
        return self.task_config.scoring_methods()

    def init_batch_infer(self):
        return FastTextDiffBatchInfer(lambda: self._infers)

    def info(self):
        meta = super().info()
        served = self.served_model_summary()
        if isinstance(meta.get("models", {}).get("fasttextdiff"), dict):
            meta["models"]["fasttextdiff"].update(served)
        meta["fasttextdiff"] = {
            "model": dict(self.manager.refresh_status(), **served),
            "model_identity": self.paths.model_identity(),
            "conf": self.app_conf.to_dict(),
            "report_text_key": "text",
            "uncertainty_label_tag": "uncertainty",
            "scoring": SCORING,
        }
        return meta

    def served_model_summary(self) -> Dict[str, Any]:
        """What `/info` says about the served model, read now (never cached): its validation Dice on the
        studies' validation images, its input size and intensity window (planned ones while building)."""
        import json

        from fasttextdiff.config import MODEL_CONFIG_FILE

        from lib.geometry import read_geometry
        from lib.training import read_served_validation

        served = self.paths.served_model_dir()
        out: Dict[str, Any] = {"val_dice": None, "val_images": None, "image_size": None, "window": None}
        if served is not None:
            validation = read_served_validation(self.paths)
            out.update(val_dice=validation.get("val_dice"), val_images=validation.get("val_images"),
                       val_metric=validation.get("val_metric"), val_per_image=validation.get("val_per_image"))
            try:
                backbone = json.loads((served / MODEL_CONFIG_FILE).read_text()).get("backbone", {})
            except (OSError, ValueError):
                backbone = {}
            out.update(image_size=backbone.get("image_size"), window=backbone.get("window"),
                       body_crop=bool(backbone.get("window")) and backbone.get("body_crop",
                                                                               True))  # crop only with a HU window
            out["intensity"] = f"HU window center {backbone['window'][0]:g}, width {backbone['window'][1]:g}" \
                if backbone.get("window") else "percentiles 0.5/99.5 per image"
        out["inference"] = self.manager.inference_settings()  # precision + device the numbers come from
        geometry = read_geometry(self.paths.state)
        if geometry:
            out["geometry_choice"] = geometry
            if served is None:
                out.update(image_size=geometry.get("image_size"), window=geometry.get("window"))
        return out

    def on_init_complete(self):
        """Server process only (MONAI Label's task subprocesses never call this)."""
        served = getattr(sys.modules.get("monailabel.app"), "app", None)
        if served is not None and getattr(served.state, "fasttextdiff_app", None) is not self:
            raise RuntimeError("FastTextDiff's HTTP layer (body limits, checked input) is not installed: start "
                               "the server with `--uvicorn_app server:app` and monailabel_app/ on PYTHONPATH "
                               "(docs/SERVER.md)")
        super().on_init_complete()
        if self.manager.ready:
            self._announce_ready()
        self._start_default_model()

    def _start_default_model(self) -> bool:
        if not self.app_conf.prepare_default_model or self.manager.ready:
            return False
        if self._builder is not None and self._builder.thread is not None and self._builder.thread.is_alive():
            return False
        self._builder = DefaultModelBuilder(self.app_conf, self.manager, self._datastore,
                                            on_ready=self._on_default_ready)
        return self._builder.start()

    def _on_default_ready(self) -> None:
        self._announce_ready()
        self.async_scoring(None)

    def _announce_ready(self) -> None:
        """One line on stdout when the model becomes usable: what serves, and where."""
        served = self.paths.served_model_dir()
        host = "127.0.0.1"
        for flag in ("--host", "-h"):
            if flag in sys.argv[:-1]:
                host = sys.argv[sys.argv.index(flag) + 1]
        print(f"ready: model fasttextdiff ({served}) serving at http://{host}:{settings.MONAI_LABEL_SERVER_PORT}",
              flush=True)

    def on_save_label(self, image_id, label_id):
        """A first final label in studies that had none starts the default-model build."""
        result = super().on_save_label(image_id, label_id)
        if self._server_mode and self.manager.status.get("state") in ("waiting", "missing", "failed"):
            if self._start_default_model():
                logger.info("a label was saved: building the default model now")
        return result

    def check_can_train(self, names) -> None:
        """409 with the reason, before MONAI Label submits a train task that cannot start."""
        state = self.manager.refresh_status().get("state")
        for name in names:
            task = self._trainers.get(name)
            reason = task.refusal(self._datastore, state) if hasattr(task, "refusal") else None
            if reason:
                raise bad_request(409, f"cannot start train task {name!r}: {reason}")

    # ------------------------------------------------------------------ requests
    def infer(self, request, datastore=None):
        from lib.origin import REQUEST_ORIGIN, REQUEST_UPLOAD

        model = request.get("model")
        if not isinstance(model, str) or model not in self._infers:
            raise bad_request(404, f"unknown model {str(model)[:40]!r}; available: {sorted(self._infers)}")
        image = request.get("image")
        ds = datastore if datastore else self.datastore()
        if REQUEST_ORIGIN.get() == "http":
            # over HTTP, `image` is a datastore id, resolved here to its file (MONAI Label would read
            # an id that happens to name a file in the server's working folder); a server path is
            # accepted only when it is this request's own upload or its session's image (lib/origin.py)
            if image is None or image != REQUEST_UPLOAD.get():
                check_image_id(image)
                uri = ds.get_image_uri(image)
                if not uri:
                    raise bad_request(404, f"image {image!r} is not in the datastore")
                request = dict(request, image=uri, image_id=image)
        elif isinstance(image, str) and not os.path.exists(image):  # scripts and tasks: an id or a path
            check_image_id(image)
            if not ds.get_image_uri(image):
                raise bad_request(404, f"image {image!r} is not in the datastore")
            request = dict(request, image_id=image)
        return super().infer(request, datastore)

    def train(self, request):
        if not isinstance(request.get("model"), str) or request.get("model") not in self._trainers:
            raise bad_request(404, f"unknown train task {str(request.get('model'))[:40]!r}; "
                                   f"available: {sorted(self._trainers)}")
        return super().train(request)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if not isinstance(strategy, str) or strategy not in self._strategies:
            raise bad_request(404, f"unknown strategy {str(strategy)[:40]!r}; available: {sorted(self._strategies)}")
        return super().next_sample(request)

    def scoring(self, request, datastore=None):
        if not isinstance(request.get("method"), str) or request.get("method") not in self._scoring_methods:
            raise bad_request(404, f"unknown scoring method {str(request.get('method'))[:40]!r}; "
                                   f"available: {sorted(self._scoring_methods)}")
        return super().scoring(request, datastore)

    def bundle_path(self, model):
        """Called by MONAI Label before it launches a background train/batch task: refuse unknown names early."""
        known = isinstance(model, str) and (model in self._trainers or model in self._infers)
        if model is not None and not known:
            raise bad_request(404, f"unknown model {str(model)[:40]!r}; infer: {sorted(self._infers)}, "
                                   f"train: {sorted(self._trainers)}")
        return None

    # ------------------------------------------------------------------ background scoring
    def async_scoring(self, method, params=None):
        """Score stale images in a server thread instead of a subprocess per call.

        MONAI Label calls this after every next_sample and train; a subprocess would reload torch
        and the model each time. Here the loaded model is reused and nothing starts when every
        unlabeled image's score is already current.
        """
        if method not in (None, SCORING) or not self._server_mode:
            return super().async_scoring(method, params)
        from lib.scoring.uncertainty import stale_images

        if not self.manager.ready or not stale_images(self._datastore, self.paths.model_identity()):
            return {}
        with self._scoring_lock:
            if self._scoring_thread is not None and self._scoring_thread.is_alive():
                self._scoring_again = True
                return {SCORING: "running"}
            self._scoring_thread = threading.Thread(target=self._score_loop, name="fasttextdiff-scoring", daemon=True)
            self._scoring_thread.start()
        return {SCORING: "started"}

    def _score_loop(self) -> None:
        while True:
            try:
                self._scoring_methods[SCORING]({"method": SCORING}, self._datastore)
            except Exception:  # noqa: BLE001 - background work: log, never crash the server
                logger.exception("background uncertainty scoring failed")
            with self._scoring_lock:
                if not self._scoring_again:
                    return
                self._scoring_again = False

    def wait_for_background(self, timeout: float = 600.0) -> None:
        """For tests and scripts: wait for the default-model build and background scoring."""
        for thread in (self._builder.thread if self._builder else None, self._scoring_thread):
            if thread is not None:
                thread.join(timeout)

    # ------------------------------------------------------------------ server adaptation
    def install_http(self, fastapi_app) -> None:
        """Install this app's HTTP layer on MONAI Label's FastAPI app before it serves (server.py)."""
        from lib.routes import install
        from lib.security import fix_token_validation

        install(fastapi_app, threaded_infer=self.app_conf.threaded_infer)
        fix_token_validation(fastapi_app)


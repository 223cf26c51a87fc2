"""Which model the app serves, loading it once, and noticing when a new one is published.

Paths (all under the state folder, `<app>/model/<studies name>-<hash>` by default, see AppConf):
  model/      publish root of the served model: versions/<stamp>/ + `current` link (atomic swap)
  backbone/   publish root of the pretrained diffusion backbone (same scheme)
  text_cache/ report embeddings, keyed by encoder identity + sha256(text)
  work/       training scratch: resumable runs, volume slices; never read by inference

`ModelPaths` is a small picklable record of plain strings, so trainers (run by MONAI Label in a
subprocess) resolve the same folders without carrying a loaded model around.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasttextdiff.config import MODEL_CONFIG_FILE
from fasttextdiff.utils.devices import resolve_device
from fasttextdiff.utils.errors import ModelNotReadyError

from lib.configs.app_conf import AppConf

logger = logging.getLogger(__name__)


def _is_model_dir(path: Path) -> bool:
    return (path / MODEL_CONFIG_FILE).is_file()


def _current(root: Path) -> Path | None:
    link = root / "current"
    return link.resolve() if link.exists() else None


@dataclass(frozen=True)
class ModelPaths:
    """Folders of one app instance (plain strings: picklable, printable)."""

    state: str
    publish_root: str  # where trained models are published
    given_model: str  # --conf model_dir when it is a plain model directory, else ""
    backbone_root: str
    given_backbone: str

    @classmethod
    def from_conf(cls, conf: AppConf, studies: str, app_dir: str) -> "ModelPaths":
        state = conf.state_path(studies, app_dir)
        publish_root, given = state / "model", ""
        if conf.model_dir:
            md = Path(conf.model_dir).expanduser().resolve()
            if _is_model_dir(md):
                given = str(md)  # served until a model trained here is published
            else:
                publish_root = md  # a publish root (or a new folder to become one)
        given_backbone = str(Path(conf.backbone_dir).expanduser().resolve()) if conf.backbone_dir else ""
        return cls(str(state), str(publish_root), given, str(state / "backbone"), given_backbone)

    @property
    def text_cache(self) -> Path:
        return Path(self.state) / "text_cache"

    @property
    def work(self) -> Path:
        return Path(self.state) / "work"

    def served_model_dir(self) -> Path | None:
        """The published model if any, else the given one, else None."""
        current = _current(Path(self.publish_root))
        if current is not None and _is_model_dir(current):
            return current
        if self.given_model and _is_model_dir(Path(self.given_model)):
            return Path(self.given_model)
        return None

    def backbone_dir(self) -> Path | None:
        """A backbone to train a segmenter on: given > pretrained here > the served model's own."""
        if self.given_backbone:
            return Path(self.given_backbone)
        current = _current(Path(self.backbone_root))
        if current is not None:
            return current
        served = self.served_model_dir()
        if served is not None and (served / "backbone").is_dir():
            return served / "backbone"
        return None

    def model_identity(self) -> str | None:
        """Changes whenever another model is published (path of the version + its record's mtime)."""
        served = self.served_model_dir()
        if served is None:
            return None
        stamp = (served / MODEL_CONFIG_FILE).stat().st_mtime_ns
        return hashlib.sha256(f"{served}|{stamp}".encode()).hexdigest()[:16]


class ModelManager:
    """Loads the served model lazily, once per published version; thread-safe."""

    def __init__(self, conf: AppConf, paths: ModelPaths):
        self.conf = conf
        self.paths = paths
        self._lock = threading.Lock()
        self._segmenter: Any = None
        self._identity: str | None = None
        self.status: dict[str, Any] = {"state": "unknown", "message": ""}
        self.inference_settings()  # a bad FASTTEXTDIFF_PRECISION stops the start with its sentence, not a request
        self.refresh_status()

    def inference_settings(self) -> dict[str, Any]:
        """Precision and device of inference, for `/info`: the loaded segmenter's, else what a load would use now
        (FASTTEXTDIFF_PRECISION and --conf device), so a client can tell which numbers it gets."""
        from fasttextdiff.inference.batched import precision_record

        segmenter = self._segmenter
        if segmenter is not None:
            return segmenter.inference_settings
        return precision_record(None, resolve_device(self.conf.device))

    def refresh_status(self) -> dict[str, Any]:
        """The state as it is now: a model published by a train task (another process) shows as ready at
        once, also after a failed or interrupted default-model build; `preparing` while a build runs."""
        state = self.status.get("state")
        served = self.paths.served_model_dir()
        if state == "preparing":
            return self.status
        if served is not None:
            if state != "ready" or self.status.get("model_dir") != str(served):
                self.status = {"state": "ready", "message": f"serving {served}", "model_dir": str(served)}
        elif state not in ("failed", "waiting"):
            self.status = {"state": "missing", "message": "no model is published yet: save a final label "
                           "(PUT /datastore/label?tag=final) and the server builds one, or run the `fasttextdiff` "
                           "train task, or pass --conf model_dir DIR"}
        return self.status

    def set_status(self, state: str, message: str, **extra: Any) -> None:
        self.status = {"state": state, "message": message, "updated": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
        if state in ("ready", "failed"):
            logger.info("FastTextDiff model: %s - %s", state, message)

    def segmenter(self):
        """The loaded Segmenter for the current model; ModelNotReadyError (HTTP 503) with the reason while
        there is none."""
        from fasttextdiff.inference.pipeline import Segmenter

        identity = self.paths.model_identity()
        if identity is None:
            state = self.status.get("state")
            if state == "preparing":
                raise ModelNotReadyError(
                    f"model is being prepared: {self.status.get('message')}; "
                    "try again when /info shows fasttextdiff.models.segmenter.state = ready"
                )
            if state == "failed":
                raise ModelNotReadyError(
                    f"no model: preparing the default model failed ({self.status.get('message')})"
                )
            raise ModelNotReadyError(self.refresh_status()["message"])
        with self._lock:
            if identity != self._identity:
                served = self.paths.served_model_dir()
                started = time.time()
                self._segmenter = Segmenter.load(
                    served,
                    device=resolve_device(self.conf.device),
                    n_noise=self.conf.n_noise,
                    batch_size=self.conf.infer_batch_size,
                    text_cache_dir=self.paths.text_cache,
                )
                self._identity = identity
                if self.status.get("state") != "preparing":
                    self.set_status("ready", f"serving {served}", model_dir=str(served))
                logger.info("loaded model %s (identity %s) in %.1fs", served, identity, time.time() - started)
            return self._segmenter, self._identity

    @property
    def ready(self) -> bool:
        return self.paths.model_identity() is not None

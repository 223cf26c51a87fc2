"""Build the default model from the studies when the server starts without one.

Runs in a background thread of the server process: backbone pretraining on all images (unless a
backbone is already published or given), then fusion + head on the labeled images, each published
atomically, within `--conf prepare_budget_s` (a stage out of time stops after its current step or
epoch and keeps what it learned, so the server is ready in bounded time). Progress goes to the log
and to `/info` (`fasttextdiff.models.segmenter`); infer requests get HTTP 503 "model is being prepared"
meanwhile, and train requests 409. On later starts the published
model is reused. Studies without a final label wait (`/info` state `waiting`) until one is saved;
the app then starts the build (`FastTextDiffApp.on_save_label`). A new model's input size and
intensity window are chosen from the images and device first (`lib.geometry`).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from fasttextdiff.utils.devices import resolve_device

from lib.configs.app_conf import AppConf
from lib.model_manager import ModelManager

logger = logging.getLogger(__name__)


class DefaultModelBuilder:
    def __init__(self, conf: AppConf, manager: ModelManager, datastore: Any,
                 on_ready: Callable[[], None] | None = None):
        self.conf, self.manager, self.datastore, self.on_ready = conf, manager, datastore, on_ready
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None
        self.timings: dict[str, float] = {}

    def start(self) -> bool:
        """Start building if no model is served; returns whether a build started."""
        if self.manager.ready or (self.thread is not None and self.thread.is_alive()):
            return False
        self.manager.set_status("preparing", "starting")
        self.thread = threading.Thread(target=self._run, name="fasttextdiff-default-model", daemon=True)
        self.thread.start()
        return True

    def _progress(self, stage: str, total_epochs: int) -> Callable[[dict], None]:
        def log(record: dict) -> None:
            epoch = record.get("epoch", "?")
            loss = record.get("loss")
            total = record.get("epochs_total", total_epochs)  # the segmenter's text_fallback doubles the epochs
            msg = f"{stage}: epoch {epoch}/{total}" + (f", loss {loss:.4f}" if isinstance(loss, float) else "")
            self.manager.set_status("preparing", msg, stage=stage)
            logger.info("default model - %s", msg)

        return log

    def _run(self) -> None:
        from lib.training import pretrain_backbone_from_datastore, train_segmenter_from_datastore

        conf, paths = self.conf, self.manager.paths
        started = time.time()
        budget = conf.prepare_budget_s

        def stage_deadline(seconds: float | None) -> threading.Event:
            """An event set after `seconds` (or by shutdown): the stage then stops and keeps its result."""
            event = threading.Event()
            if seconds is not None:
                timer = threading.Timer(max(seconds, 1.0), event.set)
                timer.daemon = True
                timer.start()
            return event
        device = str(resolve_device(conf.device))
        try:
            images = self.datastore.list_images()
            labeled = self.datastore.get_labeled_images()
            if not labeled:
                self.manager.set_status("waiting", "the studies have no final labels yet: save one (PUT "
                                        "/datastore/label?image=ID&tag=final) and the default model is built then")
                return
            logger.info("default model: building from %d images (%d labeled) on %s", len(images), len(labeled), device)
            geometry = None
            if paths.backbone_dir() is None:
                from lib.geometry import choose_geometry
                from lib.training import all_image_paths, labeled_pairs

                geometry = choose_geometry([str(p) for p in all_image_paths(self.datastore)], conf, device,
                                           paths.state, labeled=labeled_pairs(self.datastore))
                self.manager.set_status("preparing", f"model input {geometry['image_size']} px "
                                        f"({geometry['size_reason']}); intensities: {geometry['window_reason']}",
                                        stage="geometry", geometry=geometry)
                self.manager.set_status("preparing", "backbone pretraining: starting", stage="backbone")
                t0 = time.time()
                stop = stage_deadline(budget / 2 if budget else None)
                metrics = pretrain_backbone_from_datastore(
                    self.datastore, conf, paths, epochs=conf.backbone_epochs, batch_size=max(conf.batch_size, 16),
                    device=device, log=self._progress("backbone pretraining", conf.backbone_epochs),
                    stop_event=stop, accept_stopped=True, geometry=geometry)
                self.timings["backbone_s"] = round(time.time() - t0, 1)
                self.timings["backbone_steps"] = metrics.get("steps")
                if metrics.get("stopped"):
                    logger.info("default model: backbone pretraining reached its time budget after %s steps",
                                metrics.get("steps"))
            if self.stop_event.is_set():
                return
            self.manager.set_status("preparing", "segmenter training: starting", stage="segmenter")
            t0 = time.time()
            left = budget - (time.time() - started) if budget else None
            metrics = train_segmenter_from_datastore(self.datastore, conf, paths, epochs=conf.epochs,
                                                     batch_size=conf.batch_size, lr=conf.lr, device=device,
                                                     log=self._progress("segmenter training", conf.epochs),
                                                     stop_event=stage_deadline(left))
            self.timings["segmenter_epochs"] = metrics.get("epochs")
            self.timings["segmenter_s"] = round(time.time() - t0, 1)
            self.timings["total_s"] = round(time.time() - started, 1)
            if metrics.get("published"):
                self.manager.set_status("ready", f"default model built in {self.timings['total_s']}s "
                                        f"and published to {metrics.get('published')}", timings=dict(self.timings),
                                        model_dir=str(metrics.get("published")))
            else:  # a model appeared meanwhile (a train task) and this build did not beat it
                self.manager.set_status("ready", f"default model build finished: {metrics.get('reason')}",
                                        timings=dict(self.timings), model_dir=str(metrics.get("kept")))
        except Exception as exc:  # noqa: BLE001 - reported in /info and the log, the server keeps running
            logger.exception("default model: failed")
            self.manager.set_status("failed", f"{type(exc).__name__}: {exc}")
            return
        if self.on_ready is not None:
            try:
                self.on_ready()
            except Exception:  # noqa: BLE001
                logger.exception("default model: post-ready hook failed")

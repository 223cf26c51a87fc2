"""What both train tasks share: typed request options, the stats file, and how many GPUs a run uses.

MONAI Label runs a train request in a fresh subprocess (`python -m monailabel.interfaces.utils.app
-m train`). There the workflow runs in-process on one device, or - with `multi_gpu` on a machine
with several GPUs - the library launches it with `accelerate launch` on each GPU (see
`lib.training`). The task holds only plain values (the typed conf and folder paths), never a
model, lock or datastore.
"""

from __future__ import annotations

import json
import logging
import os
import time
from abc import abstractmethod
from pathlib import Path
from typing import Any, Dict, List

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from fasttextdiff.utils.devices import resolve_device

from lib.configs.app_conf import AppConf
from lib.model_manager import ModelPaths
from lib.validation import check_int

logger = logging.getLogger(__name__)


class FastTextDiffTrainTask(TrainTask):
    """A train task whose run is one library workflow; subclasses name it in `run`."""

    name = "base"

    def __init__(self, conf: AppConf, paths: ModelPaths, description: str):
        super().__init__(description)
        self.conf = conf
        self.paths = paths

    # ---------------------------------------------------------------- MONAI Label interface
    def config(self) -> Dict[str, Any]:
        return {"max_epochs": self.default_epochs(), "train_batch_size": self.conf.batch_size,
                "device": "auto", "multi_gpu": True, "gpus": "all"}

    def stats_path(self) -> Path:
        return Path(self.paths.state) / f"train_stats_{self.name}.json"

    def stats(self) -> Dict[str, Any]:
        """The last run's stats; a run recorded RUNNING whose process is gone (killed, server
        restarted, `DELETE /train/`) is reported, and rewritten, as INTERRUPTED."""
        try:
            stats = json.loads(self.stats_path().read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        if stats.get("status") == "RUNNING" and not _process_alive(stats.get("pid"), stats.get("pid_started")):
            stats.update(status="INTERRUPTED", end_ts=int(time.time()),
                         error=f"the training process (pid {stats.get('pid')}) ended without finishing: killed, "
                               "stopped or the server restarted; the published model is unchanged")
            try:
                self._write_stats(stats)
            except OSError:
                pass
        return stats

    def _write_stats(self, stats: Dict[str, Any]) -> None:
        from fasttextdiff.utils.atomic import atomic_write_json

        atomic_write_json(self.stats_path(), stats)

    def __call__(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        req = self.config()
        req.update(request)
        epochs = check_int(req.get("max_epochs", req.get("epochs")), "max_epochs", 1, 10000)
        batch = check_int(req.get("train_batch_size", self.conf.batch_size), "train_batch_size", 1, 4096)
        device = str(resolve_device(req.get("device"), default=self.conf.device))
        world = self._world_size(req)
        options = {"epochs": epochs, "batch_size": batch, "device": device, "num_processes": world,
                   "gpu_ids": None if req.get("gpus") in (None, "", "all") else str(req["gpus"])}
        options.update(self.pre_process(req, datastore))
        started = time.time()
        stats = {"name": self.name, "status": "RUNNING", "start_ts": int(started), "epochs": epochs,
                 "device": device, "world_size": world, "history": [], **_this_process()}
        self._write_stats(stats)
        try:
            result = self.run(datastore, options, log=self._logger(stats))
        except Exception as exc:
            stats.update(status="FAILED", error=str(exc), total_time=round(time.time() - started, 1))
            self._write_stats(stats)
            raise
        stats = {**self.stats(), **stats}
        stats.update(status="DONE", result=result, total_time=round(time.time() - started, 1),
                     best_metric=result.get("best_val_dice"), end_ts=int(time.time()),
                     decision=result.get("decision"), reason=result.get("reason"), val_dice=result.get("val_dice"))
        self._write_stats(stats)
        logger.info("%s: done in %.1fs; %s", self.name, time.time() - started, result.get("reason") or
                    f"published {result.get('published')}")
        return stats

    # ---------------------------------------------------------------- hooks
    @abstractmethod
    def default_epochs(self) -> int: ...

    def pre_process(self, request: Dict[str, Any], datastore: Datastore) -> Dict[str, Any]:
        """Extra options from the request (validated); the datalist is built in `run`."""
        return {}

    def refusal(self, datastore: Datastore, model_state: str) -> str | None:
        """Why a request for this task cannot start now (answered 409 before MONAI Label submits it), or None."""
        if model_state == "preparing":
            return ("the default model is being built from the studies; train when /info shows "
                    "fasttextdiff.models.segmenter.state = ready (the build publishes a model on its own)")
        return None

    @abstractmethod
    def run(self, datastore: Any, options: Dict[str, Any], log) -> Dict[str, Any]: ...

    # ---------------------------------------------------------------- helpers
    def _logger(self, stats: Dict[str, Any]):
        history: List[dict] = stats["history"]

        def log(record: dict) -> None:
            history.append({k: (round(v, 5) if isinstance(v, float) else v) for k, v in record.items()})
            del history[:-50]
            stats["last"] = history[-1]
            self._write_stats(stats)
            logger.info("%s: %s", self.name, " ".join(f"{k}={v}" for k, v in history[-1].items()))

        return log

    @staticmethod
    def _world_size(req: Dict[str, Any]) -> int:
        import torch

        if not req.get("multi_gpu") or not torch.cuda.is_available():
            return 1
        gpus = req.get("gpus", "all")
        n = torch.cuda.device_count() if not gpus or gpus == "all" else len(str(gpus).split(","))
        return n if n > 1 else 1


def _this_process() -> Dict[str, Any]:
    import psutil

    return {"pid": os.getpid(), "pid_started": psutil.Process().create_time()}


def _process_alive(pid: Any, started: Any) -> bool:
    """Whether the process that wrote a RUNNING record still runs (same pid AND start time)."""
    import psutil

    if not isinstance(pid, int):
        return False  # a record of an older version without a pid: cannot be checked, not running
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - float(started)) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False

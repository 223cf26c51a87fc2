"""From data on disk to a training run: the steps the CLI, the benchmarks and the MONAI Label app share.

Gather the unlabeled images of a folder or an LViT-layout root and pretrain the backbone on them;
load an LViT root's splits. A run can also be described as a JSON job (`run_job`), the form a
launcher hands to every process: the server's train tasks run a job in their own process, or on
several GPUs with `launch_job` (`accelerate launch ... fasttextdiff run-job JOB.json`) - one code
path either way. These functions compose the library's parts and own no maths.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fasttextdiff.utils.atomic import atomic_write_json
from fasttextdiff.training.backbone import pretrain_backbone
from fasttextdiff.config import BackboneConfig, SegmenterConfig, TextConfig, TrainConfig
from fasttextdiff.data.io import read_image, supported_extensions
from fasttextdiff.data.lvit import Sample, load_split
from fasttextdiff.data.preprocess import to_model_input
from fasttextdiff.utils.devices import resolve_device
from fasttextdiff.training.engine import default_mixed_precision
from fasttextdiff.utils.errors import CheckpointError, FastTextDiffError, ImageReadError, TrainingError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def find_image_files(roots: Iterable[str | Path]) -> list[Path]:
    """Image files under folders (recursively) or given directly; DICOM series folders count once."""
    exts = tuple(supported_extensions())
    found: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise ImageReadError(f"{root} does not exist")
        for path in sorted(root.rglob("*")):
            name = path.name.lower()
            if path.is_file() and name.endswith(exts) and not name.startswith(".") and "labelcol" not in path.parts \
                    and "labels" not in path.parts:
                found.append(path)
    return found


def unlabeled_tensor(paths: Sequence[Path], config: BackboneConfig, progress: bool = True,
                     max_slices_per_volume: int | None = 64) -> torch.Tensor:
    """All images (and volume slices) preprocessed as the backbone will see them: (N, C, S, S).

    Unreadable files are skipped with a warning: one bad file in a large unlabeled folder should
    not stop pretraining.
    """
    chunks = []
    for path in tqdm(paths, desc="load images", disable=not progress):
        try:
            x = to_model_input(read_image(path), config.image_size, config.in_channels, window=config.window,
                               body_crop=config.body_crop)
        except FastTextDiffError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if max_slices_per_volume and x.shape[0] > max_slices_per_volume:
            idx = torch.linspace(0, x.shape[0] - 1, max_slices_per_volume).round().long()
            x = x[idx]
        chunks.append(x)
    if not chunks:
        raise ImageReadError("no readable images to pretrain the backbone on")
    return torch.cat(chunks)


def lvit_image_paths(root: str | Path) -> list[Path]:
    """Every image of every split (labels unused): the unlabeled pool for pretraining."""
    paths: list[Path] = []
    for split in SPLITS:
        try:
            paths += [s.image for s in load_split(root, split)]
        except FastTextDiffError:
            continue
    if not paths:
        raise ImageReadError(f"{root} has no Train_Folder/Val_Folder/Test_Folder images")
    return paths


def pretrain_backbone_on_files(paths: Sequence[Path], config: BackboneConfig, out_dir: str | Path, *,
                               progress: bool = True, log_fn: Callable[[dict], None] | None = None,
                               max_slices_per_volume: int | None = 64, **options: Any) -> dict:
    """`pretrain_backbone` on image files; ``options`` are its own (epochs, batch_size, lr, seed, device, ...)."""
    images = unlabeled_tensor(paths, config, progress=progress, max_slices_per_volume=max_slices_per_volume)
    log.info("pretraining the diffusion backbone on %d unlabeled images/slices", images.shape[0])
    return pretrain_backbone(images, config, out_dir, progress=progress, log=log_fn, **options)


def load_lvit(root: str | Path) -> dict[str, list[Sample]]:
    """Splits that exist in an LViT-layout root; at least Train_Folder must."""
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        try:
            splits[split] = load_split(root, split)
        except FastTextDiffError:
            if split == "train":
                raise
    return splits


# --------------------------------------------------------------------------------------------
# jobs: a training run as JSON, run here or on several processes


def run_job(spec: dict[str, Any], log_fn: Callable[[dict], None] | None = None,
            stop_event: threading.Event | None = None) -> dict:
    """Run one job: ``pretrain-backbone`` (``images``, ``backbone`` config, ``out_dir``, ``options`` of
    `pretrain_backbone_on_files`, ``restart_if_unusable``: start over when the resume state does not fit the
    model; a state of other images or settings is discarded by every loop anyway, `training.resume`)
    or ``train-segmenter`` (``samples``, optional ``val_samples`` and ``init_dir``, ``out_dir``, ``backbone_dir``,
    ``text``/``segmenter``/``train`` configs, ``text_cache_dir``, ``backbone_overrides``); both take ``device``.
    Returns the metrics."""
    common = {"device": spec.get("device"), "progress": False, "stop_event": stop_event}
    if spec["job"] == "pretrain-backbone":
        def pretrain(resume: bool) -> dict:
            return pretrain_backbone_on_files([Path(p) for p in spec["images"]],
                                              BackboneConfig.from_dict(spec["backbone"]),
                                              spec["out_dir"], log_fn=log_fn, resume=resume, **spec.get("options", {}),
                                              **common)
        try:
            return pretrain(resume=True)
        except CheckpointError as exc:
            if not spec.get("restart_if_unusable"):
                raise
            log.warning("starting the backbone pretraining over: %s", exc)
            return pretrain(resume=False)
    if spec["job"] == "train-segmenter":
        from fasttextdiff.training.segmenter import train_segmenter

        def samples(key: str) -> list[Sample]:
            return [Sample(image=Path(s["image"]), mask=Path(s["mask"]), text=s["text"], name=s["name"],
                           slices=tuple(s["slices"]) if s.get("slices") is not None else None)
                    for s in spec.get(key) or []]

        return train_segmenter(samples("samples"), spec["out_dir"], backbone_dir=spec["backbone_dir"],
                               val_samples=samples("val_samples") or None, init_dir=spec.get("init_dir"),
                               text_config=TextConfig.from_dict(spec["text"]),
                               segmenter_config=SegmenterConfig.from_dict(spec["segmenter"]),
                               train_config=TrainConfig.from_dict(spec["train"]), log=log_fn,
                               text_cache_dir=spec.get("text_cache_dir"),
                               backbone_overrides=spec.get("backbone_overrides"), **common)
    raise ValueError(f"unknown job {spec['job']!r}; known: pretrain-backbone, train-segmenter")


def launch_job(spec: dict[str, Any], num_processes: int, work_dir: str | Path,
               log_fn: Callable[[dict], None] | None = None, gpu_ids: str | None = None) -> dict:
    """Run a job on ``num_processes`` GPUs with ``accelerate launch``; its log records reach ``log_fn``
    while it runs. Returns the main process's metrics; a failed run raises TrainingError with its last words."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    stem = work / f"job-{time.time_ns()}"
    files = {k: stem.with_name(f"{stem.name}.{k}") for k in ("json", "log", "result", "stderr")}
    atomic_write_json(files["json"], dict(spec, log_file=str(files["log"]), result_file=str(files["result"])))
    with socket.socket() as sock:  # a free port for the processes' rendezvous (29500 may be taken)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "--dynamo_backend", "no", "--mixed_precision", default_mixed_precision(resolve_device(spec.get("device")))]
    cmd += ["--gpu_ids", gpu_ids] if gpu_ids else []
    cmd += ["-m", "fasttextdiff.commands.main", "run-job", str(files["json"])]
    log.info("launching %s on %d processes: %s", spec["job"], num_processes, " ".join(cmd))
    seen = 0
    try:
        with open(files["stderr"], "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            while True:
                done = proc.poll() is not None
                text = files["log"].read_text() if files["log"].exists() else ""
                lines = text[: text.rfind("\n") + 1].splitlines()  # complete records only
                for line in lines[seen:]:
                    if line.strip() and log_fn is not None:
                        log_fn(json.loads(line))
                seen = len(lines)
                if done:
                    break
                time.sleep(1.0)
        if proc.returncode != 0 or not files["result"].is_file():
            tail = files["stderr"].read_text(errors="replace").strip().splitlines()[-5:]
            raise TrainingError(f"the {spec['job']} run on {num_processes} processes failed (exit {proc.returncode}): "
                                + " | ".join(tail))
        return json.loads(files["result"].read_text())
    finally:
        for path in files.values():
            path.unlink(missing_ok=True)

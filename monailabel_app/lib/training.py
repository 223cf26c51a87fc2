"""The two training workflows, shared by the train tasks and the default-model builder.

* `pretrain_backbone_from_datastore`: denoising pretraining on ALL datastore images (labels
  unused; volumes contribute evenly spaced slices), published to the backbone root.
* `train_segmenter_from_datastore`: fusion + head on the images with final labels and their
  reports (volumes as their labeled slices plus a few empty ones), frozen backbone and encoder,
  published to the model root.

Each builds a JSON job for the library (`fasttextdiff.workflows.run_job`) and runs it in this process,
or on several GPUs through `accelerate launch` (`launch_job`): one code path either way. The result is
published with one atomic link swap at the very end, so a failed, killed or stopped run leaves the
served model as it was.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from lib.configs.app_conf import AppConf
from lib.model_manager import ModelPaths

logger = logging.getLogger(__name__)
TEXT_KEY = "text"


# ---------------------------------------------------------------- datastore -> samples
def _volume_slices(image_path: str, label_path: str, out_dir: Path, image_id: str, text: str,
                   background_every: int = 4) -> list:
    """A labeled volume as 2D samples: every slice with foreground, every n-th empty slice."""
    from fasttextdiff.data.io import Image, read_image, write_image
    from fasttextdiff.data.lvit import Sample

    image, label = read_image(image_path), read_image(label_path)
    if label.array.shape != image.array.shape:
        logger.warning("skipping %s: label shape %s != image shape %s", image_id, label.array.shape, image.array.shape)
        return []
    spacing, origin = tuple(image.spacing[:2]), tuple(image.origin[:2])
    like = Image(image.array[0], spacing, origin, (1.0, 0.0, 0.0, 1.0), False)
    samples = []
    empty_seen = 0
    for z in range(image.array.shape[0]):
        has_fg = bool(label.array[z].any())
        if not has_fg:
            empty_seen += 1
            if empty_seen % background_every:
                continue
        img_p = write_image(out_dir / f"{image_id}__z{z:04d}.nii.gz", image.array[z].astype(np.float32), like)
        lab_p = write_image(out_dir / f"{image_id}__z{z:04d}_label.nii.gz", (label.array[z] > 0).astype(np.uint8), like)
        samples.append(Sample(image=img_p, mask=lab_p, text=text, name=f"{image_id}[z={z}]"))
    return samples


def labeled_samples(datastore: Any, work: Path) -> list:
    """Training samples (image, final label, report text) from the datastore.

    MONAI Label's datalist carries no image info, so the report is added here from the image's
    info `text` (the trainer's pre-processing step); images without a report train with "".
    """
    from fasttextdiff.data.io import is_volume_path
    from fasttextdiff.data.lvit import Sample

    slice_dir = work / f"slices-{time.time_ns()}"
    slice_dir.mkdir(parents=True, exist_ok=True)
    samples = []
    for image_id in sorted(datastore.get_labeled_images()):
        image_path = datastore.get_image_uri(image_id)
        label_path = datastore.get_label_uri(image_id, "final")
        if not image_path or not label_path:
            continue
        text = str(datastore.get_image_info(image_id).get(TEXT_KEY) or "")
        if is_volume_path(image_path):
            samples += _volume_slices(image_path, label_path, slice_dir, image_id, text)
        else:
            samples.append(Sample(image=Path(image_path), mask=Path(label_path), text=text, name=image_id))
    return samples


def all_image_paths(datastore: Any) -> list[Path]:
    return [Path(p) for p in (datastore.get_image_uri(i) for i in sorted(datastore.list_images())) if p]


# ---------------------------------------------------------------- workflows
def _throttled(log: Callable[[dict], None] | None, every_s: float = 5.0) -> Callable[[dict], None]:
    last = [0.0]

    def call(record: dict) -> None:
        now = time.time()
        if log is not None and (now - last[0] >= every_s or record.get("step") == record.get("total_steps")):
            last[0] = now
            log(record)

    return call


def backbone_config(conf: AppConf):
    from fasttextdiff.config import BackboneConfig

    return BackboneConfig(image_size=conf.image_size, in_channels=1, block_out_channels=conf.backbone_channels,
                          layers_per_block=1, timesteps=conf.timesteps, noise_seed=conf.seed)


def _run(job: dict, paths: ModelPaths, num_processes: int, gpu_ids: str | None,
         log: Callable[[dict], None] | None, stop_event: threading.Event | None) -> dict:
    """The job in this process, or on `num_processes` GPUs through accelerate launch."""
    from fasttextdiff.workflows import launch_job, run_job

    if num_processes > 1:
        return launch_job(job, num_processes, paths.work, log, gpu_ids=gpu_ids)
    return run_job(job, log, stop_event)


def pretrain_backbone_from_datastore(datastore: Any, conf: AppConf, paths: ModelPaths, *, epochs: int,
                                     batch_size: int, device: str, log: Callable[[dict], None] | None = None,
                                     stop_event: threading.Event | None = None, accept_stopped: bool = False,
                                     num_processes: int = 1, gpu_ids: str | None = None) -> dict:
    """Pretrain on every image in the datastore and publish to the backbone root."""
    from fasttextdiff.atomic import publish
    from fasttextdiff.backbone import CHECKPOINT_DIR

    files = all_image_paths(datastore)
    if not files:
        raise ValueError("the datastore has no images to pretrain the backbone on")
    run_dir = paths.work / "backbone-run"
    # lr 1e-3 and a short EMA: the server's first start pretrains for minutes, not hours; a checkpoint
    # left by a run on other images (the datastore changed) is ignored rather than refused
    job = {"job": "pretrain-backbone", "images": [str(f) for f in files], "backbone": backbone_config(conf).to_dict(),
           "out_dir": str(run_dir), "device": device, "restart_if_unusable": True,
           "options": {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "ema_decay": 0.99, "seed": conf.seed,
                       "max_slices_per_volume": conf.pretrain_slices_per_volume}}
    logger.info("backbone pretraining on %d datastore images, %d epochs, %d process(es)", len(files), epochs,
                num_processes)
    metrics = _run(job, paths, num_processes, gpu_ids, _throttled(log), stop_event)
    if metrics.get("stopped") and not accept_stopped:
        raise RuntimeError("backbone pretraining was stopped; the published backbone is unchanged")
    shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)  # finished: the next run starts fresh on the then-current images
    metrics.update(published=str(publish(run_dir, paths.backbone_root)))
    return metrics


def train_segmenter_from_datastore(datastore: Any, conf: AppConf, paths: ModelPaths, *, epochs: int,
                                   batch_size: int, lr: float, device: str,
                                   log: Callable[[dict], None] | None = None,
                                   stop_event: threading.Event | None = None,
                                   num_processes: int = 1, gpu_ids: str | None = None) -> dict:
    """Train fusion + head on the labeled images with their reports; publish to the model root."""
    from fasttextdiff.atomic import publish
    from fasttextdiff.config import MODEL_CONFIG_FILE, FusionConfig, SegmenterConfig, TextConfig, TrainConfig

    backbone = paths.backbone_dir()
    if backbone is None:
        raise ValueError("no diffusion backbone yet: run the `backbone` train task first "
                         "(or pass --conf backbone_dir DIR)")
    samples = labeled_samples(datastore, paths.work)
    if not samples:
        raise ValueError("no image in the datastore has a final label yet: save at least one label, then train")
    served = paths.served_model_dir()
    seg_config = SegmenterConfig(num_classes=len(conf.labels) + 1, labels=conf.labels,
                                 fusion=FusionConfig(text_residual=conf.text_residual))
    text_config = TextConfig(encoder=conf.text_encoder)
    if served is not None:  # keep the served model's architecture and encoder when retraining
        record = json.loads((served / MODEL_CONFIG_FILE).read_text())
        seg_config = SegmenterConfig.from_dict(record["segmenter"])
        text_config = TextConfig.from_dict(record["text"])
    train_config = TrainConfig(epochs=epochs, batch_size=min(batch_size, len(samples)), lr=lr, seed=conf.seed,
                               num_workers=0)
    out_dir = paths.work / "segmenter-run"
    job = {"job": "train-segmenter", "out_dir": str(out_dir), "backbone_dir": str(backbone), "device": device,
           "samples": [{"image": str(s.image), "mask": str(s.mask), "text": s.text, "name": s.name} for s in samples],
           "text": text_config.to_dict(), "segmenter": seg_config.to_dict(), "train": train_config.to_dict(),
           "text_cache_dir": str(paths.text_cache)}
    logger.info("training fusion + head on %d labeled samples (%d epochs, device %s, %d process(es))", len(samples),
                epochs, device, num_processes)
    try:
        metrics = _run(job, paths, num_processes, gpu_ids, log, stop_event)
    finally:
        for p in paths.work.glob("slices-*"):
            shutil.rmtree(p, ignore_errors=True)
    published = publish(out_dir, paths.publish_root)
    metrics.pop("history", None)
    metrics.update(published=str(published), samples=len(samples))
    return metrics

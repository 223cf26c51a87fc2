"""The two training workflows, shared by the train tasks and the default-model builder.

* `pretrain_backbone_from_datastore`: denoising pretraining on ALL datastore images (labels
  unused; volumes contribute evenly spaced slices), published to the backbone root.
* `train_segmenter_from_datastore`: fusion + head on the images with final labels and their
  reports (volumes as their labeled slices plus a few empty ones), frozen backbone and encoder,
  published to the model root.

Both write into a staging folder and publish with one atomic link swap at the very end, so a
failed, killed or stopped run leaves the served model as it was.
"""

from __future__ import annotations

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


def pretrain_backbone_from_datastore(datastore: Any, conf: AppConf, paths: ModelPaths, *, epochs: int,
                                     batch_size: int, device: str, log: Callable[[dict], None] | None = None,
                                     stop_event: threading.Event | None = None, accept_stopped: bool = False) -> dict:
    """Pretrain on every image in the datastore and publish to the backbone root."""
    from fasttextdiff.backbone import pretrain_backbone
    from fasttextdiff.checkpoint import publish, staging_dir
    from fasttextdiff.pipeline import unlabeled_tensor

    files = all_image_paths(datastore)
    if not files:
        raise ValueError("the datastore has no images to pretrain the backbone on")
    config = backbone_config(conf)
    images = unlabeled_tensor(files, config, progress=False, max_slices_per_volume=conf.pretrain_slices_per_volume)
    run_dir = paths.work / "backbone-run"
    logger.info("backbone pretraining on %d images/slices from %d datastore images, %d epochs",
                images.shape[0], len(files), epochs)
    try:
        metrics = pretrain_backbone(images, config, run_dir, epochs=epochs, batch_size=batch_size, lr=1e-3,
                                    ema_decay=0.99, seed=conf.seed, device=device, progress=False,
                                    log=_throttled(log), stop_event=stop_event)
    except Exception as exc:  # a checkpoint of other settings: start over rather than fail forever
        from fasttextdiff.errors import CheckpointError

        if not isinstance(exc, CheckpointError):
            raise
        logger.warning("discarding an incompatible backbone checkpoint: %s", exc)
        shutil.rmtree(run_dir, ignore_errors=True)
        metrics = pretrain_backbone(images, config, run_dir, epochs=epochs, batch_size=batch_size, lr=1e-3,
                                    ema_decay=0.99, seed=conf.seed, device=device, progress=False,
                                    log=_throttled(log), stop_event=stop_event)
    if metrics.get("stopped") and not accept_stopped:
        raise RuntimeError("backbone pretraining was stopped; the published backbone is unchanged")
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return metrics  # rank 0 publishes
    staging = staging_dir(Path(paths.backbone_root) / "versions" / "new")
    try:
        for item in run_dir.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        final = publish(staging, paths.backbone_root)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(run_dir, ignore_errors=True)  # finished: the next run starts fresh on the then-current images
    metrics.update(published=str(final), images=int(images.shape[0]))
    return metrics


def train_segmenter_from_datastore(datastore: Any, conf: AppConf, paths: ModelPaths, *, epochs: int,
                                   batch_size: int, lr: float, device: str,
                                   log: Callable[[dict], None] | None = None,
                                   stop_event: threading.Event | None = None) -> dict:
    """Train fusion + head on the labeled images with their reports; publish to the model root."""
    from fasttextdiff.checkpoint import publish
    from fasttextdiff.config import SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.train import train_segmenter

    backbone = paths.backbone_dir()
    if backbone is None:
        raise ValueError("no diffusion backbone yet: run the `backbone` train task first "
                         "(or pass --conf backbone_dir DIR)")
    samples = labeled_samples(datastore, paths.work)
    if not samples:
        raise ValueError("no image in the datastore has a final label yet: save at least one label, then train")
    served = paths.served_model_dir()
    seg_config = SegmenterConfig(num_classes=len(conf.labels) + 1, labels=conf.labels)
    text_config = TextConfig(encoder=conf.text_encoder)
    if served is not None:  # keep the served model's architecture and encoder when retraining
        import json

        record = json.loads((served / "fasttextdiff.json").read_text())
        seg_config = SegmenterConfig.from_dict(record["segmenter"])
        text_config = TextConfig.from_dict(record["text"])
    train_config = TrainConfig(epochs=epochs, batch_size=min(batch_size, len(samples)), lr=lr, seed=conf.seed,
                               num_workers=0)
    out_dir = paths.work / "segmenter-run"
    logger.info("training fusion + head on %d labeled samples (%d epochs, device %s)", len(samples), epochs, device)
    published: list[Path] = []

    def do_publish(staging: Path) -> None:
        published.append(publish(staging, paths.publish_root))

    try:
        metrics = train_segmenter(samples, out_dir, backbone_dir=backbone, text_config=text_config,
                                  segmenter_config=seg_config, train_config=train_config, device=device,
                                  progress=False, log=log, stop_event=stop_event, text_cache_dir=paths.text_cache,
                                  publish=do_publish)
    finally:
        for p in paths.work.glob("slices-*"):
            shutil.rmtree(p, ignore_errors=True)
    metrics.pop("history", None)
    metrics.update(published=str(published[0]) if published else None, samples=len(samples))
    return metrics

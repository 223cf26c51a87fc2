"""The two training workflows, shared by the train tasks and the default-model builder.

* `pretrain_backbone_from_datastore`: denoising pretraining on ALL datastore images (labels
  unused; volumes contribute evenly spaced slices), published to the backbone root.
* `train_segmenter_from_datastore`: fusion + head on the images with final labels and their
  reports (volumes as their labeled slices plus a few empty ones), frozen backbone and encoder,
  published to the model root.

Each builds a JSON job for the library (`fasttextdiff.training.workflows.run_job`) and runs it in this process,
or on several GPUs through `accelerate launch` (`launch_job`): one code path either way. The result is
published with one atomic link swap at the very end, so a failed, killed or stopped run leaves the
served model as it was.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable


from lib.configs.app_conf import AppConf
from lib.model_manager import ModelPaths

logger = logging.getLogger(__name__)
TEXT_KEY = "text"


# ---------------------------------------------------------------- datastore -> samples
SLICES_PREFIX = "slices-"  # `slices-<pid>-<ns>`: the scratch folders older versions wrote volume slices to


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: keep the folder
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_slice_dirs(work: Path) -> list[Path]:
    """Remove the slice folders of runs whose process is gone (a server or train task killed mid-run
    cannot clean up after itself); a folder of a live process (this one included) stays. Returns the removed."""
    removed = []
    for folder in sorted(Path(work).glob(f"{SLICES_PREFIX}*")):
        parts = folder.name[len(SLICES_PREFIX):].split("-")
        pid = int(parts[0]) if len(parts) == 2 and parts[0].isdigit() else None  # `slices-<ns>`: older code's
        if pid is not None and _process_alive(pid):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    if removed:
        logger.info("removed %d slice folder(s) left by runs that were killed: %s", len(removed),
                    ", ".join(p.name for p in removed))
    return removed


def labeled_samples(datastore: Any, ids: list[str] | None = None) -> list:
    """Training samples (image, final label, report text) from the datastore (only `ids` when given).

    MONAI Label's datalist carries no image info, so the report is added here from the image's
    info `text` (the trainer's pre-processing step); images without a report train with "".
    A labeled volume trains on its slices with foreground plus every 4th empty one, chosen and
    preprocessed in the canonical orientation inference uses (`fasttextdiff.data.dataset`); no slice
    files are written (older versions wrote them to `slices-*` folders, which `remove_stale_slice_dirs`
    still clears).
    """
    from fasttextdiff.data.dataset import volume_training_slices
    from fasttextdiff.data.io import is_volume_path, read_image
    from fasttextdiff.data.lvit import Sample

    samples = []
    for image_id in sorted(datastore.get_labeled_images() if ids is None else ids):
        image_path = datastore.get_image_uri(image_id)
        label_path = datastore.get_label_uri(image_id, "final")
        if not image_path or not label_path:
            continue
        text = str(datastore.get_image_info(image_id).get(TEXT_KEY) or "")
        slices = None
        image = read_image(image_path) if is_volume_path(image_path) else None  # 2D images are read by the dataset
        if image is not None and image.is_volume:
            label = read_image(label_path)
            if image.array.shape != label.array.shape:
                logger.warning("skipping %s: label shape %s != image shape %s", image_id, label.array.shape,
                               image.array.shape)
                continue
            slices = volume_training_slices(label)
        samples.append(Sample(image=Path(image_path), mask=Path(label_path), text=text, name=image_id, slices=slices))
    return samples


def whole_samples(datastore: Any, ids: list[str]) -> list:
    """Validation samples: each labeled image or volume whole, with its report, scored in its own geometry
    (`fasttextdiff.training.segmenter.validate_served`), never as slices."""
    from fasttextdiff.data.lvit import Sample

    samples = []
    for image_id in sorted(ids):
        image_path, label_path = datastore.get_image_uri(image_id), datastore.get_label_uri(image_id, "final")
        if image_path and label_path:
            text = str(datastore.get_image_info(image_id).get(TEXT_KEY) or "")
            samples.append(Sample(image=Path(image_path), mask=Path(label_path), text=text, name=image_id))
    return samples


def labeled_pairs(datastore: Any) -> list[tuple[str, str]]:
    """(image, final label) paths of the labeled images (what decides a new model's CT window)."""
    pairs = [(datastore.get_image_uri(i), datastore.get_label_uri(i, "final"))
             for i in sorted(datastore.get_labeled_images())]
    return [(str(a), str(b)) for a, b in pairs if a and b]


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


def backbone_config(conf: AppConf, geometry: dict | None = None):
    """The backbone of a newly built model: conf's widths and timesteps, the input size and intensity
    window chosen for the data (`lib.geometry`) unless --conf fixes them."""
    from fasttextdiff.config import BackboneConfig

    geometry = geometry or {}
    size = geometry.get("image_size") or conf.image_size or BackboneConfig.image_size
    window = geometry.get("window")
    return BackboneConfig(image_size=int(size), in_channels=1, block_out_channels=conf.backbone_channels,
                          layers_per_block=1, timesteps=conf.timesteps, noise_seed=conf.seed,
                          window=tuple(window) if window else None)


def _own_backbone_config(backbone: Path | None):
    """The BackboneConfig recorded in one of our backbone directories, else None."""
    from fasttextdiff.models.backbone import BACKBONE_CONFIG_NAME
    from fasttextdiff.config import BackboneConfig

    if backbone is None or not (backbone / BACKBONE_CONFIG_NAME).is_file():
        return None
    return BackboneConfig.load(backbone / BACKBONE_CONFIG_NAME)


def _run(job: dict, paths: ModelPaths, num_processes: int, gpu_ids: str | None,
         log: Callable[[dict], None] | None, stop_event: threading.Event | None) -> dict:
    """The job in this process, or on `num_processes` GPUs through accelerate launch."""
    from fasttextdiff.training.workflows import launch_job, run_job

    if num_processes > 1:
        return launch_job(job, num_processes, paths.work, log, gpu_ids=gpu_ids)
    return run_job(job, log, stop_event)


def pretrain_backbone_from_datastore(datastore: Any, conf: AppConf, paths: ModelPaths, *, epochs: int,
                                     batch_size: int, device: str, log: Callable[[dict], None] | None = None,
                                     stop_event: threading.Event | None = None, accept_stopped: bool = False,
                                     num_processes: int = 1, gpu_ids: str | None = None,
                                     geometry: dict | None = None, publish_result: bool = True) -> dict:
    """Pretrain on every image in the datastore, continuing the current backbone when there is one
    (its own architecture, size and window), and publish to the backbone root (or, with
    `publish_result=False`, leave it in `metrics["run_dir"]` for the caller to judge)."""
    from fasttextdiff.utils.atomic import publish
    from fasttextdiff.training.resume import resume_dir

    files = all_image_paths(datastore)
    if not files:
        raise ValueError("the datastore has no images to pretrain the backbone on")
    run_dir = paths.work / "backbone-run"
    current = paths.backbone_dir()
    own = _own_backbone_config(current)
    if own is None and geometry is None:
        from lib.geometry import choose_geometry

        geometry = choose_geometry([str(f) for f in files], conf, device, paths.state,
                                   labeled=labeled_pairs(datastore))
    config = own if own is not None else backbone_config(conf, geometry)
    # lr 1e-3 and a short EMA: the server's first start pretrains for minutes, not hours; a checkpoint
    # left by a run on other images (the datastore changed) is ignored rather than refused
    options = {"epochs": epochs, "batch_size": batch_size, "lr": 1e-3, "ema_decay": 0.99, "seed": conf.seed,
               "max_slices_per_volume": conf.pretrain_slices_per_volume}
    if current is not None:
        options["init"] = str(current)  # continue the current backbone, not a fresh one
    job = {"job": "pretrain-backbone", "images": [str(f) for f in files], "backbone": config.to_dict(),
           "out_dir": str(run_dir), "device": device, "restart_if_unusable": True, "options": options}
    logger.info("backbone pretraining on %d datastore images, %d epochs, %d process(es), %s", len(files), epochs,
                num_processes, f"continuing {current}" if current else "new backbone")
    metrics = _run(job, paths, num_processes, gpu_ids, _throttled(log), stop_event)
    if metrics.get("stopped") and not accept_stopped:
        raise RuntimeError("backbone pretraining was stopped; the published backbone is unchanged")
    shutil.rmtree(resume_dir(run_dir),
                  ignore_errors=True)  # finished: the next run starts fresh on the then-current images
    metrics.update(continued_from=str(current) if current else None, image_size=config.image_size,
                   window=list(config.window) if config.window else None)
    if publish_result:
        metrics.update(published=str(publish(run_dir, paths.backbone_root)))
    else:
        metrics.update(run_dir=str(run_dir))
    return metrics


SERVED_VALIDATION_FILE = "served_validation.json"


def read_served_validation(paths: ModelPaths) -> dict:
    """The served model's validation record, when it is about the model served now (else {})."""
    served = paths.served_model_dir()
    try:
        record = json.loads((Path(paths.state) / SERVED_VALIDATION_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        record = {}
    if served is not None and record.get("model_dir") == str(served):
        return record
    if served is not None:  # a model given with --conf model_dir, or trained elsewhere: its own record
        from fasttextdiff.config import MODEL_CONFIG_FILE

        try:
            metrics = json.loads((served / MODEL_CONFIG_FILE).read_text()).get("metrics", {})
        except (OSError, json.JSONDecodeError):
            metrics = {}
        if metrics.get("best_val_dice") is not None:
            return {"model_dir": str(served), "val_dice": metrics["best_val_dice"], "val_images": None,
                    "val_metric": metrics.get("validation", {}).get("metric"),
                    "source": "the model's own training record (validation images of that run)"}
    return {}


def _write_served_validation(paths: ModelPaths, record: dict) -> None:
    from fasttextdiff.utils.atomic import atomic_write_json

    atomic_write_json(Path(paths.state) / SERVED_VALIDATION_FILE, record)


def train_segmenter_from_datastore(datastore: Any, conf: AppConf, paths: ModelPaths, *, epochs: int,
                                   batch_size: int, lr: float, device: str,
                                   log: Callable[[dict], None] | None = None,
                                   stop_event: threading.Event | None = None,
                                   num_processes: int = 1, gpu_ids: str | None = None,
                                   backbone_dir: str | Path | None = None, task: str = "fasttextdiff") -> dict:
    """Train fusion + head on the labeled images with their reports, continuing from the served model,
    and publish the best validation epoch only if its validation Dice is not below the served model's on
    the same validation images (`lib.holdout`); otherwise the served model stays and the result says why.

    `backbone_dir` trains on another backbone (the `backbone` task's new one) instead of the current."""
    from fasttextdiff.utils.atomic import publish
    from fasttextdiff.config import MODEL_CONFIG_FILE, FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.utils.errors import CheckpointError
    from fasttextdiff.training.segmenter import validate_model_dir

    from lib.holdout import split_labeled

    backbone = Path(backbone_dir) if backbone_dir else paths.backbone_dir()
    if backbone is None:
        raise ValueError("no diffusion backbone yet: run the `backbone` train task first "
                         "(or pass --conf backbone_dir DIR)")
    labeled_ids = sorted(datastore.get_labeled_images())
    if not labeled_ids:
        raise ValueError("no image in the datastore has a final label yet: save at least one label, then train")
    train_ids, val_ids, held_out = split_labeled(labeled_ids, paths.state)
    remove_stale_slice_dirs(paths.work)
    samples = labeled_samples(datastore, train_ids)
    val_samples = whole_samples(datastore, val_ids)
    if not samples:
        raise ValueError("no labeled image could be read for training (see the server log)")
    served = paths.served_model_dir()
    seg_config = SegmenterConfig(num_classes=len(conf.labels) + 1, labels=conf.labels,
                                 fusion=FusionConfig(text_residual=conf.text_residual))
    text_config = TextConfig(encoder=conf.text_encoder, focus=conf.text_focus.strip() or None)
    if served is not None:  # keep the served model's architecture and encoder when retraining
        record = json.loads((served / MODEL_CONFIG_FILE).read_text())
        seg_config = SegmenterConfig.from_dict(record["segmenter"])
        text_config = TextConfig.from_dict(record["text"])
    train_config = TrainConfig(epochs=epochs, batch_size=min(batch_size, len(samples)), lr=lr, seed=conf.seed,
                               num_workers=0, text_fallback=conf.text_fallback, val_noise_draws=conf.n_noise)
    out_dir = paths.work / "segmenter-run"
    served_val = None
    if served is not None and val_samples:
        served_val = validate_model_dir(served, val_samples, device=device, text_cache_dir=paths.text_cache,
                                        n_noise=conf.n_noise)["dice"]
        logger.info("served model: validation Dice %.4f on %d validation images", served_val, len(val_ids))
    job = {"job": "train-segmenter", "out_dir": str(out_dir), "backbone_dir": str(backbone), "device": device,
           "samples": [_sample_dict(s) for s in samples], "val_samples": [_sample_dict(s) for s in val_samples],
           "text": text_config.to_dict(), "segmenter": seg_config.to_dict(), "train": train_config.to_dict(),
           "text_cache_dir": str(paths.text_cache), "init_dir": str(served) if served is not None else None}
    logger.info("training fusion + head on %d samples, validating on %d (%d epochs, device %s, %d process(es)), "
                "%s",
                len(samples), len(val_samples), epochs, device, num_processes,
                f"continuing from {served}" if served is not None else "new model")
    try:
        metrics = _run(job, paths, num_processes, gpu_ids, log, stop_event)
    except CheckpointError as exc:  # the served fusion + head do not fit (other settings): start fresh
        logger.warning("cannot continue from the served model (%s); training fusion + head from scratch", exc)
        job["init_dir"] = None
        metrics = _run(job, paths, num_processes, gpu_ids, log, stop_event)
    history = metrics.pop("history", None) or []
    new_val = metrics.get("best_val_dice")
    split = {"val_images": val_ids, "train_images": train_ids, "held_out": held_out,
             "samples": len(samples), "val_samples": len(val_samples)}
    measure = metrics.get("validation", {}).get("metric")
    continued = job.get("init_dir")
    if served is None or served_val is None or (new_val is not None and new_val >= served_val - 1e-9):
        published = publish(out_dir, paths.publish_root)
        reason = ("no model was served" if served is None else
                  f"validation Dice {new_val:.4f} (best epoch {metrics.get('best_epoch')}) is not below the served "
                  f"model's {served_val:.4f} on the same {len(val_ids)} validation image(s)")
        _write_served_validation(paths, {"model_dir": str(published), "val_dice": new_val, "val_images": val_ids,
                                         "held_out": held_out, "ts": int(time.time()), "source": f"train task {task}",
                                         "val_metric": measure,
                                         "val_per_image": metrics.get("best_val_per_image")})
        metrics.update(published=str(published), decision="published", reason=f"published: {reason}")
    else:
        reason = (f"not published: the best validation Dice of this run, {new_val:.4f} (epoch "
                  f"{metrics.get('best_epoch')}), is below the served model's {served_val:.4f} on the same "
                  f"{len(val_ids)} validation image(s); still serving {served}")
        _write_served_validation(paths, {"model_dir": str(served), "val_dice": served_val, "val_images": val_ids,
                                         "held_out": held_out, "ts": int(time.time()),
                                         "source": f"re-validated by train task {task}", "val_metric": measure})
        metrics.update(published=None, decision="kept", reason=reason, kept=str(served))
        logger.info("%s", reason)
    metrics.update(split, served_val_dice_before=served_val, val_dice=new_val,
                   continued_from=str(continued) if continued else None, history_tail=history[-5:])
    return metrics


def _sample_dict(sample) -> dict:
    return {"image": str(sample.image), "mask": str(sample.mask), "text": sample.text, "name": sample.name,
            "slices": list(sample.slices) if sample.slices is not None else None}

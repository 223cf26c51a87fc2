"""Segmentation training: fusion + head on few labeled images, backbone and text encoder frozen.

Differences from the reference loop, each for a reason: report embeddings are computed once per
distinct text (not per sample per step); batches > 1 with the text padding mask; MONAI's DiceCE
applies softmax before Dice; the best validation Dice selects the model; runs resume after a
kill from ``<out>.resume/`` under the one policy of `training.resume`; it runs on the shared
training engine, so `accelerate launch` trains data-parallel.
"""

from __future__ import annotations

import copy

import hashlib
import logging
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fasttextdiff.utils.atomic import staged_dir
from fasttextdiff.models.backbone import load_backbone
from fasttextdiff.utils.checkpoint import (load_optimizer_state, load_tensors, optimizer_state_tensors, sha256_file,
                                          verify_sha256)
from fasttextdiff.config import SegmenterConfig, TextConfig, TrainConfig
from fasttextdiff.utils.curves import CURVE_FILE, write_training_curve
from fasttextdiff.data.dataset import SegmentationDataset, select_labeled
from fasttextdiff.data.lvit import Sample
from fasttextdiff.training.engine import Engine, RunProgress, set_seed
from fasttextdiff.training.resume import RESUME_SUFFIX, ResumeState, digest
from fasttextdiff.utils.errors import CheckpointError
from fasttextdiff.models.segmenter import FastTextDiffModel
from fasttextdiff.text.encoder import TextEncoder

log_ = logging.getLogger(__name__)
RESUME_DIR_SUFFIX = RESUME_SUFFIX  # the state of a run writing OUT: OUT.resume/ (training.resume)


class FeatureCache(Dataset):
    """Backbone features of every (un-augmented) training image, computed once.

    The backbone is frozen and its noise draw fixed, so its output for an image never changes:
    recomputing it every epoch (as the reference does) is most of the training time. Stored as one
    float16 array per scale (half of fp32; float16 rather than bf16 for its 3 extra mantissa bits);
    `on_disk` memory-maps them from an anonymous temporary file when they do not fit in memory.
    """

    def __init__(self, base: SegmentationDataset, model: FastTextDiffModel, device: torch.device,
                 batch_size: int = 16, progress: bool = False, on_disk: bool = False):
        self.base = base
        self.on_disk = on_disk
        self.features: list[torch.Tensor] = []  # per scale: (unique images, C, h, w) float16
        self._files: list = []  # the temporary files behind on-disk arrays (unlinked already; closed with the cache)
        # one feature row per distinct image: the same slice named by several reports (one per structure or
        # finding) goes through the backbone once
        slot_of: dict[bytes, int] = {}
        self.slots = [slot_of.setdefault(hashlib.sha256(base[i]["image"].numpy().tobytes()).digest(), len(slot_of))
                      for i in range(len(base))]
        firsts: list[int] = []  # the first item of each slot, in slot order: feature row k is slot k
        for i, slot in enumerate(self.slots):
            if slot == len(firsts):
                firsts.append(i)
        loader = DataLoader(Subset(base, firsts), batch_size=batch_size, shuffle=False)
        start = 0
        with torch.inference_mode():
            for batch in tqdm(loader, desc="cache features", disable=not progress):
                feats = model.pool_features(model.backbone.features(batch["image"].to(device)))
                if not self.features:
                    self.features = [self._allocate((len(firsts), *f.shape[1:])) for f in feats]
                n = batch["image"].shape[0]
                for store, f in zip(self.features, feats):
                    store[start:start + n] = f.to(torch.float16).cpu()
                start += n

    def _allocate(self, shape: tuple[int, ...]) -> torch.Tensor:
        if not self.on_disk:
            return torch.empty(shape, dtype=torch.float16)
        handle = tempfile.TemporaryFile(prefix="fasttextdiff-features-")
        self._files.append(handle)
        return torch.from_numpy(np.memmap(handle, dtype=np.float16, mode="w+", shape=shape))

    @staticmethod
    def bytes_needed(model: FastTextDiffModel, n: int) -> int:
        per_image = sum(c * min(s, model.head_size) ** 2
                        for c, s in zip(model.backbone.feature_channels, model.backbone.feature_sizes))
        return per_image * n * 2  # float16

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        slot = self.slots[index]
        return {"features": [f[slot] for f in self.features], "label": item["label"], "text": item["text"],
                "name": item["name"]}


class TextTable:
    """Each distinct report encoded once; batches gather and pad the cached states."""

    def __init__(self, encoder: TextEncoder | None, texts: Sequence[str]):
        self.encoder = encoder
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        if encoder is not None:
            self._add(texts)

    def batch(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.encoder is None:
            return None, None
        self._add([t for t in texts if t not in self.cache])  # reports seen for the first time
        items = [self.cache[t] for t in texts]
        length = max(s.shape[0] for s, _ in items)
        states = torch.zeros(len(items), length, items[0][0].shape[1])
        mask = torch.zeros(len(items), length, dtype=torch.bool)
        for i, (s, m) in enumerate(items):
            states[i, : s.shape[0]] = s
            mask[i, : m.shape[0]] = m
        return states.to(device), mask.to(device)

    def _add(self, texts: Sequence[str]) -> None:
        unique = sorted(set(texts) - set(self.cache))
        for start in range(0, len(unique), 32):
            chunk = unique[start:start + 32]
            batch = self.encoder.encode(chunk)
            for i, text in enumerate(chunk):
                n = int(batch.mask[i].sum())
                self.cache[text] = (batch.states[i, :n].clone(), batch.mask[i, :n].clone())


def validate_served(model: FastTextDiffModel, encoder: TextEncoder | None, samples: Sequence[Sample], n_noise: int,
                    device: torch.device | None = None) -> dict:
    """Dice as a user measures it, the figure that selects the best epoch and gates publishing.

    Each sample goes through the path that serves (`inference.pipeline.Segmenter`: model input, the
    `n_noise` seeded draws, the mask pasted back into the sample's own grid) and is scored there: a
    volume is one 3D Dice, a 2D image one Dice; the mean is over samples. A mean over 2D slices at model
    resolution (what this replaced) scores every empty slice predicted empty as 1 and hid volumes the
    model missed entirely. Every process validates all samples, so all see the same figure.
    """
    from fasttextdiff.inference.batched import set_memory_format
    from fasttextdiff.inference.evaluate import evaluate_model
    from fasttextdiff.inference.pipeline import Segmenter

    was_training, layout = model.training, getattr(model, "_fasttextdiff_memory_format", "contiguous")
    model.eval()
    try:
        segmenter = Segmenter(model, {}, encoder, Path("."), device or torch.device("cpu"), n_noise=n_noise)
        # the served layout, converted here: a conversion inside inference mode would make the weights untrainable
        set_memory_format(model, segmenter.options.channels_last)
        result = evaluate_model(segmenter, samples, n_noise=n_noise, progress=False)
    finally:
        model.train(was_training)
        set_memory_format(model, layout == "channels_last")  # training goes on in its own layout, bit for bit
    return {"dice": result["dice_mean"], "iou": result["iou_mean"], "n": result["n"],
            "per_image": [{"name": r["name"], "dice": r["dice"]} for r in result["per_image"]]}


def train_segmenter(
    train_samples: Sequence[Sample],
    out_dir: str | Path,
    *,
    backbone_dir: str | Path,
    text_config: TextConfig,
    segmenter_config: SegmenterConfig,
    train_config: TrainConfig,
    val_samples: Sequence[Sample] | None = None,
    test_samples: Sequence[Sample] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log: Callable[[dict], None] | None = None,
    stop_event: threading.Event | None = None,
    text_cache_dir: str | Path | None = None,
    backbone_overrides: dict | None = None,
    init_dir: str | Path | None = None,
    resume: bool = True,
) -> dict:
    """Train and write the model directory `out_dir` atomically; returns the metrics (also in its record).

    `backbone_overrides` change how the backbone is probed (`DiffusionBackbone.reconfigured`: taps,
    timesteps, image size), e.g. a paper preset on a converted ADM; the model records the result.

    A `stop_event` ends training after the current epoch and still writes the best model so far.
    `init_dir` (a model directory of the same architecture) starts fusion + head from its weights
    instead of random ones: the server's train tasks continue from the served model.
    A run killed or stopped before the end resumes from ``<out_dir>.resume/`` when it is started again on
    the same data and settings (`training.resume`; ``resume=False`` starts over).
    Under `accelerate launch` every process trains on its share of each epoch; the main process writes.
    """
    out_dir = Path(out_dir)
    engine = Engine(device, mixed_precision="auto" if train_config.amp else "no")
    acc, device = engine.accelerator, engine.device
    set_seed(train_config.seed)
    generator = torch.Generator().manual_seed(train_config.seed)  # the loader's shuffles
    started = time.time()

    labeled = [s for s in train_samples if s.mask is not None]
    if not labeled:
        raise ValueError("no labeled images to train on (every training sample lacks a mask)")
    labeled = select_labeled(labeled, train_config.labeled, seed=train_config.seed)

    backbone = load_backbone(backbone_dir)  # ours, or any diffusers UNet2DModel checkpoint
    if backbone_overrides:
        backbone = backbone.reconfigured(**backbone_overrides)
    with acc.main_process_first():  # the main process builds or fills shared caches (tiny encoder, text cache)
        encoder = TextEncoder(text_config, device=device,
                              cache_dir=text_cache_dir) if segmenter_config.use_text else None
    texts = TextTable(encoder, [s.text for s in labeled])
    val_labeled = [s for s in (val_samples or []) if s.mask is not None]
    model = FastTextDiffModel(backbone, encoder.hidden_size if encoder else 0, segmenter_config)
    if init_dir is not None:
        load_segmenter_weights(model, init_dir)
    model = model.to(device)

    size, channels = backbone.config.image_size, backbone.config.in_channels

    def dataset(samples: Sequence[Sample], **kwargs) -> SegmentationDataset:
        return SegmentationDataset([s for s in samples if s.mask is not None], size=size, channels=channels,
                                   num_classes=segmenter_config.num_classes, window=backbone.config.window,
                                   body_crop=backbone.config.body_crop, **kwargs)

    train_ds = dataset(labeled, augment=train_config.augment, rotate_degrees=train_config.rotate_degrees,
                       seed=train_config.seed)
    cache_bytes = FeatureCache.bytes_needed(model, len(train_ds))
    in_memory = cache_bytes <= train_config.feature_cache_gb * 2**30
    # too big for memory: memory-mapped from a temporary file when the disk has room (reading it back is
    # still far cheaper than a backbone forward per image per epoch)
    cached = not train_config.augment and (
        in_memory or cache_bytes <= 0.8 * shutil.disk_usage(tempfile.gettempdir()).free)
    if cached:
        train_ds = FeatureCache(train_ds, model, device, progress=progress and engine.is_main, on_disk=not in_memory)
    loader = DataLoader(train_ds, batch_size=train_config.batch_size, shuffle=True, generator=generator,
                        num_workers=train_config.num_workers, drop_last=False)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=train_config.lr, weight_decay=train_config.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=train_config.dice_weight, lambda_ce=1.0)
    net, optimizer, loader = acc.prepare(model, optimizer, loader)

    def served_dice(samples: Sequence[Sample]) -> dict:
        return validate_served(model, encoder, samples, train_config.val_noise_draws, device)

    image_first = text_fallback_applies(segmenter_config, train_config, bool(val_labeled), init_dir is not None)
    probed = backbone.config.to_dict() if backbone_overrides else None
    state = ResumeState(engine, out_dir, run_record(labeled, val_samples, backbone_dir, text_config, segmenter_config,
                                                    train_config, probed, init_dir, epochs_matter=image_first), log_)
    total_epochs = train_config.epochs * (2 if image_first else 1)
    # text_fallback's second phase is a fresh run with the report: it starts from these weights, not from
    # the image-only phase's last epoch, which has already fitted the labels without the text (measured:
    # the text then never opened on the text-necessary set, and validation kept the image-only model). Taken
    # before a resume loads anything, so a resumed run restarts its text phase from the same start.
    initial = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()} if image_first else None
    initial_optimizer = copy.deepcopy(optimizer.state_dict()) if image_first else None
    initial_rng = (torch.get_rng_state(), np.random.get_state(), random.getstate(), generator.get_state())
    start_epoch, best, history, best_state = _resume(engine, state, resume, model, optimizer, generator, total_epochs)

    n_params = sum(p.numel() for p in trainable)
    if engine.is_main:
        log_.info("training %d parameters on %d labeled images (%s x %d), epochs %d..%d", n_params, len(labeled),
                  device, engine.num_processes, start_epoch + 1, total_epochs)
    bar = RunProgress(engine, desc="train", enabled=progress, total_steps=total_epochs * len(loader),
                      initial_step=start_epoch * len(loader), epochs_total=total_epochs, logger=log_)
    model.train()
    for epoch in range(start_epoch, total_epochs):
        if image_first and epoch == train_config.epochs:  # the text phase: the same run as without the fallback
            model.load_state_dict(initial, strict=False)
            optimizer.load_state_dict(initial_optimizer)
            torch.set_rng_state(initial_rng[0])
            np.random.set_state(initial_rng[1])
            random.setstate(initial_rng[2])
            generator.set_state(initial_rng[3])
        loader.set_epoch(epoch)  # also the dataset's augmentation epoch
        model.fusion.text_enabled = not image_first or epoch >= train_config.epochs
        losses = []
        for batch in loader:
            with acc.accumulate(net):
                states, mask = texts.batch(batch["text"], device)
                with acc.autocast():
                    if cached:
                        logits = net(None, states, mask, features=batch["features"])
                    else:
                        logits = net(batch["image"], states, mask)
                    loss = loss_fn(logits.float(), batch["label"])
                acc.backward(loss)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            bar.step(bar.record(epoch + 1, float(np.mean(losses)), optimizer.param_groups[0]["lr"]))
        record = {"epoch": epoch + 1, "loss": engine.mean(torch.tensor(np.mean(losses), dtype=torch.float64))}
        stop = engine.any(stop_event is not None and stop_event.is_set())
        last = epoch + 1 in (total_epochs, train_config.epochs) or stop
        if val_labeled and ((epoch + 1) % train_config.val_every == 0 or last):
            scores = served_dice(val_labeled)
            record.update(val_dice=scores["dice"], val_iou=scores["iou"])
            if scores["dice"] > best["dice"]:
                best = {"dice": scores["dice"], "epoch": epoch + 1, "per_image": scores["per_image"]}
                best_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        history.append(record)
        shown = bar.record(**record,
                           lr=optimizer.param_groups[0]["lr"])  # epochs_total: 2 x epochs under text_fallback
        bar.end_epoch(shown)
        if log and engine.is_main:
            log(shown)
        _save_resume(state, model, optimizer, generator, epoch + 1, best, history, best_state)
        if stop:
            log_.info("training stopped on request after epoch %d", epoch + 1)
            break
    bar.close()

    model.fusion.text_enabled = True
    metrics: dict = {"epochs": len(history), "history": history, "labeled_images": len(labeled),
                     "feature_cache": cached, "feature_cache_on_disk": cached and not in_memory,
                     "trainable_parameters": n_params, "seconds": round(time.time() - started, 2),
                     "world_size": engine.num_processes}
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
        metrics.update(best_val_dice=best["dice"], best_epoch=best["epoch"], best_val_per_image=best.get("per_image"))
        if image_first:  # the image-only phase's best has a closed gate: it is the no_text network
            metrics["text_fallback"] = "image" if best["epoch"] <= train_config.epochs else "text"
    if engine.num_processes > 1:
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters() if p.requires_grad])
        gathered = acc.gather(flat[None])
        metrics["ddp_weights_identical"] = all(torch.equal(gathered[0], g) for g in gathered[1:])
    if val_labeled:
        metrics["validation"] = validation_record(val_labeled, train_config.val_noise_draws)
    test_labeled = [s for s in (test_samples or []) if s.mask is not None]
    if test_labeled:
        scores = served_dice(test_labeled)
        metrics["test"] = {"dice": scores["dice"], "iou": scores["iou"], "n": scores["n"]}
    if engine.is_main:
        with staged_dir(out_dir) as staging:
            model.save(staging, text_config, train_config, metrics)
            _curve(history, staging / CURVE_FILE)
            if encoder is not None:
                encoder.save_reference(staging)
    state.finish()
    return metrics


def text_fallback_applies(segmenter_config: SegmenterConfig, train_config: TrainConfig, has_val: bool,
                          continued: bool = False) -> bool:
    """TrainConfig.text_fallback (a text path that only helps): `epochs` image-only (text residual off),
    then `epochs` with the text from the same initial weights (two runs in one; validation keeps the better).
    It needs a validation split to choose between the two and a text path that starts closed; a
    "plain" residual (models from before the option, the reference's fusion) trains its text from epoch 1."""
    if not (train_config.text_fallback and segmenter_config.use_text):
        return False
    if segmenter_config.fusion.text_residual == "plain":
        log_.warning("text_fallback skipped: text_residual 'plain' does not start as the no_text network "
                     "(use 'zero' or 'gate')")
        return False
    if continued:
        log_.info("text_fallback skipped: continued training keeps the choice the served model already made")
        return False
    if not has_val:
        log_.info("text_fallback skipped: no validation split to choose between image-only and text")
        return False
    return True


def _curve(history: list, path: Path) -> None:
    try:
        write_training_curve(history, path, title="segmenter training")
    except Exception as exc:  # noqa: BLE001 - a missing picture never fails a training
        log_.warning("could not draw the training curve: %s", exc)


def load_segmenter_weights(model: FastTextDiffModel, model_dir: str | Path) -> None:
    """Fusion + head weights of a saved model into `model` (checksum-verified; every tensor must fit)."""
    from fasttextdiff.models.segmenter import WEIGHTS_FILE, read_model_record

    model_dir = Path(model_dir)
    record = read_model_record(model_dir)
    weights = model_dir / WEIGHTS_FILE
    state = load_tensors(weights)
    verify_sha256(weights, record.get("weights_sha256"), "restore it or train the model again")
    own = model.trainable_state_dict()
    misfit = sorted(k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape))
    if misfit or set(state) - set(own):
        raise CheckpointError(f"{weights} does not fit the model being trained (differing tensors: {misfit[:3]}); "
                              "it was built with other settings")
    model.load_state_dict(state, strict=False)


def validation_record(samples: Sequence[Sample], n_noise: int) -> dict:
    """What a validation figure means, stored beside it (model record, `/info`)."""
    from fasttextdiff.data.io import is_volume_path

    volumes = sum(is_volume_path(s.image) for s in samples)
    unit = "volume" if volumes == len(samples) else "image" if not volumes else "image or volume"
    return {"metric": f"mean Dice per {unit} in its own geometry, through the served path",
            "noise_draws": n_noise, "volumes": volumes, "images": len(samples) - volumes}


@torch.no_grad()
def validate_model_dir(model_dir: str | Path, samples: Sequence[Sample], device: str | torch.device | None = None,
                       text_cache_dir: str | Path | None = None, n_noise: int = 4) -> dict:
    """A saved model's validation Dice on `samples`, computed exactly as training selects its best epoch
    (`validate_served`): a served model and a new run compare like for like."""
    from fasttextdiff.inference.pipeline import Segmenter

    labeled = [s for s in samples if s.mask is not None]
    if not labeled:
        raise ValueError("no validation samples with masks")
    segmenter = Segmenter.load(model_dir, device=device, n_noise=n_noise, text_cache_dir=text_cache_dir)
    return validate_served(segmenter.model, segmenter.encoder, labeled, n_noise, segmenter.device)


def run_record(labeled: Sequence[Sample], val_samples: Sequence[Sample] | None, backbone_dir: str | Path,
               text_config: TextConfig, segmenter_config: SegmenterConfig, train_config: TrainConfig,
               backbone_config: dict | None = None, init_dir: str | Path | None = None,
               epochs_matter: bool = False) -> dict:
    """What a resumable run was started on (`training.resume`): the contents (not paths) of every
    image, mask and report, the backbone, the starting weights, and the settings except the epoch
    count (a constant learning rate: more epochs extend the same run), unless ``epochs_matter``
    (text_fallback switches phase after `epochs`, so the count decides the run)."""
    def rows(samples):
        return digest(sorted([_content_sha(s.image), _content_sha(s.mask) if s.mask else None,
                              hashlib.sha256(s.text.encode("utf-8")).hexdigest()]
                             + ([list(s.slices)] if s.slices is not None else []) for s in samples))

    backbone_dir = Path(backbone_dir)
    backbone = {name: sha256_file(backbone_dir / name)
                for name in ("config.json", "backbone_config.json",
                             "checksums.json") if (backbone_dir / name).is_file()}
    if "checksums.json" not in backbone:  # weights without a recorded checksum: hash them
        backbone["weights"] = [sha256_file(w) for w in sorted(backbone_dir.glob("*.safetensors"))]
    settings = {k: v for k, v in train_config.to_dict().items() if k != "epochs" or epochs_matter}
    if backbone_config is not None:  # as probed (overrides included), not only as stored
        backbone["config"] = backbone_config
    return {"data": {"train": rows(labeled), "val": rows(val_samples or [])}, "backbone": digest(backbone),
            "init": sha256_file(Path(init_dir) / "segmenter.safetensors") if init_dir is not None else None,
            "text": text_config.to_dict(), "segmenter": segmenter_config.to_dict(), "settings": settings}


def _content_sha(path: Path) -> str:
    """A file's checksum; a DICOM series folder's, over its files in name order."""
    path = Path(path)
    if path.is_dir():
        return digest([[f.name, sha256_file(f)] for f in sorted(path.iterdir()) if f.is_file()])
    return sha256_file(path)


def _save_resume(state: ResumeState, model: FastTextDiffModel, optimizer, generator: torch.Generator,
                 epoch: int, best: dict, history: list, best_state: dict | None) -> None:
    """Epoch-end state in the shared training-state format (weights, best weights, Adam moments, RNG)."""
    tensors = {f"model.{k}": v for k, v in model.trainable_state_dict().items()}
    tensors.update({f"best.{k}": v for k, v in (best_state or {}).items()})
    opt_tensors, opt_meta = optimizer_state_tensors(optimizer.optimizer)
    meta = {"epoch": epoch, "best": best, "history": history, "optimizer": opt_meta}
    state.save({**tensors, **opt_tensors}, meta, {"loader": generator})


def _resume(engine: Engine, state: ResumeState, resume: bool, model: FastTextDiffModel, optimizer,
            generator: torch.Generator, total_epochs: int) -> tuple[int, dict, list, dict | None]:
    """(start epoch, best record, history, best weights) from an interrupted run, or a fresh start."""
    fresh = (0, {"dice": -1.0, "epoch": 0}, [], None)
    loaded = state.load(resume)
    if loaded is None:
        return fresh
    tensors, meta = loaded
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        load_optimizer_state(optimizer.optimizer, tensors, meta["optimizer"])
        engine.restore_rng(tensors, {"loader": generator})
    except (KeyError, RuntimeError, ValueError) as exc:
        raise state.does_not_fit(exc) from exc
    best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    epoch = min(int(meta["epoch"]), total_epochs)
    state.resumed(epoch)
    return epoch, meta.get("best", fresh[1]), meta.get("history", []), best_state

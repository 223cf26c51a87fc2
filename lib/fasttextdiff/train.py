"""Segmentation training: fusion + head on few labeled images, backbone and text encoder frozen.

Differences from the reference loop, each for a reason: report embeddings are computed once per
distinct text (not per sample per step); batches > 1 with the text padding mask; MONAI's DiceCE
applies softmax before Dice; the best validation Dice selects the model; runs resume after a
kill; under torchrun the same code trains data-parallel (DDP).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from monai.losses import DiceCELoss
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from tqdm.auto import tqdm

from .backbone import load_backbone
from .checkpoint import load_optimizer_state, optimizer_state_tensors, replace_dir, staging_dir
from .config import SegmenterConfig, TextConfig, TrainConfig, atomic_write_json
from .data.dataset import SegmentationDataset, select_labeled
from .data.lvit import Sample
from .metrics import dice_iou
from .model import FastTextDiffModel
from .text import TextBatch, TextEncoder

log_ = logging.getLogger(__name__)
RESUME_DIR_SUFFIX = ".resume"


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


class FeatureCache(Dataset):
    """Backbone features of every (un-augmented) training image, computed once.

    The backbone is frozen and its noise draw fixed, so its output for an image never changes:
    recomputing it every epoch (as the reference does) is most of the training time.
    """

    def __init__(self, base: SegmentationDataset, model: FastTextDiffModel, device: torch.device,
                 batch_size: int = 16, progress: bool = False):
        self.base = base
        self.features: list[list[torch.Tensor]] = []
        loader = DataLoader(base, batch_size=batch_size, shuffle=False)
        with torch.inference_mode():
            for batch in tqdm(loader, desc="cache features", disable=not progress):
                feats = model.pool_features(model.backbone.features(batch["image"].to(device)))
                for i in range(batch["image"].shape[0]):
                    self.features.append([f[i].to(torch.float16).cpu() for f in feats])

    @staticmethod
    def bytes_needed(model: FastTextDiffModel, n: int) -> int:
        per_image = sum(c * min(s, model.head_size) ** 2
                        for c, s in zip(model.backbone.feature_channels, model.backbone.feature_sizes))
        return per_image * n * 2  # float16

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        return {"features": self.features[index], "label": item["label"], "text": item["text"], "name": item["name"]}


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


def _distributed() -> tuple[int, int]:
    """Join the process group torchrun prepared (gloo on CPU, NCCL on GPU); (rank, world)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def validate(model: FastTextDiffModel, loader: DataLoader, texts: TextTable, device: torch.device) -> dict:
    """Per-image Dice/IoU at model resolution (single noise draw), averaged."""
    model.eval()
    dices, ious = [], []
    for batch in loader:
        images = batch["image"].to(device)
        states, mask = texts.batch(batch["text"], device)
        pred = model.predict(images, states, mask, n_noise=1).mask.cpu()
        d, i = dice_iou(pred, batch["label"][:, 0], model.config.num_classes)
        dices += d
        ious += i
    model.train()
    return {"dice": float(np.mean(dices)) if dices else float("nan"), "iou": float(np.mean(ious)) if ious else float("nan")}


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
    publish: Callable[[Path], None] | None = None,
) -> dict:
    """Train and write the model directory `out_dir` atomically; returns the metrics.

    `publish(staging)` overrides the final rename (the server swaps a `current` link instead).
    A `stop_event` ends training after the current epoch and still publishes the best model so far.
    """
    out_dir = Path(out_dir)
    rank, world = _distributed()
    device = pick_device(device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    generator = seed_everything(train_config.seed)
    started = time.time()

    labeled = [s for s in train_samples if s.mask is not None]
    if not labeled:
        raise ValueError("no labeled images to train on (every training sample lacks a mask)")
    labeled = select_labeled(labeled, train_config.labeled, seed=train_config.seed)

    backbone = load_backbone(backbone_dir)  # ours, or any diffusers UNet2DModel checkpoint
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 first: it may build or fill shared caches (tiny encoder, text cache)
    encoder = TextEncoder(text_config, device=device, cache_dir=text_cache_dir) if segmenter_config.use_text else None
    if world > 1 and rank == 0:
        dist.barrier()
    all_texts = [s.text for s in labeled] + [s.text for s in (val_samples or [])]
    texts = TextTable(encoder, all_texts)
    text_dim = encoder.hidden_size if encoder else 0
    model = FastTextDiffModel(backbone, text_dim, segmenter_config).to(device)

    size, channels = backbone.config.image_size, backbone.config.in_channels
    train_ds = SegmentationDataset(labeled, size=size, channels=channels, num_classes=segmenter_config.num_classes,
                                   augment=train_config.augment, rotate_degrees=train_config.rotate_degrees,
                                   seed=train_config.seed, window=backbone.config.window)
    cached = not train_config.augment and \
        FeatureCache.bytes_needed(model, len(train_ds)) <= train_config.feature_cache_gb * 2**30
    if cached:
        train_ds = FeatureCache(train_ds, model, device, progress=progress and rank == 0)
    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=train_config.seed) if world > 1 else None
    loader = DataLoader(train_ds, batch_size=train_config.batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=generator, num_workers=train_config.num_workers, drop_last=False)
    val_loader = None
    if val_samples:
        val_ds = SegmentationDataset([s for s in val_samples if s.mask is not None], size=size, channels=channels,
                                     num_classes=segmenter_config.num_classes, augment=False, window=backbone.config.window)
        if len(val_ds):
            val_loader = DataLoader(val_ds, batch_size=train_config.batch_size * 2)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=train_config.lr, weight_decay=train_config.weight_decay)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=train_config.dice_weight, lambda_ce=1.0)
    use_amp = train_config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    net: torch.nn.Module = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    resume_dir = out_dir.with_name(out_dir.name + RESUME_DIR_SUFFIX)
    fingerprint = run_fingerprint(labeled, val_samples, backbone_dir, text_config, segmenter_config, train_config)
    start_epoch, best, history, best_state = _resume(resume_dir, model, optimizer, train_config, fingerprint)

    n_params = sum(p.numel() for p in trainable)
    # issue 16, text_fallback: `epochs` image-only (text residual off), then `epochs` with the text
    image_first = train_config.text_fallback and segmenter_config.use_text
    if image_first and segmenter_config.fusion.text_residual == "plain":
        raise ValueError("text_fallback needs a text path that starts closed (FusionConfig.text_residual "
                         "'zero' or 'gate', not 'plain')")
    total_epochs = train_config.epochs * (2 if image_first else 1)
    if rank == 0:
        log_.info("training %d parameters on %d labeled images (%s), epochs %d..%d", n_params, len(labeled),
                  device, start_epoch + 1, total_epochs)
    bar = tqdm(range(start_epoch, total_epochs), desc="train", disable=not progress or rank != 0,
               initial=start_epoch, total=total_epochs)
    model.train()
    for epoch in bar:
        if sampler is not None:
            sampler.set_epoch(epoch)
        if not cached:
            train_ds.set_epoch(epoch)  # fresh, reproducible augmentation each epoch
        model.fusion.text_enabled = not image_first or epoch >= train_config.epochs
        losses = []
        for batch in loader:
            labels = batch["label"].to(device)
            states, mask = texts.batch(batch["text"], device)
            with torch.autocast(device.type, enabled=use_amp):
                if cached:
                    logits = net(None, states, mask, features=[f.to(device) for f in batch["features"]])
                else:
                    logits = net(batch["image"].to(device), states, mask)
                loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses))}
        last = epoch + 1 in (total_epochs, train_config.epochs) or (stop_event is not None and stop_event.is_set())
        if val_loader is not None and ((epoch + 1) % train_config.val_every == 0 or last):
            scores = validate(model, val_loader, texts, device)
            record.update(val_dice=scores["dice"], val_iou=scores["iou"])
            if scores["dice"] > best["dice"]:
                best = {"dice": scores["dice"], "epoch": epoch + 1}
                best_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
        history.append(record)
        bar.set_postfix({k: round(v, 4) for k, v in record.items() if k != "epoch"})
        if log and rank == 0:
            log(dict(record))
        if rank == 0:
            _save_resume(resume_dir, model, optimizer, epoch + 1, best, history, best_state, fingerprint)
        if stop_event is not None and stop_event.is_set():
            log_.info("training stopped on request after epoch %d", epoch + 1)
            break

    model.fusion.text_enabled = True
    metrics: dict = {"epochs": len(history), "history": history, "labeled_images": len(labeled),
                     "feature_cache": cached,
                     "trainable_parameters": n_params, "seconds": round(time.time() - started, 2),
                     "world_size": world}
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
        metrics.update(best_val_dice=best["dice"], best_epoch=best["epoch"])
        if image_first:  # the image-only phase's best has a closed gate: it is the no_text network
            metrics["text_fallback"] = "image" if best["epoch"] <= train_config.epochs else "text"
    if world > 1:
        metrics["ddp_weights_identical"] = _weights_identical_across_ranks(model)
    if rank == 0:
        if test_samples:
            test_ds = SegmentationDataset([s for s in test_samples if s.mask is not None], size=size, channels=channels,
                                          num_classes=segmenter_config.num_classes, window=backbone.config.window)
            scores = validate(model, DataLoader(test_ds, batch_size=train_config.batch_size * 2), texts, device)
            metrics["test"] = {"dice": scores["dice"], "iou": scores["iou"], "n": len(test_ds)}
        staging = staging_dir(out_dir)
        try:
            model.save(staging, text_config, train_config, metrics)
            if encoder is not None:
                encoder.save_reference(staging)
            if publish is not None:
                publish(staging)
            else:
                replace_dir(staging, out_dir)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(resume_dir, ignore_errors=True)
    if world > 1:
        dist.barrier()
    return metrics


def _weights_identical_across_ranks(model: FastTextDiffModel) -> bool:
    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def _file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def run_fingerprint(labeled: Sequence[Sample], val_samples: Sequence[Sample] | None, backbone_dir: str | Path,
                    text_config: TextConfig, segmenter_config: SegmenterConfig, train_config: TrainConfig) -> str:
    """What a resumable run was started on: the contents (not paths) of every image, mask and
    report, the backbone, and the settings except the epoch count. A resume state with another
    fingerprint belongs to a different training set (labels saved or changed since) and is dropped."""
    import hashlib

    def rows(samples):
        return sorted([_file_sha256(Path(s.image)), _file_sha256(Path(s.mask) if s.mask else None),
                       hashlib.sha256(s.text.encode("utf-8")).hexdigest()] for s in samples)

    backbone_dir = Path(backbone_dir)
    backbone = {name: _file_sha256(backbone_dir / name) for name in ("config.json", "backbone_config.json", "checksums.json")
                if (backbone_dir / name).is_file()}
    if "checksums.json" not in backbone:  # weights without a recorded checksum: hash them
        backbone["weights"] = [_file_sha256(w) for w in sorted(backbone_dir.glob("*.safetensors"))]
    settings = {k: v for k, v in train_config.to_dict().items() if k != "epochs"}
    record = {"train": rows(labeled), "val": rows(val_samples or []), "backbone": backbone,
              "text": text_config.to_dict(), "segmenter": segmenter_config.to_dict(), "settings": settings}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _save_resume(resume_dir: Path, model, optimizer, epoch: int, best: dict, history: list, best_state,
                 fingerprint: str | None = None) -> None:
    """Epoch-end state as safetensors + JSON, written to a staging dir and renamed in place."""
    staging = staging_dir(resume_dir)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()},
              str(staging / "model.safetensors"))
    if best_state is not None:
        save_file({k: v.cpu().contiguous() for k, v in best_state.items()}, str(staging / "best.safetensors"))
    opt_tensors, opt_meta = optimizer_state_tensors(optimizer)
    save_file(opt_tensors, str(staging / "optimizer.safetensors"))
    atomic_write_json(staging / "state.json", {"epoch": epoch, "best": best, "history": history, "optimizer": opt_meta,
                                               "fingerprint": fingerprint})
    replace_dir(staging, resume_dir)


def _resume(resume_dir: Path, model, optimizer, train_config: TrainConfig,
            fingerprint: str | None = None) -> tuple[int, dict, list, dict | None]:
    """(start epoch, best record, history, best weights) from an interrupted run, or a fresh start."""
    fresh = (0, {"dice": -1.0, "epoch": 0}, [], None)
    state_file = resume_dir / "state.json"
    if not state_file.is_file():
        return fresh
    try:
        state = json.loads(state_file.read_text())
        if fingerprint is not None and state.get("fingerprint") != fingerprint:
            log_.warning("discarding the resume state in %s: the training images, labels, reports, backbone or "
                         "settings changed since that run; starting over", resume_dir)
            shutil.rmtree(resume_dir, ignore_errors=True)
            return fresh
        model.load_state_dict(load_file(str(resume_dir / "model.safetensors")), strict=False)
        load_optimizer_state(optimizer, load_file(str(resume_dir / "optimizer.safetensors")), state["optimizer"])
        best_file = resume_dir / "best.safetensors"
        best_state = load_file(str(best_file)) if best_file.is_file() else None
    except (OSError, ValueError, KeyError, SafetensorError) as exc:
        log_.warning("ignoring unreadable resume state in %s (%s); starting over", resume_dir, exc)
        shutil.rmtree(resume_dir, ignore_errors=True)
        return fresh
    epoch = min(int(state["epoch"]), train_config.epochs * (2 if train_config.text_fallback else 1))
    log_.info("resuming training from epoch %d (%s)", epoch, resume_dir)
    return epoch, state.get("best", fresh[1]), state.get("history", []), best_state

"""Self-supervised pretraining of the diffusion backbone on unlabeled images (the label-efficient part).

The U-Net learns to predict the noise added to the user's own images (DDPM's epsilon objective):
that is how it learns the domain from the many unlabeled images of a datastore. The saved weights
are an EMA of the trained ones, as in DDPM. Runs on the shared training engine (``accelerate
launch`` for several GPUs or machines) and resumes from ``<out_dir>.resume/`` under the one policy
of `training.resume`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader, DistributedSampler

from fasttextdiff.utils.atomic import atomic_write_json, check_replaceable
from fasttextdiff.models.backbone import (BACKBONE_CONFIG_NAME, BACKBONE_ENTRIES, METRICS_NAME, DiffusionBackbone,
                                          build_unet)
from fasttextdiff.utils.checkpoint import load_optimizer_state, optimizer_state_tensors
from fasttextdiff.config import BackboneConfig, PretrainConfig
from fasttextdiff.training.engine import Engine, RunProgress
from fasttextdiff.training.resume import ResumeState, tensor_digest
from fasttextdiff.utils.errors import TrainingError

__all__ = ["pretrain_backbone"]
log_ = logging.getLogger(__name__)


class _ImageOnly(torch.utils.data.Dataset):
    """A Dataset, a list of tensors or one (N, C, H, W) tensor as checked (C, H, W) float tensors in [-1, 1].

    Checking each item costs nothing next to a U-Net step and turns a wrongly scaled or sized image
    (0..255 pixels, a forgotten resize) into a sentence instead of a silently useless backbone.
    """

    def __init__(self, source: Any, config: BackboneConfig) -> None:
        if isinstance(source, torch.Tensor) and source.ndim != 4:
            raise ValueError(f"an image tensor must be (N, C, H, W), got shape {tuple(source.shape)}")
        if not (hasattr(source, "__getitem__") and hasattr(source, "__len__")):
            raise ValueError("images must be a Dataset, a list of (C, H, W) tensors or an (N, C, H, W) tensor, "
                             f"got {type(source).__name__}")
        self.source = source
        self.shape = (config.in_channels, config.image_size, config.image_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = self.source[index]
        if isinstance(image, dict):
            if "image" not in image:
                raise ValueError(f"dataset items that are dicts need an 'image' key, got keys {sorted(image)}")
            image = image["image"]
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"dataset items must be (C, H, W) tensors, got {type(image).__name__}")
        image = image.float()
        if tuple(image.shape) != self.shape:
            raise ValueError(
                f"pretraining images must have shape (C, H, W) = {self.shape}, image {index} has {tuple(image.shape)}"
            )
        if not torch.isfinite(image).all():
            raise ValueError(f"pretraining image {index} contains NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < -1.001 or high > 1.001:
            raise ValueError(
                f"pretraining images must be scaled to [-1, 1]; image {index} spans [{low:.3g}, {high:.3g}]"
            )
        return image


def _images_digest(source: Any) -> str:
    """What the run is trained on: the pixels of images held in memory (a tensor or a list of tensors, the
    CLI's and the server's form); for another Dataset, which is not read twice, its type and length."""
    if isinstance(source, torch.Tensor):
        return tensor_digest([source])
    if isinstance(source, (list, tuple)) and all(isinstance(x, torch.Tensor) for x in source):
        return tensor_digest(source)
    return f"{type(source).__qualname__}:{len(source)}"


def _random_flips(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image horizontal and vertical flips (p = 0.5 each); the draws come from the run's generator."""
    flips = torch.rand((x.shape[0], 2), generator=gen) < 0.5
    h = flips[:, 0].to(x.device).view(-1, 1, 1, 1)
    v = flips[:, 1].to(x.device).view(-1, 1, 1, 1)
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


def _initial_unet(
    init: str | os.PathLike | DiffusionBackbone | None, config: BackboneConfig, seed: int
) -> tuple[BackboneConfig, UNet2DModel]:
    """Seeded fresh weights, or a copy of ``init``'s U-Net (and ``config`` updated to its architecture)."""
    if init is None:
        with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
            torch.manual_seed(seed)
            return config, build_unet(config)
    if isinstance(init, DiffusionBackbone):
        source = init
    elif (Path(init) / BACKBONE_CONFIG_NAME).is_file():
        source = DiffusionBackbone.from_pretrained(init)
    else:
        source = DiffusionBackbone.from_diffusers(init)
    unet = copy.deepcopy(source.unet).requires_grad_(True)  # ``init`` may be a frozen backbone
    if unet.config.out_channels != unet.config.in_channels:
        raise ValueError(
            f"the initial U-Net predicts {unet.config.out_channels} channels for {unet.config.in_channels} input "
            "channels; epsilon-prediction pretraining needs them equal"
        )
    arch = {k: getattr(source.config, k) for k in ("block_out_channels", "layers_per_block", "attention")}
    return config.replace(**arch), unet


def pretrain_backbone(
    images: Any,
    config: BackboneConfig,
    out_dir: str | os.PathLike,
    epochs: int = PretrainConfig.epochs,
    batch_size: int = PretrainConfig.batch_size,
    lr: float = PretrainConfig.lr,
    ema_decay: float = PretrainConfig.ema_decay,
    seed: int = PretrainConfig.seed,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    stop_event: threading.Event | None = None,
    checkpoint_every: int = PretrainConfig.checkpoint_every,
    num_workers: int = 0,
    init: str | os.PathLike | DiffusionBackbone | None = None,
) -> dict[str, Any]:
    """Train the U-Net as an epsilon-predicting denoiser on unlabeled images; save the EMA weights.

    Resumable from ``<out_dir>.resume/`` (bit-identical on CPU) by a run on the same images, initial
    weights and settings; the epoch count and ``max_steps`` may grow (a constant learning rate), so a
    finished run continues with more steps. A state of other images or settings, or an unreadable one,
    is discarded with a warning and the run starts over (`training.resume`); ``resume=False`` starts
    over without looking. Under ``accelerate launch`` every
    process trains on its share of each epoch's batches and only the main process writes.
    ``max_steps`` caps the total step count (including steps done before a resume). Returns (and
    writes to ``out_dir/metrics.json``) ``{"steps", "final_loss", "seconds", "images", "stopped",
    "resumed_from", "world_size"}``; ``final_loss`` is the mean of this run's last (up to) 20 steps.

    ``init`` starts from existing weights instead of random ones - a backbone directory, any
    diffusers UNet2DModel directory, or a DiffusionBackbone - to adapt a public checkpoint to the
    user's domain; its architecture is kept and replaces ``config``'s architecture fields.
    """
    start_time = time.perf_counter()
    if batch_size < 1 or epochs < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    engine = Engine(device)
    acc, rank, world = engine.accelerator, engine.process_index, engine.num_processes
    out_dir = Path(out_dir)
    check_replaceable(out_dir, BACKBONE_ENTRIES, "backbone")  # fail now, not after hours of training

    data = _ImageOnly(images, config)
    n_images = len(data)
    if n_images == 0:
        raise ValueError("pretraining needs at least one image")
    data[0]  # fail on a wrong shape or scale before building anything

    config, initial = _initial_unet(init, config, seed)
    backbone = DiffusionBackbone(config, unet=initial)
    unet = backbone.unet.to(engine.device).train()
    scheduler = backbone.scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)  # noise, timesteps, flips
    # One seeded shuffle per epoch (seed + epoch) over all images; accelerate shards its batches.
    order = DistributedSampler(range(n_images), num_replicas=1, rank=0, shuffle=True, seed=seed, drop_last=False)
    loader = DataLoader(data, batch_size=batch_size, sampler=order, num_workers=num_workers,
                        pin_memory=engine.device.type == "cuda")
    model, opt, loader = acc.prepare(unet, opt, loader)

    steps_per_epoch = len(loader)
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, int(max_steps))
    run = {"config": config.to_dict(), "batch_size": batch_size, "seed": seed, "lr": lr, "ema_decay": ema_decay,
           "images": {"count": n_images, "digest": _images_digest(images)},
           "init": tensor_digest(initial.state_dict().values())}
    state = ResumeState(engine, out_dir, run, log_)

    step, resumed_from, recent = 0, None, []
    loaded = state.load(resume)
    if loaded is not None:
        tensors, meta = loaded
        try:
            unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
            names = [n for n, _ in unet.named_parameters()]
            ema.load_state_dict(dict(meta["ema"],
                                     shadow_params=[tensors[f"ema.{n}"].to(engine.device) for n in names]))
            load_optimizer_state(opt.optimizer, tensors, meta["optimizer"])
            engine.restore_rng(tensors, {"noise": gen})
        except (KeyError, RuntimeError, ValueError) as exc:
            raise state.does_not_fit(exc) from exc
        if acc.scaler is not None and meta.get("scaler"):
            acc.scaler.load_state_dict(meta["scaler"])
        step = resumed_from = int(meta["step"])
        recent = list(meta.get("recent_losses", []))
        state.resumed(step // steps_per_epoch + 1, step)

    def checkpoint(epoch: int) -> None:
        names = [n for n, _ in unet.named_parameters()]
        tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
        ema_state = ema.state_dict()
        tensors.update({f"ema.{n}": s for n, s in zip(names, ema_state.pop("shadow_params"))})
        opt_tensors, opt_meta = optimizer_state_tensors(opt.optimizer)
        meta = {"step": step, "epoch": epoch, "recent_losses": recent[-20:], "lr": lr,
                "ema": ema_state, "optimizer": opt_meta, "scaler": acc.scaler.state_dict() if acc.scaler else None}
        state.save({**tensors, **opt_tensors}, meta, {"noise": gen})

    run_losses: list[float] = []
    stopped = False
    bar = RunProgress(engine, desc="pretrain backbone", enabled=progress, total_steps=total_steps, initial_step=step,
                      epochs_total=math.ceil(total_steps / steps_per_epoch), logger=log_)
    n_sched = scheduler.config.num_train_timesteps
    epoch = step // steps_per_epoch
    try:
        while step < total_steps and not stopped:
            epoch = step // steps_per_epoch
            loader.set_epoch(epoch)
            epoch_losses: list[float] = []  # this epoch's, for its log line (this run's steps only after a resume)
            skip = step - epoch * steps_per_epoch
            for x0 in acc.skip_first_batches(loader, skip) if skip else loader:
                with acc.accumulate(model):
                    x0 = _random_flips(x0, gen)
                    noise = torch.randn(tuple(x0.shape), generator=gen).to(x0.device)
                    t = torch.randint(0, n_sched, (x0.shape[0],), generator=gen).to(x0.device)
                    noisy = scheduler.add_noise(x0, noise, t)
                    with acc.autocast():
                        pred = model(noisy, t, return_dict=False)[0]
                    loss = F.mse_loss(pred.float(), noise)
                    acc.backward(loss)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if not acc.sync_gradients:
                    continue
                ema.step(unet.parameters())
                step += 1
                loss_value = engine.mean(loss)
                if not math.isfinite(loss_value) and acc.scaler is None:  # (fp16 loss scaling skips such steps)
                    raise TrainingError(
                        f"backbone pretraining diverged: the loss became {loss_value} at step {step}; "
                        f"lower the learning rate (now {lr}). The last resume state in {state.dir} is kept."
                    )
                run_losses.append(loss_value)
                epoch_losses.append(loss_value)
                recent = (recent + [loss_value])[-20:]
                record = bar.record(epoch + 1, loss_value, lr, step=step, total_steps=total_steps)
                bar.step(record)
                if log is not None and engine.is_main:
                    log(record)
                stopped = engine.any(stop_event is not None and stop_event.is_set())
                if step % steps_per_epoch == 0 or step >= total_steps or stopped:
                    bar.end_epoch(dict(record, loss=sum(epoch_losses) / len(epoch_losses)))
                if step >= total_steps or stopped:
                    break
                if checkpoint_every and step % checkpoint_every == 0:
                    checkpoint(epoch)
    finally:
        bar.close()

    checkpoint(epoch)
    tail = run_losses[-20:] if run_losses else recent[-20:]
    metrics = {
        "steps": step,
        "final_loss": float(sum(tail) / len(tail)) if tail else float("nan"),
        "seconds": time.perf_counter() - start_time,
        "images": n_images,
        "stopped": stopped,
        "resumed_from": resumed_from,
        "world_size": world,
    }
    if engine.is_main:
        final = DiffusionBackbone(config, unet=copy.deepcopy(unet).cpu())
        ema.copy_to(final.unet.parameters())
        final.save_pretrained(out_dir)
        atomic_write_json(out_dir / METRICS_NAME, metrics)
    engine.wait()
    return metrics

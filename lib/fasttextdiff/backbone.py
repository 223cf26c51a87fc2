"""The frozen diffusion backbone: a DDPM U-Net probed at a few noise levels for multi-scale features.

TextDiff/FastTextDiff never sample from the diffusion model. They noise the image once per chosen
timestep (one fixed noise draw), run ONE U-Net forward per timestep and read the decoder blocks'
outputs; those maps are the image features the fusion module attends from. This module owns that
network (a diffusers ``UNet2DModel``), its noise schedule (a diffusers ``DDPMScheduler``, which owns
the q_sample maths), its on-disk form, and its self-supervised pretraining on unlabeled images
(``pretrain_backbone``) - the label-efficient part of the method.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import load_optimizer_state, optimizer_state_tensors, sha256_file
from .config import BackboneConfig, atomic_write_json
from .errors import CheckpointError, FastTextDiffError, ModelNotFoundError

__all__ = ["DiffusionBackbone", "pretrain_backbone", "BACKBONE_CONFIG_NAME", "UNET_WEIGHTS_NAME"]

BACKBONE_CONFIG_NAME = "backbone_config.json"
UNET_CONFIG_NAME = "config.json"  # diffusers' name
UNET_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name
CHECKSUMS_NAME = "checksums.json"  # sha256 of the weights: catches corruption the header cannot show
CHECKPOINT_DIR = "checkpoint"
_STATE_WEIGHTS = "state.safetensors"
_STATE_JSON = "state.json"
_BACKBONE_ENTRIES = {BACKBONE_CONFIG_NAME, UNET_CONFIG_NAME, UNET_WEIGHTS_NAME, CHECKSUMS_NAME, CHECKPOINT_DIR}


# --------------------------------------------------------------------------------------------
# Architecture helpers
# --------------------------------------------------------------------------------------------


def _norm_groups(widths: Sequence[int]) -> int:
    """GroupNorm groups: 32 as in DDPM when every width allows it, else the largest that divides all.

    diffusers' default (32) would reject the tiny widths (4/8/16) used in tests and small models.
    """
    common = 0
    for w in widths:
        common = math.gcd(common, int(w))
    return max(g for g in range(1, 33) if common % g == 0)


def _attention_levels(levels: int) -> set[int]:
    """Encoder levels (0 = finest) that get self-attention: the two coarsest, as BackboneConfig says."""
    return set(range(max(0, levels - 2), levels))


def build_unet(config: BackboneConfig) -> UNet2DModel:
    """A fresh (randomly initialised) diffusers UNet2DModel that matches ``config``."""
    levels = len(config.block_out_channels)
    attn = _attention_levels(levels) if config.attention else set()
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if (levels - 1 - j) in attn else "UpBlock2D" for j in range(levels))
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.in_channels,
        out_channels=config.in_channels,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=_norm_groups(config.block_out_channels),
        attention_head_dim=min(8, min(config.block_out_channels)),
        add_attention=config.attention,
        num_train_timesteps=config.num_train_timesteps,
    )


def _sample_size(unet: UNet2DModel) -> int | None:
    size = unet.config.sample_size
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ValueError(f"only square U-Nets are supported, this one has sample_size {tuple(size)}")
        size = size[0]
    return None if size is None else int(size)


# --------------------------------------------------------------------------------------------
# Atomic directory publishing
# --------------------------------------------------------------------------------------------


def _fsync_tree(root: Path) -> None:
    """Flush every file so a rename never publishes data still sitting in the page cache."""
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _staging_dir(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def _is_leftover(name: str) -> bool:
    """A staging or set-aside directory of an interrupted save (ours, safe to drop)."""
    return re.fullmatch(r".+\.(tmp|old)-[0-9a-f]{12}", name) is not None


def _check_replaceable(target: Path, allowed: set[str]) -> None:
    """Refuse to swap out a directory that holds more than ours: a typo must not move a user's files."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ValueError(f"{target} exists and is not a directory")
    foreign = sorted(e.name for e in target.iterdir() if e.name not in allowed and not _is_leftover(e.name))
    if foreign:
        raise ValueError(
            f"{target} already holds files that are not part of a backbone ({foreign[:5]}); "
            "save into a new or empty directory, or an existing backbone directory"
        )


def _publish_dir(staging: Path, target: Path, keep_foreign: bool = False) -> None:
    """Swap a finished staging directory into place: rename the old one aside, move, delete the old.

    Readers see either the complete old directory or the complete new one, never a mixture.
    With ``keep_foreign`` the old directory's entries the new one lacks (e.g. a training
    ``checkpoint/`` next to the backbone files) are moved into the new one before the swap.
    """
    _fsync_tree(staging)
    if not target.exists():
        os.replace(staging, target)
        return
    if keep_foreign and target.is_dir():
        for entry in target.iterdir():
            if not (staging / entry.name).exists() and not _is_leftover(entry.name):
                os.replace(entry, staging / entry.name)
    old = target.parent / f"{target.name}.old-{uuid.uuid4().hex[:12]}"
    os.replace(target, old)
    os.replace(staging, target)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# Safe loading
# --------------------------------------------------------------------------------------------


def _check_safetensors(path: Path) -> None:
    """Open the header and compare declared sizes with the file, so truncation fails loudly here."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated or corrupt): {exc}") from exc
    if not keys:
        raise CheckpointError(f"{path} holds no tensors; the weights file is empty or corrupt")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    _check_safetensors(path)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path} could not be read as safetensors (truncated or corrupt): {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


def _verify_checksums(directory: Path) -> None:
    """Compare the weights with the sha256 recorded at save time (directories without a record pass)."""
    record_path = directory / CHECKSUMS_NAME
    if not record_path.is_file():
        return
    record = _read_json(record_path)
    for name, expected in record.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in {record_path} but missing")
        if sha256_file(path) != expected:
            raise CheckpointError(
                f"{path} does not match the checksum recorded when it was saved: the file is corrupt or was "
                "modified; restore it or pretrain the backbone again"
            )


def _load_unet_dir(directory: Path) -> UNet2DModel:
    """Build the U-Net from its config.json and load its safetensors weights strictly."""
    weights = directory / UNET_WEIGHTS_NAME
    _check_safetensors(weights)
    _verify_checksums(directory)
    config = _read_json(directory / UNET_CONFIG_NAME)
    try:
        unet = UNet2DModel.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / UNET_CONFIG_NAME} does not describe a UNet2DModel: {exc}") from exc
    state = _load_tensors(weights)
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{weights} holds NaN or infinite weights ({broken[:3]}); the training that wrote it diverged")
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match {directory / UNET_CONFIG_NAME}: {exc}") from exc
    return unet


# --------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------


class _FeaturesReady(Exception):
    """Raised by the last feature hook to end the U-Net forward early (private control flow)."""


class DiffusionBackbone(nn.Module):
    """A DDPM U-Net (diffusers) + its noise schedule, used as a frozen multi-scale feature extractor.

    ``unet`` lets a loaded network (``from_pretrained``/``from_diffusers``) keep its own architecture;
    without it a fresh U-Net is built from ``config``.
    """

    def __init__(self, config: BackboneConfig, unet: UNet2DModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.unet = unet if unet is not None else build_unet(config)
        self._check_unet_matches_config()
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule
        )
        n_up = len(self.unet.up_blocks)
        # Coarse -> fine is the up-blocks' own order (their resolutions never decrease).
        self.feature_block_ids: list[int] = sorted(set(config.feature_blocks)) if config.feature_blocks else list(range(n_up))
        bad = [b for b in self.feature_block_ids if not 0 <= b < n_up]
        if bad:
            raise ValueError(f"feature blocks {bad} do not exist; this U-Net has {n_up} up-blocks")
        channels, sizes = self._up_block_geometry()
        n_t = len(config.timesteps)
        self.feature_channels: list[int] = [channels[b] * n_t for b in self.feature_block_ids]
        self.feature_sizes: list[int] = [sizes[b] for b in self.feature_block_ids]

    # -- construction checks and geometry ------------------------------------------------------

    def _check_unet_matches_config(self) -> None:
        ucfg = self.unet.config
        if _sample_size(self.unet) not in (None, self.config.image_size):
            raise ValueError(
                f"the U-Net was built for {_sample_size(self.unet)} px images but the config says "
                f"image_size={self.config.image_size}"
            )
        if ucfg.in_channels != self.config.in_channels:
            raise ValueError(
                f"the U-Net takes {ucfg.in_channels} channel(s) but the config says in_channels={self.config.in_channels}"
            )
        if getattr(ucfg, "num_class_embeds", None) or getattr(ucfg, "class_embed_type", None):
            raise ValueError("class-conditional U-Nets are not supported as backbones (they need class labels)")
        if getattr(ucfg, "time_embedding_type", "positional") == "fourier":
            raise ValueError(
                "this U-Net embeds continuous noise levels (score-SDE, 'fourier'), not DDPM timesteps; "
                "use a DDPM-style UNet2DModel"
            )

    def _up_block_geometry(self) -> tuple[list[int], list[int]]:
        """Output channels and spatial size of every up-block, read from the modules, not by running them.

        Down-blocks halve the size when they own a downsampler (all but the last); up-blocks double it
        when they own an upsampler (all but the last) - so the last two up-blocks are both at full size.
        """
        size = self.config.image_size
        for block in self.unet.down_blocks:
            if getattr(block, "downsamplers", None) is not None:
                size //= 2
        channels, sizes = [], []
        for block in self.unet.up_blocks:
            if getattr(block, "upsamplers", None) is not None:
                size *= 2
            channels.append(int(block.resnets[-1].out_channels))
            sizes.append(size)
        return channels, sizes

    @property
    def schedule_timesteps(self) -> list[int]:
        """config.timesteps (a 0..999 scale) mapped onto this schedule's length."""
        n = self.scheduler.config.num_train_timesteps
        if n == 1000:
            return [int(t) for t in self.config.timesteps]
        return [min(n - 1, int(round(t * n / 1000))) for t in self.config.timesteps]

    # -- freezing ------------------------------------------------------------------------------

    def freeze(self) -> DiffusionBackbone:
        """Eval mode and no gradients: the backbone is a fixed feature extractor in TextDiff."""
        self.eval()
        self.requires_grad_(False)
        return self

    @property
    def is_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())

    # -- features ------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"features() takes a torch.Tensor, got {type(x).__name__}")
        size, c = self.config.image_size, self.config.in_channels
        if x.ndim != 4:
            raise ValueError(f"features() takes a (B, C, H, W) batch, got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != c:
            raise ValueError(f"the backbone takes {c} channel(s), got {x.shape[1]} (shape {tuple(x.shape)})")
        if x.shape[2] != size or x.shape[3] != size:
            raise ValueError(
                f"the backbone takes {size}x{size} images, got {x.shape[2]}x{x.shape[3]}; resize them first"
            )
        if x.shape[0] == 0:
            raise ValueError("features() got an empty batch")
        if not x.is_floating_point():
            raise ValueError(f"features() takes floating-point images in [-1, 1], got dtype {x.dtype}")

    def noise(self, x: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        """The one fixed noise draw: drawn on the CPU from a seeded generator, so every device agrees."""
        gen = torch.Generator(device="cpu").manual_seed(self.config.noise_seed if seed is None else int(seed))
        eps = torch.randn(tuple(x.shape), generator=gen, dtype=torch.float32)
        return eps.to(device=x.device, dtype=x.dtype)

    def features(self, x: torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        """Decoder features, coarse -> fine, each ``(B, C_i * T, H_i, W_i)`` (T timesteps along channels).

        All T noised copies go through ONE batched U-Net forward of size B*T; forward hooks on the
        chosen up-blocks collect their outputs. Gradients are off when the module is frozen.
        """
        self._check_input(x)
        b, t_count = x.shape[0], len(self.config.timesteps)
        eps = self.noise(x, seed)
        steps = torch.tensor(self.schedule_timesteps, dtype=torch.long, device=x.device)
        step_per_item = steps.repeat_interleave(b)  # timestep-major: [t0]*B + [t1]*B + ...
        grad = torch.is_grad_enabled() and not self.is_frozen
        captured: dict[int, torch.Tensor] = {}
        last = self.feature_block_ids[-1]

        def hook_for(index: int):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == last:  # the rest of the decoder and the output conv are not needed
                    raise _FeaturesReady

            return hook

        handles = [self.unet.up_blocks[i].register_forward_hook(hook_for(i)) for i in self.feature_block_ids]
        try:
            with torch.set_grad_enabled(grad):
                x_rep = x.repeat(t_count, 1, 1, 1)
                noisy = self.scheduler.add_noise(x_rep, eps.repeat(t_count, 1, 1, 1), step_per_item)
                self.unet(noisy, step_per_item, return_dict=False)
        except _FeaturesReady:
            pass
        finally:
            for h in handles:
                h.remove()
        out = []
        for i in self.feature_block_ids:
            f = captured[i]  # (T*B, C, h, w)
            _, c, h, w = f.shape
            out.append(f.reshape(t_count, b, c, h, w).transpose(0, 1).reshape(b, t_count * c, h, w))
        return out

    def forward(self, x: torch.Tensor, seed: int | None = None) -> list[torch.Tensor]:
        return self.features(x, seed)

    # -- persistence ---------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``backbone_config.json`` + the diffusers U-Net (config.json + safetensors) atomically.

        ``checksums.json`` records the weights' sha256, so later corruption fails loudly on load.

        An existing backbone directory is replaced as a whole, keeping a pretraining ``checkpoint/``
        in it; a directory holding anything else is refused with ValueError.
        """
        target = Path(directory)
        _check_replaceable(target, _BACKBONE_ENTRIES)
        staging = _staging_dir(target)
        try:
            self.unet.save_pretrained(staging, safe_serialization=True)
            atomic_write_json(staging / BACKBONE_CONFIG_NAME, self.config.to_dict())
            atomic_write_json(staging / CHECKSUMS_NAME, {UNET_WEIGHTS_NAME: sha256_file(staging / UNET_WEIGHTS_NAME)})
            _publish_dir(staging, target, keep_foreign=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> DiffusionBackbone:
        """Load what ``save_pretrained`` wrote; never unpickles, fails loudly on missing or corrupt files."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ModelNotFoundError(
                f"backbone directory {directory} does not exist; pretrain one (fasttextdiff pretrain-backbone) "
                "or pass a directory written by DiffusionBackbone.save_pretrained"
            )
        missing = [n for n in (BACKBONE_CONFIG_NAME, UNET_CONFIG_NAME, UNET_WEIGHTS_NAME) if not (directory / n).is_file()]
        if missing:
            hint = ""
            if missing == [BACKBONE_CONFIG_NAME]:
                hint = "; for a plain diffusers UNet2DModel checkpoint use DiffusionBackbone.from_diffusers"
            raise ModelNotFoundError(f"backbone directory {directory} is incomplete: missing {missing}{hint}")
        raw = _read_json(directory / BACKBONE_CONFIG_NAME)
        try:
            config = BackboneConfig.from_dict(raw)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{directory / BACKBONE_CONFIG_NAME} is not a valid backbone config: {exc}") from exc
        unet = _load_unet_dir(directory)
        return cls(config, unet=unet)

    @classmethod
    def from_diffusers(cls, path: str | os.PathLike, **overrides: Any) -> DiffusionBackbone:
        """Adopt any diffusers UNet2DModel checkpoint (a model dir, or a pipeline dir with ``unet/``).

        The BackboneConfig is read off the U-Net (size, channels, widths); a pipeline's
        ``scheduler/scheduler_config.json`` supplies the schedule; ``overrides`` set the rest
        (timesteps, feature_blocks, noise_seed, window, ...).
        """
        path = Path(path)
        unet_dir, sched_cfg = path, None
        if (path / "unet" / UNET_CONFIG_NAME).is_file():  # a saved DDPMPipeline
            unet_dir = path / "unet"
            if (path / "scheduler" / "scheduler_config.json").is_file():
                sched_cfg = _read_json(path / "scheduler" / "scheduler_config.json")
        if not (unet_dir / UNET_CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers UNet2DModel directory (no {UNET_CONFIG_NAME})")
        if not (unet_dir / UNET_WEIGHTS_NAME).is_file():
            raise ModelNotFoundError(
                f"{unet_dir} has no {UNET_WEIGHTS_NAME}; only safetensors weights are loaded (never pickles)"
            )
        _check_safetensors(unet_dir / UNET_WEIGHTS_NAME)
        try:
            unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
            raise CheckpointError(f"could not load a UNet2DModel from {unet_dir}: {exc}") from exc
        size = _sample_size(unet)
        if size is None:
            raise ValueError(f"{unet_dir}: the U-Net's config has no sample_size; pass image_size=... explicitly")
        fields: dict[str, Any] = {
            "image_size": size,
            "in_channels": int(unet.config.in_channels),
            "block_out_channels": tuple(unet.config.block_out_channels),
            "layers_per_block": int(unet.config.layers_per_block),
            "attention": any("Attn" in t for t in unet.config.down_block_types),
        }
        if sched_cfg:
            fields["num_train_timesteps"] = int(sched_cfg.get("num_train_timesteps", 1000))
            if sched_cfg.get("beta_schedule") in ("linear", "scaled_linear", "squaredcos_cap_v2"):
                fields["beta_schedule"] = sched_cfg["beta_schedule"]
        elif unet.config.get("num_train_timesteps"):
            fields["num_train_timesteps"] = int(unet.config.num_train_timesteps)
        fields.update(overrides)
        if "image_size" in overrides and unet.config.sample_size != fields["image_size"]:
            unet.register_to_config(sample_size=fields["image_size"])  # fully convolutional: any size /2^L works
        return cls(BackboneConfig.from_dict(fields), unet=unet)


# --------------------------------------------------------------------------------------------
# Pretraining on unlabeled images
# --------------------------------------------------------------------------------------------


def _as_image_source(images: Any) -> Any:
    """Accept a Dataset, a list of tensors, or one (N, C, H, W) tensor; return something indexable."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise ValueError(f"an image tensor must be (N, C, H, W), got shape {tuple(images.shape)}")
        return images
    if hasattr(images, "__getitem__") and hasattr(images, "__len__"):
        return images
    raise ValueError(f"images must be a Dataset, a list of (C, H, W) tensors or an (N, C, H, W) tensor, got {type(images).__name__}")


def _item_tensor(item: Any) -> torch.Tensor:
    if isinstance(item, dict):
        if "image" not in item:
            raise ValueError(f"dataset items that are dicts need an 'image' key, got keys {sorted(item)}")
        item = item["image"]
    if not isinstance(item, torch.Tensor):
        raise ValueError(f"dataset items must be (C, H, W) tensors, got {type(item).__name__}")
    return item


class _ImageOnly(torch.utils.data.Dataset):
    """Every accepted input form as checked (C, H, W) float tensors in [-1, 1] for the DataLoader.

    Checking each item costs nothing next to a U-Net step and turns a wrongly scaled or sized image
    (0..255 pixels, a forgotten resize) into a sentence instead of a silently useless backbone.
    """

    def __init__(self, source: Any, config: BackboneConfig) -> None:
        self.source = source
        self.shape = (config.in_channels, config.image_size, config.image_size)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = _item_tensor(self.source[index]).float()
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


def _random_flips(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image horizontal and vertical flips (p = 0.5 each); the draws come from the run's generator."""
    flips = torch.rand((x.shape[0], 2), generator=gen) < 0.5
    h = flips[:, 0].to(x.device).view(-1, 1, 1, 1)
    v = flips[:, 1].to(x.device).view(-1, 1, 1, 1)
    x = torch.where(h, x.flip(-1), x)
    return torch.where(v, x.flip(-2), x)


def _dist_info() -> tuple[bool, int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True, torch.distributed.get_rank(), torch.distributed.get_world_size()
    return False, 0, 1


def _epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int) -> list[list[int]]:
    """This rank's batches for one epoch, via DistributedSampler (seed + epoch decide the shuffle)."""
    sampler = torch.utils.data.DistributedSampler(
        range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _save_checkpoint(
    ckpt_dir: Path,
    unet: UNet2DModel,
    ema: EMAModel,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    rng_states: list[torch.Tensor],
    meta: dict[str, Any],
) -> None:
    """Everything needed to continue bit-for-bit: weights, EMA, Adam moments, step, RNG - safetensors + JSON."""
    names = [n for n, _ in unet.named_parameters()]
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    ema_state = ema.state_dict()
    for name, shadow in zip(names, ema_state.pop("shadow_params")):
        tensors[f"ema.{name}"] = shadow.detach().cpu().contiguous()
    opt_tensors, opt_meta = optimizer_state_tensors(opt)
    tensors.update(opt_tensors)
    for r, s in enumerate(rng_states):
        tensors[f"rng.{r}"] = s.cpu().contiguous()
    meta = dict(meta, ema=ema_state, optimizer=opt_meta, scaler=scaler.state_dict() if scaler else None)
    staging = _staging_dir(ckpt_dir)
    try:
        save_file(tensors, str(staging / _STATE_WEIGHTS))
        atomic_write_json(staging / _STATE_JSON, meta)
        _publish_dir(staging, ckpt_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_checkpoint(ckpt_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    if not ckpt_dir.is_dir():
        return None
    weights, meta = ckpt_dir / _STATE_WEIGHTS, ckpt_dir / _STATE_JSON
    if not (weights.is_file() and meta.is_file()):
        raise CheckpointError(
            f"training checkpoint {ckpt_dir} is incomplete (needs {_STATE_WEIGHTS} and {_STATE_JSON}); "
            "delete it or pass resume=False"
        )
    return _load_tensors(weights), _read_json(meta)


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
    epochs: int = 50,
    batch_size: int = 16,
    lr: float = 2e-4,
    ema_decay: float = 0.999,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
    max_steps: int | None = None,
    device: str | torch.device | None = None,
    stop_event: threading.Event | None = None,
    checkpoint_every: int = 200,
    num_workers: int = 0,
    init: str | os.PathLike | DiffusionBackbone | None = None,
) -> dict[str, Any]:
    """Train the U-Net as an epsilon-predicting denoiser on unlabeled images; save the EMA weights.

    This is how the backbone learns the user's own domain from the many unlabeled images in the
    datastore. Resumable from ``out_dir/checkpoint/`` (bit-identical on CPU); DDP-aware when
    torch.distributed is initialised (only rank 0 writes). ``max_steps`` caps the total step count
    (including steps done before a resume). Returns ``{"steps", "final_loss", "seconds", "images",
    "stopped", "resumed_from"}``; ``final_loss`` is the mean of this run's last (up to) 20 steps.

    ``init`` starts from existing weights instead of random ones - a backbone directory, any
    diffusers UNet2DModel directory, or a DiffusionBackbone - to adapt a public checkpoint to the
    user's domain; its architecture is kept and replaces ``config``'s architecture fields.
    """
    start_time = time.perf_counter()
    if batch_size < 1 or epochs < 1:
        raise ValueError("epochs and batch_size must be >= 1")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    distributed, rank, world = _dist_info()
    if device is None:
        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if distributed else "cuda"
        else:
            device = "cpu"
    device = torch.device(device)
    if distributed and device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)  # NCCL collectives (all_gather_object) use the current device
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / CHECKPOINT_DIR
    _check_replaceable(out_dir, _BACKBONE_ENTRIES)  # fail now, not after hours of training

    data = _ImageOnly(_as_image_source(images), config)
    n_images = len(data)
    if n_images == 0:
        raise ValueError("pretraining needs at least one image")
    data[0]  # fail on a wrong shape or scale before building anything

    config, initial = _initial_unet(init, config, seed)
    backbone = DiffusionBackbone(config, unet=initial)
    unet = backbone.unet.to(device).train()
    scheduler = backbone.scheduler
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=ema_decay)
    use_amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None
    gen = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)  # noise, timesteps, flips

    steps_per_epoch = math.ceil(math.ceil(n_images / world) / batch_size)
    total_steps = epochs * steps_per_epoch
    if max_steps is not None:
        total_steps = min(total_steps, int(max_steps))
    run_meta = {
        "config": config.to_dict(),
        "batch_size": batch_size,
        "world_size": world,
        "seed": seed,
        "images": n_images,
    }

    step, resumed_from, recent = 0, None, []
    loaded = _load_checkpoint(ckpt_dir) if resume else None
    if loaded is not None:
        tensors, meta = loaded
        if meta.get("run") != run_meta:
            raise CheckpointError(
                f"the checkpoint in {ckpt_dir} was made with different settings ({meta.get('run')}); "
                "pass resume=False to start over or use another out_dir"
            )
        try:
            unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=True)
            names = [n for n, _ in unet.named_parameters()]
            ema_state = dict(meta["ema"], shadow_params=[tensors[f"ema.{n}"].to(device) for n in names])
            ema.load_state_dict(ema_state)
            load_optimizer_state(opt, tensors, meta["optimizer"])
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"the checkpoint in {ckpt_dir} does not fit this model: {exc}") from exc
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        if f"rng.{rank}" in tensors:
            gen.set_state(tensors[f"rng.{rank}"])
        else:  # a different world size: fresh but deterministic streams
            gen.manual_seed(seed * 1000 + rank + 7919 * int(meta["step"]))
        step = resumed_from = int(meta["step"])
        recent = list(meta.get("recent_losses", []))

    model: nn.Module = unet
    if distributed:
        model = nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)

    def gather_rng() -> list[torch.Tensor]:
        state = gen.get_state()
        if not distributed:
            return [state]
        states: list[Any] = [None] * world
        torch.distributed.all_gather_object(states, state)
        return states

    def checkpoint(epoch: int) -> None:
        states = gather_rng()
        if rank == 0:
            meta = {"step": step, "epoch": epoch, "run": run_meta, "recent_losses": recent[-20:], "lr": lr}
            _save_checkpoint(ckpt_dir, unet, ema, opt, scaler, states, meta)
        if distributed:
            torch.distributed.barrier()

    run_losses: list[float] = []
    stopped = False
    bar = tqdm(total=total_steps, initial=step, disable=not progress or rank != 0, desc="pretrain backbone")
    n_sched = scheduler.config.num_train_timesteps
    epoch = step // steps_per_epoch
    try:
        while step < total_steps and not stopped:
            epoch = step // steps_per_epoch
            batches = _epoch_batches(n_images, batch_size, epoch, seed, rank, world)
            skip = step - epoch * steps_per_epoch
            loader = torch.utils.data.DataLoader(
                data, batch_sampler=batches[skip:], num_workers=num_workers, pin_memory=device.type == "cuda"
            )
            for x0 in loader:
                x0 = _random_flips(x0.to(device, non_blocking=True), gen)
                noise = torch.randn(tuple(x0.shape), generator=gen).to(device)
                t = torch.randint(0, n_sched, (x0.shape[0],), generator=gen).to(device)
                noisy = scheduler.add_noise(x0, noise, t)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    pred = model(noisy, t, return_dict=False)[0]
                loss = F.mse_loss(pred.float(), noise)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(opt)
                    scaler.update()
                else:
                    loss.backward()
                    opt.step()
                ema.step(unet.parameters())
                step += 1
                loss_value = loss.detach()
                if distributed:
                    torch.distributed.all_reduce(loss_value)
                    loss_value = loss_value / world
                loss_value = float(loss_value)
                if not math.isfinite(loss_value) and scaler is None:  # (fp16 AMP skips such steps by itself)
                    raise FastTextDiffError(
                        f"backbone pretraining diverged: the loss became {loss_value} at step {step}; "
                        f"lower the learning rate (now {lr}). The last checkpoint in {ckpt_dir} is kept."
                    )
                run_losses.append(loss_value)
                recent = (recent + [loss_value])[-20:]
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch)
                if log is not None and rank == 0:
                    log({"step": step, "epoch": epoch, "loss": loss_value, "total_steps": total_steps})
                stop_now = stop_event is not None and stop_event.is_set()
                if distributed:
                    flag = torch.tensor([1.0 if stop_now else 0.0], device=device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    stop_now = bool(flag.item())
                if stop_now:
                    stopped = True
                if step >= total_steps or stopped:
                    break
                if checkpoint_every and step % checkpoint_every == 0:
                    checkpoint(epoch)
    finally:
        bar.close()

    checkpoint(epoch)
    if rank == 0:
        final = DiffusionBackbone(config, unet=copy.deepcopy(unet).cpu())
        ema.copy_to(final.unet.parameters())
        final.save_pretrained(out_dir)
    if distributed:
        torch.distributed.barrier()
    tail = run_losses[-20:] if run_losses else recent[-20:]
    return {
        "steps": step,
        "final_loss": float(sum(tail) / len(tail)) if tail else float("nan"),
        "seconds": time.perf_counter() - start_time,
        "images": n_images,
        "stopped": stopped,
        "resumed_from": resumed_from,
    }


def load_backbone(path: str | os.PathLike) -> DiffusionBackbone:
    """A backbone from our own format, or from any diffusers UNet2DModel (or pipeline) folder."""
    path = Path(path)
    if (path / BACKBONE_CONFIG_NAME).is_file() or not path.is_dir():
        return DiffusionBackbone.from_pretrained(path)
    return DiffusionBackbone.from_diffusers(path)

"""The frozen diffusion backbone: a DDPM U-Net probed at a few noise levels for multi-scale features.

TextDiff/FastTextDiff never sample from the diffusion model. They noise the image once per chosen
timestep (one fixed noise draw), run ONE U-Net forward per timestep and read the decoder blocks'
outputs; those maps are the image features the fusion module attends from. This module owns that
network (a diffusers ``UNet2DModel``), its noise schedule (a diffusers ``DDPMScheduler``, which owns
the q_sample maths) and its on-disk form (ours, or any diffusers U-Net). Its self-supervised
pretraining on unlabeled images lives in ``backbone_pretrain``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from torch import nn

from fasttextdiff.models.adm_taps import AdmTap, output_block_taps
from fasttextdiff.utils.atomic import atomic_write_json, check_replaceable, staged_dir
from fasttextdiff.utils.checkpoint import check_safetensors, load_tensors, read_json, sha256_file, verify_sha256
from fasttextdiff.config import BackboneConfig
from fasttextdiff.utils.errors import CheckpointError, ModelNotFoundError

__all__ = ["DiffusionBackbone", "load_backbone", "BACKBONE_CONFIG_NAME", "UNET_WEIGHTS_NAME"]

BACKBONE_CONFIG_NAME = "backbone_config.json"
UNET_CONFIG_NAME = "config.json"  # diffusers' name
UNET_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # diffusers' name
CHECKSUMS_NAME = "checksums.json"  # sha256 of the weights: catches corruption the header cannot show
CHECKPOINT_DIR = "checkpoint"  # pretraining's resumable state
METRICS_NAME = "metrics.json"  # pretraining's figures
BACKBONE_ENTRIES = {BACKBONE_CONFIG_NAME, UNET_CONFIG_NAME, UNET_WEIGHTS_NAME, CHECKSUMS_NAME, CHECKPOINT_DIR,
                    METRICS_NAME}


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
# Safe loading
# --------------------------------------------------------------------------------------------


def _load_unet_dir(directory: Path) -> UNet2DModel:
    """Build the U-Net from its config.json and load its safetensors weights strictly, checksums verified."""
    weights = directory / UNET_WEIGHTS_NAME
    check_safetensors(weights)
    record = directory / CHECKSUMS_NAME
    for name, expected in (read_json(record) if record.is_file() else {}).items():
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name} is listed in {record} but missing")
        verify_sha256(directory / name, expected, "restore it or pretrain the backbone again")
    config = read_json(directory / UNET_CONFIG_NAME)
    try:
        unet = UNet2DModel.from_config(config)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{directory / UNET_CONFIG_NAME} does not describe a UNet2DModel: {exc}") from exc
    state = load_tensors(weights)
    broken = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:
        raise CheckpointError(f"{weights} holds NaN or infinite weights ({broken[:3]}); the training that wrote it "
                              "diverged")
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
        n_t = len(config.timesteps)
        self.feature_taps: list[AdmTap] = []
        if config.feature_taps:  # modules inside the up-blocks, named as ADM's output_blocks
            self.feature_taps = self._resolve_taps(config.feature_taps)
            self.feature_block_ids: list[int] = []
            self.feature_modules: list[str] = [t.module for t in self.feature_taps]
            self.feature_channels: list[int] = [t.channels * n_t for t in self.feature_taps]
            self.feature_sizes: list[int] = [t.size for t in self.feature_taps]
        else:  # whole up-blocks; coarse -> fine is their own order (their resolutions never decrease)
            self.feature_block_ids = sorted(set(config.feature_blocks)) if config.feature_blocks else list(range(n_up))
            bad = [b for b in self.feature_block_ids if not 0 <= b < n_up]
            if bad:
                raise ValueError(f"feature blocks {bad} do not exist; this U-Net has {n_up} up-blocks")
            channels, sizes = self._up_block_geometry()
            self.feature_modules = [f"up_blocks.{b}" for b in self.feature_block_ids]
            self.feature_channels = [channels[b] * n_t for b in self.feature_block_ids]
            self.feature_sizes = [sizes[b] for b in self.feature_block_ids]

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
                f"the U-Net takes {ucfg.in_channels} channel(s) but the config says "
                f"in_channels={self.config.in_channels}"
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

    def _resolve_taps(self, taps: Sequence[int]) -> list[AdmTap]:
        """ADM output_blocks -> the diffusers modules whose outputs they are, with channels and sizes.

        The geometry is read off the U-Net's config at this backbone's image size (the network is fully
        convolutional) and checked against the modules themselves, so a U-Net whose up-blocks are laid
        out differently fails here with a sentence rather than in the fusion's first forward.
        """
        config = dict(self.unet.config)
        config["sample_size"] = self.config.image_size
        every = output_block_taps(config)
        bad = sorted(t for t in set(taps) if not 0 <= t < len(every))
        if bad:
            raise ValueError(f"feature taps {bad} are not output blocks of this U-Net (it has 0..{len(every) - 1})")
        chosen = [every[t] for t in sorted(set(taps))]
        for tap in chosen:
            try:
                module = self.unet.get_submodule(tap.module)
            except AttributeError:
                raise ValueError(f"feature tap {tap.output_block}: this U-Net has no module {tap.module}") from None
            width = getattr(module, "out_channels", None) or getattr(module, "out_dim", None)
            if width is not None and int(width) != tap.channels:
                raise ValueError(f"feature tap {tap.output_block} ({tap.module}) has {width} channels, "
                                 f"not the {tap.channels} its U-Net config implies")
        return chosen

    @property
    def schedule_timesteps(self) -> list[int]:
        """config.timesteps (a 0..999 scale) mapped onto this schedule's length."""
        n = self.scheduler.config.num_train_timesteps
        if n == 1000:
            return [int(t) for t in self.config.timesteps]
        return [min(n - 1, int(round(t * n / 1000))) for t in self.config.timesteps]

    # How the network is probed, as opposed to what it is: what a preset or a flag may change on a loaded backbone.
    PROBE_FIELDS = frozenset({"image_size", "timesteps", "feature_blocks", "feature_taps", "noise_seed", "window",
                              "body_crop"})

    def reconfigured(self, **changes: Any) -> DiffusionBackbone:
        """The same network probed differently (timesteps, taps, image size, noise seed, window).

        Setting taps clears whole-block taps and vice versa. A new image size is written into the
        U-Net's config (the network is fully convolutional), so the saved model records it.
        """
        unknown = sorted(set(changes) - self.PROBE_FIELDS)
        if unknown:
            raise ValueError(f"only {sorted(self.PROBE_FIELDS)} can change on a trained backbone, not {unknown}")
        fields = self.config.to_dict()
        fields.update(changes)
        if changes.get("feature_taps"):
            fields["feature_blocks"] = ()
        elif changes.get("feature_blocks"):
            fields["feature_taps"] = ()
        config = BackboneConfig.from_dict(fields)
        if config.image_size != self.config.image_size and _sample_size(self.unet) is not None:
            self.unet.register_to_config(sample_size=config.image_size)
        return DiffusionBackbone(config, unet=self.unet)

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

    def features(self, x: torch.Tensor, seed: int | None = None,
                 noise: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Decoder features, coarse -> fine, each ``(B, C_i * T, H_i, W_i)`` (T timesteps along channels).

        All T noised copies go through ONE batched U-Net forward of size B*T; forward hooks on the
        chosen up-blocks (or, with ``feature_taps``, the modules inside them) collect their outputs and
        the last one ends the forward. Gradients are off when the module is frozen.
        ``noise`` (shaped like ``x``) replaces the seeded draw: several draws then share one forward.
        """
        self._check_input(x)
        b, t_count = x.shape[0], len(self.config.timesteps)
        if noise is not None and noise.shape != x.shape:
            raise ValueError(f"noise must be shaped like the images {tuple(x.shape)}, got {tuple(noise.shape)}")
        eps = self.noise(x, seed) if noise is None else noise.to(device=x.device, dtype=x.dtype)
        steps = torch.tensor(self.schedule_timesteps, dtype=torch.long, device=x.device)
        step_per_item = steps.repeat_interleave(b)  # timestep-major: [t0]*B + [t1]*B + ...
        grad = torch.is_grad_enabled() and not self.is_frozen
        captured: dict[int, torch.Tensor] = {}
        last = len(self.feature_modules) - 1  # modules are in forward order: the last one ends the pass

        def hook_for(index: int):
            def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
                captured[index] = output[0] if isinstance(output, tuple) else output
                if index == last:  # the rest of the decoder and the output conv are not needed
                    raise _FeaturesReady

            return hook

        handles = [self.unet.get_submodule(path).register_forward_hook(hook_for(i))
                   for i, path in enumerate(self.feature_modules)]
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
        for i, path in enumerate(self.feature_modules):
            f = captured[i]  # (T*B, C, h, w)
            _, c, h, w = f.shape
            if c * t_count != self.feature_channels[i] or h != self.feature_sizes[i]:
                raise RuntimeError(f"{path} gave {c} x {h} x {w} features, not the declared "
                                   f"{self.feature_channels[i] // t_count} x {self.feature_sizes[i]}")
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
        check_replaceable(target, BACKBONE_ENTRIES, "backbone")
        with staged_dir(target, keep_foreign=True) as staging:
            self.unet.save_pretrained(staging, safe_serialization=True)
            atomic_write_json(staging / BACKBONE_CONFIG_NAME, self.config.to_dict())
            atomic_write_json(staging / CHECKSUMS_NAME, {UNET_WEIGHTS_NAME: sha256_file(staging / UNET_WEIGHTS_NAME)})
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
        missing = [n for n in (BACKBONE_CONFIG_NAME, UNET_CONFIG_NAME,
                               UNET_WEIGHTS_NAME) if not (directory / n).is_file()]
        if missing:
            hint = ""
            if missing == [BACKBONE_CONFIG_NAME]:
                hint = "; for a plain diffusers UNet2DModel checkpoint use DiffusionBackbone.from_diffusers"
            raise ModelNotFoundError(f"backbone directory {directory} is incomplete: missing {missing}{hint}")
        raw = read_json(directory / BACKBONE_CONFIG_NAME)
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
        (timesteps, feature_blocks or feature_taps, noise_seed, window, ...).
        """
        path = Path(path)
        unet_dir, sched_cfg = path, None
        if (path / "unet" / UNET_CONFIG_NAME).is_file():  # a saved DDPMPipeline
            unet_dir = path / "unet"
            if (path / "scheduler" / "scheduler_config.json").is_file():
                sched_cfg = read_json(path / "scheduler" / "scheduler_config.json")
        if not (unet_dir / UNET_CONFIG_NAME).is_file():
            raise ModelNotFoundError(f"{path} is not a diffusers UNet2DModel directory (no {UNET_CONFIG_NAME})")
        if not (unet_dir / UNET_WEIGHTS_NAME).is_file():
            raise ModelNotFoundError(
                f"{unet_dir} has no {UNET_WEIGHTS_NAME}; only safetensors weights are loaded (never pickles)"
            )
        check_safetensors(unet_dir / UNET_WEIGHTS_NAME)
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


def load_backbone(path: str | os.PathLike) -> DiffusionBackbone:
    """A backbone from our own format, or from any diffusers UNet2DModel (or pipeline) folder."""
    path = Path(path)
    if (path / BACKBONE_CONFIG_NAME).is_file() or not path.is_dir():
        return DiffusionBackbone.from_pretrained(path)
    return DiffusionBackbone.from_diffusers(path)

"""Typed, validated configuration records that save as JSON next to the weights.

Every component keeps its constructor arguments in one of these dataclasses so a model
directory reloads from `config.json` + safetensors alone (the diffusers convention),
and so bad combinations fail at construction with a sentence instead of deep in a forward pass.
Their defaults are the project's defaults: the CLI, the server's `--conf` and the benchmarks read
them from here (e.g. `TrainConfig.lr`) instead of repeating the numbers.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fasttextdiff.utils.atomic import atomic_write_json

T = TypeVar("T", bound="JsonConfig")
MODEL_CONFIG_FILE = (
    "fasttextdiff.json"  # a model directory's record (configs, metrics, checksum): how readers know one
)


class JsonConfig:
    """Mixin: dict/JSON round trip with unknown-key and type checks, then `validate()`."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON gives lists where we keep tuples
            value = getattr(self, f.name)
            if isinstance(value, list):
                setattr(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:  # overridden where combinations matter
        pass

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"missing config file {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


@dataclass
class BackboneConfig(JsonConfig):
    """The frozen denoising U-Net (diffusers UNet2DModel) and the timesteps it is probed at."""

    image_size: int = 64
    in_channels: int = 1
    block_out_channels: tuple[int, ...] = (32, 64, 64, 128)
    layers_per_block: int = 1
    attention: bool = False  # attention blocks in the two coarsest levels, as in DDPM
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    timesteps: tuple[int, ...] = (50, 150, 250)  # of 1000; rescaled if the schedule is shorter
    feature_blocks: tuple[int, ...] = ()  # decoder up-block indices to tap; () = all
    # Finer taps, in guided-diffusion's output_blocks numbering (models.adm_taps.output_block_taps): the paper's
    # 4,6,8,12 (QaTa, MosMedData+) or 6,8,12,16 (MoNuSeg). When set, feature_blocks must be empty.
    feature_taps: tuple[int, ...] = ()
    noise_seed: int = 0
    # Intensity scaling the backbone was trained with (the same must be used at inference):
    # None = robust percentiles per image/volume; (center, width) = a CT window in HU.
    window: tuple[float, float] | None = None
    # With a window (CT in HU): crop each slice to the square box around the body before resizing,
    # so more of the model's pixels fall on anatomy (data.preprocess.body_box). Ignored without one.
    body_crop: bool = True

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BackboneConfig":
        """A stored config without `body_crop` predates the crop: it keeps serving uncropped, as trained."""
        return super().from_dict({"body_crop": False, **data})

    def validate(self) -> None:
        _positive("image_size", self.image_size)
        if not isinstance(self.body_crop, bool):
            raise ValueError(f"body_crop must be true or false, got {self.body_crop!r}")
        if self.window is not None and (len(self.window) != 2 or self.window[1] <= 0):
            raise ValueError(f"window must be (center, width) with width > 0, got {self.window}")
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grayscale) or 3 (RGB), got {self.in_channels}")
        if not self.block_out_channels:
            raise ValueError("block_out_channels must name at least one level")
        factor = 2 ** (len(self.block_out_channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by {factor} "
                f"for {len(self.block_out_channels)} U-Net levels"
            )
        if not self.timesteps:
            raise ValueError("timesteps must name at least one diffusion step")
        for t in self.timesteps:
            if not 0 <= t < 1000:
                raise ValueError(f"timesteps are given on a 0..999 scale, got {t}")
        for b in self.feature_blocks:
            if not 0 <= b < len(self.block_out_channels):
                raise ValueError(f"feature block {b} does not exist ({len(self.block_out_channels)} up-blocks)")
        if self.feature_taps and self.feature_blocks:
            raise ValueError("give feature_taps (ADM output_blocks) or feature_blocks (whole up-blocks), not both")
        n_taps = len(self.block_out_channels) * (self.layers_per_block + 1)
        for t in self.feature_taps:
            if not 0 <= t < n_taps:
                raise ValueError(f"feature tap {t} is not an output block of this U-Net (it has 0..{n_taps - 1})")
        if self.beta_schedule not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")


@dataclass
class TextConfig(JsonConfig):
    """Which encoder turns the report into token states, and how long reports are handled."""

    encoder: str = "tiny"  # "tiny", a local model directory, or a hub id (explicit opt-in)
    max_length: int | None = None  # None = the encoder's own context (8192 for ModernBERT)
    chunk_overlap: int = 64  # for 512-token BERTs: windows overlap by this many tokens
    max_chars: int = 200_000  # reports longer than this are refused (about 30k words)
    # Cut every report to max_length tokens, specials included, instead of chunking: the reference
    # code's behaviour (max_length=10), kept for comparisons only.
    truncate: bool = False
    # Report focus: keep only the `focus_sentences` sentences whose mean-pooled states are closest
    # (cosine) to this description of the finding being segmented, in report order, then encode those.
    # Why: a long report buries the one sentence that places the lesions among findings about other
    # organs; attending over all of them, the fusion cannot learn from a few labeled images which
    # tokens matter (measured on the clinical-reports set). None = the whole report.
    focus: str | None = None
    focus_sentences: int = 3

    def validate(self) -> None:
        if not self.encoder:
            raise ValueError("text encoder must be 'tiny', a local directory or a hub id")
        if self.focus is not None and not self.focus.strip():
            raise ValueError("focus must be a description of the finding (e.g. 'lung opacity') or None")
        _positive("focus_sentences", self.focus_sentences)
        if self.max_length is not None:
            _positive("max_length", self.max_length)
        if self.truncate and self.max_length is None:
            raise ValueError("truncate needs max_length (the number of tokens to keep, e.g. 10 as the reference)")
        if self.chunk_overlap < 0:
            raise ValueError("chunk_overlap must be >= 0")
        _positive("max_chars", self.max_chars)


TEXT_RESIDUALS = ("plain", "zero", "gate")


@dataclass
class FusionConfig(JsonConfig):
    """Cross-modal attention: image tokens query the report's tokens, per scale."""

    dim: int = 64  # the reference uses 768 (the text width); small models use less
    heads: int = 4
    shared: bool = True  # one transformer block for every scale, as in the reference
    mlp_ratio: float = 2.0
    dropout: float = 0.0
    positional_encoding: bool = True
    # How the cross-attention output joins the image tokens (a text path that only helps):
    #   "zero"  - the default: the attention's output projection starts at zero and the text weights come
    #             from their own random stream, so an untrained model is exactly the `no_text` network
    #   "plain" - added as it comes (the reference; random text weights change the output from step 0;
    #             models saved before this option load as "plain")
    #   "gate"  - like "zero" but through a zero-initialised tanh gate (one scalar per block, as in
    #             Flamingo); it opens slowly (measured: too slowly for few-step training)
    text_residual: str = "zero"
    # In training, each sample's text residual is dropped with this probability (the image path then
    # trains as an image-only model on those samples).
    text_dropout: float = 0.0

    def validate(self) -> None:
        _positive("dim", self.dim)
        if self.text_residual not in TEXT_RESIDUALS:
            raise ValueError(f"text_residual must be one of {TEXT_RESIDUALS}, got {self.text_residual!r}")
        if not 0 <= self.text_dropout < 1:
            raise ValueError(f"text_dropout must be in [0, 1), got {self.text_dropout}")
        _positive("heads", self.heads)
        if self.dim % self.heads:
            raise ValueError(f"fusion dim {self.dim} must be divisible by heads {self.heads}")
        if self.dim % 4 and self.positional_encoding:
            raise ValueError(f"fusion dim {self.dim} must be divisible by 4 for 2D sine positions")
        _positive("mlp_ratio", self.mlp_ratio)
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")


@dataclass
class SegmenterConfig(JsonConfig):
    """The trainable part (fusion + head) and how it is used."""

    num_classes: int = 2  # background + foreground; >2 for multi-class
    labels: tuple[str, ...] = ("lesion",)  # names of the foreground classes
    head_channels: int = 32
    use_text: bool = True  # False = the `no_text` ablation: same network, text branch removed
    # Fusion and head run at this fraction of the input size (finer feature maps are average-
    # pooled to it) and the logits are upsampled: at 256 px input that is the reference's finest
    # scale (128), and it bounds the number of image tokens the attention sees.
    head_scale: float = 0.5
    fusion: FusionConfig = field(default_factory=FusionConfig)

    def __post_init__(self) -> None:
        if isinstance(self.fusion, dict):
            self.fusion = FusionConfig.from_dict(self.fusion)
        super().__post_init__()

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ValueError("num_classes counts the background too and must be >= 2")
        if len(self.labels) != self.num_classes - 1:
            raise ValueError(
                f"{self.num_classes} classes need {self.num_classes - 1} label names, got {list(self.labels)}"
            )
        _positive("head_channels", self.head_channels)
        if not 0 < self.head_scale <= 1:
            raise ValueError(f"head_scale must be in (0, 1], got {self.head_scale}")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["fusion"] = self.fusion.to_dict()
        return d


@dataclass
class TrainConfig(JsonConfig):
    """Segmentation training: few labels, frozen backbone and text encoder."""

    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    dice_weight: float = 1.5  # loss = CE + 1.5 x Dice, as in the paper
    # Off by default: flips and 90-degree turns swap left/right and upper/lower, contradicting
    # reports that name locations (the reference applied them anyway). Turn on for reports
    # without laterality (e.g. histology). Without augmentation the frozen backbone's features
    # are computed once and cached, which makes each epoch several times cheaper.
    augment: bool = False
    rotate_degrees: float = 20.0
    feature_cache_gb: float = 4.0  # cache backbone features when they fit in this much memory
    labeled: float | None = None  # N images (>= 1) or a fraction (< 1) of the training split
    seed: int = 0
    amp: bool = True  # used only on CUDA
    num_workers: int = 0
    val_every: int = 1
    # validation segments each image or volume as served (`training.segmenter.validate_served`): with the
    # server's noise draws (the CLI's `segment` and the server default to 4), so its Dice is the one a user measures
    val_noise_draws: int = 4
    # A text path that only helps, on by default: train `epochs` with the text residual off --
    # exactly the no_text network -- then `epochs` with it on, restarted from the same initial weights (the
    # run without the fallback); validation keeps the better checkpoint of the two,
    # so a report that does not help leaves the image-only model (history then has 2 x epochs entries).
    # Takes effect only with a validation split to choose on and a text path that starts closed
    # (FusionConfig.text_residual "zero"/"gate"); otherwise the text trains from the first epoch.
    text_fallback: bool = True

    def validate(self) -> None:
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        _positive("lr", self.lr)
        if self.labeled is not None and self.labeled <= 0:
            raise ValueError("labeled must be a count >= 1 or a fraction in (0, 1)")
        if self.labeled is not None and self.labeled > 1 and self.labeled != int(self.labeled):
            raise ValueError("labeled above 1 is a count of images and must be whole")
        if self.val_every < 1:
            raise ValueError("val_every must be >= 1")
        if not 1 <= self.val_noise_draws <= 32:
            raise ValueError("val_noise_draws must be between 1 and 32")


@dataclass
class PretrainConfig(JsonConfig):
    """Denoising pretraining of the backbone on unlabeled images (`pretrain_backbone`'s defaults)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 2e-4
    ema_decay: float = 0.999
    seed: int = 0
    checkpoint_every: int = 200  # steps between resumable states

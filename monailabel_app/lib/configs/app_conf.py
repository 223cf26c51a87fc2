"""Typed, validated `--conf key value` options of the FastTextDiff MONAI Label app.

MONAI Label hands every `--conf` value over as a string; the radiology sample app reads them
with `strtobool`/`eval` wherever they are used. Here they are parsed once, at start, into one
dataclass with documented defaults, and a bad value or an unknown key stops the start with a
sentence naming the key (instead of a traceback deep inside a request). Where an option is a
library setting its default is the library's (`fasttextdiff.config`); the others are the server's
own choices for a model it builds on its first start.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasttextdiff.config import TEXT_RESIDUALS, BackboneConfig, FusionConfig, SegmenterConfig, TextConfig, TrainConfig

# keys MONAI Label itself reads from the same dict (interfaces/app.py)
_MONAILABEL_KEYS = {"server_mode"}

STATE_SUBDIR = ".fasttextdiff"  # the app's state inside a local studies folder

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f"}


@dataclass(frozen=True)
class AppConf:
    """Every option of the app; `docs/SERVER.md` lists them with these defaults."""

    # where the served model lives: a publish root (versions/ + current) or a plain model directory;
    # "" = <state_dir>/model, built from the studies on first start
    model_dir: str = ""
    # a pretrained backbone (ours or any diffusers UNet2DModel dir) for the default model and training;
    # "" = pretrain one on all datastore images (published to <state_dir>/backbone)
    backbone_dir: str = ""
    # text encoder: "tiny" (bundled small ModernBERT) or a local model directory (e.g. ModernBERT-base)
    text_encoder: str = TextConfig.encoder
    # how the report joins the image path in a newly built model: "zero" starts as the image-only
    # network (the library default), "plain" as the reference's fusion, "gate" (docs/TEXT.md)
    text_residual: str = FusionConfig.text_residual
    # for a newly built model with long reports: attend only to the report sentences nearest this description of
    # the finding (TextConfig.focus, e.g. "Airspace opacity or consolidation in the right or left lung."); "" = all
    text_focus: str = ""
    # text_fallback for the first model built from the studies (continued training never uses it): epochs
    # image-only, then epochs with the report, validation keeps the better; it doubles the first build's time
    text_fallback: bool = False
    # app state: published models, text cache, training scratch, validation split;
    # "" = <studies>/.fasttextdiff (a hidden folder the datastore never scans)
    state_dir: str = ""
    # model input size (pixels, square) for a newly built model; a served model keeps its own;
    # 0 = chosen from the images and device (256 on a GPU, 128 on a CPU, never above the images' size)
    image_size: int = 0
    # intensity scaling of a newly built model: auto (CT volumes in HU: the lung window for lung findings, the
    # soft-tissue window for organs and solid lesions, decided by the final labels; else percentiles),
    # none (percentiles), lung/mediastinum/soft_tissue/bone/brain, or "center,width" in HU
    window: str = "auto"
    # diffusion timesteps (of 1000) the frozen backbone is probed at, for a newly built model
    timesteps: tuple[int, ...] = BackboneConfig.timesteps
    # backbone U-Net widths for a newly built model (one per level; smaller than the library's default so
    # that the first start builds a model in minutes on a CPU)
    backbone_channels: tuple[int, ...] = (16, 32, 32)
    # noise draws per prediction; their spread is the uncertainty (1 = no uncertainty)
    n_noise: int = 4
    # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    # fusion + head training epochs (train task `fasttextdiff` and the default model)
    epochs: int = 80
    # backbone denoising pretraining epochs (train task `backbone` and the default model)
    backbone_epochs: int = 60
    batch_size: int = TrainConfig.batch_size
    lr: float = TrainConfig.lr
    # slices per forward pass when segmenting a volume
    infer_batch_size: int = 16
    # names of the foreground classes of a newly built model
    labels: tuple[str, ...] = SegmenterConfig.labels
    # build the default model in a background thread when none is published
    prepare_default_model: bool = True
    # wall-clock budget of that build in seconds (half for backbone pretraining, the rest for the
    # segmenter); a stage that runs out stops after its current step/epoch and keeps what it learned
    prepare_budget_s: float = 480.0
    # run /infer in a worker thread so the server answers other requests meanwhile
    threaded_infer: bool = True
    # save each infer's uncertainty map in the datastore as label tag `uncertainty`
    save_uncertainty: bool = True
    # longest report accepted, in UTF-8 bytes (longer ones get HTTP 413)
    max_text_bytes: int = 65536
    # at most this many volume slices (spread over the volume) go into backbone pretraining per volume
    pretrain_slices_per_volume: int = 8
    seed: int = TrainConfig.seed
    # largest request body (an image, label or volume upload) in MiB; larger gets HTTP 413
    max_upload_mb: int = 1024
    # serve on a non-loopback --host without MONAI Label authentication (MONAI_LABEL_AUTH_ENABLE);
    # refused by default: the datastore holds patient images and reports
    allow_remote: bool = False

    # ------------------------------------------------------------------ parsing
    @classmethod
    def from_conf(cls, conf: dict[str, Any] | None) -> "AppConf":
        """Parse MONAI Label's string conf; unknown keys and bad values raise ValueError."""
        conf = dict(conf or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        unknown = sorted(k for k in conf if k not in fields and k not in _MONAILABEL_KEYS)
        if unknown:
            raise ValueError(f"unknown --conf option(s) {unknown}; known options: {sorted(fields)}")
        values: dict[str, Any] = {}
        for key, raw in conf.items():
            if key in _MONAILABEL_KEYS:
                continue
            values[key] = _parse(key, raw, hints[key])
        out = cls(**values)
        out.validate()
        return out

    def validate(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) <= 0:
                raise ValueError(f"--conf {name} must be positive, got {getattr(self, name)}")

        if self.image_size < 0:
            raise ValueError(f"--conf image_size must be >= 0 (0 = chosen from the data), got {self.image_size}")
        from lib.geometry import parse_window

        parse_window(self.window)
        for name in ("n_noise", "epochs", "backbone_epochs", "batch_size", "lr",
                     "infer_batch_size", "max_text_bytes", "pretrain_slices_per_volume", "max_upload_mb"):
            positive(name)
        if self.prepare_budget_s < 0:
            raise ValueError(f"--conf prepare_budget_s must be >= 0 (0 = no limit), got {self.prepare_budget_s}")
        if not self.timesteps or any(not 0 <= t < 1000 for t in self.timesteps):
            raise ValueError(f"--conf timesteps must be comma-separated steps in 0..999, got {self.timesteps}")
        if not self.backbone_channels or any(c <= 0 for c in self.backbone_channels):
            raise ValueError(f"--conf backbone_channels must be positive widths, got {self.backbone_channels}")
        factor = 2 ** (len(self.backbone_channels) - 1)
        if self.image_size and self.image_size % factor:
            raise ValueError(f"--conf image_size {self.image_size} must be divisible by {factor} "
                             f"for {len(self.backbone_channels)} backbone levels")
        if not self.labels or any(not label.strip() for label in self.labels):
            raise ValueError("--conf labels must name at least one foreground class")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise ValueError(f"--conf device must be auto, cpu or cuda[:N], got {self.device!r}")
        if not self.text_encoder:
            raise ValueError("--conf text_encoder must be 'tiny' or a local model directory")
        if self.text_residual not in TEXT_RESIDUALS:
            raise ValueError(f"--conf text_residual must be one of {', '.join(TEXT_RESIDUALS)}, got "
                             f"{self.text_residual!r}")

    # ------------------------------------------------------------------ derived paths
    def state_path(self, studies: str, app_dir: str) -> Path:
        """Models and caches of one studies folder: `--conf state_dir`, else `<studies>/.fasttextdiff`, so a
        later start on the same studies reuses them and nothing is written inside the code tree.

        MONAI Label's datastore lists only image files directly in the studies folder and its
        `labels/` tags, so a hidden subfolder is never taken for images; its file watcher skips it
        (lib.datastore). A DICOMweb studies URL keeps its state in the app's `model/` folder."""
        if self.state_dir:
            return Path(self.state_dir).expanduser().resolve()
        import hashlib

        key = studies if studies.startswith(("http://", "https://")) else str(Path(studies).resolve())
        name = "".join(c if c.isalnum() or c in "-_" else "_" for c in key.rstrip("/").split("/")[-1])[:40]
        in_app = Path(
            app_dir, "model", f"{name or 'studies'}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"
        ).resolve()
        if studies.startswith(("http://", "https://")):
            return in_app
        own = Path(key) / STATE_SUBDIR
        # state an earlier version kept in the app's folder keeps being used, rather than rebuilt
        return in_app if in_app.is_dir() and not own.exists() else own

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def _parse(key: str, raw: Any, hint: Any) -> Any:
    """One string (or already typed value, from tests) to the field's type."""
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true/false")
        if hint is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            return int(str(raw).strip())
        if hint is float:
            return float(str(raw).strip())
        if hint is str:
            return str(raw)
        if origin is tuple:
            (item_type, *_rest) = typing.get_args(hint)
            items = raw if isinstance(raw, (list, tuple)) else [s for s in str(raw).split(",") if s.strip()]
            return tuple(item_type(str(s).strip()) for s in items)
    except ValueError as exc:
        raise ValueError(f"--conf {key}: cannot read {raw!r} as {getattr(hint, '__name__', hint)} ({exc})") from exc
    raise ValueError(f"--conf {key}: unsupported option type {hint}")  # pragma: no cover - a programming error


__all__ = ["AppConf"]

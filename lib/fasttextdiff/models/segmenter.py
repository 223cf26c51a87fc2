"""The segmenter: frozen diffusion features + report fusion + a small conv head.

Only the fusion and the head train (a few hundred thousand to ~10M parameters), which is what
makes the method label-efficient: the backbone learnt the images' structure without labels.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fasttextdiff import __version__
from fasttextdiff.utils.atomic import atomic_path, atomic_write_json
from fasttextdiff.models.backbone import DiffusionBackbone
from fasttextdiff.utils.checkpoint import load_tensors, read_json, sha256_file, verify_sha256
from fasttextdiff.config import MODEL_CONFIG_FILE, BackboneConfig, SegmenterConfig, TextConfig, TrainConfig
from fasttextdiff.utils.errors import CheckpointError, ModelNotFoundError
from fasttextdiff.models.fusion import CrossModalFusion

WEIGHTS_FILE = "segmenter.safetensors"
BACKBONE_DIR = "backbone"
FORMAT_VERSION = 1


@dataclass
class Prediction:
    probabilities: torch.Tensor  # (B, K, H, W), mean over noise draws
    mask: torch.Tensor  # (B, H, W) class index
    uncertainty: torch.Tensor  # (B, H, W) std of the foreground probability over noise draws


class SegmentationHead(nn.Module):
    """Upsample every fused scale to the input size, concatenate, three 3x3 conv+BN+ReLU, 1x1 to classes."""

    def __init__(self, n_scales: int, dim: int, channels: int, num_classes: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = n_scales * dim
        for _ in range(3):
            layers += [nn.Conv2d(c_in, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
                       nn.ReLU(inplace=True)]
            c_in = channels
        layers.append(nn.Conv2d(channels, num_classes, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, fused: list[torch.Tensor], size: int) -> torch.Tensor:
        up = [f if f.shape[-1] == size else F.interpolate(f, size=(size, size), mode="bilinear", align_corners=False)
              for f in fused]
        return self.layers(torch.cat(up, dim=1))


class FastTextDiffModel(nn.Module):
    """`logits = model(images, text_states, text_mask)`; `model.predict(...)` adds uncertainty."""

    def __init__(self, backbone: DiffusionBackbone, text_dim: int, config: SegmenterConfig):
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.backbone.freeze()
        self.text_dim = text_dim
        self.fusion = CrossModalFusion(backbone.feature_channels, text_dim, config.fusion, use_text=config.use_text)
        self.head = SegmentationHead(len(backbone.feature_channels), config.fusion.dim, config.head_channels,
                                     config.num_classes)

    @property
    def image_size(self) -> int:
        return self.backbone.config.image_size

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Fusion + head only: the backbone is saved on its own and never changes here."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def train(self, mode: bool = True) -> "FastTextDiffModel":
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout/EMA drift in the feature extractor
        return self

    def forward(self, images: torch.Tensor | None, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, seed: int | None = None,
                features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`features` (precomputed by the frozen backbone) replaces `images` when given."""
        if features is None:
            with torch.no_grad():
                features = self.backbone.features(images, seed=seed)
        return self.forward_features(features, text_states, text_mask)

    @property
    def head_size(self) -> int:
        return max(1, round(self.image_size * self.config.head_scale))

    def pool_features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """Feature maps finer than the head's grid, averaged down to it (fewer tokens to attend)."""
        size = self.head_size
        return [F.adaptive_avg_pool2d(f, size) if f.shape[-1] > size else f for f in features]

    def forward_features(self, features: list[torch.Tensor], text_states: torch.Tensor | None = None,
                         text_mask: torch.Tensor | None = None) -> torch.Tensor:
        """From (pooled or raw) backbone features: training on a frozen backbone can cache them."""
        fused = self.fusion([f.detach().float() for f in self.pool_features(features)], text_states, text_mask)
        logits = self.head(fused, self.head_size)
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return logits

    @torch.no_grad()
    def predict(self, images: torch.Tensor, text_states: torch.Tensor | None = None,
                text_mask: torch.Tensor | None = None, n_noise: int = 1) -> Prediction:
        """Average softmax over `n_noise` noise draws; their spread is the uncertainty map."""
        if n_noise < 1:
            raise ValueError(f"n_noise must be >= 1, got {n_noise}")
        base = self.backbone.config.noise_seed
        draws = torch.stack(
            [torch.softmax(self(images, text_states, text_mask, seed=base + k).float(), dim=1) for k in range(n_noise)]
        )  # (n, B, K, H, W)
        probs = draws.mean(0)
        foreground_std = draws[:, :, 1:].std(0, unbiased=False) if n_noise > 1 else torch.zeros_like(probs[:, 1:])
        return Prediction(probabilities=probs, mask=probs.argmax(1), uncertainty=foreground_std.amax(1))

    # --- saving and loading: one directory, safetensors + JSON -------------------------------

    def save(self, model_dir: str | Path, text_config: TextConfig, train_config: TrainConfig | None = None,
             metrics: dict | None = None) -> Path:
        """Write weights + configs into `model_dir` (the caller publishes it atomically)."""
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(model_dir / BACKBONE_DIR)
        state = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        with atomic_path(model_dir / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        atomic_write_json(model_dir / MODEL_CONFIG_FILE, {
            "format": FORMAT_VERSION,
            "fasttextdiff_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "segmenter": self.config.to_dict(),
            "backbone": self.backbone.config.to_dict(),
            "text": text_config.to_dict(),
            "text_dim": self.text_dim,
            "train": train_config.to_dict() if train_config else None,
            "metrics": metrics or {},
            "weights_sha256": sha256_file(model_dir / WEIGHTS_FILE),  # load refuses a corrupt file
        })
        return model_dir

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> tuple["FastTextDiffModel", dict]:
        """Returns the model (eval mode) and the raw JSON record (text config, metrics...)."""
        model_dir = Path(model_dir)
        record = read_model_record(model_dir)
        backbone = DiffusionBackbone.from_pretrained(model_dir / BACKBONE_DIR)
        if backbone.config.to_dict() != BackboneConfig.from_dict(record["backbone"]).to_dict():
            raise CheckpointError(f"{model_dir}: backbone/ does not match the backbone recorded in "
                                  f"{MODEL_CONFIG_FILE}")
        model = cls(backbone, int(record["text_dim"]), segmenter_config_from_record(record))
        weights = model_dir / WEIGHTS_FILE
        if not weights.is_file():
            raise ModelNotFoundError(f"{model_dir} has no {WEIGHTS_FILE}; is it a FastTextDiff model directory?")
        state = load_tensors(weights)
        verify_sha256(weights, record.get("weights_sha256"), "restore it or train the model again")
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise CheckpointError(
                f"{weights} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        return model.to(device).eval(), record


# Fusion options added after format 1 was first written, with the value that reproduces older models.
_FUSION_DEFAULTS_BEFORE = {"text_residual": "plain", "text_dropout": 0.0}


def segmenter_config_from_record(record: dict) -> SegmenterConfig:
    """The recorded SegmenterConfig; models saved before an option existed get its old behaviour."""
    segmenter = dict(record["segmenter"])
    segmenter["fusion"] = {**_FUSION_DEFAULTS_BEFORE, **segmenter.get("fusion", {})}
    return SegmenterConfig.from_dict(segmenter)


def read_model_record(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise ModelNotFoundError(f"model directory {model_dir} does not exist; train one with `fasttextdiff train`")
    path = model_dir / MODEL_CONFIG_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{model_dir} is not a FastTextDiff model directory (no {MODEL_CONFIG_FILE})")
    record = read_json(path)
    if record.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format {record.get('format')}; this version reads format {FORMAT_VERSION}")
    return record

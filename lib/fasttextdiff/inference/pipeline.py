"""Inference on whole images and volumes, results in the input's own geometry.

A volume is segmented slice by slice in batches (the backbone is 2D; `fast_inference` batches the
slices, noise draws and timesteps) and reassembled; the report is encoded once per request.
`Segmenter` loads the model and the text encoder once, so a server process reuses them for every request.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fasttextdiff.utils.atomic import resolve_model_dir
from fasttextdiff.data.io import Image, read_image, write_image
from fasttextdiff.data.preprocess import to_model_input, to_original_grid
from fasttextdiff.utils.devices import resolve_device
from fasttextdiff.utils.errors import ReportError
from fasttextdiff.inference.batched import InferenceOptions, precision_record, predict_slices, resolve_precision
from fasttextdiff.inference.postprocess import drop_small_components
from fasttextdiff.models.segmenter import FastTextDiffModel
from fasttextdiff.text.encoder import TextEncoder

log = logging.getLogger(__name__)
# MONAI 1.5.1's sliding window indexes tensors with lists, which torch warns about on every call
# (fixed upstream in Project-MONAI/MONAI#8732); the warning says nothing to our users
warnings.filterwarnings("ignore", message="Using a non-tuple sequence for multidimensional indexing",
                        module=r"monai\.inferers\.utils")


@dataclass
class SegmentationResult:
    mask: np.ndarray  # uint8 class indices in the input grid
    uncertainty: np.ndarray  # float32 in the input grid
    probabilities: np.ndarray  # float32 (K, *grid)
    image: Image
    summary: dict = field(default_factory=dict)

    def save(self, mask_path: str | Path, uncertainty_path: str | Path | None = None) -> None:
        write_image(mask_path, self.mask.astype(np.uint8), like=self.image, palette=True)  # PNG: visible colours
        if uncertainty_path is not None:
            unc = self.uncertainty.astype(np.float32)
            if str(uncertainty_path).lower().endswith((".png", ".jpg", ".jpeg")):
                unc = np.clip(unc / 0.5 * 255.0, 0, 255).astype(np.uint8)  # std of a probability is <= 0.5
            write_image(uncertainty_path, unc, like=self.image)


class Segmenter:
    """A loaded model + text encoder, ready for requests (thread-safe)."""

    def __init__(self, model: FastTextDiffModel, record: dict, encoder: TextEncoder | None, model_dir: Path,
                 device: torch.device, n_noise: int = 4, batch_size: int = 16,
                 options: InferenceOptions | None = None):
        self.model = model
        self.options = options or InferenceOptions()  # the speed measures (fast_inference); reference() = none
        resolve_precision(self.options.precision, device)  # a precision this device/torch cannot run fails at load
        self.record = record
        self.encoder = encoder
        self.model_dir = model_dir
        self.device = device
        self.n_noise = n_noise
        self.batch_size = batch_size
        self._lock = threading.Lock()  # feature hooks and the encoder are not re-entrant
        self.model_identity = hashlib.sha256(
            (str(model_dir) + str(record.get("created")) + str(record.get("metrics", {}).get("seconds"))).encode()
        ).hexdigest()[:16]

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device | None = None, n_noise: int = 4,
             batch_size: int = 16, text_cache_dir: str | Path | None = None,
             options: InferenceOptions | None = None) -> "Segmenter":
        model_dir = resolve_model_dir(model_dir)
        device = resolve_device(device)
        model, record = FastTextDiffModel.load(model_dir, device)
        encoder = None
        if model.config.use_text:
            encoder = TextEncoder.from_model_dir(model_dir, device=device, cache_dir=text_cache_dir)
            if encoder.hidden_size != model.text_dim:
                raise ReportError(f"text encoder width {encoder.hidden_size} does not match the model's "
                                  f"{model.text_dim}")
        return cls(model, record, encoder, model_dir, device, n_noise=n_noise, batch_size=batch_size, options=options)

    @property
    def inference_settings(self) -> dict:
        """The precision and device this segmenter computes in (what `/info` and the benchmarks record)."""
        return precision_record(self.options.precision, self.device)

    @property
    def labels(self) -> list[str]:
        return list(self.model.config.labels)

    @property
    def image_size(self) -> int:
        return self.model.image_size

    def segment(self, image: Image, text: str | None, n_noise: int | None = None) -> SegmentationResult:
        n_noise = self.n_noise if n_noise is None else int(n_noise)
        if not 1 <= n_noise <= 32:
            raise ValueError(f"n_noise must be between 1 and 32, got {n_noise}")
        cfg = self.model.backbone.config
        x = to_model_input(image, cfg.image_size, cfg.in_channels, window=cfg.window,
                           body_crop=cfg.body_crop)  # (N, C, S, S)
        with self._lock, torch.inference_mode():
            states = mask = None
            if self.encoder is not None:
                batch = self.encoder.encode([text or ""])
                states, mask = batch.states.to(self.device), batch.mask.to(self.device)
            probabilities, uncertainty = predict_slices(self.model, x, states, mask, n_noise, self.options,
                                                        self.device,
                                                        slice_batch=self.batch_size)  # (N, K, S, S), (N, S, S)
        prob_grid = to_original_grid(probabilities, image, mode="bilinear", window=cfg.window,
                                     body_crop=cfg.body_crop).astype(np.float32)  # (K, *grid)
        mask_grid = prob_grid.argmax(0).astype(np.uint8)
        if image.is_volume and self.options.min_component_mm3 > 0:
            mask_grid = drop_small_components(mask_grid, image.spacing, self.options.min_component_mm3)
        unc_grid = to_original_grid(uncertainty, image, mode="bilinear", window=cfg.window,
                                    body_crop=cfg.body_crop).astype(np.float32)
        return SegmentationResult(mask_grid, unc_grid, prob_grid, image, self._summary(mask_grid, unc_grid, n_noise))

    def segment_file(self, path: str | Path, text: str | None, out: str | Path,
                     uncertainty_out: str | Path | None = None, n_noise: int | None = None,
                     allow_external_data: bool = False) -> SegmentationResult:
        result = self.segment(read_image(path, allow_external_data=allow_external_data), text, n_noise)
        result.save(out, uncertainty_out)
        return result

    def _summary(self, mask: np.ndarray, unc: np.ndarray, n_noise: int) -> dict:
        per_label = {}
        for k, name in enumerate(self.labels, start=1):
            region = mask == k
            per_label[name] = float(unc[region].mean()) if region.any() else 0.0
        return {
            "uncertainty_mean": float(unc.mean()),
            "uncertainty_per_label": per_label,
            "foreground_fraction": float((mask > 0).mean()),
            "labels": {name: k for k, name in enumerate(self.labels, start=1)},
            "n_noise": n_noise,
        }


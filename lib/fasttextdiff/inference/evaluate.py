"""Test-split evaluation at the masks' own resolution: per-image Dice and IoU, mean and std."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fasttextdiff.data.io import read_image
from fasttextdiff.data.lvit import Sample
from fasttextdiff.data.preprocess import mask_to_labels
from fasttextdiff.inference.pipeline import Segmenter
from fasttextdiff.utils.metrics import dice_iou


def evaluate_model(model: str | Path | Segmenter, samples: Sequence[Sample], device=None, n_noise: int = 1,
                   progress: bool = True) -> dict:
    segmenter = model if isinstance(model, Segmenter) else Segmenter.load(model, device=device, n_noise=n_noise)
    labeled = [s for s in samples if s.mask is not None]
    if not labeled:
        raise ValueError("no samples with masks to evaluate")
    num_classes = segmenter.model.config.num_classes
    rows = []
    for sample in tqdm(labeled, desc="evaluate", disable=not progress):
        result = segmenter.segment(read_image(sample.image), sample.text, n_noise=n_noise)
        truth = mask_to_labels(read_image(sample.mask).array, num_classes)
        if truth.shape != result.mask.shape:
            raise ValueError(f"{sample.mask}: mask shape {truth.shape} differs from image shape {result.mask.shape}")
        d, i = dice_iou(torch.from_numpy(result.mask[None].astype(np.int64)),
                        torch.from_numpy(truth[None].astype(np.int64)), num_classes)
        rows.append({"name": sample.name, "dice": d[0], "iou": i[0],
                     "uncertainty_mean": result.summary["uncertainty_mean"]})
    dice = np.array([r["dice"] for r in rows])
    iou = np.array([r["iou"] for r in rows])
    return {"n": len(rows), "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
            "iou_mean": float(iou.mean()), "iou_std": float(iou.std()), "per_image": rows}

"""Per-image (per-volume) Dice and IoU (MONAI metrics), averaged over foreground classes; lesion detection.

An image with no foreground in either prediction or truth scores 1 (a correct "nothing here"),
not NaN: the datasets have such images and dropping them would flatter the mean.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot
from scipy import ndimage


def dice_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[list[float], list[float]]:
    """pred, target: (B, H, W) or (B, D, H, W) class indices -> per-image Dice and IoU lists."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(target.shape)} differ in shape")
    p = one_hot(pred[:, None].long(), num_classes)
    t = one_hot(target[:, None].long(), num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, t)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(p, t)
    return dice.nanmean(1).tolist(), iou.nanmean(1).tolist()


def lesion_detection(pred: np.ndarray, lesions: np.ndarray, named: Iterable[int] | None = None) -> dict:
    """Lesion-wise detection, counted as lesion challenges do (a detection is an overlap, not a Dice).

    `pred`: a foreground mask; `lesions`: an instance map (0 = none, k = lesion k) in the same grid,
    2D or 3D. A named lesion is found when a connected component of the prediction (26- or
    8-connectivity) overlaps it; a component that overlaps no named lesion (an unnamed decoy included:
    the report did not ask for it) is a false positive. `named` defaults to every lesion in the map.
    """
    if pred.shape != lesions.shape:
        raise ValueError(f"prediction {pred.shape} and lesion map {lesions.shape} differ in shape")
    wanted = sorted(int(k) for k in (np.unique(lesions[lesions > 0]) if named is None else named))
    components, n_components = ndimage.label(pred > 0, structure=np.ones((3,) * pred.ndim, dtype=bool))
    hits = set(zip(components[(components > 0) & (lesions > 0)].tolist(), lesions[(components > 0) & (lesions > 0)]
                   .tolist()))
    found = sorted({k for _, k in hits if k in wanted})
    true_components = {c for c, k in hits if k in wanted}
    return {"lesions": len(wanted), "found": len(found), "found_ids": found,
            "detection_rate": len(found) / len(wanted) if wanted else float("nan"),
            "components": int(n_components), "fp_components": int(n_components - len(true_components))}

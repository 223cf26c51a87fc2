"""Per-image Dice and IoU (MONAI metrics), averaged over foreground classes.

An image with no foreground in either prediction or truth scores 1 (a correct "nothing here"),
not NaN: the datasets have such images and dropping them would flatter the mean.
"""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric, MeanIoU
from monai.networks.utils import one_hot


def dice_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[list[float], list[float]]:
    """pred, target: (B, H, W) or (B, D, H, W) class indices -> per-image Dice and IoU lists."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and truth {tuple(target.shape)} differ in shape")
    p = one_hot(pred[:, None].long(), num_classes)
    t = one_hot(target[:, None].long(), num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(p, t)
    iou = MeanIoU(include_background=False, reduction="none", ignore_empty=False)(p, t)
    return dice.nanmean(1).tolist(), iou.nanmean(1).tolist()

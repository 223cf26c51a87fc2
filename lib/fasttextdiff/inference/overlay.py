"""An overlay PNG for a person: the image in grey with the mask's classes in colour on top.

A mask PNG alone holds class indices (0/1), which most viewers show black; the overlay is the
picture to look at. Volumes show the slice with the most foreground (the middle slice when there
is none), in canonical orientation (the radiological view, as the model sees it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fasttextdiff.data.io import LABEL_PALETTE, Image
from fasttextdiff.data.preprocess import canonical_array

ALPHA = 0.45  # mask opacity over the image


def overlay_rgb(image: Image, mask: np.ndarray) -> tuple[np.ndarray, int | None]:
    """(H, W, 3) uint8 and the slice index shown (None for 2D). `mask` is in the image's grid."""
    like_mask = Image(np.asarray(mask), image.spacing, image.origin, image.direction, image.is_volume)
    pixels = canonical_array(image).astype(np.float32)
    labels = canonical_array(like_mask)
    index = None
    if image.is_volume:
        counts = (labels > 0).reshape(labels.shape[0], -1).sum(1)
        index = int(counts.argmax()) if counts.any() else labels.shape[0] // 2
        pixels, labels = pixels[index], labels[index]
    grey = pixels if pixels.ndim == 2 else pixels[..., :3].mean(-1)
    lo, hi = np.percentile(grey, [1, 99]) if grey.size else (0.0, 1.0)
    grey = np.clip((grey - lo) / max(hi - lo, 1e-6), 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for value in np.unique(labels):
        if value == 0:
            continue
        colour = np.array(LABEL_PALETTE[int(value) % len(LABEL_PALETTE)] if value < len(LABEL_PALETTE)
                          else (255, 255, 255), np.float32)
        region = labels == value
        rgb[region] = (1 - ALPHA) * rgb[region] + ALPHA * colour
    return rgb.round().astype(np.uint8), index


def write_overlay(image: Image, mask: np.ndarray, path: str | Path) -> int | None:
    """Write the overlay PNG; returns the volume slice shown (None for 2D)."""
    from PIL import Image as PILImage

    from fasttextdiff.utils.atomic import atomic_path

    rgb, index = overlay_rgb(image, mask)
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"--overlay must name a .png file, got {path.name}")
    with atomic_path(path, suffix=".png") as tmp:
        PILImage.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
    return index

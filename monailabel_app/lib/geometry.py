"""Input size and intensity window of a newly built model, chosen from the studies and the device.

A fixed small input size shrinks a 512x512 CT eight-fold and a small nodule to a few pixels; a
percentile scaling of CT numbers depends on how much air and metal a scan holds. So a new model's
size follows the images (never above their own in-plane size) and the device: the paper's 256 px
on a GPU, 128 px on a CPU (4x the pixels of the old 64 px default; the default-model build stays
within `--conf prepare_budget_s` because each stage stops at its share of the budget). CT volumes
in Hounsfield units get a fixed HU window when every sampled image is such a volume, decided by what
the final labels mark (`ct_window`: lung findings -> the lung window, center -600 width 1500; organs,
vessels, bone and solid lesions -> the soft-tissue window, center 50 width 350) unless `--conf window`
names one; otherwise (2D images,
MR, mixed studies) intensities keep the per-image percentile scaling. `--conf image_size` and
`--conf window` override the choice. The choice is recorded in `<state>/geometry.json`, the
backbone's config (so the model record) and `/info`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)
GEOMETRY_FILE = "geometry.json"
GPU_SIZE, CPU_SIZE, MIN_SIZE = 256, 128, 32
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "soft_tissue": (50.0, 350.0),
           "bone": (400.0, 1800.0), "brain": (40.0, 80.0)}
SAMPLE_IMAGES = 6  # images read to decide (volumes are read whole: keep it small)


def looks_like_ct_hu(array: np.ndarray) -> bool:
    """A volume in Hounsfield units: air near -1000 and tissue above -100 (1st/99th percentiles)."""
    flat = np.asarray(array, dtype=np.float32).reshape(-1)
    if flat.size > 2_000_000:
        flat = flat[:: flat.size // 2_000_000 + 1]
    lo, hi = np.percentile(flat, [1, 99])
    return bool(lo <= -800 and hi >= -100 and flat.max() <= 5000)


def parse_window(value: str) -> tuple[float, float] | None | str:
    """--conf window: "auto", "none" (percentiles), a name in WINDOWS, or "center,width" in HU."""
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text == "none":
        return None
    if text in WINDOWS:
        return WINDOWS[text]
    try:
        center, width = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--conf window must be auto, none, {', '.join(WINDOWS)} or 'center,width' in HU, "
                         f"got {value!r}") from None
    if width <= 0:
        raise ValueError(f"--conf window width must be positive, got {width}")
    return center, width


LUNG_FINDING_HU = -400.0  # labeled voxels below this median are lung findings (ground glass, parenchyma)


def labeled_median_hu(labeled: list[tuple[str, str]]) -> float | None:
    """The median HU under the final labels of a few labeled CT volumes (None when none can be read)."""
    from fasttextdiff.data.io import read_image

    values = []
    for image_path, label_path in labeled[:SAMPLE_IMAGES]:
        try:
            image, label = read_image(image_path), read_image(label_path)
        except Exception as exc:  # noqa: BLE001 - an unreadable pair does not decide the window
            logger.warning("geometry: skipping the label of %s (%s)", image_path, exc)
            continue
        if image.is_volume and label.array.shape == image.array.shape and (label.array > 0).any():
            inside = np.asarray(image.array, dtype=np.float32)[label.array > 0]
            values.append(inside[:: max(1, inside.size // 200_000)])
    return float(np.median(np.concatenate(values))) if values else None


def ct_window(labeled: list[tuple[str, str]]) -> tuple[tuple[float, float], str]:
    """The window of CT studies, decided by what the labels mark: lung findings (median below -400 HU)
    need the lung window; organs, muscles, vessels, bone and solid lesions need the soft-tissue window,
    where the lung window leaves a 50 HU organ boundary a few grey levels (measured: bench/real_ct.py)."""
    median = labeled_median_hu(labeled)
    if median is None:
        return WINDOWS["lung"], "lung window (CT volumes in Hounsfield units; no labeled volume to decide by)"
    if median < LUNG_FINDING_HU:
        return WINDOWS["lung"], f"lung window (CT volumes; the labeled findings are at median {median:.0f} HU)"
    return WINDOWS["soft_tissue"], (f"soft-tissue window (CT volumes; the labeled structures are at median "
                                    f"{median:.0f} HU)")


def choose_geometry(image_paths: list[str], conf: Any, device: str, state: str | Path | None = None,
                    labeled: list[tuple[str, str]] | None = None) -> dict:
    """{"image_size", "window", "native_size", "size_reason", "window_reason"} for a new model;
    `labeled` (image, final label) pairs decide a CT window."""
    from fasttextdiff.data.io import read_image

    factor = 2 ** (len(conf.backbone_channels) - 1)
    native, ct, read = 0, [], 0
    for path in image_paths[:SAMPLE_IMAGES]:
        try:
            image = read_image(path)
        except Exception as exc:  # noqa: BLE001 - an unreadable image does not decide the model
            logger.warning("geometry: skipping %s (%s)", path, exc)
            continue
        read += 1
        native = max(native, *image.plane_shape)
        ct.append(bool(image.is_volume and looks_like_ct_hu(image.array)))
    on_gpu = str(device).startswith("cuda")
    target = GPU_SIZE if on_gpu else CPU_SIZE
    if conf.image_size:
        size, size_reason = conf.image_size, f"--conf image_size {conf.image_size}"
    else:
        size = min(target, native) if native else target
        size = max(MIN_SIZE, size - size % factor)
        size_reason = (f"{'GPU' if on_gpu else 'CPU'} default {target} px"
                       + (f", capped at the images' own size {native} px" if native and native < target else "")
                       + (f" (images up to {native} px in-plane are resized to {size} px)" if native > size else ""))
    wanted = parse_window(conf.window)
    if wanted == "auto":
        if ct and all(ct):
            window, window_reason = ct_window(labeled or [])
        else:
            window, window_reason = None, ("percentiles 0.5/99.5 per image" +
                                           (" (not every image is a CT volume in HU)" if any(ct) else ""))
    elif wanted is None:
        window, window_reason = None, "percentiles 0.5/99.5 per image (--conf window none)"
    else:
        window, window_reason = tuple(wanted), f"--conf window {conf.window}"
    result = {"image_size": int(size), "window": list(window) if window else None, "native_size": native or None,
              "size_reason": size_reason, "window_reason": window_reason, "images_sampled": read,
              "device": str(device)}
    logger.info("new model geometry: %s", result)
    if state is not None:
        from fasttextdiff.utils.atomic import atomic_write_json

        atomic_write_json(Path(state) / GEOMETRY_FILE, result)
    return result


def read_geometry(state: str | Path) -> dict:
    try:
        return json.loads((Path(state) / GEOMETRY_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}

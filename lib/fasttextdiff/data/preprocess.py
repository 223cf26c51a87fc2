"""Turn an `Image` into the model's square [-1, 1] tensor, and model outputs back into its grid.

Why here and only here: training, evaluation and serving must scale intensities and resize in
exactly the same way, or a model trained on one path silently degrades on the other. Volumes are
treated as a batch of slices with one set of intensity statistics for the whole volume, so
neighbouring slices stay comparable.

Orientation: volumes are sliced in one canonical orientation (LPS, as `sitk.DICOMOrient(img, "LPS")`
gives it): axial slices, anterior at the top, the patient's right on the image's left - the
radiological view. Without it a NIfTI stored in RAS order (the MNI template, most research data)
would reach the model mirrored, and a report's "left lung" would point at the wrong side.
`to_original_grid` undoes the reorientation, so outputs land in the stored grid.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from fasttextdiff.data.io import Image

LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
_MAX_STAT_SAMPLES = 4_000_000  # percentiles of a huge volume from a strided subsample
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L" conversion


def _intensity_range(values: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        center, width = float(window[0]), float(window[1])
        if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
            raise ValueError(f"a window is (center, width) with a positive width, got {window}")
        return center - width / 2, center + width / 2
    flat = values.reshape(-1)
    if flat.size > _MAX_STAT_SAMPLES:
        flat = flat[:: flat.size // _MAX_STAT_SAMPLES + 1]
    lo, hi = np.percentile(flat, [LOW_PERCENTILE, HIGH_PERCENTILE])
    return float(lo), float(hi)


def canonical_orientation(image: Image) -> tuple[tuple[int, int, int], tuple[int, ...]] | None:
    """(transpose order, flipped axes) that bring the (Z, Y, X) array to LPS, or None if already there.

    Uses the nearest axis-aligned directions (oblique acquisitions are sliced along their nearest
    axes, not resampled). A 2D image with a 3D header is only flipped/transposed in plane, and only
    when its slice normal is the z axis. Images without 3D geometry are left as they are.
    """
    if len(image.direction) != 9:
        return None
    direction = np.asarray(image.direction, dtype=np.float64).reshape(3, 3)  # column c = index axis c
    physical = np.abs(direction).argmax(axis=0)  # index axis c runs along physical axis physical[c]
    if sorted(physical.tolist()) != [0, 1, 2]:
        return None  # degenerate direction matrix: leave the data alone
    signs = np.sign(direction[physical, [0, 1, 2]])
    order = [0, 0, 0]
    for c in range(3):  # array axis 2 - c holds index axis c
        order[2 - physical[c]] = 2 - c
    flips = tuple(2 - int(physical[c]) for c in range(3) if signs[c] < 0)
    if not image.is_volume and order[0] != 0:
        return None  # a single slice whose normal is not z: no in-plane meaning to fix
    if order == [0, 1, 2] and not flips:
        return None
    return (order[0], order[1], order[2]), flips


def canonical_array(image: Image) -> np.ndarray:
    """The image's pixels in canonical orientation: (Z, Y, X), (H, W) or (H, W, 3)."""
    orientation = canonical_orientation(image)
    if orientation is None:
        return image.array
    order, flips = orientation
    stack = image.array if image.is_volume else image.array[None]
    extra = tuple(range(3, stack.ndim))  # colour channels stay last
    oriented = np.flip(np.transpose(stack, order + extra), flips) if flips else np.transpose(stack, order + extra)
    return oriented if image.is_volume else oriented[0]


def _from_canonical(stack: np.ndarray, image: Image) -> np.ndarray:
    """Undo `canonical_array` on a (..., Z, Y, X) stack (leading axes untouched)."""
    orientation = canonical_orientation(image)
    if orientation is None:
        return stack
    order, flips = orientation
    lead = stack.ndim - 3
    if flips:
        stack = np.flip(stack, tuple(lead + f for f in flips))
    inverse = np.argsort(order)
    return np.transpose(stack, tuple(range(lead)) + tuple(lead + int(i) for i in inverse))


def _slices_with_channels(image: Image, channels: int) -> np.ndarray:
    """(N, C, H, W) float32 with the requested channel count (grey <-> RGB), canonically oriented."""
    array = canonical_array(image).astype(np.float32, copy=False)
    if image.is_volume:
        stack = array[:, None]  # (Z, 1, Y, X)
    elif array.ndim == 3:
        stack = np.moveaxis(array, -1, 0)[None]  # (1, 3, H, W)
    else:
        stack = array[None, None]
    if stack.shape[1] == channels:
        return stack
    if channels == 1:
        return np.tensordot(_LUMA, stack, axes=([0], [1]))[:, None].astype(np.float32)
    return np.repeat(stack, channels, axis=1)


def to_model_input(image: Image, size: int, channels: int, window: tuple[float, float] | None = None) -> torch.Tensor:
    """`(N, C, size, size)` float32 in [-1, 1]; N = 1 for a 2D image, the canonical slices of a volume.

    Volumes come in canonical (LPS) orientation - see the module doc; N equals Z for the usual
    axial acquisitions.
    Intensities are scaled by the 0.5/99.5 percentiles of the whole image or volume (robust to
    hot pixels and metal), or by a CT window `(center, width)` in the image's units when given.
    Resizing uses antialiased bilinear interpolation, so downscaling does not alias fine texture.
    """
    if int(size) != size or size < 8:
        raise ValueError(f"model input size must be an integer >= 8, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    stack = _slices_with_channels(image, channels)
    lo, hi = _intensity_range(stack, window)
    scale = 2.0 / (hi - lo) if hi > lo else 0.0  # a constant image maps to -1 everywhere
    tensor = torch.from_numpy(np.ascontiguousarray(stack))
    tensor = ((tensor - lo) * scale - 1.0).clamp_(-1.0, 1.0)
    if tuple(tensor.shape[-2:]) != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return tensor.clamp_(-1.0, 1.0).contiguous()


def to_original_grid(maps, image: Image, mode: str = "nearest", chunk: int = 32) -> np.ndarray:
    """Resize per-slice model outputs back to the image's grid and stack the slices.

    `maps` is `(N, H', W')` or `(N, K, H', W')` (tensor or array) with N = 1 for 2D, or the number
    of canonical (axial) slices for a volume - exactly what `to_model_input` produced.
    Returns `(H, W)` / `(Z, Y, X)`, or with K: `(K, H, W)` / `(K, Z, Y, X)` (channel first).
    "nearest" keeps label values (masks); "bilinear" is for probabilities and uncertainty maps.
    """
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' (masks) or 'bilinear' (maps), got {mode!r}")
    tensor = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
    tensor = tensor.detach().cpu()
    if tensor.ndim not in (3, 4):
        raise ValueError(f"maps must be (N, H, W) or (N, K, H, W), got shape {tuple(tensor.shape)}")
    has_k = tensor.ndim == 4
    if not has_k:
        tensor = tensor[:, None]
    canonical_shape = canonical_array(image).shape
    slices = canonical_shape[0] if image.is_volume else 1
    if tensor.shape[0] != slices:
        raise ValueError(f"maps hold {tensor.shape[0]} slices but the image has {slices}")
    out_dtype = tensor.dtype
    target = tuple(canonical_shape[1:3]) if image.is_volume else tuple(canonical_shape[:2])
    pieces = []
    for start in range(0, tensor.shape[0], chunk):  # bounds memory for long volumes
        part = tensor[start : start + chunk].float()
        if tuple(part.shape[-2:]) != target:
            if mode == "nearest":
                part = F.interpolate(part, size=target, mode="nearest-exact")
            else:
                part = F.interpolate(part, size=target, mode="bilinear", align_corners=False, antialias=True)
        pieces.append(part if out_dtype.is_floating_point else part.round().to(out_dtype))
    result = torch.cat(pieces).numpy()  # (N, K, H, W), canonical orientation
    result = _from_canonical(np.moveaxis(result, 1, 0), image)  # (K, Z, Y, X) in the stored grid
    if not image.is_volume:
        result = result[:, 0]
    return np.ascontiguousarray(result if has_k else result[0])


def mask_to_labels(mask_array: np.ndarray, num_classes: int = 2) -> np.ndarray:
    """Class-index array (int64, same H x W) from a mask as datasets store it.

    Binary masks come as 0/1, 0/255 (LViT PNGs) or noisy JPEG greys: foreground is above half of
    the maximum. Multi-class masks hold class indices, or as many distinct grey levels as classes
    (mapped in increasing order). Colour masks are reduced to their brightest channel.
    """
    mask = np.asarray(mask_array)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        mask = mask[..., :3].max(axis=-1)
    if mask.ndim not in (2, 3):
        raise ValueError(f"a mask must be 2D (H, W) or a volume (Z, Y, X), got shape {mask.shape}")
    if num_classes < 2:
        raise ValueError("num_classes counts the background too and must be >= 2")
    if np.issubdtype(mask.dtype, np.floating) and not np.isfinite(mask).all():
        raise ValueError("the mask contains NaN or infinite values")
    if num_classes == 2:
        peak = float(mask.max()) if mask.size else 0.0
        threshold = 0.0 if peak <= 1 else peak / 2
        return (mask > threshold).astype(np.int64)
    values = np.unique(mask)
    if values.min() >= 0 and values.max() < num_classes and np.all(values == np.round(values)):
        return mask.astype(np.int64)
    if len(values) <= num_classes:
        return np.searchsorted(values, mask).astype(np.int64)
    raise ValueError(f"the mask has {len(values)} distinct values, more than the {num_classes} classes expected")

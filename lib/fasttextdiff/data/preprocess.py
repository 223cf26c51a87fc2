"""Turn an `Image` into the model's square [-1, 1] tensor, and model outputs back into its grid.

Why here and only here: training, evaluation and serving must scale intensities and resize in
exactly the same way, or a model trained on one path silently degrades on the other. Volumes are
treated as a batch of slices with one set of intensity statistics for the whole volume, so
neighbouring slices stay comparable.

Orientation: MONAI's `Orientation` turns volumes to one canonical orientation before slicing (LPS,
as `sitk.DICOMOrient(img, "LPS")` gives it): axial slices, anterior at the top, the patient's right
on the image's left - the radiological view. Without it a NIfTI stored in RAS order (the MNI
template, most research data) would reach the model mirrored, and a report's "left lung" would
point at the wrong side. `to_original_grid` undoes it with MONAI's `Invert` (the traced inverse),
so outputs land in the stored grid.

Body crop: with a CT window (HU), a square in-plane box around the body (voxels above -500 HU,
over all slices, plus a margin) is cut out before resizing, so the model's pixels fall on anatomy
instead of air. `to_original_grid` recomputes the same box from the image and pastes the outputs
back into a background canvas. Percentile-scaled images (no window) are never cropped.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import Invert, Orientation, ScaleIntensityRange

from fasttextdiff.data.io import Image

CANONICAL_AXCODES = "LPS"  # MONAI's axis codes in its RAS world: DICOMOrient's "LPS"
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
_MAX_STAT_SAMPLES = 4_000_000  # percentiles of a huge volume from a strided subsample
BODY_HU = -500.0  # above this a voxel is body (or table); below it, air
AIR_HU = -1000.0  # what a box running off the image edge is padded with
BODY_MARGIN = 0.04  # of the image side, at least 2 px, around the body's bounding box
NO_CROP_FRACTION = 0.9  # a box this close to the full side is not worth cropping
_LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's "L" conversion


TO_CANONICAL = Orientation(axcodes=CANONICAL_AXCODES, labels=None)  # one instance: `Invert` checks it is the same


def _orientable(image: Image) -> bool:
    """Whether the geometry gives a meaningful canonical orientation.

    Images without 3D geometry are left as they are, and so are degenerate direction matrices
    (two index axes nearest the same patient axis). A 2D image with a 3D header is only
    flipped/transposed in plane, and only when its slice normal is the z axis.
    """
    if len(image.direction) != 9:
        return False
    nearest = np.abs(np.reshape(image.direction, (3, 3))).argmax(axis=0)  # patient axis of each index axis
    return sorted(nearest.tolist()) == [0, 1, 2] and (image.is_volume or nearest[2] == 2)


def _axes_affine(image: Image) -> torch.Tensor:
    """The direction matrix as a 4x4 affine in MONAI's RAS world (x and y negated from LPS);
    orientation needs only the axes, so spacing and origin stay out."""
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.tensor(image.direction, dtype=torch.float64).reshape(3,
                                                                                3) * torch.tensor([[-1.0], [-1.0],
                                                                                                   [1.0]])
    return affine


def _oriented(image: Image, dtype=None, stand_in: bool = False) -> MetaTensor:
    """The image channel-first in MONAI's layout, (C, X, Y) or (C, X, Y, Z), in canonical orientation.

    A 2D image with a 3D header gets a one-slice Z axis. `stand_in` carries no pixels (zero
    channels), only the shape, geometry and the recorded transform that `Invert` needs.
    """
    array = image.array
    if array.dtype.byteorder not in "=|" or any(step < 0 for step in array.strides):  # what torch cannot share
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("="))
    channels = array[None] if image.is_volume or array.ndim == 2 else np.moveaxis(array, -1, 0)  # (C, [Z,] Y, X)
    if stand_in:
        data = torch.empty((0,) + channels.shape[1:])
    else:
        data = torch.from_numpy(channels if dtype is None else channels.astype(dtype, copy=False))
    data = data.permute(0, *range(data.ndim - 1, 0, -1))  # (C, X, Y[, Z])
    if len(image.spacing) != 3:
        return MetaTensor(data)
    tensor = MetaTensor(data if image.is_volume else data[..., None], affine=_axes_affine(image))
    return TO_CANONICAL(tensor) if _orientable(image) else tensor


def _slices(oriented: MetaTensor) -> torch.Tensor:
    """(C, X, Y[, Z]) -> the model's batch of slices (N, C, H, W)."""
    plain = oriented.as_tensor()
    return plain.permute(3, 0, 2, 1) if plain.ndim == 4 else plain.permute(0, 2, 1)[None]


def canonical_array(image: Image) -> np.ndarray:
    """The image's pixels in canonical orientation: (Z, Y, X), (H, W) or (H, W, 3)."""
    stack = _slices(_oriented(image)).numpy()  # (N, C, H, W)
    if image.is_volume:
        return stack[:, 0]
    return stack[0, 0] if stack.shape[1] == 1 else np.moveaxis(stack[0], 0, -1)


def _box_from_stack(stack: torch.Tensor, size: int) -> tuple[int, int, int] | None:
    """(top, left, side) of the square body box on canonical slices `(N, C, H, W)` in HU, or None.

    One box for all slices, shifted into the image where it fits (else padded with air); never
    smaller than `size` (or the image), so small bodies are not upsampled; None when the box would
    cover 90 % of the shorter side or nothing is above BODY_HU.
    """
    height, width = stack.shape[-2:]
    body = (stack > BODY_HU).any(dim=1).any(dim=0)  # (H, W)
    rows, cols = torch.nonzero(body.any(dim=1)), torch.nonzero(body.any(dim=0))
    if not len(rows):
        return None
    margin = max(2, round(BODY_MARGIN * max(height, width)))
    r0, r1 = int(rows[0]) - margin, int(rows[-1]) + 1 + margin
    c0, c1 = int(cols[0]) - margin, int(cols[-1]) + 1 + margin
    side = max(r1 - r0, c1 - c0, min(int(size), max(height, width)))
    if side >= NO_CROP_FRACTION * min(height, width):  # also keeps thin (non-axial) slices uncropped
        return None

    def start(lo: int, hi: int, extent: int) -> int:  # centred on the body, shifted into the image if it fits
        first = (lo + hi - side) // 2
        return int(np.clip(first, *sorted((0, extent - side))))

    return start(r0, r1, height), start(c0, c1, width), side


def body_box(image: Image, window: tuple[float, float] | None, size: int, body_crop: bool = True) -> tuple[int, int,
                                                                                                           int] | None:
    """The crop box `to_model_input` uses (see `_box_from_stack`); None = the whole slice.

    Only CT in HU (a `window`) is cropped; recomputed from the image, so both directions agree.
    """
    if not body_crop or window is None:
        return None
    return _box_from_stack(_slices(_oriented(image, dtype=np.float32)), size)


def _crop(stack: torch.Tensor, box: tuple[int, int, int], fill: float) -> torch.Tensor:
    """The box of each slice of (N, C, H, W), padded with `fill` where it runs off the image."""
    top, left, side = box
    height, width = stack.shape[-2:]
    pad = (max(0, -left), max(0, left + side - width), max(0, -top), max(0, top + side - height))
    if any(pad):
        stack = F.pad(stack, pad, value=fill)
        top, left = top + pad[2], left + pad[0]
    return stack[..., top : top + side, left : left + side]


def _intensity_range(stack: torch.Tensor, window: tuple[float, float] | None) -> tuple[float, float]:
    """The CT window, or the 0.5/99.5 percentiles of a strided sample of at most 4M voxels (MONAI's
    ScaleIntensityRangePercentiles would sort every voxel of a large volume, twice)."""
    if window is not None:
        center, width = float(window[0]), float(window[1])
        if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
            raise ValueError(f"a window is (center, width) with a positive width, got {window}")
        return center - width / 2, center + width / 2
    flat = stack.reshape(-1)
    if flat.numel() > _MAX_STAT_SAMPLES:
        flat = flat[:: flat.numel() // _MAX_STAT_SAMPLES + 1]
    lo, hi = np.percentile(flat.numpy(), [LOW_PERCENTILE, HIGH_PERCENTILE])
    return float(lo), float(hi)


def _resize(batch: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Per-slice resize. Not MONAI's `Resize`: its anti-aliasing is a Gaussian pre-blur, which differs
    from the antialiased bilinear filter the models were trained with by up to 0.09 on [-1, 1]."""
    if tuple(batch.shape[-2:]) == tuple(size):
        return batch
    if mode == "nearest":
        return F.interpolate(batch, size=size, mode="nearest-exact")
    return F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=True)


def to_model_input(image: Image, size: int, channels: int, window: tuple[float, float] | None = None,
                   body_crop: bool = False) -> torch.Tensor:
    """`(N, C, size, size)` float32 in [-1, 1]; N = 1 for a 2D image, the canonical slices of a volume.

    Volumes come in canonical (LPS) orientation - see the module doc; N equals Z for the usual
    axial acquisitions.
    Intensities are scaled by the 0.5/99.5 percentiles of the whole image or volume (robust to
    hot pixels and metal), or by a CT window `(center, width)` in the image's units when given.
    Resizing uses antialiased bilinear interpolation, so downscaling does not alias fine texture.
    With `body_crop` and a `window`, the square body box (`body_box`) is cut out first.
    """
    if int(size) != size or size < 8:
        raise ValueError(f"model input size must be an integer >= 8, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
    stack = _slices(_oriented(image, dtype=np.float32))
    box = _box_from_stack(stack, size) if body_crop and window is not None else None
    if box is not None:
        stack = _crop(stack, box, AIR_HU)
    if stack.shape[1] != channels:  # grey <-> RGB
        stack = torch.einsum("c,nchw->nhw", _LUMA, stack)[:, None] if channels == 1 else stack.expand(-1, channels, -1,
                                                                                                      -1)
    lo, hi = _intensity_range(stack, window)
    if hi <= lo:  # a constant image maps to -1 everywhere
        return torch.full((stack.shape[0], channels, size, size), -1.0)
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True)(stack)
    return _resize(scaled.contiguous(), (size, size), "bilinear").clamp_(-1.0, 1.0).contiguous()


def to_original_grid(maps, image: Image, mode: str = "nearest", chunk: int = 32,
                     window: tuple[float, float] | None = None, body_crop: bool = False) -> np.ndarray:
    """Resize per-slice model outputs back to the image's grid and stack the slices.

    `maps` is `(N, H', W')` or `(N, K, H', W')` (tensor or array) with N = 1 for 2D, or the number
    of canonical (axial) slices for a volume - exactly what `to_model_input` produced.
    Returns `(H, W)` / `(Z, Y, X)`, or with K: `(K, H, W)` / `(K, Z, Y, X)` (channel first).
    "nearest" keeps label values (masks); "bilinear" is for probabilities and uncertainty maps.
    `window`/`body_crop` must be what `to_model_input` got: with a body box, outputs are pasted
    into a background canvas - 0 for `(N, H, W)` maps, class 0 = 1 and the rest 0 for `(N, K, H, W)`.
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
    template = _oriented(image, stand_in=True)  # (0, X, Y[, Z]) canonical, with the transform to invert
    slices = template.shape[3] if template.ndim == 4 else 1
    if tensor.shape[0] != slices:
        raise ValueError(f"maps hold {tensor.shape[0]} slices but the image has {slices}")
    target = (template.shape[2], template.shape[1])  # (H, W) of a canonical slice
    box = body_box(image, window, tensor.shape[-1], body_crop)
    pieces = []
    for start in range(0, tensor.shape[0], chunk):  # bounds memory for long volumes
        part = _resize(tensor[start : start + chunk].float(), (box[2],) * 2 if box else target, mode)
        part = part if tensor.dtype.is_floating_point else part.round().to(tensor.dtype)
        pieces.append(part if box is None else _paste(part, box, target, has_k))
    stack = torch.cat(pieces)  # (N, K, H, W), canonical orientation
    grid = stack.permute(1, 3, 2, 0) if template.ndim == 4 else stack[0].permute(0, 2, 1)  # (K, X, Y[, Z])
    if template.applied_operations:
        grid = Invert(TO_CANONICAL)(MetaTensor(grid, meta=template.meta,
                                               applied_operations=template.applied_operations))
        grid = grid.as_tensor()
    result = grid.permute(0, *range(grid.ndim - 1, 0, -1)).numpy()  # (K, [Z,] Y, X): the stored grid
    if not image.is_volume and result.ndim == 4:
        result = result[:, 0]
    return np.ascontiguousarray(result if has_k else result[0])


def _paste(part: torch.Tensor, box: tuple[int, int, int], target: tuple[int, int], classes: bool) -> torch.Tensor:
    """(n, K, side, side) outputs of the box placed into a background canvas (n, K, H, W)."""
    top, left, side = box
    canvas = torch.zeros(part.shape[:2] + tuple(target), dtype=part.dtype)
    if classes and part.shape[1] > 1:
        canvas[:, 0] = 1  # outside the box is background with certainty
    r0, c0 = max(top, 0), max(left, 0)
    r1, c1 = min(top + side, target[0]), min(left + side, target[1])
    canvas[..., r0:r1, c0:c1] = part[..., r0 - top : r1 - top, c0 - left : c1 - left]
    return canvas


def labels_to_model_grid(labels: np.ndarray, image: Image, size: int, window: tuple[float, float] | None = None,
                         body_crop: bool = False) -> torch.Tensor:
    """A class-index mask of `image` as the model sees it: `(1, size, size)` uint8 for a 2D image,
    `(N, 1, size, size)` for a volume's `(Z, Y, X)` labels (its canonical slices).

    Oriented, cropped and resized (nearest) exactly as `to_model_input` treats the image's pixels,
    so image and mask line up.
    """
    expected = tuple(image.array.shape) if image.is_volume else tuple(image.plane_shape)
    if tuple(labels.shape) != expected:
        raise ValueError(f"labels {labels.shape} do not match the image {expected}")
    as_image = Image(np.asarray(labels, dtype=np.float32), image.spacing, image.origin, image.direction,
                     image.is_volume)
    stack = _slices(_oriented(as_image))  # (N, 1, H, W)
    box = body_box(image, window, size, body_crop)
    if box is not None:
        stack = _crop(stack, box, 0.0)
    resized = _resize(stack.contiguous(), (size, size), "nearest").to(torch.uint8)
    return resized if image.is_volume else resized[0]


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

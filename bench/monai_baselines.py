"""The MONAI networks a MONAI Label user would train instead of FastTextDiff: baselines for the real-CT benchmark.

Why these networks: a radiology team that labels CT in MONAI Label trains the radiology sample app's
`segmentation` model - a 3D MONAI `UNet` (channels 16-32-64-128-256, strides 2, two residual units,
batch norm) in the app's original recipe, a `SegResNet` in later releases - on HU-windowed patches
(ScaleIntensityRange to [0, 1]), sampled around the labels (positive/negative-balanced crops), with
flips and an intensity shift, a Dice(CE) loss on softmax outputs, Adam(W), and sliding-window
inference. That is the supervised model FastTextDiff's report conditioning has to beat. A 2D
`UNet` on axial slices (MONAI Label's 2D / slice-wise variant, and what `bench/baselines.py` trains
on the 2D data sets) is the third: it is the natural baseline when only some slices are labeled.

What was shrunk for a 2-core CPU (the recipe is otherwise MONAI Label's):
- patch (32, 96, 96) by default, where MONAI Label crops 96^3-128^3 at 1-1.5 mm; the volumes keep
  their own spacing unless `spacing` is given (then they are resampled to the median spacing);
- 2 patches per step (MONAI Label: 4-8 samples per volume), one volume per step;
- a wall-clock budget (`budget_s`, default 2 minutes) and `max_steps` instead of hundreds of epochs;
  no validation split or checkpoint selection (the last weights are used);
- SegResNet with `init_filters=8` (MONAI Label: 32); the UNet keeps MONAI Label's widths
  (pass `channels=(8, 16, 32, 64, 128)` for a 4x cheaper one).

There is no text input: for a "named structure" task the caller trains the network multi-class
(one channel per structure) and reads that structure's label from the returned label map.

Everything is deterministic given `seed` (torch, numpy and MONAI's transform states are seeded) for a
given number of steps; with a time budget the number of steps depends on the machine's speed
(`BaselineResult.steps` records it; fix it with `max_steps` and a generous `budget_s`).

    res = train_unet3d(volumes, labels, num_classes=5, patch=(16, 64, 64), budget_s=90)
    label_map = res.predict(volume)         # (Z, Y, X) HU -> (Z, Y, X) ints
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import common  # noqa: F401  (lib/ on the path, process defaults)
from baselines import build_unet, n_params


@dataclass
class BaselineResult:
    """A trained baseline: `predict(volume)` maps a (Z, Y, X) HU volume to a (Z, Y, X) int label map."""

    name: str  # "monai_unet3d", "monai_segresnet3d", "monai_unet2d"
    predict: Callable[[np.ndarray], np.ndarray]
    seconds: float  # training wall time
    steps: int
    info: dict = field(default_factory=dict)  # network, parameters, patch, last loss, ...


# ------------------------------------------------------------------------------------------------
# Shared pieces
# ------------------------------------------------------------------------------------------------


def _seed_everything(seed: int) -> np.random.Generator:
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def _window(volume: np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """HU -> [0, 1] (clipped), float32 tensor of the same shape (ScaleIntensityRange, as MONAI Label)."""
    from monai.transforms import ScaleIntensityRange

    lo, hi = float(window[0]), float(window[1])
    scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(
        np.asarray(volume, dtype=np.float32))
    return _plain(scaled).float()


def _plain(x) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain torch tensor."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(np.asarray(x))


def _augmentations(keys: Sequence[str], spatial_dims: int, seed: int):
    """MONAI Label's training flips (each axis, p=0.1) and intensity shift (+-0.1, p=0.5)."""
    from monai.transforms import Compose, RandFlipd, RandShiftIntensityd

    aug = Compose([*(RandFlipd(keys=list(keys), spatial_axis=[axis], prob=0.1) for axis in range(spatial_dims)),
                   RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)])
    aug.set_random_state(seed=seed)
    return aug


def _label_dtype(num_classes: int):
    return np.uint8 if num_classes <= 256 else np.int32


def _check_pairs(volumes: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int) -> None:
    if not volumes or len(volumes) != len(labels):
        raise ValueError(f"need one label map per volume (got {len(volumes)} volumes, {len(labels)} labels)")
    for i, (v, lab) in enumerate(zip(volumes, labels)):
        if np.shape(v) != np.shape(lab) or np.ndim(v) != 3:
            raise ValueError(f"volume {i}: image {np.shape(v)} and label {np.shape(lab)} must be the same (Z, Y, X)")
        if lab.size and (int(np.max(lab)) >= num_classes or int(np.min(lab)) < 0):
            raise ValueError(f"volume {i}: labels must lie in [0, {num_classes - 1}] "
                             f"(found {int(np.min(lab))}..{int(np.max(lab))})")


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not sys.stderr.isatty(), leave=False)


def _fit(net, next_batch, lr: float, max_steps: int, budget_s: float, started: float, name: str,
         device) -> tuple[int, float]:
    """DiceCE + Adam on `next_batch()` samples until `max_steps` or `budget_s`: (steps, last loss)."""
    from monai.losses import DiceCELoss

    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    steps, loss = 0, float("nan")
    with _progress(max_steps, name) as bar:
        while steps < max_steps and time.perf_counter() - started < budget_s:
            samples = next_batch()
            x = torch.stack([_plain(s["image"]) for s in samples]).to(device)
            y = torch.stack([_plain(s["label"]) for s in samples]).to(device)
            out = loss_fn(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            out.backward()
            optimizer.step()
            steps += 1
            loss = float(out.detach())
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
    return steps, loss


def _resample(x: torch.Tensor, shape: Sequence[int], label: bool) -> torch.Tensor:
    """(C, *spatial) -> (C, *shape): trilinear for images/probabilities, nearest for labels."""
    if tuple(x.shape[1:]) == tuple(shape):
        return x
    if label:
        return F.interpolate(x[None].float(), size=tuple(shape), mode="nearest")[0].to(x.dtype)
    return F.interpolate(x[None], size=tuple(shape), mode="trilinear", align_corners=False)[0]


# ------------------------------------------------------------------------------------------------
# 3D: MONAI Label radiology's segmentation recipe
# ------------------------------------------------------------------------------------------------


def build_network3d(network: str, num_classes: int, channels: Sequence[int] | None = None,
                    init_filters: int = 8) -> tuple[torch.nn.Module, int]:
    """The 3D network and the factor each patch side must be divisible by."""
    if network == "unet":
        from monai.networks.nets import UNet

        channels = tuple(int(c) for c in (channels or (16, 32, 64, 128, 256)))
        net = UNet(spatial_dims=3, in_channels=1, out_channels=num_classes, channels=channels,
                   strides=(2,) * (len(channels) - 1), num_res_units=2, norm="batch")
        return net, 2 ** (len(channels) - 1)
    if network == "segresnet":
        from monai.networks.nets import SegResNet

        net = SegResNet(spatial_dims=3, in_channels=1, out_channels=num_classes, init_filters=int(init_filters),
                        blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), dropout_prob=0.2)
        return net, 8
    raise ValueError(f"network must be 'unet' or 'segresnet', not {network!r}")


def _target_spacing(spacing: Sequence[Sequence[float]] | None, n: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    if len(spacing) != n:
        raise ValueError(f"need one spacing per volume (got {len(spacing)} for {n} volumes)")
    return tuple(float(s) for s in np.median(np.asarray(spacing, dtype=np.float64), axis=0))


def _grid_shape(shape: Sequence[int], spacing: Sequence[float] | None, target: Sequence[float] | None):
    if spacing is None or target is None:
        return tuple(int(s) for s in shape)
    return tuple(max(1, int(round(n * float(s) / t))) for n, s, t in zip(shape, spacing, target))


def train_unet3d(volumes: list[np.ndarray], labels: list[np.ndarray], num_classes: int, *,
                 spacing: list[tuple] | None = None, window: tuple[float, float] = (-160, 240),
                 patch: tuple[int, int, int] = (32, 96, 96), budget_s: float = 120, max_steps: int = 2000,
                 seed: int = 0, network: str = "unet", batch_size: int = 2, lr: float = 1e-3,
                 channels: Sequence[int] | None = None, init_filters: int = 8,
                 device: str | torch.device = "cpu") -> BaselineResult:
    """Train MONAI Label's 3D segmentation network on (Z, Y, X) HU volumes and int label maps.

    Each step: one volume (drawn with the seeded generator), `batch_size` patches cropped by
    `RandCropByPosNegLabeld` (pos:neg = 1:1, foreground = any label > 0; volumes smaller than the
    patch are zero-padded to it first), flips and intensity shift, DiceCE (to_onehot_y, softmax), Adam.
    Stops after `budget_s` seconds or `max_steps` steps. `spacing` (one (z, y, x) mm tuple per volume):
    resample everything to the median spacing; `predict(volume, spacing=None)` then takes the volume's
    spacing too (None: it is assumed to be at that spacing already) and returns the original grid.
    `network`: "unet" (channels 16..256 unless `channels`) or "segresnet" (`init_filters`).
    """
    from monai.inferers import sliding_window_inference
    from monai.transforms import RandCropByPosNegLabeld, SpatialPad
    from monai.transforms.utils import map_binary_to_indices

    _check_pairs(volumes, labels, num_classes)
    started = time.perf_counter()
    rng = _seed_everything(seed)
    device = torch.device(device)
    net, factor = build_network3d(network, num_classes, channels, init_filters)
    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p % factor for p in patch):
        raise ValueError(f"patch {patch}: each side must be a multiple of {factor} for {network}")
    target = _target_spacing(spacing, len(volumes))

    pad = SpatialPad(spatial_size=patch)
    items = []
    for i, (vol, lab) in enumerate(zip(volumes, labels)):
        shape = _grid_shape(vol.shape, spacing[i] if spacing else None, target)
        image = pad(_resample(_window(vol, window)[None], shape, label=False))
        label = pad(_resample(torch.as_tensor(np.asarray(lab, dtype=np.int64))[None], shape, label=True))
        image, label = _plain(image), _plain(label)
        fg, bg = map_binary_to_indices(label > 0)
        items.append({"image": image, "label": label, "fg": fg, "bg": bg})
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=patch, pos=1, neg=1,
                                  num_samples=batch_size, fg_indices_key="fg", bg_indices_key="bg",
                                  allow_smaller=True)
    crop.set_random_state(seed=seed)
    aug = _augmentations(["image", "label"], 3, seed + 1)

    net.to(device).train()
    name = f"monai_{network}3d"

    def batch():
        return [aug(s) for s in crop(items[int(rng.integers(len(items)))])]

    steps, loss = _fit(net, batch, lr, max_steps, budget_s, started, name, device)
    seconds = time.perf_counter() - started
    net.eval()

    @torch.inference_mode()
    def predict(volume: np.ndarray, spacing: tuple | None = None) -> np.ndarray:
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
        shape = _grid_shape(volume.shape, spacing if target is not None else None, target)
        image = _resample(_window(volume, window)[None], shape, label=False)[None].to(device)
        probs = sliding_window_inference(image, roi_size=patch, sw_batch_size=batch_size, predictor=net,
                                         overlap=0.25)
        probs = _plain(probs)[0].float().softmax(0).cpu()
        probs = _resample(probs, volume.shape, label=False)
        return probs.argmax(0).numpy().astype(_label_dtype(num_classes))

    info = {"network": network, "parameters": n_params(net), "patch": list(patch), "batch_size": batch_size,
            "lr": lr, "window": list(window), "target_spacing": list(target) if target else None,
            "loss_last": loss, "volumes": len(volumes), "device": str(device)}
    return BaselineResult(name=name, predict=predict, seconds=seconds, steps=steps, info=info)


# ------------------------------------------------------------------------------------------------
# 2D: a MONAI UNet on axial slices
# ------------------------------------------------------------------------------------------------


def _resize2d(x: torch.Tensor, size: Sequence[int], label: bool) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, *size): bilinear for images/probabilities, nearest for labels."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if label:
        return F.interpolate(x.float(), size=tuple(size), mode="nearest").to(x.dtype)
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def train_unet2d(volumes: list[np.ndarray], labels: list[np.ndarray], num_classes: int, *,
                 window: tuple[float, float] = (-160, 240), size: int = 128, budget_s: float = 120,
                 max_steps: int = 4000, seed: int = 0, labeled_slices: list[np.ndarray] | None = None,
                 batch_size: int = 8, lr: float = 1e-3, widths: Sequence[int] = (16, 32, 64, 128),
                 device: str | torch.device = "cpu") -> BaselineResult:
    """Train a 2D MONAI UNet on the axial slices, each resized to `size` x `size` (plain resize).

    The network is `bench/baselines.build_unet` (the project's 2D baseline: channels `widths` + one
    deeper level, strides 2, two residual units). Each step draws `batch_size` slices, half of them
    from slices with any label > 0 (when both kinds exist), with flips and intensity shift;
    DiceCE (to_onehot_y, softmax), Adam. `labeled_slices` (one bool array over Z per volume) restricts
    training to those slices. `predict` runs every slice, resizes the softmax back bilinearly and
    returns the argmax on the volume's own (Z, Y, X) grid.
    """

    _check_pairs(volumes, labels, num_classes)
    if labeled_slices is not None and len(labeled_slices) != len(volumes):
        raise ValueError(f"need one labeled_slices mask per volume (got {len(labeled_slices)} for {len(volumes)})")
    started = time.perf_counter()
    rng = _seed_everything(seed)
    device = torch.device(device)
    hw = (int(size), int(size))
    factor = 2 ** len(widths)
    if any(s % factor for s in hw):
        raise ValueError(f"size {size} must be a multiple of {factor} for widths {tuple(widths)}")

    images, targets = [], []
    for i, (vol, lab) in enumerate(zip(volumes, labels)):
        keep = np.ones(vol.shape[0], bool) if labeled_slices is None else np.asarray(labeled_slices[i], bool)
        if keep.shape != (vol.shape[0],):
            raise ValueError(f"labeled_slices[{i}] has shape {keep.shape}, volume {i} has {vol.shape[0]} slices")
        if not keep.any():
            continue
        images.append(_resize2d(_window(vol[keep], window)[:, None], hw, label=False))
        targets.append(_resize2d(torch.as_tensor(np.asarray(lab[keep], dtype=np.int64))[:, None], hw, label=True))
    if not images:
        raise ValueError("no labeled slice to train on")
    images, targets = torch.cat(images), torch.cat(targets)
    positive = (targets.flatten(1) > 0).any(1).numpy()
    pos_ids, neg_ids = np.flatnonzero(positive), np.flatnonzero(~positive)
    aug = _augmentations(["image", "label"], 2, seed + 1)

    net = build_unet(widths, in_channels=1, num_classes=num_classes).to(device).train()

    def batch():
        if len(pos_ids) and len(neg_ids):  # half of each batch from slices with labels
            n_pos = (batch_size + 1) // 2
            ids = np.concatenate([rng.choice(pos_ids, n_pos), rng.choice(neg_ids, batch_size - n_pos)])
        else:
            ids = rng.integers(len(images), size=batch_size)
        return [aug({"image": images[j], "label": targets[j]}) for j in ids]

    steps, loss = _fit(net, batch, lr, max_steps, budget_s, started, "monai_unet2d", device)
    seconds = time.perf_counter() - started
    net.eval()

    @torch.inference_mode()
    def predict(volume: np.ndarray, chunk: int = 16) -> np.ndarray:
        volume = np.asarray(volume)
        if volume.ndim != 3:
            raise ValueError(f"expected a (Z, Y, X) volume, got shape {volume.shape}")
        out = np.zeros(volume.shape, dtype=_label_dtype(num_classes))
        for z in range(0, volume.shape[0], chunk):
            x = _resize2d(_window(volume[z:z + chunk], window)[:, None], hw, label=False).to(device)
            probs = net(x).float().softmax(1).cpu()
            out[z:z + chunk] = _resize2d(probs, volume.shape[1:], label=False).argmax(1).numpy()
        return out

    info = {"network": "unet2d", "parameters": n_params(net), "size": int(size), "batch_size": batch_size,
            "lr": lr, "window": list(window), "loss_last": loss, "slices": int(len(images)),
            "positive_slices": int(len(pos_ids)), "device": str(device)}
    return BaselineResult(name="monai_unet2d", predict=predict, seconds=seconds, steps=steps, info=info)


__all__ = ["BaselineResult", "train_unet3d", "train_unet2d", "build_network3d"]

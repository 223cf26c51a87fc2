"""A torch Dataset of (image, label, report) for training and evaluating the segmenter.

Why it caches: the training sets are small and an epoch touches every image, so decoding and
resizing PNGs each step would dominate a CPU run. Each sample is read and preprocessed once
(through `io` and `preprocess`, exactly as inference does), then only augmented. Augmentation
uses MONAI dictionary transforms so the image and its mask always move together, and it is
seeded per (seed, epoch, index, draw) - and, inside DataLoader workers, by the worker's torch seed,
which the loader's generator makes reproducible - so a seeded run repeats exactly.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from fasttextdiff.data.io import Image, is_volume_path, read_image
from fasttextdiff.data.lvit import Sample
from fasttextdiff.data.preprocess import canonical_array, labels_to_model_grid, mask_to_labels, to_model_input
from fasttextdiff.utils.errors import ImageReadError

logger = logging.getLogger(__name__)


def select_labeled(samples: Sequence[Sample], labeled: float | int | None, seed: int = 0) -> list[Sample]:
    """The `--labeled` subset: N images (N >= 1) or a fraction 0 < f < 1 of them, chosen by seed.

    The choice is a prefix of one seeded permutation, so with the same seed a larger budget
    contains every image of a smaller one (label-efficiency curves compare nested subsets).
    The chosen samples keep their original order. `None` keeps all.
    """
    samples = list(samples)
    if labeled is None:
        return samples
    if isinstance(labeled, bool) or not isinstance(labeled,
                                                   (int, float)) or not math.isfinite(labeled) or labeled <= 0:
        raise ValueError(f"labeled must be a count >= 1 or a fraction in (0, 1), got {labeled!r}")
    if labeled < 1:
        count = max(1, int(round(labeled * len(samples))))
    else:
        if labeled != int(labeled):
            raise ValueError(f"labeled above 1 is a count of images and must be whole, got {labeled}")
        count = int(labeled)
    if count > len(samples):
        raise ValueError(f"asked for {count} labeled images but the split has only {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))[:count]
    return [samples[i] for i in sorted(order.tolist())]


def volume_training_slices(mask: Image, background_every: int = 4) -> tuple[int, ...]:
    """The slices a labeled volume (its read mask) trains on, in canonical order (as `SegmentationDataset` and
    inference slice it): every slice with foreground and every n-th empty one (empty slices teach "nothing
    here" without drowning the lesion slices)."""
    labels = canonical_array(mask)
    keep, empty_seen = [], 0
    for z in range(labels.shape[0]):
        if labels[z].any():
            keep.append(z)
            continue
        empty_seen += 1
        if empty_seen % background_every == 0:
            keep.append(z)
    return tuple(keep)


def _augmentation(rotate_degrees: float):
    from monai.transforms import Compose, RandFlipd, RandRotate90d, RandRotated

    keys = ("image", "label")
    steps = [
        RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(0, 1)),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
    ]
    if rotate_degrees > 0:
        steps.append(
            RandRotated(
                keys=keys,
                range_x=math.radians(rotate_degrees),
                prob=0.5,
                keep_size=True,
                mode=("bilinear", "nearest"),
                padding_mode=("border", "zeros"),  # extend the image, pad the mask with background
            )
        )
    return Compose(steps)


def _plain(tensor) -> torch.Tensor:
    """MONAI returns MetaTensors; the model and collate want plain tensors."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else torch.as_tensor(tensor)


class SegmentationDataset(Dataset):
    """Items `{"image": (C,H,W) float32 in [-1,1], "label": (1,H,W) int64, "text": str, "name": str}`."""

    def __init__(
        self,
        samples: Sequence[Sample],
        size: int,
        channels: int,
        num_classes: int = 2,
        augment: bool = False,
        rotate_degrees: float = 20.0,
        seed: int = 0,
        window: tuple[float, float] | None = None,
        preload: bool = True,
        body_crop: bool = False,
    ) -> None:
        if int(size) != size or size < 8:
            raise ValueError(f"size must be an integer >= 8, got {size}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if num_classes < 2:
            raise ValueError("num_classes counts the background too and must be >= 2")
        if rotate_degrees < 0 or rotate_degrees > 180:
            raise ValueError(f"rotate_degrees must be in [0, 180], got {rotate_degrees}")
        self.samples = list(samples)
        unlabeled = [s.name for s in self.samples if s.mask is None]
        if unlabeled:
            raise ValueError(
                f"{len(unlabeled)} sample(s) have no mask (e.g. {unlabeled[0]}); a segmentation dataset needs masks"
            )
        self.size, self.channels, self.num_classes = int(size), channels, num_classes
        self.augment, self.seed, self.window, self.body_crop = augment, seed, window, body_crop
        self.epoch = 0
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._draws: Counter[int] = Counter()
        self._transform = _augmentation(rotate_degrees) if augment else None
        self._items: list[tuple[int, int | None]] = []  # (sample, canonical slice of a volume or None)
        for i, sample in enumerate(self.samples):
            if is_volume_path(sample.image):  # read now: its slice count is the length (a 2D NIfTI gives [None])
                self._items += [(i, z) for z in self._load_volume(i)]
            else:
                self._items.append((i, None))
        if preload:  # before DataLoader workers fork, so they share one cache instead of re-reading
            self.preload()

    def __len__(self) -> int:
        return len(self._items)

    def _load_volume(self, index: int) -> list[int | None]:
        """Every kept slice of a volume into the cache, preprocessed as inference preprocesses the whole
        volume (orientation, one intensity scaling and one body box for all slices), so training sees the
        slices exactly as served; slices cut out one by one would each get their own box and statistics."""
        sample = self.samples[index]
        image = read_image(sample.image)
        if not image.is_volume:
            return [None]  # a 2D image in a volume format: read as any 2D image
        labels = mask_to_labels(read_image(sample.mask).array, self.num_classes)
        if labels.shape != image.array.shape:
            raise ImageReadError(f"mask {sample.mask} is {labels.shape} but its volume {sample.image} is "
                                 f"{image.array.shape}.")
        pixels = to_model_input(image, self.size, self.channels, self.window, self.body_crop)
        grid = labels_to_model_grid(labels, image, self.size, self.window, self.body_crop)
        chosen = range(pixels.shape[0]) if sample.slices is None else sample.slices
        kept = []
        for z in chosen:
            if not 0 <= z < pixels.shape[0]:
                raise ImageReadError(f"{sample.name}: slice {z} is outside the volume's {pixels.shape[0]} slices")
            self._cache[(index, z)] = (pixels[z].to(torch.float16), grid[z])
            kept.append(int(z))
        return kept

    def set_epoch(self, epoch: int) -> None:
        """Call once per epoch so augmentation differs between epochs (also with fresh workers)."""
        self.epoch = int(epoch)

    def preload(self) -> "SegmentationDataset":
        """Read every sample now (surfaces bad files before training starts)."""
        for index in range(len(self)):
            self._load(index)
        return self

    def _load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = self._items[index]
        if key not in self._cache:  # a 2D image (volumes are cached when the dataset is built)
            sample = self.samples[key[0]]
            image = read_image(sample.image)
            if image.is_volume:
                raise ImageReadError(f"{sample.image} is a volume but its name does not say so; "
                                     "store volumes as NIfTI, NRRD, MHA or a DICOM series")
            mask = read_image(sample.mask)
            labels = mask_to_labels(mask.array, self.num_classes)
            if labels.shape != image.plane_shape:
                raise ImageReadError(
                    f"mask {sample.mask} is {labels.shape} but its image {sample.image} is {image.plane_shape}."
                )
            pixels = to_model_input(image, self.size, self.channels, self.window, self.body_crop)[0]
            label = labels_to_model_grid(
                labels, image, self.size, self.window, self.body_crop
            )  # same crop and orientation
            self._cache[key] = (pixels.to(torch.float16), label)  # half the memory; [-1,1] is safe in fp16
        return self._cache[key]

    def __getitem__(self, index: int) -> dict:
        pixels, label = self._load(index)
        item = {"image": pixels.float(), "label": label.long()}
        if self._transform is not None:
            draw = self._draws[index]
            self._draws[index] += 1
            worker = get_worker_info()  # fresh workers each epoch: torch gives them a new, seeded base seed
            worker_seed = int(torch.initial_seed()) % 2**63 if worker is not None else 0
            state = np.random.SeedSequence([self.seed, self.epoch, index, draw, worker_seed]).generate_state(1)[0]
            self._transform.set_random_state(seed=int(state))
            out = self._transform({"image": item["image"], "label": item["label"].float()})
            item = {"image": _plain(out["image"]).float().clamp(-1, 1), "label": _plain(out["label"]).round().long()}
        sample_index, z = self._items[index]
        sample = self.samples[sample_index]
        return {
            "image": item["image"].contiguous(),
            "label": item["label"].contiguous(),
            "text": sample.text,
            "name": sample.name if z is None else f"{sample.name}[z={z}]",
        }

"""High-level workflows shared by the command line, the benchmarks and the MONAI Label app.

Each function is one step a user names: pretrain the backbone on unlabeled files, train the
segmenter on an LViT-layout dataset, and so on. They compose the library's parts and own no maths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbone import pretrain_backbone
from .config import BackboneConfig
from .data.io import read_image, supported_extensions
from .data.lvit import Sample, load_split
from .data.preprocess import to_model_input
from .errors import FastTextDiffError, ImageReadError

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


def find_image_files(roots: Iterable[str | Path]) -> list[Path]:
    """Image files under folders (recursively) or given directly; DICOM series folders count once."""
    exts = tuple(supported_extensions())
    found: list[Path] = []
    for root in map(Path, roots):
        if root.is_file():
            found.append(root)
            continue
        if not root.is_dir():
            raise ImageReadError(f"{root} does not exist")
        for path in sorted(root.rglob("*")):
            name = path.name.lower()
            if path.is_file() and name.endswith(exts) and not name.startswith(".") and "labelcol" not in path.parts \
                    and "labels" not in path.parts:
                found.append(path)
    return found


def unlabeled_tensor(paths: Sequence[Path], config: BackboneConfig, progress: bool = True,
                     max_slices_per_volume: int | None = 64) -> torch.Tensor:
    """All images (and volume slices) preprocessed as the backbone will see them: (N, C, S, S).

    Unreadable files are skipped with a warning: one bad file in a large unlabeled folder should
    not stop pretraining.
    """
    chunks = []
    for path in tqdm(paths, desc="load images", disable=not progress):
        try:
            x = to_model_input(read_image(path), config.image_size, config.in_channels, window=config.window)
        except FastTextDiffError as exc:
            log.warning("skipping %s: %s", path, exc)
            continue
        if max_slices_per_volume and x.shape[0] > max_slices_per_volume:
            idx = torch.linspace(0, x.shape[0] - 1, max_slices_per_volume).round().long()
            x = x[idx]
        chunks.append(x)
    if not chunks:
        raise ImageReadError("no readable images to pretrain the backbone on")
    return torch.cat(chunks)


def lvit_image_paths(root: str | Path) -> list[Path]:
    """Every image of every split (labels unused): the unlabeled pool for pretraining."""
    paths: list[Path] = []
    for split in SPLITS:
        try:
            paths += [s.image for s in load_split(root, split)]
        except FastTextDiffError:
            continue
    if not paths:
        raise ImageReadError(f"{root} has no Train_Folder/Val_Folder/Test_Folder images")
    return paths


def pretrain_backbone_on_files(paths: Sequence[Path], config: BackboneConfig, out_dir: str | Path, *,
                               epochs: int = 20, batch_size: int = 16, lr: float = 2e-4, seed: int = 0,
                               max_steps: int | None = None, device=None, progress: bool = True,
                               log_fn: Callable[[dict], None] | None = None, stop_event=None,
                               resume: bool = True) -> dict:
    images = unlabeled_tensor(paths, config, progress=progress)
    log.info("pretraining the diffusion backbone on %d unlabeled images/slices", images.shape[0])
    return pretrain_backbone(images, config, out_dir, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                             max_steps=max_steps, device=device, progress=progress, log=log_fn,
                             stop_event=stop_event, resume=resume)


def load_lvit(root: str | Path) -> dict[str, list[Sample]]:
    """Splits that exist in an LViT-layout root; at least Train_Folder must."""
    splits: dict[str, list[Sample]] = {}
    for split in SPLITS:
        try:
            splits[split] = load_split(root, split)
        except FastTextDiffError:
            if split == "train":
                raise
    return splits


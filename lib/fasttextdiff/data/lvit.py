"""Load datasets in the LViT layout (QaTa-COV19, MosMedData+, MoNuSeg as LViT/TextDiff ship them).

Layout::

    <root>/Train_Folder/img/<name>            <root>/Train_Folder/labelcol/<name> or mask_<name>
    <root>/Train_text.xlsx (or .csv)          columns Image, Description
    ... the same for Val_Folder/Val_text and Test_Folder/Test_text

Why tolerant matching: the published copies disagree on details (QaTa masks carry a `mask_`
prefix, MoNuSeg masks may be .png beside .jpg images, text tables name the image or the mask,
and some copies keep the tables inside the split folder). A sample only needs its image, its
mask and its sentence; this module finds them and says precisely which file is missing otherwise.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fasttextdiff.utils.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

SPLIT_FOLDERS = {"train": "Train_Folder", "val": "Val_Folder", "test": "Test_Folder"}
IMAGE_DIR, MASK_DIR = "img", "labelcol"
MASK_PREFIX = "mask_"
TABLE_SUFFIXES = (".xlsx", ".xls", ".csv")
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".gz", ".nrrd", ".mha")


@dataclass
class Sample:
    """One training/evaluation case: file paths plus its report sentence.

    A volume trains on its slices as inference sees them (`SegmentationDataset`): `slices` picks
    canonical slice indices (`dataset.volume_training_slices`); None takes every slice. Evaluation
    always scores the whole volume."""

    image: Path
    mask: Path | None
    text: str
    name: str
    slices: tuple[int, ...] | None = None


def split_folder_name(split: str) -> str:
    """'train'/'Train'/'Train_Folder' -> 'Train_Folder' (and likewise for val/test)."""
    key = str(split).strip().lower().removesuffix("_folder")
    key = {"validation": "val", "valid": "val"}.get(key, key)
    if key not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of train, val, test (or Train_Folder ...), got {split!r}")
    return SPLIT_FOLDERS[key]


def _name_key(name: str) -> str:
    """Match key for a file name: no folder, no extension(s), no `mask_` prefix."""
    base = Path(str(name).strip()).name
    for ext in (".nii.gz",) + _IMAGE_EXTENSIONS:
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    return base[len(MASK_PREFIX):] if base.startswith(MASK_PREFIX) else base


def read_text_table(path: str | os.PathLike) -> dict[str, str]:
    """`{Image: Description}` from an LViT text table (.xlsx via openpyxl, or .csv).

    Column names are matched case-insensitively; empty descriptions become "".
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise DatasetLayoutError(f"text table {path} does not exist.")
    try:
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_excel(path, dtype=str, keep_default_na=False)
    except Exception as exc:  # openpyxl/pandas raise many types for damaged files
        raise DatasetLayoutError(f"text table {path} cannot be read ({exc}).") from exc
    columns = {str(c).strip().lower(): c for c in frame.columns}
    missing = [c for c in ("image", "description") if c not in columns]
    if missing:
        raise DatasetLayoutError(f"text table {path} lacks the column(s) {missing}; it has {list(frame.columns)}.")
    table: dict[str, str] = {}
    for image, text in zip(frame[columns["image"]], frame[columns["description"]]):
        image = str(image).strip()
        if image:
            table[image] = " ".join(str(text).split())  # one line, single spaces
    return table


def find_text_table(root: Path, split_folder: str) -> Path:
    """`<root>/Train_text.xlsx`, or .csv, or the same inside the split folder."""
    stem = split_folder.split("_")[0] + "_text"
    candidates = [folder / (stem + suffix) for folder in (root, root / split_folder) for suffix in TABLE_SUFFIXES]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DatasetLayoutError(f"text table {root / (stem + '.xlsx')} (or .csv) does not exist.")


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def load_split(root: str | os.PathLike, split: str, require_masks: bool = True,
               require_text: bool = True) -> list[Sample]:
    """Samples of one split, sorted by name.

    A missing mask raises (name and expected path in the message) unless `require_masks=False`,
    which gives `mask=None` (unlabeled images). An image without a text row gets "" and a warning.
    `require_text=False` accepts a split that has no text table at all (image-only datasets).
    """
    root = Path(root)
    folder_name = split_folder_name(split)
    split_dir = root / folder_name
    image_dir, mask_dir = split_dir / IMAGE_DIR, split_dir / MASK_DIR
    if not root.is_dir():
        raise DatasetLayoutError(f"dataset folder {root} does not exist.")
    if not image_dir.is_dir():
        raise DatasetLayoutError(f"image folder {image_dir} does not exist.")
    if require_masks and not mask_dir.is_dir():
        raise DatasetLayoutError(f"mask folder {mask_dir} does not exist.")
    try:
        table = read_text_table(find_text_table(root, folder_name))
    except DatasetLayoutError:
        if require_text:
            raise
        table = {}
    texts = {_name_key(k): v for k, v in table.items()}
    masks = {_name_key(p.name): p for p in _files(mask_dir)} if mask_dir.is_dir() else {}
    images = _files(image_dir)
    if not images:
        raise DatasetLayoutError(f"image folder {image_dir} contains no images.")
    samples, without_text = [], []
    for image in images:
        key = _name_key(image.name)
        mask = masks.get(key)
        if mask is None and require_masks:
            raise DatasetLayoutError(
                f"mask for {image.name} is missing: expected {mask_dir / image.name} or "
                f"{mask_dir / (MASK_PREFIX + image.name)}."
            )
        text = texts.get(key)
        if text is None:
            without_text.append(image.name)
            text = ""
        samples.append(Sample(image=image, mask=mask, text=text, name=image.name))
    if without_text and (table or require_text):
        logger.warning(
            "%d image(s) in %s have no row in the text table and get an empty report, e.g. %s",
            len(without_text),
            image_dir,
            without_text[0],
        )
    return samples

"""`fasttextdiff import-studies SRC --out STUDIES`: bring a user's images, reports and masks into a
MONAI Label studies folder the server reads as it is.

Sources:
  (a) an LViT-layout dataset (Train_Folder/Val_Folder/Test_Folder with img/, labelcol/ and the text
      tables): every image, its mask as a final label, its report from the table;
  (b) a folder of images, volumes or DICOM series folders, each with an optional `<name>.txt` report
      and an optional mask: `<name>` + `_label`, `_labels`, `_mask`, `_seg` or `_segmentation` (or `-label`,
      ...) beside the image, whose own name may end in `_image`, `-image`, `_img` (stripped: the id is
      `<name>`); or the same name in a `labels/`, `masks/`, `segmentations/` or `labelcol/` subfolder; or the
      Medical Segmentation Decathlon / nnU-Net layout (`imagesTr/` + `labelsTr/`, `imagesTs/`; nnU-Net's
      `<name>_0000` channel suffix is stripped, other channels are skipped). Every file not used is
      reported with the reason (a mask with no image of its name included), and mask-like files of
      which none became a label give a warning;
  (c) a CSV or XLSX table with an image path column, a report column and an optional label column
      (paths relative to the table).

Written: `STUDIES/<id>.<ext>` (a DICOM series or a format the datastore does not list becomes
`<id>.nii.gz`), `STUDIES/<id>.txt` (the report; the server reads it into the image info on start)
and `STUDIES/labels/final/<id>.<ext>` (the mask). Every image and mask is read first; what cannot
be used is skipped with the reason, never half-written. Ids already in the studies folder (an
image, a report, or a label under any tag, compared case-insensitively as macOS and Windows would)
are skipped, so an import can be repeated to add new cases and never replaces a person's files.
"""

from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# what the server's datastore lists (monailabel_app/lib/datastore.py IMAGE_EXTENSIONS)
STUDIES_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
# `<name>_label.*` beside `<name>.*` (or `<name>_image.*`): `_` or `-`, longest first
MASK_SUFFIXES = tuple(sep + word for word in ("segmentation", "labels", "label", "mask", "seg") for sep in "_-")
IMAGE_SUFFIXES = ("_image", "-image", "_img", "-img")  # an image's role in its name, stripped to pair and name it
# folders of masks named like their images (lower case; `labelsTr`: Medical Segmentation Decathlon / nnU-Net)
MASK_FOLDERS = ("masks", "labels", "labelcol", "mask", "label", "segmentations", "segmentation", "labelstr",
                "labelsts")
IMAGE_FOLDERS = ("imagestr", "imagests", "images", "img", "imgs")  # folders of images (lower case)
NNUNET_CHANNEL = re.compile(r"^(.+)_(\d{4})$")  # nnU-Net's `<case>_0000` (channel 0 of the case)
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename")
REPORT_COLUMNS = ("report", "text", "description", "findings")
LABEL_COLUMNS = ("label", "mask", "label_path", "mask_path", "segmentation")


@dataclass
class Case:
    source: Path  # file or DICOM series folder
    report: str | None
    mask: Path | None
    name: str


def _extension(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _stem(path: Path) -> str:
    ext = _extension(path)
    return path.name[: -len(ext)] if ext and path.is_file() else path.name


def safe_id(name: str) -> str:
    """An image id the server accepts: letters, digits, `._-`; other characters become `_`."""
    text = re.sub(r"[^A-Za-z0-9._-]", "_", name).strip("._-")
    return text[:120] or "image"


def _is_dicom_series(folder: Path) -> bool:
    from fasttextdiff.data.io import DICOM_EXTENSIONS

    return folder.is_dir() and any(p.is_file() and _extension(p) in DICOM_EXTENSIONS for p in folder.iterdir())


def _read_report(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"report {path.name} is not UTF-8 text ({exc.reason})") from None


# ------------------------------------------------------------------------------------------ sources
def lvit_cases(root: Path) -> list[Case]:
    from fasttextdiff.data.lvit import load_split
    from fasttextdiff.utils.errors import FastTextDiffError

    cases = []
    for split in ("train", "val", "test"):
        try:
            samples = load_split(root, split, require_masks=False, require_text=False)
        except FastTextDiffError:
            continue
        cases += [Case(s.image, s.text, s.mask, _stem(s.image)) for s in samples]
    return cases


def _strip(stem: str, suffixes: tuple[str, ...]) -> str | None:
    """`stem` without the first of `suffixes` it ends with (any case), or None."""
    for suffix in suffixes:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return None


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


@dataclass
class FolderScan:
    """What a folder import found besides its cases: files not used (with the reason) and how many files
    looked like masks (by name or folder), for the summary's warning when none of them became a label."""

    skipped: list[dict]
    mask_like: int = 0


def _image_key(path: Path, in_image_folder: bool) -> tuple[str, str | None]:
    """(case name, nnU-Net channel or None) of an image file: `<name>_image`/`-image`/`_img`/`-img` loses the
    suffix; in `imagesTr/`/`imagesTs/` nnU-Net's `<name>_0000` loses its channel."""
    stem = _stem(path)
    if in_image_folder:
        match = NNUNET_CHANNEL.match(stem)
        if match:
            return match.group(1), match.group(2)
    return _strip(stem, IMAGE_SUFFIXES) or stem, None


def folder_cases(root: Path, skipped: list[dict], scan: FolderScan | None = None) -> list[Case]:
    """The cases of a folder of images; every file it does not use goes to `skipped` with the reason.

    Images: the folder's own files and DICOM series folders, and the files of `imagesTr/`, `imagesTs/`,
    `images/` (Medical Segmentation Decathlon, nnU-Net and similar layouts). Masks: `<name>` + one of
    MASK_SUFFIXES beside the image, or a file named like the image in a MASK_FOLDERS folder (`labels/`,
    `masks/`, `segmentations/`, `labelsTr/`, ...). An image `<name>_image.*` (`-image`, `_img`) pairs with
    `<name>_label.*` and is imported as `<name>`; nnU-Net's `<name>_0000.*` pairs with `labelsTr/<name>.*`."""
    from fasttextdiff.data.io import supported_extensions

    scan = scan if scan is not None else FolderScan(skipped)
    exts = tuple(supported_extensions())

    def skip(path: Path, reason: str) -> None:
        skipped.append({"source": _relative(path, root), "reason": reason})

    def is_image_file(path: Path) -> bool:
        return path.is_file() and path.name.lower().endswith(exts)

    def hidden(path: Path) -> bool:
        if path.name.startswith("."):
            skip(path, "a hidden file or folder (its name starts with '.'); not read")
            return True
        return False

    image_folders = [root / f for f in sorted(p.name for p in root.iterdir() if p.is_dir())
                     if f.lower() in IMAGE_FOLDERS]
    mask_folders = [root / f for f in sorted(p.name for p in root.iterdir() if p.is_dir())
                    if f.lower() in MASK_FOLDERS]
    # ---- masks: key (lower case) -> path, first come first served
    masks: dict[str, Path] = {}
    extra_masks: list[tuple[Path, str]] = []

    def add_mask(key: str, path: Path) -> None:
        scan.mask_like += 1
        if key.lower() in masks:
            extra_masks.append((path, key))
        else:
            masks[key.lower()] = path

    for folder in mask_folders:
        for path in sorted(folder.iterdir()):
            if hidden(path):
                continue
            if not is_image_file(path):
                what = "a folder" if path.is_dir() else (_extension(path) or "no extension")
                skip(path, f"in the mask folder {folder.name}/ but not an image format the reader knows ({what})")
                continue
            add_mask(_strip(_stem(path), MASK_SUFFIXES) or _stem(path), path)
    entries = sorted(root.iterdir())
    for path in entries:
        if is_image_file(path) and not path.name.startswith("."):
            key = _strip(_stem(path), MASK_SUFFIXES)
            if key is not None:
                add_mask(key, path)
    mask_files = set(masks.values()) | {p for p, _ in extra_masks}
    # ---- images
    cases: list[Case] = []
    by_id: dict[str, Case] = {}
    channels: list[tuple[Path, str, str]] = []

    def add_case(path: Path, name: str) -> None:
        if name.lower() in by_id:
            skip(path, f"another image of the source is imported as {name!r} "
                       f"({_relative(by_id[name.lower()].source, root)}); one id holds one image")
            return
        case = Case(path, None, None, name)
        by_id[name.lower()] = case
        cases.append(case)

    for path in entries:
        if hidden(path) or path in mask_files or path in image_folders or path in mask_folders:
            continue
        if path.is_dir():
            if _is_dicom_series(path):
                add_case(path, path.name)
            else:
                skip(path, "a folder that is neither a DICOM series nor an image or mask folder "
                           f"({', '.join(IMAGE_FOLDERS + MASK_FOLDERS)}); its files were not read")
            continue
        if path.suffix.lower() == ".txt":
            continue  # a report: used by its case, or reported below
        if path.suffix.lower() in (".csv", ".xlsx", ".xls", ".json"):
            skip(path, "a table or metadata file, not read in a folder import (images, masks and reports are "
                       "paired by file name; to import from a table, give the .csv/.xlsx itself as SRC)")
            continue
        if not path.name.lower().endswith(exts):
            skip(path, f"not an image format the reader knows ({_extension(path) or 'no extension'})")
            continue
        add_case(path, _image_key(path, False)[0])
    for folder in image_folders:
        for path in sorted(folder.iterdir()):
            if hidden(path):
                continue
            if path.is_dir():
                if _is_dicom_series(path):
                    add_case(path, path.name)
                else:
                    skip(path, f"a folder in {folder.name}/ that is not a DICOM series; not read")
                continue
            if path.suffix.lower() == ".txt":
                continue
            if not is_image_file(path):
                skip(path, f"in the image folder {folder.name}/ but not an image format the reader knows "
                           f"({_extension(path) or 'no extension'})")
                continue
            name, channel = _image_key(path, folder.name.lower() in ("imagestr", "imagests"))
            if channel is not None and channel != "0000":
                channels.append((path, name, channel))
                continue
            add_case(path, name)
    for path, name, channel in channels:
        skip(path, f"channel {channel} of the nnU-Net case {name!r}: only the first channel (_0000) is imported")
    # ---- pair masks and reports
    used_masks: set[Path] = set()
    for case in cases:
        stem = _stem(case.source) if case.source.is_file() else case.source.name
        for key in dict.fromkeys((case.name.lower(), stem.lower())):
            if key in masks:
                case.mask = masks[key]
                used_masks.add(case.mask)
                break
        for folder in dict.fromkeys((case.source.parent, root)):
            report = next((folder / f"{n}.txt" for n in dict.fromkeys((stem, case.name))
                           if (folder / f"{n}.txt").is_file()), None)
            if report is not None:
                case.report = str(report)  # read (and checked) when the case is imported
                break
    for path in sorted(set(masks.values()) - used_masks):
        key = next(k for k, v in masks.items() if v == path)
        skip(path, f"a mask (by its {'folder' if path.parent != root else 'name'}) but there is no image named "
                   f"{key!r} (looked for {key}.*, {key}_image.*, {key}_img.*, {key}_0000.* in imagesTr/)")
    for path, key in extra_masks:
        used = masks[key.lower()]
        skip(path, f"a second mask for {key!r}: {_relative(used, root)} is the one "
                   f"{'used' if used in used_masks else 'reported above'}")
    reports = {Path(c.report) for c in cases if c.report}
    for folder in [root] + image_folders:
        for path in sorted(folder.glob("*.txt")):
            if path not in reports and not path.name.startswith("."):
                skip(path, f"a report (.txt) but there is no image named {_stem(path)!r}")
    return cases


def table_cases(table: Path) -> list[Case]:
    import pandas as pd

    frame = pd.read_csv(table, dtype=str) if table.suffix.lower() == ".csv" else pd.read_excel(table, dtype=str)
    columns = {str(c).strip().lower(): c for c in frame.columns}

    def column(names: tuple[str, ...], required: bool) -> str | None:
        for name in names:
            if name in columns:
                return columns[name]
        if required:
            raise ValueError(f"{table.name} has no image column (one of {', '.join(names)}); its columns: "
                             f"{', '.join(map(str, frame.columns))}")
        return None

    image_col, report_col, label_col = column(IMAGE_COLUMNS, True), column(REPORT_COLUMNS,
                                                                           False), column(LABEL_COLUMNS, False)
    cases = []
    for _, row in frame.iterrows():
        raw = row[image_col]
        if not isinstance(raw, str) or not raw.strip():
            continue
        image = (table.parent / raw.strip()).resolve()
        text = row[report_col] if report_col is not None and isinstance(row[report_col], str) else None
        mask = row[label_col] if label_col is not None and isinstance(row[label_col],
                                                                      str) and row[label_col].strip() else None
        cases.append(Case(image, text, (table.parent / mask.strip()).resolve() if mask else None,
                          _stem(image)))
    return cases


def detect_cases(src: Path, skipped: list[dict], scan: FolderScan | None = None) -> tuple[str, list[Case]]:
    if src.is_file() and src.suffix.lower() in (".csv", ".xlsx", ".xls"):
        return "table", table_cases(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is neither a folder nor a .csv/.xlsx table")
    if (src / "Train_Folder").is_dir() or (src / "Test_Folder").is_dir():
        return "lvit", lvit_cases(src)
    return "folder", folder_cases(src, skipped, scan)


# ------------------------------------------------------------------------------------------ import
def _import_case(case: Case, out: Path, taken: set[str]) -> dict:
    """Write one case; returns its record. Raises ValueError with the reason to skip it."""
    from fasttextdiff.utils.atomic import atomic_copy, atomic_write_bytes
    from fasttextdiff.data.io import read_image, write_image
    from fasttextdiff.utils.errors import FastTextDiffError

    image_id = safe_id(case.name)
    if image_id.lower() in taken:
        raise ValueError(f"id {image_id!r} is already in the studies folder (an image, report or label of that "
                         "name); nothing of it was changed")
    if not case.source.exists():
        raise ValueError(f"{case.source} does not exist")
    try:
        image = read_image(case.source)
    except FastTextDiffError as exc:
        raise ValueError(f"cannot read the image: {exc}") from None
    report = case.report
    if report is not None and report.endswith(".txt") and Path(report).is_file():
        report = _read_report(Path(report))
    mask = None
    if case.mask is not None:
        if not case.mask.exists():
            raise ValueError(f"its mask {case.mask} does not exist")
        try:
            mask = read_image(case.mask)
        except FastTextDiffError as exc:
            raise ValueError(f"cannot read its mask {case.mask.name}: {exc}") from None
        want = tuple(image.array.shape[: 3 if image.is_volume else 2])
        got = tuple(mask.array.shape[: 3 if mask.is_volume else 2])
        if got != want:
            raise ValueError(f"its mask {case.mask.name} has shape {got}, the image {want}")
    ext = _extension(case.source) if case.source.is_file() else ""
    if ext not in STUDIES_EXTENSIONS:
        ext = ".nii.gz" if image.is_volume else ".png"
    dest = out / f"{image_id}{ext}"
    if case.source.is_file() and ext == _extension(case.source):
        atomic_copy(case.source, dest)
    else:
        write_image(dest, image.array, like=image)
    if mask is not None:
        label_dir = out / "labels" / "final"
        label_dir.mkdir(parents=True, exist_ok=True)
        mask_ext = _extension(case.mask) if case.mask.is_file() else ".nii.gz"
        if mask_ext not in STUDIES_EXTENSIONS or (mask_ext in (".jpg", ".jpeg")):  # JPEG would blur label values
            mask_ext = ".nii.gz" if image.is_volume else ".png"
            write_image(label_dir / f"{image_id}{mask_ext}", mask.array, like=image)
        else:
            atomic_copy(case.mask, label_dir / f"{image_id}{mask_ext}")
    if report:
        atomic_write_bytes(out / f"{image_id}.txt", report.encode("utf-8"))
    taken.add(image_id.lower())
    return {"id": image_id, "source": str(case.source), "report": bool(report), "label": mask is not None,
            "mask": str(case.mask) if mask is not None else None,
            "volume": bool(image.is_volume)}


def taken_ids(out: Path) -> set[str]:
    """The ids (lower case) that already have an image, a report or a label in the studies folder `out`."""
    def ids(folder: Path, suffixes: tuple) -> set[str]:
        return {_stem(p).lower() for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(suffixes)} \
            if folder.is_dir() else set()

    taken = ids(out, STUDIES_EXTENSIONS + (".txt",))
    labels = out / "labels"
    for tag in labels.iterdir() if labels.is_dir() else ():
        taken |= ids(tag, STUDIES_EXTENSIONS)
    return taken


def import_studies(src: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Import `src` into the studies folder `out`; returns {kind, studies, imported: [...], skipped: [{source,
    reason}], warnings: [...]}."""
    from tqdm.auto import tqdm

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must be another folder than the source")
    skipped: list[dict] = []
    scan = FolderScan(skipped)
    kind, cases = detect_cases(src, skipped, scan)
    if not cases and not skipped:
        raise ValueError(f"{src} holds no images to import")
    out.mkdir(parents=True, exist_ok=True)
    taken = taken_ids(out)
    imported = []
    for case in tqdm(cases, desc="import studies", disable=not progress, unit="case"):
        try:
            imported.append(_import_case(case, out, taken))
        except (ValueError, OSError) as exc:
            skipped.append({"source": _relative(case.source, src) if kind == "folder" else case.source.name,
                            "reason": str(exc)})
            log.warning("skipped %s: %s", case.source, exc)
    warnings = []
    if scan.mask_like and not any(c.mask is not None for c in cases):
        masks = [s for s in skipped if "mask" in s["reason"]]
        warnings.append(f"no mask was imported, though {scan.mask_like} file(s) look like masks (by name or folder)"
                        + (f"; first: {masks[0]['source']}: {masks[0]['reason']}" if masks else "")
                        + ". Every image was imported unlabeled: check the names (see docs/SERVER.md, import)")
    for warning in warnings:
        log.warning("%s", warning)
    return {"kind": kind, "studies": str(out), "imported": imported, "skipped": skipped, "warnings": warnings}


def add_import_studies_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="an LViT-layout dataset, a folder of images with <name>.txt reports "
                                               "(and optional masks), or a .csv/.xlsx table (image, report, label)")
    parser.add_argument("--out", required=True, type=Path, help="the MONAI Label studies folder to write into")
    parser.add_argument("--json", type=Path, help="also write the full summary (every case) to this file")


def run_import_studies(args: argparse.Namespace) -> int:
    summary = import_studies(args.src, args.out)
    done = summary["imported"]
    print(f"imported {len(done)} case(s) from {args.src} ({summary['kind']}) into {args.out}: "
          f"{sum(c['report'] for c in done)} with a report, {sum(c['label'] for c in done)} with a label")
    for item in summary["skipped"]:
        print(f"skipped {item['source']}: {item['reason']}")
    for warning in summary["warnings"]:
        print(f"warning: {warning}")
    if args.json:
        from fasttextdiff.utils.atomic import atomic_write_json

        atomic_write_json(args.json, summary)
    print(f"next: make serve STUDIES={args.out}   (in the FastTextDiff checkout; the server reads the reports from "
          "the .txt files on start)")
    return 0 if done or not summary["skipped"] else 2

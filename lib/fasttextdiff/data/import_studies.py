"""`fasttextdiff import-studies SRC --out STUDIES`: bring a user's images, reports and masks into a
MONAI Label studies folder the server reads as it is.

Sources:
  (a) an LViT-layout dataset (Train_Folder/Val_Folder/Test_Folder with img/, labelcol/ and the text
      tables): every image, its mask as a final label, its report from the table;
  (b) a folder of images, volumes or DICOM series folders, each with an optional `<name>.txt` report
      and an optional mask (`<name>_mask.*`, `<name>_label.*`, `<name>_seg.*`, or the same name in a
      `masks/`, `labels/` or `labelcol/` subfolder);
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
MASK_SUFFIXES = ("_mask", "_label", "_seg", "_labels", "_segmentation")
MASK_FOLDERS = ("masks", "labels", "labelcol", "mask", "label")
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


def folder_cases(root: Path, skipped: list[dict]) -> list[Case]:
    from fasttextdiff.data.io import supported_extensions

    exts = tuple(supported_extensions())
    entries = sorted(root.iterdir())
    masks: dict[str, Path] = {}
    for sub in (root / f for f in MASK_FOLDERS):
        if sub.is_dir():
            masks.update({_stem(p): p for p in sorted(sub.iterdir()) if p.is_file() and p.name.lower().endswith(exts)})
    for path in entries:
        if path.is_file() and path.name.lower().endswith(exts):
            stem = _stem(path)
            for suffix in MASK_SUFFIXES:
                if stem.lower().endswith(suffix):
                    masks.setdefault(stem[: -len(suffix)], path)
    mask_files = set(masks.values())
    cases = []
    for path in entries:
        if path.name.startswith(".") or path in mask_files or path.name in MASK_FOLDERS:
            continue
        if path.is_dir():
            if _is_dicom_series(path):
                cases.append(Case(path, None, masks.get(path.name), path.name))
            continue
        if path.suffix.lower() in (".txt", ".csv", ".xlsx", ".xls", ".json"):
            continue
        if not path.name.lower().endswith(exts):
            skipped.append({"source": path.name,
                            "reason": f"not an image format the reader knows ({_extension(path) or 'no extension'})"})
            continue
        cases.append(Case(path, None, masks.get(_stem(path)), _stem(path)))
    for case in cases:
        report = case.source.parent / f"{_stem(case.source) if case.source.is_file() else case.source.name}.txt"
        if report.is_file():
            case.report = str(report)  # read (and checked) when the case is imported
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


def detect_cases(src: Path, skipped: list[dict]) -> tuple[str, list[Case]]:
    if src.is_file() and src.suffix.lower() in (".csv", ".xlsx", ".xls"):
        return "table", table_cases(src)
    if not src.is_dir():
        raise FileNotFoundError(f"{src} is neither a folder nor a .csv/.xlsx table")
    if (src / "Train_Folder").is_dir() or (src / "Test_Folder").is_dir():
        return "lvit", lvit_cases(src)
    return "folder", folder_cases(src, skipped)


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
    """Import `src` into the studies folder `out`; returns {kind, imported: [...], skipped: [...]}."""
    from tqdm.auto import tqdm

    src, out = Path(src), Path(out)
    if out.resolve() == src.resolve():
        raise ValueError("--out must be another folder than the source")
    skipped: list[dict] = []
    kind, cases = detect_cases(src, skipped)
    if not cases and not skipped:
        raise ValueError(f"{src} holds no images to import")
    out.mkdir(parents=True, exist_ok=True)
    taken = taken_ids(out)
    imported = []
    for case in tqdm(cases, desc="import studies", disable=not progress, unit="case"):
        try:
            imported.append(_import_case(case, out, taken))
        except (ValueError, OSError) as exc:
            skipped.append({"source": str(case.source.name), "reason": str(exc)})
            log.warning("skipped %s: %s", case.source, exc)
    return {"kind": kind, "studies": str(out), "imported": imported, "skipped": skipped}


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
    if args.json:
        from fasttextdiff.utils.atomic import atomic_write_json

        atomic_write_json(args.json, summary)
    print(f"next: make serve STUDIES={args.out}   (in the FastTextDiff checkout; the server reads the reports from "
          "the .txt files on start)")
    return 0 if done or not summary["skipped"] else 2

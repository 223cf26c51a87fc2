"""Synthetic chest-X-ray-like cases with LViT-style reports, written in the LViT layout.

Why: QaTa-COV19 and MosMedData+ cannot be downloaded here, yet the whole pipeline (training,
evaluation, the MONAI Label server, benchmarks) must run and be measured end to end. These cases
have the same structure as the real ones: an image, a binary infection mask, and one structured
sentence naming the infected lung regions.

Anatomy and sides: two darker lung fields inside a brighter body, rib-like bands and noise. Each
lung is split into upper/middle/lower thirds, giving 6 regions. Reports use the radiological
convention: the patient faces the viewer, so the patient's RIGHT lung is on the image's LEFT
(small column indices) and the patient's LEFT lung is on the image's RIGHT.

Variants:
- "standard": 1-3 lesions in distinct regions, all labeled, all named in the report.
- "text-necessary": 2-4 look-alike lesions in distinct regions; a random non-empty proper
  subset is labeled and only those regions are named. Labeled and unlabeled lesions are drawn
  from the same distributions, so only the report tells which ones to segment. About half of
  the lesions are labeled, so the best image-only guess (segment every lesion) averages a Dice of
  about 0.67 and guessing a subset about 0.5, while a model that reads the report can reach 1.
- "clinical-reports": the very same images and masks as "text-necessary" (same seed), but each
  report is written as a radiology report (FINDINGS/IMPRESSION, synonyms, negations, distractor
  sentences from the real IU X-ray reports, 50-300 tokens); the test split uses held-out
  phrasings (`clinical_reports.py`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from fasttextdiff.utils.atomic import atomic_path

from fasttextdiff.data.clinical_reports import clinical_report

VARIANTS = ("standard", "text-necessary", "clinical-reports")
RENDER_VARIANTS = ("standard", "text-necessary")  # what render_case draws; clinical-reports rewrites the report
LEVELS = ("upper", "middle", "lower")
SIDES = ("right", "left")  # patient sides; "right" is drawn on the image's left half
REGIONS = tuple(f"{level} {side}" for side in SIDES for level in LEVELS)  # region id = index + 1
_NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
CLINICAL_PHRASING = {"Train": "train", "Val": "train", "Test": "heldout"}  # validation stays in-distribution
_REPORT_ORDER = tuple(f"{level} {side}" for side in ("left", "right") for level in LEVELS)


@dataclass
class SyntheticCase:
    """Everything `render_case` knows about one case; tests and demos use the extra fields."""

    image: np.ndarray  # uint8 (H, W)
    mask: np.ndarray  # uint8 (H, W), 1 = labeled lesion
    report: str
    region_map: np.ndarray  # uint8 (H, W): 0 outside the lungs, i + 1 inside REGIONS[i]
    lesion_masks: list[np.ndarray] = field(default_factory=list)  # bool (H, W), one per lesion
    lesion_regions: list[str] = field(default_factory=list)
    labeled: list[bool] = field(default_factory=list)

    @property
    def labeled_regions(self) -> list[str]:
        return [r for r, keep in zip(self.lesion_regions, self.labeled) if keep]


def report_for_regions(regions: list[str] | tuple[str, ...]) -> str:
    """LViT-style sentence, e.g.
    'Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.'"""
    ordered = [r for r in _REPORT_ORDER if r in set(regions)]
    if not ordered:
        return "No pulmonary infection."
    sides = {r.split()[1] for r in ordered}
    extent = "Bilateral" if len(sides) == 2 else "Unilateral"
    count = len(ordered)
    areas = f"{_NUMBER_WORDS[count]} infected area{'s' if count > 1 else ''}"
    names = [f"{r} lung" for r in ordered]
    places = names[0] if count == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{extent} pulmonary infection, {areas}, {places}."


def regions_in_report(report: str) -> set[str]:
    """The region names ('upper left', ...) a report mentions; the inverse of `report_for_regions`."""
    text = report.lower()
    return {r for r in REGIONS if f"{r} lung" in text}


def _lung_fields(
    size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float, float]]]:
    """Lung mask, region map and each lung's ellipse (cy, cx, ry, rx); patient-right lung first."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    lungs = np.zeros((size, size), bool)
    region_map = np.zeros((size, size), np.uint8)
    ellipses = []
    for side_index, image_x in enumerate((0.30, 0.70)):  # patient right lung on the image's left
        cy = size * (0.50 + rng.uniform(-0.02, 0.02))
        cx = size * (image_x + rng.uniform(-0.015, 0.015))
        ry, rx = size * rng.uniform(0.31, 0.34), size * rng.uniform(0.16, 0.18)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        lungs |= inside
        third = np.clip(((yy - (cy - ry)) / (2 * ry) * 3).astype(int), 0, 2)  # 0 upper .. 2 lower
        region_map[inside] = (side_index * 3 + third[inside] + 1).astype(np.uint8)
        ellipses.append((cy, cx, ry, rx))
    return lungs, region_map, ellipses


def _place_lesion(rng, size, region_map, region_id) -> tuple[np.ndarray, np.ndarray] | None:
    """A soft elliptical opacity whose core lies entirely inside one region, or None if it won't fit."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    candidates = np.argwhere(region_map == region_id)
    for _ in range(40):
        cy, cx = candidates[rng.integers(len(candidates))]
        ry, rx = size * rng.uniform(0.045, 0.07), size * rng.uniform(0.045, 0.07)
        angle = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
        v = (-dy * np.sin(angle) + dx * np.cos(angle)) / rx
        core = u**2 + v**2 <= 1.0
        if core.sum() >= 4 and (region_map[core] == region_id).all():
            profile = np.exp(-0.5 * (u**2 + v**2) * 2.0)  # bright centre fading outwards
            return core, profile
    return None


def render_case_details(rng: np.random.Generator, size: int = 64, variant: str = "standard") -> SyntheticCase:
    """One synthetic case with its lesions, regions and labeled flags (see the module doc)."""
    if variant not in RENDER_VARIANTS:
        raise ValueError(f"variant must be one of {RENDER_VARIANTS}, got {variant!r}")
    if size < 32:
        raise ValueError(f"synthetic cases need size >= 32 to fit six lung regions, got {size}")
    lungs, region_map, ellipses = _lung_fields(size, rng)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    body = ((yy - size * 0.52) / (size * 0.50)) ** 2 + ((xx - size * 0.5) / (size * 0.46)) ** 2 <= 1.0
    canvas = np.where(body, 0.62, 0.08).astype(np.float32)
    canvas[lungs] = 0.24
    heart = ((yy - size * 0.64) / (size * 0.14)) ** 2 + ((xx - size * 0.53) / (size * 0.11)) ** 2 <= 1.0
    canvas[heart & ~lungs] = 0.55  # the heart shadow borders the lungs but never hides a region
    phase = rng.uniform(0, 2 * np.pi)
    period = size * rng.uniform(0.10, 0.13)
    ribs = 0.5 + 0.5 * np.cos(
        2 * np.pi * (yy + 0.004 * size * ((xx - size / 2) / (size / 4)) ** 2 * 8) / period + phase
    )
    canvas += 0.08 * ribs * lungs
    canvas = gaussian_filter(canvas, sigma=size / 96)

    if variant == "standard":
        n_lesions = int(rng.integers(1, 4))
    else:
        n_lesions = int(rng.integers(2, 5))
    chosen = rng.permutation(len(REGIONS))
    lesion_masks, lesion_regions = [], []
    for region_index in chosen:
        if len(lesion_masks) == n_lesions:
            break
        placed = _place_lesion(rng, size, region_map, region_index + 1)
        if placed is None:
            continue
        core, profile = placed
        canvas += rng.uniform(0.28, 0.38) * gaussian_filter(profile * core + 0.5 * profile, sigma=size / 128)
        lesion_masks.append(core)
        lesion_regions.append(REGIONS[region_index])

    if variant == "standard":
        labeled = [True] * len(lesion_masks)
    else:  # a non-empty proper subset, chosen after drawing so appearance says nothing about it
        n_labeled = int(rng.integers(1, len(lesion_masks))) if len(lesion_masks) > 1 else 1
        keep = set(rng.permutation(len(lesion_masks))[:n_labeled].tolist())
        labeled = [i in keep for i in range(len(lesion_masks))]

    canvas += gaussian_filter(rng.normal(0, 0.05, canvas.shape).astype(np.float32), sigma=0.7)
    canvas += rng.normal(0, 0.015, canvas.shape)
    image = np.clip(canvas * 255, 0, 255).round().astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for lesion, keep in zip(lesion_masks, labeled):
        if keep:
            mask[lesion] = 1
    report = report_for_regions([r for r, keep in zip(lesion_regions, labeled) if keep])
    return SyntheticCase(image, mask, report, region_map, lesion_masks, lesion_regions, labeled)


def render_case(
    rng: np.random.Generator, size: int = 64, variant: str = "standard"
) -> tuple[np.ndarray, np.ndarray, str]:
    """`(image uint8 HxW, mask uint8 HxW in {0,1}, report)` for one synthetic chest X-ray."""
    case = render_case_details(rng, size, variant)
    return case.image, case.mask, case.report


def write_text_table(path: str | os.PathLike, rows) -> Path:
    """Write an LViT text table (columns Image, Description) as .xlsx or .csv, atomically.

    `rows` is a mapping name -> text or an iterable of (name, text) pairs.
    """
    import pandas as pd

    path = Path(path)
    pairs = list(rows.items()) if hasattr(rows, "items") else [tuple(r) for r in rows]
    frame = pd.DataFrame(pairs, columns=["Image", "Description"])
    suffix = path.suffix.lower()
    if suffix not in (".xlsx", ".csv"):
        raise ValueError(f"text tables are written as .xlsx or .csv, not {path.name}")
    with atomic_path(path, suffix=suffix) as tmp:
        if suffix == ".csv":
            frame.to_csv(tmp, index=False)
        else:
            frame.to_excel(tmp, index=False, engine="openpyxl")
    return path


def make_lvit_dataset(
    out: str | os.PathLike,
    variant: str = "standard",
    n_train: int = 40,
    n_val: int = 10,
    n_test: int = 10,
    size: int = 64,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the LViT layout (QaTa naming: masks are `mask_<image>` 0/255 PNGs).

    Every case is drawn from its own generator seeded by (seed, split, index), so a case does not
    change when the split sizes change. Returns `out`; `synthetic.json` records the parameters.
    "clinical-reports" draws the "text-necessary" case and writes its report with a second
    generator (seed, split, index, 1): held-out phrasings for Test, training phrasings otherwise.
    """
    from PIL import Image as PILImage

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    counts = {"Train": n_train, "Val": n_val, "Test": n_test}
    for split, count in counts.items():
        if int(count) != count or count < 0:
            raise ValueError(f"n_{split.lower()} must be a whole number >= 0, got {count}")
    if n_train < 1:
        raise ValueError("n_train must be at least 1")
    out = Path(out)
    for split_id, (split, count) in enumerate(counts.items()):
        image_dir, mask_dir = out / f"{split}_Folder" / "img", out / f"{split}_Folder" / "labelcol"
        image_dir.mkdir(parents=True, exist_ok=True)
        mask_dir.mkdir(parents=True, exist_ok=True)
        rows = {}
        for index in range(int(count)):
            rng = np.random.default_rng([seed, split_id, index])
            if variant == "clinical-reports":
                case = render_case_details(rng, size, "text-necessary")
                image, mask = case.image, case.mask
                report = clinical_report(
                    case.labeled_regions,
                    np.random.default_rng([seed, split_id, index, 1]),
                    phrasing=CLINICAL_PHRASING[split],
                ).text
            else:
                image, mask, report = render_case(rng, size, variant)
            name = f"{split.lower()}_{index:04d}.png"
            PILImage.fromarray(image).save(image_dir / name)
            PILImage.fromarray(mask * np.uint8(255)).save(mask_dir / f"mask_{name}")
            rows[name] = report
        write_text_table(out / f"{split}_text.xlsx", rows)
    params = {"variant": variant, "n_train": n_train, "n_val": n_val, "n_test": n_test, "size": size, "seed": seed}
    if variant == "clinical-reports":
        params["phrasing"] = {split.lower(): CLINICAL_PHRASING[split] for split in counts}
    (out / "synthetic.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    return out

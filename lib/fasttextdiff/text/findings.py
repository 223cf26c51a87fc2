"""What a report says about its findings, what a mask shows, and how far the two disagree.

Why: the active-learning strategy `report_mismatch` offers the image whose predicted mask contradicts
its own report the most (the report names two infected areas in the upper left and lower right lung,
the mask has one blob in the middle right): a cheap, label-free hint that the model got that image
wrong, which the noise-draw uncertainty does not see (a confidently wrong mask has low uncertainty).

Two report styles are understood, both generated the way LViT generates its reports from the masks:
- chest (QaTa-COV19 / MosMedData+ style and `data.synthetic`): "Bilateral pulmonary infection, two
  infected areas, upper left lung and lower right lung." -> a count of findings and the named lung
  regions (`synthetic.REGIONS`), or "No pulmonary infection." -> no findings;
- nuclei tiles (bench/nuclei.py): "..., three to five nuclei, moderate coverage, clustered in the upper
  left." -> a count band, a coverage band and the cell of a 3x3 grid where the foreground clusters.
A report that names none of these gives no findings to compare (`parse_report(...).empty`) and the
mismatch is None; the strategy then ranks that image by its uncertainty alone.

The mask side (`mask_findings`): connected components of the foreground (scipy.ndimage; fragments
below `min_area_fraction` of the image are noise, not findings), the chest region of each component's
centroid (patient right = image left; lung thirds of the synthetic anatomy: the lungs span about
17-83 % of the image height), the coverage and the 3x3 cell of the foreground's centre of mass.
Volumes are compared on the count alone (3D components): regions and clusters are 2D frontal terms.

`report_mismatch` is the mean of the terms both sides have, each in [0, 1]: count (0 when the mask's
count range, see `mask_findings`, meets the named range, else the relative gap, capped at 1),
regions (1 - Jaccard of named vs found), cluster (grid distance / 2) and coverage (band distance / 2).
Torch-free; numpy + scipy only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from fasttextdiff.data.synthetic import LEVELS, REGIONS, regions_in_report

_NUMBERS = {"no": 0, "zero": 0, "one": 1, "a single": 1, "single": 1, "two": 2, "three": 3, "four": 4, "five": 5,
            "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_NUMBER = r"(\d+|no|zero|one|a single|single|two|three|four|five|six|seven|eight|nine|ten)"
_AREAS = re.compile(r"\b" + _NUMBER + r" (?:infected |affected |lesion |consolidat\w* "
                                      r")?(?:areas?|lesions?|foci|regions?)")
_NUCLEI_BANDS = ((re.compile(r"\bno nuclei\b"), (0, 0)),
                 (re.compile(r"\bone or two nuclei\b"), (1, 2)),
                 (re.compile(_NUMBER + r" to " + _NUMBER + r" nuclei"), None),
                 (re.compile(r"\bmore than " + _NUMBER + r" nuclei"), None))
COVERAGE_BANDS = (("sparse", 0.0, 0.1), ("moderate", 0.1, 0.3), ("dense", 0.3, 1.01))  # bench/nuclei.py's words
_GRID_ROWS, _GRID_COLS = ("upper", "middle", "lower"), ("left", "centre", "right")
_LUNG_TOP, _LUNG_BOTTOM = 0.17, 0.83  # synthetic lungs: centre 0.50 +- radius 0.31-0.34 of the height


@dataclass(frozen=True)
class ReportFindings:
    """What a report states; None = the report does not say."""

    count: tuple[int, float] | None = None  # allowed range of the number of findings (hi may be inf)
    regions: frozenset[str] | None = None  # chest regions named ('upper left', ...)
    cluster: tuple[int, int] | None = None  # (row, col) on a 3x3 grid where the findings cluster
    coverage: int | None = None  # index into COVERAGE_BANDS

    @property
    def empty(self) -> bool:
        return self.count is None and self.regions is None and self.cluster is None and self.coverage is None


@dataclass(frozen=True)
class MaskFindings:
    """What a (predicted or true) mask shows, in the same terms."""

    count: int  # components of at least min_area_fraction of the image
    regions: frozenset[str]
    cluster: tuple[int, int] | None  # None for an empty mask or a volume
    coverage: float
    volume: bool = False
    count_large: int | None = None  # of those, the ones inside the image or large where cut by its edge


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBERS[word]


def _parse_cluster(text: str) -> tuple[int, int] | None:
    match = re.search(r"clustered in the ([a-z ]+?)(?:[.,;]|$)", text)
    if not match:
        return None
    words = match.group(1).split()
    if words == ["centre"] or words == ["center"]:
        return 1, 1
    row = next((_GRID_ROWS.index(w) for w in words if w in _GRID_ROWS), 1)
    col = next((_GRID_COLS.index(w) for w in words if w in _GRID_COLS), 1)
    return row, col


def parse_report(report: str) -> ReportFindings:
    """The findings a report names (see the module doc for the understood styles)."""
    text = " ".join(str(report or "").lower().split())
    count: tuple[int, float] | None = None
    regions: frozenset[str] | None = None
    if re.search(r"\bno (?:pulmonary )?(?:infection|lesions?|findings?|opacit\w+)\b", text):
        count, regions = (0, 0), frozenset()
    named = regions_in_report(text)
    if named:
        regions = frozenset(named)
        count = (len(named), len(named))
    areas = _AREAS.search(text)
    if areas:
        n = _number(areas.group(1))
        count = (n, n)
    for pattern, band in _NUCLEI_BANDS:
        match = pattern.search(text)
        if not match:
            continue
        if band is None and "more than" in pattern.pattern:
            band = (_number(match.group(1)) + 1, float("inf"))
        elif band is None:
            band = (_number(match.group(1)), _number(match.group(2)))
        count = band
        break
    coverage = next((i for i, (word, _, _) in enumerate(COVERAGE_BANDS) if f"{word} coverage" in text), None)
    return ReportFindings(count=count, regions=regions, cluster=_parse_cluster(text), coverage=coverage)


def _chest_region(cy: float, cx: float, height: int, width: int) -> str | None:
    side = "right" if cx < width / 2 else "left"  # patient right lung is drawn on the image's left
    rel = (cy / max(1, height - 1) - _LUNG_TOP) / (_LUNG_BOTTOM - _LUNG_TOP)
    level = LEVELS[min(2, max(0, int(3 * rel)))]
    region = f"{level} {side}"
    return region if region in REGIONS else None


def mask_findings(mask: np.ndarray, min_area_fraction: float = 0.001,
                  large_area_fraction: float = 0.015) -> MaskFindings:
    """Components, chest regions, coverage and cluster cell of a mask's foreground (any class > 0).

    Reports count a finding cut by the image edge only when enough of it shows (bench/nuclei.py: 60 px of
    a 64 px tile, about 1.5 %), so the count is a range: every component (`count`) down to those that
    either lie inside the image or are large (`count_large`); a report's count that meets the range agrees."""
    from scipy import ndimage

    fg = np.asarray(mask) > 0
    if fg.ndim not in (2, 3):
        raise ValueError(f"a mask must be 2D or a volume, got shape {fg.shape}")
    components, n = ndimage.label(fg)
    min_area = max(1, int(round(min_area_fraction * fg.size)))
    sizes = ndimage.sum_labels(fg, components, index=np.arange(1, n + 1)) if n else np.zeros(0)
    kept = [i + 1 for i, size in enumerate(sizes) if size >= min_area]
    boxes = ndimage.find_objects(components)
    cut = [any(sl.start == 0 or sl.stop == dim for sl, dim in zip(boxes[i - 1], fg.shape)) for i in kept]
    large = sum(1 for i, at_edge in zip(kept, cut) if not at_edge or sizes[i - 1] >= large_area_fraction * fg.size)
    coverage = float(fg.mean())
    if fg.ndim == 3:
        return MaskFindings(count=len(kept), regions=frozenset(), cluster=None, coverage=coverage, volume=True,
                            count_large=large)
    h, w = fg.shape
    regions = set()
    for cy, cx in ndimage.center_of_mass(fg, components, kept) if kept else []:
        region = _chest_region(cy, cx, h, w)
        if region:
            regions.add(region)
    cluster = None
    if fg.any():
        yy, xx = np.nonzero(fg)
        cluster = (min(2, int(3 * yy.mean() / h)), min(2, int(3 * xx.mean() / w)))  # as bench/nuclei.py words it
    return MaskFindings(count=len(kept), regions=frozenset(regions), cluster=cluster, coverage=coverage,
                        count_large=large)


def _coverage_band(coverage: float) -> int:
    return next(i for i, (_, lo, hi) in enumerate(COVERAGE_BANDS) if lo <= coverage < hi)


def mismatch_terms(report: ReportFindings, found: MaskFindings) -> dict[str, float]:
    """Each term the report and the mask both have, in [0, 1] (0 = they agree)."""
    terms: dict[str, float] = {}
    if report.count is not None:
        lo, hi = report.count
        n_hi = found.count
        n_lo = n_hi if found.count_large is None else min(found.count_large, n_hi)
        if n_lo <= hi and n_hi >= lo:  # the mask's count range meets the report's
            terms["count"] = 0.0
        elif n_hi < lo:
            terms["count"] = min(1.0, (lo - n_hi) / max(1.0, lo))
        else:
            terms["count"] = min(1.0, (n_lo - hi) / max(1.0, hi))
    if found.volume:
        return terms
    if report.regions is not None and (report.regions or found.regions or report.count is None):
        union = report.regions | found.regions
        terms["regions"] = 1.0 - len(report.regions & found.regions) / len(union) if union else 0.0
    if report.cluster is not None:
        if found.cluster is None:
            terms["cluster"] = 1.0
        else:
            terms["cluster"] = max(abs(report.cluster[0] - found.cluster[0]),
                                   abs(report.cluster[1] - found.cluster[1])) / 2
    if report.coverage is not None:
        terms["coverage"] = abs(report.coverage - _coverage_band(found.coverage)) / 2
    return terms


def report_mismatch(report: str, mask: np.ndarray, min_area_fraction: float = 0.001) -> float | None:
    """How much `mask` disagrees with what `report` names, in [0, 1]; None when the report names nothing."""
    findings = parse_report(report)
    if findings.empty:
        return None
    terms = mismatch_terms(findings, mask_findings(mask, min_area_fraction))
    return float(np.mean(list(terms.values()))) if terms else None

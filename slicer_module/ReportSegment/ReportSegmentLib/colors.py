"""Distinct display colours for free-text labels.

MONAI Label's Slicer plugin colours segments from an anatomy colour table keyed by label name;
our labels are free text ("ground-glass opacity", "consolidation, left lower lobe"), so names
cannot be looked up. Colours are assigned by position instead: a short hand-picked palette of
saturated, mutually distinct colours first, then hues spread by the golden angle with
alternating brightness, so any number of labels gets colours that are far apart, and the same
label list always gets the same colours.
"""

from __future__ import annotations

import colorsys
from typing import Dict, Iterable, List, Tuple

RGB = Tuple[float, float, float]

# Saturated colours that stay apart from each other and from a grey image (0..1 RGB).
_PALETTE: List[RGB] = [
    (0.90, 0.16, 0.16),  # red
    (0.13, 0.55, 0.95),  # blue
    (0.98, 0.78, 0.10),  # yellow
    (0.15, 0.75, 0.30),  # green
    (0.70, 0.25, 0.85),  # purple
    (1.00, 0.50, 0.05),  # orange
    (0.05, 0.80, 0.80),  # cyan
    (0.95, 0.40, 0.70),  # pink
    (0.55, 0.35, 0.15),  # brown
    (0.60, 0.85, 0.10),  # lime
    (0.10, 0.25, 0.65),  # navy
    (0.55, 0.05, 0.25),  # maroon
]

_GOLDEN = 0.618033988749895


def distinct_colors(count: int) -> List[RGB]:
    """``count`` RGB triples in 0..1, pairwise distinct, deterministic."""
    if count < 0:
        raise ValueError("count must be >= 0")
    colors: List[RGB] = list(_PALETTE[:count])
    hue = 0.05
    index = 0
    while len(colors) < count:
        hue = (hue + _GOLDEN) % 1.0
        value = (0.95, 0.75, 0.55)[index % 3]
        saturation = (0.85, 0.65)[(index // 3) % 2]
        r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
        candidate = (round(r, 4), round(g, 4), round(b, 4))
        index += 1
        if candidate not in colors:
            colors.append(candidate)
    return colors


def label_colors(names: Iterable[str]) -> Dict[str, RGB]:
    """A colour per label name, in the given order; "background" gets none. Duplicate names
    share the first colour."""
    ordered: List[str] = []
    for name in names:
        if name and name.lower() != "background" and name not in ordered:
            ordered.append(name)
    return dict(zip(ordered, distinct_colors(len(ordered))))


def color_distance(a: RGB, b: RGB) -> float:
    """Euclidean distance in RGB (0..sqrt(3)); used to check colours are far apart."""
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5

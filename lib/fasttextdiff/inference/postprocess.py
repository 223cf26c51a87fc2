"""3D clean-up of a served mask: connected components too small to be a finding are dropped.

Why: a slice-wise 2D model leaves isolated specks in single slices of a volume; each counts as a false
finding for a reader (and in lesion-wise detection) while adding almost nothing to Dice. The threshold is
physical (mm³, from the image's spacing), so it means the same at any resolution; it is measured in
`bench/real_ct.py` (named lesions found and false-positive components per volume, with and without it).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_COMPONENT_MM3 = 30.0  # a sphere of about 4 mm diameter: below the smallest lesion a report sizes


def drop_small_components(mask: np.ndarray, spacing: tuple, min_mm3: float = MIN_COMPONENT_MM3) -> np.ndarray:
    """`mask` (class indices, 2D or 3D) without the foreground components smaller than `min_mm3`
    (mm² for a 2D image); the pixels go to background. Spacing is in SimpleITK order (x, y[, z])."""
    if min_mm3 <= 0 or not mask.any():
        return mask
    voxel = float(np.prod([float(s) for s in spacing[: mask.ndim]]))
    out = mask.copy()
    structure = np.ones((3,) * mask.ndim, dtype=bool)
    for k in np.unique(mask[mask > 0]):
        components, n = ndimage.label(mask == k, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=n + 1) * voxel
        small = np.flatnonzero(sizes < min_mm3)
        small = small[small > 0]
        if len(small):
            out[np.isin(components, small)] = 0
    return out

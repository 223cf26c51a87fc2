"""The 3D clean-up: specks below a physical size go, findings stay, whatever the voxel size."""

from __future__ import annotations

import numpy as np
import pytest

from fasttextdiff.inference.batched import InferenceOptions
from fasttextdiff.inference.postprocess import drop_small_components


def test_specks_go_and_findings_stay_by_physical_size():
    mask = np.zeros((6, 20, 20), np.uint8)
    mask[2:4, 5:9, 5:9] = 1  # 32 voxels
    mask[5, 15, 15] = 1  # a one-voxel speck
    fine = drop_small_components(mask, (1.0, 1.0, 1.0), min_mm3=10)
    assert fine.sum() == 32 and fine[5, 15, 15] == 0
    coarse = drop_small_components(mask, (3.0, 3.0, 3.0), min_mm3=10)  # the speck is 27 mm3 there: kept
    assert np.array_equal(coarse, mask)
    assert np.array_equal(drop_small_components(mask, (1.0, 1.0, 1.0), min_mm3=0), mask)


def test_classes_are_cleaned_each_on_its_own():
    mask = np.zeros((4, 10, 10), np.uint8)
    mask[1:3, 1:4, 1:4] = 1
    mask[0, 8, 8] = 2
    out = drop_small_components(mask, (1.0, 1.0, 1.0), min_mm3=5)
    assert (out == 1).sum() == 18 and not (out == 2).any()


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="min_component_mm3"):
        InferenceOptions(min_component_mm3=-1)

"""The yardsticks: per-volume Dice (one 3D score, not a mean of slices) and lesion-wise detection."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fasttextdiff.utils.metrics import dice_iou, lesion_detection


def test_a_volume_is_one_dice_and_empty_slices_do_not_flatter_it():
    truth = np.zeros((10, 16, 16), np.int64)
    truth[4:6, 4:8, 4:8] = 1
    pred = np.zeros_like(truth)
    pred[7, 10:14, 10:14] = 1  # wrong place: 8 of 10 slices are "correctly empty"
    (volume,), _ = dice_iou(torch.from_numpy(pred[None]), torch.from_numpy(truth[None]), 2)
    per_slice, _ = dice_iou(torch.from_numpy(pred), torch.from_numpy(truth), 2)
    assert volume == 0.0
    assert np.mean(per_slice) == pytest.approx(0.7)  # what a mean over slices would have reported


def test_lesion_detection_counts_found_named_lesions_and_false_positive_components():
    lesions = np.zeros((8, 32, 32), np.int16)
    lesions[2:4, 2:6, 2:6] = 1  # named, found
    lesions[2:4, 20:24, 20:24] = 2  # named, missed
    lesions[5:7, 2:6, 20:24] = 3  # a decoy the report does not name
    pred = np.zeros(lesions.shape, bool)
    pred[3, 3:5, 3:5] = True  # overlaps lesion 1
    pred[6, 3:5, 21:23] = True  # on the decoy: a false positive
    pred[0, 28:30, 28:30] = True  # on nothing: a false positive
    out = lesion_detection(pred, lesions, named=[1, 2])
    assert out["found_ids"] == [1] and out["lesions"] == 2 and out["detection_rate"] == 0.5
    assert out["components"] == 3 and out["fp_components"] == 2
    every = lesion_detection(pred, lesions)  # without names every lesion counts
    assert every["found_ids"] == [1, 3] and every["fp_components"] == 1
    with pytest.raises(ValueError, match="differ in shape"):
        lesion_detection(pred[:4], lesions)

"""A volume trains on its slices exactly as inference sees them.

Regression: volumes were cut into slice files with an identity in-plane direction and a box and
intensity scaling of their own, while inference orients the whole volume (LPS) and crops one box for
all of its slices. A volume stored with direction diag(-1, -1, 1) (the usual NIfTI from RAS tools,
TotalSegmentator's files among them) thus trained on images mirrored against the ones it was asked
to segment, and the served masks landed in the wrong place.
"""

from __future__ import annotations

import numpy as np
import torch

from fasttextdiff.data.dataset import SegmentationDataset, volume_training_slices
from fasttextdiff.data.io import Image, read_image, write_image
from fasttextdiff.data.lvit import Sample
from fasttextdiff.data.preprocess import canonical_array, to_model_input

FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)


def _volume(tmp_path):
    rng = np.random.default_rng(0)
    volume = (rng.normal(0, 20, (9, 32, 48)) - 900).astype(np.float32)
    volume[:, 6:26, 8:40] = 40 + rng.normal(0, 20, (9, 20, 32))  # a body
    mask = np.zeros(volume.shape, np.uint8)
    mask[3:5, 8:14, 10:16] = 1  # one corner of the body, in the stored array's order
    volume[mask > 0] = 300
    like = Image(volume, (1.0, 1.0, 3.0), (5.0, -3.0, 10.0), FLIPPED, True)
    return write_image(tmp_path / "v.nii.gz", volume, like), write_image(tmp_path / "m.nii.gz", mask, like)


def test_volume_slices_are_the_inference_slices_with_their_labels_in_place(tmp_path):
    image_path, mask_path = _volume(tmp_path)
    window = (40.0, 400.0)
    ds = SegmentationDataset([Sample(image_path, mask_path, "a finding", "v")], size=32, channels=1, window=window,
                             body_crop=True)
    served = to_model_input(read_image(image_path), 32, 1, window=window, body_crop=True)
    assert len(ds) == served.shape[0] == 9
    for z in range(len(ds)):
        item = ds[z]
        assert torch.allclose(item["image"], served[z], atol=1e-2), z  # float16 cache
        bright = item["image"][0] > 0.6
        if item["label"].any():  # the mask sits on the bright marker, not on its mirror image
            assert (bright & (item["label"][0] > 0)).sum() >= 0.8 * (item["label"][0] > 0).sum(), z
        else:
            assert not bright.any(), z
    assert ds[4]["name"] == "v[z=4]"


def test_training_slices_are_canonical_and_keep_foreground_and_some_empty(tmp_path):
    image_path, mask_path = _volume(tmp_path)
    chosen = volume_training_slices(read_image(mask_path), background_every=2)
    labels = canonical_array(read_image(mask_path))
    with_fg = [z for z in range(labels.shape[0]) if labels[z].any()]
    assert set(with_fg) <= set(chosen) and len(chosen) == len(with_fg) + (labels.shape[0] - len(with_fg)) // 2
    ds = SegmentationDataset([Sample(image_path, mask_path, "t", "v", slices=chosen)], size=32, channels=1)
    assert len(ds) == len(chosen) and sum(bool(ds[i]["label"].any()) for i in range(len(ds))) == len(with_fg)

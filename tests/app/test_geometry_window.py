"""A new model's CT window follows what the labels mark: lung findings get the lung window, organs and
solid lesions the soft-tissue window (where the lung window leaves organ boundaries a few grey levels)."""

from __future__ import annotations

import sys

import numpy as np

from server_fixtures import APP_DIR

sys.path.insert(0, str(APP_DIR))
try:
    from lib.geometry import WINDOWS, ct_window
finally:
    sys.path.remove(str(APP_DIR))


def _pair(tmp_path, name, label_hu, fill_hu):
    from fasttextdiff.data.io import Image, write_image

    rng = np.random.default_rng(0)
    volume = (fill_hu + rng.normal(0, 15, (4, 24, 24))).astype(np.float32)
    mask = np.zeros(volume.shape, np.uint8)
    mask[1:3, 8:16, 8:16] = 1
    volume[mask > 0] = label_hu + rng.normal(0, 15, int(mask.sum()))
    like = Image(volume, (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), True)
    return (str(write_image(tmp_path / f"{name}.nii.gz", volume, like)),
            str(write_image(tmp_path / f"{name}_label.nii.gz", mask, like)))


def test_ground_glass_in_lung_gets_the_lung_window(tmp_path):
    window, reason = ct_window([_pair(tmp_path, "ggo", -650, -860)])
    assert window == WINDOWS["lung"] and "lung window" in reason and "-6" in reason


def test_an_organ_on_a_real_ct_gets_the_soft_tissue_window(tmp_path):
    from fasttextdiff.data import real_ct
    from fasttextdiff.data.io import write_image

    patient = real_ct.load_patient("A")
    liver = {n: k for k, n in patient.names.items()}["liver"]
    image = write_image(tmp_path / "a.nii.gz", patient.image.array.astype(np.int16), patient.image)
    label = write_image(tmp_path / "a_label.nii.gz", (patient.labels == liver).astype(np.uint8), patient.image)
    window, reason = ct_window([(str(image), str(label))])
    assert window == WINDOWS["soft_tissue"] and "soft-tissue window" in reason


def test_without_a_readable_labeled_volume_the_chest_default_stays(tmp_path):
    assert ct_window([])[0] == WINDOWS["lung"]
    assert ct_window([(str(tmp_path / "gone.nii.gz"), str(tmp_path / "gone_label.nii.gz"))])[0] == WINDOWS["lung"]

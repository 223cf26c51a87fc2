"""Body crop for CT in HU: more model pixels on the anatomy, outputs pasted back in the full grid."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from PIL import Image as PILImage

from fasttextdiff.config import BackboneConfig
from fasttextdiff.data.dataset import Sample, SegmentationDataset
from fasttextdiff.data.io import Image, read_image
from fasttextdiff.data.preprocess import body_box, canonical_array, to_model_input, to_original_grid

LUNG = (-600.0, 1500.0)
SIZE = 64
# Scaled value of -500 HU in the lung window: above it a model pixel shows body.
BODY_SCALED = (-500 - (LUNG[0] - LUNG[1] / 2)) / LUNG[1] * 2 - 1


def _body_volume(direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=(0.8, 0.7, 2.5), fill=False) -> tuple[Image,
                                                                                                      np.ndarray]:
    """2 x 256 x 256 HU volume: air around an off-centre soft-tissue ellipse (100 rows x 120 columns)."""
    yy, xx = np.mgrid[:256, :256]
    axes = (120, 125) if fill else (50, 60)
    centre = (128, 128) if fill else (80, 150)
    body = ((yy - centre[0]) / axes[0]) ** 2 + ((xx - centre[1]) / axes[1]) ** 2 <= 1
    plane = np.where(body, 40.0, -1000.0) + np.random.default_rng(0).normal(0, 10, body.shape)
    array = np.stack([plane, plane]).astype(np.int16)
    image = Image(array, spacing, (10.0, -20.0, 5.0), tuple(float(v) for v in direction), True)
    return image, np.stack([body, body])


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_crop_puts_more_model_pixels_on_the_body():
    image, body = _body_volume()
    whole = to_model_input(image, SIZE, 1, window=LUNG)
    cropped = to_model_input(image, SIZE, 1, window=LUNG, body_crop=True)
    assert cropped.shape == whole.shape == (2, 1, SIZE, SIZE)
    before, after = float((whole > BODY_SCALED).float().mean()), float((cropped > BODY_SCALED).float().mean())
    assert before < 0.2 and after > 2 * before, (before, after)
    top, left, side = body_box(image, LUNG, SIZE)
    assert SIZE <= side < 256 and 0 <= top and top + side <= 256 and 0 <= left and left + side <= 256


def test_mask_round_trips_into_the_original_oblique_grid():
    rotated = (0, -1, 0, 1, 0, 0, 0, 0, 1)  # in-plane quarter turn: canonical slices are transposed and flipped
    sagittal = (-1, 0, 0, 0, 0, 1, 0, -1, 0)  # y and z swapped: canonical slices are 2 x 256, left uncropped
    for direction in ((1, 0, 0, 0, 1, 0, 0, 0, 1), rotated, sagittal):
        image, body = _body_volume(direction=direction)
        x = to_model_input(image, SIZE, 1, window=LUNG, body_crop=True)
        mask = (x[:, 0] > BODY_SCALED).to(torch.uint8)  # what a perfect model would say, in model space
        back = to_original_grid(mask, image, "nearest", window=LUNG, body_crop=True)
        assert back.shape == body.shape and back.dtype == np.uint8
        assert _dice(back.astype(bool), body) >= 0.95
        box = body_box(image, LUNG, SIZE)
        if direction == sagittal:
            assert box is None and np.array_equal(back, to_original_grid(mask, image, "nearest"))
            continue
        # Probabilities: outside the box class 0 is certain, and uncertainty is 0.
        probs = torch.stack([1.0 - mask.float(), mask.float()], dim=1) * 0.8 + 0.1
        grid = to_original_grid(probs, image, "bilinear", window=LUNG, body_crop=True)
        unc = to_original_grid(torch.full((x.shape[0], SIZE, SIZE), 0.5), image, "bilinear", window=LUNG,
                               body_crop=True)
        top, left, side = box
        outside = np.ones(canonical_array(image).shape, dtype=np.float32)
        outside[:, max(top, 0) : top + side, max(left, 0) : left + side] = 0
        outside = to_original_grid(torch.from_numpy(outside), image, "nearest").astype(bool)  # canonical -> stored
        assert outside.any() and np.allclose(grid[0][outside], 1) and np.allclose(grid[1][outside], 0)
        assert np.allclose(unc[outside], 0) and np.allclose(unc[~outside], 0.5, atol=1e-5)
        assert _dice(grid.argmax(0).astype(bool), body) >= 0.95


def test_body_filling_the_frame_or_no_body_is_not_cropped():
    image, _ = _body_volume(fill=True)
    assert body_box(image, LUNG, SIZE) is None
    assert torch.equal(to_model_input(image, SIZE, 1, window=LUNG, body_crop=True),
                       to_model_input(image, SIZE, 1, window=LUNG))
    air = Image(np.full((2, 96, 96), -1000, np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1),
                True)
    assert body_box(air, LUNG, SIZE) is None


def test_without_window_nothing_is_cropped(tmp_path):
    """Percentile-scaled volumes and 2D PNGs are exactly as before, whatever body_crop says."""
    image, _ = _body_volume()
    assert body_box(image, None, SIZE) is None and body_box(image, LUNG, SIZE, body_crop=False) is None
    assert torch.equal(to_model_input(image, SIZE, 1, body_crop=True), to_model_input(image, SIZE, 1))
    png = tmp_path / "x.png"
    yy, xx = np.mgrid[:100, :100]
    PILImage.fromarray(np.where((yy - 30) ** 2 + (xx - 40) ** 2 < 400, 200, 0).astype(np.uint8)).save(png)
    flat = read_image(png)
    assert torch.equal(to_model_input(flat, SIZE, 1, body_crop=True), to_model_input(flat, SIZE, 1))
    mask = np.zeros((1, SIZE, SIZE), np.uint8)
    mask[0, 10:20, 10:30] = 1
    assert np.array_equal(to_original_grid(mask, flat, body_crop=True), to_original_grid(mask, flat))


def test_backbone_config_records_body_crop_and_old_records_load():
    assert BackboneConfig().body_crop is True
    assert BackboneConfig().to_dict()["body_crop"] is True
    old = BackboneConfig().to_dict()
    del old["body_crop"]
    assert BackboneConfig.from_dict(old).body_crop is False  # a model trained before the crop serves as trained
    assert BackboneConfig.from_dict({**old, "body_crop": False}).body_crop is False
    assert BackboneConfig.from_dict({**old, "body_crop": True}).body_crop is True


def test_training_dataset_crops_image_and_mask_alike(tmp_path):
    image, body = _body_volume()
    plane = sitk.GetImageFromArray(image.array[0])
    plane.SetSpacing(image.spacing[:2])
    sitk.WriteImage(plane, str(tmp_path / "slice.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(body[0].astype(np.uint8)), str(tmp_path / "mask.png"))
    sample = Sample(image=tmp_path / "slice.nii.gz", mask=tmp_path / "mask.png", text="", name="slice")
    label_fraction = {}
    for crop in (False, True):
        item = SegmentationDataset([sample], size=SIZE, channels=1, window=LUNG, body_crop=crop)[0]
        shown = item["image"][0] > BODY_SCALED
        label = item["label"][0].bool()
        assert _dice(shown.numpy(), label.numpy()) >= 0.95
        label_fraction[crop] = float(label.float().mean())
    assert label_fraction[True] > 2 * label_fraction[False]


def test_segmenter_returns_full_grid_with_background_outside_the_box(tiny_model):
    """The real Segmenter, probed with a HU window: outputs cover the whole volume, and outside the
    body box the mask is background, class 0 certain and the uncertainty 0."""
    from fasttextdiff.inference.pipeline import Segmenter

    segmenter = Segmenter.load(tiny_model, device="cpu", n_noise=2)
    backbone = segmenter.model.backbone
    backbone.config = backbone.config.replace(window=LUNG, body_crop=True)
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 60) / 20) ** 2 + ((xx - 35) / 22) ** 2 <= 1
    volume = np.stack([np.where(body, 40, -1000)] * 2).astype(np.int16)
    image = Image(volume, (0.9, 0.9, 3.0), (0.0, 0.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1), True)
    top, left, side = body_box(image, LUNG, backbone.config.image_size)
    assert side < 96
    result = segmenter.segment(image, "a lesion")
    assert result.mask.shape == result.uncertainty.shape == volume.shape
    assert result.probabilities.shape == (2,) + volume.shape
    inside = np.zeros((96, 96), bool)
    inside[top : top + side, left : left + side] = True
    outside = ~inside[::-1, ::-1]  # canonical (LPS) of this image is the stored grid turned half round
    assert (result.mask[:, outside] == 0).all() and np.allclose(result.probabilities[0][:, outside], 1)
    assert np.allclose(result.uncertainty[:, outside], 0)
    assert not np.allclose(result.probabilities[0][:, inside[::-1, ::-1]], 1)  # the model did speak inside

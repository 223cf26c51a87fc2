"""/info's validation Dice is the figure a user measures: per volume, in the volume's own grid, from the
masks the server serves. Two crops of a real CT (TotalSegmentator's patient A, fetched by `make setup`)
with the liver labeled (the reference is TotalSegmentator's own output) make the studies folder; the
server builds its model, one volume validates, and its Dice is recomputed from `/infer`'s mask."""

from __future__ import annotations

import numpy as np
import pytest

from server_fixtures import TINY_CONF, InProcessServer, wait_model_ready

pytestmark = pytest.mark.server
MODEL = "fasttextdiff"


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from fasttextdiff.data import real_ct
    from fasttextdiff.data.io import write_image

    patient = real_ct.load_patient("A")
    liver = {name: k for k, name in patient.names.items()}["liver"]
    folder = tmp_path_factory.mktemp("real-ct-studies")
    (folder / "labels" / "final").mkdir(parents=True)
    for name, slab in (("upper", slice(8, 20)), ("lower", slice(14, 26))):
        part = real_ct.crop(patient, (slab, slice(None), slice(None)))
        write_image(folder / f"{name}.nii.gz", part.image.array.astype(np.int16), part.image)
        write_image(folder / "labels" / "final" / f"{name}.nii.gz", (part.labels == liver).astype(np.uint8),
                    part.image)
        (folder / f"{name}.txt").write_text("The liver.\n", encoding="utf-8")
    return folder


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def test_info_validation_dice_equals_the_served_masks_dice(studies):
    from fasttextdiff.data.io import read_image

    conf = dict(TINY_CONF, image_size="64", epochs="40", backbone_epochs="8", window="soft_tissue")
    server = InProcessServer(studies, conf).start()
    try:
        info = wait_model_ready(server.url, 900)["models"][MODEL]
        val_images, val_dice = info["val_images"], info["val_dice"]
        assert val_images and len(val_images) == 1, info  # one of the two volumes validates, the other trains
        assert "per volume" in info["val_metric"], info
        client = server.client()
        scores = []
        for image_id in val_images:
            mask_file, answer = client.infer(MODEL, image_id, {})
            served = read_image(mask_file).array
            truth = read_image(studies / "labels" / "final" / f"{image_id}.nii.gz").array
            assert served.shape == truth.shape  # the volume's own grid
            scores.append(_dice(served, truth))
        assert val_dice == pytest.approx(float(np.mean(scores)), abs=0.01), (val_dice, scores)
        assert [r["dice"] for r in info["val_per_image"]] == pytest.approx(scores, abs=0.01)
        assert val_dice > 0.2, "a liver this large is found by even a tiny model"  # the check can fail
    finally:
        server.stop()

"""Batch inference (`POST /batch/infer/fasttextdiff`) on the real server (in-process uvicorn),
synchronously and in the background, for `images=unlabeled` and `images=all`: each saved `original`
label is compared with a direct `/infer` of the same image (MONAI Label's client).

The comparison needs masks that are not empty: an empty saved label must not pass for a right one.
The 2-epoch tiny model with the default fusion (`text_residual` "zero", a text path that starts
closed) marks no pixel of the tiny studies, so this module serves a tiny model trained with the
reference fusion ("plain"), which marks a few percent of each image; the fusion is incidental here,
batch infer runs the served model whatever it is.
"""

from __future__ import annotations

import numpy as np
import pytest

from server_fixtures import build_tiny_model, http_json, make_tiny_studies, ready_inprocess_server, wait_for

pytestmark = pytest.mark.server

MODEL = "fasttextdiff"


def _read(path):
    from fasttextdiff.data.io import read_image

    return read_image(path)


@pytest.fixture(scope="module")
def inprocess_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    model = build_tiny_model(make_tiny_studies(root / "model-studies", seed=1), root / "model",
                             {"text_residual": "plain"})
    studies = make_tiny_studies(root / "studies", seed=0)
    with ready_inprocess_server(studies, root / "state", model_dir=str(model),
                                prepare_default_model="false") as server:
        yield server


def _saved_label(server, image_id: str, tag: str) -> np.ndarray:
    """The label `tag` of `image_id` as the datastore serves it (GET /datastore/label)."""
    return _read(server.client().download_label(image_id, tag)).array


def _direct_mask(server, image_id: str) -> np.ndarray:
    """A direct /infer of the datastore image (its stored report, the served model)."""
    out, result = server.client().infer(MODEL, image_id, {})
    assert result["text_source"] in ("datastore", "none"), result
    return _read(out).array


def _agree(saved: np.ndarray, direct: np.ndarray, what: str) -> None:
    """Batch infer draws the same noise (seeded per draw) with the same model and report as a direct
    infer, so the masks are the same; a Dice of 0.99 leaves room for float summation order only."""
    assert saved.shape == direct.shape, (what, saved.shape, direct.shape)
    if not np.array_equal(saved, direct):
        a, b = saved > 0, direct > 0
        dice = 2 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())
        assert dice >= 0.99, f"{what}: the batch label differs from a direct infer (Dice {dice:.3f})"


def _batch_done(server) -> dict | None:
    status, task = http_json(server, "GET", "/batch/infer")
    assert status == 200, task
    if task["status"] in ("SUBMITTED", "RUNNING"):
        return None
    return task


def test_batch_infer_on_unlabeled_images_saves_what_a_direct_infer_gives(inprocess_server):
    """images=unlabeled, run synchronously: one `original` label per unlabeled image (and only those),
    each the mask a direct /infer of the same image gives."""
    inprocess_server.app.wait_for_background(120)
    objects = inprocess_server.client().datastore()["objects"]
    unlabeled = sorted(k for k, v in objects.items() if "final" not in v["labels"])
    labeled = sorted(set(objects) - set(unlabeled))
    assert unlabeled and labeled, "the tiny studies have labeled and unlabeled images"
    before = {k: dict(v["labels"]).get("original") for k, v in objects.items()}
    status, res = http_json(inprocess_server, "POST", f"/batch/infer/{MODEL}?images=unlabeled&run_sync=true",
                            {"device": "cpu", "max_workers": 1})
    assert status == 200, res
    assert sorted(res) == unlabeled
    objects = inprocess_server.client().datastore()["objects"]
    for image_id in labeled:  # not asked for: untouched
        assert dict(objects[image_id]["labels"]).get("original") == before[image_id], image_id
    _check_batch_labels(inprocess_server, objects, unlabeled)


def _check_batch_labels(server, objects: dict, image_ids) -> None:
    """Each image's saved `original` label equals a direct infer of it, and at least one is not empty."""
    found = 0
    for image_id in image_ids:
        assert "original" in objects[image_id]["labels"], image_id
        saved = _saved_label(server, image_id, "original")
        direct = _direct_mask(server, image_id)
        _agree(saved, direct, image_id)
        found += int(direct.any())
    assert found, "every direct mask is empty: the comparison would not see an empty batch label"


def test_batch_infer_on_all_images_in_the_background(inprocess_server):
    """images=all, run_sync=false: the task is accepted at once, GET /batch/infer/ follows it to DONE,
    and then every image (labeled ones too) has an `original` label equal to a direct infer."""
    inprocess_server.app.wait_for_background(120)
    objects = inprocess_server.client().datastore()["objects"]
    assert objects
    status, task = http_json(inprocess_server, "POST", f"/batch/infer/{MODEL}?images=all&run_sync=false",
                             {"device": "cpu", "max_workers": 1})
    assert status == 200, task
    assert task["status"] in ("SUBMITTED", "RUNNING", "DONE") and task["id"], task
    done = wait_for(lambda: _batch_done(inprocess_server), 300, 1.0, "the background batch infer to finish")
    assert done["id"] == task["id"] and done["status"] == "DONE", {k: done.get(k) for k in ("status", "details")}
    objects = inprocess_server.client().datastore()["objects"]
    _check_batch_labels(inprocess_server, objects, sorted(objects))

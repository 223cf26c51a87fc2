"""The FastTextDiff MONAI Label app on the real server (in-process uvicorn), through MONAI Label's client.

One server per module: it builds its default model from tiny demo studies on start, then every
test talks to it over HTTP with `monailabel.client.MONAILabelClient` (or raw HTTP where the client
has no call, e.g. scoring). Batch infer is tested in test_server_batch_infer.py, on a model whose
masks are not empty.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from server_fixtures import http_json

pytestmark = pytest.mark.server

MODEL = "fasttextdiff"


def _read(path):
    from fasttextdiff.data.io import read_image

    return read_image(path)


@pytest.fixture(scope="module")
def case_png(tmp_path_factory):
    """A text-necessary synthetic image: several lesions, the report names the labeled ones."""
    from fasttextdiff.data.io import Image, write_image
    from fasttextdiff.data.synthetic import render_case_details, report_for_regions

    rng = np.random.default_rng(11)
    case = render_case_details(rng, 32, "text-necessary")
    while len(case.lesion_regions) < 3:
        case = render_case_details(rng, 32, "text-necessary")
    out = tmp_path_factory.mktemp("upload")
    like = Image(case.image, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)
    path = write_image(out / "upload_case.png", case.image, like)
    label = write_image(out / "upload_case_label.png", case.mask, like)
    other = report_for_regions([r for r in case.lesion_regions if r not in case.labeled_regions])
    return {"path": path, "label": label, "report": case.report, "other_report": other}


@pytest.fixture(scope="module")
def uploaded_case(inprocess_server, case_png):
    """`upload_case` in the server's datastore with its report, whichever test asks first (each test that
    uses it asks for it, so none depends on another having run)."""
    client = inprocess_server.client()
    res = client.upload_image(str(case_png["path"]), "upload_case", {"text": case_png["report"], "replace": True})
    assert res["image"] == "upload_case"
    return case_png


def test_info_lists_tasks_and_text_option(inprocess_server):
    info = inprocess_server.client().info()
    assert info["models"][MODEL]["config"]["text"] == ""
    assert set(info["trainers"]) == {MODEL, "backbone"}
    assert {"random", "first", "uncertainty", "report_mismatch"} <= set(info["strategies"])
    assert "fasttextdiff_uncertainty" in info["scoring"]
    assert info["fasttextdiff"]["model"]["state"] == "ready"
    assert info["fasttextdiff"]["conf"]["image_size"] == 32
    from fasttextdiff.inference.batched import precision_record

    assert info["models"][MODEL]["inference"] == precision_record(None, "cpu")  # precision + device


def test_upload_with_report_then_infer_with_stored_and_explicit_text(inprocess_server, uploaded_case):
    """What the default fusion guarantees for a 2-epoch tiny model: the report reaches the output (another
    report changes the uncertainty map, the same report twice does not); not that it changes the mask (the
    text path starts closed, and such a model marks the same pixels, often none)."""
    case_png = uploaded_case
    client = inprocess_server.client()
    status, info = http_json(inprocess_server, "GET", "/datastore/image/info?image=upload_case")
    assert status == 200 and info["text"] == case_png["report"]

    stored_file, stored = client.infer(MODEL, "upload_case", {})
    assert stored["text_source"] == "datastore" and stored["text_chars"] == len(case_png["report"])
    assert stored["label_names"] == {"lesion": 1}
    assert 0 <= stored["uncertainty"]["mean"] and "lesion" in stored["uncertainty"]["per_label"]
    mask_stored = _read(stored_file)
    assert mask_stored.array.shape == (32, 32) and mask_stored.array.dtype == np.uint8

    maps = []
    for text in (case_png["report"], case_png["other_report"], case_png["report"]):
        map_file, answer = client.infer(MODEL, "upload_case", {"text": text, "result": "uncertainty"})
        assert answer["text_source"] == "request"
        maps.append(_read(map_file).array)
    assert np.array_equal(maps[0], maps[2]), "the same report gave another map: the noise draws are not seeded"
    assert not np.array_equal(maps[0], maps[1]), "another report left the output unchanged: the text is not used"

    # the uncertainty map is kept as label tag `uncertainty` and downloadable
    unc_path = client.download_label("upload_case", "uncertainty")
    unc = _read(unc_path)
    assert unc.array.shape == (32, 32) and unc.array.dtype == np.float32 and np.isfinite(unc.array).all()
    # ... or returned instead of the mask
    unc_file, unc_json = client.infer(MODEL, "upload_case", {"result": "uncertainty"})
    assert unc_json["result"] == "uncertainty" and _read(unc_file).array.dtype == np.float32


def test_report_text_set_later_with_put_info(inprocess_server):
    status, _ = http_json(inprocess_server, "GET", "/datastore/image/info?image=cxr_005")
    assert status == 200
    from monailabel.client.client import MONAILabelUtils

    text = "Unilateral pulmonary infection, one infected area, lower left lung."
    status, _, _, _ = MONAILabelUtils.http_multipart(
        "PUT", inprocess_server.url, "/datastore/image/info?image=cxr_005", {"info": json.dumps({"text": text})}, {})
    assert status == 200
    _, info = http_json(inprocess_server, "GET", "/datastore/image/info?image=cxr_005")
    assert info["text"] == text
    _, result = inprocess_server.client().infer(MODEL, "cxr_005", {})
    assert result["text_source"] == "datastore" and result["text_chars"] == len(text)


def test_volume_label_keeps_geometry(inprocess_server, tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(3)
    vol = sitk.GetImageFromArray(rng.normal(0, 100, (7, 40, 36)).astype(np.int16))
    vol.SetSpacing((0.7, 0.9, 3.0))
    vol.SetOrigin((-10.0, 5.0, 2.5))
    vol.SetDirection((0, 1, 0, 1, 0, 0, 0, 0, -1))
    path = tmp_path / "vol_geo.nii.gz"
    sitk.WriteImage(vol, str(path))
    client = inprocess_server.client()
    client.upload_image(str(path), "vol_geo", {"text": "Bilateral pulmonary infection, two infected areas."})
    out, result = client.infer(MODEL, "vol_geo", {})
    assert result["is_volume"] and result["shape"] == [7, 40, 36]
    label = sitk.ReadImage(out)
    assert label.GetSize() == vol.GetSize()
    assert np.allclose(label.GetSpacing(), vol.GetSpacing()) and np.allclose(label.GetOrigin(), vol.GetOrigin())
    assert np.allclose(label.GetDirection(), vol.GetDirection())
    assert sitk.GetArrayFromImage(label).dtype == np.uint8


def test_save_label_and_train_synchronously_publishes_only_if_validation_holds(inprocess_server, uploaded_case):
    """A train task continues from the served model and publishes its best epoch only when its validation
    Dice is not below the served model's on the same images (else the served model stays, and the
    stats say why); either way the answer and /info agree at once."""
    client = inprocess_server.client()
    before = client.info()["fasttextdiff"]["model_identity"]
    res = client.save_label("upload_case", str(uploaded_case["label"]), tag="final")
    assert res["image"] == "upload_case"
    assert "upload_case" in client.datastore()["objects"] and \
        "final" in client.datastore()["objects"]["upload_case"]["labels"]

    status, stats = http_json(inprocess_server, "POST", f"/train/{MODEL}?run_sync=true", {"max_epochs": 1})
    assert status == 200, stats
    result = stats["result"]
    assert stats["status"] == "DONE" and result["decision"] in ("published", "kept") and result["continued_from"]
    assert result["samples"] + result["val_samples"] >= 5  # 3 demo labels + this one (+ labeled volume slices)
    assert result["val_images"] and set(result["val_images"]) <= set(result["val_images"] + result["train_images"])
    info = client.info()
    assert info["train_stats"][MODEL]["status"] == "DONE"
    assert info["train_stats"][MODEL]["reason"] == result["reason"]
    if result["decision"] == "published":
        assert result["published"] and result["val_dice"] >= result["served_val_dice_before"] - 1e-9
        assert info["fasttextdiff"]["model_identity"] != before
        assert info["models"][MODEL]["val_dice"] == pytest.approx(result["val_dice"])
    else:
        assert result["published"] is None and "below the served model's" in result["reason"]
        assert info["fasttextdiff"]["model_identity"] == before
        assert info["models"][MODEL]["val_dice"] == pytest.approx(result["served_val_dice_before"])
    # the served model (new or kept) serves at once
    _, served = client.infer(MODEL, "upload_case", {})
    assert served["model"] == info["fasttextdiff"]["model_identity"]


def test_scoring_is_per_unlabeled_image_with_text_and_incremental(inprocess_server):
    app = inprocess_server.app
    app.wait_for_background(120)  # MONAI Label's automatic scoring after train may be running
    status, res = http_json(inprocess_server, "POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", {})
    assert status == 200, res
    identity = inprocess_server.client().info()["fasttextdiff"]["model_identity"]
    objects = inprocess_server.client().datastore()["objects"]
    unlabeled = [k for k, v in objects.items() if "final" not in v["labels"]]
    assert unlabeled
    for image_id in unlabeled:
        entry = objects[image_id]["image"]["info"].get("fasttextdiff_uncertainty")
        assert entry and entry["model"] == identity and entry["score"] >= 0, image_id
    status, again = http_json(inprocess_server, "POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", {})
    assert status == 200 and again["scored"] == 0 and again["skipped"] == len(unlabeled)


def test_next_sample_uncertainty_returns_unlabeled_image_with_report(inprocess_server):
    client = inprocess_server.client()
    sample = client.next_sample("uncertainty", {})
    objects = client.datastore()["objects"]
    assert sample["id"] in objects and "final" not in objects[sample["id"]]["labels"]
    assert "text" in sample and sample.get("score_current") is True
    scores = {k: v["image"]["info"]["fasttextdiff_uncertainty"]["score"] for k, v in objects.items()
              if "final" not in v["labels"] and "fasttextdiff_uncertainty" in v["image"]["info"]}
    assert sample["uncertainty"] == pytest.approx(max(scores.values()))
    for strategy in ("random", "first"):
        assert client.next_sample(strategy, {})["id"] in scores


def test_info_answers_quickly_during_a_volume_infer(inprocess_server, tmp_path):
    """MONAI Label's /infer blocks the event loop; the app moves it to a worker thread."""
    import SimpleITK as sitk

    vol = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 100, (64, 128, 128)).astype(np.int16))
    path = tmp_path / "slow_vol.nii.gz"
    sitk.WriteImage(vol, str(path))
    client = inprocess_server.client()
    client.upload_image(str(path), "slow_vol", {"text": "Bilateral pulmonary infection."})
    done: dict = {}

    def run():
        t0 = time.perf_counter()
        done["result"] = client.infer(MODEL, "slow_vol", {"n_noise": 8})
        done["seconds"] = time.perf_counter() - t0

    thread = threading.Thread(target=run)
    thread.start()
    waits = []
    time.sleep(0.2)
    while thread.is_alive():
        t0 = time.perf_counter()
        status, _ = http_json(inprocess_server, "GET", "/info/")
        waits.append(time.perf_counter() - t0)
        assert status == 200
        time.sleep(0.05)
    thread.join()
    assert "result" in done
    print(f"\n/info during a {done['seconds']:.2f}s volume infer: n={len(waits)} "
          f"max={max(waits or [0]):.3f}s median={float(np.median(waits or [0])):.3f}s")
    assert len(waits) >= 2, "the infer finished too fast to measure"
    assert max(waits) < max(0.5 * done["seconds"], 0.5)


def test_train_tasks_hold_only_plain_values(inprocess_server):
    """A task carries only plain values (typed conf, folder paths): it pickles, and its multi-GPU runs get
    everything they need as a JSON job (`accelerate launch ... run-job`)."""
    import pickle

    for name in (MODEL, "backbone"):
        task = inprocess_server.app._trainers[name]
        clone = pickle.loads(pickle.dumps(task))
        assert type(clone).__name__ == type(task).__name__
        assert clone.conf == task.conf and clone.paths == task.paths
        assert clone.config()["multi_gpu"] is True


def test_infer_on_an_uploaded_file_not_in_the_datastore(inprocess_server, case_png):
    client = inprocess_server.client()
    before = set(client.datastore()["objects"])
    out, result = client.infer(MODEL, "", {"text": case_png["report"]}, file=str(case_png["path"]))
    assert result["text_source"] == "request" and "map" not in result["uncertainty"]
    assert _read(out).array.shape == (32, 32)
    assert set(client.datastore()["objects"]) == before  # nothing stored for a one-off file

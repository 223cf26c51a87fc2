"""The active-learning loop on a user's own studies, on the real server through MONAI Label's client.

A folder of unlabeled CT-like volumes with `<name>.txt` reports goes through `fasttextdiff
import-studies`, the server reads the reports on start and waits for labels, a train request is
refused (409) while it cannot start, the first saved label starts the default model, a train task
continues from the served model and publishes only when validation Dice does not drop, and a
training made worse on purpose (corrupted training labels, a huge learning rate) leaves the served
model's files untouched with the reason in the train stats. A 512x512 CT volume is modelled at
128 px on a CPU with the window its labels call for, stated in /info.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from server_fixtures import TINY_CONF, InProcessServer, http_json, wait_model_ready

pytestmark = pytest.mark.server
MODEL = "fasttextdiff"


def _tree_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Unlabeled CT-like volumes (HU) with reports in .txt files, their masks kept aside, and a text
    file named like an image."""
    from fasttextdiff.data.io import Image, write_image
    from fasttextdiff.data.demo_studies import VOLUME_SPACING, _volume_case

    src = tmp_path_factory.mktemp("source")
    masks = tmp_path_factory.mktemp("masks")
    rng = np.random.default_rng(3)
    cases = {}
    for i in range(4):
        volume, mask, report = _volume_case(rng, 32, 6, "standard")
        like = Image(volume, VOLUME_SPACING, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), True)
        write_image(src / f"chest {i}.nii.gz", volume, like)
        (src / f"chest {i}.txt").write_text(report + "\n", encoding="utf-8")
        cases[f"chest_{i}"] = {"report": report, "mask": write_image(masks / f"chest_{i}.nii.gz", mask, like),
                               "empty": write_image(masks / f"chest_{i}_empty.nii.gz", np.zeros_like(mask), like)}
    (src / "notes.png").write_text("not an image")
    return {"dir": src, "cases": cases}


@pytest.fixture(scope="module")
def server(source, tmp_path_factory):
    from fasttextdiff.commands.main import main

    studies = tmp_path_factory.mktemp("studies") / "mine"
    assert main(["import-studies", str(source["dir"]), "--out", str(studies),
                 "--json", str(studies.parent / "import.json")]) == 0
    summary = json.loads((studies.parent / "import.json").read_text(encoding="utf-8"))
    assert sorted(c["id"] for c in summary["imported"]) == sorted(source["cases"])
    assert all(c["report"] and not c["label"] and c["volume"] for c in summary["imported"])
    assert [s["source"] for s in summary["skipped"]] == ["notes.png"]
    assert "cannot read the image" in summary["skipped"][0]["reason"]
    conf = dict(TINY_CONF, epochs="60", backbone_epochs="10")
    srv = InProcessServer(studies, conf).start()
    yield srv
    srv.stop()


def test_import_then_label_then_train_answers_each_step(server, source):
    client = server.client()
    studies = server.studies
    state = studies / ".fasttextdiff"

    # the server read every report from its .txt file, and waits for labels
    for image_id, case in source["cases"].items():
        assert client.datastore()["objects"][image_id]["image"]["info"]["text"] == case["report"].strip()
    info = client.info()
    assert info["fasttextdiff"]["model"]["state"] == "waiting", info["fasttextdiff"]["model"]
    assert "no final labels yet" in info["fasttextdiff"]["model"]["message"]

    # a train request that cannot start is refused before MONAI Label submits it
    status, body = http_json(server, "POST", f"/train/{MODEL}", {"max_epochs": 1})
    assert status == 409 and "no image has a final label yet" in body["detail"], body
    status, body = http_json(server, "POST", "/train/", {})
    assert status == 409, body

    # the first labels start the default model; training meanwhile is refused with the reason
    client.save_label("chest_0", str(source["cases"]["chest_0"]["mask"]), tag="final")
    status, body = http_json(server, "POST", f"/train/{MODEL}", {"max_epochs": 1})
    assert status == 409 and "being built" in body["detail"], body
    server.app.wait_for_background(600)  # the build started by the first label
    client.save_label("chest_1", str(source["cases"]["chest_1"]["mask"]), tag="final")
    info = wait_model_ready(server.url, 600)
    model = info["models"][MODEL]
    # HU volumes whose labeled lesions are denser than lung parenchyma: the soft-tissue window
    from fasttextdiff.data.io import read_image

    image_file = next(studies.glob("chest_0.*"))
    volume, mask = (read_image(p).array for p in (image_file, source["cases"]["chest_0"]["mask"]))
    assert np.median(volume[mask > 0]) > -400
    assert model["image_size"] == 32 and model["window"] == [50.0, 350.0], model
    assert "soft-tissue window" in model["geometry_choice"]["window_reason"], model["geometry_choice"]
    assert (state / "model" / "current").exists()  # state under the studies folder, not in the code tree
    assert not any(p.name.startswith("mine-")
                   for p in (Path(__file__).parents[2] / "monailabel_app" / "model").glob("*")) \
        if (Path(__file__).parents[2] / "monailabel_app" / "model").is_dir() else True

    # a train task now continues from the served model and publishes only if validation Dice holds
    before = info["fasttextdiff"]["model_identity"]
    status, stats = http_json(server, "POST", f"/train/{MODEL}?run_sync=true", {"max_epochs": 3})
    assert status == 200 and stats["status"] == "DONE", stats
    result = stats["result"]
    split = json.loads((state / "validation_split.json").read_text(encoding="utf-8"))["val"]
    assert result["val_images"] == split == ["chest_0"] or result["val_images"] == split == ["chest_1"]
    assert result["continued_from"], result
    served_before = result["served_val_dice_before"]
    assert served_before is not None and result["val_dice"] is not None
    print(f"\ncontinued training: {result['reason']}")
    info = client.info()
    if result["decision"] == "published":
        assert result["val_dice"] >= served_before - 1e-9
        assert info["fasttextdiff"]["model_identity"] != before
    else:
        assert result["val_dice"] < served_before and info["fasttextdiff"]["model_identity"] == before
    assert info["fasttextdiff"]["model"]["state"] == "ready"
    assert info["models"][MODEL]["val_dice"] == pytest.approx(max(result["val_dice"], served_before))
    assert info["train_stats"][MODEL]["reason"] == result["reason"]
    assert (Path(info["fasttextdiff"]["model"]["model_dir"]) / "training_curve.png").is_file()


def test_worse_training_keeps_the_served_model(server, source):
    """Training labels replaced by empty masks and a huge learning rate: the new best validation
    Dice is below the served model's, so nothing is published and the stats say why."""
    client = server.client()
    state = server.studies / ".fasttextdiff"
    val = json.loads((state / "validation_split.json").read_text(encoding="utf-8"))["val"]
    served_dir = Path(client.info()["fasttextdiff"]["model"]["model_dir"])
    served_val = client.info()["models"][MODEL]["val_dice"]
    assert served_val > 0.05, "the served model must have something to lose"
    for image_id in ("chest_0", "chest_1", "chest_2"):
        if image_id not in val:
            client.save_label(image_id, str(source["cases"][image_id]["empty"]), tag="final")
    identity, files = client.info()["fasttextdiff"]["model_identity"], _tree_hash(served_dir)

    status, stats = http_json(server, "POST", f"/train/{MODEL}?run_sync=true", {"max_epochs": 1, "lr": 0.9})
    assert status == 200 and stats["status"] == "DONE", stats
    result = stats["result"]
    print(f"\nworse training: {result['reason']}")
    assert result["decision"] == "kept" and result["published"] is None, result
    assert "below the served model's" in result["reason"] and "still serving" in result["reason"]
    assert result["val_images"] == val
    info = client.info()
    assert info["fasttextdiff"]["model_identity"] == identity
    assert Path(info["fasttextdiff"]["model"]["model_dir"]) == served_dir and _tree_hash(served_dir) == files
    assert info["models"][MODEL]["val_dice"] == pytest.approx(result["served_val_dice_before"])
    assert info["train_stats"][MODEL]["decision"] == "kept"


def test_backbone_task_continues_and_publishes_backbone_and_model_together_or_neither(server):
    """`backbone` continues the current backbone, retrains fusion + head on its features in the same job
    and publishes both only if validation Dice holds (here the training labels are still corrupted)."""
    client = server.client()
    state = server.studies / ".fasttextdiff"
    backbone_before = (state / "backbone" / "current").resolve()
    identity = client.info()["fasttextdiff"]["model_identity"]
    status, stats = http_json(server, "POST", "/train/backbone?run_sync=true",
                              {"max_epochs": 1, "segmenter_epochs": 1})
    assert status == 200 and stats["status"] == "DONE", stats
    result = stats["result"]
    print(f"\nbackbone task: {result['reason']}")
    assert result["backbone"]["continued_from"] == str(backbone_before)
    assert result["segmenter"]["continued_from"] and result["decision"] in ("published", "kept")
    info = client.info()
    if result["decision"] == "kept":
        assert (state / "backbone" / "current").resolve() == backbone_before
        assert info["fasttextdiff"]["model_identity"] == identity and "backbone_published" not in result
    else:
        assert (state / "backbone" / "current").resolve() == Path(result["backbone_published"])
        assert info["fasttextdiff"]["model_identity"] != identity
    assert info["train_stats"]["backbone"]["reason"] == result["reason"]


def test_validation_split_is_kept_as_labels_grow(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[2] / "monailabel_app"))
    try:
        from lib.holdout import split_labeled
    finally:
        sys.path.pop(0)
    train, val, held = split_labeled(["a"], tmp_path)
    assert (train, val, held) == (["a"], ["a"], False)
    ids = [f"img{i}" for i in range(5)]
    train, val, held = split_labeled(ids, tmp_path)
    assert held and len(val) == 1 and sorted(train + val) == ids
    first = val[0]
    for n in range(6, 12):  # more labels: the first validation image stays, more join to keep ~20%
        ids.append(f"img{n}")
        _, val, _ = split_labeled(ids, tmp_path)
        assert first in val and len(val) == max(1, round(0.2 * len(ids)))
    assert json.loads((tmp_path / "validation_split.json").read_text(encoding="utf-8"))["val"] == val


def test_512px_ct_is_modelled_at_128px_with_the_window_its_label_calls_for(tmp_path):
    """CPU defaults on a 512x512 CT volume (2 slices, HU) labeled in the lung: /info states 128 px and the
    lung window.
    Kept fast: 2 slices, backbone widths 8/16, one epoch of each stage."""
    from fasttextdiff.data.io import Image, write_image

    studies = tmp_path / "ct512"
    studies.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:512, :512]
    body = ((yy - 256) ** 2 / 200 ** 2 + (xx - 256) ** 2 / 230 ** 2) < 1
    lungs = (((yy - 250) ** 2 / 120 ** 2 + (xx - 170) ** 2 / 60 ** 2) < 1) | \
        (((yy - 250) ** 2 / 120 ** 2 + (xx - 342) ** 2 / 60 ** 2) < 1)
    plane = np.where(body, 40, -1000) + np.where(lungs, -860, 0) + rng.normal(0, 20, (512, 512))
    volume = np.stack([plane, plane]).astype(np.int16)
    mask = np.zeros_like(volume, dtype=np.uint8)
    mask[:, 230:260, 150:180] = 1
    like = Image(volume, (0.7, 0.7, 5.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), True)
    write_image(studies / "ct.nii.gz", volume, like)
    (studies / "labels" / "final").mkdir(parents=True)
    write_image(studies / "labels" / "final" / "ct.nii.gz", mask, like)
    conf = {k: v for k, v in TINY_CONF.items() if k != "image_size"}  # CPU default size
    srv = InProcessServer(studies, dict(conf, epochs="1", backbone_epochs="1")).start()
    try:
        info = wait_model_ready(srv.url, 600)
        model = info["models"][MODEL]
        # the label lies in the lung (about -820 HU): the lung window
        assert model["image_size"] == 128 and model["window"] == [-600.0, 1500.0], model
        assert "HU window center -600" in model["intensity"]
        assert "labeled findings are at median -8" in model["geometry_choice"]["window_reason"], model
        assert model["body_crop"] is True  # enabled; this body fills > 90 % of the frame, so no box is cut
        choice = model["geometry_choice"]
        assert choice["native_size"] == 512 and "CPU default 128 px" in choice["size_reason"]
        record = json.loads((Path(info["fasttextdiff"]["model"]["model_dir"]) / "fasttextdiff.json")
                            .read_text(encoding="utf-8"))
        assert record["backbone"]["image_size"] == 128 and record["backbone"]["window"] == [-600.0, 1500.0]
        assert record["backbone"]["body_crop"] is True
    finally:
        srv.stop()

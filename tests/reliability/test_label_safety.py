"""Nothing a person saved is lost: the model writes only machine tags, tags have one case, a label is
one file per image and tag, and every replaced or deleted human label is kept and can be restored.

Each request path that could destroy or shadow a person's label is tried against a real MONAI Label
server (in-process, on 127.0.0.1) serving a tiny model, through MONAI Label's own client where it
has the call, and the studies folder's human labels are compared byte for byte before and after.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from server_fixtures import TINY_CONF, InProcessServer, make_tiny_studies

MODEL = "fasttextdiff"


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _human_labels(studies: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under labels/ except the model's own tags."""
    labels = studies / "labels"
    return {str(p.relative_to(labels)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(labels.rglob("*")) if p.is_file() and p.relative_to(labels).parts[0]
            not in ("original", "uncertainty")}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_root):  # noqa: F811 - the fixture
    studies = make_tiny_studies(tmp_path_factory.mktemp("safety-studies") / "demo", seed=5)
    conf = dict(TINY_CONF, model_dir=str(tiny_model_root), prepare_default_model="false",
                state_dir=str(tmp_path_factory.mktemp("safety-state")))
    srv = InProcessServer(studies, conf).start()
    try:
        yield srv
    finally:
        srv.stop()


def _objects(server) -> dict:
    return server.client().datastore()["objects"]


def _a_2d_image(server, labeled: bool) -> str:
    objects = _objects(server)
    return next(k for k, v in sorted(objects.items())
                if v["image"]["ext"] == ".png" and ("final" in v["labels"]) == labeled)


def _label_of(server, image_id: str, value: int = 1) -> bytes:
    from PIL import Image

    with Image.open(server.studies / f"{image_id}.png") as im:
        h, w = im.size[1], im.size[0]
    mask = np.zeros((h, w), np.uint8)
    mask[: h // 2, : max(1, value)] = 1
    return _png(mask)


@pytest.mark.parametrize("tag", ["final", "FINAL", "Final", "reviewed"])
def test_batch_infer_into_a_human_tag_is_refused_and_changes_nothing(server, tag):
    before = _human_labels(server.studies)
    assert before, "the demo studies hold human labels"
    folders = sorted(p.name for p in (server.studies / "labels").iterdir())
    r = requests.post(f"{server.url}/batch/infer/{MODEL}?run_sync=true&images=labeled", json={"label_tag": tag},
                      timeout=120)
    assert r.status_code == 400, r.text
    assert "original" in r.json()["detail"] and "holds labels a person saved" in r.json()["detail"]
    assert _human_labels(server.studies) == before
    assert sorted(p.name for p in (server.studies / "labels").iterdir()) == folders  # no labels/FINAL/


def test_the_model_cannot_write_a_human_tag_by_any_datastore_call(server):
    """MONAI Label's own infer and batch infer save through `save_label`: it takes machine tags only."""
    from fastapi import HTTPException

    datastore = server.app.datastore()
    image_id = _a_2d_image(server, labeled=True)
    label = server.studies / "labels" / "final" / f"{image_id}.png"
    before = label.read_bytes()
    for call in (datastore.save_label, datastore.store_label):
        for tag in ("final", "FINAL", "other"):
            with pytest.raises(HTTPException) as refused:
                call(image_id, str(label), tag, {})
            assert refused.value.status_code == 400
    with pytest.raises(HTTPException):
        datastore.save_human_label(image_id, str(label), "original", {})
    assert label.read_bytes() == before


def test_batch_infer_writes_predictions_beside_human_labels_never_over_them(server):
    before = _human_labels(server.studies)
    r = requests.post(f"{server.url}/batch/infer/{MODEL}?run_sync=true&images=labeled",
                      json={"device": "cpu", "max_workers": 1}, timeout=600)
    assert r.status_code == 200, r.text
    labeled = [k for k, v in _objects(server).items() if "final" in v["labels"]]
    assert labeled and set(r.json()) == set(labeled)
    assert _human_labels(server.studies) == before
    for image_id in labeled:
        assert list((server.studies / "labels" / "original").glob(f"{image_id}.*")), image_id


def test_a_label_saved_twice_keeps_the_first_and_restoring_it_gives_back_its_bytes(server, tmp_path):
    image_id = _a_2d_image(server, labeled=False)
    first, second = _label_of(server, image_id, 3), _label_of(server, image_id, 7)
    client = server.client()
    (tmp_path / "first.png").write_bytes(first)
    client.save_label(image_id, str(tmp_path / "first.png"), tag="final", params={"note": "first"})
    # the second save in another format and another case of the tag: still the one `final` label
    import SimpleITK as sitk

    from PIL import Image

    nrrd = tmp_path / "second.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(Image.open(io.BytesIO(second)))), str(nrrd))
    client.save_label(image_id, str(nrrd), tag="FINAL", params={"note": "second"})
    files = sorted(p.name for p in (server.studies / "labels" / "final").glob(f"{image_id}.*"))
    assert files == [f"{image_id}.nrrd"], files
    assert not (server.studies / "labels" / "FINAL").exists()

    history = requests.get(f"{server.url}/datastore/label/history", params={"image": image_id, "tag": "final"},
                           timeout=30).json()
    kept = history["versions"]["final"]
    assert len(kept) == 1 and kept[0]["reason"] == "replaced" and kept[0]["info"]["note"] == "first"
    assert kept[0]["ext"] == ".png" and kept[0]["bytes"] == len(first)

    r = requests.post(f"{server.url}/datastore/label/restore",
                      params={"image": image_id, "tag": "final", "version": kept[0]["version"]}, timeout=30)
    assert r.status_code == 200, r.text
    got = requests.get(f"{server.url}/datastore/label", params={"label": image_id, "tag": "final"}, timeout=30)
    assert got.status_code == 200 and got.content == first
    # the restore kept the label it replaced: two versions now, the newest being the NRRD
    kept = requests.get(f"{server.url}/datastore/label/history", params={"image": image_id},
                        timeout=30).json()["versions"]["final"]
    assert [v["ext"] for v in kept] == [".nrrd", ".png"]
    assert sorted(p.name for p in (server.studies / "labels" / "final").glob(f"{image_id}.*")) == [f"{image_id}.png"]


def test_restore_refuses_unknown_versions_and_machine_tags(server):
    image_id = _a_2d_image(server, labeled=True)
    before = _human_labels(server.studies)
    for params, status in (({"version": "20260101T000000000000-abcdef"}, 404), ({"version": "../../x"}, 404),
                           ({"version": "20260101T000000000000-abcdef", "tag": "original"}, 400)):
        r = requests.post(f"{server.url}/datastore/label/restore", params={"image": image_id, **params}, timeout=30)
        assert r.status_code == status, r.text
    r = requests.get(f"{server.url}/datastore/label/history", params={"image": "no_such_image"}, timeout=30)
    assert r.status_code == 404
    assert _human_labels(server.studies) == before


@pytest.mark.parametrize("tag", ["original", "uncertainty", "ORIGINAL"])
def test_a_person_cannot_save_into_the_models_tags(server, tag, tmp_path):
    image_id = _a_2d_image(server, labeled=False)
    r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": tag},
                     files={"label": ("l.png", _label_of(server, image_id))}, timeout=30)
    assert r.status_code == 400 and "model's output" in r.json()["detail"], r.text


def test_deleting_a_label_keeps_it_restorable(server, tmp_path):
    image_id = _a_2d_image(server, labeled=True)
    path = server.studies / "labels" / "final" / f"{image_id}.png"
    original = path.read_bytes()
    r = requests.delete(f"{server.url}/datastore/label", params={"id": image_id, "tag": "final"}, timeout=30)
    assert r.status_code == 200, r.text
    assert not path.exists() and "final" not in _objects(server)[image_id]["labels"]
    kept = requests.get(f"{server.url}/datastore/label/history", params={"image": image_id, "tag": "final"},
                        timeout=30).json()["versions"]["final"]
    assert kept[0]["reason"] == "deleted"
    r = requests.post(f"{server.url}/datastore/label/restore",
                      params={"image": image_id, "version": kept[0]["version"]}, timeout=30)
    assert r.status_code == 200, r.text
    assert path.read_bytes() == original and "final" in _objects(server)[image_id]["labels"]


def test_deleting_or_replacing_an_image_keeps_its_human_labels(server, tmp_path):
    # a fresh image with a label, then replaced by one of another size: the label no longer fits
    rng = np.random.default_rng(3)
    image = _png(rng.integers(0, 255, (32, 32), dtype=np.uint8))
    client = server.client()
    (tmp_path / "keep_me.png").write_bytes(image)
    client.upload_image(str(tmp_path / "keep_me.png"), image_id="keep_me", params={"text": "a report"})
    label = _label_of(server, "keep_me", 4)
    (tmp_path / "label.png").write_bytes(label)
    client.save_label("keep_me", str(tmp_path / "label.png"), tag="final")
    bigger = _png(rng.integers(0, 255, (48, 48), dtype=np.uint8))
    r = requests.put(f"{server.url}/datastore/image", params={"image": "keep_me"},
                     data={"params": json.dumps({"replace": True})}, files={"file": ("b.png", bigger)}, timeout=30)
    assert r.status_code == 200, r.text
    moved = r.json()["labels_moved_aside"]
    assert [m["tag"] for m in moved] == ["final"] and moved[0]["version"]
    history = requests.get(f"{server.url}/datastore/label/history", params={"image": "keep_me"}, timeout=30).json()
    assert history["versions"]["final"][0]["reason"] == "does not fit the replaced image"
    assert Path(moved[0]["to"]).read_bytes() == label

    # a label of the new size, then the image deleted: the label is kept, listed after the image is gone
    (tmp_path / "label48.png").write_bytes(_png(np.ones((48, 48), np.uint8)))
    client.save_label("keep_me", str(tmp_path / "label48.png"), tag="final")
    r = requests.delete(f"{server.url}/datastore/image", params={"id": "keep_me"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "keep_me" not in _objects(server)
    versions = requests.get(f"{server.url}/datastore/label/history", params={"image": "keep_me"},
                            timeout=30).json()["versions"]["final"]
    assert [v["reason"] for v in versions] == ["image deleted", "does not fit the replaced image"]
    kept_images = server.app.datastore().history.versions("_image", "keep_me")
    assert [v["reason"] for v in kept_images] == ["image deleted", "replaced by an upload"]


@pytest.mark.parametrize("name", ["CASE.PNG", "CT.NII.GZ", "IMG.DCM", "Mixed.Png"])
def test_upper_case_extensions_are_accepted_like_their_lower_case_twins(server, name, tmp_path):
    import pydicom.data

    if name == "IMG.DCM":
        data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    elif name == "CT.NII.GZ":
        import nibabel as nib

        nii = tmp_path / "v.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.int16), np.eye(4)), str(nii))
        data = nii.read_bytes()
    else:
        data = _png(np.zeros((32, 32), np.uint8))
    image_id = f"up_{name.split('.')[0].lower()}"
    r = requests.put(f"{server.url}/datastore/image", params={"image": image_id}, files={"file": (name, data)},
                     timeout=60)
    assert r.status_code == 200, r.text
    ext = name[name.index("."):].lower()
    stored = _objects(server)[image_id]["image"]
    assert stored["ext"] == ext and (server.studies / f"{image_id}{ext}").is_file()
    if name.endswith(("PNG", "Png")):  # a label with an upper-case extension too
        r = requests.put(f"{server.url}/datastore/label", params={"image": image_id, "tag": "final"},
                         files={"label": ("L.PNG", data)}, timeout=30)
        assert r.status_code == 200, r.text
        assert (server.studies / "labels" / "final" / f"{image_id}.png").is_file()
    requests.delete(f"{server.url}/datastore/image", params={"id": image_id}, timeout=30)


def test_an_infer_on_a_session_upload_saves_no_label(server, tmp_path):
    before = _human_labels(server.studies)
    original = sorted((server.studies / "labels" / "original").glob("*")) \
        if (server.studies / "labels" / "original").is_dir() else []
    image_id = _a_2d_image(server, labeled=True)
    upload = tmp_path / f"{image_id}.png"  # the name of a labeled image: a session must not reach its labels
    shutil.copyfile(server.studies / f"{image_id}.png", upload)
    client = server.client()
    session = client.create_session(str(upload))["session_id"]
    r = requests.post(f"{server.url}/infer/{MODEL}", params={"session_id": session, "output": "json"},
                      data={"params": json.dumps({"text": "left lung"})}, timeout=120)
    assert r.status_code == 200, r.text
    r = requests.post(f"{server.url}/infer/{MODEL}", params={"session_id": session, "output": "json"},
                      data={"params": json.dumps({"label_tag": "final", "save_label": True})}, timeout=120)
    assert r.status_code == 400
    assert _human_labels(server.studies) == before
    now = sorted((server.studies / "labels" / "original").glob("*")) \
        if (server.studies / "labels" / "original").is_dir() else []
    assert now == original


def test_label_history_cli_lists_and_restores(server, tmp_path):
    import subprocess

    image_id = _a_2d_image(server, labeled=True)
    path = server.studies / "labels" / "final" / f"{image_id}.png"
    first = path.read_bytes()
    (tmp_path / "new.png").write_bytes(_label_of(server, image_id, 9))
    server.client().save_label(image_id, str(tmp_path / "new.png"), tag="final")
    assert path.read_bytes() != first
    cli = [sys.executable, "-m", "fasttextdiff.commands.main", "label-history", "--server", server.url, "--image",
           image_id]
    listed = subprocess.run(cli + ["--tag", "final", "--json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    version = json.loads(listed.stdout)["versions"]["final"][0]["version"]
    shown = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and version in shown.stdout and "replaced" in shown.stdout
    restored = subprocess.run(cli + ["--restore", version], capture_output=True, text=True, timeout=120)
    assert restored.returncode == 0, restored.stderr
    assert path.read_bytes() == first
    bad = subprocess.run(cli + ["--restore", "20260101T000000000000-abcdef"], capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode != 0 and "404" in bad.stderr


def test_import_into_an_existing_studies_folder_never_replaces_a_file(tmp_path):
    from fasttextdiff.data.import_studies import import_studies

    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    person = _png(np.ones((32, 32), np.uint8))
    (studies / "labels" / "final" / "case1.png").write_bytes(person)  # a label whose image is not there
    (studies / "CASE2.png").write_bytes(_png(np.zeros((32, 32), np.uint8)))  # another case of an id
    before = {p: p.read_bytes() for p in studies.rglob("*") if p.is_file()}
    src = tmp_path / "src"
    src.mkdir()
    for name in ("case1", "case2", "case3"):
        (src / f"{name}.png").write_bytes(_png(np.full((32, 32), 50, np.uint8)))
        (src / f"{name}_mask.png").write_bytes(_png(np.zeros((32, 32), np.uint8)))
    summary = import_studies(src, studies, progress=False)
    assert [c["id"] for c in summary["imported"]] == ["case3"]
    assert sorted(s["source"] for s in summary["skipped"]) == ["case1.png", "case2.png"]
    assert all("already in the studies folder" in s["reason"] for s in summary["skipped"])
    assert {p: p.read_bytes() for p in before} == before


def test_a_replaced_report_is_kept(server):
    image_id = _a_2d_image(server, labeled=False)
    before = server.client().datastore()["objects"][image_id]["image"]["info"]["text"]
    r = requests.put(
        f"{server.url}/datastore/image/info",
        params={"image": image_id},
        data={"info": json.dumps({"text": "Unilateral pulmonary infection, one infected area, upper left lung."})},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    history = requests.get(f"{server.url}/datastore/label/history", params={"image": image_id}, timeout=30).json()
    assert history["reports"][0]["text"] == before and history["reports"][0]["reason"] == "replaced"

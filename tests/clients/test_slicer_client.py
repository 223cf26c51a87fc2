"""ReportSegmentLib's client against the real FastTextDiff MONAI Label server.

The server is `monailabel start_server --app monailabel_app` on 127.0.0.1 in a subprocess
(tests/server_fixtures.py: tiny studies, a tiny ready model). The scenario is the Slicer user's:
attach a report to an uploaded volume, read it back, segment with it, fetch the next sample with
its report, submit a label, start training and poll its status — plus the errors a user meets.
Nothing of ours is mocked; the client is the very code the Slicer module runs.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from ReportSegmentLib import FastTextDiffClient, ReportSegmentError, describe_server

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


pytestmark = pytest.mark.server

REPORT = "Single round opacity in the right upper zone.\r\nNo effusion.  "
REPORT_NORMALIZED = "Single round opacity in the right upper zone.\nNo effusion."


@pytest.fixture(scope="module")
def tiny_model_root(shared_tiny_model_root):  # noqa: F811
    """The one tiny model the Slicer and viewer tests share (built once per run)."""
    return shared_tiny_model_root


@pytest.fixture(scope="module", autouse=True)
def _venv_on_path():
    """MONAI Label's `monailabel` launcher is a bash script that runs `python` from PATH: make that
    the interpreter running the tests (the venv's), also when the venv is not activated."""
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved])
    yield
    os.environ["PATH"] = saved


@pytest.fixture(scope="module")
def client(_venv_on_path, subprocess_server) -> FastTextDiffClient:  # noqa: F811
    return FastTextDiffClient(subprocess_server.url, timeout=120)


@pytest.fixture(scope="module")
def volume_file(tmp_path_factory) -> Path:
    """A small CT-like volume (6 × 32 × 32) with a bright blob, written as Slicer would (NRRD)."""
    z, y, x = np.mgrid[0:6, 0:32, 0:32]
    array = np.where((x - 20) ** 2 + (y - 10) ** 2 + ((z - 3) * 4) ** 2 < 40, 300, -700).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.8, 2.5))
    image.SetOrigin((-12.0, 4.0, 30.0))
    path = tmp_path_factory.mktemp("slicer-upload") / "SlicerVolume.nrrd"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def uploaded(client, volume_file) -> str:
    return client.upload_image(str(volume_file), image_id="slicer_case_1", text=REPORT)


def test_info_lists_model_labels_and_strategies(client):
    info = client.info()
    assert "fasttextdiff" in info["models"]
    assert {"uncertainty", "random", "first"} <= set(info["strategies"])
    assert client.model_state(info).get("state") == "ready"
    line = describe_server(info)
    assert "models: fasttextdiff" in line and "uncertainty" in line and "lesion" in line
    assert "model ready" in line
    # the server's report limit replaces the default
    assert client.max_report_bytes == info["fasttextdiff"]["conf"]["max_text_bytes"]


def test_report_attached_to_uploaded_volume_reads_back(client, uploaded):
    assert uploaded == "slicer_case_1"
    assert client.image_exists(uploaded)
    assert client.get_report(uploaded) == REPORT_NORMALIZED
    info = client.image_info(uploaded)
    assert info["name"].endswith(".nrrd")


def test_unused_image_id_never_lands_on_an_existing_image(client, uploaded):
    assert client.unused_image_id("slicer_never_used") == "slicer_never_used"
    fresh = client.unused_image_id(uploaded)
    assert fresh == uploaded + "_2" and not client.image_exists(fresh)


def test_report_update_keeps_the_stored_image(client, uploaded, volume_file, tmp_path):
    new_text = "Two opacities: right upper zone and left lower zone (é, ü)."
    assert client.set_report(uploaded, new_text) == new_text
    assert client.get_report(uploaded) == new_text
    # uploading again under the same id only updates the report (the image is not re-sent)
    other = tmp_path / "other.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 2, sitk.sitkInt16), str(other))
    assert client.upload_image(str(other), image_id=uploaded, text=REPORT) == uploaded
    assert client.get_report(uploaded) == REPORT_NORMALIZED
    path = client.download_image(uploaded, out_dir=str(tmp_path / "dl"))
    assert sitk.ReadImage(path).GetSize() == (32, 32, 6)


def test_segment_with_the_report(client, uploaded, volume_file, tmp_path):
    result = client.segment(uploaded, out_dir=str(tmp_path / "stored"))
    assert result.summary["text_source"] == "datastore"
    assert result.labels.get("lesion") == 1 and result.label_names == ["lesion"]
    label = sitk.ReadImage(result.label_path)
    source = sitk.ReadImage(str(volume_file))
    assert label.GetSize() == source.GetSize()
    assert np.allclose(label.GetSpacing(), source.GetSpacing()) and np.allclose(label.GetOrigin(), source.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(label))) <= {0, 1}
    assert isinstance(result.uncertainty_mean, float) and result.uncertainty_mean >= 0
    assert result.uncertainty_path and Path(result.uncertainty_path).is_file()
    unc = sitk.GetArrayFromImage(sitk.ReadImage(result.uncertainty_path))
    assert unc.shape == (6, 32, 32) and unc.dtype.kind == "f" and float(unc.min()) >= 0

    explicit = client.segment(uploaded, text="No focal opacity.", out_dir=str(tmp_path / "explicit"))
    assert explicit.summary["text_source"] == "request"
    assert explicit.summary["text_chars"] == len("No focal opacity.")


def test_next_sample_comes_with_its_report(client, tmp_path):
    sample = client.next_sample("uncertainty", out_dir=str(tmp_path))
    assert sample.image_id and sample.image_path and Path(sample.image_path).is_file()
    assert sample.report and sample.report == client.get_report(sample.image_id)
    array = sitk.GetArrayFromImage(sitk.ReadImage(sample.image_path))
    assert array.size > 0
    unlabeled = client.next_sample("random", download=False)
    assert unlabeled.image_path is None and unlabeled.image_id


def test_submit_label_counts_as_labeled(client, uploaded, tmp_path):
    before = client.info()["datastore"]
    result = client.segment(uploaded, out_dir=str(tmp_path))
    answer = client.submit_label(uploaded, result.label_path, label_info=[{"name": "lesion", "idx": 1}])
    assert answer.get("image") == uploaded and answer.get("label") == uploaded
    after = client.info()["datastore"]
    assert after["completed"] == before["completed"] + 1
    # a labeled image is no longer offered by the uncertainty strategy
    for _ in range(3):
        assert client.next_sample("uncertainty", download=False).image_id != uploaded


def test_train_start_and_poll_status(client):
    task = client.train("fasttextdiff", {"max_epochs": 1})
    assert task.get("status") in ("SUBMITTED", "RUNNING") and task.get("id")
    assert client.train_progress().state in ("SUBMITTED", "RUNNING", "DONE")
    progress = client.wait_for_training(timeout=240, poll=2)
    assert progress.state == "DONE", progress.message
    assert progress.percent == 100 and not progress.running
    status = client.train_status()
    assert status["id"] == task["id"] and status["status"] == "DONE"
    assert client.is_training() is False


# ------------------------------------------------------------------ errors a user meets
def test_unknown_image_is_a_sentence_with_the_server_reason(client):
    with pytest.raises(ReportSegmentError) as err:
        client.segment("no_such_image")
    assert err.value.status == 404 and "no_such_image" in str(err.value)
    assert str(err.value).startswith("The server refused to segment the image (HTTP 404)")
    with pytest.raises(ReportSegmentError) as err:
        client.get_report("no_such_image")
    assert err.value.status == 404
    assert client.image_exists("no_such_image") is False


def test_unknown_model_and_strategy_are_refused(client, uploaded):
    with pytest.raises(ReportSegmentError) as err:
        client.segment(uploaded, model="nnunet")
    assert err.value.status == 404 and "nnunet" in err.value.reason
    with pytest.raises(ReportSegmentError) as err:
        client.next_sample("most_interesting")
    assert err.value.status == 404 and "most_interesting" in str(err.value)


def test_oversized_report_is_refused_before_sending(client, uploaded):
    with pytest.raises(ReportSegmentError, match="at most"):
        client.set_report(uploaded, "x" * (client.max_report_bytes + 1))
    assert client.get_report(uploaded) == REPORT_NORMALIZED  # unchanged


def test_corrupt_upload_gets_the_server_reason(client, tmp_path):
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\nthis is not an image\n")
    with pytest.raises(ReportSegmentError) as err:
        client.upload_image(str(bad), image_id="broken_case", text="x")
    assert err.value.status is not None and 400 <= err.value.status < 500
    assert str(err.value).startswith("The server refused to upload the image")
    assert client.image_exists("broken_case") is False


def test_server_down_is_one_sentence():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = FastTextDiffClient(f"http://127.0.0.1:{port}", timeout=5)
    with pytest.raises(ReportSegmentError) as err:
        client.info()
    message = str(err.value)
    assert err.value.status is None and "nothing is listening" in message and "\n" not in message


def test_not_a_monai_label_server(subprocess_server):  # noqa: F811
    client = FastTextDiffClient(subprocess_server.url + "/docs", timeout=10)
    with pytest.raises(ReportSegmentError) as err:
        client.info()
    assert err.value.status == 404 or "MONAI Label" in str(err.value)


def test_login_on_a_server_without_authentication(client):
    assert client.auth_enabled() is False
    with pytest.raises(ReportSegmentError, match="authentication is switched off"):
        client.login("annotator", "secret")
    assert client.token is None
    with pytest.raises(ReportSegmentError, match="user name and a password"):
        client.login("", "")


def test_bearer_token_is_sent_and_harmless_without_authentication(subprocess_server):  # noqa: F811
    with_token = FastTextDiffClient(subprocess_server.url, timeout=60, token="not-checked-when-auth-is-off")
    assert "fasttextdiff" in with_token.info()["models"]
    images = with_token.list_images()
    assert images and {image.image_id for image in images} == set(subprocess_server.client().datastore()["objects"])

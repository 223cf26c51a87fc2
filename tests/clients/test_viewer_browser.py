"""The web viewer in a real browser: Playwright drives the system Chromium against the real viewer
(`python -m fasttextdiff.viewer`, a subprocess on 127.0.0.1) talking to the real FastTextDiff MONAI Label
server (another subprocess, tiny model).

One annotation loop, as a user does it: the page connects and lists the datastore; a real MRI
volume (nilearn's MNI152 template) is opened from disk; a report is typed; Segment shows the
segment count and the overlays; a paint stroke on the slice view adds voxels; Submit stores the
label on the server (read back with MONAI Label's client: it has the painted voxels); Next sample
opens a datastore image with its stored report, whose edit is saved; training starts, its progress
is shown, and it stops on request. Every
request the page makes goes to the viewer's own host. Waits are on page elements, not sleeps.

Screenshots land in the test's temporary folder; set FASTTEXTDIFF_SCREENSHOTS=DIR to keep them
(docs/images holds the ones shown in README.md and docs/SLICER.md).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest

from fasttextdiff.viewer.system import CHROMIUM_ENV, find_chromium
from server_fixtures import free_port, wait_for

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is installed by `make setup`")
pytest.importorskip("trame_slicer", reason="trame-slicer is installed by `make setup`")

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
REPORT = "Bright oval lesion in the right frontal lobe, about 2 cm. No midline shift."
TIMEOUT_MS = 180_000  # a loaded 2-core machine: the first render and an inference can take a while


@pytest.fixture(scope="module")
def viewer(slicer_server, tmp_path_factory):
    """`python -m fasttextdiff.viewer --server URL` (= `fasttextdiff viewer`, without loading torch) on a
    free 127.0.0.1 port, until the page is served."""
    port = free_port()
    log = tmp_path_factory.mktemp("viewer") / "viewer.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fasttextdiff.viewer", "--server", slicer_server.url, "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(REPO), start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"viewer exited with {proc.returncode}: {log.read_text(errors='replace')[-3000:]}")
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback
            return response.status == 200

    try:
        wait_for(up, 180, 0.5, "the viewer's page")
        yield url, log
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C, as a user stops it
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def browser():
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(f"no Chromium: `make test` installs it (root + apt), or set {CHROMIUM_ENV}; "
                    "see `python -m fasttextdiff.viewer.system`")
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def shots(tmp_path):
    """Save a screenshot under the test folder (and FASTTEXTDIFF_SCREENSHOTS when set)."""
    keep = os.environ.get("FASTTEXTDIFF_SCREENSHOTS")

    def shot(page, name: str) -> Path:
        path = tmp_path / f"{name}.png"
        page.screenshot(path=str(path))
        if keep:  # a 256-colour copy: a third of the size, no visible loss on this dark UI
            from PIL import Image

            Path(keep).mkdir(parents=True, exist_ok=True)
            Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(
                Path(keep) / path.name, optimize=True)
        return path

    return shot


def _voxels(page) -> int:
    return int(page.locator("#ftd-segment-count").get_attribute("data-voxels"))


def _colored_fraction(png: Path, box: dict, page_scale: float = 1.0) -> float:
    """Fraction of strongly coloured (not grey) pixels in a region of a screenshot."""
    from PIL import Image

    image = np.asarray(Image.open(png).convert("RGB")).astype(int)
    x0, y0 = int(box["x"] * page_scale), int(box["y"] * page_scale)
    x1, y1 = int((box["x"] + box["width"]) * page_scale), int((box["y"] + box["height"]) * page_scale)
    region = image[y0:y1, x0:x1]
    spread = region.max(axis=2) - region.min(axis=2)
    return float((spread > 60).mean())


def test_annotation_loop_in_the_browser(viewer, browser, slicer_server, mni_volume_file, shots):
    url, log = viewer
    expect = playwright_api.expect
    page = browser.new_page(viewport={"width": 1500, "height": 950})
    page.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    hosts: set[tuple[str, str]] = set()
    page.on("request", lambda request: hosts.add((urlparse(request.url).scheme, urlparse(request.url).netloc)))
    page.on("websocket", lambda ws: hosts.add((urlparse(ws.url).scheme, urlparse(ws.url).netloc)))
    client = slicer_server.client()  # MONAI Label's own client, to check what the server stored
    stored = client.datastore()["objects"]

    # open: the page connects to the server and lists its datastore with label status
    page.goto(url)
    expect(page.locator("#ftd-server-line")).to_contain_text("models: fasttextdiff", timeout=TIMEOUT_MS)
    expect(page.locator(".ftd-image-item")).to_have_count(len(stored))
    labeled = sorted(i for i, obj in stored.items() if "final" in obj.get("labels", {}))
    assert labeled, "the tiny studies have labeled images"
    expect(page.locator(f'.ftd-image-item[data-image-id="{labeled[0]}"] .ftd-image-status')).to_have_text("labeled")

    # a local file: a real MRI volume from disk, shown in the three slice views
    page.locator("#ftd-open-file").set_input_files(str(mni_volume_file))
    expect(page.locator("#ftd-image-name")).to_contain_text("mni_t1")
    expect(page.locator("#ftd-image-name")).to_contain_text("local file")
    expect(page.locator("#ftd-views")).to_have_attribute("data-fitted", "true")
    views = page.locator("#ftd-views img")
    expect(views.first).to_be_visible()
    assert views.count() == 3, "a volume gets axial, coronal and sagittal views"

    # type the report, then Segment
    page.locator("#ftd-report").fill(REPORT)
    before = shots(page, "viewer-1-report")
    page.locator("#ftd-segment").click()
    expect(page.locator("#ftd-status")).to_contain_text("Segmented", timeout=TIMEOUT_MS)
    count = page.locator("#ftd-segment-count")
    expect(count).to_have_attribute("data-count", "1")
    expect(count).to_contain_text("1 segment: lesion")
    expect(page.locator(".ftd-segment-chip")).to_have_text(["lesion"])
    expect(page.locator("#ftd-uncertainty")).to_contain_text("mean uncertainty")
    expect(page.locator("#ftd-image-name")).to_contain_text("datastore id mni_t1")
    image_id = "mni_t1"
    assert client.datastore()["objects"][image_id]["image"]["info"]["text"] == REPORT
    axial = views.first
    box = axial.bounding_box()
    after = None
    for attempt in range(40):  # the view image is streamed: wait until the overlay is in it
        after = shots(page, "viewer-2-segmented")
        if _colored_fraction(after, box) > 0.01:
            break
        page.wait_for_timeout(250)
    assert _colored_fraction(after, box) > 0.01 > _colored_fraction(before, box), \
        "no overlay appeared in the axial view"
    model_voxels = _voxels(page)

    # paint a stroke across the middle of the axial view
    page.locator("#ftd-tool-paint").click()
    expect(page.locator("#ftd-tools")).to_have_attribute("data-active-tool", "paint")  # the server's editor
    cx, cy = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.5
    page.mouse.move(cx - box["width"] * 0.2, cy)
    page.mouse.down()
    for step in range(1, 21):
        page.mouse.move(cx - box["width"] * 0.2 + step * box["width"] * 0.02, cy + step * 1.5)
        page.wait_for_timeout(30)
    page.mouse.up()
    page.wait_for_function(f"Number(document.querySelector('#ftd-segment-count').dataset.voxels) > {model_voxels}")
    painted_voxels = _voxels(page)
    page.locator("#ftd-tool-none").click()
    shots(page, "viewer-3-painted")

    # submit: the server's final label now holds exactly the painted segmentation
    page.locator("#ftd-submit").click()
    expect(page.locator("#ftd-status")).to_contain_text(f"Label saved for {image_id}")
    expect(page.locator(f'.ftd-image-item[data-image-id="{image_id}"] .ftd-image-status')).to_have_text("labeled")
    import SimpleITK as sitk

    label = sitk.GetArrayFromImage(sitk.ReadImage(client.download_label(image_id, "final")))
    assert label.shape == (48, 59, 50)
    assert int((label > 0).sum()) == painted_voxels > model_voxels

    # next sample: an unlabeled datastore image with its stored report
    page.locator("#ftd-next").click()
    expect(page.locator("#ftd-status")).to_contain_text("Next sample (uncertainty)")
    name = page.locator("#ftd-image-name").inner_text()
    sample_id = re.search(r"datastore id (\S+)", name).group(1)
    objects = client.datastore()["objects"]
    assert sample_id != image_id and "final" not in objects[sample_id].get("labels", {})
    expect(page.locator("#ftd-report")).to_have_value(objects[sample_id]["image"]["info"]["text"])
    expect(page.locator("#ftd-segment-count")).to_have_attribute("data-count", "0")
    is_volume = objects[sample_id]["image"]["ext"] in (".nii.gz", ".nii", ".nrrd")
    expect(page.locator("#ftd-views img")).to_have_count(3 if is_volume else 1)  # a 2D image: one view
    expect(page.locator("#ftd-views")).to_have_attribute("data-fitted", "true")
    shots(page, "viewer-4-next-sample")

    # the edited report is saved to the datastore
    edited = objects[sample_id]["image"]["info"]["text"] + " Follow-up: smaller than before."
    page.locator("#ftd-report").fill(edited)
    page.locator("#ftd-save-report").click()
    expect(page.locator("#ftd-status")).to_contain_text("Report saved to the server's datastore")
    assert client.datastore()["objects"][sample_id]["image"]["info"]["text"] == edited

    # training: start it and watch its progress, then stop it (a whole run to DONE is tested with
    # the same client code in test_slicer_client.py; here it would only add minutes)
    page.locator("#ftd-train-epochs").fill("50")
    page.locator("#ftd-train").click()
    message = page.locator("#ftd-train-message")
    expect(message).to_contain_text(re.compile(r"Training (is queued|is running|: epoch)"))
    expect(page.locator("#ftd-train-stop")).to_be_enabled()
    page.locator("#ftd-train-stop").click()
    expect(message).to_contain_text("Training was stopped")
    expect(page.locator("#ftd-train")).to_be_enabled()

    # nothing but the viewer's own host was ever asked for anything
    viewer_host = urlparse(url).netloc
    network = {(scheme, host) for scheme, host in hosts if scheme in ("http", "https", "ws", "wss")}
    assert network and {host for _, host in network} == {viewer_host}, sorted(hosts)
    assert {scheme for scheme, _ in hosts} <= {"http", "ws", "data", "blob"}, sorted(hosts)
    page.close()

"""ReportSegmentLib's client against a real FastTextDiff server that has no model yet.

`monailabel start_server --app monailabel_app` on 127.0.0.1 with an empty model folder and no
automatic default-model build: what a Slicer user sees right after pointing the server at new
studies. Segmenting must give a sentence with the server's 503 reason, and everything that does
not need the model (reports, next sample) must still work.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ReportSegmentLib import FastTextDiffClient, ReportSegmentError

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from server_fixtures import TINY_CONF, SubprocessServer, make_tiny_studies  # noqa: E402

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def empty_server(tmp_path_factory):
    saved = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved])  # see test_slicer_client.py
    studies = make_tiny_studies(tmp_path_factory.mktemp("nomodel-studies") / "demo", n_2d=3, n_3d=0, n_labeled=1)
    conf = dict(TINY_CONF, model_dir=str(tmp_path_factory.mktemp("no-model") / "root"), prepare_default_model="false",
                state_dir=str(tmp_path_factory.mktemp("nomodel-state")))
    server = SubprocessServer(studies, conf, tmp_path_factory.mktemp("nomodel-logs") / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        os.environ["PATH"] = saved


def test_segment_without_a_model_is_a_503_sentence(empty_server):
    client = FastTextDiffClient(empty_server.url, timeout=60)
    info = client.info()
    assert client.model_state(info).get("state") != "ready"
    sample = client.next_sample("random", download=False)  # works without a model
    assert sample.report == client.get_report(sample.image_id)

    with pytest.raises(ReportSegmentError) as err:
        client.segment(sample.image_id)
    assert err.value.status == 503
    message = str(err.value)
    assert message.startswith("The server cannot segment the image yet: ")
    assert err.value.reason and err.value.reason in message and "\n" not in message

"""`monailabel start_server --app monailabel_app ... --host 127.0.0.1` as a child process.

One server for the module, started on fresh tiny studies:
* it builds the default model in the background, answering infer with 503 meanwhile;
* the documented client script runs next_sample -> infer with report -> save label, and a
  64x256x256 volume keeps its geometry;
* training through MONAI Label's own background task (a subprocess of the server) publishes a new model;
* a second server on other studies with `--conf model_dir <first server's model root>` serves that model at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from server_fixtures import APP_DIR, TINY_CONF, SubprocessServer, make_tiny_studies, wait_for, wait_model_ready

pytestmark = pytest.mark.server


def _post_infer(url: str, image: str):
    import requests

    return requests.post(f"{url}/infer/fasttextdiff?image={image}", timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("subprocess")
    studies = make_tiny_studies(root / "studies", seed=3)
    # the build is still running when the server first answers: backbone pretraining is unbounded in
    # epochs and stops at its share of the time budget (half: 10 s), whatever the machine's speed
    conf = dict(TINY_CONF, backbone_epochs="100000", prepare_budget_s="20", state_dir=str(root / "state"))
    srv = SubprocessServer(studies, conf, root / "server.log").start()
    srv.state = root / "state"
    yield srv
    srv.stop()


def test_infer_gets_503_while_the_default_model_is_prepared(server):
    info = server.client().info()
    assert info["fasttextdiff"]["model"]["state"] == "preparing", info["fasttextdiff"]["model"]
    response = _post_infer(server.url, "cxr_000")
    assert response.status_code == 503 and "being prepared" in response.json()["detail"]
    import requests

    train = requests.post(f"{server.url}/train/fasttextdiff", json={"max_epochs": 1}, timeout=30)
    assert train.status_code == 409 and "being built" in train.json()["detail"], train.text
    t0 = time.time()
    wait_model_ready(server.url, timeout=400)
    print(f"\ntiny default model ready {time.time() - t0:.1f}s after the first 503")
    assert _post_infer(server.url, "cxr_000").status_code == 200


def test_client_script_loop_and_volume_geometry(server):
    wait_model_ready(server.url, timeout=400)
    cmd = [sys.executable, str(APP_DIR / "scripts" / "client_demo.py"), "--server", server.url,
           "--rounds", "2", "--volume", "--wait", "60"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    print("\nclient_demo:", json.dumps({"rounds": [r["seconds"] for r in summary["rounds"]],
                                       "volume": summary["volume"]["seconds"]}))
    for r in summary["rounds"]:
        assert r["seconds"]["total"] < 60
    assert summary["volume"]["same_geometry"] and summary["volume"]["size"] == [256, 256, 64]
    objects = server.client().datastore()["objects"]
    for r in summary["rounds"]:  # the model's own masks are saved under the script's tag, not as ground truth
        assert "client_demo" in objects[r["image"]]["labels"] and "final" not in objects[r["image"]]["labels"]


def test_training_as_monailabel_background_task_publishes(server):
    client = server.client()
    before = client.info()["fasttextdiff"]["model_identity"]
    task = client.train_start("fasttextdiff", {"max_epochs": 1})
    assert task["status"] in ("SUBMITTED", "RUNNING")

    def finished():
        status = client.train_status()
        return status if status.get("status") in ("DONE", "ERROR") else None

    status = wait_for(finished, 400, 2.0, "the background train task")
    assert status["status"] == "DONE", status.get("details")
    info = client.info()
    stats = info["train_stats"]["fasttextdiff"]
    assert stats["status"] == "DONE" and stats["decision"] in ("published", "kept") and stats["reason"]
    assert info["fasttextdiff"]["model"]["state"] == "ready"  # never stale after a train in another process
    if stats["decision"] == "published":
        assert info["fasttextdiff"]["model_identity"] != before
    else:
        assert info["fasttextdiff"]["model_identity"] == before and "below the served model's" in stats["reason"]
    assert info["models"]["fasttextdiff"]["val_dice"] is not None
    assert "ready: model fasttextdiff" in server.log_tail(400000)
    _, result = client.infer("fasttextdiff", "cxr_003", {})
    assert result["model"] == info["fasttextdiff"]["model_identity"]


def test_model_dir_conf_serves_the_published_model_at_once(server, tmp_path):
    identity = server.client().info()["fasttextdiff"]["model_identity"]
    server.stop()
    studies = make_tiny_studies(tmp_path / "other", seed=4)
    conf = dict(TINY_CONF, model_dir=str(server.state / "model"), state_dir=str(tmp_path / "state"))
    other = SubprocessServer(studies, conf, tmp_path / "other.log").start()
    try:
        info = other.client().info()
        assert info["fasttextdiff"]["model"]["state"] == "ready"
        assert info["fasttextdiff"]["model_identity"] == identity
        assert _post_infer(other.url, "cxr_001").status_code == 200
    finally:
        other.stop()
    assert "backbone pretraining" not in other.log_tail(200000)

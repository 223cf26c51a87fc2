"""`monailabel start_server --app monailabel_app ... --host 127.0.0.1` as a child process.

One server for the module, started on fresh tiny studies:
* it builds the default model in the background, answering infer with 503 meanwhile;
* the documented client script runs next_sample -> infer with report -> save label, and a
  64x256x256 volume keeps its geometry;
* training through MONAI Label's own background task (a subprocess of the server) publishes a new model;
* a second server on other studies with `--conf model_dir <first server's model root>` serves that model at once;
* what a server start leaves behind: nothing in the temp folder (no MONAI Label logging config `tmp*.json`, no
  client result folder), no volume-slice folder in the state's `work/` after the default model is published.

Each test sets up what it asserts on (any order, or alone): the answers while the model is prepared are taken
by the fixture right after the server first answers, and no test stops the module's server.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
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
    try:
        # what the server answers while its default model is prepared, asked the moment it first answers
        # (whichever test runs first, the model may be ready by then)
        import requests

        srv.while_preparing = {
            "info": srv.client().info()["fasttextdiff"]["model"],
            "infer": _post_infer(srv.url, "cxr_000"),
            "train": requests.post(f"{srv.url}/train/fasttextdiff", json={"max_epochs": 1}, timeout=30),
            "at": time.time(),
        }
        yield srv
    finally:
        srv.stop()


def test_infer_gets_503_while_the_default_model_is_prepared(server):
    seen = server.while_preparing
    assert seen["info"]["state"] == "preparing", seen["info"]
    response = seen["infer"]
    assert response.status_code == 503 and "being prepared" in response.json()["detail"]
    train = seen["train"]
    assert train.status_code == 409 and "being built" in train.json()["detail"], train.text
    wait_model_ready(server.url, timeout=400)
    print(f"\ntiny default model ready {time.time() - seen['at']:.1f}s after the first 503")
    assert _post_infer(server.url, "cxr_000").status_code == 200


def test_the_server_runs_the_default_fusion_and_the_report_reaches_the_output(server):
    """The server tests run what users get: the default model built with the library's default fusion
    (`text_residual` "zero": the text path starts closed and opens as it trains). What that guarantees for a
    2-epoch tiny model: the report reaches the output (another report changes the uncertainty map); not
    that it changes the mask (a 2-epoch model with a closed text path marks the same pixels, often none)."""
    import requests

    from fasttextdiff.config import FusionConfig
    from fasttextdiff.data.io import read_image

    wait_model_ready(server.url, timeout=400)
    record = json.loads((server.state / "model" / "current" / "fasttextdiff.json").read_text(encoding="utf-8"))
    assert record["segmenter"]["fusion"]["text_residual"] == FusionConfig().text_residual == "zero"
    maps = []
    one, other = ("Unilateral pulmonary infection, one infected area, lower left lung.",
                  "Bilateral pulmonary infection, three infected areas, upper right lung.")
    for n, report in enumerate([one, other, one]):
        r = requests.post(f"{server.url}/infer/fasttextdiff?image=cxr_004&output=image",
                          files={"params": (None, json.dumps({"text": report, "result": "uncertainty"}))}, timeout=120)
        assert r.status_code == 200, r.text
        path = server.log_path.parent / f"uncertainty-{n}.nrrd"
        path.write_bytes(r.content)
        maps.append(read_image(path).array)
    assert maps[0].shape == maps[1].shape and np.isfinite(maps[0]).all()
    assert np.array_equal(maps[0], maps[2]), "the same report gave another map: the noise draws are not seeded"
    assert not np.array_equal(maps[0], maps[1]), "another report left the output unchanged: the text is not used"


def test_the_default_model_build_leaves_no_slice_folders(server):
    """The build trains on the labeled volume as 2D slices written under `<state>/work/slices-*`: once the
    model is published, none is left."""
    wait_model_ready(server.url, timeout=400)
    labeled_volumes = [k for k, v in server.client().datastore()["objects"].items()
                       if "final" in v["labels"] and v["image"]["ext"] in (".nii.gz", ".nii", ".nrrd")
                       and k.startswith("ct_")]
    assert labeled_volumes, "the studies have no labeled volume: nothing was sliced"
    built = re.search(r"training fusion \+ head on (\d+) samples, validating on (\d+)", server.log_tail(10**7))
    labeled_2d = sum(1 for k, v in server.client().datastore()["objects"].items()
                     if "final" in v["labels"] and k.startswith("cxr_"))
    assert built and int(built[1]) + int(built[2]) > labeled_2d, "the build used no volume slices"
    assert (server.state / "work").is_dir()
    assert sorted(p.name for p in (server.state / "work").glob("slices-*")) == []


def test_slice_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    """A run killed mid-training cannot remove its slices; the next run removes those of dead processes
    and leaves those of live ones (another run in progress) alone."""
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.training import remove_stale_slice_dirs
    finally:
        sys.path.remove(str(APP_DIR))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        folders = {name: tmp_path / f"slices-{pid}-1" for name, pid in (("dead", dead.pid), ("live", live.pid))}
        folders["old-style"] = tmp_path / "slices-1700000000000000000"
        folders["mine"] = tmp_path / f"slices-{os.getpid()}-{time.time_ns()}"
        for folder in folders.values():
            (folder / "sub").mkdir(parents=True)
            (folder / "sub" / "x.nii.gz").write_bytes(b"x")
        removed = remove_stale_slice_dirs(tmp_path)
        assert sorted(removed) == sorted([folders["dead"], folders["old-style"]])
        assert folders["live"].is_dir() and folders["mine"].is_dir()
    finally:
        live.communicate(b"")


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
    wait_model_ready(server.url, timeout=400)  # a train request while the model is built gets 409
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


def test_model_dir_conf_serves_the_published_model_at_once(server, tmp_path, monkeypatch):
    """A second server (the first keeps running) with `--conf model_dir <the first's model root>` serves the
    same model at once. Its start also shows two things about the fixtures: a port taken by another process
    between `free_port()` and the server's bind is retried on another port (never mistaken for this server),
    and a server leaves nothing in the temp folder (here a folder of this test's own)."""
    wait_model_ready(server.url, timeout=400)
    identity = server.client().info()["fasttextdiff"]["model_identity"]
    studies = make_tiny_studies(tmp_path / "other", seed=4)
    conf = dict(TINY_CONF, model_dir=str(server.state / "model"), state_dir=str(tmp_path / "state"))
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the server process's temp folder
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # this process's (the clients' result folders)
    with socket.socket() as squatter:  # another process's server took the port first
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        other = SubprocessServer(studies, conf, tmp_path / "other.log", port=taken).start()
        try:
            assert other.port != taken
            info = other.client().info()
            assert info["fasttextdiff"]["model"]["state"] == "ready"
            assert info["fasttextdiff"]["model_identity"] == identity
            assert _post_infer(other.url, "cxr_001").status_code == 200
            assert [p.name for p in temp.glob("mlclient-*")], "the client's result folder is not in the temp folder"
        finally:
            other.stop()
    assert "backbone pretraining" not in other.log_tail(200000)
    assert sorted(p.name for p in temp.glob("tmp*.json")) == [], "MONAI Label's logging config was left behind"
    assert sorted(p.name for p in temp.glob("mlclient-*")) == [], "client result folders were left behind"

"""Faults: killed training, a server restarted mid-training, corrupt checkpoints and caches,
pickle bombs, a full disk on label save, two processes writing the datastore at once.

Everything is real: training runs in its own process and gets SIGKILL, the server is
`monailabel start_server` on 127.0.0.1 (its process group is SIGKILLed and started again). A full
disk is made two ways: everywhere, by making every write into the studies folder fail with ENOSPC at
the OS-call boundary (the writes go to /dev/full, which answers every write(2) with ENOSPC); and,
where the tests may mount (root), by filling a small real tmpfs.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from server_fixtures import (
    APP_DIR,
    REPO,
    TINY_CONF,
    InProcessServer,
    SubprocessServer,
    make_tiny_studies,
    wait_for,
)

SECRET_REPORT = "Patient Jane Roe, MRN 0042-SECRET, right upper lobe nodule."
SECRET_PASSWORD = "dicomweb-pw-7c1e"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _flip_byte(path: Path, offset_from_end: int = 16) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - offset_from_end] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


# =============================================================================== library level
_TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.training.segmenter import train_segmenter
    data, backbone, out = sys.argv[1:4]
    train_segmenter(load_lvit(data)["train"], out, backbone_dir=backbone, text_config=TextConfig(encoder="tiny"),
                    segmenter_config=SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2)),
                    train_config=TrainConfig(epochs=100000, batch_size=4, lr=1e-3), progress=False)
""")


def _train_in_process(data: Path, backbone: Path, out: Path, epochs: int) -> dict:
    from fasttextdiff.config import FusionConfig, SegmenterConfig, TextConfig, TrainConfig
    from fasttextdiff.training.workflows import load_lvit
    from fasttextdiff.training.segmenter import train_segmenter

    return train_segmenter(load_lvit(data)["train"], out, backbone_dir=backbone,
                           text_config=TextConfig(encoder="tiny"),
                           segmenter_config=SegmenterConfig(head_channels=8, fusion=FusionConfig(dim=16, heads=2)),
                           train_config=TrainConfig(epochs=epochs, batch_size=4, lr=1e-3), progress=False)


def _start_and_kill_training(data: Path, backbone: Path, out: Path, min_epoch: int = 1) -> int:
    """Start a long training in its own process, SIGKILL it once it has saved `min_epoch` epochs."""
    state = out.with_name(out.name + ".resume") / "state.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "lib"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, str(data), str(backbone), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def saved():
            if proc.poll() is not None:
                raise AssertionError(f"training exited early: {proc.stderr.read().decode()[-2000:]}")
            return state.is_file() and json.loads(state.read_text(encoding="utf-8"))["epoch"] >= min_epoch

        wait_for(saved, 120, 0.1, "the training to save its resume state")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    return int(json.loads(state.read_text(encoding="utf-8"))["epoch"])


def test_sigkilled_training_keeps_the_published_model_and_resumes_only_on_the_same_data(
        tiny_dataset, tiny_backbone, tiny_model, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    out = tmp_path / "model"
    shutil.copytree(tiny_model, out)  # the model published by an earlier run
    published = _tree_digest(out)

    killed_at = _start_and_kill_training(data, tiny_backbone, out)
    assert _tree_digest(out) == published, "a killed run changed the published model"

    with caplog.at_level(logging.INFO, logger="fasttextdiff.training.segmenter"):
        metrics = _train_in_process(data, tiny_backbone, out, epochs=killed_at + 1)
    assert f"resuming training from epoch {killed_at}" in caplog.text
    assert metrics["epochs"] == killed_at + 1  # the killed run's history plus one epoch
    assert _tree_digest(out) != published and not out.with_name("model.resume").exists()

    # killed again, then a label changes: the old state belongs to other data and is dropped
    published = _tree_digest(out)
    killed_at = _start_and_kill_training(data, tiny_backbone, out)
    assert _tree_digest(out) == published
    mask = sorted((data / "Train_Folder" / "labelcol").iterdir())[0]
    from PIL import Image as PILImage

    arr = np.asarray(PILImage.open(mask)).copy()
    PILImage.fromarray(np.where(arr > 0, 0, 255).astype(np.uint8)).save(mask)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fasttextdiff.training.segmenter"):
        metrics = _train_in_process(data, tiny_backbone, out, epochs=1)
    assert "discarding the resume state" in caplog.text and "resuming" not in caplog.text
    assert metrics["epochs"] == 1


def test_corrupt_or_truncated_model_files_are_refused_with_a_clear_message(tiny_model, tmp_path):
    from fasttextdiff.utils.errors import CheckpointError, FastTextDiffError
    from fasttextdiff.inference.pipeline import Segmenter

    cases = [
        ("segmenter.safetensors", _flip_byte, "checksum"),
        ("segmenter.safetensors", _truncate, "truncated"),
        ("backbone/diffusion_pytorch_model.safetensors", _flip_byte, "checksum"),
        ("backbone/diffusion_pytorch_model.safetensors", _truncate, "truncated"),
        ("fasttextdiff.json", _truncate, "corrupt"),
        ("backbone/config.json", lambda p: p.write_text("{not json"), "not valid JSON"),
    ]
    for i, (name, damage, words) in enumerate(cases):
        model = tmp_path / f"m{i}"
        shutil.copytree(tiny_model, model)
        Segmenter.load(model, device="cpu")  # loads before the damage
        damage(model / name)
        with pytest.raises(FastTextDiffError, match=words) as info:
            Segmenter.load(model, device="cpu")
        assert isinstance(info.value, (CheckpointError, FastTextDiffError)) and name.split("/")[-1] in str(info.value)


def test_server_answers_503_with_the_reason_for_a_corrupt_served_model(tiny_model_root, tmp_path):
    import requests

    root = tmp_path / "root"
    shutil.copytree(tiny_model_root, root, symlinks=True)
    _flip_byte((root / "current").resolve() / "segmenter.safetensors")
    studies = make_tiny_studies(tmp_path / "studies", n_2d=2, n_3d=0, n_labeled=1, seed=7)
    conf = dict(TINY_CONF, model_dir=str(root), prepare_default_model="false", state_dir=str(tmp_path / "state"))
    server = InProcessServer(studies, conf).start()
    try:
        r = requests.post(f"{server.url}/infer/fasttextdiff?image=cxr_000&output=json", timeout=120)
        assert r.status_code == 503, r.text
        assert "model is not available" in r.json()["detail"] and "checksum" in r.json()["detail"]
        assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200  # the server itself is fine
    finally:
        server.stop()


def test_corrupt_resume_state_starts_over(tiny_dataset, tiny_backbone, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    out = tmp_path / "model"
    _start_and_kill_training(data, tiny_backbone, out)
    _truncate(out.with_name("model.resume") / "state.safetensors")
    with caplog.at_level(logging.INFO, logger="fasttextdiff.training.segmenter"):
        metrics = _train_in_process(data, tiny_backbone, out, epochs=1)
    assert "ignoring unreadable resume state" in caplog.text and "resuming" not in caplog.text
    assert metrics["epochs"] == 1 and (out / "segmenter.safetensors").is_file()


def test_corrupt_text_cache_files_are_detected_and_rebuilt(tmp_path, caplog):
    from fasttextdiff.config import TextConfig
    from fasttextdiff.text.encoder import TextEncoder

    cache = tmp_path / "text_cache"
    texts = ["Bilateral pulmonary infection, two infected areas.", "Unilateral, one area, lower right lung."]
    reference = TextEncoder(TextConfig(encoder="tiny"), cache_dir=cache).encode(texts)
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 2
    for damage in (_flip_byte, _truncate):
        damage(files[0])
        encoder = TextEncoder(TextConfig(encoder="tiny"), cache_dir=cache)  # empty memory cache: reads disk
        with caplog.at_level(logging.WARNING, logger="fasttextdiff.text.encoder"):
            again = encoder.encode(texts)
        assert encoder.stats["disk_hits"] == 1 and encoder.stats["computed"] == 1, encoder.stats
        assert "corrupt" in caplog.text
        assert np.allclose(again.states.numpy(), reference.states.numpy(), atol=1e-5)
        fresh = TextEncoder(TextConfig(encoder="tiny"), cache_dir=cache)
        fresh.encode(texts)
        assert fresh.stats["disk_hits"] == 2, "the rebuilt cache file is not readable"
        caplog.clear()


# ------------------------------------------------------------------------------ pickle bombs
class _Bomb:
    """Unpickling this runs `Path(marker).touch()`: code execution, as a hostile .pt would."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bomb_file(path: Path, marker: Path) -> Path:
    import torch

    torch.save({"weight": _Bomb(marker)}, path)
    return path


def test_pickle_bomb_checkpoints_are_never_unpickled(tiny_model, tmp_path):
    from fasttextdiff.models.backbone import DiffusionBackbone
    from fasttextdiff.utils.errors import FastTextDiffError
    from fasttextdiff.inference.pipeline import Segmenter

    marker = tmp_path / "PWNED"
    # the bomb is armed: a plain torch.load (weights_only=False), in a throwaway process, runs it
    armed_marker = tmp_path / "armed"
    bomb = _bomb_file(tmp_path / "bomb.pt", armed_marker)
    subprocess.run([sys.executable, "-c", f"import torch, sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r});"
                    f"torch.load({str(bomb)!r}, weights_only=False)"], check=False, capture_output=True,
                   env=dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1])))
    assert armed_marker.exists(), "the test bomb does not execute code when unpickled; the test would be vacuous"

    # 1. a diffusers backbone folder with only a pickled .bin
    unet = tmp_path / "unet"
    shutil.copytree(tiny_model / "backbone", unet)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    _bomb_file(unet / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(FastTextDiffError, match="safetensors"):
        DiffusionBackbone.from_diffusers(unet)
    with pytest.raises(FastTextDiffError):
        DiffusionBackbone.from_pretrained(unet)
    # 2. a model directory whose weights file is a pickle
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _bomb_file(model / "segmenter.safetensors", marker)
    with pytest.raises(FastTextDiffError, match="safetensors|truncated|checksum"):
        Segmenter.load(model, device="cpu")
    # 3. a text encoder folder with pickled weights only
    from fasttextdiff.config import TextConfig
    from fasttextdiff.text.encoder import TextEncoder, default_tiny_dir

    encoder_dir = tmp_path / "encoder"
    shutil.copytree(default_tiny_dir(), encoder_dir)
    for f in encoder_dir.glob("*.safetensors"):
        f.unlink()
    _bomb_file(encoder_dir / "pytorch_model.bin", marker)
    with pytest.raises(FastTextDiffError, match="could not load text encoder.*[Ww]eights only"):
        TextEncoder(TextConfig(encoder=str(encoder_dir)))  # transformers uses torch's weights_only unpickler
    # 4. a pickle in the text cache
    cache = tmp_path / "cache"
    enc = TextEncoder(TextConfig(encoder="tiny"), cache_dir=cache)
    enc.encode(["a report"])
    _bomb_file(next(cache.rglob("*.safetensors")), marker)
    fresh = TextEncoder(TextConfig(encoder="tiny"), cache_dir=cache)
    fresh.encode(["a report"])
    assert fresh.stats["computed"] == 1
    assert not marker.exists(), "a pickle was unpickled: code from a checkpoint ran"


def test_no_unpickling_calls_in_the_code():
    """Static guard: the library and the app never call pickle loaders or torch.load without weights_only."""
    offenders = []
    for root in (REPO / "lib", APP_DIR):
        for path in root.rglob("*.py"):
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                code = line.split("#")[0]
                if re.search(r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(|allow_pickle\s*=\s*True", code) or (
                        "torch.load(" in code and "weights_only=True" not in code):
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, offenders


# =============================================================================== server level
def _info(url: str) -> dict:
    import requests

    return requests.get(f"{url}/info/", timeout=30).json()


def _train_stats(url: str) -> dict:
    return _info(url).get("train_stats", {}).get("fasttextdiff", {})


def _train_child(server: SubprocessServer):
    import psutil

    def find():
        for child in psutil.Process(server.proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
            except psutil.Error:
                continue
            if "monailabel.interfaces.utils.app" in cmd and "train" in cmd:
                return child
        return None

    return wait_for(find, 60, 0.2, "MONAI Label's training subprocess")


def _wait_epochs(server: SubprocessServer, n: int) -> dict:
    def epochs():
        stats = _train_stats(server.url)
        return stats if stats.get("status") == "RUNNING" and len(stats.get("history", [])) >= n else None

    return wait_for(epochs, 180, 0.3, f"{n} training epochs")


def _datastore_objects(studies: Path) -> dict:
    objects = json.loads((studies / "datastore_v2.json").read_text(encoding="utf-8"))["objects"]
    return {k: {"labels": sorted(t for t in v["labels"] if t != "uncertainty"), "text": v["image"]["info"].get("text")}
            for k, v in objects.items()}


def start_fault_server(root: Path, tiny_model_root: Path) -> SubprocessServer:
    """A `monailabel start_server` on its own studies and model copy, with a secret in its environment and a
    redacted report already logged (the log tests read both)."""
    import requests

    studies = make_tiny_studies(root / "studies", seed=5)
    model_root = root / "model_root"
    shutil.copytree(tiny_model_root, model_root, symlinks=True)
    conf = dict(TINY_CONF, model_dir=str(model_root), prepare_default_model="false", state_dir=str(root / "state"),
                epochs="4")
    os.environ["MONAI_LABEL_DICOMWEB_PASSWORD"] = SECRET_PASSWORD  # must never reach the log
    try:
        server = SubprocessServer(studies, conf, root / "server.log").start()
    finally:
        os.environ.pop("MONAI_LABEL_DICOMWEB_PASSWORD", None)
    server.root, server.model_root = root, model_root
    try:
        labeled = sorted(k for k, v in _datastore_objects(studies).items() if "final" in v["labels"])[0]
        r = requests.put(f"{server.url}/datastore/image/info?image={labeled}",
                         files={"info": (None, json.dumps({"text": SECRET_REPORT}))}, timeout=30)
        r.raise_for_status()
        # MONAI Label logs whole infer requests at INFO: the report in them must be redacted
        r = requests.post(f"{server.url}/infer/fasttextdiff?image={labeled}&output=json",
                          files={"params": (None, json.dumps({"text": SECRET_REPORT, "n_noise": 1}))}, timeout=120)
        r.raise_for_status()
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory, tiny_model_root):
    """Shared by the tests that keep it running; the test that kills a server starts its own."""
    server = start_fault_server(tmp_path_factory.mktemp("faults"), tiny_model_root)
    try:
        yield server
    finally:
        server.stop()


def test_sigkill_of_a_server_training_run_keeps_model_and_datastore_then_resumes(fault_server):
    import requests

    url = fault_server.url
    identity = _info(url)["fasttextdiff"]["model_identity"]
    served = fault_server.model_root / "current"
    model_files = _tree_digest(served.resolve())
    datastore = _datastore_objects(fault_server.studies)

    r = requests.post(f"{url}/train/fasttextdiff", json={"max_epochs": 5000}, timeout=30)
    assert r.status_code == 200, r.text
    _wait_epochs(fault_server, 2)
    child = _train_child(fault_server)
    child.send_signal(signal.SIGKILL)
    wait_for(lambda: _train_stats(url).get("status") not in (None, "RUNNING"), 60, 0.3, "the stats to leave RUNNING")

    stats = _train_stats(url)
    assert stats["status"] == "INTERRUPTED" and "ended without finishing" in stats["error"]
    killed_epochs = len(stats["history"])
    # MONAI Label's own task record sees the non-zero exit too
    wait_for(lambda: requests.get(f"{url}/train/", timeout=30).json()["status"] == "ERROR", 60, 0.3,
             "MONAI Label's task record to show ERROR")
    assert _info(url)["fasttextdiff"]["model_identity"] == identity
    assert _tree_digest(served.resolve()) == model_files
    assert _datastore_objects(fault_server.studies) == datastore
    r = requests.post(f"{url}/infer/fasttextdiff?image=cxr_000&output=json", timeout=120)
    assert r.status_code == 200, r.text

    # The resume state on disk holds the last epoch whose state was saved. The stats record an epoch
    # just before its state is saved, so a kill between the two leaves the state one epoch behind the
    # stats: the state on disk, not the stats, says where the next run must start.
    saved_epoch = json.loads((fault_server.root / "state" / "work" / "segmenter-run.resume" / "state.json")
                             .read_text(encoding="utf-8"))["epoch"]
    assert killed_epochs - 1 <= saved_epoch <= killed_epochs and saved_epoch >= 1, (saved_epoch, killed_epochs)
    log_before = len(fault_server.log_tail(10**8))

    # the next run picks up where the killed one stopped, finishes and publishes
    r = requests.post(f"{url}/train/fasttextdiff", json={"max_epochs": killed_epochs + 1}, timeout=30)
    assert r.status_code == 200, r.text
    wait_for(lambda: _train_stats(url).get("status") == "DONE", 180, 0.5, "the resumed training to finish")
    resumed = re.findall(r"resuming training from epoch (\d+)", fault_server.log_tail(10**8)[log_before:])
    assert resumed == [str(saved_epoch)], f"expected one resume from epoch {saved_epoch}, the log says {resumed}"
    history = _train_stats(url)["history"]  # this run's epochs only: the first is the one after the saved state
    total = history[-1].get("epochs_total", killed_epochs + 1) if history else killed_epochs + 1
    assert [h["epoch"] for h in history] == list(range(saved_epoch + 1, total + 1)), history
    assert _info(url)["fasttextdiff"]["model_identity"] != identity


def test_two_processes_writing_the_datastore_lose_no_update(fault_server, tmp_path):
    """The server (HTTP) and another process (the app's datastore class, as MONAI Label's task
    subprocesses use it) update image infos at the same time: every write survives."""
    import requests

    rounds = 3  # each round writes every image from both sides; a lost update shows in any round

    assert fault_server.proc.poll() is None, "no test stops the module's server"
    ids = sorted(_datastore_objects(fault_server.studies))
    raced = tmp_path / "raced"
    # one process for the race and the late writes after it (its start-up is most of its time)
    script = textwrap.dedent(f"""
        import pathlib, sys
        sys.path.insert(0, {str(APP_DIR)!r})
        from lib.datastore import FastTextDiffDatastore
        ds = FastTextDiffDatastore({str(fault_server.studies)!r}, extensions=["*.png", "*.nii.gz"], auto_reload=False)
        print("ready", flush=True)
        for i in range({rounds}):
            for image in {ids!r}:
                ds.update_image_info_internal(image, {{"other_process": i}})
        pathlib.Path({str(raced)!r}).touch()
        sys.stdin.readline()  # the test has read the file: now the late writes
        for image in {ids!r}:
            ds.update_image_info_internal(image, {{"late_write": -1}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ, PYTHONPATH=str(REPO / "lib")),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", "the writing process did not start"
        sent = 0
        while not raced.exists() or sent < rounds:  # HTTP writes for as long as the other process writes
            assert proc.poll() is None, f"the writing process exited with {proc.returncode}"
            for image in ids:
                r = requests.put(f"{fault_server.url}/datastore/image/info?image={image}",
                                 files={"info": (None, json.dumps({"from_http": sent}))}, timeout=30)
                assert r.status_code == 200, r.text
            sent += 1
        objects = json.loads((fault_server.studies / "datastore_v2.json").read_text(encoding="utf-8"))["objects"]
        for image in ids:
            info = objects[image]["image"]["info"]
            assert info.get("other_process") == rounds - 1, (image, info)
            assert info.get("from_http") == sent - 1, (image, info)

        # and the server sees another process's writes without writing anything itself (auto-reload)
        proc.stdin.write("late\n")
        proc.stdin.flush()
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)

    def server_sees_them():
        return all(requests.get(f"{fault_server.url}/datastore/image/info?image={image}", timeout=30).json()
                   .get("late_write") == -1 for image in ids)

    wait_for(server_sees_them, 20, 0.5, "the server to reload the other process's writes")


def test_server_killed_while_training_restarts_without_a_stuck_running_state(tiny_model_root, tmp_path):
    import requests

    fault_server = start_fault_server(tmp_path, tiny_model_root)  # its own: this test kills it
    url = fault_server.url
    r = requests.post(f"{url}/train/fasttextdiff", json={"max_epochs": 5000}, timeout=30)
    assert r.status_code == 200, r.text
    _wait_epochs(fault_server, 1)
    assert _train_stats(url)["status"] == "RUNNING"
    identity = _info(url)["fasttextdiff"]["model_identity"]
    os.killpg(fault_server.proc.pid, signal.SIGKILL)  # the server and its training child, no cleanup
    fault_server.proc.wait(30)
    raw = json.loads((fault_server.root / "state" / "train_stats_fasttextdiff.json").read_text(encoding="utf-8"))
    assert raw["status"] == "RUNNING"  # what the dead run left on disk

    again = SubprocessServer(fault_server.studies, dict(fault_server.conf), fault_server.root / "server2.log")
    os.environ["MONAI_LABEL_DICOMWEB_PASSWORD"] = SECRET_PASSWORD
    try:
        again.start()
    finally:
        os.environ.pop("MONAI_LABEL_DICOMWEB_PASSWORD", None)
    try:
        stats = _train_stats(again.url)
        assert stats["status"] == "INTERRUPTED", stats
        assert _info(again.url)["fasttextdiff"]["model_identity"] == identity
        assert requests.post(f"{again.url}/infer/fasttextdiff?image=cxr_000&output=json",
                             timeout=120).status_code == 200
        # a new run is accepted (nothing thinks one is still running) and finishes
        r = requests.post(f"{again.url}/train/fasttextdiff", json={"max_epochs": 1}, timeout=30)
        assert r.status_code == 200, r.text
        wait_for(lambda: _train_stats(again.url).get("status") == "DONE", 180, 0.5, "the new training to finish")
        logs = fault_server.log_tail(10**7) + again.log_tail(10**7)
        # not vacuous: the log has the training's INFO lines and the redacted infer request
        assert "[INFO]" in logs and "training fusion + head" in logs and "<report: " in logs
        assert SECRET_REPORT not in logs and "0042-SECRET" not in logs, "report text reached the server log"
        assert SECRET_PASSWORD not in logs, "a secret reached the server log"
    finally:
        again.stop()
        fault_server.stop()


# ------------------------------------------------------------------------------ disk full
@contextlib.contextmanager
def full_disk_under(folder: Path):
    """While the block runs, `folder` behaves like a directory on a full disk, for every thread of this
    process (the in-process server's): a file opened there for writing is created (or truncated) as
    usual, but its descriptor is pointed at /dev/full, so every write(2) to it fails with ENOSPC, and
    sendfile(2), copy_file_range(2) and fsync(2) on files there fail with ENOSPC too. Reads, renames,
    deletions and every other folder work. Patched: `open`, `io.open`, `os.open`, `os.write`,
    `os.sendfile`, `os.copy_file_range`, `os.fsync` (what Python's file writes and copies call)."""
    root = os.path.realpath(folder) + os.sep
    full_fd = os.open("/dev/full", os.O_WRONLY)
    saved = {name: getattr(os, name) for name in ("open", "write", "sendfile", "copy_file_range", "fsync")
             if hasattr(os, name)}
    real_open, real_io_open = builtins.open, io.open

    def inside(path) -> bool:
        try:
            return os.path.realpath(os.fspath(path)).startswith(root)
        except (TypeError, ValueError):
            return False

    def fd_inside(fd) -> bool:
        try:
            fd = fd if isinstance(fd, int) else fd.fileno()
            return os.readlink(f"/proc/self/fd/{fd}").startswith(root)
        except (AttributeError, OSError, ValueError):
            return False

    def to_dev_full(fd: int) -> int:
        os.dup2(full_fd, fd, inheritable=False)
        return fd

    def enospc(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def patched_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if not isinstance(file, int) and any(c in mode for c in "wax+") and inside(file):
            to_dev_full(handle.fileno())
        return handle

    def patched_io_open(file, mode="r", *args, **kwargs):
        handle = real_io_open(file, mode, *args, **kwargs)
        if not isinstance(file, int) and any(c in mode for c in "wax+") and inside(file):
            to_dev_full(handle.fileno())
        return handle

    def patched_os_open(path, flags, *args, **kwargs):
        fd = saved["open"](path, flags, *args, **kwargs)
        if flags & (os.O_WRONLY | os.O_RDWR) and inside(path):
            to_dev_full(fd)
        return fd

    def guarded(name, fd_args):
        real = saved[name]

        def call(*args, **kwargs):
            if any(fd_inside(args[i]) for i in fd_args if i < len(args)):
                enospc()
            return real(*args, **kwargs)

        return call

    builtins.open, io.open, os.open = patched_open, patched_io_open, patched_os_open
    os.write = guarded("write", (0,))
    os.sendfile = guarded("sendfile", (0,))
    os.fsync = guarded("fsync", (0,))
    if "copy_file_range" in saved:
        os.copy_file_range = guarded("copy_file_range", (1,))
    try:
        yield
    finally:
        builtins.open, io.open = real_open, real_io_open
        for name, real in saved.items():
            setattr(os, name, real)
        os.close(full_fd)


def test_full_disk_injection_fails_writes_only_under_its_folder(tmp_path):
    """The injection itself: writes under the folder fail with ENOSPC (and a truncating open truncates),
    reads, renames and other folders work, and everything is as before once the block ends."""
    import shutil as sh

    inside, outside = tmp_path / "full", tmp_path / "free"
    inside.mkdir()
    outside.mkdir()
    (inside / "old.bin").write_bytes(b"old")
    (outside / "src.bin").write_bytes(b"x" * 10000)
    with full_disk_under(inside):
        for write in (lambda: (inside / "a.bin").write_bytes(b"data"),
                      lambda: sh.copyfile(outside / "src.bin", inside / "b.bin"),
                      lambda: os.write(os.open(inside / "c.bin", os.O_WRONLY | os.O_CREAT), b"data")):
            with pytest.raises(OSError) as caught:
                write()
            assert caught.value.errno == errno.ENOSPC
        assert (inside / "old.bin").read_bytes() == b"old"
        os.replace(inside / "old.bin", inside / "renamed.bin")
        (outside / "ok.bin").write_bytes(b"fine")
        sh.copyfile(outside / "src.bin", outside / "copy.bin")
    assert (outside / "copy.bin").read_bytes() == b"x" * 10000 and (outside / "ok.bin").read_bytes() == b"fine"
    (inside / "a.bin").write_bytes(b"data")
    assert (inside / "a.bin").read_bytes() == b"data"


@pytest.fixture(params=["injected", "tmpfs"])
def full_disk(request, tmp_path):
    """(folder to put the studies in, a context manager during which that disk is full). `injected`
    runs everywhere; `tmpfs` (a real 2 MB tmpfs filled with a file) needs the right to mount (root)."""
    if request.param == "injected":
        folder = tmp_path / "disk"
        folder.mkdir()
        yield folder, lambda: full_disk_under(folder)
        return
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root; the `injected` variant ran): "
                    f"{done.stderr.decode().strip()}")

    @contextlib.contextmanager
    def filled():
        filler = _fill(mount)
        try:
            yield
        finally:
            filler.unlink()

    try:
        yield mount, filled
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _label_nrrd(path: Path, side: int, seed: int | None) -> Path:
    """A label as NRRD: gzip-compressed zeros (small) when seed is None, else raw random 0/1 (side^2 bytes)."""
    import gzip

    if seed is None:
        data, encoding = gzip.compress(bytes(side * side), mtime=0), "gzip"
    else:
        data, encoding = (np.random.default_rng(seed).random((side, side)) > 0.5).astype(np.uint8).tobytes(), "raw"
    path.write_bytes(f"NRRD0004\ntype: uint8\ndimension: 2\nsizes: {side} {side}\nencoding: {encoding}\n\n".encode()
                     + data)
    return path


def _fill(mount: Path) -> Path:
    """Write until the filesystem says ENOSPC (unbuffered, so the error comes from write(2))."""
    filler = mount / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == 28, exc
    finally:
        os.close(fd)
    return filler


def test_disk_full_on_label_save_keeps_the_previous_label(full_disk, tiny_model_root, tmp_path):
    """The new label (9 kB) is larger than the page the old one (<1 kB) frees: MONAI Label's own
    copy-over-the-old-file would leave a truncated label here; the app answers 507 and keeps it."""
    import requests

    from reliability_cases import png_bytes

    disk, disk_full = full_disk
    studies = make_tiny_studies(disk / "studies", n_2d=3, n_3d=0, n_labeled=1, seed=6)
    conf = dict(TINY_CONF, model_dir=str(tiny_model_root), prepare_default_model="false",
                state_dir=str(tmp_path / "state"))
    server = InProcessServer(studies, conf).start()
    try:
        url, image, side = server.url, "big_000", 96
        r = requests.put(f"{url}/datastore/image?image={image}", files={"file": ("b.png", png_bytes(side, side))},
                         timeout=60)
        assert r.status_code == 200, r.text
        first = _label_nrrd(tmp_path / "first.nrrd", side, None)
        r = requests.put(f"{url}/datastore/label?image={image}&tag=final",
                         files={"label": ("l.nrrd", first.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        stored = studies / "labels" / "final" / f"{image}.nrrd"
        assert stored.read_bytes() == first.read_bytes()
        server.app.wait_for_background(60)  # a saved label starts background scoring, which writes image info
        datastore_before = (studies / "datastore_v2.json").read_bytes()

        second = _label_nrrd(tmp_path / "second.nrrd", side, 2)
        assert second.stat().st_size > 2 * 4096 > first.stat().st_size
        with disk_full():
            r = requests.put(f"{url}/datastore/label?image={image}&tag=final",
                             files={"label": ("l.nrrd", second.read_bytes())}, timeout=60)
            assert r.status_code == 507, r.text
            assert "No space left" in r.json()["detail"] and "previous version is unchanged" in r.json()["detail"]
            assert stored.read_bytes() == first.read_bytes(), "the previous label was damaged"
            assert (studies / "datastore_v2.json").read_bytes() == datastore_before
            r = requests.put(f"{url}/datastore/image?image=late_upload", files={"file": ("x.png", png_bytes(64, 64))},
                             timeout=60)
            assert r.status_code == 507, r.text
            assert not list(studies.rglob("*.partial")) and not (studies / "late_upload.png").exists()
            assert "late_upload" not in server.client().datastore()["objects"]
            assert (studies / "datastore_v2.json").read_bytes() == datastore_before

        # space again: the same save now succeeds
        r = requests.put(f"{url}/datastore/label?image={image}&tag=final",
                         files={"label": ("l.nrrd", second.read_bytes())}, timeout=60)
        assert r.status_code == 200, r.text
        assert stored.read_bytes() == second.read_bytes()
    finally:
        server.stop()


def test_partial_files_of_a_killed_write_are_cleaned_up_on_start(tiny_model_root, tmp_path):
    """A process killed mid-write leaves `.<name>.<random>.partial` (never the label itself); the
    next start removes old ones and leaves a young one (another process may be writing it)."""
    studies = make_tiny_studies(tmp_path / "studies", n_2d=2, n_3d=0, n_labeled=1, seed=8)
    final = studies / "labels" / "final"
    old = final / ".cxr_000.png.k1ll3d.partial"
    young = final / ".cxr_001.png.inprog.partial"
    for path in (old, young):
        path.write_bytes(b"\x89PNG half")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    labels_before = sorted(p.name for p in final.iterdir() if not p.name.startswith("."))
    conf = dict(TINY_CONF, model_dir=str(tiny_model_root), prepare_default_model="false",
                state_dir=str(tmp_path / "state"))
    server = InProcessServer(studies, conf).start()
    try:
        assert not old.exists() and young.exists()
        assert sorted(p.name for p in final.iterdir() if not p.name.startswith(".")) == labels_before
        assert sorted(server.client().datastore()["objects"]) == ["cxr_000", "cxr_001"]
    finally:
        server.stop()

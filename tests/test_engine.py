"""The training engine on several processes: `accelerate launch` (CPU, gloo) writes what one process writes,
and the JSON jobs the server's train tasks launch on several GPUs run the same way."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fasttextdiff.cli import main as cli
from fasttextdiff.config import MODEL_CONFIG_FILE
from fasttextdiff.devices import resolve_device

LIB = str(Path(__file__).resolve().parents[1] / "lib")
BACKBONE = ["--image-size", "32", "--widths", "8,16", "--timesteps", "50,150", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "4"]
SEGMENTER = ["--epochs", "2", "--batch-size", "2", "--fusion-dim", "16", "--heads", "2", "--head-channels", "8"]


def _shape(value):
    """Keys all the way down (list items by their first element): what a reader of the file relies on."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(value[0])] if value else []
    return type(value).__name__


def test_one_device_choice_for_library_cli_and_server():
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto") == resolve_device("NVIDIA H200") == auto
    assert resolve_device(["cpu"]) == resolve_device("NVIDIA H200", default="cpu") == torch.device("cpu")
    if not torch.cuda.is_available():  # a --conf written for a GPU machine still runs here
        assert resolve_device("cuda:1") == torch.device("cpu")


@pytest.mark.slow
def test_two_processes_pretrain_and_train_to_the_same_metrics_files_as_one(tmp_path, tiny_dataset, accelerate_launch):
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli(["pretrain-backbone", "--data", str(tiny_dataset), "--out", str(one / "bb"), *BACKBONE]) == 0
    assert cli(["train", "--data", str(tiny_dataset), "--backbone", str(one / "bb"), "--out", str(one / "m"),
                *SEGMENTER]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": LIB}
    for args in (["pretrain-backbone", "--data", str(tiny_dataset), "--out", str(two / "bb"), *BACKBONE],
                 ["train", "--data", str(tiny_dataset), "--backbone", str(two / "bb"), "--out", str(two / "m"),
                  *SEGMENTER]):
        proc = subprocess.run([*accelerate_launch(2), "fasttextdiff.cli", *args], capture_output=True, env=env,
                              encoding="utf-8", errors="replace", timeout=400, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]

    bb1, bb2 = (json.loads((d / "bb" / "metrics.json").read_text(encoding="utf-8")) for d in (one, two))
    assert _shape(bb1) == _shape(bb2) and (bb1["world_size"], bb2["world_size"]) == (1, 2)
    assert bb1["steps"] == bb2["steps"] == 2
    m1, m2 = (json.loads((d / "m" / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))["metrics"] for d in (one, two))
    assert m2.pop("ddp_weights_identical") is True  # the one key only several processes have
    assert _shape(m1) == _shape(m2) and (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["epochs"] == m2["epochs"] == 2 and m1["test"]["n"] == m2["test"]["n"] == 4  # every test image, once


@pytest.mark.slow
def test_a_launched_job_reports_its_progress_and_result(tmp_path, tiny_dataset, tiny_backbone, monkeypatch):
    """What a server train task does with `multi_gpu`: the job runs on 2 processes, its log records and
    metrics come back to the launching process."""
    from fasttextdiff.workflows import launch_job, load_lvit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", LIB)
    samples = load_lvit(tiny_dataset)["train"]
    job = {"job": "train-segmenter", "out_dir": str(tmp_path / "m"), "backbone_dir": str(tiny_backbone),
           "device": "cpu", "samples": [{"image": str(s.image), "mask": str(s.mask), "text": s.text, "name": s.name}
                                        for s in samples],
           "text": {"encoder": "tiny"}, "segmenter": {"head_channels": 8, "fusion": {"dim": 16, "heads": 2}},
           "train": {"epochs": 2, "batch_size": 2}}
    records: list[dict] = []
    metrics = launch_job(job, 2, tmp_path / "work", records.append)
    assert [r["epoch"] for r in records] == [1, 2] and metrics["world_size"] == 2 and metrics["epochs"] == 2
    assert (tmp_path / "m" / MODEL_CONFIG_FILE).is_file()
    assert not list((tmp_path / "work").iterdir())  # the job's files are cleaned up

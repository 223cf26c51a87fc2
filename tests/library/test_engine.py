"""The training engine on several processes: `accelerate launch` (CPU, gloo) writes what one process writes
(backbone pretraining, segmenter training, text pretraining), and the JSON jobs the server's train tasks
launch on several GPUs run the same way."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from fasttextdiff.commands.main import main as cli
from fasttextdiff.config import MODEL_CONFIG_FILE
from fasttextdiff.models.segmenter import WEIGHTS_FILE
from fasttextdiff.utils.devices import resolve_device

LIB = str(Path(__file__).resolve().parents[2] / "lib")
BACKBONE = ["--image-size", "32", "--widths", "8,16", "--timesteps", "50,150", "--epochs", "1", "--max-steps", "2",
            "--batch-size", "4"]
TEXT = ["--corpus", "iu-xray", "--init", "tiny", "--steps", "4", "--max-seq-len", "32", "--batch-size", "4",
        "--hidden", "32",
        "--layers", "2", "--tokenizer", "minilm", "--max-notes", "150", "--device", "cpu"]
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


# One launched job runs both commands, as a user's script would: one set of process start-ups for
# both steps. `accelerate launch -m` takes one module, so this file is that module.
_RUN_COMMANDS = """# fasttextdiff CLI commands one after another in this (launched) process
import json
import sys

from fasttextdiff.commands.main import main

for args in json.loads(sys.argv[1]):
    code = main(args)
    if code:
        sys.exit(code)
"""


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory, tiny_dataset, accelerate_launch):
    """pretrain-backbone then train, on one process (in this one) and on two under `accelerate launch`, where
    pretrain-text follows; (one, two, the launch's stdout). Shared by the tests below: each launch costs several
    process start-ups."""
    root = tmp_path_factory.mktemp("engine")
    one, two = root / "one", root / "two"
    assert cli(["pretrain-backbone", "--data", str(tiny_dataset), "--out", str(one / "bb"), *BACKBONE]) == 0
    assert cli(["train", "--data", str(tiny_dataset), "--backbone", str(one / "bb"), "--out", str(one / "m"),
                *SEGMENTER]) == 0

    (root / "run_commands.py").write_text(_RUN_COMMANDS, encoding="utf-8")
    commands = [["pretrain-backbone", "--data", str(tiny_dataset), "--out", str(two / "bb"), *BACKBONE],
                ["train", "--data", str(tiny_dataset), "--backbone", str(two / "bb"), "--out", str(two / "m"),
                 *SEGMENTER],
                ["pretrain-text", "--out", str(two / "text"), *TEXT]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([LIB, str(root)])}
    proc = subprocess.run([*accelerate_launch(2), "run_commands", json.dumps(commands)], capture_output=True,
                          env=env, encoding="utf-8", errors="replace", timeout=400, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return one, two, proc.stdout


@pytest.mark.slow
def test_two_processes_pretrain_and_train_to_the_same_metrics_files_as_one(one_and_two_processes):
    one, two, _ = one_and_two_processes
    bb1, bb2 = (json.loads((d / "bb" / "metrics.json").read_text(encoding="utf-8")) for d in (one, two))
    assert _shape(bb1) == _shape(bb2) and (bb1["world_size"], bb2["world_size"]) == (1, 2)
    assert bb1["steps"] == bb2["steps"] == 2
    m1, m2 = (json.loads((d / "m" / MODEL_CONFIG_FILE).read_text(encoding="utf-8"))["metrics"] for d in (one, two))
    assert m2.pop("ddp_weights_identical") is True  # the one key only several processes have
    assert _shape(m1) == _shape(m2) and (m1["world_size"], m2["world_size"]) == (1, 2)
    assert m1["test"]["n"] == m2["test"]["n"] == 4  # every test image, once
    assert m1["epochs"] == m2["epochs"] == 4  # --epochs 2 image-only, then 2 with the report (text_fallback)


def test_two_cpu_processes_train_together_with_identical_weights(one_and_two_processes):
    """(Was in test_train.py: it shares the launch above.) Each rank prints its own result."""
    _, two, stdout = one_and_two_processes
    outputs = [json.loads(chunk) for chunk in _json_objects(stdout)]
    assert len(outputs) == 4  # pretrain-backbone and train, once per rank (pretrain-text prints a sentence)
    trained = [o for o in outputs if "ddp_weights_identical" in o]
    assert len(trained) == 2  # one train result per rank
    assert all(o["world_size"] == 2 and o["ddp_weights_identical"] is True for o in trained)
    assert (two / "m" / WEIGHTS_FILE).is_file()


@pytest.mark.slow
def test_ddp_text_pretraining_under_accelerate_launch_with_gloo(one_and_two_processes):
    """(Was in test_text_pretrain.py: it shares the launch above.) Two CPU processes (gloo): both train,
    the main process writes one loadable encoder."""
    from fasttextdiff.config import TextConfig
    from fasttextdiff.text.encoder import TextEncoder

    _, two, stdout = one_and_two_processes
    out = two / "text"
    assert "held-out masked-token perplexity" in stdout
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["world_size"] == 2 and metrics["steps"] == 4
    assert metrics["tokens"] == 4 * 4 * 32 * 2  # both ranks' blocks are counted
    assert TextEncoder(TextConfig(encoder=str(out))).hidden_size == 32


def _json_objects(text: str) -> list[str]:
    objects, depth, start = [], 0, None
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
            start = i if depth == 1 else start
        elif ch == "}":
            depth -= 1
            if depth == 0:
                objects.append(text[start:i + 1])
    return objects


@pytest.mark.slow
def test_a_launched_job_reports_its_progress_and_result(tmp_path, tiny_dataset, tiny_backbone, monkeypatch):
    """What a server train task does with `multi_gpu`: the job runs on 2 processes, its log records and
    metrics come back to the launching process."""
    from fasttextdiff.training.workflows import launch_job, load_lvit

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

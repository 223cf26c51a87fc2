"""`make gpu-check` on a machine without CUDA: it says there is nothing to check, exits 0 and leaves the
committed GPU results alone (the GPU paths themselves run only where a GPU is; see bench/README.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
COMMITTED = REPO / "bench" / "results" / "gpu_check.json"


def test_without_cuda_there_is_nothing_to_check(tmp_path):
    before = COMMITTED.read_bytes() if COMMITTED.exists() else None
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO / "lib"))
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True, env=env,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "nothing to check" in proc.stdout
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["cuda"] is False
    assert {r["check"] for r in record["rows"]} >= {"train-bf16", "train-fp16", "text-attention", "multi-gpu",
                                                    "server-volume", "speed-features"}
    assert {r["status"] for r in record["rows"]} == {"not measured"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and "nothing to check" in proc.stdout
    assert (COMMITTED.read_bytes() if COMMITTED.exists() else None) == before  # no default write without CUDA


def test_the_makefile_target_runs_the_script():
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "\ngpu-check: $(STAMP)\n\t$(PY) bench/gpu_check.py\n" in makefile

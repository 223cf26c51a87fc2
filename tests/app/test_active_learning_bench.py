"""Smoke test of bench/active_learning.py at its smallest: one dataset, two strategies, two rounds, through
the app's real datastore, strategies and scoring. Checks the JSON schema and that every label was added
through the datastore (its record on disk and the label files). The figures mean nothing."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.timeout(300)  # ~35 s at load 3; minutes when the 2 cores are crowded

TINY = ["--datasets", "text-necessary", "--strategies", "random", "report_mismatch", "--rounds", "2", "--per-round",
        "2",
        "--seed-labels", "2", "--seeds", "0", "--pool", "8", "--n-val", "2", "--n-test", "3", "--size", "32",
        "--widths", "8", "16", "--pretrain-steps", "2", "--initial-steps", "2", "--round-steps", "1", "--n-noise", "2",
        "--no-plot", "--no-progress", "--keep-runs"]


def test_active_learning_smallest(tmp_path):
    import active_learning

    active_learning.main(TINY + ["--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), "--name", "al"])
    data = json.loads((tmp_path / "out" / "al.json").read_text())
    assert data["complete"] is True and data["command"].startswith("python bench/active_learning.py")
    assert data["machine"]["loadavg_start"] is not None and data["seconds"] > 0
    assert set(data["datasets"]) == {"text-necessary"}
    summary = data["datasets"]["text-necessary"]["summary"]
    assert set(summary) == {"random", "report_mismatch"}
    for strategy, s in summary.items():
        assert s["labels"] == [2, 4, 6]
        assert len(s["dice_mean"]) == 3 and all(0 <= d <= 1 and math.isfinite(d) for d in s["dice_mean"])
        assert set(s["dice_per_seed"]) == {"0"} and len(s["dice_per_seed"]["0"]) == 3
        assert "labels_to_match_random" in s and s["labels_to_match_random"] in (None, 2, 4, 6)
    assert summary["random"]["scoring_seconds_per_image"] is None  # random reads no scores
    assert summary["report_mismatch"]["scoring_seconds_per_image"] > 0
    assert summary["report_mismatch"]["images_scored"] == 6 + 4  # every unlabeled image, each round (new model)
    assert data["recommended_default"] == "random"  # one dataset cannot justify another default
    assert (tmp_path / "out" / "al.md").is_file()
    (tmp_path / "out" / "al.md").unlink()
    again = active_learning.main(["--render", str(tmp_path / "out" / "al.json"), "--no-plot"])  # from the runs alone
    assert again["datasets"]["text-necessary"]["summary"] == summary and (tmp_path / "out" / "al.md").is_file()

    # the labels went in through the app's datastore: its record and its label files
    sys.path.insert(0, str(BENCH.parent / "monailabel_app"))
    from lib.datastore import FastTextDiffDatastore

    for run in data["datasets"]["text-necessary"]["runs"]:
        studies = tmp_path / "work" / "text-necessary" / "runs" / f"{run['strategy']}-s0" / "studies"
        ds = FastTextDiffDatastore(str(studies), extensions=["*.png"], auto_reload=False, read_only=True)
        labeled = sorted(ds.get_labeled_images())
        assert labeled == run["curve"][-1]["datastore_labeled"] and len(labeled) == 6
        picked = [p["id"] for step in run["curve"][1:] for p in step["picked"]]
        assert len(set(picked)) == 4 and set(picked) <= set(labeled)
        assert not set(picked) & set(run["curve"][0]["datastore_labeled"])  # never offered an image already labeled
        for image_id in labeled:
            assert Path(ds.get_label_uri(image_id, "final")).is_file()
        for step in run["curve"][1:]:
            assert step["trained_on"] == step["labels"]  # training read the datastore's labeled images
        if run["strategy"] == "report_mismatch":
            assert all("rank_sum" in p for step in run["curve"][1:] for p in step["picked"])

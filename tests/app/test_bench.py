"""Smoke test of the benchmarks: each script's smallest configuration end to end (real data files,
real MONAI U-Net, real diffusers/transformers models), checking the JSON schema and that every
number is finite. Sizes are cut to the bone so the whole module stays well under two minutes on
two CPU cores; the figures it produces mean nothing and are written to a temporary folder.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

pytestmark = pytest.mark.timeout(110)  # each test; the module is ~1 minute on a loaded 2-core machine

TINY_ACCURACY = ["--quick", "--budgets", "0.25", "--pretrain-steps", "2", "--epochs", "1", "--min-steps", "0",
                 "--widths", "8", "16", "--fusion-dim", "8", "--no-plot"]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_accuracy(path: Path, dataset: str) -> dict:
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["dataset"] == dataset and data["complete"] is True
    methods = {r["method"] for r in data["results"]}
    assert methods == {"fasttextdiff", "no_text", "bert_text", "unet"}
    for row in data["results"]:
        for key in ("labeled_fraction", "dice_mean", "dice_std", "iou_mean", "iou_std"):
            assert _finite(row[key]), (key, row)
        assert 0 <= row["dice_mean"] <= 1 and 0 <= row["iou_mean"] <= 1
        assert row["seeds"] == [0]
    assert (path.with_suffix(".md")).is_file()
    return data


def test_accuracy_text_necessary_smallest(tmp_path):
    import accuracy

    accuracy.main(TINY_ACCURACY + ["--dataset", "text-necessary", "--size", "32", "--n-train", "8", "--n-val", "2",
                                   "--n-test", "2", "--out", str(tmp_path)])
    data = _check_accuracy(tmp_path / "accuracy_text-necessary_quick.json", "text-necessary")
    assert data["acceptance"]["checks"], "criterion-2 checks are computed for budgets <= 25 %"


def test_accuracy_nuclei_smallest(tmp_path):
    import accuracy

    accuracy.main(TINY_ACCURACY + ["--dataset", "nuclei", "--out", str(tmp_path)])
    data = _check_accuracy(tmp_path / "accuracy_nuclei_quick.json", "nuclei")
    assert data["split_sizes"] == [32, 8, 24]  # 64 non-overlapping 64 px tiles of the 512x512 image
    assert data["window"] == [127.5, 255.0]


def test_accuracy_user_lvit_path(tmp_path):
    """--dataset lvit reads any LViT-layout folder (here a small synthetic one written in that layout)."""
    import accuracy
    from fasttextdiff.data.synthetic import make_lvit_dataset

    root = make_lvit_dataset(tmp_path / "lvit", variant="standard", n_train=6, n_val=2, n_test=2, size=32, seed=1)
    accuracy.main(TINY_ACCURACY + ["--dataset", "lvit", "--path", str(root), "--size", "32", "--budgets", "0.5",
                                   "--methods", "fasttextdiff", "unet", "--name", "mine", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "accuracy_mine.json").read_text(encoding="utf-8"))
    assert data["dataset"] == "lvit" and data["split_sizes"] == [6, 2, 2]
    assert {r["method"] for r in data["results"]} == {"fasttextdiff", "unet"}
    assert all(_finite(r["dice_mean"]) for r in data["results"])


def test_nuclei_tiles_do_not_overlap(tmp_path):
    import nuclei

    root = nuclei.make_nuclei_dataset(tmp_path / "tiles", tile=128)
    record = json.loads((root / "tiles.json").read_text(encoding="utf-8"))
    cells = [(t["row"], t["col"]) for t in record["tiles"]]
    assert len(cells) == len(set(cells)) == 16
    assert {t["split"] for t in record["tiles"]} == {"train", "val", "test"}
    assert all(t["report"].startswith("Fluorescence microscopy tile") for t in record["tiles"])


def test_benchmark_json_records_precision_device_and_cpu_flags(monkeypatch):
    """Every benchmark JSON carries `machine` (common.machine_info): the precision and device inference ran in
    and the CPU's vector extensions that `auto` depends on, so figures from two machines compare."""
    import platform

    import common
    import gpu_check
    from fasttextdiff.inference.batched import PRECISION_ENV

    monkeypatch.setenv(PRECISION_ENV, "bf16")
    inference = common.machine_info("cpu")["inference"]
    assert inference["precision"] == inference["compute_dtype"] == inference["precision_env"] == "bf16"
    assert inference["device"] == "cpu" and isinstance(inference["native"], bool)
    assert inference["cpu_flags"] == common.cpu_flags() and all(isinstance(f, str) for f in inference["cpu_flags"])
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert any(f.startswith("avx") for f in inference["cpu_flags"])
    assert common.inference_record("cpu", "fp32")["compute_dtype"] == "fp32"  # a benchmark's explicit choice wins
    assert gpu_check.not_measured("no CUDA")["machine"]["inference"]["device"] == "cpu"
    monkeypatch.setenv(PRECISION_ENV, "fp64")
    with pytest.raises(ValueError, match=PRECISION_ENV):
        common.machine_info()


def test_speed_smallest(tmp_path):
    import speed

    speed.main(["--tiny", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "speed.json").read_text(encoding="utf-8"))
    for key in ("train_speedup_vs_textdiff_style", "infer_speedup_vs_iterative"):
        assert _finite(data[key]) and data[key] > 0, key
    assert _finite(data["matmul"]["gflops_best"])
    flops = data["inference"]["flops"]
    assert all(isinstance(v, int) and v > 0 for v in flops.values())
    assert _finite(data["inference"]["volume"]["ours_n_noise_1"]["min_s"])
    assert data["gpu"]["measured"] in (True, False)
    assert data["machine"]["inference"]["device"] == data["fast"]["precision"]["device"]
    assert data["fast"]["precision"]["compute_dtype"] in ("fp32", "bf16", "fp16")
    # where the 2D forward's time goes: convolutions by kernel plus the rest add up to the forward
    fb = data["floor_breakdown"]
    assert fb["conv_s"] > 0 and fb["other_s"] >= 0 and abs(fb["conv_s"] + fb["other_s"] - fb["forward_s"]) < 1e-6
    assert fb["best_case_over_floor"] >= 1 and "conv 3x3" in fb["by_kind"] and data["cpu_isa"]
    assert data["ct_volume_seconds_n_noise_2_draws"] > 0
    # the paper's tapping stops the forward before the full-resolution decoder: fewer FLOPs per image
    paper = data["fast"]["paper_taps_model"]
    assert 0 < paper["model_forward_flops_per_image"] < flops["model_forward_per_image"]
    assert data["ct_volume_seconds_with_uncertainty_paper_taps"] > 0
    # the breakdown's floor uses the best one-thread rate the run showed, its own convolutions' included
    assert fb["rate_gflops"] >= max(v["gflops_per_s"] for v in fb["by_kind"].values() if v["gflops_per_s"])
    # --render recomputes the derived figures from the JSON alone and rewrites the report
    (tmp_path / "speed.md").unlink()
    rendered = speed.main(["--render", str(tmp_path / "speed.json")])
    assert rendered["goals"] == data["goals"] and list(rendered["training"]) == list(speed.TINY_TRAIN)
    assert "paper's tapping" in (tmp_path / "speed.md").read_text(encoding="utf-8")
    assert "The fast-path rows ran with precision" in (tmp_path / "speed.md").read_text(encoding="utf-8")
    assert (tmp_path / "speed.md").is_file() and (tmp_path / "speed.png").is_file()


@pytest.mark.timeout(600)  # ~40 s of CPU: it also reads the IU corpus twice (reports, a 2-step MLM run)
def test_text_encoders_smallest(tmp_path):
    """The encoder comparison end to end: every encoder kind (a 2-step MLM adaptation included), the
    reference truncation, the clinical-reports data, aggregation and the acceptance checks."""
    import text_encoders

    text_encoders.main(["--quick", "--seeds", "0", "--budgets", "0.25", "--size", "32", "--n-train", "8",
                        "--n-val", "2", "--n-test", "2", "--pretrain-steps", "2", "--epochs", "1", "--min-steps", "0",
                        "--widths", "8", "16", "--fusion-dim", "8", "--adapt-steps", "2", "--no-plot",
                        "--encoders", "no_text", "tiny_random", "tiny_adapted_focus", "minilm_focus", "minilm_trunc10",
                        "--out", str(tmp_path)])
    data = json.loads((tmp_path / "text_encoders_quick.json").read_text())
    assert data["dataset"] == "clinical-reports" and data["complete"] is True
    assert [r["method"] for r in data["results"]] == ["no_text", "tiny_random", "tiny_adapted_focus", "minilm_focus",
                                                      "minilm_trunc10"]
    assert all(_finite(r["dice_mean"]) and 0 <= r["dice_mean"] <= 1 for r in data["results"])
    mlm = data["encoders"]["tiny_adapted_focus"]["mlm"]
    assert mlm["steps"] == 2 and _finite(mlm["perplexity_after"])
    claims = {c["encoder"] for c in data["acceptance"]["checks"]}
    assert {"tiny_random", "tiny_adapted_focus", "minilm_focus"} <= claims
    # how often each focus encoder's kept sentences still name the lesions, per split
    kept = data["focus_lesion_kept"]
    assert set(kept) == {"tiny_adapted_focus", "minilm_focus"} and all(0 <= v <= 1 for k in kept.values()
                                                                        for v in k.values())
    assert (tmp_path / "text_encoders_quick.md").read_text().count("minilm_trunc10") >= 2

    # seeds run side by side are merged afterwards; the same run twice is refused
    merged = text_encoders.main(["--merge", str(tmp_path / "text_encoders_quick.json"), "--out", str(tmp_path),
                                 "--name", "merged", "--no-plot"])
    assert merged["results"] == data["results"] and (tmp_path / "merged.md").is_file()
    with pytest.raises(SystemExit, match="more than one"):
        text_encoders.main(["--merge", *[str(tmp_path / "text_encoders_quick.json")] * 2, "--out", str(tmp_path),
                            "--no-plot"])


def test_text_encoders_region_probe_and_focus_recall(tmp_path):
    """The two diagnostics behind bench/README.md's clinical-reports statement, on a few real MiniLM encodings."""
    import text_encoders

    small = ["--quick", "--size", "32", "--n-train", "12", "--n-val", "4", "--n-test", "4", "--out", str(tmp_path)]
    probe = text_encoders.main(small + ["--probe"])
    saved = json.loads((tmp_path / "text_probe.json").read_text())
    assert saved["readings"].keys() == probe["readings"].keys() == {"token_mean", "token_max", "lesion_sentence"}
    for rows in saved["readings"].values():
        assert {"val_32_reports", "test_128_reports"} <= set(rows)
        assert all(r["accuracy"] is None or 0 <= r["accuracy"] <= 1 for r in rows.values())
        assert all(0.5 <= r["majority"] <= 1 for r in rows.values())
    recall = text_encoders.main(small + ["--focus-recall", "--encoders", "minilm_focus"])
    assert set(recall["lesion_kept"]["minilm_focus"]) == {"val", "test"}
    assert all(0 <= v <= 1 for v in recall["lesion_kept"]["minilm_focus"].values())
    places = text_encoders.main(small + ["--place-phrases", "--encoders", "minilm_focus", "tiny_random"])
    readers = json.loads((tmp_path / "text_place_phrases.json").read_text())["readers"]
    assert set(readers) == set(places["readers"]) == {"shared words (no synonyms known)", "minilm", "tiny_random"}
    for reader in readers.values():
        assert 0 <= reader["phrase_accuracy"] <= 1 and reader["test_reports_with_a_place"] >= 1
        assert len(reader["wrong"]) >= places["heldout_phrases"] - reader["phrases_read_right"] - 1e-9
    # "apical right lung" shares no word with any training phrase of the upper right lung but "right"
    assert "apical right lung" in readers["shared words (no synonyms known)"]["wrong"]
    # a local encoder folder (the clinical model a user has) joins the comparison under its own label
    from fasttextdiff.text.encoder import minilm_dir

    made = text_encoders.main(small + ["--prepare-only", "--encoders", f"clinical={minilm_dir()}"])
    assert str(minilm_dir()) in made["encoders"]["clinical"]["encoder"]
    for bad in (f"clinical={tmp_path}", f"minilm={minilm_dir()}"):
        with pytest.raises(SystemExit, match="LABEL=DIR|not a model folder"):
            text_encoders.main(small + ["--prepare-only", "--encoders", bad])


def test_accuracy_merges_seeds_run_side_by_side_and_checks_no_text(tmp_path):
    """The text-only-helps check on nuclei (fasttextdiff >= no_text - 0.005 at every budget) over seeds that ran in
    separate processes, merged afterwards."""
    import accuracy

    for seed in ("0", "1"):
        accuracy.main(TINY_ACCURACY + ["--dataset", "nuclei", "--methods", "fasttextdiff", "no_text", "--seeds", seed,
                                       "--name", f"s{seed}", "--out", str(tmp_path)])
    merged = accuracy.main(["--merge", str(tmp_path / "accuracy_s0.json"), str(tmp_path / "accuracy_s1.json"),
                            "--name", "nuclei_merged", "--out", str(tmp_path), "--no-plot"])
    assert merged["plan"]["seeds"] == [0, 1] and len(merged["runs"]) == 4
    assert {tuple(r["seeds"]) for r in merged["results"]} == {(0, 1)}
    [check] = [c for c in merged["acceptance"]["checks"] if "no_text" in c["claim"]]
    assert check["holds"] == (check["dice_gap"] >= -0.005)
    assert "Merged from 2 result files" in (tmp_path / "accuracy_nuclei_merged.md").read_text()
    with pytest.raises(SystemExit, match="more than one"):
        accuracy.main(["--merge", str(tmp_path / "accuracy_s0.json"), str(tmp_path / "accuracy_s0.json"),
                       "--out", str(tmp_path), "--no-plot"])
    # PATH:methods takes only those methods' runs from a file (here: no_text of seed 0 twice is no clash)
    picked = accuracy.main(["--merge", str(tmp_path / "accuracy_s0.json"), f"{tmp_path / 'accuracy_s1.json'}:no_text",
                            "--name", "picked", "--out", str(tmp_path), "--no-plot"])
    assert sorted((r["method"], r["seed"]) for r in picked["runs"]) == [("fasttextdiff", 0), ("no_text", 0),
                                                                        ("no_text", 1)]


def test_speed_fast_path_only(tmp_path):
    """`--only-fast-path`: the fast inference path's rows alone (a shorter run for a busy machine), written to
    speed_fast_path.{json,md} beside each goal."""
    import speed

    data = speed.main(["--tiny", "--only-fast-path", "--skip-256-train", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "speed_fast_path.json").read_text(encoding="utf-8"))["command"] == data["command"]
    assert "--only-fast-path" in data["command"] and data["ct_volume_seconds_n_noise_2_draws"] > 0
    md = (tmp_path / "speed_fast_path.md").read_text(encoding="utf-8")
    assert md.startswith("# Speed, fast inference path rows") and "## Fast inference path goals" in md
    assert not (tmp_path / "speed.partial.json").exists()

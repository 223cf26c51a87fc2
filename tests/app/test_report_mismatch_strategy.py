"""Strategy `report_mismatch` of the MONAI Label app on a real datastore: the scoring method keeps each
unlabeled image's report mismatch beside its uncertainty (incrementally), and the strategy offers the best
rank sum of the two, labels saved through the datastore taking images out of the running."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

APP_DIR = Path(__file__).resolve().parents[2] / "monailabel_app"


@pytest.fixture()
def app(tmp_path, tiny_model):
    """The app's datastore (4 synthetic images with `<id>.txt` reports, one without), manager, strategies, scoring."""
    from fasttextdiff.data.io import Image, write_image
    from fasttextdiff.data.synthetic import render_case_details

    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.configs.app_conf import AppConf
        from lib.configs.fasttextdiff import SCORING, FastTextDiffConfig
        from lib.datastore import FastTextDiffDatastore
        from lib.model_manager import ModelManager, ModelPaths
    finally:
        sys.path.remove(str(APP_DIR))
    studies = tmp_path / "studies"
    studies.mkdir()
    labels = {}
    rng = np.random.default_rng(5)
    for name in ("case_a", "case_b", "case_c", "case_d"):
        case = render_case_details(rng, 32, "text-necessary")
        like = Image(case.image, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)
        write_image(studies / f"{name}.png", case.image, like)
        labels[name] = write_image(tmp_path / f"{name}_label.png", case.mask, like)
        if name != "case_d":  # case_d has no report
            (studies / f"{name}.txt").write_text(case.report, encoding="utf-8")
    conf = AppConf.from_conf({"model_dir": str(tiny_model), "state_dir": str(tmp_path / "state"), "device": "cpu",
                              "prepare_default_model": "false", "n_noise": "2"})
    ds = FastTextDiffDatastore(str(studies), extensions=["*.png"], auto_reload=False)
    assert ds.read_report_files() == 3
    paths = ModelPaths.from_conf(conf, str(studies), str(APP_DIR))
    manager = ModelManager(conf, paths)
    config = FastTextDiffConfig(conf, paths, manager, lambda: ds)
    return {"ds": ds, "manager": manager, "strategies": config.strategies(),
            "scoring": config.scoring_methods()[SCORING],
            "scoring_name": SCORING, "labels": labels}


def _set_scores(app, scores: dict, identity: str | None):
    from lib.infers.fasttextdiff import SCORE_KEY, text_sha

    ds = app["ds"]
    for image_id, (uncertainty, mismatch) in scores.items():
        text = str(ds.get_image_info(image_id).get("text") or "")
        ds.update_image_info_internal(image_id, {SCORE_KEY: {"score": uncertainty, "report_mismatch": mismatch,
                                                             "model": identity, "text_sha": text_sha(text)}})


def _take(app, strategy: str) -> str:
    """One next_sample, then the offered image is labeled through the datastore, as a client does."""
    choice = app["strategies"][strategy]({"strategy": strategy}, app["ds"])
    app["ds"].save_human_label(choice["id"], str(app["labels"][choice["id"]]), "final", {})
    return choice["id"]


def test_registered_with_the_app(app):
    assert {"random", "first", "uncertainty", "report_mismatch"} <= set(app["strategies"])


def test_rank_sum_order_on_a_datastore(app):
    identity = app["manager"].paths.model_identity()
    assert identity
    # uncertainty ranks a > d > b > c; mismatch ranks b > c > a; case_d has no report: uncertainty alone
    _set_scores(app, {"case_a": (0.9, 0.0), "case_b": (0.5, 1.0), "case_c": (0.1, 0.5), "case_d": (0.8, None)},
                identity)
    assert app["strategies"]["uncertainty"]({"strategy": "uncertainty"}, app["ds"])["id"] == "case_a"
    first = app["strategies"]["report_mismatch"]({"strategy": "report_mismatch"}, app["ds"])
    assert first["id"] == "case_d" and first["report_mismatch"] is None and first["score_current"] is True
    # rank sums: a (1 + 1/3) / 2, b (1/2 + 1) / 2, c (1/4 + 2/3) / 2, d 3/4; b ties d, d is more uncertain
    assert first["rank_sum"] == pytest.approx(0.75)
    order = [_take(app, "report_mismatch") for _ in range(4)]
    assert order == ["case_d", "case_b", "case_a", "case_c"]  # the confident but contradicted case_b beats case_a
    assert app["strategies"]["report_mismatch"]({"strategy": "report_mismatch"}, app["ds"]) is None
    assert sorted(app["ds"].get_labeled_images()) == ["case_a", "case_b", "case_c", "case_d"]


def test_stale_scores_decide_only_without_current_ones_and_no_scores_fall_back_to_first(app):
    strategy = app["strategies"]["report_mismatch"]
    assert strategy({"strategy": "report_mismatch"}, app["ds"]) == {"id": "case_a", "fallback": "first"}
    _set_scores(app, {"case_a": (0.3, 0.0), "case_b": (0.2, 1.0), "case_c": (0.1, 0.5)}, "an-older-model")
    stale = strategy({"strategy": "report_mismatch"}, app["ds"])
    assert stale["id"] == "case_b" and stale["score_current"] is False
    _set_scores(app, {"case_c": (0.2, 0.0)}, app["manager"].paths.model_identity())
    assert strategy({"strategy": "report_mismatch"}, app["ds"])["id"] == "case_c"  # the only current score


def test_scoring_keeps_the_mismatch_beside_the_uncertainty_incrementally(app):
    from fasttextdiff.text.findings import report_mismatch

    from lib.infers.fasttextdiff import SCORE_KEY

    ds, scoring = app["ds"], app["scoring"]
    first = scoring({"method": app["scoring_name"]}, ds)
    assert first["scored"] == 4 and not first["failed"]
    segmenter, _ = app["manager"].segmenter()
    from fasttextdiff.data.io import read_image

    for image_id in ("case_a", "case_b", "case_c", "case_d"):
        info = ds.get_image_info(image_id)
        entry = info[SCORE_KEY]
        assert entry["score"] >= 0 and entry["n_noise"] == 2
        if image_id == "case_d":
            assert entry["report_mismatch"] is None  # no report, nothing to disagree with
        else:  # the same segmentation the scoring made (fixed noise seed): the same mismatch
            mask = segmenter.segment(read_image(ds.get_image_uri(image_id)), info["text"], n_noise=2).mask
            assert entry["report_mismatch"] == pytest.approx(report_mismatch(info["text"], mask))
    again = scoring({"method": app["scoring_name"]}, ds)
    assert again["scored"] == 0 and again["skipped"] == 4  # nothing changed: nothing rescored
    ds.update_image_info("case_a", {"text": "Unilateral pulmonary infection, one infected area, upper left lung."})
    ds.save_human_label("case_b", str(app["labels"]["case_b"]), "final", {})  # labeled: no longer scored
    third = scoring({"method": app["scoring_name"]}, ds)
    assert third["scored"] == 1 and third["skipped"] == 2 and set(third["scores"]) == {"case_a"}  # the changed report

"""The clinical-reports variant: radiology-style reports over the text-necessary cases, written from
the real IU X-ray sentences, 50-300 real WordPiece tokens, the lesion sentence out of a 10-token
truncation's reach, and phrasings in the test split that training never saw."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fasttextdiff.data.clinical_reports import (
    BILATERAL,
    PHRASINGS,
    PLACES,
    TOKEN_RANGE,
    clinical_report,
    iu_sentence_pool,
    regions_named,
)
from fasttextdiff.data.lvit import load_split
from fasttextdiff.data.synthetic import REGIONS, make_lvit_dataset, render_case_details

N_REPORTS = 300


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fasttextdiff.text.encoder import minilm_dir

    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def _reports(phrasing: str, n: int = N_REPORTS):
    out = []
    for i in range(n):
        rng = np.random.default_rng([7, i])
        regions = [REGIONS[j] for j in rng.permutation(6)[: int(rng.integers(1, 4))]]
        out.append((regions, clinical_report(regions, rng, phrasing)))
    return out


@pytest.fixture(scope="module")
def reports():
    return {p: _reports(p) for p in PHRASINGS}


def test_report_names_exactly_the_labeled_regions(reports):
    for phrasing in PHRASINGS:
        for regions, report in reports[phrasing]:
            assert regions_named(report.text) == set(regions), report.text
            assert report.lesion_sentence in report.text
            assert report.text.startswith("EXAMINATION: ")
            assert report.text.index("FINDINGS: ") < report.text.index(report.lesion_sentence) \
                < report.text.index("IMPRESSION: ")


def test_reports_are_long_and_a_10_token_truncation_loses_the_lesion(reports, tokenizer):
    lengths = []
    for phrasing in PHRASINGS:
        for _, report in reports[phrasing]:
            ids = tokenizer(report.text, add_special_tokens=False)["input_ids"]
            lengths.append(len(ids))
            before = report.text[: report.text.index(report.lesion_sentence)]
            # the reference keeps [CLS] + 8 tokens + [SEP]: the lesion sentence starts well after that
            assert len(tokenizer(before, add_special_tokens=False)["input_ids"]) >= 12
    assert TOKEN_RANGE[0] <= min(lengths) and max(lengths) <= TOKEN_RANGE[1]
    assert np.percentile(lengths, 90) - np.percentile(lengths, 10) > 80  # lengths spread over the range


def test_reports_use_real_iu_sentences_negations_and_hedges(reports):
    pool = iu_sentence_pool()
    iu = {s for group in (pool.findings, pool.impression) for items in group.values() for s in items}
    texts = [r.text for p in PHRASINGS for _, r in reports[p]]
    for _, report in reports["train"]:
        assert report.distractors and set(report.distractors) <= iu
        for s in report.distractors:
            assert s in report.text
            assert not regions_named(s)  # a distractor never names a lung region
    assert sum("No consolidation on the" in t or "lung is clear" in t or "No focal opacity in the" in t
               for t in texts) > 50
    assert sum(any(h in t for h in ("possible ", "probable ", "Possible ", "Probable ")) for t in texts) > 20
    assert sum(any(a in t for a in ("RUL", "RLL", "LUL", "LLL", "RML")) for t in texts) > 20


def test_heldout_phrasings_never_occur_in_training(reports):
    train = [r for _, r in reports["train"]]
    test = [r for _, r in reports["heldout"]]
    train_places = {p for r in train for p in r.places}
    test_places = {p for r in test for p in r.places}
    assert train_places and test_places and not train_places & test_places
    for phrase in train_places:  # no training place phrase appears inside a held-out one
        assert all(phrase.lower() not in q.lower() for q in test_places)
    assert not {t for r in train for t in r.templates} & {t for r in test for t in r.templates}
    assert not {w for r in train for w in r.words} & {w for r in test for w in r.words}
    assert not {s for r in train for s in r.distractors} & {s for r in test for s in r.distractors}
    # sentence order: the lesion sentence comes before the bone findings in training, after them in test
    assert all(r.order.index("lesion") < r.order.index("bones") for r in train)
    assert all(r.order.index("lesion") > r.order.index("bones") for r in test)
    # and the banks cover every region on both sides
    for bank in PHRASINGS:
        assert set(PLACES[bank]) == set(REGIONS) and set(BILATERAL[bank]) == {"upper", "middle", "lower"}


def test_reports_are_deterministic():
    a = clinical_report(["upper right", "lower left"], np.random.default_rng(3), "heldout")
    b = clinical_report(["upper right", "lower left"], np.random.default_rng(3), "heldout")
    c = clinical_report(["upper right", "lower left"], np.random.default_rng(4), "heldout")
    assert a == b and a.text != c.text


@pytest.mark.parametrize("regions, phrasing, match", [([], "train", "region"), (["upper right"], "test", "phrasing")])
def test_clinical_report_refuses(regions, phrasing, match):
    with pytest.raises(ValueError, match=match):
        clinical_report(regions, np.random.default_rng(0), phrasing)


def test_clinical_reports_dataset(tmp_path):
    kwargs = dict(n_train=3, n_val=2, n_test=3, size=32, seed=4)
    root = make_lvit_dataset(tmp_path / "clinical", "clinical-reports", **kwargs)
    plain = make_lvit_dataset(tmp_path / "plain", "text-necessary", **kwargs)
    params = json.loads((root / "synthetic.json").read_text())
    assert params["variant"] == "clinical-reports"
    assert params["phrasing"] == {"train": "train", "val": "train", "test": "heldout"}
    assert (root / "Train_text.xlsx").is_file() and (root / "Test_text.xlsx").is_file()
    for split_id, split in enumerate(("train", "val", "test")):
        samples, same_cases = load_split(root, split), load_split(plain, split)
        assert len(samples) == kwargs[f"n_{split}"]
        for index, (sample, twin) in enumerate(zip(samples, same_cases)):
            # the same images and masks as text-necessary; only the report differs
            assert sample.image.read_bytes() == twin.image.read_bytes()
            assert sample.mask.read_bytes() == twin.mask.read_bytes()
            case = render_case_details(np.random.default_rng([4, split_id, index]), 32, "text-necessary")
            assert regions_named(sample.text) == set(case.labeled_regions)
            assert "FINDINGS:" in sample.text and "IMPRESSION:" in sample.text
            phrasing = "heldout" if split == "test" else "train"
            expected = clinical_report(case.labeled_regions, np.random.default_rng([4, split_id, index, 1]), phrasing)
            assert "\nFINDINGS: " in expected.text  # sections on their own lines in the table;
            assert sample.text == " ".join(expected.text.split())  # the LViT reader gives one line
    again = make_lvit_dataset(tmp_path / "again", "clinical-reports", **kwargs)
    assert [s.text for s in load_split(again, "test")] == [s.text for s in load_split(root, "test")]

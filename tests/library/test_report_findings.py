"""Report findings versus mask findings (`fasttextdiff.text.findings`): parsing both report styles, reading
masks, and the mismatch score the `report_mismatch` strategy ranks by. Real synthetic cases and the real
nuclei report sentences; numpy only, no model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fasttextdiff.data.synthetic import render_case_details, report_for_regions
from fasttextdiff.text.findings import mask_findings, mismatch_terms, parse_report, report_mismatch


def test_parse_chest_reports():
    f = parse_report("Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.")
    assert f.count == (2, 2) and f.regions == {"upper left", "lower right"} and f.cluster is None
    none = parse_report("No pulmonary infection.")
    assert none.count == (0, 0) and none.regions == frozenset() and not none.empty
    # regions named without a count: the count is how many regions are named
    assert parse_report("Opacities in the middle right lung and the lower left lung").count == (2, 2)


def test_parse_nuclei_reports():
    f = parse_report("Fluorescence microscopy tile, three to five nuclei, moderate coverage, clustered in the upper "
                     "left.")
    assert f.count == (3, 5) and f.cluster == (0, 0) and f.coverage == 1 and f.regions is None
    assert parse_report("Fluorescence microscopy tile, one or two nuclei, sparse coverage, clustered in the "
                        "centre.").cluster == (1, 1)
    more = parse_report("Fluorescence microscopy tile, more than ten nuclei, dense coverage, clustered in the lower "
                        "part.")
    assert more.count[0] == 11 and math.isinf(more.count[1]) and more.cluster == (2, 1) and more.coverage == 2
    assert parse_report("Fluorescence microscopy tile, no nuclei, background only.").count == (0, 0)
    assert parse_report("..., clustered in the right side.").cluster == (1, 2)


def test_a_report_that_names_nothing_gives_no_mismatch():
    assert parse_report("").empty and parse_report("Chest radiograph, portable.").empty
    assert report_mismatch("Chest radiograph, portable.", np.ones((32, 32), np.uint8)) is None


def test_true_masks_agree_with_their_reports_and_wrong_ones_do_not():
    rng = np.random.default_rng(3)
    wrong_seen = 0
    for _ in range(40):
        case = render_case_details(rng, 64, "text-necessary")
        assert report_mismatch(case.report, case.mask) == 0.0, case.report
        every = np.zeros_like(case.mask)  # the image-only guess: every lesion, named or not
        for lesion in case.lesion_masks:
            every[lesion] = 1
        if not all(case.labeled):
            assert report_mismatch(case.report, every) > 0.2, case.report
            wrong_seen += 1
        # an empty prediction misses every named finding: count and regions both fully wrong
        assert report_mismatch(case.report, np.zeros_like(case.mask)) == 1.0
    assert wrong_seen >= 10


def test_mask_regions_follow_the_radiological_convention():
    rng = np.random.default_rng(0)
    case = render_case_details(rng, 64, "standard")
    found = mask_findings(case.mask)
    assert found.regions == set(case.lesion_regions) and found.count == len(case.lesion_regions)
    # the patient's right lung is on the image's left: a blob there, mid-height, is "middle right"
    blob = np.zeros((64, 64), np.uint8)
    blob[30:35, 16:21] = 1
    assert mask_findings(blob).regions == {"middle right"}
    assert report_mismatch(report_for_regions(["middle right"]), blob) == 0.0
    assert report_mismatch(report_for_regions(["middle left"]), blob) == pytest.approx(0.5)  # count right, place wrong


def test_nuclei_terms_count_cluster_coverage_and_edge_fragments():
    mask = np.zeros((64, 64), np.uint8)
    for y, x in ((6, 6), (6, 20), (20, 6)):  # three 8x8 nuclei in the upper left, one sliver cut by the edge
        mask[y:y + 8, x:x + 8] = 1
    mask[60:64, 40:42] = 1
    found = mask_findings(mask)
    assert found.count == 4 and found.count_large == 3 and found.cluster == (0, 0)
    agree = "Fluorescence microscopy tile, three to five nuclei, sparse coverage, clustered in the upper left."
    assert report_mismatch(agree, mask) == 0.0  # the sliver may or may not count: the range meets 3-5
    terms = mismatch_terms(parse_report("..., six to ten nuclei, dense coverage, clustered in the lower right."),
                           found)
    assert terms == {"count": pytest.approx(2 / 6), "cluster": 1.0, "coverage": 1.0}


def test_volumes_are_compared_on_the_count():
    vol = np.zeros((6, 32, 32), np.uint8)
    vol[1:3, 4:10, 4:10] = 1
    vol[3:5, 20:26, 20:26] = 1
    assert mask_findings(vol).count == 2 and mask_findings(vol).volume
    assert report_mismatch("Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
                           vol) == 0.0
    assert report_mismatch("Unilateral pulmonary infection, one infected area, upper left lung.", vol) == 1.0

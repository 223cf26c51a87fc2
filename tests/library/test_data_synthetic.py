"""The synthetic LViT-style generator: reports agree with masks, text-necessary needs the text."""

from __future__ import annotations

import numpy as np
import pytest

from fasttextdiff.data.io import read_image
from fasttextdiff.data.lvit import load_split
from fasttextdiff.data.preprocess import mask_to_labels
from fasttextdiff.data.synthetic import (
    REGIONS,
    make_lvit_dataset,
    regions_in_report,
    render_case,
    render_case_details,
    report_for_regions,
)

SEEDS = range(24)


def _regions_with_labels(case) -> set[str]:
    ids = np.unique(case.region_map[case.mask > 0])
    return {REGIONS[i - 1] for i in ids if i > 0}


@pytest.mark.parametrize(
    "regions, report",
    [
        (
            ["upper left", "lower right"],
            "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung.",
        ),
        (["middle right"], "Unilateral pulmonary infection, one infected area, middle right lung."),
        (
            ["lower left", "upper left", "middle left"],
            "Unilateral pulmonary infection, three infected areas, upper left lung, middle left lung and lower left "
            "lung.",
        ),
        ([], "No pulmonary infection."),
    ],
)
def test_report_wording(regions, report):
    assert report_for_regions(regions) == report
    assert regions_in_report(report) == set(regions)


@pytest.mark.parametrize("variant", ["standard", "text-necessary"])
@pytest.mark.parametrize("size", [32, 64])
def test_render_case_outputs(variant, size):
    image, mask, report = render_case(np.random.default_rng(0), size, variant)
    assert image.shape == mask.shape == (size, size)
    assert image.dtype == np.uint8 and mask.dtype == np.uint8
    assert set(np.unique(mask)) == {0, 1}
    assert image.std() > 20  # anatomy, not a flat field
    assert report.endswith("lung.") and "pulmonary infection" in report


@pytest.mark.parametrize("variant", ["standard", "text-necessary"])
def test_report_names_exactly_the_labeled_regions(variant):
    for seed in SEEDS:
        case = render_case_details(np.random.default_rng(seed), 64, variant)
        assert regions_in_report(case.report) == _regions_with_labels(case) == set(case.labeled_regions)
        assert len(set(case.lesion_regions)) == len(case.lesion_regions)  # one lesion per region
        for lesion, region in zip(case.lesion_masks, case.lesion_regions):
            assert set(np.unique(case.region_map[lesion])) == {REGIONS.index(region) + 1}


def test_standard_labels_every_lesion():
    for seed in SEEDS:
        case = render_case_details(np.random.default_rng(seed), 64, "standard")
        assert 1 <= len(case.lesion_masks) <= 3 and all(case.labeled)


def test_text_necessary_leaves_lesions_unlabeled():
    fractions = []
    for seed in SEEDS:
        case = render_case_details(np.random.default_rng(seed), 64, "text-necessary")
        assert 2 <= len(case.lesion_masks) <= 4
        assert 1 <= sum(case.labeled) < len(case.labeled)  # non-empty, and something left out
        fractions.append(sum(case.labeled) / len(case.labeled))
    assert 0.3 < np.mean(fractions) < 0.7  # about half


def test_labeled_and_unlabeled_lesions_look_alike():
    """An image-only model must not be able to tell which lesions the report names."""
    brightness = {True: [], False: []}
    area = {True: [], False: []}
    for seed in range(60):
        case = render_case_details(np.random.default_rng(seed), 64, "text-necessary")
        for lesion, labeled in zip(case.lesion_masks, case.labeled):
            brightness[labeled].append(case.image[lesion].mean())
            area[labeled].append(lesion.sum())
    assert abs(np.mean(brightness[True]) - np.mean(brightness[False])) < 6
    assert abs(np.mean(area[True]) - np.mean(area[False])) < 0.15 * np.mean(area[True])


def test_image_only_dice_is_about_half_in_text_necessary():
    """Segmenting every lesion (the best guess without the text) scores far below perfect."""
    dices = []
    for seed in SEEDS:
        case = render_case_details(np.random.default_rng(seed), 64, "text-necessary")
        everything = np.any(case.lesion_masks, axis=0)
        truth = case.mask > 0
        dices.append(2 * (everything & truth).sum() / (everything.sum() + truth.sum()))
    assert 0.45 < np.mean(dices) < 0.8


def test_radiological_convention():
    """The patient's right lung is drawn on the image's left half."""
    for seed in SEEDS:
        case = render_case_details(np.random.default_rng(seed), 64, "standard")
        for lesion, region in zip(case.lesion_masks, case.lesion_regions):
            columns = np.nonzero(lesion)[1]
            assert (columns < 32).all() if region.endswith("right") else (columns >= 32).all()


def test_lesions_are_brighter_than_their_lung():
    case = render_case_details(np.random.default_rng(4), 64, "standard")
    lung = (case.region_map > 0) & ~np.any(case.lesion_masks, axis=0)
    for lesion in case.lesion_masks:
        assert case.image[lesion].mean() > case.image[lung].mean() + 30


def test_render_is_deterministic_by_seed():
    a = render_case(np.random.default_rng(11), 64, "text-necessary")
    b = render_case(np.random.default_rng(11), 64, "text-necessary")
    c = render_case(np.random.default_rng(12), 64, "text-necessary")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kwargs, words", [({"variant": "hard"}, "variant"), ({"size": 16}, "size")])
def test_render_refuses_bad_arguments(kwargs, words):
    with pytest.raises(ValueError, match=words):
        render_case(np.random.default_rng(0), **{"size": 64, "variant": "standard", **kwargs})


def test_make_lvit_dataset_layout_and_content(tmp_path):
    root = make_lvit_dataset(tmp_path / "synth", "text-necessary", n_train=4, n_val=2, n_test=3, size=48, seed=5)
    counts = {split: len(load_split(root, split)) for split in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 3}
    for sample in load_split(root, "train"):
        assert sample.mask.name == f"mask_{sample.name}"
        image, mask = read_image(sample.image).array, read_image(sample.mask).array
        assert image.shape == mask.shape == (48, 48)
        assert set(np.unique(mask)) == {0, 255}
        assert regions_in_report(sample.text)  # every report names at least one region
        assert mask_to_labels(mask).sum() > 0
    assert (root / "synthetic.json").is_file()


def test_make_lvit_dataset_is_deterministic(tmp_path):
    a = make_lvit_dataset(tmp_path / "a", n_train=3, n_val=1, n_test=1, size=32, seed=2)
    b = make_lvit_dataset(tmp_path / "b", n_train=5, n_val=1, n_test=1, size=32, seed=2)
    c = make_lvit_dataset(tmp_path / "c", n_train=3, n_val=1, n_test=1, size=32, seed=3)
    name = "Train_Folder/img/train_0002.png"
    assert (a / name).read_bytes() == (b / name).read_bytes()  # a case does not depend on split sizes
    assert (a / name).read_bytes() != (c / name).read_bytes()
    assert [s.text for s in load_split(a, "train")] == [s.text for s in load_split(b, "train")][:3]


@pytest.mark.parametrize("kwargs", [{"variant": "nope"}, {"n_train": 0}, {"n_val": -1}, {"n_test": 1.5}])
def test_make_lvit_dataset_refuses(tmp_path, kwargs):
    with pytest.raises(ValueError):
        make_lvit_dataset(tmp_path / "x", **kwargs)

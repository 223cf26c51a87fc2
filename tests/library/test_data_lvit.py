"""The LViT-layout loader, the augmented SegmentationDataset and the --labeled subset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from fasttextdiff.data.dataset import SegmentationDataset, select_labeled
from fasttextdiff.data.lvit import DatasetLayoutError, Sample, load_split, read_text_table, split_folder_name
from fasttextdiff.data.synthetic import write_text_table
from fasttextdiff.utils.errors import FastTextDiffError


def _square_case(size: int, top: int, left: int, side: int, rgb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A bright square on a dark field, and its mask (0/255) - the image shows where the label is."""
    mask = np.zeros((size, size), np.uint8)
    mask[top : top + side, left : left + side] = 255
    image = np.where(mask > 0, 220, 30).astype(np.uint8)
    return (np.dstack([image, image // 2, image]) if rgb else image), mask


def _write_split(root: Path, split: str, names: list[str], mask_name, image_ext=".png", mask_ext=".png",
                 texts: dict | None = None, table_suffix=".xlsx", size=40, rgb=False) -> None:
    folder = root / f"{split}_Folder"
    (folder / "img").mkdir(parents=True)
    (folder / "labelcol").mkdir()
    rows = {}
    for i, name in enumerate(names):
        image, mask = _square_case(size, 4 + i, 6 + 2 * i, 12, rgb)
        PILImage.fromarray(image).save(folder / "img" / f"{name}{image_ext}")
        PILImage.fromarray(mask).save(folder / "labelcol" / f"{mask_name(name)}{mask_ext}")
        rows[f"{name}{image_ext}"] = f"Finding number {i}.  Second   line."
    write_text_table(root / f"{split}_text{table_suffix}", rows if texts is None else texts)


@pytest.fixture
def qata_root(tmp_path) -> Path:
    """QaTa-COV19 naming: masks are mask_<image name>, tables are .xlsx."""
    root = tmp_path / "qata"
    _write_split(root, "Train", ["covid_1", "covid_2", "covid_3"], lambda n: f"mask_{n}")
    _write_split(root, "Val", ["covid_9"], lambda n: f"mask_{n}")
    _write_split(root, "Test", ["covid_20", "covid_21"], lambda n: f"mask_{n}", table_suffix=".csv")
    return root


@pytest.mark.parametrize("split, folder",
                         [("train", "Train_Folder"), ("VAL", "Val_Folder"), ("Test_Folder", "Test_Folder"),
                                            ("validation", "Val_Folder")])
def test_split_names(split, folder):
    assert split_folder_name(split) == folder


def test_unknown_split_raises():
    with pytest.raises(ValueError, match="train, val, test"):
        split_folder_name("dev")


def test_qata_layout(qata_root):
    train = load_split(qata_root, "train")
    assert [s.name for s in train] == ["covid_1.png", "covid_2.png", "covid_3.png"]
    assert all(s.mask.name == f"mask_{s.name}" for s in train)
    assert train[1].text == "Finding number 1. Second line."
    test = load_split(qata_root, "Test")  # a .csv table
    assert [s.text for s in test] == ["Finding number 0. Second line.", "Finding number 1. Second line."]
    assert len(load_split(qata_root, "Val_Folder")) == 1


def test_monuseg_layout_same_name_other_extension(tmp_path):
    root = tmp_path / "monuseg"
    _write_split(root, "Train", ["TCGA-A7-A13E-01Z", "TCGA-18-5592-01Z"], lambda n: n, image_ext=".jpg", rgb=True)
    samples = load_split(root, "train")
    assert {s.name for s in samples} == {"TCGA-A7-A13E-01Z.jpg", "TCGA-18-5592-01Z.jpg"}
    assert all(s.mask.suffix == ".png" and s.mask.stem == Path(s.name).stem for s in samples)
    assert all(s.text.startswith("Finding number") for s in samples)


def test_table_inside_split_folder_and_keyed_by_mask_name(tmp_path):
    root = tmp_path / "mosmed"
    _write_split(root, "Train", ["a", "b"], lambda n: n, texts={"mask_a.png": "left", "b": "right"})
    (root / "Train_text.xlsx").rename(root / "Train_Folder" / "Train_text.xlsx")
    assert [s.text for s in load_split(root, "train")] == ["left", "right"]


def test_image_without_text_row_gets_empty_text_and_a_warning(tmp_path, caplog):
    root = tmp_path / "d"
    _write_split(root, "Train", ["x1", "x2"], lambda n: f"mask_{n}", texts={"x1.png": "only one row"})
    with caplog.at_level(logging.WARNING, logger="fasttextdiff.data.lvit"):
        samples = load_split(root, "train")
    assert [s.text for s in samples] == ["only one row", ""]
    assert "x2.png" in caplog.text


def test_unlabeled_images_allowed_when_asked(tmp_path):
    root = tmp_path / "d"
    _write_split(root, "Train", ["x1", "x2"], lambda n: f"mask_{n}")
    (root / "Train_Folder" / "labelcol" / "mask_x2.png").unlink()
    with pytest.raises(DatasetLayoutError, match="mask for x2.png is missing"):
        load_split(root, "train")
    samples = load_split(root, "train", require_masks=False)
    assert samples[0].mask is not None and samples[1].mask is None


def _break(root: Path, what: str) -> None:
    if what == "root":
        import shutil

        shutil.rmtree(root)
    elif what == "img":
        for f in (root / "Train_Folder" / "img").iterdir():
            f.unlink()
        (root / "Train_Folder" / "img").rmdir()
    elif what == "labelcol":
        for f in (root / "Train_Folder" / "labelcol").iterdir():
            f.unlink()
        (root / "Train_Folder" / "labelcol").rmdir()
    elif what == "table":
        (root / "Train_text.xlsx").unlink()
    elif what == "columns":
        write_text_table(root / "Train_text.csv", {"a": "b"})
        (root / "Train_text.xlsx").unlink()
        (root / "Train_text.csv").write_text("File,Report\ncovid_1.png,x\n")
    elif what == "corrupt-table":
        (root / "Train_text.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")


@pytest.mark.parametrize(
    "what, words",
    [
        ("root", "dataset folder"),
        ("img", "image folder"),
        ("labelcol", "mask folder"),
        ("table", "Train_text.xlsx"),
        ("columns", "lacks the column"),
        ("corrupt-table", "cannot be read"),
    ],
)
def test_broken_layouts_name_what_is_missing(qata_root, what, words):
    _break(qata_root, what)
    with pytest.raises(DatasetLayoutError, match=words) as info:
        load_split(qata_root, "train")
    assert isinstance(info.value, FastTextDiffError)


def test_read_text_table_both_formats(tmp_path):
    rows = {"a.png": "Bilateral pulmonary infection.", "b.png": ""}
    write_text_table(tmp_path / "t.xlsx", rows)
    write_text_table(tmp_path / "t.csv", list(rows.items()))
    assert read_text_table(tmp_path / "t.xlsx") == rows == read_text_table(tmp_path / "t.csv")
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        read_text_table(tmp_path / "missing.xlsx")


# ------------------------------------------------------------------ SegmentationDataset


@pytest.mark.parametrize("size, channels", [(32, 1), (32, 3), (16, 1), (48, 3)])
def test_dataset_items(qata_root, size, channels):
    dataset = SegmentationDataset(load_split(qata_root, "train"), size=size, channels=channels)
    item = dataset[0]
    assert item["image"].shape == (channels, size, size) and item["image"].dtype == torch.float32
    assert item["label"].shape == (1, size, size) and item["label"].dtype == torch.int64
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert set(item["label"].unique().tolist()) == {0, 1}
    assert item["text"] == "Finding number 0. Second line." and item["name"] == "covid_1.png"
    # without augmentation the label is exactly where the image is bright
    assert torch.equal(item["label"][0] > 0, item["image"][0] > 0)


def test_augmentation_moves_image_and_mask_together(qata_root):
    dataset = SegmentationDataset(load_split(qata_root, "train"), size=32, channels=1, augment=True, seed=3)
    plain = SegmentationDataset(load_split(qata_root, "train"), size=32, channels=1)
    changed = 0
    for epoch in range(4):
        dataset.set_epoch(epoch)
        for index in range(len(dataset)):
            item = dataset[index]
            bright, label = item["image"][0] > 0, item["label"][0] > 0
            agreement = (bright == label).float().mean().item()
            assert agreement > 0.97, f"image and mask diverged (agreement {agreement:.3f})"
            assert set(item["label"].unique().tolist()) <= {0, 1}
            changed += int(not torch.equal(item["label"], plain[index]["label"]))
    assert changed >= 6  # augmentation really happens


def test_augmentation_is_deterministic_by_seed(qata_root):
    samples = load_split(qata_root, "train")

    def run(seed):
        dataset = SegmentationDataset(samples, size=32, channels=1, augment=True, seed=seed)
        return [dataset[i % len(dataset)]["image"] for i in range(9)]

    first, second, other = run(7), run(7), run(8)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_dataset_refuses_bad_input(qata_root, tmp_path):
    samples = load_split(qata_root, "train")
    with pytest.raises(ValueError, match="no mask"):
        SegmentationDataset([Sample(samples[0].image, None, "", "x")], 32, 1)
    with pytest.raises(ValueError, match="channels"):
        SegmentationDataset(samples, 32, 2)
    with pytest.raises(ValueError, match="size"):
        SegmentationDataset(samples, 4, 1)
    PILImage.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / "small_mask.png")
    wrong_size = [Sample(samples[0].image, tmp_path / "small_mask.png", "", "x")]
    with pytest.raises(FastTextDiffError, match="mask"):
        SegmentationDataset(wrong_size, 32, 1)  # preloading surfaces bad files at construction
    lazy = SegmentationDataset(wrong_size, 32, 1, preload=False)
    with pytest.raises(FastTextDiffError, match="mask"):
        lazy[0]


def test_augmentation_in_loader_workers_is_seeded_and_varies_by_epoch(qata_root):
    from torch.utils.data import DataLoader

    dataset = SegmentationDataset(load_split(qata_root, "train"), size=32, channels=1, augment=True, seed=1)

    def epoch_images(generator_seed):
        loader = DataLoader(dataset, batch_size=3, num_workers=1,
                            generator=torch.Generator().manual_seed(generator_seed))
        return [next(iter(loader))["image"] for _ in range(2)]  # two epochs, fresh workers each

    first, again = epoch_images(0), epoch_images(0)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])


# ------------------------------------------------------------------ --labeled


def _samples(n: int) -> list[Sample]:
    return [Sample(Path(f"{i}.png"), Path(f"mask_{i}.png"), "", f"{i}.png") for i in range(n)]


@pytest.mark.parametrize("labeled, expected",
                         [(None, 20), (1, 1), (5, 5), (5.0, 5), (20, 20), (0.25, 5), (0.01, 1), (0.5, 10)])
def test_select_labeled_counts(labeled, expected):
    chosen = select_labeled(_samples(20), labeled, seed=0)
    assert len(chosen) == expected
    names = [s.name for s in chosen]
    assert names == sorted(names, key=lambda n: int(n.split(".")[0]))  # original order kept


def test_select_labeled_is_deterministic_and_nested():
    samples = _samples(30)
    assert select_labeled(samples, 6, seed=1) == select_labeled(samples, 6, seed=1)
    assert select_labeled(samples, 6, seed=1) != select_labeled(samples, 6, seed=2)
    small, large = select_labeled(samples, 4, seed=5), select_labeled(samples, 12, seed=5)
    assert {s.name for s in small} <= {s.name for s in large}


@pytest.mark.parametrize("labeled", [0, -1, 1.5, 21, float("nan"), True, "5"])
def test_select_labeled_refuses(labeled):
    with pytest.raises(ValueError):
        select_labeled(_samples(20), labeled, seed=0)

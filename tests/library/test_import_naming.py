"""`fasttextdiff import-studies` pairs masks by the naming conventions users have, on real NRRD volumes
(8x16x16): `<name>_image` + `<name>_label` (and `_mask`, `_seg`, `_labels`, `_segmentation`, with `_` or `-`;
`_img`/`-image` on the image side), `labels/`, `masks/`, `segmentations/` folders, the Medical Segmentation
Decathlon (`imagesTr/` + `labelsTr/`) and nnU-Net (`_0000` channel suffix) layouts. Each mask lands as the
final label in `labels/final/` and is counted; every file not used is reported with the reason; mask-like
files of which none became a label are a warning. One test serves an imported folder with the real server and
finds every mask as a `final` label through MONAI Label's client."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fasttextdiff.commands.main import main
from fasttextdiff.data.io import Image, read_image, write_image

SHAPE = (8, 16, 16)


def _volume(path, seed: int, mask: bool = False):
    rng = np.random.default_rng(seed)
    if mask:
        array = np.zeros(SHAPE, np.uint8)
        array[seed % 6: seed % 6 + 2, 2 + seed % 8: 8 + seed % 8, 3:9] = 1
    else:
        array = rng.integers(-1000, 400, SHAPE).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(path, array, Image(array, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), True))
    return array


def _import(tmp_path, capsys, src) -> tuple[int, str, dict]:
    out = tmp_path / "studies"
    code = main(["import-studies", str(src), "--out", str(out), "--json", str(tmp_path / "summary.json")])
    text = capsys.readouterr().out
    return code, text, json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))


# (image path, mask path or None, the id it is imported as), and files the import must report as not used
CONVENTIONS = {
    "name_image + name_label": ([("p1_image.nrrd", "p1_label.nrrd", "p1"), ("p2_image.nrrd", "p2_label.nrrd", "p2")],
                                []),
    "dash suffixes": ([("p1-image.nrrd", "p1-mask.nrrd", "p1"), ("p2.nrrd", "p2-seg.nrrd", "p2"),
                       ("p3.nrrd", "p3-label.nrrd", "p3")], []),
    "img + seg, labels, segmentation": ([("a_img.nrrd", "a_seg.nrrd", "a"), ("b.nrrd", "b_labels.nrrd", "b"),
                                         ("c.nrrd", "c_segmentation.nrrd", "c"), ("d.nrrd", "d_mask.nrrd", "d"),
                                         ("e.nrrd", None, "e")], []),
    "labels/ folder": ([("p1.nrrd", "labels/p1.nrrd", "p1"), ("p2_image.nrrd", "labels/p2.nrrd", "p2")], []),
    "masks/ folder": ([("p1.nrrd", "masks/p1.nrrd", "p1"), ("p2.nrrd", "masks/p2_mask.nrrd", "p2")], []),
    "segmentations/ folder": ([("p1.nrrd", "segmentations/p1.nrrd", "p1")], []),
    "images/ + labels/": ([("images/p1.nrrd", "labels/p1.nrrd", "p1"), ("images/p2.nrrd", None, "p2")], []),
    "Decathlon imagesTr/labelsTr": ([("imagesTr/heart_003.nrrd", "labelsTr/heart_003.nrrd", "heart_003"),
                                     ("imagesTr/heart_004.nrrd", "labelsTr/heart_004.nrrd", "heart_004"),
                                     ("imagesTs/heart_010.nrrd", None, "heart_010")],
                                    ["dataset.json", "imagesTr/._heart_003.nrrd"]),
    "nnU-Net _0000": ([("imagesTr/case_001_0000.nrrd", "labelsTr/case_001.nrrd", "case_001"),
                       ("imagesTr/case_002_0000.nrrd", "labelsTr/case_002.nrrd", "case_002")],
                      ["imagesTr/case_001_0001.nrrd"]),
}


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_each_convention_pairs_every_mask(tmp_path, capsys, convention):
    cases, unused = CONVENTIONS[convention]
    src = tmp_path / "src"
    masks = {}
    for i, (image, mask, image_id) in enumerate(cases):
        _volume(src / image, i)
        if mask:
            masks[image_id] = _volume(src / mask, i + 1, mask=True)
    for name in unused:
        if name.endswith(".json"):
            (src / name).write_text('{"name": "Heart"}', encoding="utf-8")
        elif "/._" in name:
            (src / name).write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
        else:
            _volume(src / name, 99)
    code, text, summary = _import(tmp_path, capsys, src)
    assert code == 0, text
    imported = {c["id"]: c for c in summary["imported"]}
    assert set(imported) == {image_id for _, _, image_id in cases}, summary
    assert {i for i, c in imported.items() if c["label"]} == set(masks)
    assert f"{len(masks)} with a label" in text and not summary["warnings"]
    final = tmp_path / "studies" / "labels" / "final"
    assert sorted(p.name for p in final.iterdir()) == sorted(f"{i}.nrrd" for i in masks)
    for image_id, mask in masks.items():
        np.testing.assert_array_equal(read_image(final / f"{image_id}.nrrd").array, mask)
        assert (tmp_path / "studies" / f"{image_id}.nrrd").is_file()
    assert sorted(s["source"] for s in summary["skipped"]) == sorted(unused), summary["skipped"]
    for item in summary["skipped"]:
        assert item["reason"] and f"skipped {item['source']}: {item['reason']}" in text


def test_unmatched_masks_and_other_files_are_reported_with_the_reason(tmp_path, capsys):
    src = tmp_path / "src"
    _volume(src / "p1_image.nrrd", 0)
    mask = _volume(src / "p1_label.nrrd", 1, mask=True)
    _volume(src / "ghost_label.nrrd", 2, mask=True)  # no image `ghost`
    _volume(src / "labels" / "other.nrrd", 3, mask=True)  # no image `other`
    _volume(src / "p1_mask.nrrd", 4, mask=True)  # a second mask for p1
    (src / "labels" / "notes.doc").write_bytes(b"x")
    (src / "orphan.txt").write_text("A report without an image.", encoding="utf-8")
    (src / "stuff").mkdir()
    (src / "stuff" / "a.bin").write_bytes(b"x")
    code, text, summary = _import(tmp_path, capsys, src)
    assert code == 0 and [c["id"] for c in summary["imported"]] == ["p1"] and not summary["warnings"]
    np.testing.assert_array_equal(read_image(tmp_path / "studies" / "labels" / "final" / "p1.nrrd").array, mask)
    skipped = {s["source"]: s["reason"] for s in summary["skipped"]}
    assert set(skipped) == {"ghost_label.nrrd", "labels/other.nrrd", "p1_mask.nrrd", "labels/notes.doc",
                            "orphan.txt", "stuff"}
    assert "no image named 'ghost'" in skipped["ghost_label.nrrd"]
    assert "no image named 'other'" in skipped["labels/other.nrrd"]
    assert "a second mask for 'p1'" in skipped["p1_mask.nrrd"]
    assert "not an image format" in skipped["labels/notes.doc"]
    assert "no image named 'orphan'" in skipped["orphan.txt"]
    assert "neither a DICOM series" in skipped["stuff"]
    for name, reason in skipped.items():
        assert f"skipped {name}: {reason}" in text


def test_mask_like_files_without_a_single_label_are_a_warning(tmp_path, capsys):
    src = tmp_path / "src"
    _volume(src / "scan1.nrrd", 0)
    _volume(src / "scan2.nrrd", 1)
    _volume(src / "seg1_label.nrrd", 2, mask=True)  # named after nothing in the folder
    _volume(src / "masks" / "s2.nrrd", 3, mask=True)
    code, text, summary = _import(tmp_path, capsys, src)
    assert code == 0 and len(summary["imported"]) == 2 and "0 with a label" in text
    assert len(summary["warnings"]) == 1 and "no mask was imported" in summary["warnings"][0]
    assert "2 file(s) look like masks" in summary["warnings"][0]
    assert f"warning: {summary['warnings'][0]}" in text
    assert {s["source"] for s in summary["skipped"]} == {"seg1_label.nrrd", "masks/s2.nrrd"}
    # a folder without mask-like files is no warning
    plain = tmp_path / "plain"
    _volume(plain / "scan1.nrrd", 0)
    (tmp_path / "again").mkdir()
    code, text, summary = _import(tmp_path / "again", capsys, plain)
    assert code == 0 and not summary["warnings"] and "warning" not in text


@pytest.mark.server
def test_an_imported_image_label_folder_is_served_with_every_mask_final(tmp_path, capsys):
    from server_fixtures import TINY_CONF, InProcessServer

    src = tmp_path / "src"
    for i in range(3):
        _volume(src / f"pat{i}_image.nrrd", i)
        _volume(src / f"pat{i}_label.nrrd", i + 1, mask=True)
    _volume(src / "pat9_image.nrrd", 9)  # unlabeled
    code, text, summary = _import(tmp_path, capsys, src)
    assert code == 0 and "3 with a label" in text
    conf = dict(TINY_CONF, prepare_default_model="false", state_dir=str(tmp_path / "state"))
    server = InProcessServer(tmp_path / "studies", conf).start()
    try:
        objects = server.client().datastore()["objects"]
    finally:
        server.stop()
    assert set(objects) == {"pat0", "pat1", "pat2", "pat9"}
    assert sorted(k for k, v in objects.items() if "final" in v["labels"]) == ["pat0", "pat1", "pat2"]

"""`fasttextdiff import-studies` from the three source kinds, on real files: what lands in the studies
folder (images, `<id>.txt` reports, `labels/final` masks) and what is skipped with which reason."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from fasttextdiff.commands.main import main
from fasttextdiff.data.io import Image, read_image, write_image


def _like(array: np.ndarray, volume: bool = False) -> Image:
    if volume:
        return Image(array, (0.8, 0.8, 2.0), (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), True)
    return Image(array, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)


def _run(capsys, *argv) -> tuple[int, str, dict]:
    code = main([str(a) for a in argv])
    out, _ = capsys.readouterr()
    return code, out, {}


def test_lvit_layout_imports_images_masks_and_table_reports(tmp_path, capsys):
    from fasttextdiff.data.lvit import load_split
    from fasttextdiff.data.synthetic import make_lvit_dataset

    src = make_lvit_dataset(tmp_path / "lvit", n_train=3, n_val=1, n_test=2, size=32)
    out = tmp_path / "studies"
    code, text, _ = _run(capsys, "import-studies", src, "--out", out, "--json", tmp_path / "s.json")
    assert code == 0 and "imported 6 case(s)" in text and "6 with a report, 6 with a label" in text
    summary = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert summary["kind"] == "lvit" and not summary["skipped"]
    sample = load_split(src, "train")[0]
    image_id = summary["imported"][0]["id"]
    first = next(s for s in load_split(src, "train") + load_split(src, "val") + load_split(src, "test")
                 if s.name.rsplit(".", 1)[0] == image_id)
    assert (out / f"{image_id}.txt").read_text(encoding="utf-8") == first.text.strip()
    np.testing.assert_array_equal(read_image(out / "labels" / "final" / f"{image_id}.png").array,
                                  read_image(first.mask).array)
    assert sample.image.exists()  # the source is left as it was
    mode = (out / f"{image_id}.txt").stat().st_mode & 0o777
    umask = os.umask(0o022)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # the user's umask, not mkstemp's 0600
    # importing again adds nothing and says why
    code, text, _ = _run(capsys, "import-studies", src, "--out", out)
    assert "imported 0 case(s)" in text and text.count("is already in the studies folder") == 6 and code == 2


def test_folder_with_reports_masks_dicom_series_and_bad_files(tmp_path, capsys):
    import pydicom  # noqa: F401 - the series below is written with pydicom
    from reliability_cases import _dicom_slice

    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 255, (24, 20)).astype(np.uint8)
    write_image(src / "xray 1.png", plane, _like(plane))
    (src / "xray 1.txt").write_text("Left lower lobe opacity.\n", encoding="utf-8")
    mask = (plane > 128).astype(np.uint8)
    write_image(src / "xray 1_mask.png", mask, _like(mask))
    volume = rng.integers(-1000, 400, (4, 16, 16)).astype(np.int16)
    write_image(src / "ct.nii.gz", volume, _like(volume, True))
    (src / "masks").mkdir()
    write_image(src / "masks" / "ct.nii.gz", np.zeros((3, 16, 16), np.uint8), _like(np.zeros((3, 16, 16)), True))
    series = src / "series_a"
    series.mkdir()
    for z in range(3):
        (series / f"{z}.dcm").write_bytes(_dicom_slice(z, "1.2.826.0.1.3680043.2.1125.77"))
    (src / "series_a.txt").write_text("Nodule in the right upper lobe.", encoding="utf-8")
    (src / "notes.png").write_text("not an image")
    (src / "bad report.png").write_bytes((src / "xray 1.png").read_bytes())
    (src / "bad report.txt").write_bytes(b"caf\xe9")
    (src / "readme.doc").write_bytes(b"x")
    out = tmp_path / "studies"
    code, text, _ = _run(capsys, "import-studies", src, "--out", out, "--json", tmp_path / "s.json")
    assert code == 0, text
    summary = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    imported = {c["id"]: c for c in summary["imported"]}
    assert set(imported) == {"xray_1", "series_a"}
    assert imported["xray_1"]["label"] and imported["xray_1"]["report"]
    assert imported["series_a"]["volume"] and (out / "series_a.nii.gz").is_file()
    assert read_image(out / "series_a.nii.gz").array.shape == (3, 24, 20)
    assert (out / "series_a.txt").read_text(encoding="utf-8") == "Nodule in the right upper lobe."
    skipped = {s["source"]: s["reason"] for s in summary["skipped"]}
    assert "has shape (3, 16, 16), the image (4, 16, 16)" in skipped["ct.nii.gz"]  # a mask of another size
    assert "notes.png is not an image" in skipped["notes.png"]
    assert "not UTF-8" in skipped["bad report.png"]
    assert "not an image format" in skipped["readme.doc"]
    assert not (out / "ct.nii.gz").exists() and not (out / "notes.png").exists()  # nothing half-written
    for name, reason in skipped.items():
        assert f"skipped {name}: {reason}" in text


def test_csv_and_xlsx_tables(tmp_path, capsys):
    src = tmp_path / "data"
    src.mkdir()
    plane = np.arange(24 * 20, dtype=np.uint16).reshape(24, 20)
    write_image(src / "a.tif", plane, _like(plane))
    mask = (plane % 7 == 0).astype(np.uint8)
    write_image(src / "a_label.nii.gz", mask, _like(mask))
    rows = [{"Image": "a.tif", "Report": "Right lung lesion.", "Label": "a_label.nii.gz"},
            {"Image": "missing.png", "Report": "x", "Label": ""}]
    pd.DataFrame(rows).to_csv(src / "cases.csv", index=False)
    code, text, _ = _run(capsys, "import-studies", src / "cases.csv", "--out", tmp_path / "s1")
    assert code == 0 and "imported 1 case(s)" in text and "skipped missing.png" in text and "does not exist" in text
    assert (tmp_path / "s1" / "a.tif").is_file() and (tmp_path / "s1" / "a.txt").read_text(
        encoding="utf-8"
    ) == "Right lung lesion."
    np.testing.assert_array_equal(read_image(tmp_path / "s1" / "labels" / "final" / "a.nii.gz").array, mask)
    pd.DataFrame(rows[:1]).to_excel(src / "cases.xlsx", index=False)
    code, text, _ = _run(capsys, "import-studies", src / "cases.xlsx", "--out", tmp_path / "s2")
    assert code == 0 and "1 with a report, 1 with a label" in text
    pd.DataFrame([{"file_name": "a.tif"}]).to_csv(src / "bad.csv", index=False)
    code = main(["import-studies", str(src / "bad.csv"), "--out", str(tmp_path / "s3")])
    assert code == 2 and "has no image column" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["import-studies"], ["import-studies", "/nonexistent/folder", "--out", "x"]])
def test_bad_arguments_are_one_line_errors(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse: missing arguments
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and ("error:" in err) and "Traceback" not in err

"""Server routes the other server tests do not reach, on a studies folder made by `fasttextdiff
import-studies` from PNG cases and a DICOM series:

- serving that folder: the series, its report and its mask as MONAI Label sees them, inferred through
  MONAI Label's client;
- an uploaded zipped DICOM series: stored as the series read directly, then segmented in its geometry;
- the `report_mismatch` active-learning strategy over HTTP, checked against the rank-sum rule on the
  scores the datastore holds;
- `GET /datastore/dataset`: the zip holds every labeled image and its final label, byte-equal to the
  datastore's files, and the datastore record.

One in-process server (the real MONAI Label app on 127.0.0.1) serving a copy of the tiny model; each
test sets up what it asserts on.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

import reliability_cases as cases
from server_fixtures import http_json, ready_inprocess_server

pytestmark = pytest.mark.server

MODEL = "fasttextdiff"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.24.1"
SERIES_REPORT = "Nodule in the right upper lobe."


def _like(array: np.ndarray):
    from fasttextdiff.data.io import Image

    return Image(array, (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)


def _series_folder(folder: Path, uid: str, slices: int = 3) -> Path:
    folder.mkdir(parents=True)
    for z in range(slices):
        (folder / f"{z}.dcm").write_bytes(cases._dicom_slice(z, uid))
    return folder


def _read_series(folder: Path):
    """The series as SimpleITK reads it on its own (the reference the server must match)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _import_source(src: Path) -> dict[str, str]:
    """PNG cases with reports (two with masks) and a DICOM series with its report and mask: {id: report}."""
    from fasttextdiff.data.io import write_image
    from fasttextdiff.data.synthetic import render_case_details

    src.mkdir()
    rng = np.random.default_rng(24)
    reports = {}
    for i in range(5):
        case = render_case_details(rng, 32, "text-necessary")
        name = f"case {i}"  # a space: the import makes the id `case_<i>`
        write_image(src / f"{name}.png", case.image, _like(case.image))
        (src / f"{name}.txt").write_text(case.report + "\n", encoding="utf-8")
        if i < 2:
            write_image(src / f"{name}_mask.png", case.mask, _like(case.mask))
        reports[f"case_{i}"] = case.report
    series = _series_folder(src / "series_a", SERIES_UID)
    (src / "series_a.txt").write_text(SERIES_REPORT, encoding="utf-8")
    import SimpleITK as sitk

    image = _read_series(series)
    mask = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    mask[1, 8:16, 6:14] = 1
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(src / "series_a_mask.nii.gz"))
    reports["series_a"] = SERIES_REPORT
    return reports


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """A studies folder made by `fasttextdiff import-studies` (the CLI entry point, in this process)."""
    from fasttextdiff.commands.main import main

    root = tmp_path_factory.mktemp("import")
    reports = _import_source(root / "src")
    studies = root / "studies"
    code = main(["import-studies", str(root / "src"), "--out", str(studies), "--json", str(root / "summary.json")])
    summary = json.loads((root / "summary.json").read_text(encoding="utf-8"))
    assert code == 0 and not summary["skipped"], summary
    assert {c["id"] for c in summary["imported"]} == set(reports)
    return {"studies": studies, "src": root / "src", "reports": reports}


@pytest.fixture(scope="module")
def server(imported, tiny_model_root, tmp_path_factory):  # noqa: F811 - the fixture of the same name
    with ready_inprocess_server(imported["studies"], tmp_path_factory.mktemp("state"),
                                model_dir=str(tiny_model_root), prepare_default_model="false") as running:
        yield running


def _sitk_label(path: str):
    import SimpleITK as sitk

    return sitk.ReadImage(path)


def _same_geometry(a, b) -> None:
    assert a.GetSize() == b.GetSize()
    assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
    assert np.allclose(a.GetDirection(), b.GetDirection())


# ------------------------------------------------------------------------- an imported studies folder
def test_a_studies_folder_imported_from_a_dicom_series_is_served(server, imported):
    """The server lists what the import wrote (reports from `<id>.txt`, masks as final labels), and an
    infer on the imported series through MONAI Label's client uses its report and keeps its geometry."""
    import SimpleITK as sitk

    client = server.client()
    objects = client.datastore()["objects"]
    assert set(imported["reports"]) <= set(objects)
    for image_id, report in imported["reports"].items():
        status, info = http_json(server, "GET", f"/datastore/image/info?image={image_id}")
        assert status == 200 and info["text"] == report.strip(), (image_id, info)
    assert sorted(k for k in imported["reports"] if "final" in objects[k]["labels"]) == ["case_0", "case_1",
                                                                                         "series_a"]

    reference = _read_series(imported["src"] / "series_a")
    stored = sitk.ReadImage(str(imported["studies"] / "series_a.nii.gz"))
    _same_geometry(stored, reference)
    assert np.array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(reference))
    label = _sitk_label(client.download_label("series_a", "final"))
    _same_geometry(label, reference)
    assert sitk.GetArrayFromImage(label)[1, 8:16, 6:14].all() and sitk.GetArrayFromImage(label).sum() == 64

    out, result = client.infer(MODEL, "series_a", {})
    assert result["text_source"] == "datastore" and result["text_chars"] == len(SERIES_REPORT), result
    assert result["is_volume"] and result["shape"] == [3, 24, 20], result
    mask = _sitk_label(out)
    _same_geometry(mask, reference)
    assert sitk.GetArrayFromImage(mask).dtype == np.uint8


# ------------------------------------------------------------------------- an uploaded zipped DICOM series
def test_an_uploaded_zipped_dicom_series_is_stored_as_read_and_segmented(server, tmp_path):
    """PUT /datastore/image with a .zip of a series (MONAI Label's client): the stored image is the series
    as SimpleITK reads it from the unzipped files (voxels and geometry), and /infer on it answers a mask
    of the series' size in the series' geometry."""
    import SimpleITK as sitk
    from monailabel.client.client import MONAILabelUtils

    series = _series_folder(tmp_path / "ct", "1.2.826.0.1.3680043.2.1125.24.2", slices=4)
    archive = tmp_path / "ct_series.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(series.iterdir(), reverse=True):  # not in slice order: the server must sort them
            zf.write(path, f"export/{path.name}")
    reference = _read_series(series)

    client = server.client()
    try:
        res = client.upload_image(str(archive), "zipped_series", {"text": "Bilateral pulmonary infection."})
        assert res["image"] == "zipped_series", res
        status, body, _, _ = MONAILabelUtils.http_method("GET", server.url, "/datastore/image?image=zipped_series")
        assert status == 200
        name = client.datastore()["objects"]["zipped_series"]["image"]["info"]["name"]
        stored_path = tmp_path / name
        stored_path.write_bytes(body)
        stored = sitk.ReadImage(str(stored_path))
        _same_geometry(stored, reference)
        assert np.array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(reference))

        out, result = client.infer(MODEL, "zipped_series", {})
        assert result["is_volume"] and result["shape"] == [4, 24, 20] and result["text_source"] == "datastore"
        mask = _sitk_label(out)
        _same_geometry(mask, reference)
        assert set(np.unique(sitk.GetArrayFromImage(mask))) <= {0, 1}
    finally:
        http_json(server, "DELETE", "/datastore/image?id=zipped_series")


# ------------------------------------------------------------------------- report_mismatch over HTTP
def _rank_fractions(values: list[float]) -> list[float]:
    from scipy.stats import rankdata

    return [float(r) / len(values) for r in rankdata(values, method="average")]


def test_report_mismatch_strategy_over_http_offers_the_best_rank_sum(server):
    """POST /activelearning/report_mismatch (MONAI Label's client) after scoring: an unlabeled image,
    with the scores that chose it, and it is the one the documented rule picks from the scores the
    datastore holds: the highest mean of its uncertainty rank and its report-mismatch rank."""
    client = server.client()
    status, scoring = http_json(server, "POST", "/scoring/fasttextdiff_uncertainty?run_sync=true", {})
    assert status == 200, scoring
    identity = client.info()["fasttextdiff"]["model_identity"]
    objects = client.datastore()["objects"]
    pool = {}
    for image_id, obj in objects.items():
        if "final" in obj["labels"]:
            continue
        entry = obj["image"]["info"].get("fasttextdiff_uncertainty")
        assert entry and entry["model"] == identity, (image_id, entry)
        pool[image_id] = (float(entry["score"]), entry.get("report_mismatch"))
    assert len(pool) >= 3 and any(m is not None for _, m in pool.values()), pool

    sample = client.next_sample("report_mismatch", {})
    assert sample["id"] in pool, sample
    assert sample["score_current"] is True
    assert sample["uncertainty"] == pytest.approx(pool[sample["id"]][0])
    assert sample["report_mismatch"] == (None if pool[sample["id"]][1] is None
                                        else pytest.approx(pool[sample["id"]][1]))

    ids = sorted(pool)
    unc = dict(zip(ids, _rank_fractions([pool[i][0] for i in ids])))
    with_mismatch = [i for i in ids if pool[i][1] is not None]
    mis = dict(zip(with_mismatch, _rank_fractions([float(pool[i][1]) for i in with_mismatch])))
    combined = {i: (unc[i] + mis[i]) / 2 if i in mis else unc[i] for i in ids}
    best = min(ids, key=lambda i: (-combined[i], -pool[i][0], i))
    assert sample["id"] == best, (sample, combined)
    assert sample["rank_sum"] == pytest.approx(combined[best])


# ------------------------------------------------------------------------- GET /datastore/dataset
def test_dataset_zip_holds_every_labeled_image_its_final_label_and_the_record(server, imported):
    """The archive's `image/` and `label/` members are the datastore's files of every image with a final
    label (byte-equal), nothing else, and metadata.json is the datastore record."""
    from monailabel.client.client import MONAILabelUtils

    objects = server.client().datastore()["objects"]
    labeled = sorted(k for k, v in objects.items() if "final" in v["labels"])
    assert len(labeled) >= 3
    status, body, _, headers = MONAILabelUtils.http_method("GET", server.url, "/datastore/dataset")
    assert status == 200, body[:300]
    assert "zip" in headers.get("content-type", "")
    studies = Path(imported["studies"])
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        names = sorted(archive.namelist())
        expected = ["metadata.json"]
        for image_id in labeled:
            image_name = objects[image_id]["image"]["info"]["name"]
            label_name = objects[image_id]["labels"]["final"]["info"]["name"]
            expected += [f"image/{image_name}", f"label/{label_name}"]
            assert archive.read(f"image/{image_name}") == (studies / image_name).read_bytes(), image_id
            assert archive.read(f"label/{label_name}") == (studies / "labels" / "final" / label_name).read_bytes()
        assert names == sorted(expected)
        record = json.loads(archive.read("metadata.json"))
    assert set(record["objects"]) == set(objects)
    assert "base_path" not in record  # the server's folder stays on the server
    for image_id in labeled:
        assert "final" in record["objects"][image_id]["labels"]
    assert record["objects"]["series_a"]["image"]["info"]["text"] == SERIES_REPORT


def test_dataset_zip_limit_cases(server):
    from monailabel.client.client import MONAILabelUtils

    status, body, _, _ = MONAILabelUtils.http_method("GET", server.url, "/datastore/dataset?limit_cases=1")
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        members = [n for n in archive.namelist() if n != "metadata.json"]
    assert len(members) == 2 and {m.split("/")[0] for m in members} == {"image", "label"}

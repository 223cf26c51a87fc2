"""The real-CT module on TotalSegmentator's reference scans: geometry kept, labels aligned, names in words,
lesions inserted where they belong and reported truthfully, and the sdist extracted safely."""

from __future__ import annotations

import io
import re
import tarfile

import numpy as np
import pytest
from scipy import ndimage

from fasttextdiff.data.real_ct import (
    ReferenceDataError,
    _extract,
    anatomy_report,
    crop,
    fetch_sdist,
    insert_lesions,
    lesion_report,
    load_patient,
    reference_files,
    resample_inplane,
    shared_structures,
    structure_names,
    structure_phrase,
    voxel_counts,
)


@pytest.fixture(scope="module")
def root():
    return reference_files()  # `make setup` has fetched it; downloads the sdist otherwise


@pytest.fixture(scope="module")
def patient_a(root):
    return load_patient("A", root)


@pytest.fixture(scope="module")
def patient_b(root):
    return load_patient("B", root)


def _physical(image, index_zyx) -> np.ndarray:
    direction = np.asarray(image.direction).reshape(3, 3)
    return np.asarray(image.origin) + direction @ (np.asarray(index_zyx[::-1], float) * np.asarray(image.spacing))


def test_structure_names_are_totalsegmentators(root):
    names = structure_names(root)
    assert names[1] == "spleen" and names[5] == "liver" and names[52] == "aorta" and names[100] == "rib_left_9"
    assert len(names) == 117


def test_patients_have_labels_in_the_image_grid(patient_a, patient_b):
    for patient, shape, spacing in ((patient_a, (30, 101, 122), (3.0, 3.0, 3.0)),
                                    (patient_b, (20, 512, 512), (0.9765625, 0.9765625, 2.0))):
        assert patient.image.array.shape == patient.labels.shape == shape
        assert patient.image.array.dtype == np.float32 and patient.labels.dtype == np.int16
        assert np.allclose(patient.image.spacing, spacing)
        assert {"liver", "spleen", "aorta"} <= set(patient.names.values())
        assert set(np.unique(patient.labels)) - {0} == set(patient.names)
        hu = patient.image.array
        counts = voxel_counts(patient)
        number = {n: k for k, n in patient.names.items()}
        assert counts["liver"] > counts["spleen"] > counts["aorta"] > 500
        # aligned: soft tissue in the liver, bone in T12, HU of air outside the body
        assert 20 < np.median(hu[patient.labels == number["liver"]]) < 130
        assert np.median(hu[patient.labels == number["vertebrae_T12"]]) > 120
        assert hu.min() < -900
    # B's labels were stored y-flipped: resampled onto the DICOM grid, the aorta is bright (contrast)
    assert np.median(patient_b.image.array[patient_b.labels == 52]) > 120


def test_shared_structures(patient_a, patient_b):
    shared = shared_structures(patient_a, patient_b)
    assert {"liver", "spleen", "stomach", "aorta", "autochthon_left", "autochthon_right"} <= set(shared)
    assert shared == sorted(shared)
    assert "kidney_left" not in shared  # only A's scan reaches the kidneys
    assert shared_structures(patient_a, patient_b, min_voxels=10**9) == []


def test_crop_keeps_every_voxel_where_it_was(patient_a):
    box = (slice(5, 25), slice(10, 90), slice(20, None))
    small = crop(patient_a, box)
    assert small.labels.shape == (20, 80, 102) == small.image.array.shape
    assert np.allclose(_physical(small.image, (0, 0, 0)), _physical(patient_a.image, (5, 10, 20)))
    assert np.allclose(_physical(small.image, (3, 7, 9)), _physical(patient_a.image, (8, 17, 29)))
    assert small.image.array[3, 7, 9] == patient_a.image.array[8, 17, 29]
    assert set(small.names) == set(np.unique(small.labels)) - {0}


def test_resample_inplane_keeps_the_extent(patient_b):
    small = resample_inplane(patient_b, 128)
    assert small.image.array.shape == small.labels.shape == (20, 128, 128)
    assert np.allclose(small.image.spacing, (3.90625, 3.90625, 2.0))
    # the first voxel's outer corner is where the original's was
    corner = np.asarray(patient_b.image.origin) - np.asarray(patient_b.image.spacing) / 2
    assert np.allclose(np.asarray(small.image.origin) - np.asarray(small.image.spacing) / 2, corner)
    ratio = voxel_counts(small)["liver"] * 16 / voxel_counts(patient_b)["liver"]
    assert 0.97 < ratio < 1.03
    assert resample_inplane(patient_b, 512) is patient_b


def test_anatomy_report_states_side_and_number():
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert "left" in anatomy_report("autochthon_left", rng).lower()
        text = anatomy_report("rib_left_9", rng).lower()
        assert "left" in text and ("9" in text or "ninth" in text)
        text = anatomy_report("vertebrae_T11", rng).lower()
        assert "t11" in text or "eleventh thoracic" in text
        assert "right" in anatomy_report("lung_lower_lobe_right", rng).lower()
    assert len({anatomy_report("kidney_left", rng) for _ in range(30)}) > 5
    assert structure_phrase("autochthon_left") == "left autochthon muscle"
    assert structure_phrase("rib_right_9") == "right 9th rib"
    assert structure_phrase("portal_vein_and_splenic_vein") == "portal and splenic veins"


@pytest.mark.parametrize("seed", range(3))
def test_insert_lesions_and_report(patient_a, seed):
    rng = np.random.default_rng(seed)
    image, lesion_map, lesions = insert_lesions(patient_a, rng, n_named=2, n_decoys=1)
    before = patient_a.image.array
    number = {n: k for k, n in patient_a.names.items()}
    assert image.shape == before.shape and lesion_map.dtype == np.int16
    assert sorted(lesion.label for lesion in lesions) == [1, 2, 3] == sorted(set(np.unique(lesion_map)) - {0})
    assert sum(lesion.named for lesion in lesions) == 2
    for lesion in lesions:
        inside = lesion_map == lesion.label
        assert (patient_a.labels[inside] == number[lesion.organ]).all()  # within its organ
        assert 5 <= lesion.radius_mm <= 15 and lesion_map[lesion.center_zyx] == lesion.label
        change = (image - before)[inside]
        assert np.sign(np.median(change)) == np.sign(lesion.contrast_hu)
        assert 0.4 * abs(lesion.contrast_hu) < abs(np.median(change)) <= abs(lesion.contrast_hu) + 1e-3
        if lesion.kind in ("hypodense", "hyperdense"):
            assert 20 <= abs(lesion.contrast_hu) <= 40
        else:  # lung: the lesion's HU reach their target range
            low, high = (-100, 40) if lesion.kind == "nodule" else (-700, -500)
            organ_median = np.median(before[patient_a.labels == number[lesion.organ]])
            assert low - 1 <= organ_median + lesion.contrast_hu <= high + 1
        # the scan's own noise stays: the lesion is not a constant
        assert np.std(image[inside]) > 1.0 or inside.sum() < 10
    near = ndimage.binary_dilation(lesion_map > 0, iterations=3)
    assert np.array_equal(image[~near], before[~near])  # far from lesions: bit-exact
    # no overlap, not even of the blurred edges
    changed = [(image != before) & ndimage.binary_dilation(lesion_map == k, iterations=3) for k in (1, 2, 3)]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not (changed[i] & changed[j]).any()

    report = lesion_report(lesions, patient_a, rng)
    named_places = {structure_phrase(lesion.organ) for lesion in lesions if lesion.named}
    decoy_places = {structure_phrase(lesion.organ) for lesion in lesions if not lesion.named} - named_places
    assert decoy_places  # patient A has organs enough for decoys of their own
    for place in named_places:
        assert place in report
    for place in decoy_places:
        assert place not in report
    for lesion in lesions:
        if lesion.named:
            assert f"{lesion.diameter_mm}" in report
    negations = [s for s in re.split(r"(?<=\.) ", report) if re.search(r"\bno\b|free of", s, re.I)]
    assert len(negations) == 1
    assert not any(structure_phrase(lesion.organ) in negations[0] for lesion in lesions)


def test_decoys_sharing_an_organ_differ_in_kind(patient_b):
    small = resample_inplane(patient_b, 96)  # only liver and spleen can hold lesions: one stays free
    for seed in range(3):
        _, _, lesions = insert_lesions(small, np.random.default_rng(seed), n_named=2, n_decoys=1)
        for decoy in (lesion for lesion in lesions if not lesion.named):
            assert all(lesion.kind != decoy.kind for lesion in lesions if lesion.named and lesion.organ == decoy.organ)
        assert len({lesion.organ for lesion in lesions}) == 1


def _tar(path, members: dict[str, bytes], links: dict[str, str]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)


def test_extract_takes_only_reference_files_and_refuses_traversal(tmp_path):
    top = "totalsegmentator-2.18.0/"
    tar_path = tmp_path / "t.tar.gz"
    _tar(tar_path, {
        top + "tests/reference_files/example_ct_sm.nii.gz": b"ct",
        top + "tests/reference_files/sub/x.json": b"{}",
        top + "totalsegmentator/map_to_binary.py": b"class_map = {}",
        top + "totalsegmentator/python_api.py": b"import os",
        top + "tests/reference_files/../../../escaped": b"no",
        "../x": b"no",
        "/abs/x": b"no",
    }, links={top + "tests/reference_files/link": "/etc/passwd"})
    dest = tmp_path / "dest"
    dest.mkdir()
    written = _extract(tar_path, dest)
    assert sorted(written) == ["example_ct_sm.nii.gz", "map_to_binary.py", "sub/x.json"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [
        "dest/example_ct_sm.nii.gz", "dest/map_to_binary.py", "dest/sub/x.json", "t.tar.gz"]
    assert not (dest / "link").exists()


def test_missing_sdist_without_download_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTEXTDIFF_DATA_DIR", str(tmp_path))
    with pytest.raises(ReferenceDataError, match="pip download") as info:
        fetch_sdist(download=False)
    assert isinstance(info.value, RuntimeError)
    assert str(tmp_path) in str(info.value) and "FASTTEXTDIFF_DATA_DIR" in str(info.value)
    with pytest.raises(ReferenceDataError):
        reference_files(download=False)
    (tmp_path / "totalsegmentator-2.18.0.tar.gz").write_bytes(b"not the sdist")
    with pytest.raises(ReferenceDataError, match="SHA-256"):
        fetch_sdist(download=False)


def test_patient_c_merges_its_binary_masks(root):
    patient = load_patient("C", root)
    assert patient.image.array.shape == patient.labels.shape == (191, 167, 233)
    counts = voxel_counts(patient)
    assert {"heart", "aorta", "vertebrae_T12"} <= set(counts) and counts["heart"] > counts["aorta"] > 50000
    number = {n: k for k, n in patient.names.items()}
    assert np.median(patient.image.array[patient.labels == number["aorta"]]) > 150  # contrast-filled lumen
    with pytest.raises(ValueError, match="patient must be one of"):
        load_patient("D", root)

"""Reading/writing images with their geometry, and the model-input/original-grid conversions."""

from __future__ import annotations

import gzip
import importlib.util
import locale
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tifffile
import torch
from PIL import Image as PILImage

from fasttextdiff.data.io import Image, is_volume_path, read_image, supported_extensions, write_image
from fasttextdiff.data.preprocess import mask_to_labels, to_model_input, to_original_grid
from fasttextdiff.utils.errors import FastTextDiffError, ImageReadError


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (see requirements-data.txt)")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def _assert_same_geometry(written: Path, reference) -> None:
    """SimpleITK's view of the written file equals the reference's (an sitk.Image)."""
    out = sitk.ReadImage(str(written))
    assert out.GetSize() == reference.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), reference.GetSpacing(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.GetOrigin(), reference.GetOrigin(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.GetDirection(), reference.GetDirection(), atol=1e-6)


def _oblique_volume(shape_zyx=(6, 20, 24), dtype=np.int16) -> sitk.Image:
    rng = np.random.default_rng(0)
    itk = sitk.GetImageFromArray(rng.integers(-1000, 1000, size=shape_zyx).astype(dtype))
    itk.SetSpacing((0.7, 0.8, 2.5))
    itk.SetOrigin((-10.5, 20.25, 3.0))
    c, s = np.cos(0.3), np.sin(0.3)
    itk.SetDirection((c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))
    return itk


# ------------------------------------------------------------------ 2D raster formats


@pytest.mark.parametrize(
    "mode, array, expected_shape, expected_dtype",
    [
        ("L", np.arange(16 * 20, dtype=np.uint8).reshape(16, 20), (16, 20), np.uint8),
        ("I;16", (np.arange(16 * 20, dtype=np.uint16) * 150).reshape(16, 20), (16, 20), np.uint16),
        ("RGB", np.random.default_rng(1).integers(0, 255, (16, 20, 3), dtype=np.uint8), (16, 20, 3), np.uint8),
        ("RGBA", np.random.default_rng(2).integers(0, 255, (16, 20, 4), dtype=np.uint8), (16, 20, 3), np.uint8),
    ],
)
def test_png_modes_read_to_expected_layout(tmp_path, mode, array, expected_shape, expected_dtype):
    path = tmp_path / "x.png"
    PILImage.fromarray(array).save(path)
    assert PILImage.open(path).mode == mode
    image = read_image(path)
    assert image.array.shape == expected_shape
    assert image.array.dtype == expected_dtype
    assert not image.is_volume and image.path == str(path)
    np.testing.assert_array_equal(image.array, array[..., :3] if array.ndim == 3 else array)


def test_grey_rgb_and_bilevel_pngs_become_grayscale(tmp_path):
    grey = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (12, 1))
    PILImage.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "rgb_grey.png")
    assert read_image(tmp_path / "rgb_grey.png").array.shape == grey.shape
    PILImage.fromarray(grey > 100).save(tmp_path / "bilevel.png")
    bilevel = read_image(tmp_path / "bilevel.png").array
    assert set(np.unique(bilevel)) == {0, 255}


@pytest.mark.parametrize("suffix", [".jpg", ".bmp"])
def test_jpeg_and_bmp(tmp_path, suffix):
    array = np.full((24, 30), 120, np.uint8)
    PILImage.fromarray(array).save(tmp_path / f"x{suffix}")
    image = read_image(tmp_path / f"x{suffix}")
    assert image.array.shape == (24, 30)
    assert abs(int(image.array.mean()) - 120) <= 2


def test_tiff_16bit_and_multipage_stack(tmp_path):
    plane = (np.arange(20 * 24, dtype=np.uint16) * 100).reshape(20, 24)
    tifffile.imwrite(tmp_path / "one.tif", plane)
    one = read_image(tmp_path / "one.tif")
    assert one.array.dtype == np.uint16 and not one.is_volume
    np.testing.assert_array_equal(one.array, plane)
    stack = np.stack([plane, plane + 1, plane + 2])
    tifffile.imwrite(tmp_path / "stack.tiff", stack)
    volume = read_image(tmp_path / "stack.tiff")
    assert volume.is_volume and volume.array.shape == (3, 20, 24)


def test_stardist_real_uint16_tiff():
    image = read_image(_package_file("stardist", "data", "images", "img2d.tif"))
    assert image.array.shape == (512, 512) and not image.is_volume


def test_png_mask_round_trip(tmp_path):
    PILImage.fromarray(np.zeros((16, 20), np.uint8)).save(tmp_path / "img.png")
    like = read_image(tmp_path / "img.png")
    mask = np.zeros((16, 20), bool)
    mask[4:9, 5:12] = True
    write_image(tmp_path / "mask.png", mask, like)
    back = read_image(tmp_path / "mask.png").array
    np.testing.assert_array_equal(back, mask.astype(np.uint8) * 255)
    probabilities = np.linspace(0, 1, 16 * 20).reshape(16, 20)
    write_image(tmp_path / "prob.png", probabilities, like)
    assert read_image(tmp_path / "prob.png").array.max() == 255


# ------------------------------------------------------------------ 3D volumes, geometry round trips


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_volume_geometry_round_trip(tmp_path, suffix):
    itk = _oblique_volume()
    source = tmp_path / f"vol{suffix}"
    sitk.WriteImage(itk, str(source))
    image = read_image(source)
    assert image.is_volume and image.array.shape == (6, 20, 24)
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(itk))
    mask = (image.array > 0).astype(np.uint8)
    out = write_image(tmp_path / f"mask{suffix}", mask, like=image)
    _assert_same_geometry(out, sitk.ReadImage(str(source)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), mask)


def test_one_slice_volume_is_2d_and_writes_back_as_one_slice(tmp_path):
    itk = _oblique_volume(shape_zyx=(1, 20, 24))
    sitk.WriteImage(itk, str(tmp_path / "slice.nii.gz"))
    image = read_image(tmp_path / "slice.nii.gz")
    assert not image.is_volume and image.array.shape == (20, 24) and len(image.spacing) == 3
    out = write_image(tmp_path / "mask.nrrd", np.ones((20, 24), np.uint8), like=image)
    _assert_same_geometry(out, itk)


def test_2d_nrrd_round_trip(tmp_path):
    itk = sitk.GetImageFromArray(np.random.default_rng(0).random((16, 18)).astype(np.float32))
    itk.SetSpacing((0.5, 0.25))
    itk.SetOrigin((3.0, -4.0))
    sitk.WriteImage(itk, str(tmp_path / "flat.nrrd"))
    image = read_image(tmp_path / "flat.nrrd")
    assert not image.is_volume and image.array.shape == (16, 18)
    _assert_same_geometry(write_image(tmp_path / "mask.nii.gz", np.zeros((16, 18), np.uint8), image), itk)


def test_scaled_nifti_from_nibabel_matches_simpleitk(tmp_path):
    import nibabel

    data = np.arange(12 * 10 * 6, dtype=np.int16).reshape(12, 10, 6)
    nifti = nibabel.Nifti1Image(data, np.diag([-0.8, -0.9, 2.0, 1.0]))
    nifti.header.set_slope_inter(0.5, -3)
    nibabel.save(nifti, tmp_path / "scaled.nii.gz")
    image, reference = read_image(tmp_path / "scaled.nii.gz"), sitk.ReadImage(str(tmp_path / "scaled.nii.gz"))
    np.testing.assert_allclose(image.array, sitk.GetArrayFromImage(reference))
    assert image.array.dtype == np.float32 and image.array.min() == -3
    assert image.direction == reference.GetDirection()


def test_singleton_time_axis_is_dropped(tmp_path):
    frame = sitk.GetImageFromArray(np.zeros((5, 12, 14), np.float32))
    sitk.WriteImage(sitk.JoinSeries([frame]), str(tmp_path / "t1.nii.gz"))
    assert read_image(tmp_path / "t1.nii.gz").array.shape == (5, 12, 14)


def test_mni_template_round_trip(tmp_path):
    folder = _package_file("nilearn", "datasets", "data")
    source = next(iter(sorted(folder.glob("mni_icbm152_t1_*.nii.gz"))))
    image = read_image(source)
    assert image.is_volume and image.array.ndim == 3
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(sitk.ReadImage(str(source))))
    mask = (image.array > np.percentile(image.array, 70)).astype(np.uint8)
    out = write_image(tmp_path / "brain_mask.nii.gz", mask, like=image)
    _assert_same_geometry(out, sitk.ReadImage(str(source)))


def _write_dicom_series(folder: Path, slices: int = 10, series: int = 2) -> sitk.Image:
    folder.mkdir(exist_ok=True)
    volume = _oblique_volume(shape_zyx=(slices, 24, 20))
    volume.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    tags = [("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
            ("0020|000e", f"1.2.826.0.1.3680043.2.1125.{series}"),
            ("0020|0037", "1\\0\\0\\0\\1\\0"), ("0028|0030", "0.8\\0.7")]
    ctype = locale.setlocale(locale.LC_CTYPE)  # GDCM's writer leaves LC_CTYPE at "C" (ASCII for every later open())
    try:
        for z in range(slices):
            plane = volume[:, :, z]
            for tag, value in tags:
                plane.SetMetaData(tag, value)
            position = volume.TransformIndexToPhysicalPoint((0, 0, z))
            plane.SetMetaData("0020|0032", "\\".join(f"{p:.4f}" for p in position))
            plane.SetMetaData("0020|0013", str(z + 1))
            plane.SetMetaData("0008|0018", f"1.2.826.0.1.3680043.2.1125.3.{series}.{z + 1}")
            writer.SetFileName(str(folder / f"s{series}_slice{z:03d}.dcm"))
            writer.Execute(plane)
    finally:
        locale.setlocale(locale.LC_CTYPE, ctype)
    return volume


def test_dicom_series_folder(tmp_path):
    volume = _write_dicom_series(tmp_path / "series")
    image = read_image(tmp_path / "series")
    assert image.is_volume and image.array.shape == (10, 24, 20)
    np.testing.assert_allclose(image.spacing, (0.7, 0.8, 2.5), atol=1e-3)
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(volume))
    reference = sitk.ImageSeriesReader()
    reference.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    out = write_image(tmp_path / "mask.nrrd", np.zeros(image.array.shape, np.uint8), like=image)
    _assert_same_geometry(out, reference.Execute())


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path):
    _write_dicom_series(tmp_path / "study", slices=3, series=7)
    volume = _write_dicom_series(tmp_path / "study", slices=9, series=8)
    image = read_image(tmp_path / "study")
    assert image.is_volume and image.array.shape == (9, 24, 20)
    np.testing.assert_array_equal(image.array, sitk.GetArrayFromImage(volume))


# ------------------------------------------------------------------ single DICOM files (real data)


def test_ct_dicom_applies_rescale_and_keeps_geometry(tmp_path):
    import pydicom

    path = _package_file("pydicom", "data", "test_files", "CT_small.dcm")
    ds = pydicom.dcmread(path)
    image = read_image(path)
    assert image.array.shape == (128, 128) and not image.is_volume
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(image.array, expected)
    assert image.array.min() < -500  # Hounsfield units, not raw stored values
    np.testing.assert_allclose(image.spacing[:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    out = write_image(tmp_path / "ct_mask.nii.gz", (image.array > 0).astype(np.uint8), like=image)
    _assert_same_geometry(out, sitk.ReadImage(str(path)))


def test_mr_dicom_geometry(tmp_path):
    path = _package_file("pydicom", "data", "test_files", "MR_small.dcm")
    image = read_image(path)
    assert image.array.shape == (64, 64)
    out = write_image(tmp_path / "mr_mask.nrrd", np.zeros((64, 64), np.uint8), like=image)
    _assert_same_geometry(out, sitk.ReadImage(str(path)))


def test_monochrome1_radiograph_is_inverted():
    import pydicom

    path = _package_file("data_store", "data", "RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array
    image = read_image(path)
    assert image.array.shape == (1955, 1841) and image.array.dtype == raw.dtype
    # GDCM inverts within the stored bit depth (bright = dense), as DICOM viewers display it
    np.testing.assert_array_equal(image.array, (2 ** int(ds.BitsStored) - 1) - raw)
    assert image.spacing[:2] == (1.0, 1.0)  # PixelSpacing 0 in the file means unknown


@pytest.mark.parametrize("name", ["SC_rgb.dcm", "US1_UNCR.dcm"])
def test_rgb_dicom(name):
    image = read_image(_package_file("data_store", "data", name))
    assert image.array.ndim == 3 and image.array.shape[-1] == 3 and image.is_color


# ------------------------------------------------------------------ files that must be refused


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose IHDR claims a size but holds no pixels: the size check must fire first."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk + end)


def _bad_file(kind: str, tmp_path: Path) -> Path:
    if kind == "missing":
        return tmp_path / "nope.png"
    if kind == "zero-byte":
        (tmp_path / "empty.nii.gz").write_bytes(b"")
        return tmp_path / "empty.nii.gz"
    if kind == "unsupported":
        (tmp_path / "notes.txt").write_text("not an image")
        return tmp_path / "notes.txt"
    if kind == "garbage-png":
        (tmp_path / "fake.png").write_bytes(b"this is not a png at all" * 10)
        return tmp_path / "fake.png"
    if kind == "truncated-png":
        PILImage.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64),
                                                             dtype=np.uint8)).save(tmp_path / "t.png")
        data = (tmp_path / "t.png").read_bytes()
        (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
        return tmp_path / "t.png"
    if kind == "truncated-nifti":
        sitk.WriteImage(_oblique_volume(), str(tmp_path / "t.nii.gz"))
        raw = gzip.decompress((tmp_path / "t.nii.gz").read_bytes())
        (tmp_path / "t.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))
        return tmp_path / "t.nii.gz"
    if kind == "4d":
        frame = sitk.GetImageFromArray(np.zeros((4, 10, 10), np.float32))
        sitk.WriteImage(sitk.JoinSeries([frame] * 3), str(tmp_path / "4d.nii.gz"))
        return tmp_path / "4d.nii.gz"
    if kind == "vector-volume":
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 10, 10, 3), np.float32), isVector=True),
                        str(tmp_path / "v.nrrd"))
        return tmp_path / "v.nrrd"
    if kind.startswith(("nan", "inf")):
        array = np.zeros((4, 10, 10), np.float32)
        array[1, 2, 3] = np.nan if kind.startswith("nan") else np.inf
        suffix = kind.split("-")[1]
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"bad.{suffix}"))
        return tmp_path / f"bad.{suffix}"
    if kind == "truncated-nrrd":
        sitk.WriteImage(_oblique_volume(), str(tmp_path / "t.nrrd"), useCompression=True)
        data = (tmp_path / "t.nrrd").read_bytes()
        (tmp_path / "t.nrrd").write_bytes(data[: len(data) * 2 // 3])
        return tmp_path / "t.nrrd"
    if kind == "tiny":
        PILImage.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "tiny.png")
        return tmp_path / "tiny.png"
    if kind == "huge-png-header":
        _png_header_only(tmp_path / "huge.png", 40000, 40000)
        return tmp_path / "huge.png"
    if kind == "huge-nrrd-header":
        (tmp_path / "huge.nrrd").write_text(
            "NRRD0004\ntype: float\ndimension: 3\nsizes: 20000 20000 20000\nencoding: raw\n"
            "endian: little\n\n"
        )
        return tmp_path / "huge.nrrd"
    if kind == "truncated-dicom":
        return _package_file("pydicom", "data", "test_files", "MR_truncated.dcm")
    if kind == "lying-dicom-header":  # says 16000 x 16000 pixels, holds 128 bytes of them
        import pydicom

        _write_dicom(tmp_path / "liar.dcm", np.zeros((8, 8), np.uint16))
        ds = pydicom.dcmread(tmp_path / "liar.dcm")
        ds.Rows = ds.Columns = 16000
        ds.save_as(tmp_path / "liar.dcm")
        return tmp_path / "liar.dcm"
    if kind == "dicom-without-pixels":
        return _package_file("pydicom", "data", "test_files", "rtplan.dcm")
    if kind == "empty-folder":
        (tmp_path / "empty_dir").mkdir()
        return tmp_path / "empty_dir"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "does not exist"),
        ("zero-byte", "empty"),
        ("unsupported", "unsupported format"),
        ("garbage-png", "is not an image: its content is not PNG"),
        ("truncated-png", "corrupt or truncated"),
        ("truncated-nifti", "truncated"),
        ("4d", "4D"),
        ("vector-volume", "vector"),
        ("truncated-nrrd", "truncated"),
        ("nan-nii.gz", "NaN"),
        ("inf-nii.gz", "infinite"),
        ("nan-nrrd", "NaN"),
        ("inf-mha", "infinite"),
        ("tiny", "at least 8"),
        ("huge-png-header", "above the limit"),
        ("huge-nrrd-header", "above the limit"),
        ("truncated-dicom", "cannot be decoded"),
        ("lying-dicom-header", "truncated or corrupt"),
        ("dicom-without-pixels", "without pixel data"),
        ("empty-folder", "no DICOM series"),
    ],
)
def test_bad_images_raise_a_clear_error(tmp_path, kind, words):
    with pytest.raises(ImageReadError) as info:
        read_image(_bad_file(kind, tmp_path))
    message = str(info.value)
    assert words in message
    assert "\n" not in message.strip() and isinstance(info.value, (FastTextDiffError, ValueError))


def test_write_image_refuses_mismatches(tmp_path):
    like = Image(np.zeros((10, 12), np.uint8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)
    with pytest.raises(ValueError, match="shape"):
        write_image(tmp_path / "m.png", np.zeros((12, 10), np.uint8), like)
    with pytest.raises(ValueError, match="output formats"):
        write_image(tmp_path / "m.dcm", np.zeros((10, 12), np.uint8), like)
    volume = Image(np.zeros((3, 10, 12)), (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()), True)
    with pytest.raises(ValueError, match="PNG"):
        write_image(tmp_path / "m.png", np.zeros((3, 10, 12), np.uint8), volume)
    assert not list(tmp_path.iterdir())  # no half-written or temporary files left behind


def test_extension_helpers(tmp_path):
    assert {".png", ".dcm", ".nii.gz", ".nrrd", ".mha"} <= set(supported_extensions())
    assert is_volume_path(tmp_path) and is_volume_path("a/b.nii.gz") and is_volume_path("x.NRRD")
    assert not is_volume_path("x.png")


# ------------------------------------------------------------------ preprocess


def _flat(array) -> Image:
    return Image(np.asarray(array), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0), False)


def _volume(array) -> Image:
    return Image(np.asarray(array), (1.0, 1.0, 1.0), (0.0,) * 3, tuple(np.eye(3).ravel()), True)


@pytest.mark.parametrize(
    "image, size, channels, expected",
    [
        (_flat(np.add.outer(np.arange(40.0), np.arange(50.0))), 32, 1, (1, 1, 32, 32)),
        (_flat(np.add.outer(np.arange(40.0), np.arange(50.0))), 16, 3, (1, 3, 16, 16)),
        (_flat(np.dstack([np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1))] * 3)), 32, 1, (1, 1, 32, 32)),
        (_flat(np.dstack([np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1))] * 3)), 64, 3, (1, 3, 64, 64)),
        (_volume(np.add.outer(np.arange(5.0), np.add.outer(np.arange(20.0), np.arange(24.0)))), 16, 1, (5, 1, 16, 16)),
        (_volume(np.add.outer(np.arange(5.0), np.add.outer(np.arange(20.0), np.arange(24.0)))), 16, 3, (5, 3, 16, 16)),
    ],
)
def test_to_model_input_shapes_and_range(image, size, channels, expected):
    tensor = to_model_input(image, size, channels)
    assert tuple(tensor.shape) == expected and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    assert tensor.max() - tensor.min() > 1.0  # uses the range, not a constant


@pytest.mark.parametrize("size, channels, window", [(4, 1, None), (32, 2, None), (32, 1, (40, 0)), (32.5, 1, None)])
def test_to_model_input_refuses_bad_arguments(size, channels, window):
    with pytest.raises(ValueError):
        to_model_input(_flat(np.zeros((16, 16))), size, channels, window)


def test_percentile_scaling_ignores_hot_pixels():
    array = np.tile(np.linspace(0, 100, 64), (64, 1))
    array[0, 0] = 1e6
    tensor = to_model_input(_flat(array), 64, 1)
    assert float(tensor[0, 0, 32, 63]) > 0.9 and float(tensor[0, 0, 32, 0]) < -0.9


def test_ct_window_maps_center_to_zero():
    array = np.array([[-160.0, 40.0, 240.0, 1000.0]] * 4)
    array = np.repeat(np.repeat(array, 8, axis=0), 8, axis=1)  # 32 x 32 blocks
    tensor = to_model_input(_flat(array), 32, 1, window=(40, 400))[0, 0]
    assert tensor[16, 4] == pytest.approx(-1.0) and tensor[16, 12] == pytest.approx(0.0)
    assert tensor[16, 20] == pytest.approx(1.0) and tensor[16, 28] == pytest.approx(1.0)


def test_volume_uses_one_set_of_statistics():
    volume = np.stack([np.random.default_rng(z).random((16, 16)) + 10 * z for z in range(4)])
    tensor = to_model_input(_volume(volume), 16, 1)
    means = tensor.mean(dim=(1, 2, 3))
    assert torch.all(means[1:] > means[:-1])  # a per-slice scaling would make them all equal


def test_to_original_grid_masks_and_maps():
    image = _flat(np.zeros((40, 50)))
    mask = torch.zeros(1, 32, 32, dtype=torch.int64)
    mask[0, 8:24, 8:24] = 1
    back = to_original_grid(mask, image, mode="nearest")
    assert back.shape == (40, 50) and back.dtype == np.int64 and set(np.unique(back)) == {0, 1}
    assert back[20, 25] == 1 and back[0, 0] == 0
    probs = torch.rand(1, 2, 32, 32)
    maps = to_original_grid(probs, image, mode="bilinear")
    assert maps.shape == (2, 40, 50) and maps.min() >= 0 and maps.max() <= 1
    volume = _volume(np.zeros((5, 20, 24)))
    assert to_original_grid(torch.zeros(5, 16, 16), volume).shape == (5, 20, 24)
    assert to_original_grid(np.zeros((5, 3, 16, 16), np.float32), volume, "bilinear").shape == (3, 5, 20, 24)


@pytest.mark.parametrize(
    "maps, mode",
    [(torch.zeros(2, 16, 16), "nearest"), (torch.zeros(16, 16), "nearest"), (torch.zeros(1, 16, 16), "bicubic")],
)
def test_to_original_grid_refuses_mismatches(maps, mode):
    with pytest.raises(ValueError):
        to_original_grid(maps, _flat(np.zeros((20, 20))), mode=mode)


def test_model_input_and_back_keeps_a_mask():
    mask = np.zeros((48, 40), np.uint8)
    mask[10:30, 12:28] = 255
    image = _flat(mask)
    down = (to_model_input(image, 32, 1)[:, 0] > 0).long()
    back = to_original_grid(down, image)
    overlap = (back.astype(bool) & (mask > 0)).sum() / (mask > 0).sum()
    assert overlap > 0.9 and (back.astype(bool) ^ (mask > 0)).sum() < 0.1 * (mask > 0).sum()


@pytest.mark.parametrize(
    "mask, num_classes, expected",
    [
        (np.array([[0, 255], [255, 0]], np.uint8), 2, [[0, 1], [1, 0]]),
        (np.array([[0, 1], [1, 0]], np.uint8), 2, [[0, 1], [1, 0]]),
        (np.array([[3, 250], [120, 140]], np.uint8), 2, [[0, 1], [0, 1]]),  # JPEG-noisy greys
        (np.dstack([np.array([[0, 255], [0, 0]], np.uint8)] * 3), 2, [[0, 1], [0, 0]]),  # RGB mask
        (np.array([[0, 127], [255, 0]], np.uint8), 3, [[0, 1], [2, 0]]),  # grey levels per class
        (np.array([[0, 1], [2, 0]], np.uint8), 3, [[0, 1], [2, 0]]),  # class indices
    ],
)
def test_mask_to_labels(mask, num_classes, expected):
    labels = mask_to_labels(mask, num_classes)
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, expected)


def test_mask_to_labels_refuses_too_many_levels():
    with pytest.raises(ValueError, match="distinct values"):
        mask_to_labels(np.array([[0, 50], [100, 200]], np.uint8), 3)


# ------------------------------------------------------------------ generated DICOM files


def _write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", frames: int = 1) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName = "DX", "Test^Synthetic"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    ds.PixelSpacing = [0.2, 0.3]  # row spacing (y), column spacing (x)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(str(path), write_like_original=False)


def test_monochrome1_with_full_16bit_range_does_not_wrap(tmp_path):
    pixels = np.tile(np.linspace(100, 65535, 32).astype(np.uint16), (24, 1))
    _write_dicom(tmp_path / "mono1.dcm", pixels, "MONOCHROME1")
    image = read_image(tmp_path / "mono1.dcm")
    assert image.array.dtype == np.uint16
    assert image.array[0, 0] == 65535 - 100 and image.array[0, -1] == 0  # reversed within 16 bits, no wrap
    np.testing.assert_allclose(image.spacing[:2], (0.3, 0.2))  # (x, y) from PixelSpacing (row, col)


def test_dicom_without_extension_and_multiframe(tmp_path):
    pixels = np.arange(3 * 16 * 20, dtype=np.uint16).reshape(3, 16, 20)
    _write_dicom(tmp_path / "IM0001", pixels, frames=3)
    image = read_image(tmp_path / "IM0001")
    assert image.is_volume and image.array.shape == (3, 16, 20)
    np.testing.assert_array_equal(image.array, pixels)
    out = write_image(tmp_path / "frames_mask.nii.gz", np.zeros((3, 16, 20), np.uint8), like=image)
    assert sitk.ReadImage(str(out)).GetSize() == (20, 16, 3)


# ------------------------------------------------------------------ canonical (LPS) orientation


def _directed_volume(direction) -> sitk.Image:
    itk = sitk.GetImageFromArray(np.random.default_rng(3).random((6, 10, 14)).astype(np.float32))
    itk.SetDirection(direction)
    itk.SetSpacing((0.5, 0.75, 2.0))
    return itk


@pytest.mark.parametrize(
    "direction",
    [
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0),  # RAS storage (NIfTI convention)
        (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # a sagittal acquisition
        (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0),  # a coronal acquisition
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),  # already LPS
    ],
)
def test_volumes_are_sliced_in_lps_like_dicomorient(tmp_path, direction):
    from fasttextdiff.data.preprocess import canonical_array

    itk = _directed_volume(direction)
    sitk.WriteImage(itk, str(tmp_path / "v.nrrd"))
    image = read_image(tmp_path / "v.nrrd")
    expected = sitk.GetArrayFromImage(sitk.DICOMOrient(itk, "LPS"))
    np.testing.assert_array_equal(canonical_array(image), expected)
    tensor = to_model_input(image, 16, 1)
    assert tensor.shape[0] == expected.shape[0]
    # model outputs in canonical slices go back to the stored grid exactly (same-size identity)
    canonical_maps = torch.from_numpy(np.ascontiguousarray(expected))
    back = to_original_grid(canonical_maps, image, mode="bilinear")
    np.testing.assert_allclose(back, sitk.GetArrayFromImage(itk), rtol=1e-6)


def test_mni_template_slices_are_axial_and_radiological():
    from fasttextdiff.data.preprocess import canonical_array

    folder = _package_file("nilearn", "datasets", "data")
    image = read_image(next(iter(sorted(folder.glob("mni_icbm152_t1_*.nii.gz")))))
    oriented = canonical_array(image)
    reference = sitk.DICOMOrient(sitk.ReadImage(str(next(iter(sorted(folder.glob("mni_icbm152_t1_*.nii.gz")))))),
                                 "LPS")
    np.testing.assert_array_equal(oriented, sitk.GetArrayFromImage(reference))


@pytest.mark.parametrize(
    "package_path",
    [
        ("pydicom", "data", "test_files", "SC_ybr_full_422_uncompressed.dcm"),
        ("pydicom", "data", "test_files", "SC_rgb_jpeg_dcmtk.dcm"),  # JPEG baseline, YBR_FULL
        ("pydicom", "data", "test_files", "SC_rgb_rle.dcm"),
        ("pydicom", "data", "test_files", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG lossless
    ],
)
def test_colour_dicom_encodings_decode_to_the_same_rgb(package_path):
    reference = read_image(_package_file("data_store", "data", "SC_rgb.dcm")).array.astype(int)
    image = read_image(_package_file(*package_path)).array.astype(int)
    assert image.shape == reference.shape == (100, 100, 3)
    assert np.abs(image - reference).mean() < 2  # YBR converted to RGB once, not twice or never


# ------------------------------------------------------------------ fixed reference values (real and generated files)
# Recorded with the hand-written pipeline that preceded MONAI's readers/Orientation/Invert; the
# model inputs must stay within 1e-4 of them and the masks written back must be voxel-identical.


def _wave_png(folder: Path) -> Path:
    yy, xx = np.mgrid[0:300, 0:260]
    wave = 127 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)
    PILImage.fromarray((wave * 200).astype(np.uint16)).save(folder / "wave16.png")
    return folder / "wave16.png"


def _sagittal_nrrd(folder: Path) -> Path:
    zz, yy, xx = np.mgrid[0:20, 0:40, 0:36]
    itk = sitk.GetImageFromArray((1000 * np.sin(xx / 5.0) + 30 * yy - 50 * zz).astype(np.int16))
    itk.SetSpacing((0.7, 0.9, 2.5))
    itk.SetOrigin((-10.5, 20.25, 3.0))
    itk.SetDirection((0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0))  # a sagittal acquisition
    sitk.WriteImage(itk, str(folder / "sagittal.nrrd"))
    return folder / "sagittal.nrrd"


REFERENCE_CASES = {
    # name: (model size, input shape, mean, std, {(slice, row, col): value}, mask foreground, sum of its flat indices)
    "wave16.png": (64, (1, 1, 64, 64), 0.004078, 0.517052,
                   {(0, 0, 0): 0.113110, (0, 32, 16): -0.666271, (0, 63, 21): -0.878139, (0, 12, 62): -0.589905},
                   39432, 1547087052),
    "RG1_UNCR.dcm": (64, (1, 1, 64, 64), 0.488486, 0.406588,
                     {(0, 0, 0): -0.647706, (0, 32, 16): 0.171890, (0, 63, 21): 0.902813, (0, 12, 62): 0.618694},
                     3090868, 6005014768252),
    "mni152.nii.gz": (32, (189, 1, 32, 32), -0.662962, 0.634087,
                      {(0, 0, 0): -1.0, (94, 16, 8): 0.564829, (188, 31, 10): -1.0, (63, 6, 30): -1.0},
                      1730504, 6570143465792),
    "sagittal.nrrd": (32, (40, 1, 32, 32), 0.024001, 0.452508,
                      {(0, 0, 0): 0.611395, (20, 16, 8): -0.133824, (39, 31, 10): 0.122412, (13, 6, 30): 0.400295},
                      15363, 194716570),
}


@pytest.mark.parametrize("name", list(REFERENCE_CASES))
def test_model_input_and_written_mask_match_reference_values(tmp_path, name):
    size, shape, mean, std, probes, foreground, index_sum = REFERENCE_CASES[name]
    path = {
        "wave16.png": lambda: _wave_png(tmp_path),
        "RG1_UNCR.dcm": lambda: _package_file("data_store", "data", "RG1_UNCR.dcm"),
        "mni152.nii.gz": lambda: sorted(_package_file("nilearn", "datasets",
                                                      "data").glob("mni_icbm152_t1_*.nii.gz"))[0],
        "sagittal.nrrd": lambda: _sagittal_nrrd(tmp_path),
    }[name]()
    image = read_image(path)
    x = to_model_input(image, size, 1)
    assert tuple(x.shape) == shape
    assert float(x.double().mean()) == pytest.approx(mean, abs=1e-4)
    assert float(x.double().std()) == pytest.approx(std, abs=1e-4)
    for (n, row, col), value in probes.items():
        assert float(x[n, 0, row, col]) == pytest.approx(value, abs=1e-4), (n, row, col)
    # a mask made from the model input goes back to the stored grid, orientation undone, geometry kept
    mask = to_original_grid((x[:, 0] > 0).to(torch.uint8), image)
    suffix = {"png": ".png", "nrrd": ".nrrd"}.get(name.rsplit(".", 1)[-1], ".nii.gz")
    written = write_image(tmp_path / f"mask{suffix}", mask, like=image)
    flat = np.flatnonzero(sitk.GetArrayFromImage(sitk.ReadImage(str(written))).reshape(-1))
    assert (flat.size, int(flat.sum())) == (foreground, index_sum)
    if suffix != ".png":
        _assert_same_geometry(written, sitk.ReadImage(str(path)))


def test_itk_decoded_pixels_outlive_the_reader(tmp_path):
    """ITK hands out a view of its own buffer; the image must own its pixels once read."""
    import gc

    source = _sagittal_nrrd(tmp_path)
    expected = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))
    view = np.asarray(read_image(source).array)[:, ::2]  # the Image itself is dropped at once
    gc.collect()
    _ = [np.full((256, 256), 7, np.int16) for _ in range(64)]  # reuse freed memory, if any was freed
    np.testing.assert_array_equal(view, expected[:, ::2])

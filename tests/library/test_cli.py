"""The command line on real files: geometry kept on a real NIfTI volume and a real DICOM radiograph,
and bad input answered with one clear line and a non-zero exit code."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fasttextdiff.commands.main import main


def package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations, f"{package} is not installed"
    return Path(list(spec.submodule_search_locations)[0], *parts)


MNI_T1 = package_file("nilearn", "datasets", "data", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
RADIOGRAPH = package_file("data_store", "data", "RG1_UNCR.dcm")  # real CR chest radiograph, MONOCHROME1


def geometry(path: Path) -> tuple:
    img = sitk.ReadImage(str(path))
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_segment_real_nifti_volume_keeps_geometry(tmp_path, tiny_model, capsys):
    code, out, err = run_cli(capsys, "segment", MNI_T1, "--report", "Left frontal lesion.", "--model", tiny_model,
                             "--out", tmp_path / "mask.nii.gz", "--uncertainty", tmp_path / "unc.nii.gz", "--n-noise",
                             2)
    assert code == 0, err
    src, mask = geometry(MNI_T1), geometry(tmp_path / "mask.nii.gz")
    assert mask[0] == src[0]
    np.testing.assert_allclose(mask[1], src[1], rtol=1e-6)
    np.testing.assert_allclose(mask[2], src[2], atol=1e-4)
    np.testing.assert_allclose(mask[3], src[3], atol=1e-6)
    assert nib.load(tmp_path / "mask.nii.gz").get_data_dtype() == np.uint8
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "unc.nii.gz")))
    assert unc.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(MNI_T1))).shape and unc.max() > 0
    assert '"uncertainty_mean"' in out


def test_segment_real_dicom_radiograph_keeps_geometry(tmp_path, tiny_model, capsys):
    code, _, err = run_cli(capsys, "segment", RADIOGRAPH, "--report", "Unilateral pulmonary infection, one infected "
                           "area, lower right lung.", "--model", tiny_model, "--out", tmp_path / "mask.nrrd")
    assert code == 0, err
    src = sitk.ReadImage(str(RADIOGRAPH))
    mask = sitk.ReadImage(str(tmp_path / "mask.nrrd"))
    assert mask.GetSize()[:2] == src.GetSize()[:2] and max(src.GetSize()) > 1800  # the full-size radiograph
    np.testing.assert_allclose(mask.GetSpacing()[:2], src.GetSpacing()[:2], rtol=1e-6)
    np.testing.assert_allclose(mask.GetOrigin()[:2], src.GetOrigin()[:2], atol=1e-4)
    # PNG output of a 2D image has the same pixel grid
    code, _, err = run_cli(capsys, "segment", RADIOGRAPH, "--model", tiny_model, "--out", tmp_path / "mask.png")
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "mask.png")).GetSize()[:2] == src.GetSize()[:2]


def test_segment_with_the_one_draw_softmax_uncertainty(tmp_path, tiny_model, tiny_dataset, capsys):
    image = next((tiny_dataset / "Test_Folder" / "img").iterdir())
    code, out, err = run_cli(capsys, "segment", image, "--report", "Lesion in the left lung.", "--model", tiny_model,
                             "--out", tmp_path / "m.nii.gz", "--uncertainty", tmp_path / "u.nii.gz",
                             "--uncertainty-estimate", "softmax")
    assert code == 0, err
    unc = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "u.nii.gz")))
    assert 0 < unc.max() <= 0.5 + 1e-6 and unc.min() >= 0
    assert '"uncertainty_mean"' in out
    with pytest.raises(SystemExit):
        main(["segment", str(image), "--model", str(tiny_model), "--out", str(tmp_path / "x.png"),
              "--uncertainty-estimate", "dropout"])


def test_empty_and_huge_reports_have_documented_behaviour(tmp_path, tiny_model, tiny_dataset, capsys):
    image = next((tiny_dataset / "Test_Folder" / "img").iterdir())
    code, _, err = run_cli(capsys, "segment", image, "--report", "", "--model", tiny_model, "--out",
                           tmp_path / "a.png")
    assert code == 0 and "empty report" in err  # a warning, then the empty-text fallback
    huge = tmp_path / "huge.txt"
    huge.write_text(" ".join(["opacity"] * 100_000))
    code, _, err = run_cli(capsys, "segment", image, "--report-file", huge, "--model", tiny_model, "--out",
                           tmp_path / "b.png")
    assert code == 2 and err.startswith("error: ") and "characters" in err and "Traceback" not in err
    assert not (tmp_path / "b.png").exists()


def _corrupt_png(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    return path


def _four_d(tmp_path: Path) -> Path:
    path = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 3), np.float32), np.eye(4)), path)
    return path


@pytest.mark.parametrize("case", ["corrupt", "4d", "missing-model", "missing-image"])
def test_bad_input_gives_one_clear_line(case, tmp_path, tiny_model, capsys):
    image = {"corrupt": _corrupt_png, "4d": _four_d}.get(case, lambda p: p / "nope.png")(tmp_path)
    model = tmp_path / "no-model" if case == "missing-model" else tiny_model
    if case == "missing-model":
        image = _corrupt_png(tmp_path).with_name("ok.png")
        import PIL.Image

        PIL.Image.fromarray(np.zeros((32, 32), np.uint8)).save(image)
    code, out, err = run_cli(capsys, "segment", image, "--report", "x", "--model", model, "--out", tmp_path / "m.png")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    expected = {"corrupt": "corrupt", "4d": "4D", "missing-model": "does not exist", "missing-image": "does not exist"}
    assert expected[case].lower() in lines[0].lower()
    assert not (tmp_path / "m.png").exists()


def test_console_script_help_and_error_exit_code(tmp_path):
    exe = Path(sys.executable).with_name("fasttextdiff")
    help_ = subprocess.run([exe, "--help"], capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert help_.returncode == 0
    for command in ("demo-data", "pretrain-backbone", "train", "evaluate", "segment", "bench", "pretrain-text",
                    "demo-studies"):
        assert command in help_.stdout
    bad = subprocess.run([exe, "segment", tmp_path / "x.png", "--model", tmp_path, "--out", tmp_path / "m.png"],
                         capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "Traceback" not in bad.stderr


def test_segment_writes_a_palette_mask_and_an_overlay(tmp_path, tiny_model, tiny_dataset, capsys):
    """The mask PNG keeps class indices but shows them in colour (palette PNG); --overlay writes the
    image with the mask in colour; a volume's overlay shows one slice."""
    from PIL import Image as PILImage

    from fasttextdiff.data.io import read_image

    image = next((tiny_dataset / "Test_Folder" / "img").iterdir())
    code, out, err = run_cli(capsys, "segment", image, "--report", "Left lung lesion.", "--model", tiny_model,
                             "--out", tmp_path / "mask.png", "--overlay", tmp_path / "overlay.png")
    assert code == 0, err
    mask_png = PILImage.open(tmp_path / "mask.png")
    assert mask_png.mode == "P" and mask_png.getpalette()[3:6] == [230, 25, 75]  # class 1 in red
    values = read_image(tmp_path / "mask.png").array
    assert values.ndim == 2 and set(np.unique(values)) <= {0, 1}
    overlay = np.asarray(PILImage.open(tmp_path / "overlay.png"))
    assert overlay.shape == values.shape + (3,) and '"overlay"' in out
    if values.any():  # where the mask is, the overlay is tinted red
        region = overlay[values > 0].astype(int)
        assert (region[:, 0] > region[:, 1]).all()
    volume = tmp_path / "vol.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 200, (5, 24, 28)).astype(np.int16)),
                    str(volume))
    code, out, err = run_cli(capsys, "segment", volume, "--model", tiny_model, "--out", tmp_path / "m.nii.gz",
                             "--overlay", tmp_path / "vol.png")
    assert code == 0, err
    assert np.asarray(PILImage.open(tmp_path / "vol.png")).shape == (24, 28, 3) and '"overlay_slice"' in out


def test_every_option_has_a_help_line_and_argument_errors_come_before_heavy_imports(tmp_path):
    """Every option of every command says what it does; a mistyped argument is answered without
    importing torch or MONAI (a fresh interpreter, so nothing is imported already)."""
    import argparse

    from fasttextdiff.commands import main as cli

    parser = cli.build_parser()  # every command, lazily imported ones included
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    missing = [f"{name} {'/'.join(action.option_strings) or action.dest}" for name, sub in commands.items()
               for action in sub._actions
               if not isinstance(action, argparse._HelpAction) and not action.help and action.dest != "func"]
    assert not missing, f"options without a --help description: {missing}"
    probe = ("import sys, fasttextdiff.commands.main as c\n"
             "code = 0\n"
             "try:\n    c.main(['train', '--data'])\nexcept SystemExit as e:\n    code = e.code\n"
             "print(code, 'torch' in sys.modules, 'monai' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["2", "False", "False"], done.stdout + done.stderr
    assert "expected one argument" in done.stderr


def test_focus_sentences_without_focus_is_refused_before_anything_is_written(tmp_path, capsys):
    """`--text-focus-sentences` alone would be silently ignored (the whole report is read): refuse it."""
    out = tmp_path / "model"
    code = main(["train", "--data", str(tmp_path / "no-data"), "--backbone", str(tmp_path / "no-backbone"),
                 "--out", str(out), "--text-focus-sentences", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "--text-focus DESCRIPTION" in err and "Traceback" not in err
    assert not out.exists()

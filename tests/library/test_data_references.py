"""Files that name other files are refused by `read_image` before the named file is opened.

The sentinel "secret" is a raw 16x16 image that these headers can really point at: with
`allow_external_data=True` (the CLI on a user's own files) the NRRD and MetaImage cases read it,
which shows the references are live; without it (the default, and always on the server) every
case is refused with a sentence, the sentinel is never opened (inotify via watchdog), and the
answer is the same whether the named file exists or not.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

import reliability_cases as cases
from fasttextdiff.data.io import read_image
from fasttextdiff.data.references import check_self_contained
from fasttextdiff.utils.errors import ImageReadError
from server_fixtures import OpenWatch


@pytest.fixture()
def secret(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    path = folder / "secret.raw"
    path.write_bytes(np.arange(cases.SECRET_SIDE ** 2, dtype=np.uint8).tobytes())
    return path


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux-only")


@pytest.mark.parametrize("case", cases.REFERENCE_CASES, ids=lambda c: c.name)
def test_files_naming_other_files_are_refused_without_opening_them(tmp_path, secret, case):
    upload = tmp_path / "upload" / case.filename
    upload.parent.mkdir()
    upload.write_bytes(case.build(str(secret)))
    missing = tmp_path / "upload2" / case.filename
    missing.parent.mkdir()
    missing.write_bytes(case.build(str(secret.with_name("absent.raw"))))
    with OpenWatch(secret.parent) as watch:
        with pytest.raises(ImageReadError) as refused:
            read_image(upload)
        with pytest.raises(ImageReadError) as refused_missing:
            read_image(missing)
    message = str(refused.value)
    assert "only self-contained files are accepted" in message and case.filename in message
    assert str(refused_missing.value) == message, "the answer must not depend on whether the named file exists"
    assert str(secret) not in message
    assert watch.opened == [], f"the named file was opened: {watch.opened}"


def test_the_references_are_live_when_the_caller_allows_them(tmp_path, secret):
    """The control: the same headers, allowed, read the sentinel's pixels (so the refusal above matters)."""
    expected = np.frombuffer(secret.read_bytes(), np.uint8).reshape(cases.SECRET_SIDE, cases.SECRET_SIDE)
    for case in cases.REFERENCE_CASES:
        if case.filename not in ("abs.nrrd", "abs.mhd", "abs.mha", "detached.nhdr"):
            continue
        path = tmp_path / case.filename
        path.write_bytes(case.build(str(secret)))
        with OpenWatch(secret.parent) as watch:
            image = read_image(path, allow_external_data=True)
        assert np.array_equal(image.array, expected), case.name
        assert any(p.endswith("secret.raw") for p in watch.opened), "the watch saw no open: the check would be vacuous"


def test_self_contained_files_pass(tmp_path):
    import SimpleITK as sitk

    volume = sitk.GetImageFromArray(np.arange(4 * 16 * 16, dtype=np.int16).reshape(4, 16, 16))
    for name in ("v.nrrd", "v.mha", "v.nii.gz", "v.nii"):
        sitk.WriteImage(volume, str(tmp_path / name))
        check_self_contained(tmp_path / name)
        assert read_image(tmp_path / name).array.shape == (4, 16, 16)
    (tmp_path / "x.png").write_bytes(cases.png_bytes(16, 16))
    check_self_contained(tmp_path / "x.png")


def test_symbolic_links_are_refused(tmp_path, secret):
    link = tmp_path / "link.nrrd"
    link.symlink_to(secret)
    with pytest.raises(ImageReadError, match="symbolic link"):
        read_image(link)
    folder = tmp_path / "series"
    folder.mkdir()
    (folder / "IM1").symlink_to(secret)
    with pytest.raises(ImageReadError, match="symbolic link"):
        read_image(folder)

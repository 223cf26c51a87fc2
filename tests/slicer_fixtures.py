"""Fixtures shared by the Slicer-module and web-viewer tests (registered by tests/conftest.py).

* `HeadlessSlicer` — a MRML scene set up with Slicer's own application, colour, segmentations
  and volumes logic from the slicer-core wheel (no Qt), plus the remote-IO/data-IO managers that
  reading a scene bundle (.mrb) needs — what desktop Slicer's application does at start.
* `oblique_volume_file` — a real NIfTI volume with non-identity geometry (anisotropic spacing,
  rotated axes, offset origin) and a bright blob, written by SimpleITK.
* `shared_tiny_model_root` (session) — one tiny ready model for every server these tests start.
* `slicer_server` (session) — `monailabel start_server` on 127.0.0.1 serving that model.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from server_fixtures import TINY_CONF, SubprocessServer, make_tiny_studies

#: The test volume: 32 x 32 x 6 voxels (x, y, z), like the tiny server's 32 px images.
VOLUME_SIZE = (32, 32, 6)
VOLUME_SPACING = (0.8, 0.9, 2.5)
VOLUME_ORIGIN = (-12.0, 4.0, 30.0)
VOLUME_ANGLE = math.radians(20.0)


class HeadlessSlicer:
    """Slicer's MRML scene and module logic on slicer-core, set up as the Slicer application does."""

    def __init__(self) -> None:
        import slicer

        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        colors = self.app_logic.GetColorLogic()
        colors.SetMRMLScene(self.scene)
        colors.SetMRMLApplicationLogic(self.app_logic)
        colors.AddDefaultColorNodes()
        self.app_logic.SetModuleLogic("Colors", colors)
        self.segmentations_logic = self._register(slicer.vtkSlicerSegmentationsModuleLogic(), "Segmentations")
        self.volumes_logic = self._register(slicer.vtkSlicerVolumesLogic(), "Volumes")
        # reading an .mrb: the data IO manager with a remote-IO cache directory (as Slicer's app has)
        self._cache = tempfile.TemporaryDirectory(prefix="slicer-cache-")
        self.remote_io = slicer.vtkMRMLRemoteIOLogic()
        self.remote_io.SetMRMLScene(self.scene)
        self.remote_io.SetMRMLApplicationLogic(self.app_logic)
        self.remote_io.GetCacheManager().SetRemoteCacheDirectory(self._cache.name)
        self.data_io = slicer.vtkDataIOManagerLogic()
        self.data_io.SetMRMLScene(self.scene)
        self.data_io.SetMRMLApplicationLogic(self.app_logic)
        self.data_io.SetAndObserveDataIOManager(self.remote_io.GetDataIOManager())
        self.remote_io.AddDataIOToScene()

    def _register(self, logic, name):
        logic.SetMRMLScene(self.scene)
        logic.SetMRMLApplicationLogic(self.app_logic)
        self.app_logic.SetModuleLogic(name, logic)
        return logic

    def save_bundle(self, path: Path) -> None:
        """Write the scene as a Slicer data bundle (.mrb), as File > Save does."""
        self.scene.SetRootDirectory(str(path.parent))
        self.scene.SetURL(str(path.with_suffix(".mrml")))
        assert self.scene.WriteToMRB(str(path)), f"could not write {path}"

    def load_bundle(self, path: Path) -> None:
        import slicer

        messages = slicer.vtkMRMLMessageCollection()
        assert self.scene.ReadFromMRB(str(path), True, messages), messages.GetAllMessagesAsString()

    def close(self) -> None:
        self.scene.Clear(True)
        self._cache.cleanup()


def lps_to_ras_matrix(spacing, origin, direction):
    """The IJK-to-RAS matrix Slicer should build for an ITK (LPS) image geometry."""
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(spacing)
    m[:3, 3] = origin
    m[:2, :] *= -1  # LPS -> RAS
    return m


def oblique_geometry():
    c, s = math.cos(VOLUME_ANGLE), math.sin(VOLUME_ANGLE)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    return VOLUME_SPACING, VOLUME_ORIGIN, direction


def write_oblique_volume(path: Path) -> Path:
    """A CT-like volume (HU-ish values) with a bright round blob, on an oblique grid."""
    import SimpleITK as sitk

    nx, ny, nz = VOLUME_SIZE
    z, y, x = np.mgrid[0:nz, 0:ny, 0:nx]
    array = np.where((x - 20) ** 2 + (y - 11) ** 2 + ((z - 3) * 3) ** 2 < 45, 350, -650).astype(np.int16)
    array += (np.random.default_rng(0).normal(0, 20, array.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    spacing, origin, direction = oblique_geometry()
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def oblique_volume_file(tmp_path_factory) -> Path:
    return write_oblique_volume(tmp_path_factory.mktemp("oblique") / "oblique_ct.nii.gz")


@pytest.fixture
def headless_slicer() -> Iterator[HeadlessSlicer]:
    app = HeadlessSlicer()
    try:
        yield app
    finally:
        app.close()


@pytest.fixture(scope="session")
def shared_tiny_model_root(tmp_path_factory, pristine_marking_tiny_model_root) -> Path:
    """A copy of the tiny model that marks pixels (tests/conftest.py builds it once per test process) for these
    servers: the Slicer tests follow a mask through segments, edits and saves, which an empty mask cannot show."""
    return Path(shutil.copytree(pristine_marking_tiny_model_root, tmp_path_factory.mktemp("shared-model") / "root",
                                symlinks=True))


@pytest.fixture(scope="session")
def slicer_server(tmp_path_factory, shared_tiny_model_root) -> Iterator[SubprocessServer]:
    """`monailabel start_server` on fresh tiny studies (2D images and a volume), serving the shared
    tiny model; 127.0.0.1 on a free port. One for the session: the logic and the browser tests
    add images to it and compare with what it holds at the time, never with a fixed list."""
    saved_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), saved_path])
    studies = make_tiny_studies(tmp_path_factory.mktemp("slicer-studies") / "demo", seed=2)
    conf = dict(TINY_CONF, model_dir=str(shared_tiny_model_root), prepare_default_model="false",
                state_dir=str(tmp_path_factory.mktemp("slicer-state")))
    server = SubprocessServer(studies, conf, tmp_path_factory.mktemp("slicer-logs") / "server.log").start()
    try:
        yield server
    finally:
        server.stop()
        os.environ["PATH"] = saved_path


def write_mni_volume(path: Path, step: int = 4) -> Path:
    """A real MRI volume: nilearn's bundled MNI152 T1 template (1 mm, 197 x 233 x 189) taken every
    `step` voxels, written as NIfTI with the matching affine (origin and spacing kept)."""
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    template = (Path(spec.submodule_search_locations[0]) / "datasets" / "data"
                / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    image = nib.load(str(template))
    data = np.asarray(image.dataobj)[::step, ::step, ::step].astype(np.int16)
    affine = image.affine @ np.diag([step, step, step, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.fixture(scope="module")
def mni_volume_file(tmp_path_factory) -> Path:
    return write_mni_volume(tmp_path_factory.mktemp("mni") / "mni_t1.nii.gz")

"""The Report Segment module's scene logic on real Slicer code (slicer-core: MRML, volumes and
segmentations logic, no Qt) against the real FastTextDiff MONAI Label server.

A real NIfTI volume with oblique geometry is read by Slicer's volumes logic; the report is kept on
the node and survives an .mrb save and reload; the server segments it with the report; the label
and the uncertainty map land on the volume's voxel grid; voxels are edited in the segmentation;
the edit is submitted, and the label the server stores (read back with MONAI Label's own client)
equals the edit voxel for voxel, in the image's geometry.
"""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_fixtures import VOLUME_SIZE, lps_to_ras_matrix, oblique_geometry

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make setup` (requirements-viewer.txt)")
vtk = pytest.importorskip("vtk")

from ReportSegmentLib import REPORT_ATTRIBUTE, ReportSegmentError  # noqa: E402
from ReportSegmentScene import LABELS_ATTRIBUTE, ReportSegmentSceneLogic, nodes  # noqa: E402

pytestmark = pytest.mark.server

REPORT = "Single round opacity in the right upper zone (é).\r\n\r\n\r\nNo effusion.  "
REPORT_NORMALIZED = "Single round opacity in the right upper zone (é).\n\nNo effusion."


def _matrix(node) -> np.ndarray:
    m = nodes.ijkToRas(node)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_array(node) -> np.ndarray:
    """A volume node's voxels as a (k, j, i) array."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = node.GetImageData()
    nx, ny, nz = image.GetDimensions()
    return vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx).copy()


def _segment_array(segmentation, segment_id, volume) -> tuple[np.ndarray, np.ndarray]:
    """A segment's binary labelmap as stored (Slicer keeps only the extent that has voxels), placed
    on the volume's full grid: (array (k, j, i), the labelmap's IJK-to-RAS)."""
    from vtkmodules.util.numpy_support import vtk_to_numpy

    image = slicer.vtkOrientedImageData()
    assert segmentation.GetBinaryLabelmapRepresentation(segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    full = np.zeros(_node_array(volume).shape, dtype=np.uint8)
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    vx0, vx1, vy0, vy1, vz0, vz1 = volume.GetImageData().GetExtent()
    if x1 >= x0:  # not empty
        assert vx0 <= x0 and x1 <= vx1 and vy0 <= y0 and y1 <= vy1 and vz0 <= z0 and z1 <= vz1
        nx, ny, nz = image.GetDimensions()
        part = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(nz, ny, nx)
        full[z0 - vz0:z1 - vz0 + 1, y0 - vy0:y1 - vy0 + 1, x0 - vx0:x1 - vx0 + 1] = part > 0
    return full, _vtk_matrix(matrix)


def _set_segment_array(segmentation, segment_id, array: np.ndarray, reference) -> None:
    """Replace a segment's voxels (an edit, as a paint/erase stroke does) on the reference grid."""
    from vtkmodules.util.numpy_support import numpy_to_vtk

    image = slicer.vtkOrientedImageData()
    nz, ny, nx = array.shape
    image.SetDimensions(nx, ny, nz)
    image.GetPointData().SetScalars(
        numpy_to_vtk(array.astype(np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    image.SetImageToWorldMatrix(nodes.ijkToRas(reference))
    ok = slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        image, segmentation, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE, image.GetExtent()
    )
    assert ok


# ------------------------------------------------------------------ scene only (no server)
def test_volume_loads_in_ras_geometry(headless_slicer, oblique_volume_file):
    logic = ReportSegmentSceneLogic(headless_slicer.scene, headless_slicer.volumes_logic)
    volume = logic.loadVolume(str(oblique_volume_file))
    assert volume.IsA("vtkMRMLScalarVolumeNode") and volume.GetName() == "oblique_ct"
    assert volume.GetImageData().GetDimensions() == VOLUME_SIZE
    expected = lps_to_ras_matrix(*oblique_geometry())
    assert not np.allclose(expected[:3, :3], np.diag(np.diag(expected[:3, :3])))  # really oblique
    np.testing.assert_allclose(_matrix(volume), expected, atol=1e-4)
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(oblique_volume_file)))
    np.testing.assert_array_equal(_node_array(volume), source)
    logic.cleanup()


def test_report_attribute_survives_an_mrb_save_and_reload(headless_slicer, oblique_volume_file, tmp_path):
    logic = ReportSegmentSceneLogic(headless_slicer.scene, headless_slicer.volumes_logic)
    volume = logic.loadVolume(str(oblique_volume_file), "chest")
    stored = logic.setReport(volume, REPORT)
    assert stored == REPORT_NORMALIZED
    assert volume.GetAttribute(REPORT_ATTRIBUTE) == REPORT_NORMALIZED
    with pytest.raises(ReportSegmentError, match="at most"):
        logic.setReport(volume, "x" * 70000)
    assert logic.getReport(volume) == REPORT_NORMALIZED  # a refused report leaves the stored one

    bundle = tmp_path / "scene.mrb"
    headless_slicer.save_bundle(bundle)
    names = zipfile.ZipFile(bundle).namelist()
    assert any(n.endswith(".mrml") for n in names) and any(n.endswith(".nrrd") for n in names)

    headless_slicer.scene.Clear(False)
    assert headless_slicer.scene.GetFirstNodeByName("chest") is None
    headless_slicer.load_bundle(bundle)
    reloaded = headless_slicer.scene.GetFirstNodeByName("chest")
    assert reloaded is not None and reloaded.GetImageData() is not None
    assert logic.getReport(reloaded) == REPORT_NORMALIZED
    np.testing.assert_allclose(_matrix(reloaded), lps_to_ras_matrix(*oblique_geometry()), atol=1e-4)
    logic.cleanup()


# ------------------------------------------------------------------ with the server
@pytest.fixture
def connected(headless_slicer, slicer_server):
    logic = ReportSegmentSceneLogic(headless_slicer.scene, headless_slicer.volumes_logic)
    info = logic.connect(slicer_server.url, timeout=120)
    assert "fasttextdiff" in info["models"]
    yield logic
    logic.cleanup()


def test_segment_edit_submit_round_trip(connected, headless_slicer, slicer_server, oblique_volume_file, tmp_path):
    logic = connected
    volume = logic.loadVolume(str(oblique_volume_file), "oblique case")
    logic.setReport(volume, REPORT)

    # upload: a fresh id, the report goes with it
    image_id = logic.uploadVolume(volume)
    assert image_id == "oblique_case" and volume.GetAttribute("FastTextDiff.ImageId") == image_id
    assert logic.client.get_report(image_id) == REPORT_NORMALIZED
    assert logic.uploadVolume(volume) == image_id  # known now: only the report is refreshed

    # segment with the report; read the server's own files before they are imported
    result = logic.requestSegmentation(image_id, logic.getReport(volume))
    assert result.summary["text_source"] == "request" and result.label_names == ["lesion"]
    server_label = sitk.ReadImage(result.label_path)
    server_array = sitk.GetArrayFromImage(server_label)
    segmentation, uncertainty, _ = logic.importResult(volume, result)

    # segments: named like the server's labels, on the volume's voxel grid
    assert logic.segmentNames(volume) == ["lesion"]
    assert json.loads(segmentation.GetAttribute(LABELS_ATTRIBUTE)) == {"lesion": 1}
    seg = segmentation.GetSegmentation()
    lesion_id = seg.GetSegmentIdBySegmentName("lesion")
    array, matrix = _segment_array(segmentation, lesion_id, volume)
    np.testing.assert_allclose(matrix, _matrix(volume), atol=1e-6)
    np.testing.assert_array_equal(array, (server_array == 1).astype(np.uint8))
    reference = slicer.vtkOrientedImageData()
    geometry = seg.GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference, False)
    np.testing.assert_allclose(_vtk_matrix(_image_to_world(reference)), _matrix(volume), atol=1e-6)

    # the uncertainty map: same grid, a heat overlay (transparent at zero)
    assert uncertainty is not None and logic.uncertaintyForVolume(volume) is uncertainty
    np.testing.assert_allclose(_matrix(uncertainty), _matrix(volume), atol=1e-6)
    color = uncertainty.GetDisplayNode().GetColorNode()
    assert color.GetName() == nodes.HEAT_COLOR_NAME
    rgba = [0.0] * 4
    color.GetColor(0, rgba)
    assert rgba[3] == 0.0
    assert float(_node_array(uncertainty).min()) >= 0.0

    # edit: paint a box into the lesion and erase the model's first lesion voxel (if any)
    edited = array.copy()
    edited[2:4, 20:26, 4:9] = 1
    found = np.argwhere(array == 1)
    if len(found):
        edited[tuple(found[0])] = 0
    assert not np.array_equal(edited, array)
    _set_segment_array(segmentation, lesion_id, edited, volume)

    # submit: the stored final label equals the edit, in the image's geometry
    answer = logic.submitLabel(volume)
    assert answer.get("image") == image_id
    stored_path = slicer_server.client().download_label(image_id, "final")
    stored = sitk.ReadImage(stored_path)
    stored_array = sitk.GetArrayFromImage(stored)
    np.testing.assert_array_equal(stored_array, edited.astype(stored_array.dtype))
    spacing, origin, direction = oblique_geometry()
    np.testing.assert_allclose(stored.GetSpacing(), spacing, atol=1e-4)
    np.testing.assert_allclose(stored.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(stored.GetDirection(), direction, atol=1e-4)
    info = logic.client.image_info(image_id)
    assert info["text"] == REPORT_NORMALIZED

    # the scene keeps report, segmentation and uncertainty through an .mrb
    bundle = tmp_path / "annotated.mrb"
    headless_slicer.save_bundle(bundle)
    headless_slicer.scene.Clear(False)
    headless_slicer.load_bundle(bundle)
    again = headless_slicer.scene.GetFirstNodeByName("oblique case")
    assert logic.getReport(again) == REPORT_NORMALIZED
    assert logic.segmentNames(again) == ["lesion"]
    reloaded_seg = logic.segmentationForVolume(again)
    reloaded_array, reloaded_matrix = _segment_array(
        reloaded_seg, reloaded_seg.GetSegmentation().GetSegmentIdBySegmentName("lesion"), again
    )
    np.testing.assert_allclose(reloaded_matrix, _matrix(again), atol=1e-4)
    np.testing.assert_array_equal(reloaded_array, edited)
    np.testing.assert_array_equal(_as_full_grid(reloaded_seg, again), edited)
    assert logic.uncertaintyForVolume(again) is not None


def _image_to_world(image):
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix


def _as_full_grid(segmentation, volume) -> np.ndarray:
    """The segmentation exported to a labelmap on the volume's full grid (k, j, i)."""
    scene = volume.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    try:
        assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
            segmentation, labelmap, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        )
        return _node_array(labelmap)
    finally:
        scene.RemoveNode(labelmap)


def test_label_on_another_grid_is_refused(connected, headless_slicer, oblique_volume_file, tmp_path):
    logic = connected
    volume = logic.loadVolume(str(oblique_volume_file), "grid check")
    wrong = sitk.Image(16, 16, 3, sitk.sitkUInt8)
    path = tmp_path / "wrong_label.nrrd"
    sitk.WriteImage(wrong, str(path))
    with pytest.raises(ReportSegmentError, match="not on the grid"):
        logic.importLabel(str(path), {"lesion": 1}, volume)
    assert logic.segmentationForVolume(volume) is None
    assert headless_slicer.scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0


def test_next_sample_and_datastore_listing(connected):
    """The demo studies' next sample is a 2D PNG: slicer-core has no PNG reader (desktop Slicer
    has), so the viewer's converter (PNG -> NRRD with ITK's geometry) is plugged in as it is there."""
    from fasttextdiff.viewer.session import slicer_readable

    logic = connected
    logic.readable = slicer_readable
    images = logic.client.list_images()
    assert images and all(image.image_id for image in images)
    labeled = {image.image_id for image in images if image.labeled}
    volume, sample = logic.loadNextSample("uncertainty")
    assert sample.image_id not in labeled
    assert volume.GetAttribute("FastTextDiff.ImageId") == sample.image_id
    assert logic.getReport(volume) == logic.client.get_report(sample.image_id) != ""
    listed = {image.image_id: image for image in images}
    assert listed[sample.image_id].report == logic.getReport(volume)
    # a datastore image is never uploaded again: only its report is updated
    logic.setReport(volume, "Edited report for the sample.")
    assert logic.uploadVolume(volume) == sample.image_id
    assert logic.client.get_report(sample.image_id) == "Edited report for the sample."
    assert len(logic.client.list_images()) == len(images)

"""MRML building blocks of the module: read and write volume files, label colour tables, the
uncertainty heat map, slice-view layers, voxel-grid checks.

MRML and logic classes only (``slicer.vtkMRML*``, ``slicer.vtkSlicer*Logic``, ``vtk``): no Qt, no
``slicer.util``, no ``slicer.app``/``slicer.mrmlScene``. The same code runs in desktop Slicer and
on ``slicer-core`` (the web viewer and the tests).
"""

import math
import os

import slicer
import vtk

from ReportSegmentLib import ReportSegmentError

#: vtkSlicerVolumesLogic::AddArchetypeVolume loading options (bit flags).
LOAD_LABELMAP = 1
LOAD_SINGLE_FILE = 4  # read only this file, never a numbered series of its neighbours
LOAD_AUTO_WINDOW_LEVEL = 8  # as Slicer's "Add data" does for images (not for labelmaps)

#: Name of the colour table used for uncertainty maps (made once per scene).
HEAT_COLOR_NAME = "FastTextDiff uncertainty heat"
# An inferno-like ramp; the lowest tenth is transparent so the heat shows only where the model is
# unsure and the image stays readable elsewhere.
_HEAT_STOPS = (
    (0.00, (0.00, 0.00, 0.02), 0.0),
    (0.10, (0.12, 0.03, 0.30), 0.0),
    (0.30, (0.47, 0.11, 0.43), 0.6),
    (0.55, (0.82, 0.24, 0.25), 0.85),
    (0.78, (0.98, 0.55, 0.04), 0.95),
    (1.00, (0.99, 1.00, 0.64), 1.00),
)
#: Grid comparisons tolerate this much difference (mm) between corner positions.
GRID_TOLERANCE_MM = 1e-3


def loadVolume(volumesLogic, path, name, labelmap=False):
    """Read one image file (NRRD, NIfTI, PNG, ...) into the scene with Slicer's own reader, in
    RAS geometry. Returns the new volume node."""
    if not os.path.isfile(path):
        raise ReportSegmentError("The file {} does not exist.".format(path))
    options = LOAD_SINGLE_FILE | (LOAD_LABELMAP if labelmap else LOAD_AUTO_WINDOW_LEVEL)
    node = volumesLogic.AddArchetypeVolume(path, name, options)
    if node is None or node.GetImageData() is None:
        raise ReportSegmentError("Slicer could not read {}.".format(os.path.basename(path)))
    return node


def writeVolume(volumeNode, path):
    """Write a volume node to a file (format from the extension) without touching the storage
    node the scene saves it with."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    storage.SetUseCompression(1)
    if not storage.WriteData(volumeNode) or not os.path.isfile(path):
        raise ReportSegmentError("Slicer could not write {} to {}.".format(volumeNode.GetName(),
                                                                           os.path.basename(path)))
    return path


def labelColorTable(scene, name, specs, colorNode=None):
    """A colour table naming and colouring each label value (``specs``: name, value, colour);
    ``colorNode`` is reused when given."""
    if colorNode is None:
        colorNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        colorNode.SetTypeToUser()
        colorNode.SetHideFromEditors(True)
    count = max([spec.value for spec in specs] + [0]) + 1
    colorNode.SetNumberOfColors(count)
    colorNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    for value in range(1, count):
        colorNode.SetColor(value, "unused {}".format(value), 0.5, 0.5, 0.5, 0.0)
    for spec in specs:
        colorNode.SetColor(spec.value, spec.name, spec.color[0], spec.color[1], spec.color[2], 1.0)
    return colorNode


def heatColorTable(scene):
    """The scene's uncertainty colour table (made on first use): zero is transparent, so the heat
    overlay shows only where the model is unsure."""
    existing = scene.GetFirstNodeByName(HEAT_COLOR_NAME)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    colorNode = scene.AddNewNodeByClass("vtkMRMLColorTableNode", HEAT_COLOR_NAME)
    colorNode.SetTypeToUser()
    colorNode.SetHideFromEditors(True)
    count = 256
    colorNode.SetNumberOfColors(count)
    for index in range(count):
        rgb, alpha = _heat(index / (count - 1.0))
        colorNode.SetColor(index, "", rgb[0], rgb[1], rgb[2], alpha)
    return colorNode


def _heat(t):
    for (t0, c0, a0), (t1, c1, a1) in zip(_HEAT_STOPS, _HEAT_STOPS[1:]):
        if t <= t1:
            f = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
            return tuple(c0[i] + f * (c1[i] - c0[i]) for i in range(3)), a0 + f * (a1 - a0)
    return _HEAT_STOPS[-1][1], _HEAT_STOPS[-1][2]


def showAsHeatOverlay(scene, volumeNode):
    """Display a scalar volume with the heat colour table over its whole range (0 .. max)."""
    if volumeNode.GetDisplayNode() is None:
        volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    display.SetAndObserveColorNodeID(heatColorTable(scene).GetID())
    high = volumeNode.GetImageData().GetScalarRange()[1]
    high = high if high > 0 else 1.0
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, float(high))
    display.SetInterpolate(0)
    return display


def setSliceLayers(scene, background=None, foreground=None, foregroundOpacity=None, label=None):
    """Show volumes in every slice view of the scene (what ``slicer.util.setSliceViewerLayers``
    does, on the MRML slice composite nodes, so it also works without Qt). ``None`` leaves a layer
    as it is; pass ``False`` to empty a layer."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID() if background else None)
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID() if foreground else None)
        if foregroundOpacity is not None:
            composite.SetForegroundOpacity(float(foregroundOpacity))
        if label is not None:
            composite.SetLabelVolumeID(label.GetID() if label else None)


def labelValues(labelNode):
    """The non-zero values present in a labelmap node."""
    image = labelNode.GetImageData()
    low, high = image.GetScalarRange()
    accumulate = vtk.vtkImageAccumulate()
    accumulate.SetInputData(image)
    accumulate.SetComponentExtent(0, int(high) - int(low), 0, 0, 0, 0)
    accumulate.SetComponentOrigin(int(low), 0, 0)
    accumulate.SetComponentSpacing(1, 1, 1)
    accumulate.Update()
    counts = accumulate.GetOutput().GetPointData().GetScalars()
    return [int(low) + i for i in range(counts.GetNumberOfTuples()) if counts.GetTuple1(i) > 0 and int(low) + i != 0]


def ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix


def gridCorners(matrix, dimensions):
    """RAS positions of the 8 corner voxel centres of a grid (``matrix``: IJK to RAS)."""
    corners = []
    for i in (0, dimensions[0] - 1):
        for j in (0, dimensions[1] - 1):
            for k in (0, dimensions[2] - 1):
                corners.append(tuple(round(v, 3) for v in matrix.MultiplyPoint((i, j, k, 1.0))[:3]))
    return corners


def sameGrid(matrixA, dimensionsA, matrixB, dimensionsB, tolerance=GRID_TOLERANCE_MM):
    """True when two voxel grids cover the same voxel centres in RAS (the same grid, possibly with
    axes stored in another order or direction, as readers of different formats do)."""
    if sorted(dimensionsA) != sorted(dimensionsB):
        return False
    spacingA = sorted(_columnNorm(matrixA, c) for c in range(3))
    spacingB = sorted(_columnNorm(matrixB, c) for c in range(3))
    if any(abs(a - b) > tolerance for a, b in zip(spacingA, spacingB)):
        return False
    cornersB = gridCorners(matrixB, dimensionsB)
    for corner in gridCorners(matrixA, dimensionsA):
        if min(math.dist(corner, other) for other in cornersB) > max(tolerance, 1e-2):
            return False
    return True


def _columnNorm(matrix, column):
    return math.sqrt(sum(matrix.GetElement(row, column) ** 2 for row in range(3)))


def segmentLabelmapGeometry(segmentationNode, segmentId):
    """(IJK-to-RAS matrix, dimensions) of one segment's binary labelmap as stored in the
    segmentation (after import, before any edit)."""
    image = slicer.vtkOrientedImageData()
    if not segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image):
        raise ReportSegmentError("The segment {} has no labelmap.".format(segmentId))
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return matrix, image.GetDimensions()

"""One annotation session of the web viewer, without any UI: the Slicer scene of trame-slicer, the
Report Segment module's scene logic on it (the same code desktop Slicer runs), the segment editor
(paint/erase) and the view layers.

The trame app (`app.py`) calls these methods and shows their results; HTTP-only steps
(segmenting, downloads, training status) are separate methods so the app can run them off the
UI thread, while everything touching VTK stays on it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ReportSegmentLib import DatastoreImage, ReportSegmentError, describe_server, summarize_report
from ReportSegmentLib.client import SegmentationResult, TrainProgress
from ReportSegmentScene import ReportSegmentSceneLogic, nodes

logger = logging.getLogger(__name__)

#: Brush diameter range for paint/erase, in percent of the view (trame-slicer's screen-relative mode).
BRUSH_RANGE = (1.0, 30.0)
#: 2D raster formats slicer-core has no reader for (it ships ITK's NRRD, NIfTI, MetaImage and DICOM IO).
RASTER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def slicer_readable(path: str) -> str:
    """A file slicer-core can read: a 2D raster becomes an NRRD next to it with the geometry ITK
    gives the raster (spacing 1, origin 0), which is what desktop Slicer's own PNG reader gives,
    so labels and images line up the same way in both."""
    if not path.lower().endswith(RASTER_EXTENSIONS):
        return path
    import SimpleITK as sitk

    converted = path + ".nrrd"
    try:
        sitk.WriteImage(sitk.ReadImage(path), converted, True)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1]
        raise ReportSegmentError(f"{Path(path).name} cannot be read as an image ({reason}).") from None
    return converted


@dataclass
class SegmentInfo:
    name: str
    color: str  # "#rrggbb"
    voxels: int


@dataclass
class OpenImage:
    """What the viewer shows about the current image."""

    name: str
    image_id: str | None  # datastore id once the server has it
    is_volume: bool  # more than one slice
    dimensions: tuple[int, int, int]
    segments: list[SegmentInfo] = field(default_factory=list)
    uncertainty_mean: float | None = None


class AnnotationSession:
    """The scene-side state of the viewer: one open image at a time."""

    def __init__(self, slicer_app, server_url: str | None = None, timeout: float = 300.0,
                 credentials: dict | None = None):
        self.app = slicer_app
        self.scene = slicer_app.scene
        self.workdir = tempfile.TemporaryDirectory(prefix="fasttextdiff-viewer-")
        self.logic = ReportSegmentSceneLogic(self.scene, slicer_app.volumes_logic, tmpdir=self.workdir.name,
                                             readable=slicer_readable)
        self.timeout = timeout
        self.server_url = server_url
        self.credentials = dict(credentials or {})  # username/password or token, for a server with auth on
        self.volume = None
        self.server_info: dict = {}

    # ------------------------------------------------------------ server
    def connect(self, url: str | None = None) -> str:
        """Connect to the server; returns the one-line description of what it offers."""
        url = url or self.server_url
        if not url:
            raise ReportSegmentError("Give the FastTextDiff server URL (e.g. http://127.0.0.1:8000).")
        self.server_info = self.logic.connect(url, timeout=self.timeout, **self.credentials)
        self.server_url = self.logic.client.url
        return describe_server(self.server_info)

    @property
    def connected(self) -> bool:
        return self.logic.client is not None

    def list_images(self) -> list[DatastoreImage]:
        return self.logic.requireClient().list_images()

    def describe_server(self) -> str:
        """HTTP only: the one-line description of the server, fresh (label counts change)."""
        self.server_info = self.logic.requireClient().info()
        return describe_server(self.server_info)

    # ------------------------------------------------------------ opening images
    def _clear(self) -> None:
        """One image at a time: the scene is emptied (views and editor nodes are singletons)."""
        self.app.segmentation_editor.deactivate_effect()
        self.scene.Clear(False)
        self.volume = None

    def open_file(self, path: str, name: str | None = None):
        """Open a local image file (NIfTI, NRRD, PNG, ...); it is uploaded on Segment/Submit."""
        self._clear()
        self.volume = self.logic.loadVolume(path, name)
        self.logic.setReport(self.volume, "")
        self._show_volume()
        return self.volume

    def download(self, image_id: str) -> str:
        """HTTP only: fetch a datastore image to a local file."""
        return self.logic.requireClient().download_image(image_id, out_dir=tempfile.mkdtemp(dir=self.workdir.name))

    def open_datastore_image(self, image_id: str, path: str | None = None, report: str | None = None):
        """Open an image of the server's datastore with its stored report."""
        path = path or self.download(image_id)
        self._clear()
        self.volume = self.logic.loadDatastoreImage(image_id, report=report, path=path)
        self._show_volume()
        return self.volume

    def pick_next(self, strategy: str = "uncertainty"):
        """HTTP only: the image the active-learning strategy offers next (not downloaded)."""
        return self.logic.requireClient().next_sample(strategy, download=False)

    def _show_volume(self) -> None:
        self.app.display_manager.show_volume_in_slice_background(self.volume)
        self.app.display_manager.show_volume_in_slice_foreground(None)
        self.app.display_manager.reset_views()

    def current(self) -> OpenImage | None:
        if self.volume is None:
            return None
        dims = tuple(self.volume.GetImageData().GetDimensions())
        return OpenImage(
            name=self.volume.GetName(),
            image_id=self.volume.GetAttribute("FastTextDiff.ImageId"),
            is_volume=sorted(dims)[0] > 1,
            dimensions=dims,
            segments=self.segments(),
            uncertainty_mean=self.logic.lastResult.uncertainty_mean if self.logic.lastResult else None,
        )

    # ------------------------------------------------------------ report
    @property
    def report(self) -> str:
        return self.logic.getReport(self.volume)

    def set_report(self, text: str) -> str:
        return self.logic.setReport(self._require_volume(), text)

    def store_report(self, image_id: str, text: str) -> str:
        """HTTP only: save the report in the server's datastore."""
        return self.logic.requireClient().set_report(image_id, text)

    # ------------------------------------------------------------ segment
    def upload(self) -> str:
        """Make sure the server has the image and its report (never overwrites another image)."""
        return self.logic.uploadVolume(self._require_volume())

    def request_segmentation(self, image_id: str, report: str) -> SegmentationResult:
        """HTTP only: infer on the server with the report."""
        return self.logic.requestSegmentation(image_id, report)

    def show_result(self, result: SegmentationResult) -> OpenImage:
        """Import the label (segments) and the uncertainty heat map and make the segmentation the
        one the editor paints into."""
        volume = self._require_volume()
        segmentation, _, _ = self.logic.importResult(volume, result)
        editor = self.app.segmentation_editor
        editor.set_active_segmentation(segmentation, volume)
        names = self.logic.segmentNames(volume)
        if names:
            editor.set_active_segment_id(segmentation.GetSegmentation().GetSegmentIdBySegmentName(names[0]))
        return self.current()

    def segments(self) -> list[SegmentInfo]:
        segmentation = self.logic.segmentationForVolume(self.volume)
        if segmentation is None:
            return []
        from vtkmodules.util.numpy_support import vtk_to_numpy

        seg = segmentation.GetSegmentation()
        out = []
        for index in range(seg.GetNumberOfSegments()):
            segment_id = seg.GetNthSegmentID(index)
            segment = seg.GetSegment(segment_id)
            voxels = 0
            image = _oriented_image()
            if segmentation.GetBinaryLabelmapRepresentation(segment_id, image) and image.GetPointData().GetScalars():
                voxels = int((vtk_to_numpy(image.GetPointData().GetScalars()) > 0).sum())
            r, g, b = segment.GetColor()
            color = f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"
            out.append(SegmentInfo(segment.GetName(), color, voxels))
        return out

    # ------------------------------------------------------------ overlays
    def set_overlays(self, label_visible: bool, heat_visible: bool, heat_opacity: float) -> None:
        segmentation = self.logic.segmentationForVolume(self.volume)
        if segmentation is not None and segmentation.GetDisplayNode() is not None:
            segmentation.GetDisplayNode().SetVisibility(bool(label_visible))
        uncertainty = self.logic.uncertaintyForVolume(self.volume)
        if uncertainty is not None:
            nodes.setSliceLayers(self.scene, foreground=uncertainty if heat_visible else False,
                                 foregroundOpacity=heat_opacity)

    # ------------------------------------------------------------ edit (trame-slicer's segment editor)
    def set_tool(self, tool: str, brush: float | None = None) -> str:
        """"paint", "erase" or "none" (navigate). Painting needs a segmentation: press Segment first."""
        from trame_slicer.segmentation import SegmentationEffectErase, SegmentationEffectPaint
        from trame_slicer.segmentation.paint_effect_parameters import BrushDiameterMode

        editor = self.app.segmentation_editor
        if tool == "none":
            editor.deactivate_effect()
            return "none"
        if editor.active_segmentation is None or not editor.get_active_segment_id():
            raise ReportSegmentError("Press Segment first: paint and erase edit the segmentation.")
        effect = editor.set_active_effect_type(SegmentationEffectPaint if tool == "paint" else SegmentationEffectErase)
        if brush is not None:
            low, high = BRUSH_RANGE
            effect.set_brush_diameter(min(max(float(brush), low), high), BrushDiameterMode.ScreenRelative)
        return tool

    def on_segmentation_changed(self, callback) -> None:
        """Call ``callback()`` after every edit of the active segmentation (paint, erase, undo)."""
        self.app.segmentation_editor.segmentation_modified.connect(callback)

    # ------------------------------------------------------------ submit, next, train
    def export_label(self) -> tuple[str, str, list]:
        """Write the edited segments as the image's label (on its grid); returns (image id, path,
        label_info). Uploads the image first if the server does not have it."""
        volume = self._require_volume()
        segmentation = self.logic.segmentationForVolume(volume)
        if segmentation is None:
            raise ReportSegmentError("Press Segment first: there is no label to submit yet.")
        self.app.segmentation_editor.deactivate_effect()
        image_id = self.logic.uploadVolume(volume)
        path = os.path.join(self.workdir.name, image_id + "_label.nrrd")
        from ReportSegmentLib import label_info

        specs = self.logic.exportLabelmap(segmentation, volume, path)
        return image_id, path, label_info(specs)

    def submit(self, image_id: str, path: str, info: list) -> dict:
        """HTTP only: save the exported label as the image's final label."""
        try:
            return self.logic.requireClient().submit_label(image_id, path, tag="final", label_info=info)
        finally:
            Path(path).unlink(missing_ok=True)

    def start_training(self, epochs: int | None = None) -> dict:
        return self.logic.startTraining(params={"max_epochs": int(epochs)} if epochs else {})

    def train_progress(self) -> TrainProgress:
        return self.logic.trainProgress()

    def stop_training(self):
        return self.logic.stopTraining()

    # ------------------------------------------------------------ helpers
    def _require_volume(self):
        if self.volume is None:
            raise ReportSegmentError("Open an image first: pick one from the server's list or open a file.")
        return self.volume

    def close(self) -> None:
        self.workdir.cleanup()


def _oriented_image():
    from slicer import vtkOrientedImageData

    return vtkOrientedImageData()


def image_rows(images: list[DatastoreImage]) -> list[dict]:
    """The datastore list as the UI shows it."""
    return [
        {
            "id": image.image_id,
            "report": summarize_report(image.report, 70),
            "labeled": image.labeled,
            "status": "labeled" if image.labeled else "to label",
        }
        for image in images
    ]

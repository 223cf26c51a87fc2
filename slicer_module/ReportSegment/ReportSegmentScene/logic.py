"""The Report Segment workflow on a MRML scene: report attribute, upload, segment, import the label
and the uncertainty in the volume's geometry, export the edited segments, submit, next sample,
training.

Uses MRML and logic classes only, so the very same object drives desktop Slicer (the module's
widget wraps it with ``slicer.mrmlScene``), the web viewer (trame-slicer's scene) and the tests
(slicer-core without Qt).
"""

import json
import os
import shutil
import tempfile

import slicer
import vtk

from ReportSegmentLib import (
    IMAGE_ID_ATTRIBUTE,
    REPORT_ATTRIBUTE,
    FastTextDiffClient,
    ReportSegmentError,
    export_values,
    image_id_from_name,
    label_info,
    normalize_report,
    segments_for_labels,
    validate_report,
)
from ReportSegmentLib import settings as keys

from . import nodes

#: Node reference roles (saved with the scene) from a volume to its result nodes.
SEGMENTATION_REFERENCE = "FastTextDiff.Segmentation"
UNCERTAINTY_REFERENCE = "FastTextDiff.Uncertainty"
LABEL_COLORS_REFERENCE = "FastTextDiff.LabelColors"
#: Attribute on the segmentation node: JSON {label name: value} of the server's result.
LABELS_ATTRIBUTE = "FastTextDiff.Labels"
#: Format volumes and labels are sent to the server in (keeps the full RAS geometry).
FILE_EXTENSION = ".nrrd"
#: How often an upload is retried under a fresh id when another client took the id meanwhile.
UPLOAD_ATTEMPTS = 3


class ReportSegmentSceneLogic:
    """Scene operations of the module, for one MRML scene and (once connected) one server."""

    def __init__(self, scene, volumesLogic=None, client=None, tmpdir=None, readable=None):
        self.scene = scene
        self.volumesLogic = volumesLogic if volumesLogic is not None else _newVolumesLogic(scene)
        self.client = client
        #: ``readable(path) -> path``: a copy Slicer's readers can open (slicer-core has no PNG/JPEG/
        #: TIFF reader, desktop Slicer does); None reads every file as it is
        self.readable = readable
        self._ownTmpdir = tmpdir is None
        self.tmpdir = tmpdir or tempfile.mkdtemp(prefix="ReportSegment-")
        self.lastResult = None

    def cleanup(self):
        if self._ownTmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    # ---------------------------------------------------------------- server
    def connect(self, url, timeout=keys.DEFAULT_TIMEOUT_SECONDS, username=None, password=None, token=None):
        """Check the server answers ``/info/``; keep the client. Returns the info. A server with
        MONAI Label's authentication on needs ``username``/``password`` (or a bearer ``token``)."""
        client = FastTextDiffClient(url, timeout=timeout, tmpdir=self.tmpdir, token=token)
        if username:
            client.login(username, password)
        info = client.info()
        self.client = client
        return info

    def serverNeedsLogin(self, url, timeout=keys.DEFAULT_TIMEOUT_SECONDS):
        """True when the server at ``url`` has MONAI Label's authentication on."""
        return FastTextDiffClient(url, timeout=timeout, tmpdir=self.tmpdir).auth_enabled()

    def requireClient(self):
        if self.client is None:
            raise ReportSegmentError("Connect to a FastTextDiff server first.")
        return self.client

    # ---------------------------------------------------------------- report attribute
    @staticmethod
    def setReport(volumeNode, text, validate=True):
        """Keep the report on the volume node (an attribute, saved with the scene)."""
        if volumeNode is None:
            raise ReportSegmentError("Select a volume first.")
        text = validate_report(text) if validate else normalize_report(text)
        volumeNode.SetAttribute(REPORT_ATTRIBUTE, text)
        return text

    @staticmethod
    def getReport(volumeNode):
        if volumeNode is None:
            return ""
        return volumeNode.GetAttribute(REPORT_ATTRIBUTE) or ""

    @staticmethod
    def imageIdForVolume(volumeNode):
        """The datastore id of the volume: the one it was uploaded/downloaded as, else derived
        from its name."""
        return volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE) or image_id_from_name(volumeNode.GetName())

    def saveReport(self, volumeNode, text=None):
        """Store the report on the node (``text`` when given) and, when the volume is in the
        server's datastore, there too. Returns the normalised text."""
        if text is not None:
            self.setReport(volumeNode, text)
        report = validate_report(self.getReport(volumeNode), self.requireClient().max_report_bytes)
        imageId = volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE)
        if imageId:
            self.client.set_report(imageId, report)
        return report

    # ---------------------------------------------------------------- volumes
    def loadVolume(self, path, name=None, labelmap=False):
        """Load an image file (NRRD, NIfTI, PNG, ...) as a volume node of the scene."""
        name = name or image_id_from_name(os.path.basename(path))
        if self.readable is not None:
            path = self.readable(path)
        return nodes.loadVolume(self.volumesLogic, path, name, labelmap=labelmap)

    def loadDatastoreImage(self, imageId, report=None, path=None):
        """Load an image of the server's datastore (downloaded unless ``path`` has it already) and
        fill in its stored report (or ``report`` when the caller has it). Returns the volume node."""
        client = self.requireClient()
        if path is None:
            # the file stays on disk (the volume's storage node points at it until the scene is saved)
            path = client.download_image(imageId, out_dir=tempfile.mkdtemp(dir=self.tmpdir))
        volume = self.loadVolume(path, imageId)
        volume.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        if report is None:
            report = client.get_report(imageId)
        volume.SetAttribute(REPORT_ATTRIBUTE, normalize_report(report))
        return volume

    def loadNextSample(self, strategy=keys.DEFAULT_STRATEGY):
        """Ask the server for the next image to label, load it with its report. Returns
        ``(volumeNode, sample)``."""
        sample = self.requireClient().next_sample(strategy, download=False)
        return self.loadDatastoreImage(sample.image_id, sample.report), sample

    # ---------------------------------------------------------------- upload / segment
    def uploadVolume(self, volumeNode):
        """Make sure the server has the volume and its current report; returns its image id.

        A volume that is in the datastore already (it came from there, or was uploaded before)
        only gets its report updated. Any other volume is uploaded under an id no image has yet,
        so nothing on the server is ever overwritten."""
        if volumeNode is None:
            raise ReportSegmentError("Select a volume first.")
        client = self.requireClient()
        report = validate_report(self.getReport(volumeNode), client.max_report_bytes)
        imageId = volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE)
        if imageId and client.image_exists(imageId):
            client.set_report(imageId, report)
            return imageId
        base = image_id_from_name(volumeNode.GetName())
        for attempt in range(UPLOAD_ATTEMPTS):
            imageId = client.unused_image_id(base)
            path = nodes.writeVolume(volumeNode, os.path.join(self.tmpdir, imageId + FILE_EXTENSION))
            try:
                imageId = client.upload_image(path, image_id=imageId, text=report)
                break
            except ReportSegmentError as exc:
                if exc.status != 409 or attempt == UPLOAD_ATTEMPTS - 1:
                    raise  # 409: someone uploaded under that id since we looked; take the next one
            finally:
                os.remove(path)
        volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        return imageId

    def requestSegmentation(self, imageId, report=None, model=keys.DEFAULT_MODEL):
        """Server side only (no scene access, safe off the UI thread): segment a datastore image
        with the report. Returns the client's SegmentationResult."""
        return self.requireClient().segment(
            imageId, text=report or None, model=model, out_dir=tempfile.mkdtemp(dir=self.tmpdir)
        )

    def segment(self, volumeNode, model=keys.DEFAULT_MODEL):
        """Upload (or update the report of) the volume, segment it with its report, and load the
        label as a segmentation and the uncertainty as an overlay. Returns
        ``(segmentationNode, uncertaintyNode or None, result)``."""
        imageId = self.uploadVolume(volumeNode)
        result = self.requestSegmentation(imageId, self.getReport(volumeNode), model)
        return self.importResult(volumeNode, result)

    def importResult(self, volumeNode, result):
        """Load a segmentation result into the scene on the volume's grid; deletes its files."""
        self.lastResult = result
        try:
            if not result.label_path:
                raise ReportSegmentError("The server returned no label image for this segmentation.")
            segmentation = self.importLabel(result.label_path, result.labels, volumeNode)
            uncertainty = None
            if result.uncertainty_path:
                uncertainty = self.importUncertainty(result.uncertainty_path, volumeNode)
        finally:
            shutil.rmtree(result.out_dir, ignore_errors=True)
        return segmentation, uncertainty, result

    def importLabel(self, labelPath, labels, volumeNode):
        """Load a label file as the volume's segmentation: one named segment per label, each in its
        own distinct colour (labels without voxels get an empty segment to paint into). The
        segments live on the volume's voxel grid; a label on another grid is refused."""
        labels = dict(labels or {})
        labelNode = self.loadVolume(labelPath, volumeNode.GetName() + " label", labelmap=True)
        try:
            self._checkSameGrid(labelNode, volumeNode, "label")
            if not labels:
                labels = {"label {}".format(value): value for value in nodes.labelValues(labelNode)}
            specs = segments_for_labels(labels)
            colorNode = nodes.labelColorTable(
                self.scene, volumeNode.GetName() + " labels", specs,
                volumeNode.GetNodeReference(LABEL_COLORS_REFERENCE)
            )
            volumeNode.SetNodeReferenceID(LABEL_COLORS_REFERENCE, colorNode.GetID())
            if labelNode.GetDisplayNode() is None:
                labelNode.CreateDefaultDisplayNodes()
            labelNode.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())

            segmentation = self.segmentationForVolume(volumeNode)
            if segmentation is None:
                segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode",
                                                            volumeNode.GetName() + " segmentation")
                segmentation.CreateDefaultDisplayNodes()
                volumeNode.SetNodeReferenceID(SEGMENTATION_REFERENCE, segmentation.GetID())
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentation.GetSegmentation().RemoveAllSegments()
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentation,
                                                                                             ""):
                raise ReportSegmentError("Slicer could not turn the label file into segments.")
            seg = segmentation.GetSegmentation()
            for spec in specs:
                segmentId = seg.GetSegmentIdBySegmentName(spec.name)
                if not segmentId:
                    segmentId = seg.AddEmptySegment(spec.name, spec.name, spec.color)
                seg.GetSegment(segmentId).SetColor(*spec.color)
            segmentation.SetAttribute(LABELS_ATTRIBUTE, json.dumps({s.name: s.value for s in specs}))
            return segmentation
        finally:
            self.scene.RemoveNode(labelNode)

    def importUncertainty(self, path, volumeNode, opacity=keys.DEFAULT_UNCERTAINTY_OPACITY):
        """Load the uncertainty map as a scalar volume shown as a heat overlay (foreground layer)
        over the image."""
        old = self.uncertaintyForVolume(volumeNode)
        if old is not None:
            self.scene.RemoveNode(old)
        node = self.loadVolume(path, volumeNode.GetName() + " uncertainty")
        try:
            self._checkSameGrid(node, volumeNode, "uncertainty map")
        except ReportSegmentError:
            self.scene.RemoveNode(node)
            raise
        nodes.showAsHeatOverlay(self.scene, node)
        volumeNode.SetNodeReferenceID(UNCERTAINTY_REFERENCE, node.GetID())
        nodes.setSliceLayers(self.scene, background=volumeNode, foreground=node, foregroundOpacity=opacity)
        return node

    def segmentationForVolume(self, volumeNode):
        if volumeNode is None:
            return None
        return volumeNode.GetNodeReference(SEGMENTATION_REFERENCE)

    def uncertaintyForVolume(self, volumeNode):
        if volumeNode is None:
            return None
        return volumeNode.GetNodeReference(UNCERTAINTY_REFERENCE)

    def segmentNames(self, volumeNode):
        segmentation = self.segmentationForVolume(volumeNode)
        if segmentation is None:
            return []
        seg = segmentation.GetSegmentation()
        return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]

    # ---------------------------------------------------------------- submit
    def exportLabelmap(self, segmentationNode, volumeNode, path):
        """Write the (edited) segments as one labelmap on the volume's grid. Segments keep the
        server's label values when their names match; new segments get the next values.
        Returns the specs written (name, value, colour)."""
        seg = segmentationNode.GetSegmentation()
        ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
        names = [seg.GetSegment(i).GetName() for i in ids]
        known = json.loads(segmentationNode.GetAttribute(LABELS_ATTRIBUTE) or "{}")
        specs = export_values(names, known)
        if not specs:
            raise ReportSegmentError("The segmentation has no segments to submit.")
        idByName = dict(zip(names, ids))
        segmentIds = vtk.vtkStringArray()
        for spec in specs:
            segmentIds.InsertNextValue(idByName[spec.name])
        colorNode = nodes.labelColorTable(self.scene, volumeNode.GetName() + " export labels", specs)
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentationNode, segmentIds, labelmap, volumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                colorNode
            )
            if not ok:
                raise ReportSegmentError("Slicer could not export the segments to a labelmap.")
            nodes.writeVolume(labelmap, path)
        finally:
            self.scene.RemoveNode(labelmap)
            self.scene.RemoveNode(colorNode)
        return specs

    def submitLabel(self, volumeNode, tag="final"):
        """Export the volume's segmentation and save it on the server as its final label."""
        if volumeNode is None:
            raise ReportSegmentError("Select a volume first.")
        segmentation = self.segmentationForVolume(volumeNode)
        if segmentation is None:
            raise ReportSegmentError("This volume has no segmentation yet: press Segment first.")
        imageId = self.uploadVolume(volumeNode)
        path = os.path.join(self.tmpdir, imageId + "_label" + FILE_EXTENSION)
        specs = self.exportLabelmap(segmentation, volumeNode, path)
        try:
            return self.requireClient().submit_label(imageId, path, tag=tag, label_info=label_info(specs))
        finally:
            os.remove(path)

    # ---------------------------------------------------------------- training
    def startTraining(self, model=keys.DEFAULT_MODEL, params=None):
        return self.requireClient().train(model, params or {})

    def trainProgress(self, model=keys.DEFAULT_MODEL):
        return self.requireClient().train_progress(model)

    def stopTraining(self):
        return self.requireClient().stop_train()

    # ---------------------------------------------------------------- internals
    @staticmethod
    def _checkSameGrid(node, volumeNode, what):
        dims = node.GetImageData().GetDimensions()
        volumeDims = volumeNode.GetImageData().GetDimensions()
        if not nodes.sameGrid(nodes.ijkToRas(node), dims, nodes.ijkToRas(volumeNode), volumeDims):
            raise ReportSegmentError(
                "The server's {} ({} voxels) is not on the grid of the volume {} ({} voxels); it was not "
                "loaded.".format(what, "x".join(map(str, dims)), volumeNode.GetName(), "x".join(map(str, volumeDims)))
            )


def _newVolumesLogic(scene):
    logic = slicer.vtkSlicerVolumesLogic()
    logic.SetMRMLScene(scene)
    return logic

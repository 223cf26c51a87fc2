"""ReportSegment: report-conditioned segmentation with a FastTextDiff MONAI Label server.

Attach the report text of a volume, send both to the server, load the segmentation (named,
coloured segments) and its uncertainty map, correct the segments, submit the label, train, and
ask for the next most uncertain image. All server talk and report handling lives in the
slicer-free ``ReportSegmentLib`` package; this file holds the Slicer glue only:

- ``ReportSegment``        module description
- ``ReportSegmentWidget``  UI wiring (thin)
- ``ReportSegmentLogic``   scene operations (report attribute, segmentation/uncertainty loading,
                           labelmap export), usable from the Python console without the widget
- ``ReportSegmentTest``    the end-to-end scenario inside Slicer, against the server named by
                           the ``FASTTEXTDIFF_SERVER_URL`` environment variable
"""

import json
import logging
import os
import shutil
import tempfile
import time
import traceback

import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ReportSegmentLib import (
    IMAGE_ID_ATTRIBUTE,
    REPORT_ATTRIBUTE,
    FastTextDiffClient,
    ReportSegmentError,
    describe_server,
    export_values,
    image_id_from_name,
    label_info,
    normalize_report,
    read_report_file,
    segments_for_labels,
    summarize_report,
    validate_report,
)
from ReportSegmentLib import settings as keys

#: Node reference roles (saved with the scene) from a volume to its result nodes.
SEGMENTATION_REFERENCE = "FastTextDiff.Segmentation"
UNCERTAINTY_REFERENCE = "FastTextDiff.Uncertainty"
LABEL_COLORS_REFERENCE = "FastTextDiff.LabelColors"
#: Attribute on the segmentation node: JSON {label name: value} of the server's result.
LABELS_ATTRIBUTE = "FastTextDiff.Labels"
#: Colour maps tried, in order, for the uncertainty overlay.
UNCERTAINTY_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)
FILE_EXTENSION = ".nrrd"


#
# ReportSegment
#


class ReportSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Report Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["FastTextDiff developers"]
        self.parent.helpText = """
Segment a volume with a FastTextDiff MONAI Label server, conditioned on the volume's report text.
Connect to the server, pick a volume, type or load its report, then Segment. Correct the result
in Segment Editor and Submit label; Train updates the model; Next sample brings the image the
model is least sure about. See docs/SLICER.md in the FastTextDiff repository.
"""
        self.parent.acknowledgementText = """
Built on MONAI Label (Project MONAI) and 3D Slicer. The segmentation method follows FastTextDiff
(Dhara &amp; Kumar) and TextDiff (Feng et al., MICCAI 2024).
"""


#
# ReportSegmentWidget
#


class ReportSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """UI wiring only: reads widgets, calls the logic, shows results and errors."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.ui = None
        self._currentVolume = None
        self._trainTimer = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/ReportSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = ReportSegmentLogic()

        settings = qt.QSettings()
        self.ui.serverUrlLineEdit.text = str(settings.value(keys.SERVER_URL_KEY, keys.DEFAULT_SERVER_URL))
        self.ui.trainProgressBar.setValue(0)
        self.ui.trainProgressBar.setVisible(False)

        self.ui.connectButton.connect("clicked(bool)", self.onConnect)
        self.ui.serverUrlLineEdit.connect("returnPressed()", self.onConnect)
        self.ui.volumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onVolumeChanged)
        self.ui.loadReportButton.connect("clicked(bool)", self.onLoadReport)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.nextSampleButton.connect("clicked(bool)", self.onNextSample)
        self.ui.submitLabelButton.connect("clicked(bool)", self.onSubmitLabel)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.stopTrainButton.connect("clicked(bool)", self.onStopTrain)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(keys.TRAIN_POLL_INTERVAL_MS)
        self._trainTimer.connect("timeout()", self.onPollTraining)

        self.onVolumeChanged(self.ui.volumeSelector.currentNode())
        self._updateButtons()

    def cleanup(self):
        if self._trainTimer is not None:
            self._trainTimer.stop()
        self.removeObservers()

    def exit(self):
        self._commitReport()

    def onSceneStartClose(self, caller, event):
        self._currentVolume = None

    # ---------------------------------------------------------------- helpers
    def _status(self, text, error=False):
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")
        if not error:
            slicer.util.showStatusMessage(text, 5000)

    def _run(self, what, func, *args):
        """Run an action with a wait cursor; turn a failure into one sentence on the status line
        (and a message box unless testing)."""
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            return func(*args)
        except ReportSegmentError as exc:
            self._status(str(exc), error=True)
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(str(exc), windowTitle=f"Report Segment: {what}")
        except Exception as exc:  # unexpected: keep the traceback for the details box
            logging.error(traceback.format_exc())
            message = f"{what} failed unexpectedly: {exc}"
            self._status(message, error=True)
            if not slicer.app.testingEnabled():
                slicer.util.errorDisplay(message, detailedText=traceback.format_exc())
        finally:
            slicer.app.restoreOverrideCursor()
            self._updateButtons()
        return None

    def _updateButtons(self):
        connected = self.logic is not None and self.logic.client is not None
        hasVolume = self.ui.volumeSelector.currentNode() is not None
        training = self._trainTimer is not None and self._trainTimer.isActive()
        self.ui.segmentButton.enabled = connected and hasVolume
        self.ui.submitLabelButton.enabled = (
            connected and hasVolume and self.logic.segmentationForVolume(self.ui.volumeSelector.currentNode()) is not None
        )
        self.ui.nextSampleButton.enabled = connected
        self.ui.trainButton.enabled = connected and not training
        self.ui.stopTrainButton.enabled = connected and training

    def _commitReport(self):
        """Store the text box on the current volume node (normalised)."""
        if self._currentVolume is None or self.ui is None:
            return
        text = self.ui.reportTextEdit.toPlainText()
        self.logic.setReport(self._currentVolume, normalize_report(text), validate=False)

    # ---------------------------------------------------------------- slots
    def onConnect(self):
        def connect():
            url = self.ui.serverUrlLineEdit.text
            timeout = float(qt.QSettings().value(keys.TIMEOUT_KEY, keys.DEFAULT_TIMEOUT_SECONDS))
            info = self.logic.connect(url, timeout)
            qt.QSettings().setValue(keys.SERVER_URL_KEY, self.logic.client.url)
            self.ui.serverUrlLineEdit.text = self.logic.client.url
            self.ui.serverInfoLabel.text = describe_server(info)
            self._status(f"Connected to {self.logic.client.url}.")
            if self.logic.client.is_training():  # started earlier or by someone else: follow it
                self.ui.trainProgressBar.setVisible(True)
                self._trainTimer.start()

        self._run("Connect", connect)

    def onVolumeChanged(self, node):
        self._commitReport()
        self._currentVolume = node
        self.ui.reportTextEdit.blockSignals(True)
        self.ui.reportTextEdit.setPlainText(self.logic.getReport(node) if node else "")
        self.ui.reportTextEdit.blockSignals(False)
        self._updateButtons()

    def onLoadReport(self):
        path = qt.QFileDialog.getOpenFileName(
            self.parent, "Load report text", "", "Text files (*.txt);;All files (*)"
        )
        if not path:
            return

        def load():
            text = read_report_file(path)
            self.ui.reportTextEdit.setPlainText(text)
            self._commitReport()
            self._status(f"Report loaded from {os.path.basename(path)}: {summarize_report(text)}")

        self._run("Load report", load)

    def onSegment(self):
        def segment():
            self._commitReport()
            volume = self.ui.volumeSelector.currentNode()
            self._status("Segmenting\u2026")
            slicer.app.processEvents()
            segmentation, uncertainty, result = self.logic.segment(volume)
            names = ", ".join(result.label_names) or "no labels"
            mean = result.uncertainty_mean
            self._status(
                f"Segmented {result.image_id}: {names}"
                + (f"; mean uncertainty {mean:.3f}." if mean is not None else ".")
            )

        self._run("Segment", segment)

    def onNextSample(self):
        def nextSample():
            self._commitReport()
            strategy = str(qt.QSettings().value(keys.STRATEGY_KEY, keys.DEFAULT_STRATEGY))
            volume, sample = self.logic.loadNextSample(strategy)
            self.ui.volumeSelector.setCurrentNode(volume)  # -> onVolumeChanged fills in the report
            self._status(f"Next sample ({strategy}): {sample.image_id} \u2014 {summarize_report(sample.report)}")

        self._run("Next sample", nextSample)

    def onSubmitLabel(self):
        def submit():
            self._commitReport()
            volume = self.ui.volumeSelector.currentNode()
            answer = self.logic.submitLabel(volume)
            self._status(f"Label saved for {answer.get('image', self.logic.imageIdForVolume(volume))}.")

        self._run("Submit label", submit)

    def onTrain(self):
        def train():
            self.logic.startTraining()
            self.ui.trainProgressBar.setVisible(True)
            self.ui.trainProgressBar.setValue(0)
            self._trainTimer.start()
            self._status("Training started on the server.")

        self._run("Train", train)

    def onStopTrain(self):
        def stop():
            self.logic.stopTraining()
            self._status("Training stop requested.")

        self._run("Stop training", stop)

    def onPollTraining(self):
        """QTimer slot: one short status request; the UI stays responsive between polls."""
        try:
            progress = self.logic.trainProgress()
        except ReportSegmentError as exc:
            self._trainTimer.stop()
            self._status(str(exc), error=True)
            self._updateButtons()
            return
        self.ui.trainProgressBar.setValue(progress.percent)
        self.ui.trainProgressBar.setToolTip(progress.message)
        self._status(progress.message, error=progress.state == "ERROR")
        if not progress.running:
            self._trainTimer.stop()
            self._updateButtons()


#
# ReportSegmentLogic
#


class ReportSegmentLogic(ScriptedLoadableModuleLogic):
    """Scene operations of the module. Works without the widget (Python console, tests)."""

    def __init__(self, client=None):
        ScriptedLoadableModuleLogic.__init__(self)
        self.client = client
        self.tmpdir = tempfile.mkdtemp(prefix="ReportSegment-")
        self.lastResult = None

    def __del__(self):
        shutil.rmtree(getattr(self, "tmpdir", ""), ignore_errors=True)

    # ---------------------------------------------------------------- server
    def connect(self, url, timeout=keys.DEFAULT_TIMEOUT_SECONDS):
        """Check the server answers ``/info/``; keep the client. Returns the info."""
        client = FastTextDiffClient(url, timeout=timeout, tmpdir=self.tmpdir)
        info = client.info()
        self.client = client
        return info

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

    # ---------------------------------------------------------------- upload / segment
    def uploadVolume(self, volumeNode):
        """Upload the volume with its report; when the server already has it (the volume came from
        the server, or was uploaded before), only the report is updated. Returns the image id."""
        if volumeNode is None:
            raise ReportSegmentError("Select a volume first.")
        client = self.requireClient()
        report = validate_report(self.getReport(volumeNode), client.max_report_bytes)
        imageId = volumeNode.GetAttribute(IMAGE_ID_ATTRIBUTE)
        if imageId and client.image_exists(imageId):
            client.set_report(imageId, report)
        else:
            # never uploaded from here: a fresh id, so another image of the same name is not touched
            imageId = client.unused_image_id(image_id_from_name(volumeNode.GetName()))
            path = os.path.join(self.tmpdir, imageId + FILE_EXTENSION)
            self._writeNode(volumeNode, path)
            imageId = client.upload_image(path, image_id=imageId, text=report)
            os.remove(path)
        volumeNode.SetAttribute(IMAGE_ID_ATTRIBUTE, imageId)
        return imageId

    def segment(self, volumeNode, model=keys.DEFAULT_MODEL):
        """Upload (or update the report of) the volume, segment it with its report, and load the
        label as a segmentation and the uncertainty as an overlay. Returns
        ``(segmentationNode, uncertaintyNode or None, result)``."""
        imageId = self.uploadVolume(volumeNode)
        report = self.getReport(volumeNode)
        result = self.requireClient().segment(
            imageId, text=report or None, model=model, out_dir=tempfile.mkdtemp(dir=self.tmpdir)
        )
        self.lastResult = result
        if not result.label_path:
            raise ReportSegmentError("The server returned no label image for this segmentation.")
        segmentation = self.loadSegmentation(result.label_path, result.labels, volumeNode)
        uncertainty = None
        if result.uncertainty_path:
            uncertainty = self.loadUncertainty(result.uncertainty_path, volumeNode)
        shutil.rmtree(result.out_dir, ignore_errors=True)
        return segmentation, uncertainty, result

    def loadSegmentation(self, labelPath, labels, volumeNode):
        """Load a label file as the volume's segmentation: one named segment per label, each in its
        own distinct colour (labels without voxels get an empty segment to paint into)."""
        labels = dict(labels or {})
        labelNode = slicer.util.loadLabelVolume(labelPath, {"show": False})
        if labelNode is None:
            raise ReportSegmentError(f"Slicer could not read the label file {os.path.basename(labelPath)}.")
        try:
            if not labels:
                values = self._labelValues(labelNode)
                labels = {f"label {value}": value for value in values}
            specs = segments_for_labels(labels)
            colorNode = self._colorTable(
                volumeNode.GetName() + " labels", specs, volumeNode.GetNodeReference(LABEL_COLORS_REFERENCE)
            )
            volumeNode.SetNodeReferenceID(LABEL_COLORS_REFERENCE, colorNode.GetID())
            labelNode.GetDisplayNode().SetAndObserveColorNodeID(colorNode.GetID())

            segmentation = self.segmentationForVolume(volumeNode)
            if segmentation is None:
                segmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", volumeNode.GetName() + " segmentation"
                )
                segmentation.CreateDefaultDisplayNodes()
                volumeNode.SetNodeReferenceID(SEGMENTATION_REFERENCE, segmentation.GetID())
            segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            segmentation.GetSegmentation().RemoveAllSegments()
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelNode, segmentation):
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
            slicer.mrmlScene.RemoveNode(labelNode)

    def loadUncertainty(self, path, volumeNode, opacity=keys.DEFAULT_UNCERTAINTY_OPACITY):
        """Load the uncertainty map as a scalar volume shown over the image (foreground layer)."""
        old = self.uncertaintyForVolume(volumeNode)
        if old is not None:
            slicer.mrmlScene.RemoveNode(old)
        node = slicer.util.loadVolume(path, {"show": False, "name": volumeNode.GetName() + " uncertainty"})
        if node is None:
            raise ReportSegmentError(f"Slicer could not read the uncertainty map {os.path.basename(path)}.")
        display = node.GetDisplayNode()
        for colorId in UNCERTAINTY_COLOR_NODE_IDS:
            if slicer.mrmlScene.GetNodeByID(colorId) is not None:
                display.SetAndObserveColorNodeID(colorId)
                break
        display.AutoWindowLevelOn()
        volumeNode.SetNodeReferenceID(UNCERTAINTY_REFERENCE, node.GetID())
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=node, foregroundOpacity=opacity)
        return node

    def segmentationForVolume(self, volumeNode):
        if volumeNode is None:
            return None
        return volumeNode.GetNodeReference(SEGMENTATION_REFERENCE)

    def uncertaintyForVolume(self, volumeNode):
        if volumeNode is None:
            return None
        return volumeNode.GetNodeReference(UNCERTAINTY_REFERENCE)

    # ---------------------------------------------------------------- next sample
    def loadNextSample(self, strategy=keys.DEFAULT_STRATEGY):
        """Ask the server for the next image, load it and fill in its report. Returns
        ``(volumeNode, sample)``."""
        # downloads stay on disk (outside the logic's temporary folder): the volume node's storage
        # node points at the file, and the scene may be saved later
        downloads = os.path.join(slicer.app.temporaryPath, "ReportSegment", "samples")
        sample = self.requireClient().next_sample(strategy, out_dir=tempfile.mkdtemp(dir=_makedirs(downloads)))
        volume = slicer.util.loadVolume(sample.image_path, {"name": sample.image_id})
        if volume is None:
            raise ReportSegmentError(f"Slicer could not read the image {sample.image_id} sent by the server.")
        volume.SetAttribute(IMAGE_ID_ATTRIBUTE, sample.image_id)
        volume.SetAttribute(REPORT_ATTRIBUTE, normalize_report(sample.report))
        if hasattr(volume, "StorableModified"):
            volume.StorableModified()  # offered in "Save data" like any new data
        slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)
        return volume, sample

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
        colorNode = self._colorTable(volumeNode.GetName() + " export labels", specs)
        labelmap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
        try:
            logic = slicer.vtkSlicerSegmentationsModuleLogic
            try:  # Slicer >= 5.0 takes the colour table and keeps our label values
                ok = logic.ExportSegmentsToLabelmapNode(
                    segmentationNode, segmentIds, labelmap, volumeNode, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colorNode
                )
            except TypeError:  # older Slicer: values 1..N in list order
                ok = logic.ExportSegmentsToLabelmapNode(segmentationNode, segmentIds, labelmap, volumeNode)
                specs = [spec._replace(value=index + 1) for index, spec in enumerate(specs)]
            if not ok:
                raise ReportSegmentError("Slicer could not export the segments to a labelmap.")
            self._writeNode(labelmap, path)
        finally:
            slicer.mrmlScene.RemoveNode(labelmap)
            slicer.mrmlScene.RemoveNode(colorNode)
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
    def _writeNode(node, path):
        """Write a node to a file without changing where the scene saves it."""
        writer = getattr(slicer.util, "exportNode", None)
        # a fresh properties dict each call: slicer.util's default one is shared between calls
        ok = writer(node, path, {}) if writer is not None else slicer.util.saveNode(node, path, {})
        if not ok or not os.path.isfile(path):
            raise ReportSegmentError(f"Slicer could not write {node.GetName()} to {os.path.basename(path)}.")

    @staticmethod
    def _colorTable(name, specs, colorNode=None):
        """A colour table naming and colouring each label value (reused when given)."""
        if colorNode is None:
            colorNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
            colorNode.SetTypeToUser()
            colorNode.SetHideFromEditors(True)
        count = max([spec.value for spec in specs] + [0]) + 1
        colorNode.SetNumberOfColors(count)
        colorNode.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value in range(1, count):
            colorNode.SetColor(value, f"unused {value}", 0.5, 0.5, 0.5, 0.0)
        for spec in specs:
            colorNode.SetColor(spec.value, spec.name, spec.color[0], spec.color[1], spec.color[2], 1.0)
        return colorNode

    @staticmethod
    def _labelValues(labelNode):
        low, high = labelNode.GetImageData().GetScalarRange()
        accumulate = vtk.vtkImageAccumulate()
        accumulate.SetInputData(labelNode.GetImageData())
        accumulate.SetComponentExtent(0, int(high) - int(low), 0, 0, 0, 0)
        accumulate.SetComponentOrigin(int(low), 0, 0)
        accumulate.SetComponentSpacing(1, 1, 1)
        accumulate.Update()
        counts = accumulate.GetOutput().GetPointData().GetScalars()
        return [int(low) + i for i in range(counts.GetNumberOfTuples()) if counts.GetTuple1(i) > 0 and int(low) + i != 0]


def _makedirs(path):
    os.makedirs(path, exist_ok=True)
    return path


#
# ReportSegmentTest
#


class ReportSegmentTest(ScriptedLoadableModuleTest):
    """Inside Slicer: ``Slicer --no-main-window --testing --python-code "import slicer; ..."`` or
    the Reload & Test button. The server scenario runs when FASTTEXTDIFF_SERVER_URL names a
    running FastTextDiff server; the scene tests always run."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_ReportSavedWithScene()
        self.setUp()
        self.test_ServerScenario()

    def _makeVolume(self, name="ReportSegmentTestVolume"):
        source = vtk.vtkImageEllipsoidSource()
        source.SetWholeExtent(0, 63, 0, 63, 0, 3)
        source.SetCenter(40, 24, 2)
        source.SetRadius(12, 9, 4)
        source.SetInValue(800)
        source.SetOutValue(50)
        source.SetOutputScalarTypeToShort()
        source.Update()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        volume.SetAndObserveImageData(source.GetOutput())
        volume.SetSpacing(1.0, 1.0, 2.0)
        volume.CreateDefaultDisplayNodes()
        return volume

    def test_ReportSavedWithScene(self):
        logic = ReportSegmentLogic()
        volume = self._makeVolume()
        stored = logic.setReport(volume, "Opacity in the right upper lobe.\r\n\r\n\r\nNo effusion.  ")
        self.assertEqual(stored, "Opacity in the right upper lobe.\n\nNo effusion.")
        self.assertEqual(logic.getReport(volume), stored)
        with self.assertRaises(ReportSegmentError):
            logic.setReport(volume, "x" * 70000)

        bundle = os.path.join(logic.tmpdir, "report-scene.mrb")
        self.assertTrue(slicer.util.saveScene(bundle))
        slicer.mrmlScene.Clear(0)
        slicer.util.loadScene(bundle)
        reloaded = slicer.util.getFirstNodeByName("ReportSegmentTestVolume")
        self.assertIsNotNone(reloaded)
        self.assertEqual(logic.getReport(reloaded), stored)
        self.delayDisplay("Report attribute is saved with the scene")

    def test_ServerScenario(self):
        url = os.environ.get(keys.TEST_SERVER_URL_ENV)
        if not url:
            self.delayDisplay(f"{keys.TEST_SERVER_URL_ENV} is not set: server scenario skipped")
            return
        logic = ReportSegmentLogic()
        info = logic.connect(url, timeout=600)
        self.assertIn("fasttextdiff", info.get("models", {}))

        volume = self._makeVolume("ReportSegmentTest_" + str(int(time.time())))
        report = "Single round opacity in the right upper region."
        logic.setReport(volume, report)
        imageId = logic.uploadVolume(volume)
        self.assertEqual(logic.client.get_report(imageId), report)

        segmentation, uncertainty, result = logic.segment(volume)
        seg = segmentation.GetSegmentation()
        names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
        self.assertEqual(sorted(names), sorted(result.label_names))
        colors = {tuple(round(c, 3) for c in seg.GetNthSegment(i).GetColor()) for i in range(seg.GetNumberOfSegments())}
        self.assertEqual(len(colors), len(names))
        if result.uncertainty_path:
            self.assertIsNotNone(uncertainty)
            self.assertEqual(uncertainty.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())

        answer = logic.submitLabel(volume)
        self.assertEqual(answer.get("image"), imageId)

        sampleVolume, sample = logic.loadNextSample("uncertainty")
        self.assertEqual(logic.getReport(sampleVolume), normalize_report(sample.report))
        self.assertNotEqual(sample.image_id, imageId)  # just labeled, so not offered again

        logic.startTraining(params={"max_epochs": 1})
        deadline = time.time() + 600
        progress = logic.trainProgress()
        while progress.running and time.time() < deadline:
            slicer.app.processEvents()
            time.sleep(2)
            progress = logic.trainProgress()
        self.assertEqual(progress.state, "DONE", progress.message)
        self.delayDisplay("Server scenario passed")

"""ReportSegment: report-conditioned segmentation with a FastTextDiff MONAI Label server.

Attach the report text of a volume, send both to the server, load the segmentation (named,
coloured segments) and its uncertainty map, correct the segments, submit the label, train, and
ask for the next most uncertain image. Server talk and report handling live in the slicer-free
``ReportSegmentLib`` package (standard library only); everything that touches the scene lives in
``ReportSegmentScene`` (MRML and logic classes only, no Qt: tested on slicer-core and reused by
the web viewer). This file holds the desktop glue only:

- ``ReportSegment``        module description
- ``ReportSegmentWidget``  UI wiring (thin)
- ``ReportSegmentLogic``   ``ReportSegmentScene``'s logic on ``slicer.mrmlScene``, usable from the
                           Python console without the widget
- ``ReportSegmentTest``    the end-to-end scenario inside Slicer, against the server named by
                           the ``FASTTEXTDIFF_SERVER_URL`` environment variable
"""

import logging
import os
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
    ReportSegmentError,
    describe_server,
    normalize_report,
    read_report_file,
    summarize_report,
)
from ReportSegmentLib import settings as keys
from ReportSegmentScene import ReportSegmentSceneLogic


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
            connected
            and hasVolume
            and self.logic.segmentationForVolume(self.ui.volumeSelector.currentNode()) is not None
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
            username = password = None
            if self.logic.serverNeedsLogin(url, timeout):  # MONAI Label authentication is on
                title = "Report Segment: log in"
                username = qt.QInputDialog.getText(self.parent, title, "User name on {}:".format(url))
                if not username:
                    return
                password = qt.QInputDialog.getText(self.parent, title, "Password:", qt.QLineEdit.Password)
            info = self.logic.connect(url, timeout, username, password)
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
        path = qt.QFileDialog.getOpenFileName(self.parent, "Load report text", "", "Text files (*.txt);;All files (*)")
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


class ReportSegmentLogic(ScriptedLoadableModuleLogic, ReportSegmentSceneLogic):
    """Desktop Slicer's logic: the MRML-only scene logic (``ReportSegmentScene``, also run by the web
    viewer and the tests on slicer-core) on ``slicer.mrmlScene`` with Slicer's volumes logic, plus
    the one view operation that needs the application (fitting the slice views)."""

    def __init__(self, client=None):
        ScriptedLoadableModuleLogic.__init__(self)
        # downloads stay on disk: a volume's storage node points at its file until the scene is saved
        tmpdir = os.path.join(slicer.app.temporaryPath, "ReportSegment")
        os.makedirs(tmpdir, exist_ok=True)
        ReportSegmentSceneLogic.__init__(self, slicer.mrmlScene, slicer.modules.volumes.logic(), client, tmpdir)

    def loadNextSample(self, strategy=keys.DEFAULT_STRATEGY):
        volume, sample = ReportSegmentSceneLogic.loadNextSample(self, strategy)
        if hasattr(volume, "StorableModified"):
            volume.StorableModified()  # offered in "Save data" like any new data
        slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)
        return volume, sample


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
        colors = {
            tuple(round(c, 3) for c in seg.GetNthSegment(i).GetColor()) for i in range(seg.GetNumberOfSegments())
        }
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

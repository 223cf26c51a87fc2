"""The trame web page of the annotation viewer: a side panel for the loop (server, images, report,
Segment, overlays, paint/erase, submit, next sample, training) next to Slicer slice views rendered
on the server (trame-slicer's remote-controlled views).

Everything the page loads comes from this server (trame, Vuetify, its icon font and Roboto are
served by the installed packages; the favicon is inline): no internet request at all.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import tempfile
import traceback
from pathlib import Path

from ReportSegmentLib import ReportSegmentError, summarize_report
from trame.app import TrameApp
from trame.app.file_upload import ClientFile
from trame.ui.vuetify3 import VAppLayout
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_slicer import module as trame_slicer_module
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition

from fasttextdiff.viewer import FAVICON
from fasttextdiff.viewer.session import BRUSH_RANGE, AnnotationSession, image_rows

logger = logging.getLogger(__name__)

TRAIN_POLL_SECONDS = 2.0
MODEL_POLL_SECONDS = 5.0
#: Slice views: one for a 2D image, axial + coronal + sagittal for a volume (no 3D view: software
#: rendering of a volume would cost more than it shows here).
LAYOUTS = {
    "image": Layout(LayoutDirection.Vertical, [ViewLayoutDefinition.axial_view()]),
    "volume": Layout(
        LayoutDirection.Horizontal,
        [
            ViewLayoutDefinition.axial_view(),
            Layout(LayoutDirection.Vertical,
                   [ViewLayoutDefinition.coronal_view(), ViewLayoutDefinition.sagittal_view()]),
        ],
    ),
}


def _favicon() -> str:
    return "data:image/png;base64," + base64.b64encode(FAVICON.read_bytes()).decode("ascii")


class AnnotationViewer(TrameApp):
    def __init__(self, server_url: str, timeout: float = 300.0, open_path: str | None = None,
                 credentials: dict | None = None, server=None):
        super().__init__(server)
        self.server.enable_module(trame_slicer_module)
        self.slicer_app = SlicerApp()
        register_rca_factories(self.slicer_app.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer_app.scene, self.slicer_app.view_manager, self.server)
        self.layout_manager.register_layout_dict(LAYOUTS)
        self.layout_manager.set_layout("volume")
        self.session = AnnotationSession(self.slicer_app, server_url, timeout, credentials)
        self.session.on_segmentation_changed(self._schedule_segment_refresh)
        self._open_path = open_path
        self._segment_refresh = None
        self._train_task = None
        self._model_task = None
        self._init_state(server_url)
        self._build_ui()
        self.ctrl.on_server_ready.add(lambda **_: asyncio.ensure_future(self._on_ready()))

    # ------------------------------------------------------------ state
    def _init_state(self, server_url: str) -> None:
        s = self.state
        s.trame__title = "FastTextDiff viewer"
        s.trame__favicon = _favicon()
        s.ftd_server_url = server_url
        s.ftd_server_line = "Not connected yet."
        s.ftd_connected = False
        s.ftd_images = []
        s.ftd_image_id = None
        s.ftd_volume_name = ""
        s.ftd_is_volume = False
        s.ftd_has_image = False
        s.ftd_views_fitted = False
        s.ftd_report = ""
        s.ftd_busy = False
        s.ftd_status = "Connecting…"
        s.ftd_status_error = False
        s.ftd_segments = []
        s.ftd_segment_count = 0
        s.ftd_segment_voxels = 0
        s.ftd_segment_summary = "No segmentation yet: press Segment."
        s.ftd_uncertainty = ""
        s.ftd_label_visible = True
        s.ftd_heat_visible = True
        s.ftd_heat_opacity = 0.5
        s.ftd_tool = "none"
        s.ftd_active_tool = "none"  # what the server-side editor has active (the page waits on it)
        s.ftd_brush = 6.0
        s.ftd_local_file = None
        s.ftd_strategy = "uncertainty"
        s.ftd_train_epochs = 5
        s.ftd_training = False
        s.ftd_train_percent = 0
        s.ftd_train_message = ""
        s.change("ftd_label_visible", "ftd_heat_visible", "ftd_heat_opacity")(self._on_overlays)
        s.change("ftd_tool", "ftd_brush")(self._on_tool)
        s.change("ftd_local_file")(self._on_local_file)

    def _status(self, text: str, error: bool = False) -> None:
        self.state.ftd_status = text
        self.state.ftd_status_error = error

    async def _guard(self, what: str, action) -> None:
        """Run one user action: busy flag, and one sentence on the status line when it fails."""
        with self.state:
            self.state.ftd_busy = True
        try:
            await action()
        except ReportSegmentError as exc:
            with self.state:
                self._status(str(exc), error=True)
        except Exception as exc:  # noqa: BLE001 - unexpected: keep the traceback in the log
            logger.error("%s failed:\n%s", what, traceback.format_exc())
            with self.state:
                self._status(f"{what} failed unexpectedly: {exc}", error=True)
        finally:
            with self.state:
                self.state.ftd_busy = False

    # ------------------------------------------------------------ server
    async def _on_ready(self):
        await self.connect()
        if self._open_path:
            path, self._open_path = self._open_path, None
            await self._guard("Open", lambda: self._open_local(path, Path(path).name))

    async def connect(self):
        async def action():
            line = await asyncio.to_thread(self.session.connect, self.state.ftd_server_url)
            with self.state:
                self.state.ftd_server_line = line
                self.state.ftd_server_url = self.session.server_url
                self.state.ftd_connected = True
                self._status(f"Connected to {self.session.server_url}. "
                             "Pick an image, open a file or ask for the next sample.")
            await self._refresh_images()
            progress = await asyncio.to_thread(self.session.train_progress)
            if progress.running:
                self._follow_training()
            if self._model_task is None or self._model_task.done():
                self._model_task = asyncio.ensure_future(self._watch_model_state())

        await self._guard("Connect", action)

    async def _watch_model_state(self):
        """While the server prepares its first model, refresh the server line every few seconds so
        the page shows when Segment becomes possible."""
        while (self.session.server_info.get("fasttextdiff") or {}).get("model", {}).get("state") == "preparing":
            await asyncio.sleep(MODEL_POLL_SECONDS)
            try:
                line = await asyncio.to_thread(self.session.describe_server)
            except ReportSegmentError:
                return
            with self.state:
                self.state.ftd_server_line = line

    async def _refresh_images(self):
        images = await asyncio.to_thread(self.session.list_images)
        line = await asyncio.to_thread(self.session.describe_server)
        with self.state:
            self.state.ftd_images = image_rows(images)
            self.state.ftd_server_line = line

    async def refresh_images(self):
        await self._guard("Refresh", self._refresh_images)

    # ------------------------------------------------------------ open
    async def open_image(self, image_id: str):
        async def action():
            with self.state:
                self._status(f"Opening {image_id}…")
            path = await asyncio.to_thread(self.session.download, image_id)
            self.session.open_datastore_image(image_id, path=path)
            self._after_open(f"Opened {image_id} from the server.")

        await self._guard("Open", action)

    async def next_sample(self):
        async def action():
            with self.state:
                self._status(f"Asking the '{self.state.ftd_strategy}' strategy for the next image…")
            sample = await asyncio.to_thread(self.session.pick_next, self.state.ftd_strategy)
            path = await asyncio.to_thread(self.session.download, sample.image_id)
            self.session.open_datastore_image(sample.image_id, path=path, report=sample.report)
            self._after_open(f"Next sample ({self.state.ftd_strategy}): {sample.image_id} — "
                             f"{summarize_report(sample.report)}")

        await self._guard("Next sample", action)

    def _on_local_file(self, ftd_local_file, **_):
        if not ftd_local_file:
            return
        files = ftd_local_file if isinstance(ftd_local_file, list) else [ftd_local_file]
        upload = ClientFile(files[0])
        if upload.is_empty:
            return
        folder = Path(tempfile.mkdtemp(dir=self.session.workdir.name))
        path = folder / Path(upload.name).name
        path.write_bytes(upload.content)
        self.state.ftd_local_file = None  # the same file can be opened again
        asyncio.ensure_future(self._guard("Open", lambda: self._open_local(str(path), upload.name)))

    async def _open_local(self, path: str, name: str):
        self.session.open_file(path)
        self._after_open(f"Opened {name} (a local file: Segment uploads it to the server under a new id).")

    def _after_open(self, message: str) -> None:
        current = self.session.current()
        self.layout_manager.set_layout("volume" if current.is_volume else "image")
        self.session.app.display_manager.reset_views()
        asyncio.ensure_future(self._fit_after_resize())
        with self.state:
            self.state.ftd_views_fitted = False
            self.state.ftd_has_image = True
            self.state.ftd_volume_name = current.name
            self.state.ftd_image_id = current.image_id
            self.state.ftd_is_volume = current.is_volume
            self.state.ftd_report = self.session.report
            self.state.ftd_tool = "none"
            self.state.ftd_uncertainty = ""
            self._show_segments()
            self._status(message)

    async def _fit_after_resize(self):
        """A layout change resizes the views in the browser a moment later: fit them again once it
        has (the page shows data-fitted on the views when done)."""
        for delay in (0.5, 1.0):
            await asyncio.sleep(delay)
            self.session.app.display_manager.reset_views()
        with self.state:
            self.state.ftd_views_fitted = True

    # ------------------------------------------------------------ report, segment
    async def save_report(self):
        async def action():
            self.session.set_report(self.state.ftd_report)  # on the node: UI thread
            image_id = self.session.current().image_id
            if image_id:
                await asyncio.to_thread(self.session.store_report, image_id, self.session.report)
                await self._refresh_images()
                message = "Report saved to the server's datastore."
            else:
                message = "Report kept with the image; it goes to the server with Segment."
            with self.state:
                self.state.ftd_report = self.session.report
                self._status(message)

        await self._guard("Save report", action)

    async def segment(self):
        async def action():
            with self.state:
                self.state.ftd_tool = "none"
                self._status("Sending the image and its report to the server…")
            report = self.session.set_report(self.state.ftd_report)
            image_id = self.session.upload()
            with self.state:
                self.state.ftd_image_id = image_id
                self._status(f"Segmenting {image_id} with its report…")
            result = await asyncio.to_thread(self.session.request_segmentation, image_id, report)
            current = self.session.show_result(result)
            self.session.set_overlays(self.state.ftd_label_visible, self.state.ftd_heat_visible,
                                      self.state.ftd_heat_opacity)
            with self.state:
                self._show_segments()
                mean = current.uncertainty_mean
                self.state.ftd_uncertainty = f"mean uncertainty {mean:.3f}" if mean is not None else ""
                names = ", ".join(result.label_names) or "no labels"
                self._status(f"Segmented {image_id}: {names}. Correct it with Paint/Erase, then Submit.")
            await self._refresh_images()

        await self._guard("Segment", action)

    def _show_segments(self) -> None:
        segments = self.session.segments()
        self.state.ftd_segments = [{"name": s.name, "color": s.color, "voxels": s.voxels} for s in segments]
        self.state.ftd_segment_count = len(segments)
        self.state.ftd_segment_voxels = sum(s.voxels for s in segments)
        if segments:
            noun = "segment" if len(segments) == 1 else "segments"
            self.state.ftd_segment_summary = f"{len(segments)} {noun}: " + ", ".join(
                f"{s.name} ({s.voxels} voxels)" for s in segments
            )
        else:
            self.state.ftd_segment_summary = "No segmentation yet: press Segment."

    def _schedule_segment_refresh(self, *_):
        """Edits fire many modified events: recount the voxels once they settle."""
        if self._segment_refresh is not None:
            return
        loop = asyncio.get_event_loop()

        def refresh():
            self._segment_refresh = None
            with self.state:
                self._show_segments()

        self._segment_refresh = loop.call_later(0.3, refresh)

    # ------------------------------------------------------------ overlays and tools
    def _on_overlays(self, ftd_label_visible, ftd_heat_visible, ftd_heat_opacity, **_):
        if self.session.volume is not None:
            self.session.set_overlays(ftd_label_visible, ftd_heat_visible, float(ftd_heat_opacity))

    def _on_tool(self, ftd_tool, ftd_brush, **_):
        if self.session.volume is None:
            return
        try:
            self.state.ftd_active_tool = self.session.set_tool(ftd_tool or "none", ftd_brush)
        except ReportSegmentError as exc:
            self.state.ftd_tool = self.state.ftd_active_tool = "none"
            self._status(str(exc), error=True)

    # ------------------------------------------------------------ submit
    async def submit(self):
        async def action():
            with self.state:
                self.state.ftd_tool = "none"
            image_id, path, info = self.session.export_label()
            with self.state:
                self.state.ftd_image_id = image_id
                self._status(f"Saving the label of {image_id}…")
            await asyncio.to_thread(self.session.submit, image_id, path, info)
            await self._refresh_images()
            with self.state:
                self._show_segments()
                self._status(f"Label saved for {image_id} as its final label. Next sample?")

        await self._guard("Submit", action)

    # ------------------------------------------------------------ training
    async def train(self):
        async def action():
            epochs = int(self.state.ftd_train_epochs or 0) or None
            await asyncio.to_thread(self.session.start_training, epochs)
            with self.state:
                self.state.ftd_train_message = "Training started on the server."
            self._follow_training()

        await self._guard("Train", action)

    async def stop_training(self):
        async def action():
            await asyncio.to_thread(self.session.stop_training)
            with self.state:
                self.state.ftd_train_message = "Training stop requested."

        await self._guard("Stop training", action)

    def _follow_training(self) -> None:
        if self._train_task is None or self._train_task.done():
            self._train_task = asyncio.ensure_future(self._poll_training())

    async def _poll_training(self):
        with self.state:
            self.state.ftd_training = True
        try:
            while True:
                try:
                    progress = await asyncio.to_thread(self.session.train_progress)
                except ReportSegmentError as exc:
                    with self.state:
                        self.state.ftd_train_message = str(exc)
                    return
                with self.state:
                    self.state.ftd_train_percent = progress.percent
                    self.state.ftd_train_message = progress.message
                if not progress.running:
                    return
                await asyncio.sleep(TRAIN_POLL_SECONDS)
        finally:
            with self.state:
                self.state.ftd_training = False

    # ------------------------------------------------------------ page
    def _section(self, title: str):
        card = v3.VCard(variant="tonal", classes="mb-3")
        with card:
            v3.VCardTitle(title, classes="text-subtitle-1 py-1")
        return card

    def _build_ui(self) -> None:
        with VAppLayout(self.server, theme="dark") as self.ui:
            with v3.VAppBar(density="compact", elevation=1):
                v3.VAppBarTitle("FastTextDiff · report-driven annotation")
                v3.VSpacer()
                html.Div("{{ ftd_server_line }}", id="ftd-server-line", classes="text-caption mr-4",
                         style="max-width: 60%; white-space: nowrap; overflow: hidden; text-overflow: ellipsis;")
            v3.VProgressLinear(indeterminate=True, v_show="ftd_busy", color="amber", height=3,
                               style="position: fixed; top: 48px; z-index: 2000;")
            with v3.VNavigationDrawer(permanent=True, width=430, location="left"):
                with html.Div(classes="pa-3"):
                    self._server_section()
                    self._images_section()
                    self._report_section()
                    self._result_section()
                    self._edit_section()
                    self._train_section()
            with v3.VMain():
                with html.Div(classes="d-flex flex-column", style="height: calc(100vh - 48px);"):
                    with html.Div(classes="px-3 py-1 text-body-2", id="ftd-status",
                                  style=("ftd_status_error ? 'color: #ff6b6b' : 'color: #c8e6c9'",)):
                        html.Span("{{ ftd_status }}")
                    with html.Div(classes="flex-grow-1 d-flex", style="position: relative; min-height: 0;",
                                  id="ftd-views", raw_attrs=[':data-fitted="ftd_views_fitted"']):
                        self.layout_manager.initialize_layout_grid(self.ui)

    def _server_section(self) -> None:
        with self._section("Server"):
            with v3.VCardText(classes="py-1"):
                with html.Div(classes="d-flex ga-2 align-center"):
                    v3.VTextField(v_model=("ftd_server_url",), density="compact", hide_details=True,
                                  label="FastTextDiff server URL", id="ftd-server-url")
                    v3.VBtn("Connect", click=self.connect, id="ftd-connect", disabled=("ftd_busy",), variant="flat",
                            color="primary")

    def _images_section(self) -> None:
        with self._section("Images"):
            with v3.VCardText(classes="py-1"):
                with html.Div(classes="d-flex ga-2 mb-2 align-center"):
                    v3.VBtn("Next sample", click=self.next_sample, id="ftd-next", color="primary", variant="flat",
                            disabled=("ftd_busy || !ftd_connected",), prepend_icon="mdi-skip-next")
                    v3.VSelect(v_model=("ftd_strategy",), items=("['uncertainty', 'random', 'first']",),
                               density="compact", hide_details=True, label="strategy", style="max-width: 150px;")
                    v3.VBtn(icon="mdi-refresh", click=self.refresh_images, density="compact", variant="text",
                            disabled=("ftd_busy || !ftd_connected",), id="ftd-refresh")
                with v3.VList(density="compact", id="ftd-image-list", style="max-height: 190px; overflow-y: auto;",
                              bg_color="transparent"):
                    with v3.VListItem(v_for="img in ftd_images", key="img.id", classes="ftd-image-item",
                                      click=(self.open_image, "[img.id]"), active=("img.id === ftd_image_id",),
                                      disabled=("ftd_busy",), raw_attrs=[':data-image-id="img.id"']):
                        v3.VListItemTitle("{{ img.id }}")
                        v3.VListItemSubtitle("{{ img.report }}")
                        with v3.Template(v_slot_append=True):
                            v3.VChip("{{ img.status }}", size="x-small", classes="ftd-image-status",
                                     color=("img.labeled ? 'green' : 'grey'",))
                    v3.VListItem(v_if="!ftd_images.length",
                                 title="The server's datastore is empty (or not connected).")
                v3.VFileInput(v_model=("ftd_local_file",), label="or open a local file (NIfTI, NRRD, PNG, ...)",
                              density="compact", hide_details=True, prepend_icon="mdi-folder-open",
                              id="ftd-open-file", disabled=("ftd_busy",), classes="mt-2")

    def _report_section(self) -> None:
        with self._section("Report"):
            with v3.VCardText(classes="py-1"):
                html.Div("{{ ftd_volume_name ? ftd_volume_name + (ftd_image_id ? ' · datastore id ' + ftd_image_id : "
                         "' · local file') : 'No image open.' }}", classes="text-caption mb-1", id="ftd-image-name")
                v3.VTextarea(v_model=("ftd_report",), rows=4, auto_grow=True, density="compact", hide_details=True,
                             label="Report for this image", id="ftd-report", disabled=("!ftd_has_image",))
                with html.Div(classes="d-flex ga-2 mt-2"):
                    v3.VBtn("Segment", click=self.segment, id="ftd-segment", color="primary", variant="flat",
                            prepend_icon="mdi-auto-fix", disabled=("ftd_busy || !ftd_has_image || !ftd_connected",))
                    v3.VBtn("Save report", click=self.save_report, id="ftd-save-report", variant="tonal",
                            disabled=("ftd_busy || !ftd_has_image",))

    def _result_section(self) -> None:
        with self._section("Segmentation"):
            with v3.VCardText(classes="py-1"):
                html.Div("{{ ftd_segment_summary }}", id="ftd-segment-count", classes="text-body-2",
                         raw_attrs=[':data-count="ftd_segment_count"', ':data-voxels="ftd_segment_voxels"'])
                with html.Div(classes="d-flex flex-wrap ga-1 my-1"):
                    v3.VChip("{{ seg.name }}", v_for="seg in ftd_segments", key="seg.name", size="small",
                             color=("seg.color",), variant="flat", classes="ftd-segment-chip")
                html.Div("{{ ftd_uncertainty }}", id="ftd-uncertainty", classes="text-caption")
                with html.Div(classes="d-flex ga-4 align-center"):
                    v3.VCheckbox(v_model=("ftd_label_visible",), label="label", density="compact", hide_details=True,
                                 id="ftd-label-visible")
                    v3.VCheckbox(v_model=("ftd_heat_visible",), label="uncertainty heat", density="compact",
                                 hide_details=True, id="ftd-heat-visible")
                v3.VSlider(v_model=("ftd_heat_opacity",), min=0, max=1, step=0.05, density="compact",
                           hide_details=True, label="heat opacity", disabled=("!ftd_heat_visible",))

    def _edit_section(self) -> None:
        with self._section("Correct and submit"):
            with v3.VCardText(classes="py-1"):
                with v3.VBtnToggle(v_model=("ftd_tool",), mandatory=True, density="compact", divided=True,
                                   variant="outlined", id="ftd-tools", disabled=("!ftd_segment_count || ftd_busy",),
                                   raw_attrs=[':data-active-tool="ftd_active_tool"']):
                    v3.VBtn("Navigate", value="none", prepend_icon="mdi-cursor-default", id="ftd-tool-none")
                    v3.VBtn("Paint", value="paint", prepend_icon="mdi-brush", id="ftd-tool-paint")
                    v3.VBtn("Erase", value="erase", prepend_icon="mdi-eraser", id="ftd-tool-erase")
                v3.VSlider(v_model=("ftd_brush",), min=BRUSH_RANGE[0], max=BRUSH_RANGE[1], step=0.5, density="compact",
                           hide_details=True, label="brush %", classes="mt-2", id="ftd-brush")
                v3.VBtn("Submit label", click=self.submit, id="ftd-submit", color="green", variant="flat",
                        prepend_icon="mdi-check", disabled=("ftd_busy || !ftd_segment_count",), classes="mt-1")

    def _train_section(self) -> None:
        with self._section("Training"):
            with v3.VCardText(classes="py-1"):
                with html.Div(classes="d-flex ga-2 align-center"):
                    v3.VTextField(v_model=("ftd_train_epochs",), type="number", label="epochs", density="compact",
                                  hide_details=True, style="max-width: 90px;", id="ftd-train-epochs")
                    v3.VBtn("Train", click=self.train, id="ftd-train", variant="flat", color="primary",
                            disabled=("ftd_busy || ftd_training || !ftd_connected",), prepend_icon="mdi-school")
                    v3.VBtn("Stop", click=self.stop_training, variant="tonal", disabled=("!ftd_training",),
                            id="ftd-train-stop")
                v3.VProgressLinear(model_value=("ftd_train_percent",), height=8, color="green", classes="mt-2",
                                   id="ftd-train-progress")
                html.Div("{{ ftd_train_message }}", id="ftd-train-message", classes="text-caption")

    # ------------------------------------------------------------ run
    def start(self, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.server.start(host=host, port=port, open_browser=False, timeout=0, show_connection_info=False)

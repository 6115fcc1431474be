"""The MuViT predict panel: segment the view, live while navigating, or the whole image.

A thin Qt view over :class:`~.state.PredictState`: the form is bound to the state, the work runs
in the worker functions of :mod:`.jobs`, and the output layers are managed by
:class:`~.outputs.ViewOutputs`.  What stays here is the main-thread side: reading the camera,
answering the jobs' handshake, and painting streamed tiles in time slices
(:class:`~._painting.PaintQueue`: in arrival order, a bounded time per slice, one refresh per
layer and slice, the event loop running in between) so that the viewer stays responsive
while tiles stream in.

Three modes:

* **Predict view** segments the part of the plane visible on the canvas.
* **Live** does that again (debounced) whenever the camera moves or the displayed plane
  changes.  Tiles already in the layer are not recomputed (and the engine's tile cache makes
  overlapping requests cheap); a newer view cancels an older request.  Each live view gets a
  time budget (estimated from the measured time per tile): the tiles nearest the centre are
  predicted first, the panel says how many are left, and one click on *Predict view* finishes
  them.  A view far beyond any budget (zoomed far out) is not started; the status says so and
  points to *Predict whole image*.  An explicit *Predict view* computes every visible tile,
  with progress and Cancel.  A request that is not started never clears the labels shown.
* **Whole image** writes a resumable OME-Zarr on disk (the engine's ``ZarrSink``) and shows it
  as a multiscale Labels layer that fills in as chunks complete, with a napari progress bar and
  a Cancel button.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_muvit.data.geometry import grid_cells
from napari_muvit.engine.points import is_detector
from napari_muvit.errors import CancelledError, IncompatibleModelError, InputError, MuViTError
from napari_muvit.widgets import _layers as L
from napari_muvit.widgets import _models as models
from napari_muvit.widgets._models import BUNDLED, FOLDER, SESSION, ModelChoice, registry
from napari_muvit.widgets._painting import PaintBatch, PaintQueue
from napari_muvit.widgets._workers import error_message, report_error, start_worker
from napari_muvit.widgets.base import DockPanel, Form, _alive, bind_label, compact, set_progress
from napari_muvit.widgets.base import plane_channels
from napari_muvit.widgets.jobs import (
    GUI_THREADS,
    Job,
    Loaded,
    ModelLoader,
    PointsFound,
    PredictorOptions,
    Ready,
    SinkReady,
    SourceCache,
    ViewRequest,
    image_job,
    load_job,
    view_job,
    with_channels,
)
from napari_muvit.widgets.outputs import ViewOutputs, add_store_layer, default_store_path
from napari_muvit.widgets.state import PredictState, remember_folder

log = logging.getLogger("napari_muvit.widgets")

LIVE_DEBOUNCE_MS = 300
# A live view needing more than this many times its budget is "zoomed far out": not started.
FAR_OUT_FACTOR = 10
# An explicit Predict view runs however many tiles a normal zoom needs; beyond this estimated
# time (a view of a whole slide) it points to Predict whole image instead.
EXPLICIT_MAX_S = 600.0
UNTIMED_TILE_S = 0.1  # a guess per tile before one was timed (bundled model on a laptop CPU)
# Coalesce full layer refreshes (multiscale and image layers re-read the visible region).
REFRESH_INTERVAL_MS = 80
# Streamed view results are painted in slices of at most about this long (one message may take
# longer: adding the output layer), with the event loop running between slices.  None paints
# every message as it arrives (the behaviour before time slicing; benchmarks/bench_ui.py
# compares both).
PAINT_SLICE_S: float | None = 0.015
IMAGE_REFRESH_INTERVAL_MS = 400
SETTLE_POLL_MS = 50  # how often deferred work that waits for a quiet panel asks again


class _Relay(QObject):
    """Carries whole-image progress from the worker thread to the main thread (queued).

    Created without a Qt parent and kept alive by its job: the worker may still report after
    the viewer (and with it this panel) was closed, and emitting from a deleted QObject
    crashes the process.
    """

    progressed = Signal(int, int)


class PredictWidget(DockPanel):
    """Dock widget: segment the view (once or live) or the whole image with a MuViT model.

    Scripting surface: :meth:`predict_view`, :meth:`predict_image` and :meth:`set_live` return
    the worker they started (``None`` when nothing was started; the reason is in
    :attr:`status`).  :meth:`cancel` stops everything.  :attr:`state` holds every choice and
    the running jobs (``state.view_job``, ``state.image_job``); :attr:`outputs` the layers.
    """

    STATE = PredictState
    state: PredictState
    _instances: ClassVar[weakref.WeakSet[PredictWidget]] = weakref.WeakSet()

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        self.loader = ModelLoader()
        self.sources = SourceCache()
        self._loaded_info: Loaded | None = None
        self._dirty_layers: dict[int, Any] = {}
        self._painter: PaintQueue | None = None
        self._unshown: set[Job] = set()  # view jobs whose end has not been painted yet
        self._deferred: deque[Any] = deque()  # GUI work for later turns (see _defer)
        self._last_image_refresh = 0.0
        self._progress_value: int | None = None
        # the image layer the user picked the current model for (None: remembered, recalled
        # for the image kind, or carried over from another image)
        self._picked_for: str | None = None
        super().__init__(napari_viewer, parent)
        self.outputs = ViewOutputs(self.viewer, defer=self._defer, settled=True)
        PredictWidget._instances.add(self)
        self._debounce = _timer(self, LIVE_DEBOUNCE_MS, self._on_live_timeout)
        self._refresh_timer = _timer(self, REFRESH_INTERVAL_MS, self._flush_refresh)
        self._painter = PaintQueue(self._apply_view_message, self._show_painted)
        self._paint_timer = _timer(self, 0, self._paint_slice)
        self._defer_timer = _timer(self, 0, self._run_deferred)
        st = self.state.events
        st.image.connect(self._on_image_changed)
        st.image.connect(self._update_source_ome)
        st.model.connect(self._on_model_changed)
        for name in ("device", "precision", "overlap"):
            getattr(st, name).connect(self._on_model_changed)
        # a remembered reduced precision is re-validated on this machine at the first load
        self._remembered_precision = (self.state.precision
                                      if self.state.precision in ("bf16", "fp16") else None)
        self._precision_notes: set[str] = set()
        st.precision.connect(self._on_precision_changed)
        st.threads.connect(self._on_threads_changed)
        self._on_threads_changed(self.state.threads)
        st.live.connect(self._on_live_changed)
        st.view_job.connect(self._update_buttons)
        st.image_job.connect(self._update_buttons)
        self._refresh_model_choices(select=self.state.model)
        self._on_model_changed()
        self._update_source_ome()

    @classmethod
    def instances(cls) -> list[PredictWidget]:
        """Open predict widgets (the train panel finds the one in its viewer)."""
        return [w for w in list(cls._instances) if w.alive]

    # ------------------------------------------------------------------------------ UI

    def build(self) -> None:
        layout = QVBoxLayout(self)
        layout.addLayout(self._build_model_form())
        layout.addWidget(self._build_options())
        layout.addWidget(self._build_view_box())
        layout.addWidget(self._build_image_box())
        layout.addLayout(self._build_progress_row())
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        bind_label(self.status_label, self.state, "status")
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _build_model_form(self) -> QFormLayout:
        form_layout = QFormLayout()
        form = Form(self.state, form_layout)
        self.image_combo = self.layer_choice("image", "image", prefer_active=True)
        self.image_combo.setToolTip("Image layer to segment (2-D, or the displayed plane of nD)")
        form_layout.addRow("Image", self.image_combo)
        self.model_combo = compact(QComboBox())
        self.model_combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.model_combo.setToolTip(
            "A MuViT segmenter: the bundled default, a folder saved by napari-muvit or the "
            "official muvit package, or a model being fine-tuned in this session"
        )
        self.model_combo.currentIndexChanged.connect(self._on_model_combo)
        self.browse_button = form.row_with_button(
            "Model", self.model_combo, "Folder…",
            "Choose a model: its folder's config.yaml, or a bioimage.io package (.zip)")
        self.browse_button.clicked.connect(self._browse_model)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip(
            "Write the selected model as a bioimage.io model package (.zip), with test tensors "
            "from the selected image")
        self.export_button.clicked.connect(lambda: self.export())
        form_layout.addRow(self.export_button)
        self.device_combo = form.combo("device", "Device")
        self.precision_combo = form.combo(
            "precision", "Precision",
            "auto: bf16/fp16 on GPUs that have it natively, float32 elsewhere. bf16 also speeds "
            "up CPUs with native bfloat16 (AVX512-BF16, AMX): 1.4x faster with the bundled model, "
            "99.998% of labels identical (docs/benchmarks.md); where it is emulated it is much "
            "slower and the panel warns. off: float32 everywhere")
        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        bind_label(self.model_info, self.state, "model_info")
        self.state.events.model_problem.connect(self._show_model_problem)
        form_layout.addRow(self.model_info)
        return form_layout

    def _build_options(self) -> QGroupBox:
        box = QGroupBox("Options")
        form = Form(self.state, QFormLayout(box))
        self.confidence_check = form.check("confidence", "Confidence layer (max class probability)")
        self.uncertainty_check = form.check(
            "uncertainty", "Uncertainty layer (where a stroke helps most)",
            "1 - the margin between the two most likely classes, in percent: bright where the "
            "model hesitates, i.e. where painting a few pixels teaches it the most")
        self.live_seconds_spin = form.spin(
            "live_seconds", "Live budget (s)", 1, 3600,
            "Live mode predicts what fits in this time (from the measured time per tile), "
            "centre first; Predict view finishes the rest")
        self.cap_spin = form.spin(
            "tile_cap", "Live tiles (untimed)", 1, 100000,
            "Live budget in tiles until the time per tile has been measured")
        self.threads_spin = form.spin(
            "threads", "Threads", 0, 256,
            "CPU threads for prediction and training together (auto: all cores but one, "
            "which stays with the viewer)", special="auto")
        self.overlap_spin = form.spin(
            "overlap", "Tile overlap", -1, 256,
            "Pixels shared by neighbouring tiles, blended so that tile borders leave no seams "
            "(auto: an eighth of the tile, a quarter for a forest head; 0: none, fastest)", special="auto")
        self.batch_spin = form.spin("batch_size", "Batch size", 0, 512, special="auto")
        return box

    def _build_view_box(self) -> QGroupBox:
        box = QGroupBox("View")
        row = QHBoxLayout(box)
        self.view_button = QPushButton("Predict view")
        self.view_button.setToolTip("Segment the part of the image visible on the canvas")
        self.view_button.clicked.connect(lambda: self.predict_view())
        self.live_check = Form(self.state).check(
            "live", "Live", "Re-predict whenever you pan, zoom or change the plane")
        row.addWidget(self.view_button)
        row.addWidget(self.live_check)
        return box

    def _build_image_box(self) -> QGroupBox:
        box = QGroupBox("Whole image")
        form = Form(self.state, QFormLayout(box))
        self.output_edit = Form(self.state).line(
            "output", "", "output .zarr (default: in the folder below)")
        self.output_button = form.row_with_button("Output", self.output_edit, "…")
        self.output_button.setMaximumWidth(32)
        self.output_button.clicked.connect(self._browse_output)
        self.overwrite_check = form.check("overwrite", "Overwrite an existing prediction")
        self.into_source_check = form.check(
            "into_source", "Write into the image's OME-Zarr (labels/…)",
            "Write the labels into the OME-Zarr the image came from, as labels/<name> (NGFF "
            "0.4/0.5); the image itself is not modified. Only for images opened from an OME-Zarr")
        self.labels_name_edit = form.line(
            "labels_name", "Labels name", "muvit", "Name of the label image inside the OME-Zarr")
        self.image_button = QPushButton("Predict whole image")
        self.image_button.setToolTip(
            "Segment the whole image (plane) into an OME-Zarr on disk; resumes an unfinished one")
        self.image_button.clicked.connect(lambda: self.predict_image())
        form.layout.addRow(self.image_button)
        return box

    def _build_progress_row(self) -> QHBoxLayout:
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        bar = self.progress
        self.state.events.progress.connect(_alive(bar, lambda p: set_progress(bar, *p)))
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        row = QHBoxLayout()
        row.addWidget(self.progress, 1)
        row.addWidget(self.cancel_button)
        return row

    # ------------------------------------------------------------------------------ state

    @property
    def image_layer(self) -> Any:
        """The selected image layer."""
        return self.layer("image")

    @image_layer.setter
    def image_layer(self, layer: Any) -> None:
        self.select_layer("image", layer)

    @property
    def live(self) -> bool:
        return self.state.live

    @property
    def running(self) -> bool:
        """Whether a job runs or its streamed results are not all painted yet (its end
        included: until then the status line may still change), or a new output layer is
        still being added in steps (see :meth:`_defer`)."""
        return (self.state.running or bool(self._unshown)
                or bool(self._painter is not None and self._painter.pending)
                or bool(self._deferred))

    busy = running

    @property
    def model_choice(self) -> ModelChoice:
        return self.state.model

    def set_model(self, model: str | Path | ModelChoice | None) -> None:
        """Select a model: ``None``/``"bundled"``, a folder, or a :class:`ModelChoice`."""
        if model is None or model == BUNDLED:
            choice = ModelChoice(BUNDLED)
        elif isinstance(model, ModelChoice):
            choice = model
        else:
            choice = ModelChoice(FOLDER, str(Path(model).expanduser().absolute()))
        self._picked_for = self.state.image
        self._refresh_model_choices(select=choice)

    @property
    def device(self) -> str:
        return self.state.device

    @property
    def predictor_options(self) -> PredictorOptions:
        """The panel's device, precision, overlap and batch size."""
        return PredictorOptions.of(self.state)

    def labels_layer(self, image: Any = None) -> Any:
        """The view-prediction Labels layer of ``image`` (default: the selected one)."""
        target = self.outputs.target(image or self.image_layer)
        return None if target is None else target.labels

    def points_layer(self, image: Any = None) -> Any:
        """The Points layer of a point detector's view predictions on ``image`` (default: the
        selected one), or None."""
        return self.outputs.points_layer(image or self.image_layer)

    def confidence_layer(self, image: Any = None) -> Any:
        target = self.outputs.target(image or self.image_layer)
        return None if target is None else target.confidence

    def uncertainty_layer(self, image: Any = None) -> Any:
        """The uncertainty layer of ``image``'s view predictions (None when off)."""
        target = self.outputs.target(image or self.image_layer)
        return None if target is None else target.uncertainty

    @property
    def predictor(self) -> Any:
        """The predictor of the last view job (for inspection: ``.stats``, ``.cache``)."""
        job = self.state.view_job
        if job is not None and job.loaded is not None:
            return job.loaded.predictor
        return None if self._loaded_info is None else self._loaded_info.predictor

    def follow_session(self, name: str | None) -> None:
        """Switch to fine-tuned model ``name`` at its first published snapshot."""
        self.state.follow_session = name

    # ------------------------------------------------------------------------------ viewer events

    def on_viewer_connected(self) -> None:
        v = self.viewer
        cam = L.camera(v)
        self._connect(cam.events.center, self._on_view_changed)
        self._connect(cam.events.zoom, self._on_view_changed)
        canvas = getattr(v, "canvas", None)
        if canvas is not None and hasattr(getattr(canvas, "events", None), "size"):
            self._connect(canvas.events.size, self._on_view_changed)
        self._connect(v.dims.events.current_step, self._on_view_changed)
        self._connect(v.dims.events.order, self._on_view_changed)
        self._connect(registry().updated, self._on_session_model)

    def on_layer_removed(self, layer: Any) -> None:
        for job in self.state.jobs():
            req = job.request
            if req is not None and req.layer is layer and job.running:
                job.cancel()
        self.sources.drop_layer(layer)
        self.outputs.forget(layer)

    def _on_image_changed(self, *_: Any) -> None:
        # A view job of the previous image keeps painting into *its* layer; only live mode
        # should follow the new selection.
        loaded = self._loaded_info
        if loaded is not None and loaded.choice == self.model_choice:
            self._check_fits(loaded)
        if self.live:
            self._debounce.start()

    def on_kind_recalled(self, kind: str, changed: list[str]) -> None:
        if "model" in changed:
            self._picked_for = None  # remembered for this kind, not picked for this image

    def _check_fits(self, loaded: Loaded) -> None:
        """A model the user did not pick for this image that cannot read its channels: the
        bundled model instead (with a note), before anything is predicted."""
        layer = self.image_layer
        if layer is None or self._picked_for == self.state.image or is_detector(loaded.model):
            return
        try:
            plane = with_channels(L.layer_plane(self.viewer, layer), loaded.model.in_channels)
        except MuViTError:
            return
        channels = plane_channels(layer, plane)
        if channels != loaded.model.in_channels:
            self._fall_back(loaded.choice, f"it expects {loaded.model.in_channels} channel(s), "
                                           f"'{layer.name}' has {channels}")

    def _fall_back(self, choice: ModelChoice, reason: str) -> bool:
        """Use the bundled model instead of ``choice`` (remembered, not picked for this image),
        which cannot run on the image; returns whether it did."""
        if (choice != self.model_choice or choice.kind in (BUNDLED, SESSION)
                or self._picked_for == self.state.image):
            return False
        self.state.model = ModelChoice(BUNDLED)
        self.set_status(f"remembered model {choice.label} not used ({reason}): using the "
                        "bundled model")
        return True

    def _on_view_changed(self, event: Any = None) -> None:
        if self.live:
            self._debounce.start()

    def _on_live_timeout(self) -> None:
        if self.live and self.alive:
            self._start_view(live=True)

    def _on_live_changed(self, on: bool) -> None:
        if self.alive:
            self._apply_live(on)

    # ------------------------------------------------------------------------------ models

    def _refresh_model_choices(self, select: ModelChoice | None = None) -> None:
        """Re-list the models and select ``select`` (reloading it when it is the same)."""
        select = select or self.model_choice
        self._list_models(select)
        if self.state.model == select:
            self._on_model_changed()  # the same choice again: reload (e.g. a changed folder)
        else:
            self.state.model = select

    def _list_models(self, select: ModelChoice) -> None:
        choices = [ModelChoice(BUNDLED)]
        choices += [ModelChoice(FOLDER, str(p)) for p in self.state.recent_models]
        choices += [ModelChoice(SESSION, name) for name in registry().names()]
        if select not in choices:
            choices.insert(1, select)
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for choice in choices:
            self.model_combo.addItem(choice.label, choice)
        self.model_combo.setCurrentIndex(choices.index(select))
        self.model_combo.blockSignals(False)

    def _on_model_combo(self, *_: Any) -> None:
        self._picked_for = self.state.image
        data = self.model_combo.currentData()
        self.state.model = data if isinstance(data, ModelChoice) else ModelChoice(BUNDLED)

    def _browse_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "MuViT model: config.yaml in its folder, or a bioimage.io package",
            "", "MuViT model (config.yaml *.zip)")
        if path:
            chosen = Path(path)
            self.set_model(chosen.parent if chosen.name == "config.yaml" else chosen)

    def export(self, out: str | Path | None = None) -> Any:
        """Export the selected model as a bioimage.io package (``out`` asked when None)."""
        choice = self.model_choice
        if choice.kind == SESSION:
            model: Any = registry().session_model(choice.value)
        else:
            model = None if choice.kind == BUNDLED else choice.value
        return self.export_model(model, out, layer=self.image_layer)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Whole-image prediction (OME-Zarr folder)", str(self._default_output()), "*.zarr"
        )
        if path:
            self.state.output = path if path.endswith(".zarr") else path + ".zarr"

    def _on_model_changed(self, *_: Any) -> None:
        if not self.alive:
            return
        choice = self.model_choice
        if self.model_combo.currentData() != choice:  # set from code: show it
            self._list_models(choice)
        self.state.recent_models = remember_folder(self.state.recent_models, choice)
        self._loaded_info = None
        if choice.kind == BUNDLED:
            try:
                models.bundled_segmenter_path()
            except MuViTError as err:
                self._model_problem(f"{err}. Choose a model folder with 'Folder…'.")
                return
        self.state.model_problem = False
        self.state.model_info = "loading model…"
        start_worker(
            load_job, self.loader, choice, self.predictor_options,
            lifeline=self.lifeline,
            on_return=self._on_model_loaded,
            on_error=lambda err, c=choice: self._on_model_error(c, err),
        )
        if self.live:
            self._debounce.start()

    def _on_model_loaded(self, loaded: Loaded) -> None:
        if loaded.choice != self.model_choice:
            return  # the user picked another model meanwhile
        self._loaded_info = loaded
        self.state.model_problem = False
        self.state.model_info = loaded.summary()
        self._note_precision(loaded)
        self._check_fits(loaded)

    def _note_precision(self, loaded: Loaded) -> None:
        """Warn (status + notification, once) when the chosen precision is emulated here; a
        remembered choice that is slow here falls back to auto instead of staying slow."""
        message = loaded.precision_warning
        if not message or loaded.options.precision != self.state.precision:
            return
        if self._remembered_precision == self.state.precision:
            self._remembered_precision = None
            text = f"remembered precision '{self.state.precision}' not used: {message}"
            self.state.precision = "auto"  # reloads the model in float32
        else:
            text = message
        self.set_status(text)
        if text not in self._precision_notes:
            self._precision_notes.add(text)
            from napari.utils.notifications import show_warning

            show_warning(text)

    def _on_precision_changed(self, value: str) -> None:
        if value != self._remembered_precision:
            self._remembered_precision = None  # the user chose: warn, but keep the choice

    def _on_threads_changed(self, value: int) -> None:
        GUI_THREADS.threads = int(value) or None
        if self._loaded_info is not None:
            self.state.model_info = self._loaded_info.summary()

    def _on_model_error(self, choice: ModelChoice, err: BaseException) -> None:
        if choice != self.model_choice:
            return
        self._model_problem(error_message(err))
        if choice.kind != BUNDLED:
            report_error(err, "MuViT model")

    def _model_problem(self, text: str) -> None:
        self.state.model_problem = True
        self.state.model_info = text

    def _show_model_problem(self, problem: bool) -> None:
        self.model_info.setStyleSheet("color: #e06c5a;" if problem else "")

    def _on_session_model(self, name: str) -> None:
        """A fine-tuning run published new weights: list the model, re-predict if shown.

        The registry is shared by every panel of the process and its signal stops at the first
        callback that raises, so a failure here (say, a panel whose window is gone) is logged,
        never raised: the other panels still get the snapshot.
        """
        if not self.alive:
            return
        try:
            self._follow_published(name)
        except Exception:  # noqa: BLE001 - see the docstring
            log.warning("predict panel: could not follow the published model %r", name,
                        exc_info=True)

    def _follow_published(self, name: str) -> None:
        current = self.model_choice
        listed = [self.model_combo.itemData(i) for i in range(self.model_combo.count())]
        if ModelChoice(SESSION, name) not in listed:
            self._refresh_model_choices(select=current)
        if self.state.follow_session == name:
            # first snapshot of the run this panel follows: switch to its model
            self.state.follow_session = None
            self.set_model(ModelChoice(SESSION, name))
            self.repredict(always=True)
        elif current == ModelChoice(SESSION, name):
            self._on_model_changed()
            # every training snapshot refreshes the view, predicted before or not: the user
            # watches the model improve from the first snapshot on (issue 13)
            self.repredict(always=True)

    def repredict(self, always: bool = False) -> Any:
        """Predict the view again after the model changed: live mode re-predicts (debounced);
        otherwise the view is re-predicted if it was predicted before, or ``always``."""
        if self.live:
            self._debounce.start()
            return None
        if always or self.labels_layer() is not None or self.points_layer() is not None:
            return self.predict_view()
        return None

    # ------------------------------------------------------------------------------ public API

    def predict_view(self) -> Any:
        """Segment the visible part of the selected image; returns the worker (or None)."""
        return self._start_view(live=False)

    def set_live(self, on: bool) -> Any:
        """Turn live prediction on/off; turning it on predicts the current view at once and
        returns that worker."""
        on = bool(on)
        if self.state.live == on:
            return self._apply_live(on)
        self._live_worker = None
        self.state.live = on  # -> _on_live_changed -> _apply_live
        return self._live_worker

    def _apply_live(self, on: bool) -> Any:
        if not on:
            self._debounce.stop()
            job = self.state.view_job
            if job is not None and job.request.live:
                job.cancel()
            self.set_status("live prediction off")
            return None
        self._live_worker = self._start_view(live=True)
        return self._live_worker

    def predict_image(self, out: str | Path | None = None) -> Any:
        """Segment the whole image (displayed plane) into an OME-Zarr at ``out`` (default: the
        Output field, else ``<output folder>/<layer>_muvit.zarr``); returns the worker."""
        try:
            req = self._request(live=False, whole=True)
        except MuViTError as err:
            report_error(err, "MuViT whole image")
            self.set_status(error_message(err))
            return None
        if self.state.image_job is not None and self.state.image_job.running:
            self.set_status("a whole-image prediction is already running (Cancel it first)")
            return None
        target = self._source_labels() if out is None else None
        if target is not None:
            path = target.path
        else:
            path = Path(out) if out is not None else Path(self.state.output or self._default_output())
            path = path.expanduser().absolute()
            self.state.output = str(path)
            self.state.output_dir = str(path.parent)
        job = Job("image", request=req, out_path=path, sink_target=target)
        relay = _Relay()  # no parent: it must outlive a closed panel (see _Relay)
        relay.progressed.connect(
            self.lifeline.guard(lambda d, t, j=job: self._on_image_progress(j, d, t)))
        job.relay = relay
        self.state.image_job = job
        job.worker = start_worker(
            image_job, job, self.loader, self.sources, relay.progressed.emit,
            self.state.overwrite,
            lifeline=self.lifeline,
            on_yield=lambda msg, j=job: self._on_image_message(j, msg),
            on_return=lambda complete, j=job: self._on_image_returned(j, complete),
            on_error=lambda err, j=job: self._on_job_error(j, err),
            on_finish=lambda j=job: self._on_image_finished(j),
        )
        self.set_status(f"whole image → {path}: loading model…")
        self._update_buttons()
        return job.worker

    def cancel(self) -> None:
        """Cancel every running job; tiles already shown/written stay valid."""
        for job in self.state.jobs():
            if job.running:
                job.cancel()
        self.set_status("cancelling…")

    # ------------------------------------------------------------------------------ view jobs

    def _request(self, live: bool, whole: bool = False) -> ViewRequest:
        layer = self.image_layer
        if layer is None:
            raise InputError("no image layer selected: add or select an image layer")
        plane = L.layer_plane(self.viewer, layer)
        if whole:
            region = np.array([[0, 0], plane.shape], dtype=np.float64)
        else:
            region = L.visible_bbox(self.viewer, layer, plane)
        return ViewRequest(
            layer=layer, plane=plane, region=region, choice=self.model_choice,
            options=self.predictor_options, probabilities=self.state.confidence, live=live,
            uncertainty=self.state.uncertainty,
        )

    def _start_view(self, live: bool) -> Any:
        try:
            req = self._request(live=live)
        except MuViTError as err:
            if not live:
                report_error(err, "MuViT predict view")
            self.set_status(error_message(err))
            return None
        if np.any(req.region[1] - req.region[0] < 1):
            self.set_status("the image is not visible on the canvas")
            return None
        previous = self.state.view_job
        if previous is not None and previous.running:
            previous.cancel()  # a newer view supersedes the older one
        else:
            previous = None
        job = Job("view", request=req)
        self._unshown.add(job)
        self.state.view_job = job
        job.worker = start_worker(
            view_job, job, self.loader, self.sources, previous,
            lifeline=self.lifeline,
            on_yield=lambda msg, j=job: self._queue_view(j, msg),
            on_error=lambda err, j=job: self._queue_view(j, _Failed(err)),
            on_finish=lambda j=job: self._queue_view(j, _FINISHED),
        )
        self.set_status("predicting view…" if not live else "live: predicting view…")
        self._update_buttons()
        return job.worker

    def _queue_view(self, job: Job, msg: Any) -> None:
        """A view job's message (handshake, tile, points, error, end) arrived: paint it in
        the next time slice, after everything that arrived before."""
        self._painter.push((job, msg))
        if PAINT_SLICE_S is None:
            self._paint_slice()
        elif not self._paint_timer.isActive():
            self._paint_timer.start()

    def _paint_slice(self) -> None:
        """Timer: apply queued view messages for up to :data:`PAINT_SLICE_S`, then yield."""
        if not self.alive:
            return
        try:
            self._painter.run(PAINT_SLICE_S)
        finally:
            if self._painter.pending and self.alive:
                self._paint_timer.start()  # the event loop runs before the next slice

    def _apply_view_message(self, item: tuple[Job, Any]) -> Any:
        job, msg = item
        if msg is _FINISHED:
            self._on_view_finished(job)
            return None
        if isinstance(msg, _Failed):
            self._on_job_error(job, msg.error)
            return None
        return self._on_view_message(job, msg)

    def _show_painted(self, batch: PaintBatch) -> None:
        """Refresh what one slice painted: the regions of each Labels layer in one upload,
        multiscale layers by the rate-limited refresh."""
        for layer, keys in batch.regions.values():
            if layer in self.viewer.layers:
                L.refresh_regions(layer, keys)
        for layer in batch.dirty.values():
            self._mark_dirty(layer)
        if self._progress_value is not None and not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _on_view_message(self, job: Job, msg: Any) -> Any:
        if isinstance(msg, Ready):
            self._on_view_ready(job, msg)
            return None
        if isinstance(msg, PointsFound):
            self._show_points(job, msg)
            return None
        if (job.token.cancelled and job.target is None) or job.budget_stop:
            return None  # not started, or the live budget is spent (the rest stays in the cache)
        return self._paint_tile(job, msg)

    def _on_view_ready(self, job: Job, ready: Ready) -> None:
        job.loaded, job.plane = ready.loaded, ready.plane
        if self.state.view_job is not job or job.token.cancelled:
            job.answer(False)
            return
        self._loaded_info = ready.loaded
        if job.request.choice == self.model_choice:
            self.state.model_problem = False
            self.state.model_info = ready.loaded.summary()
            self._note_precision(ready.loaded)
        if is_detector(ready.loaded.model):
            # a detector's points are decoded over the whole region, then shown at once
            pred = ready.loaded.predictor
            job.total = len(grid_cells(ready.region, pred.step))
            far = self._too_far(pred, job.total,
                                self._live_budget(pred) if job.request.live else None)
            if far is not None:
                self.set_status(far)  # nothing started: the points shown stay as they are
                job.answer(False)
                return
            self.state.progress = (0, job.total)
            self.set_status(f"detecting points in {job.total} tiles on {pred.device}…")
            job.answer(True)
            return
        before = self.outputs.target(job.request.layer)
        try:
            target = self.outputs.prepare(job.request.layer, ready.loaded, ready.plane,
                                          job.request.probabilities, job.request.uncertainty)
        except MuViTError as err:
            job.answer(False)
            self._on_job_error(job, err)
            return
        job.target = target
        pred = ready.loaded.predictor
        cells = grid_cells(ready.region, pred.step)
        key = ready.plane.key()
        new = [c for c in cells if (key, c) not in target.painted]
        job.total = len(new)
        live = "live: " if job.request.live else ""
        budget = self._live_budget(pred) if job.request.live else None
        far = self._too_far(pred, len(new), budget)
        if not new:
            self.set_status(f"view up to date ({len(cells)} tiles)")
        elif far is not None:
            self.set_status(far)  # nothing started: the labels shown stay as they are
        else:
            job.limit = budget if budget is not None and len(new) > budget else None
            self.state.progress = (0, job.limit or len(new))
            within = (f", the {job.limit} nearest the centre within the live budget"
                      if job.limit else "")
            self.set_status(
                f"{live}predicting {len(new)} tiles{within} ({len(cells) - len(new)} already "
                f"shown) on {pred.device}…"
            )
        go = bool(new) and far is None
        if go and (before is None or before.labels is not target.labels):
            self._answer_when_shown(job, target.labels)
        else:
            job.answer(go)

    def _answer_when_shown(self, job: Job, layer: Any, turns: int = 8) -> None:
        """Let the worker start its tiles once the new output ``layer`` is shown (its visual
        built and first drawn, a few turns of the event loop): napari's work on it then does
        not compete with the worker for the GIL, which made it the first prediction's longest
        stall.  At most ``turns`` turns, whatever happens to the layer."""
        def answer(left: int = turns) -> None:
            if (left <= 0 or not L.first_draw_pending(layer) or layer not in self.viewer.layers
                    or job.token.cancelled or not self.alive):
                job.answer(True)
            else:
                self._defer(lambda: answer(left - 1))

        self._defer(answer)

    def _live_budget(self, pred: Any) -> int:
        """New tiles one live view may compute: what fits in the time budget at the measured
        time per tile (the tile count setting until a tile has been timed)."""
        fit = pred.tiles_within(float(self.state.live_seconds))
        return max(1, int(self.state.tile_cap if fit is None else fit))

    def _too_far(self, pred: Any, new: int, budget: int | None) -> str | None:
        """Why a view is not started (zoomed far out), or None."""
        if budget is not None:  # live: far beyond the budget
            if new <= FAR_OUT_FACTOR * budget:
                return None
            return (f"zoomed out too far for live prediction: this view needs {new} new tiles"
                    f"{_eta(pred, new)}. Zoom in, click 'Predict view' to compute them all "
                    "(with progress and Cancel), or use 'Predict whole image'")
        seconds = None if pred.seconds_per_tile is None else new * pred.seconds_per_tile
        if (seconds if seconds is not None else new * UNTIMED_TILE_S) <= EXPLICIT_MAX_S:
            return None
        return (f"zoomed out too far: this view needs {new} new tiles{_eta(pred, new)}, more "
                f"than {EXPLICIT_MAX_S // 60:.0f} min; zoom in, or use 'Predict whole image' "
                "(written to disk, resumable)")

    def _show_points(self, job: Job, found: PointsFound) -> None:
        if self.state.view_job is not job or job.token.cancelled:
            return
        layer = job.request.layer
        if layer not in self.viewer.layers:
            return
        self.outputs.show_points(layer, job.loaded, job.plane, found.table, found.region)
        job.painted = job.total
        self.state.progress = (job.total, job.total)

    def _paint_tile(self, job: Job, res: Any) -> Any:
        """Write one tile into its layers; returns what to refresh (shown once per slice)."""
        target = job.target
        if not self.outputs.is_current(target):
            return None  # the output was replaced (model switch) or removed
        result = self.outputs.paint(target, job.plane, res)
        if not result.painted:
            return None
        job.painted += 1
        if job.limit is not None and job.painted >= job.limit and not job.token.cancelled:
            job.budget_stop = True  # the live budget is spent: stop within one batch
            job.token.cancel()
        self._progress_value = job.painted  # shown by the coalescing refresh timer
        return result

    def _mark_dirty(self, layer: Any) -> None:
        if layer is None:
            return
        self._dirty_layers[id(layer)] = layer
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _flush_refresh(self) -> None:
        if self._progress_value is not None:
            done, total = self._progress_value, self.state.progress[1]
            self.state.progress = (done, total)
            self._progress_value = None
        layers, self._dirty_layers = self._dirty_layers, {}
        for layer in layers.values():
            if layer in self.viewer.layers:
                L.refresh_data(layer)

    def _on_view_finished(self, job: Job) -> None:
        job.done.set()
        self._unshown.discard(job)
        if job.target is not None and job.painted:
            self._flush_refresh()
        if self.state.view_job is job:
            if job.budget_stop:
                left = max(0, job.total - job.painted)
                pred = job.loaded.predictor if job.loaded is not None else None
                self.set_status(
                    f"live: {job.painted} of {job.total} new tiles (centre first) within the "
                    f"{self.state.live_seconds} s budget; {left} left"
                    f"{_eta(pred, left) if pred is not None else ''}: click 'Predict view' to "
                    "finish them"
                )
            elif job.token.cancelled:
                if job.proceed:
                    self.set_status(f"view cancelled after {job.painted}/{job.total} tiles")
            elif job.proceed:
                dt = time.perf_counter() - job.started
                self.set_status(
                    f"{'live: ' if job.request.live else ''}view done: {job.painted} tiles in "
                    f"{dt:.1f} s"
                )
        self._update_buttons()

    def _on_job_error(self, job: Job, err: BaseException) -> None:
        if isinstance(err, CancelledError) or job.token.cancelled:
            return
        if isinstance(err, IncompatibleModelError) and (
                job.request.choice != self.model_choice  # replaced meanwhile (e.g. fallback)
                or self._fall_back(job.request.choice, str(err).split(";")[0])):
            if job.kind == "view" and not job.request.live:
                self.predict_view()  # live mode re-predicts on the model change by itself
            return
        context = "MuViT whole image" if job.kind == "image" else "MuViT predict view"
        if job.kind == "view" and job.request is not None and job.request.live and self.live:
            # Every camera move would fail the same way: stop live mode, say it once.
            self.set_live(False)
            context = "MuViT live prediction stopped"
        report_error(err, context)
        self.set_status(f"error: {error_message(err)}")

    # ------------------------------------------------------------------------------ whole image

    def _default_output(self) -> Path:
        return default_store_path(self.image_layer, self.state.output_dir)

    def _source_labels(self) -> Any:
        """Where *Write into the image's OME-Zarr* writes (None: off, or not an OME-Zarr)."""
        from napari_muvit.engine.ome_labels import DEFAULT_LABELS_NAME, SourceLabels

        if not (self.state.into_source and self.state.source_ome):
            return None
        name = self.state.labels_name.strip() or DEFAULT_LABELS_NAME
        return SourceLabels(Path(self.state.source_ome), name)

    def _update_source_ome(self, *_: Any) -> None:
        """Offer *Write into the image's OME-Zarr* only for a layer read from an OME-Zarr."""
        from napari_muvit.engine.ome_labels import ome_image_of

        layer = self.image_layer
        source = getattr(getattr(layer, "source", None), "path", None)
        image = ome_image_of(source)
        self.state.source_ome = "" if image is None else str(image)
        if self.alive:
            for control in (self.into_source_check, self.labels_name_edit):
                control.setEnabled(image is not None)
            self.into_source_check.setToolTip(
                f"Write the labels into {image} as labels/<name> (NGFF 0.4/0.5); the image "
                "itself is not modified" if image is not None
                else "Only for an image opened from an OME-Zarr (NGFF 0.4 or 0.5)")

    def _on_image_message(self, job: Job, msg: Any) -> None:
        if not isinstance(msg, SinkReady):
            return
        job.loaded, job.plane, job.sink = msg.loaded, msg.plane, msg.sink
        if job.token.cancelled:
            job.answer(False)
            return
        image = job.request.layer
        job.target = add_store_layer(self.viewer, image, msg.plane, msg.sink, msg.loaded.model,
                                     job.out_path, colormap=msg.loaded.colormap,
                                     defer=self._defer, settled=True)
        job.total = msg.remaining
        self.state.progress = (0, max(1, msg.remaining))
        resumed = " (resuming)" if getattr(msg.sink, "resumed", False) else ""
        self.set_status(
            f"whole image{resumed}: {msg.remaining} tiles to compute → {job.out_path}"
        )
        job.answer(True)
        # napari's activity-dock progress bar costs about as much as adding the layer: in the
        # next turn of the event loop, so that the two do not add up to one long stall
        self._defer(lambda: self._add_progress_bar(job))

    def _defer(self, callback: Any, settled: bool = False) -> None:
        """Run ``callback`` in a later turn of the event loop: deferred callbacks run one per
        turn, in order, so that long pieces of GUI work do not add up to one stall; with
        ``settled``, only once no job runs or paints (the others go first meanwhile)."""
        self._deferred.append((callback, settled))
        if not self._defer_timer.isActive():
            self._defer_timer.start(0)

    def _run_deferred(self) -> None:
        if not self.alive or not self._deferred:
            return
        quiet = self._settled()
        ready = next((i for i, (_, wants) in enumerate(self._deferred) if quiet or not wants),
                     None)
        try:
            if ready is not None:
                callback, _ = self._deferred[ready]
                del self._deferred[ready]
                callback()
        finally:
            if self._deferred and self.alive:
                waiting = all(wants for _, wants in self._deferred) and not self._settled()
                self._defer_timer.start(SETTLE_POLL_MS if waiting else 0)

    def _settled(self) -> bool:
        """No job runs and everything it sent is painted."""
        return not (self.state.running or self._unshown
                    or (self._painter is not None and self._painter.pending))

    def _add_progress_bar(self, job: Job) -> None:
        if not self.alive or not job.running or job.progress_bar is not None:
            return
        from napari.utils import progress

        job.progress_bar = progress(total=max(1, job.total),
                                    desc=f"MuViT {job.request.layer.name}")
        job.progress_bar.update(job.painted)

    def _on_image_progress(self, job: Job, done: int, total: int) -> None:
        job.painted = done
        now = time.perf_counter()
        # The zarr chunks on disk change as tiles complete; re-reading the visible region and
        # updating napari's progress bar (which repaints synchronously) a few times per second
        # is enough to watch it fill in.
        if now - self._last_image_refresh < IMAGE_REFRESH_INTERVAL_MS / 1000 and done < total:
            return
        self._last_image_refresh = now
        if job.progress_bar is not None:
            job.progress_bar.update(done - job.progress_bar.n)
        self.state.progress = (done, max(1, total))
        if job.target is not None:
            self._mark_dirty(job.target)

    def _on_image_returned(self, job: Job, complete: Any) -> None:
        dt = time.perf_counter() - job.started
        if complete:
            self.set_status(f"whole image done in {dt:.1f} s → {job.out_path}")

    def _on_image_finished(self, job: Job) -> None:
        job.done.set()
        if job.progress_bar is not None:
            job.progress_bar.close()
            job.progress_bar = None
        if job.target is not None and job.target in self.viewer.layers:
            job.target.refresh()
        if job.token.cancelled and job.proceed:
            self.set_status(
                f"whole image cancelled after {job.painted}/{job.total} tiles; run it again to "
                f"resume ({job.out_path})"
            )
        self._update_buttons()

    # ------------------------------------------------------------------------------ lifecycle

    def _update_buttons(self, *_: Any) -> None:
        if self.alive:
            self.cancel_button.setEnabled(self.running)

    def on_closing(self) -> None:
        self._debounce.stop()
        self._refresh_timer.stop()
        self._paint_timer.stop()
        self._defer_timer.stop()
        # finish what was deferred (a new layer's overlays must not stay hidden); what needs
        # the panel (the progress bar) checks that it is alive
        while self._deferred:
            try:
                self._deferred.popleft()[0]()
            except Exception as err:  # noqa: BLE001 - best effort at teardown
                log.debug("deferred GUI work at teardown failed: %s", err)


class _Failed:
    """A view job's error, queued behind its tiles (reported in order)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


_FINISHED = object()  # a view job's end, queued behind its tiles


def _eta(pred: Any, tiles: int) -> str:
    """`` (about 2 min here)`` from the measured time per tile, or ``""`` before timing."""
    if pred is None or pred.seconds_per_tile is None or tiles <= 0:
        return ""
    seconds = tiles * pred.seconds_per_tile
    text = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return f" (about {text} here)"


def _timer(parent: QObject, interval_ms: int, callback: Any) -> QTimer:
    timer = QTimer(parent)
    timer.setSingleShot(True)
    timer.setInterval(interval_ms)
    timer.timeout.connect(callback)
    return timer

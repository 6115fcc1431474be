"""The MuViT predict dock widget: segment the view, live while navigating, or the whole image.

The widget is thin: it reads the selected layer and the camera, starts workers that run the
engine (:class:`~napari_muvit.engine.predict.Predictor`) and paints the tiles they yield into
napari layers in the main thread.  The per-tile main-thread work is a slice assignment into the
output array plus a partial refresh of that region (see :mod:`._layers`), so the event loop
stays responsive while tiles stream in.

Three modes:

* **Predict view** segments the part of the plane visible on the canvas.
* **Live** does that again (debounced) whenever the camera moves or the displayed plane
  changes.  Tiles already in the layer are not recomputed (and the engine's tile cache makes
  overlapping requests cheap); a newer view cancels an older request; a view that needs more
  new tiles than the cap is refused with a status message instead of grinding.
* **Whole image** writes a resumable OME-Zarr on disk (the engine's ``ZarrSink``) and shows it
  as a multiscale Labels layer that fills in as chunks complete, with a napari progress bar and
  a Cancel button.

Every job is a generator running in a worker thread.  It first loads the model (cached) and
yields a *ready* message; the main thread creates or updates the output layer and answers with
go / no-go (e.g. too many tiles) through a handshake, then tile results stream in.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import dask.array as da
import numpy as np
from qtpy.QtCore import QEvent, QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.device import AMP_CHOICES
from napari_muvit.engine.predict import Predictor, create_zarr_sink
from napari_muvit.errors import CancelledError, InputError, MuViTError
from napari_muvit.widgets import _layers as L
from napari_muvit.widgets._models import (
    BUNDLED,
    FOLDER,
    SESSION,
    ModelChoice,
    bundled_segmenter_path,
    describe,
    load_segmenter,
    registry,
)
from napari_muvit.widgets._settings import load_section, save_section
from napari_muvit.widgets._workers import Lifeline, error_message, report_error, start_worker

if TYPE_CHECKING:  # pragma: no cover
    import napari
    from napari.layers import Image

log = logging.getLogger("napari_muvit.widgets")

SETTINGS_SECTION = "predict"
DEFAULTS: dict[str, Any] = {
    "model": "bundled:",
    "recent_models": [],
    "device": "auto",
    "precision": "auto",
    "confidence": False,
    "tile_cap": 64,
    "overlap": 0,
    "batch_size": 0,
    "output_dir": str(Path.home() / "napari-muvit"),
    "overwrite": False,
}
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = AMP_CHOICES
LIVE_DEBOUNCE_MS = 300
# Coalesce full layer refreshes (multiscale and image layers re-read the visible region).
REFRESH_INTERVAL_MS = 80
IMAGE_REFRESH_INTERVAL_MS = 400
MAX_RECENT = 6


# ---------------------------------------------------------------------------------------------
# worker-side objects (no Qt widgets are touched from worker threads)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictorOptions:
    """How the widget runs a model (the panel's device, precision, overlap and batch)."""

    device: str = "auto"
    precision: str = "auto"
    overlap: int = 0
    batch_size: int = 0  # 0 = automatic

    def make(self, model: Any, **overrides: Any) -> Any:
        """A :class:`Predictor` of ``model`` with these options (``overrides`` win)."""
        kwargs: dict[str, Any] = dict(device=self.device, amp=self.precision,
                                      overlap=self.overlap, batch_size=self.batch_size or None)
        return Predictor(model, **{**kwargs, **overrides})


@dataclass
class Loaded:
    """A segmenter with its predictor, as the widget uses it."""

    choice: ModelChoice
    version: int
    model: Any
    predictor: Any
    options: PredictorOptions

    @property
    def identity(self) -> tuple:
        """What tiles painted into a layer depend on (model, its weights version, tiling,
        precision)."""
        p = self.predictor
        return (self.choice, self.version, id(self.model), p.tile_size, p.overlap, p.amp_dtype)

    def summary(self) -> str:
        return describe(self.model, self.predictor.device, self.predictor.tile_size)


class ModelLoader:
    """Thread-safe cache of loaded models and their predictors (one load per model)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple, Any] = {}
        self._loaded: dict[tuple, Loaded] = {}

    def get(self, choice: ModelChoice, options: PredictorOptions) -> Loaded:
        with self._lock:
            version = registry().session_version(choice.value) if choice.kind == SESSION else 0
            mkey = (choice, version)
            model = self._models.get(mkey)
            if model is None:
                model = load_segmenter(choice)
                # Keep the few most recent models only: each can be hundreds of MB.
                while len(self._models) >= 3:
                    self._models.pop(next(iter(self._models)))
                self._models[mkey] = model
            pkey = (mkey, options)
            loaded = self._loaded.get(pkey)
            if loaded is None:
                loaded = Loaded(choice, version, model, options.make(model), options)
                while len(self._loaded) >= 4:
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[pkey] = loaded
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._loaded.clear()


class SourceCache:
    """One :class:`PyramidSource` per (layer data, plane): the engine's tile cache is keyed by
    the source object, so reusing it is what makes re-visiting a region free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[tuple, tuple[Any, Any]] = {}

    def get(self, layer: Image, plane: L.LayerPlane) -> Any:
        key = (id(layer), plane.key(), plane.rgb)
        data = layer.data
        with self._lock:
            hit = self._sources.get(key)
            if hit is not None and hit[0] is data:
                return hit[1]
        source = L.plane_source(layer, plane)
        with self._lock:
            self._sources[key] = (data, source)
        return source

    def drop_layer(self, layer: Any) -> None:
        with self._lock:
            for key in [k for k in self._sources if k[0] == id(layer)]:
                del self._sources[key]


def with_channels(plane: L.LayerPlane, in_channels: int) -> L.LayerPlane:
    """The plane with its leading axis read as channels when the model wants that many."""
    if plane.channel_axis is not None or plane.rgb or in_channels <= 1:
        return plane
    shape0 = plane.level_shapes[0]
    if plane.ndim >= 3 and 0 not in plane.displayed and shape0[0] == in_channels:
        index = {a: i for a, i in plane.index.items() if a != 0}
        return replace(plane, channel_axis=0, index=index)
    return plane


@dataclass
class ViewRequest:
    """Everything a view job needs, captured in the main thread."""

    layer: Any
    plane: L.LayerPlane
    region: np.ndarray
    choice: ModelChoice
    options: PredictorOptions
    probabilities: bool
    live: bool


@dataclass
class Job:
    """A running job: its worker, cancel token and the main-thread handshake."""

    kind: str  # "view" | "image"
    token: CancelToken = field(default_factory=CancelToken)
    go: threading.Event = field(default_factory=threading.Event)
    proceed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    worker: Any = None
    request: Any = None
    loaded: Loaded | None = None
    plane: L.LayerPlane | None = None
    target: Any = None
    total: int = 0
    painted: int = 0
    started: float = field(default_factory=time.perf_counter)
    progress_bar: Any = None
    sink: Any = None
    output: Any = None
    out_path: Path | None = None

    def cancel(self) -> None:
        # Only the token: the engine stops within one batch and the generator's ``finally``
        # runs.  (``worker.quit()`` would stop superqt's loop *without* closing the
        # generator, so its cleanup would wait for garbage collection.)
        self.token.cancel()
        self.go.set()  # release a worker waiting for the handshake


@dataclass
class Ready:
    """Yielded by a job once the model is loaded and the source is open."""

    loaded: Loaded
    plane: L.LayerPlane
    source: Any
    region: np.ndarray


@dataclass
class SinkReady:
    """Yielded by a whole-image job once its zarr store exists."""

    loaded: Loaded
    plane: L.LayerPlane
    sink: Any
    remaining: int


def _wait_go(job: Job) -> bool:
    """Block the worker until the main thread answered the Ready handshake."""
    while not job.go.wait(0.05):
        if job.token.cancelled:
            return False
    return job.proceed and not job.token.cancelled


def view_job(
    job: Job, loader: ModelLoader, sources: SourceCache, previous: Job | None
) -> Iterator[Any]:
    """Worker: load the model, hand over, then stream the view's tiles."""
    req: ViewRequest = job.request
    try:
        loaded = loader.get(req.choice, req.options)
        plane = with_channels(req.plane, loaded.model.in_channels)
        source = sources.get(req.layer, plane)
        loaded.predictor.check_source(source)
        # Whole tile cells only: a tile computed for a clipped core would leave its cell half
        # empty, and the next view would have to recompute it to fill the rest.
        region = cell_region(req.region, loaded.predictor.step, plane.shape)
        yield Ready(loaded, plane, source, region)
        if not _wait_go(job):
            return
        if previous is not None:
            # The superseded job stops within one batch; waiting keeps the predictor (and its
            # cache) single-threaded.
            while not previous.done.wait(0.05):
                if job.token.cancelled:
                    return
        yield from loaded.predictor.iter_tiles(
            source, region=region, cancel=job.token, probabilities=req.probabilities
        )
    finally:
        job.done.set()


class _Relay(QObject):
    """Carries progress from a worker thread to the main thread (queued signal)."""

    progressed = Signal(int, int)


def image_job(
    job: Job, loader: ModelLoader, sources: SourceCache, relay: _Relay, overwrite: bool
) -> Iterator[Any]:
    """Worker: predict the whole plane into a resumable OME-Zarr store."""
    req: ViewRequest = job.request
    try:
        loaded = loader.get(req.choice, req.options)
        plane = with_channels(req.plane, loaded.model.in_channels)
        source = sources.get(req.layer, plane)
        base = loaded.predictor
        # A separate predictor without tile cache: whole-image tiles are visited once, and
        # this job must not share mutable state with a concurrent live view.
        pred = req.options.make(loaded.model, device=base.device, batch_size=base.batch_size,
                                tile_size=base.tile_size, cache_tiles=0)
        pred.check_source(source)
        sink = create_zarr_sink(
            pred, source, job.out_path, probabilities=req.probabilities, overwrite=overwrite
        )
        remaining = sink.remaining()
        yield SinkReady(loaded, plane, sink, remaining)
        if not _wait_go(job):
            sink.close(complete=False)
            return
        pred.predict(
            source,
            sink=sink,
            progress=lambda done, total, _msg: relay.progressed.emit(int(done), int(total)),
            cancel=job.token,
        )
        return sink.complete
    finally:
        job.done.set()


# ---------------------------------------------------------------------------------------------
# output layers of view predictions
# ---------------------------------------------------------------------------------------------


@dataclass
class ViewTarget:
    """The output layers of view predictions for one image layer."""

    image: Any
    identity: tuple
    labels: Any
    confidence: Any = None
    label_levels: list[Any] = field(default_factory=list)
    conf_levels: list[Any] | None = None
    painted: set[tuple] = field(default_factory=set)
    label_values: list[int] = field(default_factory=list)
    style: tuple = ()
    writers: dict[tuple, tuple[L.LevelWriter, L.LevelWriter | None]] = field(default_factory=dict)

    def writer(self, plane: L.LayerPlane) -> tuple[L.LevelWriter, L.LevelWriter | None]:
        key = plane.key()
        hit = self.writers.get(key)
        if hit is None:
            conf = None if self.conf_levels is None else L.LevelWriter(plane, self.conf_levels)
            hit = (L.LevelWriter(plane, self.label_levels), conf)
            self.writers[key] = hit
        return hit


# ---------------------------------------------------------------------------------------------
# the widget
# ---------------------------------------------------------------------------------------------


class PredictWidget(QWidget):
    """Dock widget: segment the view (once or live) or the whole image with a MuViT model.

    Scripting surface: :meth:`predict_view`, :meth:`predict_image` and :meth:`set_live` return
    the worker they started (``None`` when nothing was started; the reason is in
    :attr:`status`).  :meth:`cancel` stops everything.
    """

    _instances: ClassVar[weakref.WeakSet[PredictWidget]] = weakref.WeakSet()

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = L.unwrap(napari_viewer)
        self._lifeline = Lifeline()
        # set by a TrainWidget of the same viewer: switch to its model at the first snapshot
        self._pending_session: str | None = None
        PredictWidget._instances.add(self)
        self._settings = load_section(SETTINGS_SECTION, DEFAULTS)
        self._loader = ModelLoader()
        self._sources = SourceCache()
        self._targets: dict[int, ViewTarget] = {}
        # Jobs live in a dict (not attributes) so the destroyed-handler can reach them
        # without holding a reference to the widget.
        self._job_box: dict[str, Job | None] = {"view": None, "image": None}
        self._info_worker: Any = None
        self._loaded_info: Loaded | None = None
        self._connections: list[tuple[Any, Callable]] = []
        self._dirty: set[int] = set()
        self._dirty_layers: dict[int, Any] = {}
        self._last_image_refresh = 0.0
        self._progress_value: int | None = None
        self.live = False
        self._build_ui()
        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(LIVE_DEBOUNCE_MS)
        self._debounce.timeout.connect(self._on_live_timeout)
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(REFRESH_INTERVAL_MS)
        self._refresh_timer.timeout.connect(self._flush_refresh)
        self._connect_viewer()
        self._refresh_layer_choices()
        self._refresh_model_choices(select=ModelChoice.from_setting(self._settings["model"]))
        # Cleanup must run even if only the C++ side is destroyed (viewer closed): use a
        # closure that holds the lifeline and jobs, not ``self``.
        lifeline, box = self._lifeline, self._job_box
        self.destroyed.connect(lambda *_: _shutdown(lifeline, [j for j in box.values() if j]))
        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is not None:
            self._close_filter = _CloseFilter(self._on_viewer_closing)
            window.installEventFilter(self._close_filter)

    @classmethod
    def instances(cls) -> list[PredictWidget]:
        """Open predict widgets (the train panel finds the one in its viewer)."""
        return [w for w in list(cls._instances) if w._lifeline.alive]

    # ------------------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        s = self._settings
        layout = QVBoxLayout(self)
        form = QFormLayout()
        self.image_combo = QComboBox()
        _compact(self.image_combo)
        self.image_combo.setToolTip("Image layer to segment (2-D, or the displayed plane of nD)")
        form.addRow("Image", self.image_combo)

        model_row = QHBoxLayout()
        self.model_combo = QComboBox()
        _compact(self.model_combo)
        self.model_combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.model_combo.setToolTip(
            "A MuViT segmenter: the bundled default, a folder saved by napari-muvit or the "
            "official muvit package, or a model being fine-tuned in this session"
        )
        self.browse_button = QPushButton("Folder…")
        self.browse_button.setToolTip("Choose a model folder (the one holding config.yaml)")
        model_row.addWidget(self.model_combo, 1)
        model_row.addWidget(self.browse_button)
        form.addRow("Model", model_row)

        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setCurrentText(s["device"] if s["device"] in DEVICES else "auto")
        form.addRow("Device", self.device_combo)
        self.precision_combo = QComboBox()
        self.precision_combo.addItems(PRECISIONS)
        self.precision_combo.setCurrentText(
            s["precision"] if s["precision"] in PRECISIONS else "auto")
        self.precision_combo.setToolTip(
            "auto: bf16/fp16 on CUDA, float32 elsewhere. bf16 also speeds up CPUs with native "
            "bfloat16 (AVX512-BF16, AMX): 1.4x faster with the bundled model, 99.998% of labels "
            "identical (docs/benchmarks.md); elsewhere it is slower. off: float32 everywhere"
        )
        form.addRow("Precision", self.precision_combo)

        self.model_info = QLabel("")
        self.model_info.setWordWrap(True)
        self.model_info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        form.addRow(self.model_info)
        layout.addLayout(form)

        options = QGroupBox("Options")
        oform = QFormLayout(options)
        self.confidence_check = QCheckBox("Confidence layer (max class probability)")
        self.confidence_check.setChecked(bool(s["confidence"]))
        oform.addRow(self.confidence_check)
        self.cap_spin = QSpinBox()
        self.cap_spin.setRange(1, 100000)
        self.cap_spin.setValue(int(s["tile_cap"]))
        self.cap_spin.setToolTip(
            "Most new tiles one view prediction may compute; zoom in (or use Whole image) "
            "when the view needs more"
        )
        oform.addRow("Tile cap (view)", self.cap_spin)
        self.overlap_spin = QSpinBox()
        self.overlap_spin.setRange(0, 256)
        self.overlap_spin.setValue(int(s["overlap"]))
        self.overlap_spin.setToolTip("Pixels shared by neighbouring tiles (blended; removes seams)")
        oform.addRow("Tile overlap", self.overlap_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(0, 512)
        self.batch_spin.setSpecialValueText("auto")
        self.batch_spin.setValue(int(s["batch_size"]))
        oform.addRow("Batch size", self.batch_spin)
        layout.addWidget(options)

        view_box = QGroupBox("View")
        vrow = QHBoxLayout(view_box)
        self.view_button = QPushButton("Predict view")
        self.view_button.setToolTip("Segment the part of the image visible on the canvas")
        self.live_check = QCheckBox("Live")
        self.live_check.setToolTip("Re-predict whenever you pan, zoom or change the plane")
        vrow.addWidget(self.view_button)
        vrow.addWidget(self.live_check)
        layout.addWidget(view_box)

        image_box = QGroupBox("Whole image")
        iform = QFormLayout(image_box)
        out_row = QHBoxLayout()
        self.output_edit = QLineEdit()
        self.output_edit.setPlaceholderText("output .zarr (default: in the folder below)")
        self.output_button = QPushButton("…")
        self.output_button.setMaximumWidth(32)
        out_row.addWidget(self.output_edit, 1)
        out_row.addWidget(self.output_button)
        iform.addRow("Output", out_row)
        self.overwrite_check = QCheckBox("Overwrite an existing prediction")
        self.overwrite_check.setChecked(bool(s["overwrite"]))
        iform.addRow(self.overwrite_check)
        self.image_button = QPushButton("Predict whole image")
        self.image_button.setToolTip(
            "Segment the whole image (plane) into an OME-Zarr on disk; resumes an unfinished one"
        )
        iform.addRow(self.image_button)
        layout.addWidget(image_box)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        prow = QHBoxLayout()
        prow.addWidget(self.progress, 1)
        prow.addWidget(self.cancel_button)
        layout.addLayout(prow)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.view_button.clicked.connect(lambda: self.predict_view())
        self.live_check.toggled.connect(self._on_live_toggled)
        self.image_button.clicked.connect(lambda: self.predict_image())
        self.cancel_button.clicked.connect(self.cancel)
        self.browse_button.clicked.connect(self._browse_model)
        self.output_button.clicked.connect(self._browse_output)
        self.model_combo.currentIndexChanged.connect(self._on_model_changed)
        self.device_combo.currentTextChanged.connect(self._on_model_changed)
        self.precision_combo.currentTextChanged.connect(self._on_model_changed)
        self.overlap_spin.valueChanged.connect(self._on_model_changed)
        self.batch_spin.valueChanged.connect(lambda *_: self._save_settings())
        self.confidence_check.toggled.connect(lambda *_: self._save_settings())
        self.cap_spin.valueChanged.connect(lambda *_: self._save_settings())
        self.overwrite_check.toggled.connect(lambda *_: self._save_settings())
        self.image_combo.currentIndexChanged.connect(self._on_image_changed)

    # ------------------------------------------------------------------------------ state

    @property
    def status(self) -> str:
        """The text of the status line (what the widget last reported)."""
        return self.status_label.text()

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    def _set_progress(self, value: int, maximum: int | None = None) -> None:
        """Update the progress bar without QProgressBar's synchronous ``repaint()``.

        ``QProgressBar.setValue`` repaints immediately whenever the shown percentage changes,
        which flushes the whole window including the OpenGL canvas (tens of ms per tile);
        with updates disabled during the change the repaint is scheduled instead.
        """
        bar = self.progress
        bar.setUpdatesEnabled(False)
        try:
            if maximum is not None:
                bar.setRange(0, max(1, int(maximum)))
            bar.setValue(min(int(value), bar.maximum()))
        finally:
            bar.setUpdatesEnabled(True)

    @property
    def image_layer(self) -> Image | None:
        """The selected image layer."""
        name = self.image_combo.currentData()
        if name is None:
            return None
        for layer in self.viewer.layers:
            if layer.name == name and _is_image(layer):
                return layer
        return None

    @image_layer.setter
    def image_layer(self, layer: Image) -> None:
        index = self.image_combo.findData(layer.name)
        if index < 0:
            raise InputError(f"layer {layer.name!r} is not an image layer of this viewer")
        self.image_combo.setCurrentIndex(index)

    @property
    def model_choice(self) -> ModelChoice:
        data = self.model_combo.currentData()
        return data if isinstance(data, ModelChoice) else ModelChoice(BUNDLED)

    def set_model(self, model: str | Path | ModelChoice | None) -> None:
        """Select a model: ``None``/``"bundled"``, a folder, or a :class:`ModelChoice`."""
        if model is None or model == BUNDLED:
            choice = ModelChoice(BUNDLED)
        elif isinstance(model, ModelChoice):
            choice = model
        else:
            choice = ModelChoice(FOLDER, str(Path(model).expanduser().absolute()))
        self._refresh_model_choices(select=choice)

    @property
    def device(self) -> str:
        return self.device_combo.currentText()

    @property
    def predictor_options(self) -> PredictorOptions:
        """The panel's device, precision, overlap and batch size."""
        return PredictorOptions(self.device, self.precision_combo.currentText(),
                                self.overlap_spin.value(), self.batch_spin.value())

    def labels_layer(self, image: Image | None = None) -> Any:
        """The view-prediction Labels layer of ``image`` (default: the selected one)."""
        image = image or self.image_layer
        target = None if image is None else self._targets.get(id(image))
        return None if target is None else target.labels

    def confidence_layer(self, image: Image | None = None) -> Any:
        image = image or self.image_layer
        target = None if image is None else self._targets.get(id(image))
        return None if target is None else target.confidence

    @property
    def predictor(self) -> Any:
        """The predictor of the last view job (for inspection: ``.stats``, ``.cache``)."""
        job = self._view_job
        if job is not None and job.loaded is not None:
            return job.loaded.predictor
        return None if self._loaded_info is None else self._loaded_info.predictor

    @property
    def _view_job(self) -> Job | None:
        return self._job_box["view"]

    @_view_job.setter
    def _view_job(self, job: Job | None) -> None:
        self._job_box["view"] = job

    @property
    def _image_job(self) -> Job | None:
        return self._job_box["image"]

    @_image_job.setter
    def _image_job(self, job: Job | None) -> None:
        self._job_box["image"] = job

    def _jobs(self) -> list[Job]:
        return [j for j in self._job_box.values() if j is not None]

    @property
    def busy(self) -> bool:
        return any(not j.done.is_set() for j in self._jobs())

    def _save_settings(self) -> None:
        choice = self.model_choice
        self._settings.update(
            model=choice.to_setting() if choice.kind != SESSION else self._settings["model"],
            device=self.device,
            precision=self.precision_combo.currentText(),
            confidence=self.confidence_check.isChecked(),
            tile_cap=self.cap_spin.value(),
            overlap=self.overlap_spin.value(),
            batch_size=self.batch_spin.value(),
            overwrite=self.overwrite_check.isChecked(),
        )
        save_section(SETTINGS_SECTION, self._settings)

    # ------------------------------------------------------------------------------ viewer events

    def _connect(self, emitter: Any, callback: Callable) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def _connect_viewer(self) -> None:
        v = self.viewer
        self._connect(v.layers.events.inserted, self._on_layers_changed)
        self._connect(v.layers.events.removed, self._on_layer_removed)
        self._connect(v.layers.events.moved, self._on_layers_changed)
        cam = L.camera(v)
        self._connect(cam.events.center, self._on_view_changed)
        self._connect(cam.events.zoom, self._on_view_changed)
        canvas = getattr(v, "canvas", None)
        if canvas is not None and hasattr(getattr(canvas, "events", None), "size"):
            self._connect(canvas.events.size, self._on_view_changed)
        self._connect(v.dims.events.current_step, self._on_view_changed)
        self._connect(v.dims.events.order, self._on_view_changed)
        self._connect(registry().updated, self._on_session_model)
        for layer in v.layers:
            self._watch_layer(layer)

    def _watch_layer(self, layer: Any) -> None:
        if _is_image(layer):
            self._connect(layer.events.name, self._refresh_layer_choices)

    def _disconnect_viewer(self) -> None:
        for emitter, callback in self._connections:
            try:
                emitter.disconnect(callback)
            except (RuntimeError, TypeError, ValueError):
                pass
        self._connections.clear()

    def _on_layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and getattr(event, "type", "") == "inserted":
            self._watch_layer(layer)
        self._refresh_layer_choices()

    def _on_layer_removed(self, event: Any) -> None:
        layer = event.value
        for emitter, callback in list(self._connections):
            if getattr(emitter, "source", None) is layer:
                emitter.disconnect(callback)
                self._connections.remove((emitter, callback))
        for job in self._jobs():
            req = job.request
            if req is not None and req.layer is layer and not job.done.is_set():
                job.cancel()
        self._sources.drop_layer(layer)
        self._targets.pop(id(layer), None)
        for key, target in list(self._targets.items()):
            if target.labels is layer:
                del self._targets[key]  # the user deleted our output: start afresh next time
            elif target.confidence is layer:
                target.confidence, target.conf_levels = None, None
                target.writers.clear()
        self._refresh_layer_choices()

    def _refresh_layer_choices(self, *_: Any) -> None:
        current = self.image_combo.currentData()
        names = [layer.name for layer in self.viewer.layers if _is_image(layer)]
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        for name in names:
            self.image_combo.addItem(name, name)
        active = self.viewer.layers.selection.active
        prefer = current if current in names else (
            active.name if active is not None and active.name in names else None
        )
        if prefer is not None:
            self.image_combo.setCurrentIndex(names.index(prefer))
        self.image_combo.blockSignals(False)
        if current != self.image_combo.currentData():
            self._on_image_changed()

    def _on_image_changed(self, *_: Any) -> None:
        # A view job of the previous image keeps painting into *its* layer; only live mode
        # should follow the new selection.
        if self.live:
            self._schedule_live()

    def _on_view_changed(self, event: Any = None) -> None:
        if self.live:
            self._schedule_live()

    def _schedule_live(self) -> None:
        self._debounce.start()

    def _on_live_timeout(self) -> None:
        if self.live and self._lifeline.alive:
            self._start_view(live=True)

    def _on_live_toggled(self, on: bool) -> None:
        self.set_live(on)

    # ------------------------------------------------------------------------------ models

    def _refresh_model_choices(self, select: ModelChoice | None = None) -> None:
        select = select or self.model_choice
        choices = [ModelChoice(BUNDLED)]
        for path in self._settings.get("recent_models", []):
            choices.append(ModelChoice(FOLDER, str(path)))
        choices += [ModelChoice(SESSION, name) for name in registry().names()]
        if select not in choices:
            choices.insert(1, select)
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        for choice in choices:
            self.model_combo.addItem(choice.label, choice)
        self.model_combo.setCurrentIndex(choices.index(select))
        self.model_combo.blockSignals(False)
        self._on_model_changed()

    def _remember_folder(self, choice: ModelChoice) -> None:
        if choice.kind != FOLDER:
            return
        recent = [p for p in self._settings.get("recent_models", []) if p != choice.value]
        self._settings["recent_models"] = [choice.value, *recent][:MAX_RECENT]

    def _browse_model(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "MuViT model folder (with config.yaml)")
        if folder:
            self.set_model(folder)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(
            self, "Whole-image prediction (OME-Zarr folder)", self._default_output(), "*.zarr"
        )
        if path:
            self.output_edit.setText(path if path.endswith(".zarr") else path + ".zarr")

    def _on_model_changed(self, *_: Any) -> None:
        choice = self.model_choice
        self._remember_folder(choice)
        self._save_settings()
        self._loaded_info = None
        if choice.kind == BUNDLED:
            try:
                bundled_segmenter_path()
            except MuViTError as err:
                self._show_model_problem(f"{err}. Choose a model folder with 'Folder…'.")
                return
        self.model_info.setStyleSheet("")
        self.model_info.setText("loading model…")
        worker = start_worker(
            _load_job,
            self._loader,
            choice,
            self.predictor_options,
            lifeline=self._lifeline,
            on_return=self._on_model_loaded,
            on_error=lambda err, c=choice: self._on_model_error(c, err),
        )
        self._info_worker = worker
        if self.live:
            self._schedule_live()

    def _on_model_loaded(self, loaded: Loaded) -> None:
        if loaded.choice != self.model_choice:
            return  # the user picked another model meanwhile
        self._loaded_info = loaded
        self.model_info.setStyleSheet("")
        self.model_info.setText(loaded.summary())

    def _on_model_error(self, choice: ModelChoice, err: BaseException) -> None:
        if choice != self.model_choice:
            return
        self._show_model_problem(error_message(err))
        if choice.kind != BUNDLED:
            report_error(err, "MuViT model")

    def _show_model_problem(self, text: str) -> None:
        self.model_info.setStyleSheet("color: #e06c5a;")
        self.model_info.setText(text)

    def _on_session_model(self, name: str) -> None:
        """A fine-tuning run published new weights: list the model, re-predict if shown."""
        if not self._lifeline.alive:
            return
        current = self.model_choice
        names = [self.model_combo.itemData(i) for i in range(self.model_combo.count())]
        if ModelChoice(SESSION, name) not in names:
            self._refresh_model_choices(select=current)
        if current == ModelChoice(SESSION, name):
            self._on_model_changed()
            self.repredict()

    def repredict(self) -> Any:
        """Predict the view again after the model changed: live mode re-predicts (debounced);
        otherwise the view is re-predicted only if it was predicted before."""
        if self.live:
            self._schedule_live()
            return None
        if self.labels_layer() is not None:
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
        if self.live_check.isChecked() != on:
            self.live_check.blockSignals(True)
            self.live_check.setChecked(on)
            self.live_check.blockSignals(False)
        self.live = on
        if not on:
            self._debounce.stop()
            if self._view_job is not None and self._view_job.request.live:
                self._view_job.cancel()
            self._set_status("live prediction off")
            return None
        return self._start_view(live=True)

    def predict_image(self, out: str | Path | None = None) -> Any:
        """Segment the whole image (displayed plane) into an OME-Zarr at ``out`` (default: the
        Output field, else ``<output folder>/<layer>_muvit.zarr``); returns the worker."""
        try:
            req = self._request(live=False, whole=True)
        except MuViTError as err:
            report_error(err, "MuViT whole image")
            self._set_status(error_message(err))
            return None
        if self._image_job is not None and not self._image_job.done.is_set():
            self._set_status("a whole-image prediction is already running (Cancel it first)")
            return None
        path = Path(out) if out is not None else Path(self.output_edit.text() or self._default_output())
        path = path.expanduser().absolute()
        self.output_edit.setText(str(path))
        self._settings["output_dir"] = str(path.parent)
        self._save_settings()
        job = Job("image", request=req, out_path=path)
        relay = _Relay(self)
        relay.progressed.connect(self._lifeline.guard(lambda d, t, j=job: self._on_image_progress(j, d, t)))
        job.output = relay
        self._image_job = job
        job.worker = start_worker(
            image_job,
            job,
            self._loader,
            self._sources,
            relay,
            self.overwrite_check.isChecked(),
            lifeline=self._lifeline,
            on_yield=lambda msg, j=job: self._on_image_message(j, msg),
            on_return=lambda complete, j=job: self._on_image_returned(j, complete),
            on_error=lambda err, j=job: self._on_job_error(j, err),
            on_finish=lambda j=job: self._on_image_finished(j),
        )
        self._set_status(f"whole image → {path}: loading model…")
        self._update_buttons()
        return job.worker

    def cancel(self) -> None:
        """Cancel every running job; tiles already shown/written stay valid."""
        for job in self._jobs():
            if not job.done.is_set():
                job.cancel()
        self._set_status("cancelling…")

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
            layer=layer,
            plane=plane,
            region=region,
            choice=self.model_choice,
            options=self.predictor_options,
            probabilities=self.confidence_check.isChecked(),
            live=live,
        )

    def _start_view(self, live: bool) -> Any:
        try:
            req = self._request(live=live)
        except MuViTError as err:
            if not live:
                report_error(err, "MuViT predict view")
            self._set_status(error_message(err))
            return None
        if np.any(req.region[1] - req.region[0] < 1):
            self._set_status("the image is not visible on the canvas")
            return None
        previous = self._view_job
        if previous is not None and not previous.done.is_set():
            previous.cancel()  # a newer view supersedes the older one
        else:
            previous = None
        job = Job("view", request=req)
        self._view_job = job
        job.worker = start_worker(
            view_job,
            job,
            self._loader,
            self._sources,
            previous,
            lifeline=self._lifeline,
            on_yield=lambda msg, j=job: self._on_view_message(j, msg),
            on_error=lambda err, j=job: self._on_job_error(j, err),
            on_finish=lambda j=job: self._on_view_finished(j),
        )
        self._set_status("predicting view…" if not live else "live: predicting view…")
        self._update_buttons()
        return job.worker

    def _on_view_message(self, job: Job, msg: Any) -> None:
        if isinstance(msg, Ready):
            self._on_view_ready(job, msg)
            return
        if job.token.cancelled and job.target is None:
            return
        self._paint_tile(job, msg)

    def _on_view_ready(self, job: Job, ready: Ready) -> None:
        job.loaded, job.plane = ready.loaded, ready.plane
        if self._view_job is not job or job.token.cancelled:
            job.proceed = False
            job.go.set()
            return
        self._loaded_info = ready.loaded
        if job.request.choice == self.model_choice:
            self.model_info.setStyleSheet("")
            self.model_info.setText(ready.loaded.summary())
        try:
            target = self._view_target(job.request.layer, ready.loaded, ready.plane,
                                       job.request.probabilities)
        except MuViTError as err:
            job.proceed = False
            job.go.set()
            self._on_job_error(job, err)
            return
        job.target = target
        pred = ready.loaded.predictor
        cells = _cells(ready.region, pred.step)
        key = ready.plane.key()
        new = [c for c in cells if (key, c) not in target.painted]
        cap = self.cap_spin.value()
        job.total = len(new)
        if not new:
            job.proceed = False
            self._set_status(f"view up to date ({len(cells)} tiles)")
        elif len(new) > cap:
            job.proceed = False
            self._set_status(
                f"the view needs {len(new)} new tiles, more than the cap of {cap}: zoom in, "
                "raise 'Tile cap' or use 'Predict whole image'"
            )
        else:
            job.proceed = True
            self._set_progress(0, len(new))
            self._set_status(
                f"{'live: ' if job.request.live else ''}predicting {len(new)} tiles "
                f"({len(cells) - len(new)} already shown) on {pred.device}…"
            )
        job.go.set()

    def _view_target(
        self, image: Image, loaded: Loaded, plane: L.LayerPlane, probabilities: bool
    ) -> ViewTarget:
        """The output layers for ``image``, (re)created when the model changed."""
        target = self._targets.get(id(image))
        if target is not None and target.labels not in self.viewer.layers:
            target = None
        model = loaded.model
        dtype = L.label_dtype(model.label_values)
        if (
            target is not None
            and target.identity != loaded.identity
            and _same_family(target.identity, loaded.identity)
            and target.label_values == list(model.label_values)
            and target.label_levels[0].dtype == dtype
        ):
            # New weights of the same model (fine-tuning snapshots): keep showing the old
            # labels until each tile is overwritten, instead of blanking the layer.
            target.identity = loaded.identity
            target.painted.clear()
        if target is None or target.identity != loaded.identity:
            colors = getattr(model, "class_colors", None)
            style = (tuple(model.label_values), repr(colors), tuple(model.class_names))
            name = f"{image.name} MuViT"
            if target is not None:
                # Same layer, new model: no stale tile of the old model may survive.
                layer = target.labels
                levels = target.label_levels
                if all(isinstance(a, np.ndarray) for a in levels) and levels[0].dtype == dtype:
                    for arr in levels:
                        arr[...] = 0  # in place: far cheaper for napari than new data
                    L.refresh_data(layer)
                else:
                    levels = L.allocate_levels(plane, dtype)
                    layer.data = levels if plane.multiscale else levels[0]
                if target.style != style:
                    layer.colormap = L.labels_colormap(model.label_values, colors, model.class_names)
                    layer.features = L.class_features(model.label_values, model.class_names)
                if target.confidence is not None and target.confidence in self.viewer.layers:
                    self.viewer.layers.remove(target.confidence)
            else:
                levels = L.allocate_levels(plane, dtype)
                previous = self.viewer.layers.selection.active
                layer = self.viewer.add_labels(
                    levels if plane.multiscale else levels[0],
                    name=name,
                    multiscale=plane.multiscale,
                    colormap=L.labels_colormap(model.label_values, colors, model.class_names),
                    features=L.class_features(model.label_values, model.class_names),
                    opacity=0.6,
                    metadata={"napari_muvit": {"source_layer": image.name}},
                    **L.transform_kwargs(image, plane),
                )
                _keep_painting(self.viewer, previous)
            target = ViewTarget(image=image, identity=loaded.identity, labels=layer,
                                label_levels=levels, label_values=list(model.label_values),
                                style=style)
            self._targets[id(image)] = target
        if probabilities and (target.confidence is None or target.confidence not in self.viewer.layers):
            conf_levels = L.allocate_levels(plane, np.uint8)
            previous = self.viewer.layers.selection.active
            target.confidence = self.viewer.add_image(
                conf_levels if plane.multiscale else conf_levels[0],
                name=f"{image.name} MuViT confidence",
                multiscale=plane.multiscale,
                colormap="magma",
                contrast_limits=(0, 100),
                opacity=0.5,
                blending="additive",
                metadata={"napari_muvit": {"source_layer": image.name, "unit": "percent"}},
                **L.transform_kwargs(image, plane),
            )
            _keep_painting(self.viewer, previous)
            target.conf_levels = conf_levels
            target.writers.clear()
            # Tiles already shown have no confidence yet: let them be recomputed (cache hits).
            target.painted.clear()
        return target

    def _paint_tile(self, job: Job, res: Any) -> None:
        target: ViewTarget | None = job.target
        if target is None or self._targets.get(id(target.image)) is not target:
            return  # the output was replaced (model switch) or removed
        plane = job.plane
        key = (plane.key(), tuple(res.tile.grid))
        if key in target.painted and res.cached:
            return
        core = np.asarray(res.tile.core, dtype=np.int64)
        labels_writer, conf_writer = target.writer(plane)
        written = labels_writer.write(core, np.asarray(res.labels))
        if conf_writer is not None and res.probs is not None:
            conf = (np.asarray(res.probs, dtype=np.float32).max(axis=0) * 100).astype(np.uint8)
            conf_writer.write(core, conf)
            self._mark_dirty(target.confidence)
        target.painted.add(key)
        job.painted += 1
        layer = target.labels
        if layer.multiscale:
            self._mark_dirty(layer)
        else:
            for level, slice_key in written:
                if level == 0:
                    L.refresh_region(layer, slice_key)
        self._progress_value = job.painted  # shown by the coalescing refresh timer
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _mark_dirty(self, layer: Any) -> None:
        if layer is None:
            return
        self._dirty_layers[id(layer)] = layer
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()

    def _flush_refresh(self) -> None:
        if self._progress_value is not None:
            self._set_progress(self._progress_value)
            self._progress_value = None
        layers, self._dirty_layers = self._dirty_layers, {}
        for layer in layers.values():
            if layer in self.viewer.layers:
                L.refresh_data(layer)

    def _on_view_finished(self, job: Job) -> None:
        job.done.set()
        if job.target is not None and job.painted:
            self._flush_refresh()
        if self._view_job is job:
            if job.token.cancelled:
                if job.proceed:
                    self._set_status(f"view cancelled after {job.painted}/{job.total} tiles")
            elif job.proceed:
                dt = time.perf_counter() - job.started
                self._set_status(
                    f"{'live: ' if job.request.live else ''}view done: {job.painted} tiles in "
                    f"{dt:.1f} s"
                )
        self._update_buttons()

    def _on_job_error(self, job: Job, err: BaseException) -> None:
        if isinstance(err, CancelledError) or job.token.cancelled:
            return
        context = "MuViT whole image" if job.kind == "image" else "MuViT predict view"
        if job.kind == "view" and job.request is not None and job.request.live and self.live:
            # Every camera move would fail the same way: stop live mode, say it once.
            self.set_live(False)
            context = "MuViT live prediction stopped"
        report_error(err, context)
        self._set_status(f"error: {error_message(err)}")

    # ------------------------------------------------------------------------------ whole image

    def _default_output(self) -> str:
        layer = self.image_layer
        name = "image" if layer is None else _safe_name(layer.name)
        folder = Path(self._settings.get("output_dir") or DEFAULTS["output_dir"])
        source_path = getattr(getattr(layer, "source", None), "path", None)
        if source_path:
            folder = Path(source_path).expanduser().parent
        return str(folder / f"{name}_muvit.zarr")

    def _on_image_message(self, job: Job, msg: Any) -> None:
        if not isinstance(msg, SinkReady):
            return
        job.loaded, job.plane, job.sink = msg.loaded, msg.plane, msg.sink
        if job.token.cancelled:
            job.proceed = False
            job.go.set()
            return
        image = job.request.layer
        levels = [msg.sink.labels(k) for k in range(msg.sink.n_levels)]
        model = msg.loaded.model
        name = f"{image.name} MuViT ({job.out_path.name})"
        for layer in list(self.viewer.layers):
            if layer.name == name:
                self.viewer.layers.remove(layer)  # a previous run of the same store
        data, kwargs = _stack_for_plane(levels, image, msg.plane)
        job.target = self.viewer.add_labels(
            data,
            name=name,
            multiscale=len(levels) > 1,
            colormap=L.labels_colormap(
                model.label_values, getattr(model, "class_colors", None), model.class_names
            ),
            features=L.class_features(model.label_values, model.class_names),
            opacity=0.6,
            metadata={"napari_muvit": {"store": str(job.out_path), "source_layer": image.name}},
            **kwargs,
        )
        from napari.utils import progress

        job.total = msg.remaining
        job.progress_bar = progress(total=max(1, msg.remaining), desc=f"MuViT {image.name}")
        self._set_progress(0, max(1, msg.remaining))
        resumed = " (resuming)" if getattr(msg.sink, "resumed", False) else ""
        self._set_status(
            f"whole image{resumed}: {msg.remaining} tiles to compute → {job.out_path}"
        )
        job.proceed = True
        job.go.set()

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
        self._set_progress(done, max(1, total))
        if job.target is not None:
            self._mark_dirty(job.target)

    def _on_image_returned(self, job: Job, complete: Any) -> None:
        dt = time.perf_counter() - job.started
        if complete:
            self._set_status(f"whole image done in {dt:.1f} s → {job.out_path}")

    def _on_image_finished(self, job: Job) -> None:
        job.done.set()
        if job.progress_bar is not None:
            job.progress_bar.close()
            job.progress_bar = None
        if job.target is not None and job.target in self.viewer.layers:
            job.target.refresh()
        if job.token.cancelled and job.proceed:
            self._set_status(
                f"whole image cancelled after {job.painted}/{job.total} tiles; run it again to "
                f"resume ({job.out_path})"
            )
        self._update_buttons()

    # ------------------------------------------------------------------------------ lifecycle

    def _update_buttons(self) -> None:
        self.cancel_button.setEnabled(self.busy)

    def _on_viewer_closing(self) -> None:
        self.close_widget()

    def close_widget(self) -> None:
        """Stop workers and disconnect from the viewer (called when the viewer closes)."""
        if not self._lifeline.alive:
            return
        self._save_settings()
        _shutdown(self._lifeline, self._jobs())
        self._disconnect_viewer()
        self._debounce.stop()
        self._refresh_timer.stop()

    def closeEvent(self, event: Any) -> None:
        self.close_widget()
        super().closeEvent(event)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _load_job(loader: ModelLoader, choice: ModelChoice, options: PredictorOptions) -> Loaded:
    return loader.get(choice, options)


def _shutdown(lifeline: Lifeline, jobs: list[Job]) -> None:
    """Cut callbacks and cancel jobs (safe to call twice, from a destroyed-signal too)."""
    lifeline.alive = False
    for job in jobs:
        job.cancel()
        if job.progress_bar is not None:
            try:
                job.progress_bar.close()
            except Exception as err:  # noqa: BLE001 - best effort at teardown
                log.debug("closing the progress bar at teardown failed: %s", err)
            job.progress_bar = None


class _CloseFilter(QObject):
    """Calls ``on_close`` when the napari main window receives its Close event."""

    def __init__(self, on_close: Callable[[], None]) -> None:
        super().__init__()
        self._on_close = on_close

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Close:
            try:
                self._on_close()
            except RuntimeError:
                pass
        return False


def _keep_painting(viewer: Any, previous: Any) -> None:
    """napari makes every new layer the active one; while the user is annotating (a Labels
    layer in a painting mode) give the selection back so the next stroke lands where meant."""
    modes = ("paint", "erase", "fill", "polygon")
    if previous is not None and previous in viewer.layers and str(getattr(previous, "mode", "")) in modes:
        viewer.layers.selection.active = previous


def _same_family(a: tuple, b: tuple) -> bool:
    """Identities of the same model choice and tiling (only the weights differ)."""
    return a[0] == b[0] and a[3:] == b[3:]


def _compact(combo: QComboBox) -> None:
    """Long entries (model paths) must not force the dock wider than the canvas."""
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)


def _is_image(layer: Any) -> bool:
    from napari.layers import Image

    return isinstance(layer, Image)


def _cells(region: np.ndarray, step: int) -> list[tuple[int, int]]:
    """Tile-grid cells whose cores intersect ``region`` (the engine's global grid)."""
    reg = np.asarray(region, dtype=np.float64)
    y0, x0 = (int(np.floor(v)) for v in reg[0])
    y1, x1 = (int(np.ceil(v)) for v in reg[1])
    rows = range(y0 // step, (y1 - 1) // step + 1)
    cols = range(x0 // step, (x1 - 1) // step + 1)
    return [(r, c) for r in rows for c in cols]


def cell_region(region: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """``region`` grown to whole cells of the engine's global tile grid (clipped to the image)."""
    reg = np.asarray(region, dtype=np.float64)
    lo = np.floor(np.floor(reg[0]) / step) * step
    hi = np.minimum(np.ceil(np.ceil(reg[1]) / step) * step, np.asarray(shape, dtype=np.float64))
    return np.stack([np.maximum(lo, 0), hi])


def _safe_name(name: str) -> str:
    keep = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip())
    return keep.strip("._") or "image"


def _stack_for_plane(levels: list[Any], image: Any, plane: L.LayerPlane) -> tuple[Any, dict]:
    """2-D store levels as layer data aligned with ``image``'s displayed plane.

    A 2-D image uses the arrays and transforms as they are.  For nD images the 2-D levels get
    length-1 axes for the other dimensions (lazily, via dask) and the plane's index is folded
    into the affine, so the result sits exactly on the plane it was computed for.
    """
    if plane.ndim == 2 and plane.channel_axis is None:
        return (levels if len(levels) > 1 else levels[0]), L.transform_kwargs(image, plane)
    out_axes = plane.out_axes
    ndim = len(out_axes)
    disp = (out_axes.index(plane.displayed[0]), out_axes.index(plane.displayed[1]))
    stacked = []
    for arr in levels:
        lazy = da.from_array(arr, chunks=arr.chunks)
        shape = [1] * ndim
        shape[disp[0]], shape[disp[1]] = arr.shape
        stacked.append(lazy.reshape(tuple(shape)))
    full = L.full_affine(image)
    keep = [*out_axes, full.shape[0] - 1]
    affine = full[np.ix_(keep, keep)]
    shift = np.eye(ndim + 1)
    for axis, index in plane.index.items():
        shift[out_axes.index(axis), -1] = index
    data = stacked if len(stacked) > 1 else stacked[0]
    return data, {"affine": affine @ shift}

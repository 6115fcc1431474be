"""The MuViT fine-tune dock widget: paint a few labels, train, watch the loss, see predictions.

Thin like the predict widget: it collects the image, the painted labels, the starting model
and the hyper-parameters, runs :class:`~napari_muvit.engine.train.Trainer` in a worker thread
(cancel token = *Stop*) and shows what the trainer reports:

* every step's loss (and the validation Dice when a validation rectangle is drawn) in a small
  QPainter plot;
* every ``N`` steps a snapshot of the weights is published to the session model registry, so
  the predict widget docked in the same viewer re-predicts its view with the new weights;
* strokes painted while training runs are sent to the trainer (``update_labels`` with the
  stroke's bbox, from the Labels layer's ``paint`` event) and used from the next step on.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

# Modules the trainer would import on first use, imported here in the main thread when the
# panel opens: importing them from the training thread holds the GIL in long stretches and
# froze the event loop for ~0.4 s at the start of training.  torch._dynamo (and sympy with it)
# is pulled in by the first ``torch.optim`` optimizer (``add_param_group``), the sampler by
# the trainer's dataset.
import torch._dynamo  # noqa: F401
import zarr
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
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

import napari_muvit.data.sampler  # noqa: F401
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.train import TrainConfig, Trainer, prepare_start_model
from napari_muvit.errors import CancelledError, InputError, MuViTError
from napari_muvit.widgets import _layers as L
from napari_muvit.widgets._loss_plot import LossPlot
from napari_muvit.widgets._models import (
    BUNDLED,
    FOLDER,
    SESSION,
    ModelChoice,
    bundled_segmenter_path,
    registry,
)
from napari_muvit.widgets._settings import load_section, save_section
from napari_muvit.widgets._workers import Lifeline, error_message, report_error, start_worker

if TYPE_CHECKING:  # pragma: no cover
    import napari

log = logging.getLogger("napari_muvit.widgets")

SETTINGS_SECTION = "train"
ENCODER = "encoder"  # ModelChoice kind: the bundled pre-trained encoder
DEFAULTS: dict[str, Any] = {
    "start": f"{ENCODER}:",
    "recent_models": [],
    "class_names": "",
    "steps": 200,
    "lr": 1e-4,
    "batch_size": 4,
    "crop_size": 0,
    "publish_every": 25,
    "device": "auto",
    "annotation_dir": str(Path.home() / "napari-muvit" / "annotations"),
}
NO_VALIDATION = "(none)"
DEVICES = ("auto", "cpu", "cuda", "mps")
UI_INTERVAL_MS = 200  # progress bar / status refresh while training
MAX_RECENT = 6


# ---------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainRequest:
    """Everything the training worker needs, captured in the main thread."""

    image: Any
    plane: L.LayerPlane
    labels: Any  # 2-D array-like view of the painted plane
    start: ModelChoice
    start_model: Any  # a session model object to continue from, else None
    class_names: dict[int, str]
    config: Any
    name: str
    publish_every: int


@dataclass
class TrainJob:
    """A running fine-tuning job (main-thread bookkeeping + the worker's trainer)."""

    request: TrainRequest
    token: CancelToken = field(default_factory=CancelToken)
    done: threading.Event = field(default_factory=threading.Event)
    trainer: Any = None
    worker: Any = None
    relay: Any = None
    history: dict[str, Any] | None = None
    steps_seen: int = 0
    regions_sent: int = 0
    started: float = field(default_factory=time.perf_counter)


class _TrainRelay(QObject):
    """Queued signals from the trainer thread to the main thread."""

    ready = Signal(object)  # the Trainer
    progressed = Signal(object)  # the progress dict
    snapshot = Signal(object, int)  # (model copy, step)


def _resolve_start(request: TrainRequest, in_channels: int) -> tuple[Any, list[str]]:
    start = request.start
    if start.kind == SESSION:
        if request.start_model is None:
            raise InputError(f"the fine-tuned model {start.value!r} is no longer available")
        init: Any = copy.deepcopy(request.start_model)
    elif start.kind == ENCODER:
        init = None  # the engine picks the bundled encoder (or says why it cannot)
    elif start.kind == BUNDLED:
        init = bundled_segmenter_path()
    else:
        init = Path(start.value)
    return prepare_start_model(init, in_channels=in_channels, seed=request.config.seed)


def train_job(job: TrainJob, relay: _TrainRelay) -> dict[str, Any]:
    """Worker: build the trainer, publish it, train; snapshots every ``publish_every`` steps."""
    req = job.request
    try:
        source = L.plane_source(req.image, req.plane)
        model, notes = _resolve_start(req, source.channels)
        last_publish = [0]

        def progress(info: dict[str, Any]) -> None:
            relay.progressed.emit(dict(info))
            step = int(info.get("step", 0))
            final = info.get("status") not in (None, "running")
            if step and (final or step - last_publish[0] >= req.publish_every):
                last_publish[0] = step
                snap = trainer.snapshot()
                # the predictor reads its tile size from meta: predict with the training crop
                snap.meta = {**dict(getattr(snap, "meta", {}) or {}), "crop_size": trainer.crop_size}
                relay.snapshot.emit(snap, step)

        trainer = Trainer(
            model,
            [(source, req.labels)],
            req.config,
            progress=progress,
            cancel=job.token,
            class_names=req.class_names or None,
            provenance={"napari_layer": req.image.name, "source": "napari-muvit TrainWidget"},
            notes=notes,
        )
        job.trainer = trainer
        relay.ready.emit(trainer)
        return trainer.run()
    finally:
        job.done.set()


def _save_job(model: Any, folder: Path, overwrite: bool) -> Path:
    return Path(model.save(folder, overwrite=overwrite))


# ---------------------------------------------------------------------------------------------
# the widget
# ---------------------------------------------------------------------------------------------


class TrainWidget(QWidget):
    """Dock widget: fine-tune a MuViT segmenter on labels painted in napari.

    Scripting surface: :meth:`train` (returns the worker), :meth:`stop`, :meth:`save`
    (returns the worker), :meth:`create_annotation_layer`, :meth:`create_validation_layer`.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = L.unwrap(napari_viewer)
        self._lifeline = Lifeline()
        self._settings = load_section(SETTINGS_SECTION, DEFAULTS)
        self._job_box: dict[str, TrainJob | None] = {"train": None}
        self._connections: list[tuple[Any, Callable]] = []
        self._paint_connection: tuple[Any, Callable] | None = None
        self._run_counter = 0
        self.model: Any = None  # the latest snapshot of the model being trained
        self._last_info: dict[str, Any] | None = None
        self._build_ui()
        self._ui_timer = QTimer(self)
        self._ui_timer.setSingleShot(True)
        self._ui_timer.setInterval(UI_INTERVAL_MS)
        self._ui_timer.timeout.connect(self._show_progress)
        self._connect_viewer()
        self._refresh_layer_choices()
        self._refresh_start_choices(select=_choice_from_setting(self._settings["start"]))
        lifeline, box = self._lifeline, self._job_box
        self.destroyed.connect(lambda *_: _shutdown(lifeline, box))

    # ------------------------------------------------------------------------------ UI

    def _build_ui(self) -> None:
        s = self._settings
        layout = QVBoxLayout(self)
        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        self.image_combo = _compact(QComboBox())
        form.addRow("Image", self.image_combo)
        labels_row = QHBoxLayout()
        self.labels_combo = _compact(QComboBox())
        self.labels_combo.setToolTip(
            "Painted labels: 0 = not annotated, 1..K = classes (paint a few strokes per class)"
        )
        self.new_labels_button = QPushButton("New")
        self.new_labels_button.setToolTip(
            "Create an empty annotation layer over the image (zarr on disk for big images)"
        )
        labels_row.addWidget(self.labels_combo, 1)
        labels_row.addWidget(self.new_labels_button)
        form.addRow("Labels", labels_row)
        self.class_names_edit = QLineEdit(s["class_names"])
        self.class_names_edit.setPlaceholderText("names of labels 1, 2, …  e.g. outer, inner")
        form.addRow("Class names", self.class_names_edit)
        val_row = QHBoxLayout()
        self.val_combo = _compact(QComboBox())
        self.val_combo.setToolTip(
            "Shapes layer whose first rectangle is held out from training and scored (Dice)"
        )
        self.new_val_button = QPushButton("Draw")
        self.new_val_button.setToolTip("Add a Shapes layer to draw the validation rectangle")
        val_row.addWidget(self.val_combo, 1)
        val_row.addWidget(self.new_val_button)
        form.addRow("Validation", val_row)
        layout.addWidget(data_box)

        model_box = QGroupBox("Model")
        mform = QFormLayout(model_box)
        start_row = QHBoxLayout()
        self.start_combo = _compact(QComboBox())
        self.start_combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.start_browse = QPushButton("Folder…")
        start_row.addWidget(self.start_combo, 1)
        start_row.addWidget(self.start_browse)
        mform.addRow("Start from", start_row)
        self.steps_spin = QSpinBox()
        self.steps_spin.setRange(1, 1_000_000)
        self.steps_spin.setValue(int(s["steps"]))
        mform.addRow("Steps", self.steps_spin)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(6)
        self.lr_spin.setRange(1e-6, 1.0)
        self.lr_spin.setSingleStep(1e-5)
        self.lr_spin.setValue(float(s["lr"]))
        self.lr_spin.setToolTip("Head learning rate (the encoder uses 0.1×, as in the paper)")
        mform.addRow("Learning rate", self.lr_spin)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 256)
        self.batch_spin.setValue(int(s["batch_size"]))
        mform.addRow("Batch size", self.batch_spin)
        self.crop_spin = QSpinBox()
        self.crop_spin.setRange(0, 2048)
        self.crop_spin.setSingleStep(8)
        self.crop_spin.setSpecialValueText("model default")
        self.crop_spin.setValue(int(s["crop_size"]))
        self.crop_spin.setToolTip("Level-1 crop size (a multiple of the patch size)")
        mform.addRow("Crop size", self.crop_spin)
        self.device_combo = QComboBox()
        self.device_combo.addItems(DEVICES)
        self.device_combo.setCurrentText(s["device"] if s["device"] in DEVICES else "auto")
        mform.addRow("Device", self.device_combo)
        self.publish_spin = QSpinBox()
        self.publish_spin.setRange(1, 100_000)
        self.publish_spin.setValue(int(s["publish_every"]))
        self.publish_spin.setToolTip(
            "Every N steps the predict widget re-predicts its view with the current weights"
        )
        mform.addRow("Refresh prediction every", self.publish_spin)
        layout.addWidget(model_box)

        buttons = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.save_button = QPushButton("Save as…")
        self.save_button.setEnabled(False)
        buttons.addWidget(self.train_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.save_button)
        layout.addLayout(buttons)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        layout.addWidget(self.progress)
        self.loss_plot = LossPlot()
        layout.addWidget(self.loss_plot)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        layout.addWidget(self.status_label)
        layout.addStretch(1)

        self.train_button.clicked.connect(lambda: self.train())
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(lambda: self._save_dialog())
        self.new_labels_button.clicked.connect(lambda: self.create_annotation_layer())
        self.new_val_button.clicked.connect(lambda: self.create_validation_layer())
        self.start_browse.clicked.connect(self._browse_start)
        self.start_combo.currentIndexChanged.connect(lambda *_: self._save_settings())
        for spin in (self.steps_spin, self.batch_spin, self.crop_spin, self.publish_spin):
            spin.valueChanged.connect(lambda *_: self._save_settings())
        self.lr_spin.valueChanged.connect(lambda *_: self._save_settings())
        self.device_combo.currentTextChanged.connect(lambda *_: self._save_settings())
        self.class_names_edit.editingFinished.connect(self._save_settings)

    # ------------------------------------------------------------------------------ state

    @property
    def status(self) -> str:
        return self.status_label.text()

    def _set_status(self, text: str) -> None:
        self.status_label.setText(text)

    @property
    def job(self) -> TrainJob | None:
        """The current (or last) training job."""
        return self._job_box["train"]

    @property
    def busy(self) -> bool:
        job = self.job
        return job is not None and not job.done.is_set()

    def _layer(self, combo: QComboBox, kind: str) -> Any:
        name = combo.currentData()
        for layer in self.viewer.layers:
            if layer.name == name and _kind(layer) == kind:
                return layer
        return None

    @property
    def image_layer(self) -> Any:
        return self._layer(self.image_combo, "image")

    @image_layer.setter
    def image_layer(self, layer: Any) -> None:
        self.image_combo.setCurrentIndex(self.image_combo.findData(layer.name))

    @property
    def labels_layer(self) -> Any:
        return self._layer(self.labels_combo, "labels")

    @labels_layer.setter
    def labels_layer(self, layer: Any) -> None:
        self.labels_combo.setCurrentIndex(self.labels_combo.findData(layer.name))

    @property
    def validation_layer(self) -> Any:
        return self._layer(self.val_combo, "shapes")

    @validation_layer.setter
    def validation_layer(self, layer: Any) -> None:
        self.val_combo.setCurrentIndex(self.val_combo.findData(layer.name if layer else None))

    @property
    def start_choice(self) -> ModelChoice:
        data = self.start_combo.currentData()
        return data if isinstance(data, ModelChoice) else ModelChoice(ENCODER)

    def set_start_model(self, model: str | Path | ModelChoice | None) -> None:
        """``None`` = the bundled encoder, ``"bundled"`` = the bundled segmenter, or a folder."""
        if model is None:
            choice = ModelChoice(ENCODER)
        elif isinstance(model, ModelChoice):
            choice = model
        elif model == BUNDLED:
            choice = ModelChoice(BUNDLED)
        else:
            choice = ModelChoice(FOLDER, str(Path(model).expanduser().absolute()))
        self._refresh_start_choices(select=choice)

    def _save_settings(self) -> None:
        choice = self.start_choice
        if choice.kind == FOLDER:
            recent = [p for p in self._settings["recent_models"] if p != choice.value]
            self._settings["recent_models"] = [choice.value, *recent][:MAX_RECENT]
        self._settings.update(
            start=f"{choice.kind}:{choice.value}" if choice.kind != SESSION else self._settings["start"],
            class_names=self.class_names_edit.text(),
            steps=self.steps_spin.value(),
            lr=float(self.lr_spin.value()),
            batch_size=self.batch_spin.value(),
            crop_size=self.crop_spin.value(),
            publish_every=self.publish_spin.value(),
            device=self.device_combo.currentText(),
        )
        save_section(SETTINGS_SECTION, self._settings)

    # ------------------------------------------------------------------------------ choices

    def _connect(self, emitter: Any, callback: Callable) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        self._connect(layers.events.inserted, self._on_layers_changed)
        self._connect(layers.events.removed, self._on_layers_changed)
        self._connect(layers.events.moved, self._on_layers_changed)
        self._connect(registry().updated, self._on_session_model)
        for layer in layers:
            self._connect(layer.events.name, self._refresh_layer_choices)

    def _on_layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        if layer is not None and getattr(event, "type", "") == "inserted":
            self._connect(layer.events.name, self._refresh_layer_choices)
        elif layer is not None and getattr(event, "type", "") == "removed":
            for emitter, callback in list(self._connections):
                if getattr(emitter, "source", None) is layer:
                    emitter.disconnect(callback)
                    self._connections.remove((emitter, callback))
        self._refresh_layer_choices()

    def _refresh_layer_choices(self, *_: Any) -> None:
        for combo, kind, extra in (
            (self.image_combo, "image", []),
            (self.labels_combo, "labels", []),
            (self.val_combo, "shapes", [NO_VALIDATION]),
        ):
            current = combo.currentData()
            names = [layer.name for layer in self.viewer.layers if _kind(layer) == kind]
            if kind == "labels":
                # our own prediction outputs are not annotations
                names = [
                    layer.name
                    for layer in self.viewer.layers
                    if _kind(layer) == "labels" and not _is_prediction(layer)
                ] or names
            combo.blockSignals(True)
            combo.clear()
            for name in extra:
                combo.addItem(name, None)
            for name in names:
                combo.addItem(name, name)
            if current in names:
                combo.setCurrentIndex(combo.findData(current))
            combo.blockSignals(False)

    def _refresh_start_choices(self, select: ModelChoice | None = None) -> None:
        select = select or self.start_choice
        choices = [ModelChoice(ENCODER), ModelChoice(BUNDLED)]
        choices += [ModelChoice(FOLDER, p) for p in self._settings["recent_models"]]
        choices += [ModelChoice(SESSION, n) for n in registry().names()]
        if select not in choices:
            choices.insert(2, select)
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        for choice in choices:
            self.start_combo.addItem(_start_label(choice), choice)
        self.start_combo.setCurrentIndex(choices.index(select))
        self.start_combo.blockSignals(False)
        self._save_settings()

    def _on_session_model(self, name: str) -> None:
        if not self._lifeline.alive:
            return
        names = [self.start_combo.itemData(i) for i in range(self.start_combo.count())]
        if ModelChoice(SESSION, name) not in names:
            self._refresh_start_choices()

    def _browse_start(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Starting model folder (config.yaml)")
        if folder:
            self.set_start_model(folder)

    # ------------------------------------------------------------------------------ layers

    def create_annotation_layer(self, store: str | Path | None = None) -> Any:
        """An empty Labels layer over the selected image, ready to paint (brush, label 1).

        In memory for images up to 64 Mpx per plane; beyond that a zarr array on disk
        (``store``, default ``<annotation folder>/<image>_annotations.zarr``) so that the
        annotations of a big image survive the session.
        """
        image = self.image_layer
        if image is None:
            report_error(InputError("select an image layer first"), "MuViT annotations")
            return None
        plane = L.layer_plane(self.viewer, image)
        shape = L.output_level_shapes(plane)[0]
        name = _unique_name(self.viewer, f"{image.name} annotations")
        if int(np.prod(plane.shape)) <= L.DENSE_OUTPUT_MAX_PIXELS and store is None:
            data: Any = np.zeros(shape, dtype=np.uint8)
        else:
            path = Path(store) if store is not None else (
                Path(self._settings["annotation_dir"]) / f"{_safe(name)}.zarr"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            chunks = tuple(min(1024, n) if n > 64 else 1 for n in shape)
            data = zarr.open_array(
                str(path), mode="a", shape=shape, chunks=chunks, dtype="uint8", fill_value=0
            )
        layer = self.viewer.add_labels(
            data,
            name=name,
            metadata={"napari_muvit": {"annotations_for": image.name}},
            **L.transform_kwargs(image, plane),
        )
        layer.mode = "paint"
        layer.selected_label = 1
        layer.brush_size = 10
        self.labels_layer = layer
        self._set_status(
            f"paint labels 1, 2, … in '{name}' (0 = not annotated), then press Train"
        )
        return layer

    def create_validation_layer(self) -> Any:
        """A Shapes layer in rectangle mode for the validation region."""
        image = self.image_layer
        kwargs = {} if image is None else {
            "scale": image.scale, "translate": image.translate,
        }
        layer = self.viewer.add_shapes(
            name=_unique_name(self.viewer, "validation region"),
            edge_color="yellow",
            face_color="transparent",
            edge_width=2,
            **kwargs,
        )
        layer.mode = "add_rectangle"
        self.validation_layer = layer
        self._set_status("draw one rectangle: its labels are held out and scored (Dice)")
        return layer

    def validation_region(self) -> np.ndarray | None:
        """The first rectangle of the validation layer as an image-plane bbox (edges)."""
        shapes, image = self.validation_layer, self.image_layer
        if shapes is None or image is None or len(shapes.data) == 0:
            return None
        plane = L.layer_plane(self.viewer, image)
        vertices = np.asarray(shapes.data[0], dtype=np.float64)
        corners = []
        for vertex in vertices:
            world = np.asarray(shapes.data_to_world(vertex), dtype=np.float64)
            data = np.asarray(image.world_to_data(_pad_world(world, self.viewer)), dtype=np.float64)
            corners.append([data[plane.displayed[0]], data[plane.displayed[1]]])
        corners = np.asarray(corners) + 0.5  # napari pixel centres -> MuViT pixel edges
        lo = np.clip(np.floor(corners.min(axis=0) + 1e-6), 0, plane.shape)
        hi = np.clip(np.ceil(corners.max(axis=0) - 1e-6), 0, plane.shape)
        if np.any(hi - lo < 1):
            raise InputError("the validation rectangle lies outside the image")
        return np.stack([lo, hi])

    # ------------------------------------------------------------------------------ training

    def _class_names(self) -> dict[int, str]:
        names = [n.strip() for n in self.class_names_edit.text().split(",")]
        return {i + 1: n for i, n in enumerate(names) if n}

    def _config(self, val_region: np.ndarray | None) -> Any:
        crop = self.crop_spin.value() or None
        steps = self.steps_spin.value()
        return TrainConfig(
            steps=steps,
            batch_size=self.batch_spin.value(),
            crop_size=crop,
            lr=float(self.lr_spin.value()),
            device=self.device_combo.currentText(),
            val_region=None if val_region is None else val_region.tolist(),
            # validate ~10 times per run: cheap enough, and the curve is readable
            val_every=max(1, steps // 10),
            checkpoint_every=1e9,  # the widget saves explicitly (Save as…)
        )

    def _request(self) -> TrainRequest:
        image, labels = self.image_layer, self.labels_layer
        if image is None:
            raise InputError("select an image layer to train on")
        if labels is None:
            raise InputError("select a Labels layer with painted annotations (or press 'New')")
        plane = L.layer_plane(self.viewer, image)
        expected = L.output_level_shapes(plane)[0]
        lab_data = labels.data[0] if labels.multiscale else labels.data
        if tuple(lab_data.shape) != tuple(expected):
            raise InputError(
                f"labels {labels.name!r} have shape {tuple(lab_data.shape)}, the image "
                f"{image.name!r} needs {tuple(expected)} (one label per image pixel)"
            )
        labels_plane = _labels_plane(lab_data, plane)
        start = self.start_choice
        start_model = registry().session_model(start.value) if start.kind == SESSION else None
        self._run_counter += 1
        return TrainRequest(
            image=image,
            plane=plane,
            labels=labels_plane,
            start=start,
            start_model=start_model,
            class_names=self._class_names(),
            config=self._config(self.validation_region()),
            name=f"{image.name} #{self._run_counter}",
            publish_every=self.publish_spin.value(),
        )

    def train(self) -> Any:
        """Start fine-tuning; returns the worker (None if it could not start: see status)."""
        if self.busy:
            self._set_status("training is already running (Stop it first)")
            return None
        try:
            request = self._request()
        except MuViTError as err:
            report_error(err, "MuViT fine-tune")
            self._set_status(error_message(err))
            return None
        self._save_settings()
        job = TrainJob(request)
        relay = _TrainRelay(self)
        guard = self._lifeline.guard
        relay.ready.connect(guard(lambda trainer, j=job: self._on_ready(j, trainer)))
        relay.progressed.connect(guard(lambda info, j=job: self._on_progress(j, info)))
        relay.snapshot.connect(guard(lambda model, step, j=job: self._on_snapshot(j, model, step)))
        job.relay = relay
        self._job_box["train"] = job
        self.loss_plot.clear(total_steps=request.config.steps)
        self.progress.setRange(0, request.config.steps)
        self.progress.setValue(0)
        self._watch_paint(request)
        job.worker = start_worker(
            train_job,
            job,
            relay,
            lifeline=self._lifeline,
            on_return=lambda history, j=job: self._on_returned(j, history),
            on_error=lambda err, j=job: self._on_error(j, err),
            on_finish=lambda j=job: self._on_finished(j),
        )
        self.train_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self._set_status(f"preparing '{request.name}' (indexing labels, loading the model)…")
        return job.worker

    def stop(self) -> None:
        """Stop training after the current step (the weights so far are kept)."""
        job = self.job
        if job is not None and not job.done.is_set():
            job.token.cancel()
            self._set_status("stopping after the current step…")

    def save(self, folder: str | Path, overwrite: bool = False) -> Any:
        """Save the latest weights as a model folder (in a worker); returns the worker."""
        model = self._latest_model()
        if model is None:
            report_error(InputError("nothing to save yet: train first"), "MuViT save")
            return None
        folder = Path(folder).expanduser().absolute()
        return start_worker(
            _save_job,
            model,
            folder,
            overwrite,
            lifeline=self._lifeline,
            on_return=lambda path: self._set_status(f"saved to {path}"),
            on_error=lambda err: report_error(err, "MuViT save"),
        )

    def _latest_model(self) -> Any:
        job = self.job
        trainer = None if job is None else job.trainer
        if trainer is not None:
            model = trainer.snapshot()
            model.meta = {
                **dict(getattr(model, "meta", {}) or {}),
                "crop_size": trainer.crop_size,
                "train_config": trainer.config.to_dict(),
                "trained_steps": trainer.step,
                "napari_layer": job.request.image.name,
            }
            return model
        return self.model

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the fine-tuned model into (new) folder")
        if folder:
            self.save(folder, overwrite=False)

    # ------------------------------------------------------------------------------ job events

    def _watch_paint(self, request: TrainRequest) -> None:
        """Send painted regions to the trainer while it runs (paint event → bbox)."""
        self._unwatch_paint()
        labels = self.labels_layer
        if labels is None:
            return
        displayed = list(request.plane.displayed)
        index = dict(request.plane.index)

        def on_paint(event: Any) -> None:
            job = self.job
            if job is None or job.trainer is None or job.done.is_set():
                return
            regions = []
            for atom in event.value:
                key = getattr(atom, "slice_key", None)
                if key is not None and any(
                    not (key[a].start <= i < key[a].stop) for a, i in index.items()
                ):
                    continue  # painted on another plane than the one being trained on
                regions.extend(L.painted_bboxes([atom], displayed))
            if regions:
                job.trainer.update_labels(regions)
                job.regions_sent += len(regions)

        labels.events.paint.connect(on_paint)
        self._paint_connection = (labels.events.paint, on_paint)

    def _unwatch_paint(self) -> None:
        if self._paint_connection is not None:
            emitter, callback = self._paint_connection
            try:
                emitter.disconnect(callback)
            except (RuntimeError, TypeError, ValueError):
                pass
            self._paint_connection = None

    def _on_ready(self, job: TrainJob, trainer: Any) -> None:
        model = trainer.model
        names = ", ".join(f"{v}={n}" for v, n in zip(model.label_values, model.class_names))
        self._set_status(
            f"training '{job.request.name}': classes {names}, crop {trainer.crop_size}, "
            f"{job.request.config.steps} steps on {trainer.device}"
        )
        # Point the predict widgets of this viewer at the model being trained: they refresh
        # with every published snapshot.
        for widget in _predict_widgets(self.viewer):
            widget._pending_session = job.request.name

    def _on_progress(self, job: TrainJob, info: dict[str, Any]) -> None:
        step = int(info.get("step", 0))
        job.steps_seen = step
        seen = self.loss_plot.losses[-1][0] if self.loss_plot.losses else 0
        if step > seen:  # the final report repeats the last step
            self.loss_plot.add_loss(step, float(info.get("loss", float("nan"))))
        dice = info.get("val_dice")
        if dice is not None and (not self.loss_plot.dice or self.loss_plot.dice[-1][0] != step):
            self.loss_plot.add_dice(step, float(dice))
        # Progress bar and status text at most a few times per second (see LossPlot).
        self._last_info = info
        if not self._ui_timer.isActive():
            self._ui_timer.start()

    def _show_progress(self) -> None:
        info = self._last_info
        if info is None:
            return
        step = int(info.get("step", 0))
        self.progress.setUpdatesEnabled(False)  # see PredictWidget._set_progress
        self.progress.setValue(min(step, self.progress.maximum()))
        self.progress.setUpdatesEnabled(True)
        if info.get("status") == "running":
            dice = f", val Dice {info['val_dice']:.3f}" if info.get("val_dice") is not None else ""
            self._set_status(
                f"step {step}/{info.get('steps')}: loss {info.get('loss', float('nan')):.4f}"
                f"{dice} ({info.get('elapsed', 0.0):.0f} s)"
            )

    def _on_snapshot(self, job: TrainJob, model: Any, step: int) -> None:
        self.model = model
        self.save_button.setEnabled(True)
        name = job.request.name
        # Predict widgets already showing this model refresh on the registry's signal.
        registry().publish(name, model, step=step)
        for widget in _predict_widgets(self.viewer):
            if widget._pending_session == name:
                # first snapshot: switch the widget to the model being trained
                widget._pending_session = None
                widget.set_model(ModelChoice(SESSION, name))
                widget.repredict()

    def _on_returned(self, job: TrainJob, history: dict[str, Any]) -> None:
        job.history = history
        self._ui_timer.stop()
        dt = time.perf_counter() - job.started
        val = history.get("val") or []
        dice = f", validation Dice {val[-1]['dice']:.3f}" if val else ""
        warnings = history.get("warnings") or []
        note = f" — note: {warnings[-1]}" if warnings else ""
        loss = history["loss"][-1] if history.get("loss") else float("nan")
        self._set_status(
            f"{history.get('status', 'finished')} after {history.get('step', 0)} steps in "
            f"{dt:.0f} s: loss {loss:.4f}{dice}{note}"
        )

    def _on_error(self, job: TrainJob, err: BaseException) -> None:
        if isinstance(err, CancelledError):
            return
        report_error(err, "MuViT fine-tune")
        self._set_status(f"error: {error_message(err)}")

    def _on_finished(self, job: TrainJob) -> None:
        job.done.set()
        self._ui_timer.stop()
        self.progress.setValue(min(job.steps_seen, self.progress.maximum()))
        self._unwatch_paint()
        self.train_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.save_button.setEnabled(self.model is not None or job.trainer is not None)

    # ------------------------------------------------------------------------------ lifecycle

    def close_widget(self) -> None:
        """Stop training and disconnect from the viewer."""
        if not self._lifeline.alive:
            return
        self._save_settings()
        _shutdown(self._lifeline, self._job_box)
        self._unwatch_paint()
        for emitter, callback in self._connections:
            try:
                emitter.disconnect(callback)
            except (RuntimeError, TypeError, ValueError):
                pass
        self._connections.clear()

    def closeEvent(self, event: Any) -> None:
        self.close_widget()
        super().closeEvent(event)


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _shutdown(lifeline: Lifeline, box: dict[str, TrainJob | None]) -> None:
    lifeline.alive = False
    job = box.get("train")
    if job is not None:
        job.token.cancel()


def _kind(layer: Any) -> str:
    return type(layer).__name__.lower()


def _is_prediction(layer: Any) -> bool:
    meta = getattr(layer, "metadata", {}) or {}
    info = meta.get("napari_muvit", {}) if isinstance(meta, dict) else {}
    return isinstance(info, dict) and "source_layer" in info


def _start_label(choice: ModelChoice) -> str:
    if choice.kind == ENCODER:
        return "Bundled pre-trained encoder (new head)"
    if choice.kind == BUNDLED:
        return "Bundled segmenter (continue training)"
    return choice.label


def _choice_from_setting(text: str) -> ModelChoice:
    kind, _, value = str(text).partition(":")
    if kind in (ENCODER, BUNDLED):
        return ModelChoice(kind)
    if kind == FOLDER and value:
        return ModelChoice(FOLDER, value)
    return ModelChoice(ENCODER)


def _compact(combo: QComboBox) -> QComboBox:
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    return combo


def _unique_name(viewer: Any, name: str) -> str:
    names = {layer.name for layer in viewer.layers}
    if name not in names:
        return name
    k = 2
    while f"{name} [{k}]" in names:
        k += 1
    return f"{name} [{k}]"


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name).strip("._") or "labels"


def _pad_world(world: np.ndarray, viewer: Any) -> np.ndarray:
    """A shapes vertex in world coordinates padded with the current point for missing dims."""
    point = np.asarray(viewer.dims.point, dtype=np.float64)
    if world.size >= point.size:
        return world
    out = point.copy()
    out[-world.size :] = world
    return out


def _labels_plane(data: Any, plane: L.LayerPlane) -> Any:
    """The 2-D plane of a Labels array the trainer reads (a live view: new paint is seen)."""
    if data.ndim == 2:
        return data
    axes = plane.out_axes
    key: list[Any] = [slice(None)] * data.ndim
    for axis, i in plane.index.items():
        key[axes.index(axis)] = i
    if isinstance(data, np.ndarray):
        return data[tuple(key)]  # a numpy view shares memory with the layer
    return L._lazy(data)[tuple(key)]


def _predict_widgets(viewer: Any) -> list[Any]:
    """PredictWidgets docked in ``viewer`` (found through the registry of live instances)."""
    from napari_muvit.widgets._predict import PredictWidget

    viewer = L.unwrap(viewer)
    return [w for w in PredictWidget.instances() if w.viewer is viewer]

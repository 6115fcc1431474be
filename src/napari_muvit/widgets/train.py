"""The MuViT fine-tune panel: paint a few labels, train, watch the loss, see predictions.

A thin Qt view over :class:`~.state.TrainState`: it collects the image, the painted labels, the
starting model and the hyper-parameters, runs :func:`.jobs.train_job` (the engine's
:class:`~napari_muvit.engine.trainer.Trainer`) in a worker thread (cancel token = *Stop*) and
shows what the trainer reports:

* every step's loss (and the validation Dice when a validation rectangle is drawn) in a small
  QPainter plot;
* every ``N`` steps a snapshot of the weights is published to the session model registry, so
  the predict widget docked in the same viewer re-predicts its view with the new weights;
* strokes painted while training runs are sent to the trainer (``update_labels`` with the
  stroke's bbox, from the Labels layer's ``paint`` event) and used from the next step on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import replace

import time
from pathlib import Path
from typing import Any

import numpy as np

# The forest head (the default new head) is fitted by scikit-learn, imported by the engine when
# first used.  Imported there, from the training worker, its import (1.5-4 s of scipy and
# scikit-learn modules) held the GIL for 170-280 ms at a time, stalling the viewer right after
# *Train*; imported here, it is part of opening the panel (as torch is).
import sklearn.ensemble  # noqa: F401
from qtpy.QtCore import QObject, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from napari_muvit.data.points_io import PointTable
from napari_muvit.engine.points import POINT_TRAIN_DEFAULTS
from napari_muvit.engine.quicktrain import quick_fit_message
from napari_muvit.errors import CancelledError, InputError, MuViTError
from napari_muvit.widgets import _layers as L
from napari_muvit.widgets._loss_plot import LossPlot
from napari_muvit.widgets._models import BUNDLED, FOLDER, SESSION, ModelChoice, registry
from napari_muvit.widgets._workers import error_message, report_error, start_worker
from napari_muvit.widgets.base import DockPanel, Form, _alive, bind_label, compact, set_progress
from napari_muvit.widgets.jobs import (
    TrainCallbacks,
    TrainJob,
    TrainRequest,
    latest_model,
    preload_training_modules,
    save_job,
    train_config,
    train_job,
)
from napari_muvit.widgets.outputs import (
    add_annotation_layer,
    add_validation_layer,
    is_ground_truth,
    is_prediction,
)
from napari_muvit.widgets.state import ENCODER, TrainState, remember_folder


log = logging.getLogger("napari_muvit.widgets")

NO_VALIDATION = "(none)"
NO_POINTS = "(none: train on labels)"
UI_INTERVAL_MS = 200  # progress bar / status refresh while training
ACTIVITY_INTERVAL_S = 1.0  # napari activity dock refresh while training


class _TrainRelay(QObject):
    """Queued signals from the trainer thread to the main thread (no Qt parent, kept alive by
    the job: the trainer may report after the panel was closed; see ``predict._Relay``)."""

    ready = Signal(object)  # the Trainer
    progressed = Signal(object)  # the progress dict
    snapshot = Signal(object, int)  # (model copy, step)

    def callbacks(self) -> TrainCallbacks:
        return TrainCallbacks(self.ready.emit, self.progressed.emit, self.snapshot.emit)


def start_label(choice: ModelChoice) -> str:
    """How a starting model is listed in the panel."""
    if choice.kind == ENCODER:
        return "Bundled pre-trained encoder (new head)"
    if choice.kind == BUNDLED:
        return "Bundled segmenter (continue training)"
    return choice.label


class TrainWidget(DockPanel):
    """Dock widget: fine-tune a MuViT segmenter on labels painted in napari.

    Scripting surface: :meth:`train` (returns the worker), :meth:`stop`, :meth:`save`
    (returns the worker), :meth:`create_annotation_layer`, :meth:`create_validation_layer`;
    :attr:`state` holds every choice, the running :attr:`job` and the latest :attr:`model`.
    """

    STATE = TrainState
    state: TrainState

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        preload_training_modules()
        self._paint_connection: tuple[Any, Any] | None = None
        self._run_counter = 0
        self._last_info: dict[str, Any] | None = None
        self.activity: Any = None  # napari.utils.progress of the running training
        self._activity_shown = 0.0
        super().__init__(napari_viewer, parent)
        self._ui_timer = QTimer(self)
        self._ui_timer.setSingleShot(True)
        self._ui_timer.setInterval(UI_INTERVAL_MS)
        self._ui_timer.timeout.connect(self._show_progress)
        self.state.events.start.connect(self._on_start_changed)
        self.state.events.points.connect(self._on_points_changed)
        self._refresh_start_choices(select=self.state.start)

    # ------------------------------------------------------------------------------ UI

    def build(self) -> None:
        layout = QVBoxLayout(self)
        layout.addWidget(self._build_data_box())
        layout.addWidget(self._build_model_box())
        layout.addLayout(self._build_buttons())
        self.progress = QProgressBar()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        bar = self.progress
        self.state.events.progress.connect(_alive(bar, lambda p: set_progress(bar, *p)))
        layout.addWidget(self.progress)
        self.loss_plot = LossPlot()
        layout.addWidget(self.loss_plot)
        self.status_label = QLabel("")
        self.status_label.setWordWrap(True)
        bind_label(self.status_label, self.state, "status")
        layout.addWidget(self.status_label)
        layout.addStretch(1)

    def _build_data_box(self) -> QGroupBox:
        box = QGroupBox("Data")
        form = Form(self.state, QFormLayout(box))
        # our outputs (confidence/uncertainty layers) only when there is nothing else
        self.image_combo = self.layer_choice("image", "image",
                                             accept=lambda layer: not is_prediction(layer))
        form.layout.addRow("Image", self.image_combo)
        # only layers the user paints: never our predictions or a ground truth, even when
        # nothing else is there (training on them would silently learn the wrong thing)
        self.labels_combo = self.layer_choice(
            "labels", "labels", strict=True,
            accept=lambda layer: not is_prediction(layer) and not is_ground_truth(layer))
        self.labels_combo.setToolTip(
            "Painted labels: 0 = not annotated, 1..K = classes (paint a few strokes per class)")
        self.new_labels_button = form.row_with_button(
            "Labels", self.labels_combo, "New",
            "Create an empty annotation layer over the image (zarr on disk for big images)")
        self.new_labels_button.clicked.connect(lambda: self.create_annotation_layer())
        self.points_combo = self.layer_choice("points", "points", none_item=NO_POINTS)
        self.points_combo.setToolTip(
            "Clicked points (a 'class' feature, default 1) train a point detector instead of "
            "a segmenter; every unclicked place of the plane counts as 'no point'")
        form.layout.addRow("Points", self.points_combo)
        self.class_names_edit = form.line("class_names", "Class names",
                                          "names of labels 1, 2, …  e.g. outer, inner")
        self.val_combo = self.layer_choice("validation", "shapes", none_item=NO_VALIDATION)
        self.val_combo.setToolTip(
            "Shapes layer whose first rectangle is held out from training and scored (Dice)")
        self.new_val_button = form.row_with_button(
            "Validation", self.val_combo, "Draw",
            "Add a Shapes layer to draw the validation rectangle")
        self.new_val_button.clicked.connect(lambda: self.create_validation_layer())
        return box

    def _build_model_box(self) -> QGroupBox:
        box = QGroupBox("Model")
        form = Form(self.state, QFormLayout(box))
        self.start_combo = compact(QComboBox())
        self.start_combo.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Fixed)
        self.start_combo.currentIndexChanged.connect(self._on_start_combo)
        self.start_browse = form.row_with_button("Start from", self.start_combo, "Folder…")
        self.start_browse.clicked.connect(self._browse_start)
        self._build_head_row(form)
        self.steps_spin = form.spin("steps", "Steps", 1, 1_000_000)
        self.lr_spin = form.float_spin(
            "lr", "Learning rate", 1e-6, 1.0,
            "Head learning rate (the encoder uses 0.1×, as in the paper; a point detector "
            "trains at 1e-3 with the encoder at 1×)", step=1e-5)
        self.batch_spin = form.spin("batch_size", "Batch size", 1, 256)
        self.crop_spin = form.spin("crop_size", "Crop size", 0, 2048,
                                   "Level-1 crop size (a multiple of the patch size)",
                                   special="model default", step=8)
        self.device_combo = form.combo("device", "Device")
        self.publish_spin = form.spin(
            "publish_every", "Refresh prediction every", 1, 100_000,
            "Every N steps the predict widget re-predicts its view with the current weights")
        self.uncertainty_check = form.check(
            "show_uncertainty", "Show where to paint next (uncertainty layer)",
            "The predict panel adds an uncertainty layer to its refreshed view: bright where "
            "the model hesitates between two classes, where a stroke teaches it the most")
        return box

    def _build_head_row(self, form: Form) -> None:
        """The new head's classifier, and behind its *Quick fit…* button (hidden until asked
        for: the panel must stay short enough for the canvas of a small window) the quick
        fit's choices of the forest's levels and the filters' colour space ("auto": the engine
        chooses, as ``napari-muvit train --forest-levels/--color-space``)."""
        unplaced = Form(self.state)
        self.classifier_combo = unplaced.combo(
            "classifier", "",
            "forest: a random forest on image filters of every level (the context), trained "
            "in seconds, retrained at each Train; mlp: a classifier on the encoder's features, "
            "then Steps of fine-tuning of the whole model")
        self.quick_fit_button = QPushButton("Quick fit…")
        self.quick_fit_button.setToolTip(
            "Show the quick fit's choices: the levels the forest reads, the colour space of "
            "its filters on RGB images")
        self.quick_fit_button.setCheckable(True)
        self.forest_levels_combo = unplaced.combo(
            "forest_levels", "",
            "Levels the forest reads. auto: chosen from your strokes (judged on strokes held "
            "out of the fit); level1: the pixel's own level; all: every level (the context); "
            "mix: sub-forests on level 1, 1-2, … all levels, averaged")
        self.color_space_combo = unplaced.combo(
            "color_space", "",
            "What the head's filters see of an RGB image. auto: CIELAB or the stain densities "
            "for a new forest head, whichever predicts strokes held out of the fit better; "
            "rgb: R, G, B as they come; lab: lightness and two colour axes; hed: haematoxylin, "
            "eosin and DAB densities (stained histology); lab and hed: RGB images only")
        self.quick_fit_row = QWidget()
        row = QHBoxLayout(self.quick_fit_row)
        row.setContentsMargins(0, 0, 0, 0)
        for text, combo in (("levels", self.forest_levels_combo),
                            ("colours", self.color_space_combo)):
            combo.setMinimumContentsLength(6)  # the longest choice ("level1")
            label = QLabel(text)
            label.setToolTip(combo.toolTip())
            row.addWidget(label)
            row.addWidget(combo, 1)
        # the hidden row inside the field (not a form row of its own): a hidden form row still
        # takes the layout's spacing
        field = QWidget()
        column = QVBoxLayout(field)
        column.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        top.addWidget(self.classifier_combo, 1)
        top.addWidget(self.quick_fit_button)
        column.addLayout(top)
        column.addWidget(self.quick_fit_row)
        form.layout.addRow("New head", field)
        # shown when a choice differs from auto (a remembered choice must not hide)
        shown = self.state.forest_levels != "auto" or self.state.color_space != "auto"
        self.quick_fit_button.setChecked(shown)
        self.quick_fit_row.setVisible(shown)
        self.quick_fit_button.toggled.connect(self.quick_fit_row.setVisible)

    def _build_buttons(self) -> QHBoxLayout:
        row = QHBoxLayout()
        self.train_button = QPushButton("Train")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.save_button = QPushButton("Save as…")
        self.save_button.setEnabled(False)
        self.export_button = QPushButton("Export…")
        self.export_button.setToolTip(
            "Write the fine-tuned model as a bioimage.io model package (.zip)")
        self.export_button.setEnabled(False)
        self.train_button.clicked.connect(lambda: self.train())
        self.stop_button.clicked.connect(self.stop)
        self.save_button.clicked.connect(lambda: self._save_dialog())
        self.export_button.clicked.connect(lambda: self.export())
        for button in (self.train_button, self.stop_button, self.save_button, self.export_button):
            row.addWidget(button)
        return row

    def export(self, out: str | Path | None = None) -> Any:
        """Export the latest weights as a bioimage.io package (``out`` asked when None), with
        test tensors from the training image; returns the worker."""
        model = latest_model(self.job, self.model)
        if model is None:
            report_error(InputError("nothing to export yet: train first"), "MuViT export")
            return None
        return self.export_model(model, out, layer=self.image_layer)

    # ------------------------------------------------------------------------------ state

    @property
    def job(self) -> TrainJob | None:
        """The current (or last) training job."""
        return self.state.job

    @property
    def busy(self) -> bool:
        """A training runs, or its end has not reached the panel yet (the worker is done a
        moment before the panel shows how it ended: the status and buttons are final once
        this is False)."""
        job = self.job
        return self.running or (job is not None and not job.ended and self.alive)

    @property
    def model(self) -> Any:
        """The latest published snapshot of the model being trained."""
        return self.state.model

    @property
    def image_layer(self) -> Any:
        return self.layer("image")

    @image_layer.setter
    def image_layer(self, layer: Any) -> None:
        self.select_layer("image", layer)

    @property
    def labels_layer(self) -> Any:
        return self.layer("labels")

    @labels_layer.setter
    def labels_layer(self, layer: Any) -> None:
        self.select_layer("labels", layer)

    @property
    def points_layer(self) -> Any:
        """The Points layer whose points train a detector (None: train on labels)."""
        return self.layer("points")

    @points_layer.setter
    def points_layer(self, layer: Any) -> None:
        self.select_layer("points", layer)

    @property
    def validation_layer(self) -> Any:
        return self.layer("validation")

    @validation_layer.setter
    def validation_layer(self, layer: Any) -> None:
        self.select_layer("validation", layer)

    @property
    def start_choice(self) -> ModelChoice:
        return self.state.start

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

    # ------------------------------------------------------------------------------ choices

    def on_viewer_connected(self) -> None:
        self._connect(registry().updated, self._on_session_model)

    def _refresh_start_choices(self, select: ModelChoice | None = None) -> None:
        """Re-list the starting models and select ``select``."""
        select = select or self.start_choice
        self._list_starts(select)
        self.state.start = select
        self._on_start_changed(select)

    def _list_starts(self, select: ModelChoice) -> None:
        choices = [ModelChoice(ENCODER), ModelChoice(BUNDLED)]
        choices += [ModelChoice(FOLDER, p) for p in self.state.recent_models]
        choices += [ModelChoice(SESSION, n) for n in registry().names()]
        if select not in choices:
            choices.insert(2, select)
        self.start_combo.blockSignals(True)
        self.start_combo.clear()
        for choice in choices:
            self.start_combo.addItem(start_label(choice), choice)
        self.start_combo.setCurrentIndex(choices.index(select))
        self.start_combo.blockSignals(False)

    def _on_start_combo(self, *_: Any) -> None:
        data = self.start_combo.currentData()
        self.state.start = data if isinstance(data, ModelChoice) else ModelChoice(ENCODER)

    def _on_start_changed(self, choice: ModelChoice) -> None:
        if self.start_combo.currentData() != choice:  # set from code: show it
            self._list_starts(choice)
        self.state.recent_models = remember_folder(self.state.recent_models, choice)

    def _on_session_model(self, name: str) -> None:
        """List a newly published session model as a start. Never raises: the registry's
        signal is shared by every panel and stops at the first callback that raises."""
        if not self.alive:
            return
        try:
            listed = [self.start_combo.itemData(i) for i in range(self.start_combo.count())]
            if ModelChoice(SESSION, name) not in listed:
                self._refresh_start_choices()
        except Exception:  # noqa: BLE001 - see the docstring
            log.warning("fine-tune panel: could not list the published model %r", name,
                        exc_info=True)

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
        layer = add_annotation_layer(self.viewer, image, store, self.state.annotation_dir)
        self.labels_layer = layer
        self.set_status(
            f"paint labels 1, 2, … in '{layer.name}' (0 = not annotated), then press Train"
        )
        return layer

    def create_validation_layer(self) -> Any:
        """A Shapes layer in rectangle mode for the validation region."""
        layer = add_validation_layer(self.viewer, self.image_layer)
        self.validation_layer = layer
        self.set_status("draw one rectangle: its labels are held out and scored (Dice)")
        return layer

    def validation_region(self) -> np.ndarray | None:
        """The first rectangle of the validation layer as an image-plane bbox (edges)."""
        return L.rectangle_region(self.viewer, self.validation_layer, self.image_layer)

    # ------------------------------------------------------------------------------ training

    def _request(self) -> TrainRequest:
        image, labels = self.image_layer, self.labels_layer
        if image is None:
            raise InputError("select an image layer to train on")
        if self.points_layer is not None:
            return self._points_request(image, self.points_layer)
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
        start = self.start_choice
        start_model = registry().session_model(start.value) if start.kind == SESSION else None
        self._run_counter += 1
        return TrainRequest(
            image=image,
            plane=plane,
            labels=L.labels_plane(lab_data, plane),
            start=start,
            start_model=start_model,
            class_names=self.state.class_name_map(),
            config=train_config(self.state, self.validation_region()),
            name=f"{image.name} #{self._run_counter}",
            publish_every=int(self.state.publish_every),
        )

    def _on_points_changed(self, event: Any = None) -> None:
        """A point detector learns at its own rate: the shown learning rate follows the
        choice of a Points layer unless the user set another one."""
        labels_lr = next(f.default for f in dataclasses.fields(TrainState) if f.name == "lr")
        defaults = (labels_lr, POINT_TRAIN_DEFAULTS["lr"])
        if self.state.lr in defaults:
            self.state.lr = defaults[self.state.points is not None]

    def _points_request(self, image: Any, points: Any) -> TrainRequest:
        """A request that trains a point detector on ``points`` (those on the shown plane)."""
        plane = L.layer_plane(self.viewer, image)
        yx, keep = L.points_on_plane(points, image, plane)
        if len(yx) == 0:
            raise InputError(f"points layer {points.name!r} has no points on the shown plane "
                             f"of {image.name!r}: click a few nuclei per class")
        feats = points.features
        if "class" in feats.columns:
            raw = feats["class"].to_numpy()[keep]
            try:
                classes = np.asarray(raw, dtype=np.float64)
            except (TypeError, ValueError):
                raise InputError(f"points layer {points.name!r}: its 'class' feature must hold "
                                 "class numbers 1, 2, … (name them in 'Class names')") from None
            if np.any(np.isnan(classes)) or np.any(classes < 1) or np.any(classes % 1):
                raise InputError(f"points layer {points.name!r}: 'class' values must be whole "
                                 "numbers >= 1")
        else:
            classes = np.ones(len(yx))
        table = PointTable(yx, classes.astype(np.int64), {}, f"napari layer {points.name!r}")
        table.check_inside(plane.shape)
        start = self.start_choice
        start_model = registry().session_model(start.value) if start.kind == SESSION else None
        self._run_counter += 1
        return TrainRequest(
            image=image, plane=plane, labels=None, start=start, start_model=start_model,
            class_names=self.state.class_name_map(),
            config=replace(train_config(self.state, self.validation_region()),
                           encoder_lr_factor=POINT_TRAIN_DEFAULTS["encoder_lr_factor"]),
            name=f"{image.name} points #{self._run_counter}",
            publish_every=int(self.state.publish_every), points=table,
        )

    def train(self) -> Any:
        """Start fine-tuning; returns the worker (None if it could not start: see status)."""
        if self.busy:  # also while the last run's end is on its way to the panel
            self.set_status("training is already running (Stop it first)")
            return None
        try:
            request = self._request()
        except MuViTError as err:
            report_error(err, "MuViT fine-tune")
            self.set_status(error_message(err))
            return None
        self.state.save()
        job = TrainJob(request)
        relay = _TrainRelay()
        guard = self.lifeline.guard
        relay.ready.connect(guard(lambda trainer, j=job: self._on_ready(j, trainer)))
        relay.progressed.connect(guard(lambda info, j=job: self._on_progress(j, info)))
        relay.snapshot.connect(guard(lambda model, step, j=job: self._on_snapshot(j, model, step)))
        job.relay = relay
        self.state.job = job
        self.loss_plot.clear(total_steps=request.config.steps)
        self.state.progress = (0, request.config.steps)
        self._watch_paint(request)
        job.worker = start_worker(
            train_job, job, relay.callbacks(),
            lifeline=self.lifeline,
            on_return=lambda history, j=job: self._on_returned(j, history),
            on_error=lambda err, j=job: self._on_error(j, err),
            on_finish=lambda j=job: self._on_finished(j),
        )
        self.train_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.set_status(f"preparing '{request.name}' (indexing labels, loading the model)…")
        return job.worker

    def stop(self) -> None:
        """Stop training after the current step (the weights so far are kept)."""
        job = self.job
        if job is not None and job.running:
            job.cancel()
            self.set_status("stopping after the current step…")

    def save(self, folder: str | Path, overwrite: bool = False) -> Any:
        """Save the latest weights as a model folder (in a worker); returns the worker."""
        model = latest_model(self.job, self.model)
        if model is None:
            report_error(InputError("nothing to save yet: train first"), "MuViT save")
            return None
        folder = Path(folder).expanduser().absolute()
        self.set_status(f"saving the model to {folder}…")

        def failed(err: BaseException) -> None:
            # the writer is atomic: a model already in the folder is still the previous one
            text = f"not saved to {folder}: {save_problem(folder, err)}"
            report_error(MuViTError(text), "MuViT save")
            self.set_status(text)

        return start_worker(
            save_job, model, folder, overwrite,
            lifeline=self.lifeline,
            on_return=lambda path: self.set_status(f"saved to {path}"),
            on_error=failed,
        )

    def _save_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the fine-tuned model into (new) folder")
        if not folder:
            return
        path = Path(folder)
        if (path / "config.yaml").exists():
            answer = QMessageBox.question(
                self, "Replace the model?",
                f"{path} already holds a model. Replace it? (other files in it stay)")
            if answer != QMessageBox.Yes:
                return
        # only napari-muvit's own files are (atomically) replaced, never the user's
        self.save(path, overwrite=path.is_dir() and any(path.iterdir()))

    # ------------------------------------------------------------------------------ job events

    def _watch_paint(self, request: TrainRequest) -> None:
        """Send painted regions to the trainer while it runs (paint event → bbox)."""
        self._unwatch_paint()
        labels = self.labels_layer
        if labels is None:
            return
        displayed = list(request.plane.displayed)
        index = dict(request.plane.index)
        state = self.state

        def on_paint(event: Any) -> None:
            job = state.job
            if job is None or job.trainer is None or not job.running:
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
        self.set_status(
            f"training '{job.request.name}': classes {names}, crop {trainer.crop_size}, "
            f"{job.request.config.steps} steps on {trainer.device}"
        )
        self._open_activity(job)

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
        self.state.progress = (step, self.state.progress[1])
        now = time.perf_counter()
        # napari's activity dock repaints synchronously: once a second is enough there
        if self.activity is not None and now - self._activity_shown >= ACTIVITY_INTERVAL_S:
            self._activity_shown = now
            self.activity.update(max(0, min(step, self.activity.total) - self.activity.n))
        if info.get("status") == "running":
            dice = f", val Dice {info['val_dice']:.3f}" if info.get("val_dice") is not None else ""
            self.set_status(
                f"step {step}/{info.get('steps')}: loss {info.get('loss', float('nan')):.4f}"
                f"{dice} ({info.get('elapsed', 0.0):.0f} s)"
            )

    def _on_snapshot(self, job: TrainJob, model: Any, step: int) -> None:
        self.state.model = model
        self.save_button.setEnabled(True)
        self.export_button.setEnabled(True)
        if job.snapshots_published == 0:
            # Point the predict widgets of this viewer at the model being trained: they switch
            # to it now and refresh with every later snapshot. Done here, not when the trainer
            # is ready: a forest's only snapshot can reach this thread before that message.
            for widget in predict_widgets(self.viewer):
                widget.follow_session(job.request.name)
                if self.state.show_uncertainty:
                    widget.state.uncertainty = True
        job.snapshots_published += 1
        # Predict widgets showing (or following) this model refresh on the registry's signal.
        registry().publish(job.request.name, model, step=step)

    def _on_returned(self, job: TrainJob, history: dict[str, Any]) -> None:
        job.history = history
        self._ui_timer.stop()
        dt = time.perf_counter() - job.started
        val = history.get("val") or []
        dice = f", validation Dice {val[-1]['dice']:.3f}" if val else ""
        warnings = history.get("warnings") or []
        note = f" — note: {warnings[-1]}" if warnings else ""
        status = history.get("status", "finished")
        if history.get("loss"):
            self.set_status(f"{status} after {history.get('step', 0)} steps in {dt:.0f} s: "
                            f"loss {history['loss'][-1]:.4f}{dice}{note}")
        else:  # a forest head: fitted, nothing to fine-tune
            fit = quick_fit_message(history) or "no fine-tuning steps"
            self.set_status(f"{status} in {dt:.0f} s: {fit}{dice}{note}")

    def _on_error(self, job: TrainJob, err: BaseException) -> None:
        if isinstance(err, CancelledError):
            return
        report_error(err, "MuViT fine-tune")
        self.set_status(f"error: {error_message(err)}")

    def _open_activity(self, job: TrainJob) -> None:
        """napari's activity dock shows the training too (steps done of the planned steps)."""
        from napari.utils import progress

        self._close_activity()
        self.activity = progress(total=max(1, int(job.request.config.steps)),
                                 desc=f"MuViT fine-tune {job.request.name}")

    def _close_activity(self) -> None:
        if self.activity is not None:
            self.activity.close()
            self.activity = None

    def _on_finished(self, job: TrainJob) -> None:
        try:
            self._show_finished(job)
        finally:
            job.ended = True

    def _show_finished(self, job: TrainJob) -> None:
        self._close_activity()
        job.done.set()
        self._ui_timer.stop()
        self.state.progress = (job.steps_seen, self.state.progress[1])
        self._unwatch_paint()
        self.train_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.save_button.setEnabled(self.model is not None or job.trainer is not None)
        self.export_button.setEnabled(self.save_button.isEnabled())

    # ------------------------------------------------------------------------------ lifecycle

    def on_closing(self) -> None:
        self._unwatch_paint()
        self._close_activity()


def save_problem(folder: Path, err: BaseException) -> str:
    """Why saving into ``folder`` failed, in words (without repeating the folder)."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    if isinstance(err, MuViTError):
        text = str(err)
        prefix = f"{folder}: "
        return text[len(prefix):] if text.startswith(prefix) else text
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename and Path(err.filename) != folder else ""
        return f"{err.strerror}{where}"
    return error_message(err)


def predict_widgets(viewer: Any) -> list[Any]:
    """PredictWidgets docked in ``viewer`` (found through the registry of live instances)."""
    from napari_muvit.widgets.predict import PredictWidget

    viewer = L.unwrap(viewer)
    return [w for w in PredictWidget.instances() if w.viewer is viewer]

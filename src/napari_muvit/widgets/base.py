"""The dock base shared by the panels: viewer wiring, state binding, settings, shutdown.

:class:`DockPanel` owns a panel's evented state (:mod:`.state`) and does what both panels need:

* **Bound controls.**  :class:`Form` builds a Qt control for a state field, shows the field's
  value and writes edits back; a field set from code (a script, a test, the panel itself)
  updates its control.  Combo boxes list the field's ``choices``.
* **Layer choices.**  :meth:`DockPanel.layer_choice` adds a combo box of the viewer's layers of
  one kind, bound to a state field holding the layer name and refreshed when layers are added,
  removed, moved or renamed.
* **Settings.**  The state is restored from the settings file when the panel opens and saved
  whenever a persisted field changes and when the panel closes.  The fields a state lists in
  ``PER_KIND`` are remembered per image kind: choosing an image of another kind (grayscale,
  RGB, n-channel) recalls what was chosen for that kind (:meth:`DockPanel.on_kind_recalled`).
* **Shutdown.**  When the panel or its viewer closes, running jobs are cancelled, callbacks of
  workers still in flight are cut (:class:`._workers.Lifeline`) and viewer events are
  disconnected, even if only the C++ side of the panel is destroyed.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qtpy.QtCore import QEvent, QObject
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from napari_muvit.widgets import _gc
from napari_muvit.widgets import _layers as L
from napari_muvit.widgets._workers import Lifeline
from napari_muvit.widgets.state import PanelState, choices_of, image_kind

log = logging.getLogger("napari_muvit.widgets")


def compact(combo: QComboBox) -> QComboBox:
    """Long entries (model paths, layer names) must not force the dock wider than the canvas."""
    combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
    combo.setMinimumContentsLength(12)
    return combo


def set_progress(bar: QProgressBar, value: int, maximum: int | None = None) -> None:
    """Update a progress bar without QProgressBar's synchronous ``repaint()``.

    ``QProgressBar.setValue`` repaints immediately whenever the shown percentage changes,
    which flushes the whole window including the OpenGL canvas (tens of ms per tile);
    with updates disabled during the change the repaint is scheduled instead.
    """
    bar.setUpdatesEnabled(False)
    try:
        if maximum is not None:
            bar.setRange(0, max(1, int(maximum)))
        bar.setValue(min(int(value), bar.maximum()))
    finally:
        bar.setUpdatesEnabled(True)


# ---------------------------------------------------------------------------------------------
# controls bound to state fields
# ---------------------------------------------------------------------------------------------


class Form:
    """Builds controls bound to fields of ``state`` into a ``QFormLayout``.

    Every method takes the field name first, adds one row and returns the control (without a
    layout the control is only built and bound, for placing it elsewhere).
    """

    def __init__(self, state: Any, layout: QFormLayout | None = None) -> None:
        self.state = state
        self.layout = layout

    def _row(self, label: str | None, control: QWidget, tooltip: str = "") -> None:
        if tooltip:
            control.setToolTip(tooltip)
        if self.layout is None:
            return
        if label is None:
            self.layout.addRow(control)
        else:
            self.layout.addRow(label, control)

    def row_with_button(self, label: str, control: QWidget, text: str,
                        tooltip: str = "") -> QPushButton:
        """A row of ``control`` (stretching) and a push button; returns the button."""
        button = QPushButton(text)
        if tooltip:
            button.setToolTip(tooltip)
        row = QHBoxLayout()
        row.addWidget(control, 1)
        row.addWidget(button)
        self.layout.addRow(label, row)
        return button

    def combo(self, name: str, label: str, tooltip: str = "",
              items: Sequence[str] | None = None) -> QComboBox:
        """A combo box of the field's ``choices`` (or ``items``), showing the field."""
        box = compact(QComboBox())
        box.addItems([str(v) for v in (items or choices_of(type(self.state), name) or ())])
        bind(box, self.state, name)
        self._row(label, box, tooltip)
        return box

    def spin(self, name: str, label: str, lo: int, hi: int, tooltip: str = "",
             special: str | None = None, step: int | None = None) -> QSpinBox:
        """An integer spin box; ``special`` is shown for the minimum (e.g. ``auto``)."""
        box = QSpinBox()
        box.setRange(lo, hi)
        if step is not None:
            box.setSingleStep(step)
        if special is not None:
            box.setSpecialValueText(special)
        bind(box, self.state, name)
        self._row(label, box, tooltip)
        return box

    def float_spin(self, name: str, label: str, lo: float, hi: float, tooltip: str = "",
                   decimals: int = 6, step: float | None = None) -> QDoubleSpinBox:
        box = QDoubleSpinBox()
        box.setDecimals(decimals)
        box.setRange(lo, hi)
        if step is not None:
            box.setSingleStep(step)
        bind(box, self.state, name)
        self._row(label, box, tooltip)
        return box

    def check(self, name: str, text: str, tooltip: str = "") -> QCheckBox:
        box = QCheckBox(text)
        bind(box, self.state, name)
        self._row(None, box, tooltip)
        return box

    def line(self, name: str, label: str, placeholder: str = "", tooltip: str = "") -> QLineEdit:
        edit = QLineEdit()
        edit.setPlaceholderText(placeholder)
        bind(edit, self.state, name)
        self._row(label, edit, tooltip)
        return edit

def bind(control: QWidget, state: Any, name: str) -> None:
    """Two-way binding of a Qt control and ``state.<name>`` (the state's value wins at first)."""
    signal = getattr(state.events, name)
    if isinstance(control, QCheckBox):
        show, changed, read = control.setChecked, control.toggled, control.isChecked
    elif isinstance(control, QSpinBox):
        show, changed, read = (lambda v: control.setValue(int(v))), control.valueChanged, control.value
    elif isinstance(control, QDoubleSpinBox):
        show, changed, read = (lambda v: control.setValue(float(v))), control.valueChanged, control.value
    elif isinstance(control, QComboBox):
        show, changed, read = (
            (lambda v: control.setCurrentText(str(v))), control.currentTextChanged,
            control.currentText,
        )
    elif isinstance(control, QLineEdit):
        show, changed, read = (lambda v: control.setText(str(v or ""))), control.textChanged, control.text
    else:  # pragma: no cover - a programming error
        raise TypeError(f"cannot bind a {type(control).__name__}")

    def to_control(value: Any) -> None:
        control.blockSignals(True)
        try:
            show(value)
        finally:
            control.blockSignals(False)

    to_control(getattr(state, name))
    changed.connect(lambda *_: setattr(state, name, read()))
    # psygnal holds the closure strongly: cut it when the control is deleted
    signal.connect(_alive(control, to_control))


def bind_label(label: QLabel, state: Any, name: str) -> None:
    """A label showing ``state.<name>`` (read-only)."""
    show = _alive(label, label.setText)
    show(getattr(state, name))
    getattr(state.events, name).connect(show)


def _alive(widget: QWidget, func: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``func`` that does nothing once ``widget``'s C++ object is deleted."""
    ref = weakref.ref(widget)

    def call(value: Any) -> None:
        if ref() is None:
            return
        try:
            func(value)
        except RuntimeError as err:  # "wrapped C/C++ object ... has been deleted"
            if "deleted" not in str(err):
                raise

    return call


# ---------------------------------------------------------------------------------------------
# the dock base
# ---------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """A combo box listing the viewer's layers of one kind, bound to a state field."""

    combo: QComboBox
    field: str
    kind: str  # napari layer type name, lower case: "image", "labels", "shapes", "points"
    none_item: str | None = None  # an extra first entry meaning "no layer"
    prefer_active: bool = False  # select the active layer when the current one is gone
    accept: Callable[[Any], bool] | None = None  # preferred layers (all if none qualifies)
    strict: bool = False  # only accepted layers, even when none qualifies


def layer_kind(layer: Any) -> str:
    return type(layer).__name__.lower()


def plane_channels(layer: Any, plane: L.LayerPlane) -> int:
    """How many channels a model reads from ``layer``'s ``plane`` (nothing is read)."""
    if plane.rgb:
        return int(L.layer_levels(layer)[0].shape[-1])
    if plane.channel_axis is not None:
        return int(plane.level_shapes[0][plane.channel_axis])
    return 1


def layer_image_kind(layer: Any) -> str:
    """:func:`~.state.image_kind` of an image layer (its level-0 data shape)."""
    rgb = bool(getattr(layer, "rgb", False))
    return image_kind(tuple(L.layer_levels(layer)[0].shape), rgb)


class DockPanel(QWidget):
    """Base of the napari-muvit dock widgets (see the module docstring).

    Subclasses set ``STATE`` (a :class:`~.state.PanelState` class), build their controls in
    :meth:`build`, and may override :meth:`on_viewer_connected` and :meth:`on_closing`.
    """

    STATE: ClassVar[type[PanelState]]

    def __init__(self, napari_viewer: Any, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.viewer = L.unwrap(napari_viewer)
        self.lifeline = Lifeline()
        self.state = self.STATE.restored()
        self._connections: list[tuple[Any, Callable]] = []
        self._layer_choices: list[LayerChoice] = []
        self.image_kind: str | None = None  # kind of the selected image (state.image)
        self._recalling = False
        self.build()
        self._connect(self.state.events.all, self._on_state_field)
        if self.state.PER_KIND and hasattr(self.state.events, "image"):
            self._connect(self.state.events.image, self._on_image_kind)
            for name in self.state.PER_KIND:
                self._connect(getattr(self.state.events, name), self._remember_kind)
        self._connect_viewer()
        self.refresh_layer_choices()
        # Cleanup must run even if only the C++ side is destroyed (viewer closed): a closure
        # over the lifeline and the state, not ``self``.
        lifeline, state = self.lifeline, self.state
        self.destroyed.connect(lambda *_: shutdown(lifeline, state.jobs()))
        # long-lived objects out of Python's full collections while a panel is open (_gc.py)
        _gc.hold(self)
        self.destroyed.connect(lambda *_: _gc.release())
        window = getattr(getattr(self.viewer, "window", None), "_qt_window", None)
        if window is not None:
            self._close_filter = _CloseFilter(self.close_widget)
            window.installEventFilter(self._close_filter)

    # --------------------------------------------------------------------------- subclass API

    def build(self) -> None:
        """Create the controls (called once, before the viewer is connected)."""
        raise NotImplementedError

    def on_viewer_connected(self) -> None:
        """Connect further viewer events (with :meth:`_connect`)."""

    def on_layer_removed(self, layer: Any) -> None:
        """``layer`` left the viewer (after the panel's own bookkeeping)."""

    def on_closing(self) -> None:
        """Stop timers etc.; jobs are cancelled and events disconnected by the base."""

    def on_kind_recalled(self, kind: str, changed: list[str]) -> None:
        """Fields ``changed`` were set to what was chosen before for images of ``kind``."""

    @property
    def status(self) -> str:
        """The text of the status line (what the panel last reported)."""
        return self.state.status

    @property
    def running(self) -> bool:
        """Whether a job of this panel is still running."""
        return self.state.running

    busy = running

    @property
    def alive(self) -> bool:
        """False once the panel (or its viewer) was closed."""
        return self.lifeline.alive

    def set_status(self, text: str) -> None:
        self.state.status = text

    # --------------------------------------------------------------------------- export

    def export_model(self, model: Any, out: str | Path | None = None, layer: Any = None) -> Any:
        """Write ``model`` (a segmenter, model folder or package, ``None`` = bundled) as a
        bioimage.io package at ``out`` (asked with a file dialog when ``None``), in a worker,
        with the test tile from ``layer``'s displayed plane; returns the worker."""
        from napari.utils import progress

        from napari_muvit.errors import MuViTError
        from napari_muvit.widgets._workers import error_message, report_error, start_worker
        from napari_muvit.widgets.jobs import export_job

        if out is None:
            start = Path(self.state.output_dir if hasattr(self.state, "output_dir") else Path.home())
            path, _ = QFileDialog.getSaveFileName(
                self, "Export as a bioimage.io model package", str(start / "muvit_model.zip"),
                "bioimage.io package (*.zip)")
            if not path:
                return None
            out = path if path.lower().endswith(".zip") else path + ".zip"
        out = Path(out).expanduser().absolute()
        plane = None
        if layer is not None:
            try:
                plane = L.layer_plane(self.viewer, layer)
            except MuViTError:
                layer = None
        # napari's activity dock: an indeterminate bar while the package is written
        bar = progress(total=0, desc=f"MuViT export {out.name}")
        self.set_status(f"exporting the model → {out}…")

        def failed(err: BaseException) -> None:
            report_error(err, "MuViT export")
            self.set_status(f"export failed: {error_message(err)}")

        self.export_worker = start_worker(
            export_job, model, out, layer, plane, lifeline=self.lifeline,
            on_return=lambda path: self.set_status(f"exported a bioimage.io package → {path}"),
            on_error=failed,
        )
        self.export_worker.finished.connect(bar.close)  # also when the panel is gone by then
        return self.export_worker

    # --------------------------------------------------------------------------- layers

    def layer_choice(self, field: str, kind: str, **options: Any) -> QComboBox:
        """A combo box of the viewer's ``kind`` layers bound to ``state.<field>`` (a name)."""
        combo = compact(QComboBox())
        choice = LayerChoice(combo, field, kind, **options)
        self._layer_choices.append(choice)

        def chosen(*_: Any) -> None:
            setattr(self.state, field, combo.currentData())

        def shown(name: Any) -> None:
            index = combo.findData(name)
            if index >= 0 and index != combo.currentIndex():
                combo.blockSignals(True)
                combo.setCurrentIndex(index)
                combo.blockSignals(False)

        combo.currentIndexChanged.connect(chosen)
        getattr(self.state.events, field).connect(_alive(combo, shown))
        return combo

    def layer(self, field: str) -> Any:
        """The layer chosen in ``state.<field>`` (None if there is none of that kind)."""
        choice = next(c for c in self._layer_choices if c.field == field)
        name = getattr(self.state, field)
        for layer in self.viewer.layers:
            if layer.name == name and layer_kind(layer) == choice.kind:
                return layer
        return None

    def select_layer(self, field: str, layer: Any) -> None:
        """Choose ``layer`` for ``state.<field>``; raises InputError for a wrong layer."""
        from napari_muvit.errors import InputError

        choice = next(c for c in self._layer_choices if c.field == field)
        if layer is None and choice.none_item is not None:
            setattr(self.state, field, None)
            return
        if layer is None or choice.combo.findData(layer.name) < 0:
            name = getattr(layer, "name", layer)
            raise InputError(f"layer {name!r} is not a {choice.kind} layer of this viewer")
        setattr(self.state, field, layer.name)

    def refresh_layer_choices(self, *_: Any) -> None:
        """Re-list the layers of every layer combo (keeping each choice when possible)."""
        for choice in self._layer_choices:
            combo = choice.combo
            current = getattr(self.state, choice.field)
            layers = [la for la in self.viewer.layers if layer_kind(la) == choice.kind]
            if choice.accept is not None:
                accepted = [la for la in layers if choice.accept(la)]
                layers = accepted if choice.strict else (accepted or layers)
            names = [la.name for la in layers]
            combo.blockSignals(True)
            combo.clear()
            if choice.none_item is not None:
                combo.addItem(choice.none_item, None)
            for name in names:
                combo.addItem(name, name)
            prefer = current if current in names else None
            if prefer is None and choice.prefer_active:
                active = self.viewer.layers.selection.active
                if active is not None and active.name in names:
                    prefer = active.name
            if prefer is not None:
                combo.setCurrentIndex(combo.findData(prefer))
            combo.blockSignals(False)
            setattr(self.state, choice.field, combo.currentData())

    # --------------------------------------------------------------------------- viewer events

    def _connect(self, emitter: Any, callback: Callable) -> None:
        emitter.connect(callback)
        self._connections.append((emitter, callback))

    def _connect_viewer(self) -> None:
        layers = self.viewer.layers
        self._connect(layers.events.inserted, self._on_layers_changed)
        self._connect(layers.events.removed, self._on_layers_changed)
        self._connect(layers.events.moved, self._on_layers_changed)
        for layer in layers:
            self._connect(layer.events.name, self.refresh_layer_choices)
        self.on_viewer_connected()

    def _on_layers_changed(self, event: Any = None) -> None:
        layer = getattr(event, "value", None)
        kind = getattr(event, "type", "")
        if layer is not None and kind == "inserted":
            self._connect(layer.events.name, self.refresh_layer_choices)
        elif layer is not None and kind == "removed":
            for emitter, callback in list(self._connections):
                if getattr(emitter, "source", None) is layer:
                    emitter.disconnect(callback)
                    self._connections.remove((emitter, callback))
            self.on_layer_removed(layer)
            _gc.layer_removed(layer)
        self.refresh_layer_choices()

    def _disconnect_all(self) -> None:
        for emitter, callback in self._connections:
            try:
                emitter.disconnect(callback)
            except (RuntimeError, TypeError, ValueError):
                pass
        self._connections.clear()

    # --------------------------------------------------------------------------- settings

    def _on_image_kind(self, *_: Any) -> None:
        layer = self.layer("image")
        if layer is None:
            return
        kind = layer_image_kind(layer)
        if kind == self.image_kind:
            return
        self.image_kind = kind
        self._recalling = True
        try:
            changed = self.state.recall_kind(kind)
        finally:
            self._recalling = False
        if changed:
            self.on_kind_recalled(kind, changed)

    def _remember_kind(self, *_: Any) -> None:
        if not self._recalling and self.image_kind is not None and self.lifeline.alive:
            self.state.remember_kind(self.image_kind)

    def _on_state_field(self, info: Any) -> None:
        if self.lifeline.alive and self.state.is_persisted(info.signal.name):
            self.state.save()

    # --------------------------------------------------------------------------- lifecycle

    def close_widget(self) -> None:
        """Stop jobs, save the settings and disconnect from the viewer (idempotent)."""
        if not self.lifeline.alive:
            return
        self.state.save()
        shutdown(self.lifeline, self.state.jobs())
        self.on_closing()
        self._disconnect_all()
        _gc.release(self)

    def closeEvent(self, event: Any) -> None:
        self.close_widget()
        super().closeEvent(event)


def shutdown(lifeline: Lifeline, jobs: list[Any]) -> None:
    """Cut callbacks and cancel jobs (safe to call twice, from a destroyed-signal too)."""
    lifeline.alive = False
    for job in jobs:
        job.cancel()
        bar = getattr(job, "progress_bar", None)
        if bar is not None:
            try:
                bar.close()
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

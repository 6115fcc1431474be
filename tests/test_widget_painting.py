"""Time-sliced painting of streamed tiles (widgets/_painting.py and the predict panel's timer).

The queue itself is tested without Qt (a fake clock); the panel in a real napari viewer, with
a tiny model: sliced painting paints every tile, in the engine's centre-first order, equal to
painting each tile on arrival and to the engine's own result, through napari's partial
Labels refresh, with the event loop running between slices; a cancel with tiles still queued
leaves a consistent layer.  No assertion depends on how fast the machine is.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_muvit.widgets._painting import PaintBatch, PaintQueue


class _Result:
    def __init__(self, regions=(), dirty=()):
        self.regions = list(regions)
        self.dirty = list(dirty)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_paint_queue_applies_in_order_within_the_budget_and_flushes_once_per_slice():
    clock = _Clock()
    applied: list[int] = []
    batches: list[PaintBatch] = []
    layer_a, layer_b = object(), object()

    def apply(item):
        applied.append(item)
        clock.now += 0.010 if item != 99 else 0.100  # 10 ms per message, 100 ms for one
        if item % 2:
            return _Result(regions=[(layer_a, ("a", item))], dirty=[layer_b])
        return _Result(regions=[(layer_b, ("b", item))]) if item < 50 else None

    queue = PaintQueue(apply, batches.append, clock=clock)
    for item in range(8):
        queue.push(item)
    assert queue.pending == 8
    # 25 ms budget: three 10 ms messages per slice, the third one crossing the budget
    assert queue.run(0.025) == 3
    assert applied == [0, 1, 2] and queue.pending == 5
    assert len(batches) == 1
    regions = batches[0].regions
    assert regions[id(layer_a)] == (layer_a, [("a", 1)])
    assert regions[id(layer_b)] == (layer_b, [("b", 0), ("b", 2)])
    assert list(batches[0].dirty.values()) == [layer_b]
    assert queue.run(0.025) == 3 and queue.run(0.025) == 2  # the rest: 3, 4, 5, then 6, 7
    # messages pushed later come after the ones queued before
    queue.push(99)
    queue.push(60)
    queue.push(61)
    assert queue.run(0.025) == 1  # 99 alone exceeds the budget: still one per slice
    assert queue.run(None) == 2  # None: everything left
    assert applied == [0, 1, 2, 3, 4, 5, 6, 7, 99, 60, 61] and queue.pending == 0
    assert len(batches) == 5  # one flush per slice
    assert queue.run(0.025) == 0 and len(batches) == 5  # nothing queued: no flush
    queue.push(60)
    assert queue.run(None) == 1 and len(batches) == 5  # nothing changed: no flush


def test_paint_queue_shows_what_was_painted_before_an_error():
    batches: list[PaintBatch] = []
    layer = object()

    def apply(item):
        if item == "bad":
            raise ValueError("broken tile")
        return _Result(regions=[(layer, item)])

    queue = PaintQueue(apply, batches.append)
    for item in ("t1", "bad", "t2"):
        queue.push(item)
    with pytest.raises(ValueError, match="broken tile"):
        queue.run(None)
    assert batches[0].regions[id(layer)] == (layer, ["t1"])
    assert queue.pending == 1  # the next slice goes on with the rest
    assert queue.run(None) == 1 and batches[1].regions[id(layer)] == (layer, ["t2"])


# ------------------------------------------------------------------------------------ napari

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")


def test_default_label_colours_are_those_of_a_new_labels_layer():
    from napari.layers import Labels

    from napari_muvit.widgets import _layers as L

    values = np.arange(0, 300)
    np.testing.assert_array_equal(L._annotation_colormap().map(values),
                                  Labels(np.zeros((1, 1), np.uint8)).colormap.map(values))


TILE = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from _predict_support import tiny_segmenter

    seg = tiny_segmenter(crop=TILE)
    return seg.save(tmp_path_factory.mktemp("models") / "tiny")


def _panel(make_napari_viewer, qtbot, model_dir, images):
    from napari_muvit.widgets import PredictWidget

    viewer = make_napari_viewer(show=True)
    layers = [viewer.add_image(data, name=name) for name, data in images.items()]
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MuViT predict")
    widget.set_model(model_dir)
    widget.device_combo.setCurrentText("cpu")
    widget.overlap_spin.setValue(0)  # tiles on the crop grid: compared tile by tile below
    widget.batch_spin.setValue(2)
    viewer.window._qt_window.resize(1100, 800)
    qtbot.wait(100)
    viewer.reset_view()  # the whole image: 8 x 8 tiles
    qtbot.wait(50)
    return viewer, layers, widget


def _run_view(qtbot, widget, layer):
    widget.image_layer = layer
    assert widget.predict_view() is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    return widget.state.view_job


def _record(widget, monkeypatch):
    """Arrival order of tiles, paint order, slices and ticks of a 0 ms timer between them."""
    from qtpy.QtCore import QTimer

    from napari_muvit.widgets import _layers as L

    log = {"arrived": [], "painted": [], "events": [], "regions": [], "full": [], "backlog": [],
           "pending": []}
    queue_view, paint = widget._queue_view, widget.outputs.paint
    paint_slice = widget._paint_slice

    def queued(job, msg):
        if hasattr(msg, "tile"):
            log["arrived"].append(tuple(msg.tile.grid))
        queue_view(job, msg)

    def painted(target, plane, res):
        log["painted"].append(tuple(res.tile.grid))
        return paint(target, plane, res)

    def sliced():
        log["events"].append("slice")
        log["backlog"].append(len(log["events"]) - 1)  # where a slice started ...
        log["pending"].append(widget._painter.pending)  # ... and how much was queued
        paint_slice()

    monkeypatch.setattr(widget, "_queue_view", queued)
    monkeypatch.setattr(widget.outputs, "paint", painted)
    monkeypatch.setattr(widget, "_paint_slice", sliced)
    widget._paint_timer.timeout.disconnect()
    widget._paint_timer.timeout.connect(sliced)
    regions, full = L.refresh_regions, L.refresh_data
    monkeypatch.setattr(
        L, "refresh_regions",
        lambda layer, keys: log["regions"].append(len(keys)) or regions(layer, keys))
    monkeypatch.setattr(L, "refresh_data", lambda layer: log["full"].append(layer) or full(layer))
    ticker = QTimer()
    ticker.setInterval(0)
    ticker.timeout.connect(lambda: log["events"].append("tick"))
    ticker.start()
    log["ticker"] = ticker
    return log


def test_sliced_painting_equals_painting_on_arrival_centre_first(
    make_napari_viewer, qtbot, model_dir, monkeypatch
):
    from napari_muvit.data import PyramidSource, synthetic_rings
    from napari_muvit.engine.predictor import Predictor
    from napari_muvit.model import load_model
    from napari_muvit.widgets import _layers as L
    from napari_muvit.widgets import predict

    data = synthetic_rings(256, seed=5, min_level_size=64).pyramid[0]
    viewer, (sliced_layer, direct_layer), widget = _panel(
        make_napari_viewer, qtbot, model_dir, {"sliced": data, "direct": data.copy()})
    monkeypatch.setattr(L, "_FAST_REFRESH_FAILURES", set())

    # the finest slicing: one message per slice
    monkeypatch.setattr(predict, "PAINT_SLICE_S", 1e-9)
    log = _record(widget, monkeypatch)
    job = _run_view(qtbot, widget, sliced_layer)
    log["ticker"].stop()
    sliced = np.asarray(widget.labels_layer(sliced_layer).data).copy()

    assert job.total == 64 and job.painted == 64, "every tile painted"
    assert log["painted"] == log["arrived"], "painted in the order the engine streamed them"
    cells = np.array(log["painted"], dtype=float)
    centre = job.request.region.mean(axis=0) / TILE  # in grid cells
    distance = np.hypot(*(cells + 0.5 - centre).T)
    assert distance[0] == distance.min() and distance[-1] == distance.max(), "centre first"
    slices = log["events"].count("slice")
    assert slices >= 64 + 2  # the handshake, 64 tiles and the end, each in its own slice
    # the event loop ran between slices (a 0 ms timer ticked in between)
    starts = log["backlog"]
    assert "tick" in log["events"][starts[0]:starts[-1]]
    # napari's partial Labels refresh, one upload per slice, never a full refresh
    assert len(log["regions"]) == 64 and set(log["regions"]) == {1}
    assert not [layer for layer in log["full"] if layer is widget.labels_layer(sliced_layer)]
    assert not L._FAST_REFRESH_FAILURES
    shown = np.asarray(widget.labels_layer(sliced_layer)._slice.image.raw)
    np.testing.assert_array_equal(shown, sliced)  # what is on screen is the data
    assert "view done: 64 tiles" in widget.status
    # the output layer's tool overlays are built when their tool is first switched on
    out = widget.labels_layer(sliced_layer)
    qtbot.waitUntil(lambda: viewer.layers.selection.active is out, timeout=10_000)
    _assert_tools_built_when_switched_on(viewer, out)

    # painting every message on arrival (as before time slicing): the same labels
    monkeypatch.setattr(predict, "PAINT_SLICE_S", None)
    _run_view(qtbot, widget, direct_layer)
    direct = np.asarray(widget.labels_layer(direct_layer).data)
    np.testing.assert_array_equal(sliced, direct)
    # and the engine's result on the whole image
    source = PyramidSource.from_layer_data(data, multiscale=False, rgb=False)
    expected = Predictor(load_model(model_dir), device="cpu").predict(source).labels
    np.testing.assert_array_equal(sliced, expected)


def test_cancel_with_tiles_queued_paints_them_all_and_leaves_whole_tiles(
    make_napari_viewer, qtbot, model_dir, monkeypatch
):
    import time

    from napari_muvit.data import synthetic_rings
    from napari_muvit.widgets import predict

    data = synthetic_rings(256, seed=6, min_level_size=64).pyramid[0]
    viewer, (layer,), widget = _panel(make_napari_viewer, qtbot, model_dir, {"rings": data})
    monkeypatch.setattr(predict, "PAINT_SLICE_S", 1e-9)
    log = _record(widget, monkeypatch)
    paint = widget.outputs.paint

    def slow_paint(target, plane, res):
        time.sleep(0.03)  # painting slower than the engine: tiles queue up
        return paint(target, plane, res)

    monkeypatch.setattr(widget.outputs, "paint", slow_paint)
    widget.image_layer = layer
    widget.predict_view()
    qtbot.waitUntil(lambda: widget._painter.pending >= 3 and widget.state.view_job.painted >= 1,
                    timeout=60_000)
    widget.cancel()
    queued_at_cancel = widget._painter.pending
    assert queued_at_cancel >= 3
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    log["ticker"].stop()
    job = widget.state.view_job
    assert job.token.cancelled and 1 <= job.painted < 64
    # nothing that arrived was dropped: every streamed tile is painted, in order
    assert job.painted == len(log["arrived"]) == len(log["painted"])
    assert log["painted"] == log["arrived"]
    out = np.asarray(widget.labels_layer().data)
    mask = np.zeros(out.shape, bool)
    for r, c in widget.outputs.target(layer).painted_cells():
        mask[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = True
    np.testing.assert_array_equal(out > 0, mask)  # whole tiles, nothing else
    assert "cancelled" in widget.status
    # with a backlog, the event loop still ran between two slices (a 0 ms timer ticked)
    starts = log["backlog"]
    between = [log["events"][a:b] for a, b, queued in zip(starts, starts[1:], log["pending"])
               if queued >= 2]
    assert between and any("tick" in events for events in between)


def _built(viewer, layer) -> tuple[bool, bool]:
    """Whether napari built the layer's vispy visual and its Qt layer controls."""
    from napari._qt.layer_controls.qt_layer_controls_base import QtLayerControls

    qt_viewer = viewer.window._qt_viewer
    controls = qt_viewer.controls.widgets.get(layer)
    return (layer in qt_viewer.canvas.layer_to_visual, isinstance(controls, QtLayerControls))


#: the Labels tools' overlays, drawn only while their tool is on
TOOL_OVERLAYS = {"polygon": "polygon", "brush_stroke": "paint"}


def _assert_tools_built_when_switched_on(viewer, layer) -> None:
    """A tool's overlay (and its vispy visual, 30-70 ms of GUI thread) waits for its tool; then
    it is napari's own: visible, built, and listening to the mouse on the layer."""
    visuals = viewer.window._qt_viewer.canvas._layer_overlay_to_visual
    for name in TOOL_OVERLAYS:
        assert not layer._overlays[name].visible
        assert layer._overlays[name] not in visuals.get(layer, {})
    for name, mode in TOOL_OVERLAYS.items():
        layer.mode = mode
        assert layer._overlays[name].visible and layer._overlays[name].enabled
        vispy_overlay = visuals[layer][layer._overlays[name]]
        assert vispy_overlay._on_mouse_press in layer.mouse_drag_callbacks
    layer.mode = "pan_zoom"
    assert all(layer._overlays[name].visible for name in TOOL_OVERLAYS)  # as napari's


def test_a_new_layer_is_added_in_steps_ending_as_napari_adds_it(make_napari_viewer):
    """The expensive pieces of adding a layer (visuals, controls, each tool overlay, the first
    draw, selecting it) run one per turn of the event loop; the end state is napari's."""
    from napari_muvit.widgets import _layers as L

    viewer = make_napari_viewer()
    usual = viewer.add_labels(np.zeros((32, 32), np.uint8), name="usual")
    expected = {name: o.visible for name, o in usual._overlays.items()}
    assert expected["polygon"] and expected["brush_stroke"]  # napari builds both at once
    assert _built(viewer, usual) == (True, True)

    steps: list = []
    data = np.zeros((32, 32), np.uint8)
    data[3:9, 4:7] = 2
    layer = L.add_labels_in_steps(viewer, data, steps.append, name="stepwise", opacity=0.6,
                                  scale=(2.0, 3.0), translate=(5.0, -1.0))
    # in the layer list at once (the panels find it), but hidden, nothing built, not selected
    assert layer in viewer.layers and layer.opacity == 0.6
    assert not layer.visible and viewer.layers.selection.active is usual
    assert _built(viewer, layer) == (False, False)
    assert not any(o.visible for o in layer._overlays.values())
    staged = steps[0].__self__
    count = 0
    # shown now: the overlays napari shows that are not a tool's (none in napari 0.9)
    overlays = sum(v for name, v in expected.items() if name not in TOOL_OVERLAYS)
    while steps:  # one piece per turn of the event loop
        steps.pop(0)()
        count += 1
        if count == 1:
            # the visuals first: made, then placed in the scene graph
            assert _built(viewer, layer) == (False, False) and staged.made_visual is not None
        if count == 2:
            assert _built(viewer, layer) == (True, False) and staged.made_visual is None
        if count == 3:
            assert layer.visible and not any(o.visible for o in layer._overlays.values())
        if count == 5 + overlays:
            # the controls are made, not yet in napari's table (two pieces of Qt work)
            assert _built(viewer, layer) == (True, False)
        if count == 6 + overlays:
            assert _built(viewer, layer) == (True, True)  # then the controls
    # the visual made, placed; showing, the first draw, each overlay, making the controls,
    # adding them, selecting
    assert count == 4 + overlays + 3
    assert layer.visible and viewer.layers.selection.active is layer
    _assert_tools_built_when_switched_on(viewer, layer)
    assert {name: o.visible for name, o in layer._overlays.items()} == expected
    np.testing.assert_array_equal(layer.scale, (2.0, 3.0))
    np.testing.assert_array_equal(layer.translate, (5.0, -1.0))
    np.testing.assert_array_equal(layer._slice.image.raw, data)  # shown as it is
    # without ``defer``: napari's own add_labels
    plain = L.add_labels_in_steps(viewer, np.zeros((8, 8), np.uint8), name="plain")
    assert {name: o.visible for name, o in plain._overlays.items()} == expected
    assert plain.visible and viewer.layers.selection.active is plain


def test_building_a_hidden_layers_visual_and_showing_it_ask_for_no_frame(make_napari_viewer,
                                                                        qtbot):
    """A frame costs as long as building the visual (software OpenGL): the hidden layer's
    visual step draws nothing, nor does showing it (napari slices its data then); the step
    after draws it."""
    from napari_muvit.widgets import _layers as L

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.random.default_rng(0).random((64, 64), np.float32))
    scene = viewer.window._qt_viewer.canvas._scene_canvas
    draws: list = []
    scene.events.draw.connect(lambda event: draws.append(1))
    qtbot.waitUntil(lambda: bool(draws), timeout=5_000)  # the viewer draws at all
    qtbot.wait(100)
    steps: list = []
    layer = L.add_image_in_steps(viewer, np.ones((64, 64), np.float32), steps.append,
                                 select=False, name="map")
    qtbot.wait(100)
    draws.clear()
    steps.pop(0)()  # the visual made
    steps.pop(0)()  # and placed in the scene graph
    assert layer in viewer.window._qt_viewer.canvas.layer_to_visual
    qtbot.wait(200)
    assert not draws
    assert "update" not in vars(scene)  # the canvas asks for frames again
    steps.pop(0)()  # showing it
    assert layer.visible
    qtbot.wait(200)
    assert not draws
    assert "update" not in vars(scene)
    steps.pop(0)()  # its first draw
    qtbot.waitUntil(lambda: bool(draws), timeout=5_000)


def test_a_layer_added_in_steps_leaves_overlays_controls_and_selection_for_a_quiet_moment(
        make_napari_viewer):
    """With ``settled``, the visual and the first draw come at once, while a prediction may
    still stream tiles; the tool overlays, controls and selection are deferred with
    ``settled=True`` (the predict panel runs those once no job runs or paints)."""
    from napari_muvit.widgets import _layers as L

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((32, 32), np.float32), name="image")
    queued: list = []

    def defer(callback, settled=False):
        queued.append((callback, settled))

    layer = L.add_labels_in_steps(viewer, np.zeros((32, 32), np.uint8), defer,
                                  settled=True, name="output")
    flags = []
    while queued:
        callback, settled = queued.pop(0)
        flags.append(settled)
        callback()
    overlays = sum(o.visible for o in layer._overlays.values())
    # deferred: the visual (made, placed), showing it, its first draw; each overlay, controls
    # (made, then added) and selecting wait for a quiet moment
    assert flags == [False] * 4 + [True] * (overlays + 3)
    assert _built(viewer, layer) == (True, True) and layer.visible
    assert viewer.layers.selection.active is layer and image in viewer.layers
    _assert_tools_built_when_switched_on(viewer, layer)


def test_a_layer_added_in_steps_can_be_selected_or_removed_before_the_last_step(
        make_napari_viewer):
    """napari's handlers of selecting or removing a layer need its controls and visual: the
    remaining steps run at once (no error, nothing left behind); ``select`` is asked at the
    last step."""
    from napari_muvit.widgets import _layers as L

    viewer = make_napari_viewer()
    keep = viewer.add_labels(np.zeros((16, 16), np.uint8), name="painting")
    steps: list = []
    removed = L.add_labels_in_steps(viewer, np.zeros((16, 16), np.uint8), steps.append,
                                    name="removed early")
    steps.pop(0)()  # the visual only
    viewer.layers.remove(removed)
    assert removed not in viewer.layers and _built(viewer, removed) == (False, False)
    while steps:
        steps.pop(0)()  # what was queued still runs, harmlessly
    assert viewer.layers.selection.active is keep

    chosen = L.add_labels_in_steps(viewer, np.zeros((16, 16), np.uint8), steps.append,
                                   name="selected early")
    viewer.layers.selection.active = chosen  # the user clicks it in the layer list
    assert _built(viewer, chosen) == (True, True) and chosen.visible
    assert viewer.layers.selection.active is chosen
    controls = viewer.window._qt_viewer.controls
    assert controls.currentWidget() is controls.widgets[chosen]  # its controls are shown
    steps.clear()

    asked: list = []
    quiet = L.add_labels_in_steps(viewer, np.zeros((16, 16), np.uint8), steps.append,
                                  name="not selected", select=lambda: asked.append(1) or False)
    viewer.layers.selection.active = keep
    while steps:
        steps.pop(0)()
    assert asked and viewer.layers.selection.active is keep and quiet.visible
    # not selected: its controls are built when it is first selected, not before
    assert _built(viewer, quiet) == (True, False)
    viewer.layers.selection.active = quiet
    assert _built(viewer, quiet) == (True, True)
    assert controls.currentWidget() is controls.widgets[quiet]
    assert [la.name for la in viewer.layers] == ["painting", "selected early", "not selected"]
    # one never selected is removed cleanly (its placeholder with it)
    ghost = L.add_labels_in_steps(viewer, np.zeros((16, 16), np.uint8), steps.append,
                                  name="never selected", select=False)
    while steps:
        steps.pop(0)()
    count = controls.count()
    viewer.layers.remove(ghost)
    assert ghost not in controls.widgets and controls.count() == count - 1
    assert viewer.layers.selection.active is quiet
    # between making its controls and adding them: selecting it adds those very controls,
    # removing it drops them (nothing left connected to the layer)
    late = L.add_labels_in_steps(viewer, np.zeros((16, 16), np.uint8), steps.append,
                                 name="made controls")
    staged = steps[0].__self__
    while staged.made is None:
        steps.pop(0)()
    made = staged.made
    viewer.layers.selection.active = late
    assert controls.widgets[late] is made and controls.currentWidget() is made
    steps.clear()
    gone = L.add_labels_in_steps(viewer, np.zeros((16, 16), np.uint8), steps.append,
                                 name="removed with made controls")
    staged = steps[0].__self__
    while staged.made is None:
        steps.pop(0)()
    made, count = staged.made, controls.count()
    closed: list = []
    made.close = lambda: closed.append(True)
    viewer.layers.remove(gone)
    assert closed and staged.made is None and controls.indexOf(made) == -1
    assert controls.count() == count - 1  # its placeholder went with it
    while steps:
        steps.pop(0)()
    assert gone not in controls.widgets


def test_the_predict_panel_adds_its_output_layers_in_steps_before_painting_tiles(
        make_napari_viewer, qtbot, model_dir, monkeypatch):
    """The view's output layers are in the layer list (hidden, not built yet) before its
    first tile is painted; they end built, shown, aligned with the image, the labels selected
    (once the view is done) unless the user is painting on another layer."""
    from napari.layers import Labels

    from napari_muvit.data import synthetic_rings

    images = {"painting": synthetic_rings(128, seed=7, min_level_size=32).pyramid[0],
              "plain": synthetic_rings(128, seed=8, min_level_size=32).pyramid[0]}
    viewer, (painting, plain), widget = _panel(make_napari_viewer, qtbot, model_dir, images)
    for layer in (painting, plain):
        layer.scale, layer.translate = (0.5, 2.0), (10.0, -4.0)
    viewer.reset_view()
    inserted: list = []
    viewer.layers.events.inserted.connect(
        lambda event: inserted.append((event.value, event.value.visible,
                                       _built(viewer, event.value))))
    first_tile: list = []
    paint = widget.outputs.paint

    def painted(target, plane, res):
        if not first_tile:
            first_tile.append((target.labels in viewer.layers, target.confidence is None
                               or target.confidence in viewer.layers,
                               viewer.layers.selection.active is target.labels,
                               target.confidence is None,
                               target.labels.visible and _built(viewer, target.labels)[0]))
        return paint(target, plane, res)

    widget.outputs.paint = painted
    from napari_muvit.widgets import _layers as L
    from napari_muvit.widgets.jobs import Job

    answers: list = []  # (go, the new labels layer shown and its visual built) at the answer
    answer = Job.answer

    def answered(job, proceed):
        if job.kind == "view":
            out = widget.labels_layer(job.request.layer)
            answers.append((bool(proceed), out is not None and out.visible
                            and _built(viewer, out)[0] and not L.first_draw_pending(out)))
        return answer(job, proceed)

    monkeypatch.setattr(Job, "answer", answered)
    notes = viewer.add_labels(np.zeros((128, 128), np.uint8), name="notes",
                              scale=(0.5, 2.0), translate=(10.0, -4.0))
    notes.mode = "paint"  # the user is annotating: the selection stays on their layer
    _run_view(qtbot, widget, painting)
    out = widget.labels_layer(painting)
    # the worker starts its tiles once the new layer is shown (visual built, first drawn)
    assert answers == [(True, True)]
    assert first_tile == [(True, True, False, True, True)]
    assert [(la, visible, built) for la, visible, built in inserted
            if la is out] == [(out, False, (False, False))]
    assert viewer.layers.selection.active is notes

    # not painting (the image is active), with the confidence layer
    viewer.layers.selection.active = plain
    inserted.clear()
    first_tile.clear()
    widget.state.confidence = True
    job = _run_view(qtbot, widget, plain)
    assert job.painted == job.total > 0
    out, conf = widget.labels_layer(plain), widget.confidence_layer(plain)
    # selected only once the view is done: its controls wait for a quiet moment; the
    # confidence map's layer is made then too (its tiles are written into its levels)
    assert first_tile == [(True, True, False, True, True)]
    assert {la.name: (visible, built) for la, visible, built in inserted} == {
        out.name: (False, (False, False)), conf.name: (False, (False, False))}
    usual = Labels(np.zeros((2, 2), np.uint8))._overlays
    for layer in (out, conf):
        assert layer.visible and _built(viewer, layer) == (True, True)
        np.testing.assert_array_equal(layer.scale, plain.scale)
        np.testing.assert_array_equal(layer.translate, plain.translate)
    assert not any(out._overlays[name].visible for name in TOOL_OVERLAYS)
    assert {n: o.visible for n, o in out._overlays.items() if n not in TOOL_OVERLAYS} == {
        n: o.visible for n, o in usual.items() if n not in TOOL_OVERLAYS}
    np.testing.assert_array_equal(out._slice.image.raw, np.asarray(out.data))  # shown
    assert np.count_nonzero(np.asarray(out.data)) > 0
    # the confidence tiles written before its layer was made are in it
    assert np.count_nonzero(np.asarray(conf.data)) > 0.9 * np.asarray(conf.data).size
    assert viewer.layers.selection.active in (out, conf)  # napari's rule: the newest output

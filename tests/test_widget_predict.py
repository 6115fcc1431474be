"""PredictWidget in a real napari viewer (run under Xvfb; see README).

Tiny model (dim 48, 1 layer, tile 32) on small images so that the whole file stays within a few
tens of seconds on two CPU cores.  Each test drives the widget through its scripting surface
(``predict_view``/``set_live``/``predict_image``/``cancel``) and checks the numbers: where the
labels land, how many tiles the engine computed, what is on disk, how long the event loop
stalled.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import QTimer

from napari_muvit.data import PyramidSource, synthetic_rings
from napari_muvit.data.geometry import grid_cells
from napari_muvit.engine.predictor import Predictor
from napari_muvit.model import MuViTEncoder, MuViTSegmenter, load_model

pytestmark = pytest.mark.gui

TILE = 32
LIVE_WAIT_MS = 400  # > the widget's 300 ms debounce
SCALE = (0.5, 0.75)
TRANSLATE = (10.0, -20.0)


def _tiny_segmenter(label_values=(1, 2, 3), seed=0) -> MuViTSegmenter:
    import torch

    torch.manual_seed(seed)
    enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2)
    return MuViTSegmenter(
        enc,
        num_classes=3,
        head_dim=32,
        class_names=["background", "outer", "inner"],
        # Sparse-style values (never 0): every predicted pixel is non-zero, so "written"
        # is visible in the layer data.
        label_values=list(label_values),
        meta={"crop_size": TILE},
    )


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    a = _tiny_segmenter(seed=0).save(root / "tiny_a")
    b = _tiny_segmenter(seed=1).save(root / "tiny_b")
    return Path(a), Path(b)


@pytest.fixture(scope="module")
def rings() -> list[np.ndarray]:
    return synthetic_rings(512, seed=3, min_level_size=128).pyramid


class Heartbeat:
    """Records the longest gap between ticks of a 10 ms QTimer (= event-loop stall).

    Windows can be paused so that napari's own reaction to a camera move (reslicing and
    redrawing the image, which happens with or without this plugin) can be measured apart
    from the plugin's live-prediction work that follows it.
    """

    def __init__(self, interval_ms: int = 10) -> None:
        self.interval = interval_ms / 1000
        self.timer = QTimer()
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.last = None
        self.max_gap = 0.0
        self.ticks = 0

    def _tick(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.max_gap = max(self.max_gap, now - self.last)
        self.last = now
        self.ticks += 1

    def start(self) -> None:
        self.last = None
        self.timer.start()

    def pause(self) -> None:
        self.timer.stop()
        self.last = None

    def stop(self) -> float:
        self.timer.stop()
        return self.stall

    @property
    def stall(self) -> float:
        return max(0.0, self.max_gap - self.interval)


def idle_stall(qtbot, ms: int = 1000) -> float:
    """Longest stall of the event loop while nothing of ours runs (machine noise).

    The CI box is shared (2 cores): when other processes load it, even an idle Qt loop misses
    its timers by tens of ms. The responsiveness budget is 100 ms *on top of* that noise.
    """
    beat = Heartbeat()
    beat.start()
    qtbot.wait(ms)
    return beat.stop()


def qtbot_process_events() -> None:
    from qtpy.QtWidgets import QApplication

    for _ in range(3):
        QApplication.processEvents()
        time.sleep(0.01)


def _viewer_with_widget(make_napari_viewer, model_dir, data, **image_kwargs):
    from napari_muvit.widgets import PredictWidget

    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(data, name="rings", **image_kwargs)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MuViT predict")
    viewer.window._qt_window.resize(1100, 800)
    qtbot_process_events()
    widget.set_model(model_dir)
    widget.device_combo.setCurrentText("cpu")
    widget.overlap_spin.setValue(0)  # tiles on the crop grid: compared tile by tile below
    widget.image_layer = layer
    return viewer, layer, widget


def _wait_worker(qtbot, worker, timeout=60_000) -> None:
    if worker is None:
        return
    if not worker.is_running and worker not in type(worker)._worker_set:
        return
    with qtbot.waitSignal(worker.finished, timeout=timeout, raising=False):
        pass
    qtbot.wait(20)


def _wait_idle(qtbot, widget, timeout=60_000) -> None:
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
    qtbot.wait(50)  # let queued tile signals and the finished handler run


def _expected_bbox(viewer, layer) -> np.ndarray:
    """Visible region in MuViT edge coordinates, computed independently of the widget."""
    h, w = viewer.window._qt_viewer.canvas.size  # the vispy canvas itself
    cy, cx = viewer.scene.camera.center[-2:]
    z = viewer.scene.camera.zoom
    world = np.array([[cy - h / (2 * z), cx - w / (2 * z)], [cy + h / (2 * z), cx + w / (2 * z)]])
    data = (world - np.asarray(layer.translate)) / np.asarray(layer.scale) + 0.5
    shape = np.asarray(layer.data[0].shape if layer.multiscale else layer.data.shape)
    return np.clip(data, 0, shape)


def _cells(bbox: np.ndarray, step: int) -> set[tuple[int, int]]:
    """Tile-grid cells touched by ``bbox`` (the grid itself is checked against the engine's
    tile plan in test_widget_state)."""
    return set(grid_cells(bbox, step))


def _cell_mask(cells, shape, step) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for r, c in cells:
        mask[r * step : (r + 1) * step, c * step : (c + 1) * step] = True
    return mask


def test_predict_view_lands_exactly_on_visible_region(make_napari_viewer, qtbot, model_dirs, rings):
    viewer, layer, widget = _viewer_with_widget(
        make_napari_viewer, model_dirs[0], rings, multiscale=True, scale=SCALE, translate=TRANSLATE
    )
    viewer.scene.camera.zoom = 6.0
    viewer.scene.camera.center = (60.0, 40.0)
    qtbot.wait(10)
    worker = widget.predict_view()
    assert worker is not None
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)

    expected = _expected_bbox(viewer, layer)
    region = widget.state.view_job.request.region
    np.testing.assert_allclose(region, expected, atol=1e-9)
    assert np.all(expected[1] - expected[0] > TILE)  # a real partial view, not the whole image

    labels = widget.labels_layer()
    assert labels is not None and labels.multiscale
    # same data->world mapping as the image: overlays pixel for pixel
    np.testing.assert_allclose(labels._data_to_world.affine_matrix, layer._data_to_world.affine_matrix)
    assert [a.shape for a in labels.data] == [a.shape for a in layer.data]

    out = np.asarray(labels.data[0])
    cells = _cells(expected, TILE)
    written = out > 0
    np.testing.assert_array_equal(written, _cell_mask(cells, out.shape, TILE))

    # identical to the engine run on the same region (grown to whole tiles)
    model = load_model(model_dirs[0])
    source = PyramidSource.from_layer_data(layer.data, multiscale=True, rgb=False)
    rows = [r for r, _ in cells]
    cols = [c for _, c in cells]
    y0, y1 = min(rows) * TILE, min((max(rows) + 1) * TILE, out.shape[0])
    x0, x1 = min(cols) * TILE, min((max(cols) + 1) * TILE, out.shape[1])
    sink = Predictor(model, device="cpu").predict(source, region=[[y0, x0], [y1, x1]])
    np.testing.assert_array_equal(out[y0:y1, x0:x1], sink.labels)
    assert widget.predictor.amp_dtype is None  # "auto" is float32 on CPU

    # coarse pyramid level: nearest samples of level 0
    coarse = np.asarray(labels.data[1])
    np.testing.assert_array_equal(coarse[y0 // 2 + 1 : y1 // 2 - 1, x0 // 2 + 1 : x1 // 2 - 1],
                                  out[1::2, 1::2][y0 // 2 + 1 : y1 // 2 - 1, x0 // 2 + 1 : x1 // 2 - 1])

    # class names and colours from the model
    assert list(labels.features["class"]) == ["background", "outer", "inner"]
    assert list(labels.features["index"]) == [1, 2, 3]
    assert labels.colormap.map(np.array([2]))[0][3] > 0
    assert "device cpu" in widget.model_info.text() and "tile 32 px" in widget.model_info.text()

    # Precision bf16 reaches the engine, and the view is repainted with the bf16 labels
    import torch

    widget.precision_combo.setCurrentText("bf16")
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert widget.predictor.amp_dtype == torch.bfloat16
    bf16 = Predictor(model, device="cpu", amp="bf16").predict(source, region=[[y0, x0], [y1, x1]])
    np.testing.assert_array_equal(np.asarray(widget.labels_layer().data[0])[y0:y1, x0:x1],
                                  bf16.labels)


def test_live_pan_computes_only_new_tiles_and_stays_responsive(
    make_napari_viewer, qtbot, model_dirs, rings
):
    viewer, _layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[0], rings[0])
    camera = viewer.scene.camera
    camera.zoom = 8.0
    camera.center = (100.0, 100.0)
    widget.cap_spin.setValue(500)

    noise = idle_stall(qtbot)
    # Baseline: napari alone reacting to the same kind of camera moves (live off).
    baseline = Heartbeat()
    baseline.start()
    for k in range(4):
        camera.center = (100.0 + 7 * k, 100.0 - 5 * k)
        qtbot.wait(60)
    base_stall = baseline.stop()
    camera.center = (100.0, 100.0)
    qtbot.wait(50)

    # First view, including napari adding the output layer (vispy visuals, layer controls):
    # a one-time cost of napari's add_labels, reported, not part of the streaming budget.
    first_beat = Heartbeat()
    first_beat.start()
    worker = widget.set_live(True)
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    first_stall = first_beat.stop()
    pred = widget.predictor
    first = _cells(widget.state.view_job.request.region, TILE)
    assert pred.stats["tiles_computed"] == len(first)
    calls_before = pred.stats["model_calls"]

    # Live navigation. ``streaming`` covers everything the plugin does after a camera move:
    # the debounce, starting the worker, the handshake, painting every tile, refreshes.
    streaming = Heartbeat()
    whole = Heartbeat()
    whole.start()

    def navigate(**camera_state) -> None:
        for name, value in camera_state.items():
            setattr(camera, name, value)
        qtbot.wait(60)  # napari reslices and redraws the image (same without the plugin)
        streaming.start()
        qtbot.wait(LIVE_WAIT_MS)
        _wait_idle(qtbot, widget)
        streaming.pause()

    # pan by exactly one tile (world = data here): one new row and column of tiles
    navigate(center=(100.0 + TILE, 100.0 + TILE))
    second = _cells(widget.state.view_job.request.region, TILE)
    new = second - first
    assert 0 < len(new) < len(second)
    assert pred.stats["tiles_computed"] == len(first) + len(new)
    assert pred.stats["model_calls"] > calls_before

    # panning back: nothing to compute, no model call
    computed, calls = pred.stats["tiles_computed"], pred.stats["model_calls"]
    navigate(center=(100.0, 100.0))
    assert (pred.stats["tiles_computed"], pred.stats["model_calls"]) == (computed, calls)
    assert "up to date" in widget.status

    # a burst of pans: debounced, only the final view is predicted
    starts = []
    widget.state.events.view_job.connect(lambda job: starts.append(job.request.live))
    for k in range(5):
        camera.center = (150.0 + 5 * k, 60.0 + 5 * k)
        qtbot.wait(40)
    navigate()
    assert starts == [True]
    # zoom out: more tiles streamed in
    navigate(zoom=5.0)
    whole_stall = whole.stop()
    last = _cells(widget.state.view_job.request.region, TILE)
    out = np.asarray(widget.labels_layer().data)
    assert np.all(_cell_mask(last, out.shape, TILE) <= (out > 0))
    print(
        f"\nevent-loop stall (ms): live streaming {streaming.stall * 1000:.1f} "
        f"over {streaming.ticks} ticks; whole live session incl. napari's pan handling "
        f"{whole_stall * 1000:.1f}; napari alone panning {base_stall * 1000:.1f}; first view "
        f"incl. adding the layer {first_stall * 1000:.1f}; idle loop noise {noise * 1000:.1f}"
    )
    assert streaming.ticks > 50
    # Stalls are printed, not asserted: a busy machine must not fail a test; the 100 ms goal is
    # measured by benchmarks/bench_ui.py.
    widget.set_live(False)
    assert not widget.live


def test_view_predicts_what_is_visible_and_live_uses_a_budget(
    make_napari_viewer, qtbot, model_dirs, rings
):
    viewer, _layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[0], rings[0])
    viewer.reset_view()  # the whole 512² image: 256 tiles of 32 px
    widget.cap_spin.setValue(30)  # live budget before a tile has been timed

    # live: the 30 tiles nearest the centre, then it says how many are left and how to finish
    worker = widget.set_live(True)
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    total = widget.state.view_job.total
    assert total == 256
    assert widget.predictor.stats["tiles_computed"] >= 30
    painted = np.asarray(widget.labels_layer().data) > 0
    assert painted.sum() == 30 * TILE * TILE
    ys, xs = np.nonzero(painted)
    centre = np.array(painted.shape) / 2
    assert np.hypot(ys.mean() - centre[0], xs.mean() - centre[1]) < 2 * TILE  # centre first
    assert "centre first" in widget.status and "click 'Predict view'" in widget.status
    widget.set_live(False)

    # one click finishes the view: every visible tile, however many the zoom needs
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    labels = widget.labels_layer()
    full = np.asarray(labels.data)
    assert np.all(full > 0), "the whole visible image is labelled"
    assert "view done: 226 tiles" in widget.status  # the 30 shown were not recomputed

    # a time budget once a tile was timed: 2 s at 0.25 s per tile = 8 tiles
    pred = widget.predictor
    pred.seconds_per_tile = 0.25
    widget.live_seconds_spin.setValue(2)
    assert widget._live_budget(pred) == 8
    # zoomed far out for live (256 new tiles > 10 x 8): not started, the labels stay
    widget.outputs.target(widget.image_layer).painted.clear()  # as if all 64 were new
    before = full.copy()
    computed = pred.stats["tiles_computed"]
    worker = widget.set_live(True)
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert "zoomed out too far" in widget.status and "Predict whole image" in widget.status
    assert "256 new tiles (about 64 s here)" in widget.status  # 256 tiles x 0.25 s
    assert pred.stats["tiles_computed"] == computed
    now = np.asarray(labels.data)
    np.testing.assert_array_equal(now, before)  # a refused request never clears labels
    widget.set_live(False)


def test_view_zoomed_in_with_confidence_layer(make_napari_viewer, qtbot, model_dirs, rings):
    viewer, _layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[0], rings[0])
    # zoomed in, within the cap, with the confidence layer
    widget.confidence_check.setChecked(True)
    camera = viewer.scene.camera
    camera.zoom = 40.0
    camera.center = (250.0, 250.0)
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    labels = np.asarray(widget.labels_layer().data)
    conf_layer = widget.confidence_layer()
    assert conf_layer is not None and conf_layer.contrast_limits == [0, 100]
    conf = np.asarray(conf_layer.data)
    written = labels > 0
    assert 0 < written.sum() <= 4 * TILE * TILE
    # the probability of the predicted class of 3 is at least 1/3
    assert conf[written].min() >= 33 and conf[written].max() <= 100
    assert not np.any(conf[~written])


def test_cancel_view_leaves_consistent_layer(make_napari_viewer, qtbot, model_dirs, rings):
    viewer, layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[0], rings[1])
    widget.cap_spin.setValue(1000)
    widget.batch_spin.setValue(2)
    viewer.reset_view()
    worker = widget.predict_view()
    qtbot.waitUntil(lambda: widget.state.view_job.painted >= 2, timeout=30_000)
    widget.cancel()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    job = widget.state.view_job
    assert job.token.cancelled and 2 <= job.painted < 64
    target = widget.outputs.target(layer)
    out = np.asarray(widget.labels_layer().data)
    painted = {cell for _, cell in target.painted}
    # every painted tile is complete, nothing else was written
    np.testing.assert_array_equal(out > 0, _cell_mask(painted, out.shape, TILE))
    assert "cancelled" in widget.status
    # predicting again fills in only the rest
    before = widget.predictor.stats["tiles_computed"]
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert np.all(np.asarray(widget.labels_layer().data) > 0)
    assert widget.predictor.stats["tiles_computed"] - before == 64 - len(painted)


def test_switch_models_and_layers_mid_run(make_napari_viewer, qtbot, model_dirs, rings):
    viewer, layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[0], rings[2])
    other = viewer.add_image(rings[2][::-1].copy(), name="flipped")
    widget.cap_spin.setValue(1000)
    widget.batch_spin.setValue(2)
    viewer.reset_view()
    w1 = widget.predict_view()
    qtbot.waitUntil(lambda: widget.state.view_job.painted >= 1, timeout=30_000)
    widget.set_model(model_dirs[1])  # switch model mid-run
    w2 = widget.predict_view()
    widget.image_layer = other  # and the layer
    w3 = widget.predict_view()
    for w in (w1, w2, w3):
        _wait_worker(qtbot, w)
    _wait_idle(qtbot, widget)
    # the last job finished the other layer with model B
    model_b = load_model(model_dirs[1])
    source = PyramidSource.from_layer_data(other.data, multiscale=False, rgb=False)
    expected = Predictor(model_b, device="cpu").predict(source).labels
    np.testing.assert_array_equal(np.asarray(widget.labels_layer(other).data), expected)
    # the first layer's output is consistent: only whole tiles, all from the one model its
    # layer belongs to (the job with model B was superseded before it painted anything)
    out_a = np.asarray(widget.labels_layer(layer).data)
    target_a = widget.outputs.target(layer)
    painted = {cell for _, cell in target_a.painted}
    assert painted
    mask = _cell_mask(painted, out_a.shape, TILE)
    np.testing.assert_array_equal(out_a > 0, mask)
    owner = load_model(target_a.identity[0].value)
    source_a = PyramidSource.from_layer_data(layer.data, multiscale=False, rgb=False)
    expected_a = Predictor(owner, device="cpu").predict(source_a).labels
    np.testing.assert_array_equal(out_a[mask], expected_a[mask])


def test_whole_image_to_zarr_cancel_resume_and_close(make_napari_viewer, qtbot, model_dirs, rings, tmp_path):
    from napari_muvit.engine.sinks import read_store_info

    viewer, layer, widget = _viewer_with_widget(
        make_napari_viewer, model_dirs[0], rings[1:], multiscale=True, scale=SCALE, translate=TRANSLATE
    )
    widget.batch_spin.setValue(4)
    out = tmp_path / "rings_muvit.zarr"
    worker = widget.predict_image(out)
    assert worker is not None
    qtbot.waitUntil(lambda: widget.state.image_job.painted >= 8, timeout=60_000)
    widget.cancel()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    job = widget.state.image_job
    assert read_store_info(out)["status"] == "incomplete"
    assert "resume" in widget.status
    lab_layer = job.target
    assert lab_layer.multiscale == (job.sink.n_levels > 1)
    np.testing.assert_allclose(lab_layer._data_to_world.affine_matrix, layer._data_to_world.affine_matrix)
    level0 = np.asarray(lab_layer.data[0] if lab_layer.multiscale else lab_layer.data)
    assert lab_layer.metadata["napari_muvit"]["store"] == str(out)
    done_cells = int(np.asarray(job.sink.group["done"]).sum())
    # consistent: exactly the done tiles are on disk
    assert 0 < done_cells < 64
    assert int((level0 > 0).sum()) == done_cells * TILE * TILE

    # resume: only the missing tiles, then complete and identical to the engine
    worker = widget.predict_image(out)
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert read_store_info(out)["status"] == "complete"
    assert widget.state.image_job.total == 64 - done_cells
    model = load_model(model_dirs[0])
    source = PyramidSource.from_layer_data(layer.data, multiscale=True, rgb=False)
    expected = Predictor(model, device="cpu").predict(source).labels
    final = widget.state.image_job.target
    np.testing.assert_array_equal(np.asarray(final.data[0] if final.multiscale else final.data), expected)
    assert "done" in widget.status

    # closing the viewer while a whole-image job runs does not crash
    widget.overwrite_check.setChecked(True)
    worker = widget.predict_image(tmp_path / "second.zarr")
    qtbot.waitUntil(lambda: widget.state.image_job.painted >= 1, timeout=60_000)
    job = widget.state.image_job
    viewer.close()
    qtbot.waitUntil(job.done.is_set, timeout=30_000)
    qtbot.wait(100)
    assert job.token.cancelled
    assert read_store_info(tmp_path / "second.zarr")["status"] == "incomplete"


def test_settings_persist_and_model_errors_are_notifications(
    official_fixtures, make_napari_viewer, qtbot, model_dirs, rings, monkeypatch, tmp_path
):
    from napari.utils import notifications

    from napari_muvit.widgets import PredictWidget
    from napari_muvit.widgets._settings import settings_path

    shown = []
    monkeypatch.setattr(notifications, "show_error", lambda msg: shown.append(msg))
    viewer, _layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[1], rings[2])
    widget.cap_spin.setValue(123)
    widget.overlap_spin.setValue(4)
    widget.precision_combo.setCurrentText("bf16")
    widget.confidence_check.setChecked(True)
    qtbot.waitUntil(lambda: "MuViT[1, 4]" in widget.model_info.text(), timeout=30_000)
    assert "overlap" not in widget.status.lower()

    # an official muvit encoder is not a segmenter: said clearly, pointing to fine-tuning
    widget.set_model(official_fixtures / "encoder")
    qtbot.waitUntil(lambda: "not a segmenter" in widget.model_info.text(), timeout=30_000)
    assert "official muvit" in widget.model_info.text()
    assert "Fine-tune" in widget.model_info.text()
    assert shown and "not a segmenter" in shown[-1] and "Traceback" not in shown[-1]
    # predicting with it: a notification with the cause, no exception
    shown.clear()
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert shown and "not a segmenter" in shown[-1]
    assert widget.labels_layer() is None

    # live mode with it: one notification, live switched off (no error per camera move)
    shown.clear()
    worker = widget.set_live(True)
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert not widget.live and not widget.live_check.isChecked()
    assert len(shown) == 1 and "live prediction stopped" in shown[0]
    viewer.scene.camera.zoom *= 1.5
    qtbot.wait(LIVE_WAIT_MS)
    assert len(shown) == 1

    # a folder that does not exist
    widget.set_model(tmp_path / "missing")
    qtbot.waitUntil(lambda: "does not exist" in widget.model_info.text(), timeout=30_000)

    # state survives the widget: a new one (next session) restores it
    widget.set_model(model_dirs[1])
    widget.device_combo.setCurrentText("cpu")
    widget.close_widget()
    assert settings_path().is_file()
    again = PredictWidget(viewer)
    assert again.cap_spin.value() == 123
    assert again.overlap_spin.value() == 4
    assert again.confidence_check.isChecked()
    assert again.device == "cpu"
    assert again.predictor_options.precision == "bf16"
    assert again.model_choice.value == str(model_dirs[1])
    recent = [again.model_combo.itemData(i) for i in range(again.model_combo.count())]
    assert any(str(official_fixtures / "encoder") in c.value for c in recent if c.value)
    again.close_widget()
    again.deleteLater()


def test_bundled_model_absence_is_explained(make_napari_viewer, qtbot, monkeypatch):
    from napari_muvit.errors import CheckpointError
    from napari_muvit.widgets import PredictWidget, _models

    def missing():
        raise CheckpointError("bundled model 'default_segmenter' is missing from /x")

    monkeypatch.setattr(_models, "bundled_segmenter_path", missing)
    viewer = make_napari_viewer()
    widget = PredictWidget(viewer)
    assert widget.model_choice.kind == "bundled"
    assert "missing" in widget.model_info.text()
    assert "Folder" in widget.model_info.text()
    widget.close_widget()
    widget.deleteLater()


def _tiny_channels(in_channels: int, folder: Path) -> Path:
    import torch

    torch.manual_seed(in_channels)
    enc = MuViTEncoder(in_channels, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2)
    seg = MuViTSegmenter(enc, num_classes=2, head_dim=32, label_values=[1, 2],
                         meta={"crop_size": TILE})
    return Path(seg.save(folder))


def test_nd_stack_predicts_the_displayed_plane(
    make_napari_viewer, qtbot, model_dirs, rings, tmp_path
):
    stack = np.stack([np.roll(rings[2], 7 * k, axis=1) for k in range(4)])  # (4, 128, 128)
    viewer, layer, widget = _viewer_with_widget(
        make_napari_viewer, model_dirs[0], stack, scale=(3.0, 0.5, 0.5), translate=(0, 5, 5)
    )
    widget.cap_spin.setValue(100)
    viewer.dims.set_point(0, 2 * 3.0)  # world z of plane 2
    viewer.reset_view()
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    out = widget.labels_layer()
    assert out.data.shape == stack.shape
    np.testing.assert_allclose(out._data_to_world.affine_matrix, layer._data_to_world.affine_matrix)
    data = np.asarray(out.data)
    assert np.all(data[2] > 0) and not np.any(data[[0, 1, 3]])
    model = load_model(model_dirs[0])
    expected = Predictor(model, device="cpu").predict(
        PyramidSource.from_layer_data(stack[2], multiscale=False, rgb=False)
    ).labels
    np.testing.assert_array_equal(data[2], expected)
    # live: moving the slider predicts the new plane only
    widget.set_live(True)
    _wait_idle(qtbot, widget)
    viewer.dims.set_point(0, 3 * 3.0)
    qtbot.wait(LIVE_WAIT_MS)
    _wait_idle(qtbot, widget)
    data = np.asarray(out.data)
    assert np.all(data[3] > 0) and not np.any(data[[0, 1]])
    widget.set_live(False)

    # whole image of the displayed plane: a 2-D store placed exactly on plane 3
    worker = widget.predict_image(tmp_path / "plane3.zarr")
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    whole = widget.state.image_job.target
    assert whole.ndim == 3 and whole.data.shape[0] == 1
    np.testing.assert_allclose(whole.data_to_world((0, 10, 20)), layer.data_to_world((3, 10, 20)))
    np.testing.assert_array_equal(np.asarray(whole.data)[0], data[3])


def test_rgb_and_multichannel_layers(make_napari_viewer, qtbot, rings, tmp_path):
    rgb_model = _tiny_channels(3, tmp_path / "rgb")
    two_model = _tiny_channels(2, tmp_path / "two")
    base = rings[2]
    rgb = np.stack([base, base[::-1], base[:, ::-1]], axis=-1)  # (128, 128, 3) uint8
    viewer, layer, widget = _viewer_with_widget(make_napari_viewer, rgb_model, rgb, rgb=True)
    assert layer.rgb
    viewer.reset_view()
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    out = np.asarray(widget.labels_layer().data)
    assert out.shape == base.shape
    expected = Predictor(load_model(rgb_model), device="cpu").predict(
        PyramidSource.from_layer_data(rgb, multiscale=False, rgb=True)
    ).labels
    np.testing.assert_array_equal(out, expected)

    # (C, Y, X) in one layer: its leading axis is read as the model's 2 channels
    two = np.stack([base, base.T])
    chan = viewer.add_image(two, name="two channels", scale=(1, 2, 2))
    widget.image_layer = chan
    widget.set_model(two_model)
    viewer.reset_view()
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    lab = widget.labels_layer(chan)
    assert lab.data.shape == base.shape  # the channel axis is not a labels axis
    np.testing.assert_allclose(lab._data_to_world.affine_matrix,
                               chan._data_to_world.affine_matrix[1:, 1:])
    expected = Predictor(load_model(two_model), device="cpu").predict(
        PyramidSource.from_layer_data(two, multiscale=False, rgb=False, channel_axis=0)
    ).labels
    np.testing.assert_array_equal(np.asarray(lab.data), expected)

    # a grayscale model on the RGB layer: the cause, no traceback
    widget.image_layer = layer
    widget.set_model(tmp_path / "rgb")  # fine
    widget.set_model(_tiny_channels(1, tmp_path / "gray"))
    worker = widget.predict_view()
    _wait_worker(qtbot, worker)
    _wait_idle(qtbot, widget)
    assert "channel" in widget.status and "expects 1" in widget.status


def test_widgets_from_the_plugin_manifest(make_napari_viewer, qtbot, model_dirs, rings):
    """Opened like napari does (a public-only viewer proxy): no private-access warnings,
    stable layer identities, and the fine-tune panel finds the predict panel."""
    import warnings

    from napari_muvit.widgets.train import predict_widgets

    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(rings[2], name="rings")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, predict = viewer.window.add_plugin_dock_widget("napari-muvit", "MuViT predict")
        _, train = viewer.window.add_plugin_dock_widget("napari-muvit", "MuViT fine-tune")
        assert predict_widgets(train.viewer) == [predict]
        predict.set_model(model_dirs[0])
        predict.device_combo.setCurrentText("cpu")
        predict.image_layer = layer
        viewer.reset_view()
        worker = predict.predict_view()
        _wait_worker(qtbot, worker)
        _wait_idle(qtbot, predict)
        assert predict.labels_layer() is predict.labels_layer()  # stable identity
        assert np.all(np.asarray(predict.labels_layer().data) > 0)


def test_precision_is_checked_against_the_hardware_and_jobs_share_the_cores(
    make_napari_viewer, qtbot, model_dirs, rings, monkeypatch
):
    from napari.utils import notifications

    from napari_muvit.engine import hardware
    from napari_muvit.widgets import PredictWidget
    from napari_muvit.widgets.jobs import GUI_THREADS

    warned = []
    monkeypatch.setattr(notifications, "show_warning", lambda msg: warned.append(msg))
    # as on a CPU that emulates bf16: the one-off micro-timing measures it 20x slower
    monkeypatch.setattr(hardware, "measure_amp_speedup", lambda *a, **k: 0.05)
    viewer, _layer, widget = _viewer_with_widget(make_napari_viewer, model_dirs[0], rings[2])
    qtbot.waitUntil(lambda: "MuViT[1, 4]" in widget.model_info.text(), timeout=30_000)
    info = widget.model_info.text()
    assert "float32" in info and "thread" in info and "batch" in info  # the runtime line

    # an explicit bf16 is honoured, with a warning that says how much slower it measured
    widget.precision_combo.setCurrentText("bf16")
    qtbot.waitUntil(lambda: bool(warned), timeout=30_000)
    assert "bf16 is emulated" in warned[-1] and "20.0x slower" in warned[-1]
    assert "20.0x slower" in widget.status
    assert widget.state.precision == "bf16" and "bf16 autocast" in widget.model_info.text()

    # the next session remembers bf16, but on this hardware it falls back to auto, and says so
    widget.close_widget()
    warned.clear()
    again = PredictWidget(viewer)
    qtbot.waitUntil(lambda: again.state.precision == "auto", timeout=30_000)
    assert warned and "remembered precision 'bf16' not used" in warned[-1]
    qtbot.waitUntil(lambda: "float32" in again.model_info.text(), timeout=30_000)

    # the Threads setting is the budget all jobs of the panels share, used as set; without
    # it, a view's count is tuned within the share
    again.threads_spin.setValue(1)
    assert GUI_THREADS.threads == 1 and GUI_THREADS.share() == 1
    assert "1 thread," in again.model_info.text()
    again.image_layer = _layer
    for threads, tuned in ((1, False), (0, True)):
        again.threads_spin.setValue(threads)
        if again.labels_layer() is not None:  # every tile is new again
            viewer.layers.remove(again.labels_layer())
        _wait_worker(qtbot, again.predict_view())
        _wait_idle(qtbot, again)
        assert again.predictor.adapt_threads is tuned and again.predictor._adaptive() is tuned
    assert GUI_THREADS.threads is None
    again.close_widget()
    again.deleteLater()

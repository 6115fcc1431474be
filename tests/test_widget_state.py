"""The widgets' layers without the views: evented panel state (no Qt), its settings, the Qt
binding of controls to state fields, the one tile grid, and napari's fast Labels refresh."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from napari_muvit.data.geometry import grid_cell_region, grid_cells, plan_tiles


def test_state_modules_import_without_qt():
    """state, jobs and outputs are importable (and the state usable) in a process without Qt."""
    code = (
        "import sys\n"
        "from napari_muvit.widgets import state, jobs, outputs\n"
        "s = state.PredictState.restored()\n"
        "seen = []\n"
        "s.events.tile_cap.connect(seen.append)\n"
        "s.tile_cap = 7\n"
        "assert seen == [7], seen\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('qtpy', 'PyQt5', 'PyQt6', 'PySide2', 'PySide6')]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_state_settings_roundtrip_choices_and_session_models(tmp_path):
    from napari_muvit.widgets._models import FOLDER, SESSION, ModelChoice
    from napari_muvit.widgets._settings import settings_path
    from napari_muvit.widgets.state import ENCODER, PredictState, TrainState

    s = PredictState.restored()
    assert (s.device, s.tile_cap, s.model.kind) == ("auto", 64, "bundled")
    s.device, s.tile_cap, s.precision = "cpu", 9, "bf16"
    s.model = ModelChoice(FOLDER, "/models/a")
    s.live = True  # not a setting
    s.save()
    again = PredictState.restored()
    assert (again.device, again.tile_cap, again.precision) == ("cpu", 9, "bf16")
    assert again.model == ModelChoice(FOLDER, "/models/a")
    assert again.live is False
    # a model that lives only in this session keeps the stored choice for the next session
    again.model = ModelChoice(SESSION, "rings #1")
    again.save()
    assert PredictState.restored().model == ModelChoice(FOLDER, "/models/a")
    # a value outside the choices (hand-edited file) falls back to the default
    data = json.loads(settings_path().read_text())
    data["predict"]["device"] = "tpu"
    data["predict"]["tile_cap"] = "many"
    settings_path().write_text(json.dumps(data))
    restored = PredictState.restored()
    assert (restored.device, restored.tile_cap) == ("auto", 64)
    # train: the start choice has its own default (the bundled encoder) and codec
    t = TrainState.restored()
    assert t.start == ModelChoice(ENCODER)
    t.start, t.lr, t.class_names = ModelChoice(FOLDER, "/models/b"), 3e-4, "outer, inner"
    t.save()
    t2 = TrainState.restored()
    assert t2.start == ModelChoice(FOLDER, "/models/b") and t2.lr == pytest.approx(3e-4)
    assert t2.class_name_map() == {1: "outer", 2: "inner"}


def test_grid_cells_match_the_engine_tile_plan():
    """One tile grid: the cells the predict panel counts are the engine's planned tiles, and a
    cell-grown region is covered by whole cells only."""
    shape = (200, 170)
    for step, region in [(32, [[10.2, 5.0], [90.7, 100.0]]), (24, [[0, 0], [200, 170]]),
                         (32, [[64, 64], [65, 65]])]:
        cells = grid_cells(region, step)
        planned = {t.grid for t in plan_tiles(region, step, shape)}
        assert set(cells) == planned
        grown = grid_cell_region(region, step, shape)
        assert np.all(grown[0] % step == 0)
        assert np.all((grown[1] % step == 0) | (grown[1] == shape))
        assert set(grid_cells(grown, step)) == planned
        assert np.all(grown[0] <= np.floor(region[0])) and np.all(grown[1] >= np.ceil(region[1]))


pytest.importorskip("napari")
pytest.importorskip("pytestqt")


def test_form_controls_and_state_stay_in_sync(qtbot):
    from qtpy.QtWidgets import QFormLayout, QWidget

    from napari_muvit.widgets.base import Form
    from napari_muvit.widgets.state import PredictState

    state = PredictState()
    host = QWidget()
    qtbot.addWidget(host)
    form = Form(state, QFormLayout(host))
    combo = form.combo("device", "Device")
    spin = form.spin("tile_cap", "Cap", 1, 1000)
    check = form.check("confidence", "Confidence")
    line = form.line("output", "Output")
    assert [combo.itemText(i) for i in range(combo.count())] == ["auto", "cpu", "cuda", "mps"]
    # control -> state
    combo.setCurrentText("cpu")
    spin.setValue(17)
    check.setChecked(True)
    line.setText("/tmp/x.zarr")
    assert (state.device, state.tile_cap, state.confidence, state.output) == (
        "cpu", 17, True, "/tmp/x.zarr")
    # state -> control
    state.device, state.tile_cap, state.confidence, state.output = "cuda", 3, False, ""
    assert (combo.currentText(), spin.value(), check.isChecked(), line.text()) == ("cuda", 3, False, "")


def test_fast_labels_refresh_path_is_taken_and_failures_are_logged(
    make_napari_viewer, monkeypatch, caplog
):
    from napari_muvit.widgets import _layers as L

    viewer = make_napari_viewer()
    layer = viewer.add_labels(np.zeros((64, 64), dtype=np.uint8))
    full = []
    monkeypatch.setattr(L, "refresh_data", lambda lay: full.append(lay))
    fast = []
    original = type(layer)._partial_labels_refresh
    monkeypatch.setattr(type(layer), "_partial_labels_refresh",
                        lambda self: fast.append(self) or original(self))
    key = (slice(8, 24), slice(16, 40))
    layer.data[key] = 3
    with caplog.at_level(logging.DEBUG, logger="napari_muvit.widgets"):
        L.refresh_region(layer, key)
    assert fast == [layer] and full == []  # napari's partial refresh, no full refresh
    assert not caplog.records
    np.testing.assert_array_equal(np.asarray(layer._slice.image.raw)[key], 3)

    # a napari change that breaks the fast path: full refresh, and a warning saying so
    def broken(*_):
        raise AttributeError("no _slice")

    monkeypatch.setattr(L, "_partial_labels_refresh", broken)
    monkeypatch.setattr(L, "_FAST_REFRESH_FAILURES", set())
    with caplog.at_level(logging.DEBUG, logger="napari_muvit.widgets"):
        L.refresh_region(layer, key)
        L.refresh_region(layer, key)
    assert full == [layer, layer]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "partial Labels refresh failed" in warnings[0].getMessage()


def test_the_predict_panel_blends_tiles_by_default():
    """No seams at the defaults (issue 13): the panel's predictor overlaps tiles by the
    engine's blending default; 0 in the panel still means no overlap."""
    import torch

    from napari_muvit.engine.predictor import default_overlap
    from napari_muvit.model import MuViTEncoder, MuViTSegmenter
    from napari_muvit.widgets.jobs import PredictorOptions
    from napari_muvit.widgets.state import PredictState

    torch.manual_seed(0)
    seg = MuViTSegmenter(MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2),
                         num_classes=2, head_dim=16, meta={"crop_size": 64})
    state = PredictState()
    assert state.overlap == -1
    predictor = PredictorOptions.of(state).make(seg, device="cpu")
    assert predictor.overlap == default_overlap(64) == 8
    state.overlap = 0
    assert PredictorOptions.of(state).make(seg, device="cpu").overlap == 0

"""Widget helpers without a viewer: settings, coordinates, pyramid writing, colours, paint
events, the loss plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_muvit.widgets import _layers as L
from napari_muvit.widgets import _settings as S


@pytest.fixture
def settings_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(S.SETTINGS_ENV, str(tmp_path / "cfg"))
    return tmp_path / "cfg"


def test_settings_roundtrip_types_and_corruption(settings_dir):
    defaults = {"device": "auto", "cap": 64, "lr": 1e-4, "live": False, "recent": []}
    assert S.load_section("w", defaults) == defaults  # no file yet
    path = S.save_section("w", {"device": "cpu", "cap": 10, "lr": 3, "live": True, "recent": ["a"]})
    assert path == settings_dir / S.SETTINGS_FILE
    loaded = S.load_section("w", defaults)
    assert loaded == {"device": "cpu", "cap": 10, "lr": 3.0, "live": True, "recent": ["a"]}
    assert isinstance(loaded["lr"], float)
    # sections are independent
    S.save_section("other", {"x": 1})
    assert S.load_section("w", defaults)["cap"] == 10
    # wrong types in a hand-edited file fall back to the defaults, unknown keys are ignored
    data = json.loads(path.read_text())
    data["w"].update(cap="many", live=1, device=None, extra=5)
    path.write_text(json.dumps(data))
    loaded = S.load_section("w", defaults)
    assert loaded["cap"] == 64 and loaded["live"] is False and "extra" not in loaded
    # a corrupt file never raises
    path.write_text("{not json")
    assert S.load_section("w", defaults) == defaults


def test_level_rows_partition_each_coarse_level():
    """Tiles written independently fill every coarse pixel exactly once (nearest sample)."""
    for factor, size in [(2.0, 50), (4.0, 25), (3.0, 34), (2.5, 40)]:
        owner = np.full(size, -1)
        for k, (start, stop) in enumerate([(0, 30), (30, 64), (64, 100)]):
            i0, i1, offsets = L._level_rows(start, stop, factor, size)
            assert len(offsets) == i1 - i0
            idx = np.arange(i0, i1)
            np.testing.assert_array_equal(np.floor((idx + 0.5) * factor) - start, offsets)
            assert np.all(owner[i0:i1] == -1)
            owner[i0:i1] = k
        covered = owner[np.floor((np.arange(size) + 0.5) * factor) < 100]
        assert np.all(covered >= 0)


def test_labels_colormap_background_and_class_colors():
    cmap = L.labels_colormap([1, 2, 3], None, ["background", "outer", "inner"])
    rgba = cmap.map(np.array([0, 1, 2, 3]))
    assert rgba[0][3] == 0 and rgba[1][3] == 0  # 0 and the 'background' class: transparent
    assert rgba[2][3] > 0 and rgba[3][3] > 0 and not np.allclose(rgba[2], rgba[3])
    given = L.labels_colormap([0, 1], [[1, 0, 0, 1], [0, 0, 1, 1]], ["background", "cells"])
    np.testing.assert_allclose(given.map(np.array([1]))[0], [0, 0, 1, 1])
    assert given.map(np.array([0]))[0][3] == 0  # dense class 0 is napari's background


def test_painted_bboxes_from_both_atom_kinds():
    from napari.layers.labels.labels import _MaskedPaintAtom

    masked = _MaskedPaintAtom((slice(2, 3), slice(10, 20), slice(5, 9)), None, np.zeros(1), 1)
    fancy = (np.array([0, 0]), np.array([4, 7]), np.array([1, 3])), np.zeros(2), 2
    boxes = L.painted_bboxes([masked, fancy], displayed=[1, 2])
    np.testing.assert_array_equal(boxes[0], [[10, 5], [20, 9]])
    np.testing.assert_array_equal(boxes[1], [[4, 1], [8, 4]])


def test_loss_plot_points_and_repaint_coalescing(qtbot):
    from napari_muvit.widgets import LossPlot

    plot = LossPlot()
    qtbot.addWidget(plot)
    plot.clear(total_steps=100)
    for step in range(1, 2001):
        plot.add_loss(step, 1.0 / step)
    plot.add_loss(2001, float("nan"))  # ignored, keeps the axis range sane
    plot.add_dice(10, 0.5)
    plot.add_dice(20, float("inf"))
    assert len(plot.losses) == 2000 and plot.dice == [(10, 0.5)]
    assert plot._smoothed[-1][1] < plot._smoothed[0][1]
    assert plot._repaint.isActive()  # one coalesced repaint pending, not 2000
    plot.resize(300, 160)
    image = plot.grab()  # paints: decimated path, labels
    assert not image.isNull()

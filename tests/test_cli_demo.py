"""``napari-muvit demo --headless``: labels + a PNG screenshot, with a tiny model.

The viewer screenshot runs in a subprocess of the demo (under the test's Xvfb display, or
``xvfb-run``); the composite fallback is checked separately.  Both compare with the engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from napari_muvit.cli.demo import composite, demo_region, write_png
from napari_muvit.data import PyramidSource
from napari_muvit.data.geometry import grid_cells
from napari_muvit.data.samples import synthetic_sample_image
from napari_muvit.engine.predictor import Predictor
from napari_muvit.model import MuViTEncoder, MuViTSegmenter, load_model

SIZE, VIEW = 512, 96  # the sample is a field of 512² ring systems: one system


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2)
    seg = MuViTSegmenter(enc, num_classes=3, head_dim=32, label_values=[1, 2, 3],
                         class_names=["background", "outer", "inner"], meta={"crop_size": 32})
    return Path(seg.save(tmp_path_factory.mktemp("demo") / "tiny"))


def read_png(path: Path) -> np.ndarray:
    """The PNG as written: ``(H, W, C)`` uint8 (a grey PNG gets C = 1)."""
    import imageio.v3 as iio

    arr = np.asarray(iio.imread(path, extension=".png"))
    return arr[..., None] if arr.ndim == 2 else arr


def _run_demo(out: Path, model: Path, *extra: str, env: dict | None = None):
    cmd = [sys.executable, "-m", "napari_muvit", "demo", "--headless", "--out", str(out),
           "--model", str(model), "--size", str(SIZE), "--view", str(VIEW), "--device", "cpu",
           *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)


def _expected(model: Path) -> np.ndarray:
    syn = synthetic_sample_image(SIZE, seed=0)
    assert syn.image.shape == (SIZE, SIZE)
    source = PyramidSource.from_layer_data(syn.pyramid, multiscale=True, rgb=False)
    return Predictor(load_model(model), device="cpu").predict(
        source, region=demo_region(SIZE, VIEW)
    ).labels


def test_demo_headless_writes_labels_and_viewer_screenshot(tmp_path, tiny_model):
    if not (os.environ.get("DISPLAY") or __import__("shutil").which("xvfb-run")):
        pytest.skip("needs a display or xvfb-run for the viewer screenshot")
    out = tmp_path / "demo"
    done = _run_demo(out, tiny_model, "--screenshot", "viewer")
    assert done.returncode == 0, done.stdout + done.stderr
    labels = np.load(out / "demo_labels.npy")
    assert labels.shape == (VIEW, VIEW)
    np.testing.assert_array_equal(labels, _expected(tiny_model))
    info = json.loads((out / "demo_labels.json").read_text())
    assert info["region"] == demo_region(SIZE, VIEW).tolist()
    assert info["screenshot_method"] == "napari-viewer"
    assert info["tiles"] == len(grid_cells(demo_region(SIZE, VIEW), 32))
    png = read_png(out / "demo_screenshot.png")
    assert png.ndim == 3 and png.shape[2] == 3 and min(png.shape[:2]) >= 200
    # a real rendering: the grey image plus coloured labels, not a blank canvas
    assert png.std() > 10
    spread = png.max(axis=2).astype(int) - png.min(axis=2).astype(int)
    assert (spread > 15).mean() > 0.05  # labels tint the grey image
    assert "napari-viewer" in done.stdout


def test_demo_headless_composite_fallback(tmp_path, tiny_model, monkeypatch, capsys):
    from napari_muvit.cli import demo, main

    # no display and no xvfb-run: the numpy composite is the only option (no subprocess)
    monkeypatch.setattr(demo, "has_display", lambda: False)
    monkeypatch.setattr(demo.shutil, "which", lambda name: None)
    out = tmp_path / "demo"
    code = main(["demo", "--out", str(out), "--model", str(tiny_model), "--size", str(SIZE),
                 "--view", str(VIEW), "--device", "cpu"])  # no --headless: no display found
    assert code == 0
    printed = capsys.readouterr().out
    assert "no display found, running headless" in printed
    info = json.loads((out / "demo_labels.json").read_text())
    assert info["screenshot_method"] == "numpy-composite"
    assert "xvfb-run" in info["screenshot_note"]
    labels = np.load(out / "demo_labels.npy")
    np.testing.assert_array_equal(labels, _expected(tiny_model))
    png = read_png(out / "demo_screenshot.png")
    assert png.shape == (VIEW, VIEW, 3)
    syn = synthetic_sample_image(SIZE, seed=0)
    (y0, x0), (y1, x1) = demo_region(SIZE, VIEW)
    expected_png = composite(syn.image[y0:y1, x0:x1], labels, [1, 2, 3],
                             class_names=["background", "outer", "inner"])
    np.testing.assert_array_equal(png, expected_png)


def test_demo_missing_model_is_a_clean_error(tmp_path, capsys):
    from napari_muvit.cli import main

    code = main(["demo", "--headless", "--out", str(tmp_path), "--model", str(tmp_path / "nope")])
    assert code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not a model folder" in err


def test_png_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    for shape in [(7, 5, 3), (4, 9, 4), (6, 6), (5, 4, 1)]:
        img = rng.integers(0, 256, shape, dtype=np.uint8)
        write_png(tmp_path / "x.png", img)
        assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        back = read_png(tmp_path / "x.png")
        np.testing.assert_array_equal(back.reshape(img.shape), img)


@pytest.mark.gui
def test_demo_gui_setup_predicts_the_framed_view(make_napari_viewer, qtbot, tiny_model):
    """What ``napari-muvit demo`` does with a display, minus ``napari.run()``."""

    _gui_demo(make_napari_viewer, qtbot, tiny_model)


def _gui_demo(make_napari_viewer, qtbot, tiny_model) -> None:
    from napari_muvit.cli.demo import dock_widgets, frame_view
    from napari_muvit.data.samples import synthetic_sample

    viewer = make_napari_viewer(show=True)
    for data, kwargs, layer_type in synthetic_sample(size=512, seed=0):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    predict, train = dock_widgets(viewer, tiny_model, "cpu")
    viewer.window._qt_window.resize(1100, 800)
    qtbot.wait(50)
    region = demo_region(512, 96)
    frame_view(viewer, region)
    worker = predict.set_live(True)
    assert worker is not None
    qtbot.waitUntil(lambda: not predict.busy, timeout=60_000)
    qtbot.wait(100)
    visible = predict.state.view_job.request.region
    # the framed region is on screen (the canvas is not square: more is visible on one axis)
    assert np.all(visible[0] <= region[0] + 1) and np.all(visible[1] >= region[1] - 1)
    out = np.asarray(predict.labels_layer().data[0])
    (y0, x0), (y1, x1) = region
    assert np.all(out[y0:y1, x0:x1] > 0)
    assert train.image_layer is viewer.layers["synthetic rings"]
    predict.set_live(False)

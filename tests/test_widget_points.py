"""Point detectors in the predict panel, in a real napari viewer (run under Xvfb).

The detector is test_points' oracle: it outputs the perfect maps of known points for every tile,
so the panel must show exactly those points, and exactly what the engine's ``predict_points``
returns for the same region.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from test_points import OracleDetector, _oracle_case  # noqa: E402 (pytest puts tests/ on sys.path)

from napari_muvit.engine.points import predict_points  # noqa: E402
from napari_muvit.errors import InputError  # noqa: E402
from napari_muvit.widgets._models import SESSION, ModelChoice, registry  # noqa: E402

pytestmark = pytest.mark.gui

SCALE = (0.5, 0.75)
TRANSLATE = (10.0, -20.0)


def _predict(qtbot, widget):
    worker = widget.predict_view()
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=120_000)
    qtbot.wait(50)
    return widget.state.view_job


def test_detector_view_prediction_is_a_points_layer(make_napari_viewer, qtbot, tmp_path):
    from napari_muvit.widgets import PredictWidget

    rng = np.random.default_rng(3)
    table, image = _oracle_case(rng, n=40, shape=(100, 90))
    oracle = OracleDetector(table, image.shape)
    oracle.meta["crop_size"] = 32
    registry().publish("oracle points", oracle)

    viewer = make_napari_viewer(show=True)
    layer = viewer.add_image(image, name="cells", scale=SCALE, translate=TRANSLATE)
    widget = PredictWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MuViT predict")
    widget.set_model(ModelChoice(SESSION, "oracle points"))
    widget.device_combo.setCurrentText("cpu")
    widget.image_layer = layer

    # zoomed in: only part of the image is predicted
    viewer.scene.camera.zoom = 12.0
    viewer.scene.camera.center = (10.0 + 0.5 * 30, -20.0 + 0.75 * 30)
    qtbot.wait(20)
    job = _predict(qtbot, widget)
    points = widget.points_layer(layer)
    assert points is not None and points in viewer.layers
    assert widget.labels_layer(layer) is None  # a detector paints no labels
    # aligned with the image: same data->world transform
    np.testing.assert_allclose(points.scale, layer.scale)
    np.testing.assert_allclose(points.translate, layer.translate)
    assert list(points.features.columns) == ["class", "score"]

    # the engine, on the same region, finds the same points
    from napari_muvit.data.geometry import grid_cell_region

    pred = job.loaded.predictor
    region = grid_cell_region(job.request.region, pred.step, image.shape)
    want = predict_points(image, oracle, region=region, device="cpu")
    assert 0 < len(want["y"]) < len(table.yx)  # a part of the image, with points in it
    np.testing.assert_array_equal(points.data, np.stack([want["y"], want["x"]], 1))
    np.testing.assert_array_equal(points.features["class"].to_numpy(), want["class"])
    np.testing.assert_array_equal(points.features["score"].to_numpy(), want["score"])
    # ... which are the true points of that region, in world space under the image's pixels
    world = points.data * np.asarray(SCALE) + np.asarray(TRANSLATE)
    for (y, x), c in zip(table.yx, table.classes):
        if region[0, 0] <= y < region[1, 0] - 0.5 and region[0, 1] <= x < region[1, 1] - 0.5:
            hit = np.flatnonzero(np.all(np.isclose(points.data, [y, x], atol=1e-3), axis=1))
            assert len(hit) == 1 and points.features["class"][hit[0]] == c
            np.testing.assert_allclose(world[hit[0]], np.array([y, x]) * SCALE + TRANSLATE)
            np.testing.assert_allclose(
                layer.data_to_world([y, x]), points.data_to_world(points.data[hit[0]]))
    # class colours: one face colour per class, different between the classes
    faces = {int(c): tuple(np.round(f, 4)) for c, f in
             zip(points.features["class"], points.face_color)}
    assert len(set(faces.values())) == len(faces) == len(set(points.features["class"]))

    # whole view: the same layer is updated (not a second one) with every point of the image
    viewer.reset_view()
    qtbot.wait(20)
    _predict(qtbot, widget)
    assert widget.points_layer(layer) is points
    assert sum(1 for lyr in viewer.layers if lyr.name.endswith("MuViT points")) == 1
    got = sorted(zip(points.data[:, 0].round(3), points.data[:, 1].round(3),
                     points.features["class"]))
    assert got == sorted(zip(table.yx[:, 0], table.yx[:, 1], table.classes))

    # 'Predict whole image' writes labels: a detector is refused with the command that works
    store = tmp_path / "whole.zarr"
    worker = widget.predict_image(store)
    assert worker is not None
    qtbot.waitUntil(lambda: not widget.busy, timeout=60_000)
    qtbot.wait(50)
    assert "point detector" in widget.status and "--out points.csv" in widget.status
    assert not store.exists()


def test_train_panel_trains_a_detector_on_clicked_points(make_napari_viewer, qtbot, tmp_path):
    import torch

    from napari_muvit.data import synthetic_rings
    from napari_muvit.engine.points import is_detector
    from napari_muvit.model import MuViTEncoder
    from napari_muvit.widgets import TrainWidget

    torch.manual_seed(0)
    enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=32, num_layers=1, heads=1)
    enc.meta = {"crop_size": 32}
    encoder = enc.save(tmp_path / "encoder")

    rings = synthetic_rings(96, seed=2)
    viewer = make_napari_viewer(show=True)
    image = viewer.add_image(rings.image, name="cells", scale=(2.0, 2.0), translate=(4.0, 0.0))
    # clicked in world space on a layer with its own (identity) transform
    data_yx = np.array([[10.0, 12.0], [30.0, 40.0], [50.0, 20.0], [70.0, 75.0], [80.0, 30.0]])
    world = data_yx * 2.0 + np.array([4.0, 0.0])
    points = viewer.add_points(world, name="clicks", features={"class": [1, 2, 1, 2, 2]})
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="MuViT fine-tune")
    train.image_layer = image
    train.points_layer = points
    train.set_start_model(encoder)
    train.class_names_edit.setText("small, large")
    train.steps_spin.setValue(3)
    train.batch_spin.setValue(2)
    train.crop_spin.setValue(32)
    train.publish_spin.setValue(3)
    train.device_combo.setCurrentText("cpu")

    request = train._points_request(image, points)
    # a detector learns at its own rate (the shown lr follows the Points choice)
    assert train.lr_spin.value() == pytest.approx(1e-3)
    assert (request.config.lr, request.config.encoder_lr_factor) == (pytest.approx(1e-3), 1.0)
    np.testing.assert_allclose(request.points.yx, data_yx)  # image pixels, not world
    assert request.points.classes.tolist() == [1, 2, 1, 2, 2]

    worker = train.train()
    assert worker is not None
    qtbot.waitUntil(lambda: not train.busy, timeout=180_000)
    qtbot.wait(50)
    history = train.job.history
    assert history is not None and history["status"] == "finished"
    assert len(train.loss_plot.losses) == 3
    assert all(np.isfinite(v) for _, v in train.loss_plot.losses)
    model = registry().session_model(train.job.request.name)
    assert is_detector(model)
    assert list(model.label_values) == [1, 2] and list(model.class_names) == ["small", "large"]

    # a points layer without a 'class' feature: every point is class 1
    plain = viewer.add_points(world[:2], name="plain")
    req = train._points_request(image, plain)
    assert req.points.classes.tolist() == [1, 1]
    # a point outside the image: one clear line naming the problem
    outside = viewer.add_points(np.array([[-50.0, -50.0]]), name="outside")
    with pytest.raises(InputError, match="outside|inside"):
        train._points_request(image, outside)
    # back to labels: the segmentation rate again; a rate the user chose is kept
    train.points_layer = None
    assert train.lr_spin.value() == pytest.approx(1e-4)
    train.lr_spin.setValue(5e-4)
    train.points_layer = points
    assert train.lr_spin.value() == pytest.approx(5e-4)

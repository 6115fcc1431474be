"""While a MuViT panel is open, long-lived objects sit out Python's full collections
(widgets/_gc.py): a full collection of napari + torch + scikit-learn's heap held the GIL for
0.4 s.  Nothing the user discards may leak because of it, and closing the viewer thaws all."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

napari = pytest.importorskip("napari")
pytest.importorskip("pytestqt")


def test_an_open_panel_keeps_full_collections_small_and_leaks_nothing(make_napari_viewer,
                                                                       qtbot):
    from napari_muvit.widgets import PredictWidget, TrainWidget, _gc

    viewer = make_napari_viewer()
    image = viewer.add_image(np.zeros((64, 64), np.float32), name="before the panels")
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="MuViT predict")
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="MuViT fine-tune")
    assert _gc.frozen()
    # what a full collection visits: a small fraction of what is alive
    assert gc.get_freeze_count() > 20 * len(gc.get_objects())

    # a layer that was alive when frozen is collected once removed (napari layers are cyclic)
    ref = weakref.ref(image)
    del image
    viewer.layers.remove("before the panels")
    qtbot.waitUntil(lambda: ref() is None and _gc.frozen(), timeout=10_000)
    # a layer added later is an ordinary object
    later = viewer.add_image(np.zeros((8, 8), np.float32), name="later")
    ref_later = weakref.ref(later)
    del later
    viewer.layers.remove("later")
    gc.collect()
    assert ref_later() is None

    viewer.close()  # the last panel closes: everything is thawed (napari's leak check runs)
    assert not _gc.frozen() and gc.get_freeze_count() == 0

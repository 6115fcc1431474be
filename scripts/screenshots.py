"""Take the screenshots of docs/user-guide.md from a real napari viewer.

Runs the whole workflow of the guide on the Synthetic rings sample and saves a screenshot of
the napari window at each step::

    xvfb-run -a -s "-screen 0 1600x1000x24" python scripts/screenshots.py --out docs/images

1. ``train.png``: the fine-tune panel training on scribbles painted from the ground truth,
   with a validation rectangle, the loss curve and the predict widget following the training;
2. ``predict-view.png``: *Predict view* on a zoomed-in region;
3. ``live.png``: live mode after panning (only the new tiles are computed);
4. ``whole-image.png``: a whole-image prediction into OME-Zarr filling in, with progress;
5. ``whole-image-done.png``: the finished whole-image labels, zoomed out.

Training starts from the bundled pre-trained encoder when it is installed, otherwise from a
small random encoder (then the predictions are rougher, but every panel looks the same).
Prediction uses the model trained in step 1 so that the screenshots tell one story.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/images", help="folder of the PNG files")
    p.add_argument("--size", type=int, default=2048, help="synthetic image side (default 2048)")
    p.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import napari
    import torch
    from qtpy.QtWidgets import QApplication

    from napari_muvit.data.samples import synthetic_sample
    from napari_muvit.model import MuViTEncoder
    from napari_muvit.widgets import PredictWidget, TrainWidget
    from napari_muvit.widgets._layers import camera
    from napari_muvit.widgets._models import BUNDLED, SESSION

    if args.threads:
        torch.set_num_threads(args.threads)

    def settle(seconds: float = 0.4, until=None, timeout: float = 600.0) -> None:
        end = time.monotonic() + (timeout if until is not None else seconds)
        while time.monotonic() < end:
            app.processEvents()
            if until is not None and until():
                break
            time.sleep(0.01)
        if until is not None:
            stop = time.monotonic() + seconds
            while time.monotonic() < stop:
                app.processEvents()
                time.sleep(0.01)

    def shoot(name: str) -> None:
        settle(0.5)
        # napari's toast notifications (e.g. the PyQt5 deprecation notice) would cover the canvas
        from napari._qt.dialogs.qt_notification import NapariQtNotification

        for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
            toast.close()
        settle(0.3)
        path = out / name
        viewer.screenshot(str(path), canvas_only=False, flash=False)
        print(f"wrote {path}")

    viewer = napari.Viewer(title="napari-muvit")
    app = QApplication.instance()
    viewer.window._qt_window.resize(1560, 960)
    for data, kwargs, layer_type in synthetic_sample(size=args.size, seed=0):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    image = viewer.layers["synthetic rings"]
    truth = viewer.layers["ground truth"]
    predict = PredictWidget(viewer)
    train = TrainWidget(viewer)
    predict_dock = viewer.window.add_dock_widget(predict, name="MuViT predict", area="right")
    train_dock = viewer.window.add_dock_widget(train, name="MuViT fine-tune", area="right",
                                               tabify=True)
    predict.device_combo.setCurrentText("auto")
    settle(1.0)

    # ---------------------------------------------------------------- 1. fine-tuning
    train_dock.raise_()
    train.image_layer = image
    labels = train.create_annotation_layer()
    gt = np.asarray(truth.data)
    n = args.size
    # Scribbles of three classes: 1 = background, 2 = outer-ring cell, 3 = inner-ring cell
    # (with sparse labels, background must be painted as a class to be learnt).
    classes = gt.astype(np.uint8) + 1
    scribbles = np.zeros(gt.shape, bool)
    scribbles[n // 8 : 7 * n // 8 : 12, n // 8 : 7 * n // 8] = True  # every 12th row
    scribbles[n // 8 : 7 * n // 8, n // 8 : 7 * n // 8 : 12] = True  # and column
    scribbles |= (gt > 0) & (np.arange(n)[:, None] % 3 == 0)  # plus a third of the cells
    labels.data[scribbles] = classes[scribbles]
    v0, v1 = int(n * 0.62), int(n * 0.78)  # validation box, fully annotated
    labels.data[v0:v1, v0:v1] = classes[v0:v1, v0:v1]
    labels.refresh()
    shapes = train.create_validation_layer()
    shapes.add_rectangles(np.array([[v0 - 0.5, v0 - 0.5], [v1 - 0.5, v1 - 0.5]]))
    shapes.mode = "pan_zoom"
    labels.mode = "pan_zoom"
    train.class_names_edit.setText("background, outer, inner")
    try:
        from napari_muvit.weights import DEFAULT_ENCODER, default_model_path

        default_model_path(DEFAULT_ENCODER)
        train.set_start_model(None)  # the bundled pre-trained encoder
    except Exception:  # noqa: BLE001 - not installed yet: a small random encoder instead
        folder = Path(tempfile.mkdtemp(prefix="muvit-shots-")) / "encoder"
        torch.manual_seed(0)
        enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=64, num_layers=2, heads=2)
        enc.meta = {"crop_size": 64}
        enc.save(folder)
        train.set_start_model(folder)
    train.steps_spin.setValue(args.steps)
    train.batch_spin.setValue(4)
    train.crop_spin.setValue(64)
    train.publish_spin.setValue(max(10, args.steps // 6))
    cam = camera(viewer)
    cam.center = (n * 0.55, n * 0.55)
    cam.zoom = 1.6 * 800 / n
    train.train()
    settle(0.5, until=lambda: predict.model_choice.kind == SESSION, timeout=900)
    predict.set_live(True)
    settle(0.5, until=lambda: train.job.steps_seen >= int(0.7 * args.steps), timeout=1800)
    shoot("train.png")
    settle(1.0, until=lambda: not train.busy, timeout=1800)
    settle(1.0, until=lambda: not predict.busy, timeout=600)
    predict.set_live(False)
    viewer.layers.selection.active = image
    # The prediction shots show the bundled model (the fine-tuned one above trained briefly).
    predict.set_model("bundled")
    settle(0.5, until=lambda: predict.model_choice.kind == BUNDLED, timeout=120)

    # ---------------------------------------------------------------- 2. predict view
    predict_dock.raise_()
    predict.overlap_spin.setValue(16)  # blended tile borders
    for layer in (labels, shapes):
        layer.visible = False
    cam.center = (n * 0.30, n * 0.42)
    cam.zoom = 2.2 * 800 / n * 2
    settle(0.5)
    predict.predict_view()
    settle(1.0, until=lambda: not predict.busy, timeout=600)
    shoot("predict-view.png")

    # ---------------------------------------------------------------- 3. live
    predict.set_live(True)
    settle(1.0, until=lambda: not predict.busy, timeout=600)
    cam.center = (n * 0.36, n * 0.52)
    settle(0.6)
    settle(0.5, until=lambda: not predict.busy, timeout=600)
    shoot("live.png")
    predict.set_live(False)

    # ---------------------------------------------------------------- 4. whole image
    store = Path(tempfile.mkdtemp(prefix="muvit-shots-")) / "synthetic_rings_muvit.zarr"
    viewer.layers.remove(predict.labels_layer())
    viewer.reset_view()
    predict.predict_image(store)
    settle(0.5, until=lambda: predict.state.image_job is not None and predict.state.image_job.total > 0
           and predict.state.image_job.painted >= 0.4 * predict.state.image_job.total, timeout=1800)
    shoot("whole-image.png")
    settle(1.0, until=lambda: not predict.busy, timeout=3600)
    shoot("whole-image-done.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

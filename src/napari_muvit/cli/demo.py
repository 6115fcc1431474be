"""``napari-muvit demo``: the Synthetic rings sample segmented by the bundled model.

With a display, napari opens with the multiscale sample image (and its hidden ground truth),
the *MuViT predict* and *MuViT fine-tune* panels docked, the bundled model selected and live
prediction on: the centre of the image is segmented at once and every pan or zoom predicts the
new view.

Without a display (or with ``--headless``) the same view is segmented without Qt and written
to ``--out``:

* ``demo_labels.npy``: the labels of the view (``view × view`` pixels, label values of the
  model) and ``demo_labels.json``: the view's bbox in image pixels, class names, model, timing;
* ``demo_screenshot.png``: the view with the labels overlaid.  It is rendered by a real napari
  viewer when one can be created (a ``$DISPLAY``, or ``xvfb-run`` to make one), in a
  subprocess so that a missing OpenGL cannot take this process down; otherwise it is composed
  with numpy (grey image + label colours) and written with imageio.  The JSON
  file and the output say which method was used.

Examples::

    napari-muvit demo
    napari-muvit demo --headless --out demo_out/
    napari-muvit demo --headless --size 1024 --view 256 --model my_model/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from napari_muvit.cli._args import number_at_least
from napari_muvit.errors import InputError

SCREENSHOT_METHODS = ("auto", "viewer", "composite")
SCREENSHOT_TIMEOUT_S = 300
CANVAS_SIZE = (800, 800)
# Label colours of the composite fallback (RGB, 0-255), by class index; napari's own colours
# are used in viewer screenshots.
_FALLBACK_COLORS = np.array(
    [[255, 153, 26], [51, 204, 255], [120, 220, 120], [230, 80, 80], [180, 120, 240]],
    dtype=np.float32,
)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` sub-command."""
    p = subparsers.add_parser(
        "demo",
        help="open napari with the synthetic sample and live MuViT prediction",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--headless", action="store_true",
                   help="no window: predict the demo view and write labels + screenshot")
    p.add_argument("--out", metavar="DIR", default="napari-muvit-demo",
                   help="output folder of --headless (default ./napari-muvit-demo)")
    p.add_argument("--model", metavar="FOLDER", default=None,
                   help="segmenter folder (default: the bundled model)")
    p.add_argument("--size", type=number_at_least(int, 64), default=4096, metavar="PX",
                   help="side of the synthetic sample (a field of 512 px ring systems: rounded "
                        "down to a multiple of 512, at least 512; default 4096)")
    p.add_argument("--view", type=number_at_least(int, 16), default=None, metavar="PX",
                   help="side of the demo view (default: a quarter of --size)")
    p.add_argument("--seed", type=int, default=0, help="synthetic image seed (default 0)")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or mps")
    p.add_argument("--screenshot", choices=SCREENSHOT_METHODS, default="auto",
                   help="how --headless renders the PNG (default: a real viewer if possible)")
    p.set_defaults(func=run)
    return p




def has_display() -> bool:
    """Whether a window can be shown (X11/Wayland display, or macOS/Windows)."""
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def demo_region(size: int, view: int | None) -> np.ndarray:
    """The demo view: a ``view × view`` square at the image centre (image pixel edges)."""
    v = min(size, view if view is not None else max(16, size // 4))
    y0 = (size - v) // 2
    return np.array([[y0, y0], [y0 + v, y0 + v]], dtype=np.int64)


def resolve_model_folder(model: str | None) -> Path:
    """``--model`` or the bundled segmenter (with a clear error if it is not installed)."""
    if model is not None:
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise InputError(f"--model: {str(folder)!r} is not a model folder")
        return folder
    from napari_muvit.weights import default_model_path

    return default_model_path()


def run(args: argparse.Namespace) -> int:
    """Entry point of ``napari-muvit demo``."""
    if args.headless or not has_display():
        if not args.headless:
            print("napari-muvit demo: no display found, running headless (--headless)")
        return run_headless(args)
    return run_gui(args)


# ---------------------------------------------------------------------------------------------
# interactive
# ---------------------------------------------------------------------------------------------


def run_gui(args: argparse.Namespace) -> int:
    """napari with the sample, both panels docked and live prediction of the view."""
    folder = resolve_model_folder(args.model)  # fail early, before a window opens
    import napari

    viewer = build_demo_viewer(args.size, args.seed, show=True)
    predict, _train = dock_widgets(viewer, folder, args.device)
    # the framed view fills the canvas's short side: the long side shows more tiles
    predict.cap_spin.setValue(max(predict.cap_spin.value(), 256))
    side = int(viewer.layers["synthetic rings"].level_shapes[0][0])
    frame_view(viewer, demo_region(side, args.view))
    predict.set_live(True)
    napari.run()
    return 0


def build_demo_viewer(size: int, seed: int, show: bool) -> Any:
    """A viewer holding the synthetic sample exactly as napari's sample menu adds it."""
    import napari

    from napari_muvit.data.samples import synthetic_sample

    viewer = napari.Viewer(show=show, title="napari-muvit demo")
    for data, kwargs, layer_type in synthetic_sample(size=size, seed=seed):
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    return viewer


def dock_widgets(viewer: Any, folder: Path, device: str) -> tuple[Any, Any]:
    """Dock the predict and fine-tune panels; select the model and device."""
    from napari_muvit.widgets import PredictWidget, TrainWidget

    predict = PredictWidget(viewer)
    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(predict, name="MuViT predict", area="right")
    viewer.window.add_dock_widget(train, name="MuViT fine-tune", area="right", tabify=True)
    predict.device_combo.setCurrentText(device if device in ("auto", "cpu", "cuda", "mps") else "auto")
    predict.set_model(folder)
    predict.image_layer = viewer.layers["synthetic rings"]
    return predict, train


def frame_view(viewer: Any, region: np.ndarray) -> None:
    """Centre the camera on ``region`` (image pixel edges) and zoom so that it fills the
    canvas."""
    from napari_muvit.widgets._layers import camera, canvas_size

    layer = viewer.layers["synthetic rings"]
    cam = camera(viewer)
    centre_data = (region[0] + region[1]) / 2.0 - 0.5  # edges -> napari pixel centres
    centre_world = np.asarray(layer.data_to_world(centre_data), dtype=np.float64)
    cam.center = tuple(float(v) for v in centre_world[-2:])
    h, w = canvas_size(viewer)
    extent = float(np.max(region[1] - region[0]) * np.max(np.abs(layer.scale[-2:])))
    cam.zoom = min(h, w) / extent


# ---------------------------------------------------------------------------------------------
# headless
# ---------------------------------------------------------------------------------------------


def run_headless(args: argparse.Namespace) -> int:
    """Predict the demo view without Qt; write labels, metadata and a PNG screenshot."""
    from napari_muvit.data import PyramidSource
    from napari_muvit.data.samples import synthetic_sample_image
    from napari_muvit.engine.predictor import Predictor
    from napari_muvit.model import load_predictor_model

    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_model_folder(args.model)
    model = load_predictor_model(folder)
    t0 = time.perf_counter()
    syn = synthetic_sample_image(size=args.size, seed=args.seed)
    source = PyramidSource.from_layer_data(syn.pyramid, multiscale=True, rgb=False)
    side = int(syn.image.shape[0])  # the sample is a field of whole ring systems
    region = demo_region(side, args.view)
    predictor = Predictor(model, device=args.device)
    t1 = time.perf_counter()
    sink = predictor.predict(source, region=region)
    t2 = time.perf_counter()
    labels = sink.labels
    labels_path = out / "demo_labels.npy"
    np.save(labels_path, labels)
    png_path = out / "demo_screenshot.png"
    method, note = render_screenshot(args, labels_path, region, png_path, syn, model)
    info = {
        "region": region.tolist(),
        "image_size": side,
        "seed": args.seed,
        "model": str(folder),
        "class_names": list(model.class_names),
        "label_values": [int(v) for v in model.label_values],
        "device": str(predictor.device),
        "tiles": int(predictor.stats["tiles_computed"]),
        "predict_seconds": round(t2 - t1, 3),
        "total_seconds": round(time.perf_counter() - t0, 3),
        "screenshot": png_path.name,
        "screenshot_method": method,
        "screenshot_note": note,
    }
    (out / "demo_labels.json").write_text(json.dumps(info, indent=2))
    counts = {int(v): int(n) for v, n in zip(*np.unique(labels, return_counts=True))}
    print(f"napari-muvit demo: segmented the {region[1, 0] - region[0, 0]} px view "
          f"{region.tolist()} of the {side} px synthetic image in {t2 - t1:.1f} s "
          f"({info['tiles']} tiles on {predictor.device})")
    print(f"  labels:     {labels_path}  (pixels per label value: {counts})")
    print(f"  screenshot: {png_path}  ({method}{': ' + note if note else ''})")
    return 0


def render_screenshot(
    args: argparse.Namespace, labels_path: Path, region: np.ndarray, png_path: Path,
    syn: Any, model: Any,
) -> tuple[str, str]:
    """Write the PNG; returns ``(method, note)`` where method is ``napari-viewer`` or
    ``numpy-composite``."""
    note = ""
    if args.screenshot in ("auto", "viewer"):
        ok, note = _viewer_screenshot_subprocess(args, labels_path, region, png_path)
        if ok:
            return "napari-viewer", note
        if args.screenshot == "viewer":
            raise InputError(f"--screenshot viewer: no napari viewer could render ({note})")
    image = syn.image[region[0, 0] : region[1, 0], region[0, 1] : region[1, 1]]
    labels = np.load(labels_path)
    write_png(png_path, composite(image, labels, list(model.label_values),
                                  class_names=list(model.class_names)))
    return "numpy-composite", note


def _viewer_screenshot_subprocess(
    args: argparse.Namespace, labels_path: Path, region: np.ndarray, png_path: Path
) -> tuple[bool, str]:
    """Render with a real napari viewer in a subprocess (under ``xvfb-run`` if needed)."""
    cmd = [
        sys.executable, "-m", "napari_muvit.cli.demo", "_screenshot",
        "--labels", str(labels_path), "--png", str(png_path), "--size", str(args.size),
        "--seed", str(args.seed), "--region", ",".join(str(int(v)) for v in region.ravel()),
        "--model", str(resolve_model_folder(args.model)),
    ]
    env = dict(os.environ)
    how = "display " + str(env.get("DISPLAY") or env.get("WAYLAND_DISPLAY") or "native")
    if not has_display():
        xvfb = shutil.which("xvfb-run")
        if xvfb is None:
            return False, "no display and no xvfb-run: composed with numpy instead"
        cmd = [xvfb, "-a", "-s", "-screen 0 1280x1024x24", *cmd]
        how = "xvfb-run"
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                              timeout=SCREENSHOT_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        return False, f"viewer subprocess failed ({type(err).__name__}); composed with numpy"
    if done.returncode != 0 or not png_path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return False, f"viewer subprocess exited {done.returncode} ({tail[0]}); composed with numpy"
    return True, how


def screenshot_main(argv: list[str]) -> int:
    """Subprocess entry: render the demo view with the precomputed labels in a real viewer."""
    p = argparse.ArgumentParser(prog="napari-muvit demo _screenshot")
    p.add_argument("--labels", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--model", required=True)
    a = p.parse_args(argv)
    region = np.array([int(v) for v in a.region.split(",")], dtype=np.int64).reshape(2, 2)
    from napari_muvit.model import load_model
    from napari_muvit.widgets import _layers as L

    model = load_model(a.model)
    # Shown (invisible under xvfb-run): a hidden viewer never draws, so multiscale layers
    # would stay at their coarsest level.
    viewer = build_demo_viewer(a.size, a.seed, show=True)
    viewer.window._qt_window.resize(CANVAS_SIZE[1] + 120, CANVAS_SIZE[0] + 160)
    image = viewer.layers["synthetic rings"]
    labels = np.load(a.labels)
    viewer.add_labels(
        labels,
        name="synthetic rings MuViT",
        translate=np.asarray(image.translate) + region[0] * np.asarray(image.scale),
        scale=image.scale,
        colormap=L.labels_colormap(
            model.label_values, getattr(model, "class_colors", None), model.class_names
        ),
        features=L.class_features(model.label_values, model.class_names),
        opacity=0.6,
    )
    _settle(viewer)
    frame_view(viewer, region)
    _settle(viewer)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    write_png(Path(a.png), np.asarray(shot)[..., :3])
    viewer.close()
    return 0


# ---------------------------------------------------------------------------------------------
# dependency-free rendering
# ---------------------------------------------------------------------------------------------


def _settle(viewer: Any, seconds: float = 0.5) -> None:
    """Let Qt lay out the window and napari draw (and load the visible pyramid level)."""
    from qtpy.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.02)


def composite(image: np.ndarray, labels: np.ndarray, label_values: list[int],
              alpha: float = 0.5, class_names: list[str] | None = None) -> np.ndarray:
    """RGB uint8: the image (1-99.8 percentile grey) with class colours blended over it
    (label 0 and a class named ``background`` stay uncoloured, as in the viewer)."""
    img = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(img, [1.0, 99.8])
    grey = np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for k, value in enumerate(label_values):
        name = str(class_names[k]).strip().lower() if class_names and k < len(class_names) else ""
        if int(value) == 0 or name in ("background", "bg"):
            continue
        mask = labels == value
        color = _FALLBACK_COLORS[k % len(_FALLBACK_COLORS)]
        rgb[mask] = (1 - alpha) * rgb[mask] + alpha * color
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an 8-bit RGB(A) or grey image as PNG (imageio, which comes with napari)."""
    import imageio.v3 as iio

    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    iio.imwrite(Path(path), arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr,
                extension=".png")


if __name__ == "__main__":  # pragma: no cover - subprocess entry of the screenshot
    if len(sys.argv) > 1 and sys.argv[1] == "_screenshot":
        sys.exit(screenshot_main(sys.argv[2:]))
    from napari_muvit.cli import main

    sys.exit(main(["demo", *sys.argv[1:]]))

"""Event-loop gaps of a real napari viewer while napari-muvit works (issue: the viewer must never
stall > 100 ms).

A 10 ms ``QTimer`` heartbeat runs on the GUI thread; every gap between two ticks beyond 10 ms
is time the viewer could not repaint or react. Phases, each driven through the panels' public
methods only (``PredictWidget.predict_view()``, ``set_live()``, ``predict_image()``,
``cancel()``, ``TrainWidget.train()``, ``stop()``):

* ``idle``: nothing running (the machine's own noise);
* ``first predict``: a fresh predict panel, bundled model not yet loaded, ``predict_view()``
  of a ~0.8 Mpx view of the 2048² sample (scaled and translated layer), until done;
* ``live panning``: ``set_live(True)``, then the camera pans by a fifth of the view every
  300 ms, ten times, until the last view is done;
* ``whole image``: ``predict_image()`` into a temporary OME-Zarr for ``--seconds``, then
  ``cancel()``;
* ``training``: a fine-tune panel with ground-truth scribbles painted, ``train()`` for
  ``--seconds`` (the predict panel refreshes with the snapshots), then ``stop()``.

Every load runs in a fresh process (``idle``: nothing started; ``busy``: one busy process per
core, started and killed by this script), so "first predict" is really the first. Reports
max and 99th percentile of the gaps per phase, and the load average.

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/bench_ui.py --json ui-gaps.json
    xvfb-run -a python benchmarks/bench_ui.py --loads idle --seconds 5      # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import napari_muvit  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import busy_cores, machine  # noqa: E402  (a sibling module of this script)

HEARTBEAT_MS = 10
SAMPLE = 2048


class Heartbeat:
    """Tick times of a 10 ms QTimer on the GUI thread."""

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(HEARTBEAT_MS)
        self.timer.timeout.connect(self._tick)
        self.ticks: list[float] = []

    def _tick(self) -> None:
        self.ticks.append(time.perf_counter())

    def __enter__(self) -> Heartbeat:
        self.ticks = [time.perf_counter()]
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.stop()
        self.ticks.append(time.perf_counter())

    def summary(self) -> dict[str, float]:
        gaps = np.diff(np.asarray(self.ticks)) * 1000 - HEARTBEAT_MS
        gaps = np.maximum(gaps, 0.0)
        return {"max_ms": float(gaps.max()) if gaps.size else 0.0,
                "p99_ms": float(np.percentile(gaps, 99)) if gaps.size else 0.0,
                "over_100ms": int((gaps > 100).sum()), "ticks": len(self.ticks),
                "seconds": self.ticks[-1] - self.ticks[0], "loadavg": list(os.getloadavg())}


def spin(ms: float) -> None:
    """Run the Qt event loop for ``ms`` milliseconds."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop = QEventLoop()
    QTimer.singleShot(int(ms), loop.quit)
    loop.exec_()


def wait_until(condition: Any, timeout: float) -> bool:
    """Run the event loop until ``condition()`` holds (polled every 20 ms) or ``timeout`` s."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        spin(20)
    return True


def run_phases(seconds: float, timeout: float) -> dict[str, Any]:
    """All phases in this process's viewer; returns their gap summaries."""
    import napari

    from napari_muvit.data.samples import synthetic_sample
    from napari_muvit.widgets import PredictWidget, TrainWidget

    viewer = napari.Viewer(show=True, title="bench_ui")
    viewer.window._qt_window.resize(1200, 950)
    for data, kwargs, layer_type in synthetic_sample(size=SAMPLE, seed=0):
        # a scaled, translated layer: the view-to-data mapping is exercised as a user's would
        kwargs = {**kwargs, "scale": (0.5, 0.5), "translate": (100.0, -50.0)}
        getattr(viewer, f"add_{layer_type}")(data, **kwargs)
    image = viewer.layers["synthetic rings"]
    spin(500)
    out: dict[str, Any] = {}
    with Heartbeat() as hb:
        spin(1000)
    out["idle"] = hb.summary()

    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="MuViT predict", area="right")
    predict.set_model(None)  # the bundled model
    predict.image_layer = image
    cam = viewer.camera
    cam.center = tuple(float(v) for v in image.data_to_world((SAMPLE / 2, SAMPLE / 2)))
    cam.zoom = 1.3 * 2  # ~1.3 screen px per image px (the layer's scale is 0.5)
    spin(300)
    with Heartbeat() as hb:
        predict.predict_view()
        done = wait_until(lambda: not predict.busy, timeout)
    out["first predict"] = {**hb.summary(), "finished": done, "status": predict.status}
    labels = predict.labels_layer()
    out["first predict"]["labelled_px"] = (int(np.count_nonzero(np.asarray(labels.data[0])))
                                           if labels is not None and labels.multiscale else
                                           (int(np.count_nonzero(np.asarray(labels.data)))
                                            if labels is not None else 0))

    with Heartbeat() as hb:
        predict.set_live(True)
        centre = np.asarray(cam.center[-2:], dtype=float)
        for i in range(10):
            spin(300)
            cam.center = tuple(centre + (i + 1) * np.array([40.0, 60.0]))
        done = wait_until(lambda: not predict.busy, timeout)
        predict.set_live(False)
    out["live panning"] = {**hb.summary(), "finished": done, "status": predict.status}

    with tempfile.TemporaryDirectory() as tmp, Heartbeat() as hb:
        predict.predict_image(Path(tmp) / "whole.zarr")
        spin(1000 * seconds)
        predict.cancel()
        done = wait_until(lambda: not predict.busy, timeout)
    out["whole image"] = {**hb.summary(), "finished": done, "status": predict.status}

    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="MuViT fine-tune", area="right", tabify=True)
    train.image_layer = image
    annotations = train.create_annotation_layer()
    from napari_muvit.data.samples import synthetic_sample_image

    gt = synthetic_sample_image(size=SAMPLE, seed=0).labels
    annotations.data[200:1800:7] = np.asarray(gt)[200:1800:7]  # scribbles: every 7th row
    annotations.refresh()
    train.set_start_model(None)  # the bundled encoder
    spin(300)
    with Heartbeat() as hb:
        train.train()
        spin(1000 * seconds)
        train.stop()
        done = wait_until(lambda: not train.busy and not predict.busy, timeout)
    out["training"] = {**hb.summary(), "finished": done, "status": train.status}
    viewer.close()
    return out


def child(load: str, seconds: float, timeout: float) -> dict[str, Any]:
    os.environ.setdefault("NAPARI_MUVIT_SETTINGS_DIR", tempfile.mkdtemp(prefix="bench_ui_"))
    if load == "busy":
        with busy_cores():
            phases = run_phases(seconds, timeout)
    else:
        phases = run_phases(seconds, timeout)
    return {"load": load, "machine": machine(), "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", nargs="+", choices=("idle", "busy"), default=["idle", "busy"])
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="how long whole-image prediction and training run")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="longest wait for a phase to finish")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--child", choices=("idle", "busy"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.seconds, args.timeout)))
        return
    results = []
    for load in args.loads:
        cmd = [sys.executable, __file__, "--child", load, "--seconds", str(args.seconds),
               "--timeout", str(args.timeout)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
        if res.returncode or not lines:
            sys.exit(f"bench_ui child ({load}) failed:\n{res.stderr[-3000:]}")
        row = json.loads(lines[-1][len("RESULT "):])
        results.append(row)
        m = row["machine"]
        print(f"\n-- {load}: {m['model']} ({m['isa']}, native bf16 {m['native_bf16']}), "
              f"{m['cores']} cores, load avg at the end {m['loadavg'][0]:.1f}")
        print(f"{'phase':<16}{'max gap ms':>11}{'p99 ms':>8}{'>100 ms':>8}{'s':>7}{'done':>6}"
              f"{'load':>6}  status")
        for name, ph in row["phases"].items():
            print(f"{name:<16}{ph['max_ms']:>11.0f}{ph['p99_ms']:>8.0f}{ph['over_100ms']:>8}"
                  f"{ph['seconds']:>7.1f}{str(ph.get('finished', '')):>6}"
                  f"{ph['loadavg'][0]:>6.1f}  {ph.get('status', '')[:60]}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        script = "benchmarks/bench_ui.py"
        command = " ".join(["python", script, *sys.argv[1:]])
        args.json.write_text(json.dumps({"command": command, "script": script,
                                         "results": results}, indent=1))


if __name__ == "__main__":
    main()

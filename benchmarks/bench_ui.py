"""Event-loop gaps of a real napari viewer while napari-muvit works (issue: the viewer must never
stall > 100 ms).

A 10 ms ``QTimer`` heartbeat runs on the GUI thread; every gap between two ticks beyond 10 ms
is time the viewer could not repaint or react.  The GUI thread's CPU time within each gap is
recorded too ("max CPU": the most GUI-thread work in one gap), which separates work on the GUI
thread from waiting for a core or for the GIL on a shared machine.  Phases, each driven
through the panels' public methods only (``PredictWidget.predict_view()``, ``set_live()``,
``set_model()``, ``predict_image()``, ``cancel()``, ``TrainWidget.train()``, ``stop()``):

* ``idle``: nothing running (the machine's own noise);
* ``first predict``: a fresh predict panel, bundled model not yet loaded, ``predict_view()``
  of a ~0.8 Mpx view of the 2048² sample (scaled and translated layer), until done;
* ``panning, no job``: the camera pans by a fifth of the view every 300 ms, ten times, with
  nothing running: napari's own frames, the baseline of the next phase on the same load;
* ``live panning``: ``set_live(True)``, then the same pans, until the last view is done;
* ``model switch``: ``set_model()`` to another model folder (a copy of the bundled model,
  not loaded yet), then ``predict_view()`` of the same view, until done;
* ``switch back``: ``set_model()`` back to the bundled model and ``predict_view()``: its
  tiles of this view come from the engine's tile cache, in one burst (where painting each
  tile on arrival costs most);
* ``whole image``: ``predict_image()`` into a temporary OME-Zarr for ``--seconds``, then
  ``cancel()``;
* ``training``: what a user's *Train* click sets off: a fine-tune panel with scribbles painted
  across the view (ground truth along 16 strokes), ``train()`` with the default new head
  (``--classifier forest``: features, the forest's fit in the worker, its snapshot), the predict
  panel switching to the trained model and re-predicting the view, until that view is shown
  and both panels are idle (``--classifier mlp``: until the view of the quick fit is shown and
  fine-tuning runs, then ``--seconds`` more of fine-tuning with the predict panel following
  its snapshots, then ``stop()``).  ``snapshot_s``/``refreshed_s``: seconds from the click to
  the first snapshot and to the refreshed view.

``--profile`` samples the GUI thread's stack every millisecond (and the other threads') and
prints, per phase, what it ran in the longest gap and in the gap with the most GUI-thread CPU:
the tool that found what is left of the stalls (see docs/benchmarks.md).

Every load runs in a fresh process (``idle``: nothing started; ``busy``: one busy process per
core, started and killed by this script), so "first predict" is really the first. Reports
max and 99th percentile of the gaps per phase, and the load average at the end of each phase.

``--painting sliced direct`` runs each load twice (alternating, each in a fresh process): with
the panel's time-sliced painting (the default) and with every streamed message painted as it
arrives (``predict.PAINT_SLICE_S = None``, the behaviour before), and prints the ratios;
``--rounds N`` repeats them (alternating) and compares medians.  The result file holds every
run and ``tables[load]``: per phase the medians of the time-sliced runs, the GUI-thread CPU
columns and the on-arrival comparison (``--summarize FILE`` rewrites them from the runs).

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
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import napari_muvit  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _load import LOADS, load_context, machine  # noqa: E402  (a sibling module of this script)

HEARTBEAT_MS = 10
BASELINE = "panning, no job"  # napari's own frames on the same load: the ratios' baseline
SAMPLE = 2048


class Heartbeat:
    """Tick times of a 10 ms QTimer on the GUI thread, and the GUI thread's CPU time at each.

    A gap's CPU time tells the two kinds of stall apart on a shared machine: the GUI thread
    working (napari's or the plugin's code) vs waiting (descheduled by the OS, or for the GIL
    held by a worker thread).
    """

    def __init__(self) -> None:
        from qtpy.QtCore import QTimer

        self.timer = QTimer()
        self.timer.setInterval(HEARTBEAT_MS)
        self.timer.timeout.connect(self._tick)
        self.ticks: list[float] = []
        self.cpu: list[float] = []
        self.queued: list[float] = []

    def _tick(self) -> None:
        self.ticks.append(time.perf_counter())
        self.cpu.append(time.thread_time())
        self.queued.append(runqueue_wait_s())

    def __enter__(self) -> Heartbeat:
        self.ticks, self.cpu, self.queued = [], [], []
        self._tick()
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.timer.stop()
        self._tick()

    def summary(self) -> dict[str, float]:
        gaps = np.maximum(np.diff(np.asarray(self.ticks)) * 1000 - HEARTBEAT_MS, 0.0)
        cpu = np.diff(np.asarray(self.cpu)) * 1000  # GUI-thread CPU time within each gap
        queued = np.diff(np.asarray(self.queued)) * 1000  # runnable, waiting for a core
        longest = int(np.argmax(gaps)) if gaps.size else 0
        interval = gaps[longest] + HEARTBEAT_MS if gaps.size else 0.0
        return {"max_ms": float(gaps.max()) if gaps.size else 0.0,
                "p99_ms": float(np.percentile(gaps, 99)) if gaps.size else 0.0,
                "over_100ms": int((gaps > 100).sum()),
                # the GUI thread's own work: in the longest gap, and the most in any gap
                "cpu_in_max_gap_ms": float(cpu[longest]) if cpu.size else 0.0,
                "max_cpu_ms": float(cpu.max()) if cpu.size else 0.0,
                "p99_cpu_ms": float(np.percentile(cpu, 99)) if cpu.size else 0.0,
                # the rest of the longest gap: waiting for a core (the OS ran another thread),
                # and blocked (the GIL, the OpenGL driver's threads, the event loop's own wait)
                "core_wait_in_max_gap_ms": float(queued[longest]) if queued.size else 0.0,
                "blocked_in_max_gap_ms": float(max(0.0, interval - cpu[longest]
                                                   - queued[longest])) if queued.size else 0.0,
                "ticks": len(self.ticks),
                "seconds": self.ticks[-1] - self.ticks[0], "loadavg": list(os.getloadavg())}


def runqueue_wait_s() -> float:
    """Seconds this thread has spent runnable but waiting for a core (Linux schedstat; 0
    where the kernel does not report it)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


class StackSampler:
    """What the GUI thread runs, sampled every millisecond from a helper thread
    (``--profile``): the stacks inside the longest gap of each phase are printed, innermost
    project/napari/vispy frames first.  Sampling needs the GIL, so the samples of a gap show
    where the GUI thread's Python code was whenever it let another thread run (every switch
    interval, set to 1 ms while sampling).
    """

    def __init__(self) -> None:
        self.main = threading.main_thread().ident
        self.samples: list[tuple[float, tuple[str, ...]]] = []
        self.others: list[tuple[tuple[str, ...], ...]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> StackSampler:
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(0.001)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        sys.setswitchinterval(self._interval)

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            # Holding another thread's frame while it runs on could make this thread drop the
            # last reference to its locals (Qt objects destroyed in the wrong thread): no
            # thread switch while the frames are held.
            sys.setswitchinterval(10.0)
            try:
                frames = sys._current_frames()
                stack = _stack(frames.get(self.main))
                # the other threads (workers): innermost frames only, who held the GIL
                others = tuple(_stack(f, 8) for ident, f in frames.items()
                               if ident not in (self.main, me))
                del frames
            finally:
                sys.setswitchinterval(0.001)
            self.samples.append((time.perf_counter(), tuple(stack)))
            self.others.append(others)
            time.sleep(0.001)

    def report(self, name: str, heartbeat: Heartbeat, top: int = 12) -> list[str]:
        """Lines describing the GUI thread's stacks in ``heartbeat``'s longest gap."""
        ticks = np.asarray(heartbeat.ticks)
        if ticks.size < 2:
            return []
        cpu = np.diff(np.asarray(heartbeat.cpu))
        lines = []
        longest, busiest = int(np.argmax(np.diff(ticks))), int(np.argmax(cpu))
        for what, i in (("longest gap", longest), ("most GUI-thread CPU", busiest)):
            if what != "longest gap" and i == longest:
                continue
            lines += self._gap(f"{name}: {what}", ticks[i], ticks[i + 1], cpu[i], top)
        return lines

    def _gap(self, title: str, t0: float, t1: float, cpu: float, top: int) -> list[str]:
        inside = [stack for t, stack in self.samples if t0 <= t <= t1]
        lines = [f"== {title} {1000 * (t1 - t0):.0f} ms, GUI-thread CPU {1000 * cpu:.0f} ms, "
                 f"{len(inside)} samples"]
        # the worker threads when the sampler got the GIL (during the gap and just after it):
        # a long gap with few samples was a GIL held elsewhere
        times = [t for t, _ in self.samples]
        lo = int(np.searchsorted(times, t0))
        hi = int(np.searchsorted(times, t1, side="right"))
        seen: list[tuple[float, tuple[str, ...]]] = []
        for k in range(max(lo - 1, 0), min(hi + 1, len(self.samples))):
            for stack in self.others[k]:
                if stack and not stack[0].startswith("threading.py:wait"):
                    seen.append((1000 * (times[k] - t0), stack))
        lines.append("  -- other threads (not waiting) at the samples around the gap")
        for at, stack in seen[:12]:
            lines.append(f"    +{at:6.0f} ms  " + " <- ".join(stack))
        for depth in (1, 3, 6, 10):
            lines.append(f"  -- innermost {depth} frames (count)")
            for stack, n in Counter(s[:depth] for s in inside).most_common(top):
                lines.append(f"    {n:4d}  " + " <- ".join(stack))
        lines.append("  -- frames anywhere on the stack (count of samples)")
        anywhere = Counter(frame.rsplit(":", 1)[0] for s in inside for frame in set(s))
        for frame, n in anywhere.most_common(40):
            lines.append(f"    {n:4d}  {frame}")
        return lines


def _stack(frame: Any, depth: int | None = None) -> tuple[str, ...]:
    """``file:function:line`` of ``frame`` and its callers, innermost first."""
    out = []
    while frame is not None and (depth is None or len(out) < depth):
        code = frame.f_code
        out.append(f"{Path(code.co_filename).name}:{code.co_name}:{frame.f_lineno}")
        frame = frame.f_back
    return tuple(out)


PROFILE: StackSampler | None = None  # set by --profile
PROFILE_LINES: list[str] = []


def profiled(name: str, heartbeat: Heartbeat) -> None:
    if PROFILE is not None:
        PROFILE_LINES.extend(PROFILE.report(name, heartbeat))


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


def until_idle(timeout: float, *panels: Any) -> bool:
    """Wait until no panel is busy, then let the jobs' last queued signals arrive."""
    done = wait_until(lambda: not any(p.busy for p in panels), timeout)
    spin(100)
    return done


def pan(cam: Any, centre: np.ndarray) -> None:
    """Pan the camera by a fifth of the view every 300 ms, ten times (a user browsing)."""
    for i in range(10):
        spin(300)
        cam.center = tuple(centre + (i + 1) * np.array([40.0, 60.0]))


def run_phases(seconds: float, timeout: float, other_model: Path,
               classifier: str = "forest") -> dict[str, Any]:
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
        done = until_idle(timeout, predict)
    out["first predict"] = {**hb.summary(), "finished": done, "status": predict.status}
    profiled("first predict", hb)
    labels = predict.labels_layer()
    out["first predict"]["labelled_px"] = (int(np.count_nonzero(np.asarray(labels.data[0])))
                                           if labels is not None and labels.multiscale else
                                           (int(np.count_nonzero(np.asarray(labels.data)))
                                            if labels is not None else 0))

    centre = np.asarray(cam.center[-2:], dtype=float)
    with Heartbeat() as hb:  # the baseline of the next phase: napari's own frames, no job
        pan(cam, centre)
        spin(100)
    out[BASELINE] = hb.summary()
    profiled(BASELINE, hb)
    cam.center = tuple(centre)
    spin(300)

    with Heartbeat() as hb:
        predict.set_live(True)
        pan(cam, centre)
        done = until_idle(timeout, predict)
        predict.set_live(False)
    out["live panning"] = {**hb.summary(), "finished": done, "status": predict.status}
    profiled("live panning", hb)

    cam.center = tuple(float(v) for v in image.data_to_world((SAMPLE / 2, SAMPLE / 2)))
    spin(300)
    with Heartbeat() as hb:
        predict.set_model(other_model)
        spin(100)  # the user's next click
        predict.predict_view()
        done = until_idle(timeout, predict)
    out["model switch"] = {**hb.summary(), "finished": done, "status": predict.status}
    profiled("model switch", hb)

    with Heartbeat() as hb:
        predict.set_model(None)  # back to the bundled model: its tiles come from the cache
        spin(100)
        predict.predict_view()
        done = until_idle(timeout, predict)
    out["switch back"] = {**hb.summary(), "finished": done, "status": predict.status,
                          "cache_hits": int(predict.predictor.stats.get("cache_hits", -1))}
    profiled("switch back", hb)

    with tempfile.TemporaryDirectory() as tmp, Heartbeat() as hb:
        predict.predict_image(Path(tmp) / "whole.zarr")
        spin(1000 * seconds)
        predict.cancel()
        done = until_idle(timeout, predict)
    out["whole image"] = {**hb.summary(), "finished": done, "status": predict.status}
    profiled("whole image", hb)

    train = TrainWidget(viewer)
    viewer.window.add_dock_widget(train, name="MuViT fine-tune", area="right", tabify=True)
    train.image_layer = image
    annotations = train.create_annotation_layer()
    from napari_muvit.data.samples import synthetic_sample_image

    gt = np.asarray(synthetic_sample_image(size=SAMPLE, seed=0).labels)
    # a user's scribbles: a few strokes across the visible region (ground truth along them)
    rows, cols = slice(720, 1330, 40), slice(720, 1330)
    annotations.data[rows, cols] = gt[rows, cols]
    annotations.refresh()
    train.set_start_model(None)  # the bundled encoder
    train.state.classifier = classifier
    spin(300)
    with Heartbeat() as hb:
        start = time.perf_counter()
        train.train()
        marks = {}

        def refreshed() -> bool:
            """The predict panel shows the trained model's view (after the forest's fit, or
            the mlp head's quick fit, whose fine-tuning then runs on)."""
            job, view = train.job, predict.state.view_job
            if job is not None and job.snapshots_published and "snapshot" not in marks:
                marks["snapshot"] = time.perf_counter() - start
            shown = (job is not None and job.snapshots_published > 0 and view is not None
                     and view.request.choice.kind == "session" and view.done.is_set()
                     and not predict.busy)
            if classifier == "forest":
                return shown and not train.busy
            return shown and job.steps_seen >= 1  # fine-tuning continues meanwhile

        done = wait_until(refreshed, timeout)
        marks["refreshed"] = time.perf_counter() - start
        if classifier != "forest":
            spin(1000 * seconds)  # fine-tuning with the predict panel following its snapshots
        train.stop()
        done = until_idle(timeout, train, predict) and done
    out["training"] = {**hb.summary(), "finished": done, "classifier": classifier,
                       "snapshot_s": marks.get("snapshot"), "refreshed_s": marks["refreshed"],
                       "steps": train.job.steps_seen if train.job is not None else 0,
                       "status": f"{train.status} | predict: {predict.status}"}
    profiled("training", hb)
    viewer.close()
    return out


def copy_of_bundled_model(folder: Path) -> Path:
    """A second model folder to switch to (the bundled weights, saved anew)."""
    from napari_muvit.model import load_model
    from napari_muvit.widgets._models import bundled_segmenter_path

    return Path(load_model(bundled_segmenter_path()).save(folder / "bundled copy"))


def child(load: str, seconds: float, timeout: float, painting: str,
          profile: bool = False, classifier: str = "forest") -> dict[str, Any]:
    global PROFILE
    os.environ.setdefault("NAPARI_MUVIT_SETTINGS_DIR", tempfile.mkdtemp(prefix="bench_ui_"))
    from napari_muvit.widgets import predict

    if painting == "direct":
        predict.PAINT_SLICE_S = None  # every message painted on arrival (before time slicing)
    with tempfile.TemporaryDirectory() as tmp:
        other = copy_of_bundled_model(Path(tmp))
        if profile:
            PROFILE = StackSampler().__enter__()
        with load_context(load) as pids:
            phases = run_phases(seconds, timeout, other, classifier)
        busy = len(pids)
        if PROFILE is not None:
            PROFILE.__exit__(None, None, None)
            print("\n".join(PROFILE_LINES), file=sys.stderr)
    return {"load": load, "busy_processes": busy, "painting": painting,
            "paint_slice_ms": None if predict.PAINT_SLICE_S is None
            else 1000 * predict.PAINT_SLICE_S, "machine": machine(), "phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", nargs="+", choices=LOADS, default=["idle", "busy"],
                        help="busy: one busy process per core in this session; desktop: the "
                             "same, each in a session of its own (see benchmarks/_load.py)")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="how long whole-image prediction and training run")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="longest wait for a phase to finish")
    parser.add_argument("--painting", nargs="+", choices=("sliced", "direct"),
                        default=["sliced"],
                        help="sliced: the panel's time-sliced painting; direct: every message "
                        "painted on arrival (as before); both: ratios are printed")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat every load and painting mode (alternating); the ratios "
                        "compare medians over the rounds")
    parser.add_argument("--classifier", choices=("forest", "mlp"), default="forest",
                        help="the fine-tune panel's new head in the training phase (forest: "
                        "fit, one refresh; mlp: quick fit, refresh, then --seconds of "
                        "fine-tuning)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the GUI thread's stack every ms and print what it ran "
                        "in the longest gap of each phase (slows everything a little)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--summarize", type=Path, default=None,
                        help="only (re)write the summary tables of this result file")
    parser.add_argument("--child", choices=LOADS, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.seconds, args.timeout,
                                           args.painting[0], args.profile,
                                           args.classifier)))
        return
    if args.summarize is not None:
        data = json.loads(args.summarize.read_text())
        data["tables"] = summary_tables(data["results"])
        args.summarize.write_text(json.dumps(data, indent=1))
        return
    results = []
    for load in args.loads:
        for round_ in range(args.rounds):
            for painting in args.painting:
                results.append({**run_child(load, painting, args), "round": round_})
    ratios = print_ratios(results) if len(args.painting) > 1 else None
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        script = "benchmarks/bench_ui.py"
        command = " ".join(["python", script, *sys.argv[1:]])
        args.json.write_text(json.dumps({"command": command, "script": script,
                                         "results": results, "ratios": ratios,
                                         "tables": summary_tables(results)}, indent=1))


def medians(results: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Per (load, painting, phase): the median over the rounds of every gap statistic."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in results:
        for name, phase in row["phases"].items():
            groups.setdefault((row["load"], row["painting"], name), []).append(phase)
    keys = ("max_ms", "p99_ms", "max_cpu_ms", "p99_cpu_ms", "cpu_in_max_gap_ms",
            "core_wait_in_max_gap_ms", "blocked_in_max_gap_ms")
    return {group: {k: float(np.median([p.get(k, np.nan) for p in phases])) for k in keys}
            for group, phases in groups.items()}


def summary_tables(results: list[dict[str, Any]]) -> dict[str, list[list[str]]]:
    """Per load, the docs table: medians over the rounds of the time-sliced runs, and the
    painting-on-arrival comparison where both were run."""
    med = medians(results)
    compared = any(r["painting"] == "direct" for r in results)
    tables = {}
    for load in dict.fromkeys(r["load"] for r in results):
        loads = [ph["loadavg"][0] for r in results if r["load"] == load
                 for ph in r["phases"].values()]
        rows = [["phase", "max gap ms", "p99 ms", "gaps > 100 ms",
                 "GUI-thread CPU in the longest gap ms",
                 "its wait for a core / blocked ms", "most GUI-thread CPU in one gap ms",
                 f"max gap / {BASELINE}",
                 *(["on arrival: most GUI-thread CPU in one gap ms",
                    "max gap: on arrival / sliced"] if compared else ["s"]),
                 "load"]]
        for (ld, painting, name), sliced in med.items():
            if ld != load or painting != "sliced":
                continue
            direct = med.get((load, "direct", name))
            runs = [r["phases"][name] for r in results
                    if r["load"] == load and r["painting"] == "sliced"]
            count = float(np.median([ph["over_100ms"] for ph in runs]))
            if compared:
                extra = ["" if direct is None else f"{direct['max_cpu_ms']:.0f}",
                         "" if direct is None
                         else f"{direct['max_ms'] / max(sliced['max_ms'], 1e-3):.2f}"]
            else:
                extra = [f"{float(np.median([ph['seconds'] for ph in runs])):.1f}"]
            waits = ("" if np.isnan(sliced["core_wait_in_max_gap_ms"]) else
                     f"{sliced['core_wait_in_max_gap_ms']:.0f} / "
                     f"{sliced['blocked_in_max_gap_ms']:.0f}")
            base = med.get((load, painting, BASELINE), {}).get("max_ms")
            rows.append([name, f"{sliced['max_ms']:.0f}", f"{sliced['p99_ms']:.0f}",
                         f"{count:g}", f"{sliced['cpu_in_max_gap_ms']:.0f}", waits,
                         f"{sliced['max_cpu_ms']:.0f}",
                         f"{sliced['max_ms'] / base:.2f}" if base else "", *extra,
                         f"{min(loads):.1f}–{max(loads):.1f}"])
        tables[load] = rows
    return tables


def print_ratios(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per load and phase: max and p99 gap painting on arrival / time-sliced (medians over
    the rounds); returns the table."""
    med = medians(results)
    print("\n-- painting on arrival (direct) / time-sliced: gap ratios (> 1: slicing helped); "
          "medians over the rounds")
    print(f"{'load':<6}{'phase':<16}{'max direct':>11}{'max sliced':>11}{'ratio':>7}"
          f"{'p99 direct':>11}{'p99 sliced':>11}{'ratio':>7}{'max CPU d/s':>13}")
    table = {}
    for (load, painting, name), sliced in med.items():
        direct = med.get((load, "direct", name))
        if painting != "sliced" or direct is None:
            continue
        row = {"direct": direct, "sliced": sliced,
               "max_ratio": direct["max_ms"] / max(sliced["max_ms"], 1e-3),
               "p99_ratio": direct["p99_ms"] / max(sliced["p99_ms"], 1e-3)}
        table[f"{load} / {name}"] = row
        print(f"{load:<6}{name:<16}{direct['max_ms']:>11.0f}{sliced['max_ms']:>11.0f}"
              f"{row['max_ratio']:>7.2f}{direct['p99_ms']:>11.0f}{sliced['p99_ms']:>11.0f}"
              f"{row['p99_ratio']:>7.2f}"
              f"{direct['max_cpu_ms']:>7.0f}/{sliced['max_cpu_ms']:<5.0f}")
    return table


def run_child(load: str, painting: str, args: argparse.Namespace) -> dict[str, Any]:
    """One load and painting mode in a fresh process; prints its rows."""
    cmd = [sys.executable, __file__, "--child", load, "--seconds", str(args.seconds),
           "--timeout", str(args.timeout), "--painting", painting,
           "--classifier", args.classifier, *(["--profile"] if args.profile else [])]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if args.profile:
        print(res.stderr)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")]
    if res.returncode or not lines:
        sys.exit(f"bench_ui child ({load}, {painting}) failed:\n{res.stderr[-3000:]}")
    row = json.loads(lines[-1][len("RESULT "):])
    m = row["machine"]
    print(f"\n-- {load}, painting {painting}: {m['model']} ({m['isa']}, native bf16 "
          f"{m['native_bf16']}), {m['cores']} cores, load avg at the end {m['loadavg'][0]:.1f}")
    print(f"{'phase':<16}{'max gap ms':>11}{'p99 ms':>8}{'>100 ms':>8}{'max CPU':>8}"
          f"{'p99 CPU':>8}{'longest: CPU/core wait/blocked':>32}{'max / ' + BASELINE:>24}"
          f"{'s':>7}{'done':>6}{'load':>6}  status")
    base = row["phases"].get(BASELINE, {}).get("max_ms")
    for name, ph in row["phases"].items():
        ratio = f"{ph['max_ms'] / base:.2f}" if base else ""
        split = (f"{ph['cpu_in_max_gap_ms']:.0f}/{ph['core_wait_in_max_gap_ms']:.0f}/"
                 f"{ph['blocked_in_max_gap_ms']:.0f}")
        print(f"{name:<16}{ph['max_ms']:>11.0f}{ph['p99_ms']:>8.0f}{ph['over_100ms']:>8}"
              f"{ph['max_cpu_ms']:>8.0f}{ph['p99_cpu_ms']:>8.0f}{split:>32}{ratio:>24}"
              f"{ph['seconds']:>7.1f}{str(ph.get('finished', '')):>6}"
              f"{ph['loadavg'][0]:>6.1f}  {ph.get('status', '')[:60]}", flush=True)
    return row


if __name__ == "__main__":
    main()

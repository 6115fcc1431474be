"""The work behind the panels, without Qt: model and source caches, and the worker functions.

Every function named ``*_job`` runs in a worker thread (started by the views through
:func:`._workers.start_worker`) and talks to the main thread only through what it yields or
returns and through plain callbacks that the view turns into queued Qt signals.  Nothing here
touches a widget or a layer.

The predict jobs are generators with a go/no-go handshake: they load the model (cached), open
the source, yield :class:`Ready` (or :class:`SinkReady`) and wait until the main thread, having
created or updated the output layer, answers through :meth:`Job.answer`; then the tiles stream.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from napari_muvit.data.geometry import grid_cell_region
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.hardware import check_precision, describe_runtime
from napari_muvit.engine.points import PointPredictor, PointTrainer, is_detector
from napari_muvit.engine.predictor import Predictor
from napari_muvit.engine.quicktrain import (
    QuickConfig,
    QuickTrainer,
    check_quick_options_apply,
    starts_with_quick_fit,
)
from napari_muvit.engine.stores import create_zarr_sink
from napari_muvit.engine.threads import ThreadShares
from napari_muvit.engine.trainer import TrainConfig, Trainer, prepare_start_model
from napari_muvit.errors import InputError
from napari_muvit.widgets import _layers as L
from napari_muvit.widgets._models import (
    BUNDLED,
    SESSION,
    ModelChoice,
    bundled_segmenter_path,
    describe,
    load_segmenter,
    registry,
)
from napari_muvit.widgets.state import ENCODER

#: torch threads of this process's GUI jobs (view, whole image, training): they share the cores
#: but one, which stays with napari's event loop; ``threads`` is the panel's Threads setting.
GUI_THREADS = ThreadShares(reserve=1)

# ---------------------------------------------------------------------------------------------
# models and sources
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PredictorOptions:
    """How the predict panel runs a model (its device, precision, overlap and batch)."""

    device: str = "auto"
    precision: str = "auto"
    overlap: int = -1  # automatic: the engine's blending default (tile size / 8, / 4 for a forest)
    batch_size: int = 0  # 0 = automatic

    @classmethod
    def of(cls, state: Any) -> PredictorOptions:
        """The options chosen in a :class:`~.state.PredictState`."""
        return cls(state.device, state.precision, int(state.overlap), int(state.batch_size))

    def make(self, model: Any, **overrides: Any) -> Any:
        """A :class:`Predictor` of ``model`` with these options (``overrides`` win)."""
        kwargs: dict[str, Any] = dict(device=self.device, amp=self.precision,
                                      overlap=None if self.overlap < 0 else self.overlap,
                                      batch_size=self.batch_size or None)
        # a point detector's tiles are decoded into points: the engine's point predictor
        make = PointPredictor if is_detector(model) else Predictor
        return make(model, **{**kwargs, **overrides})


@dataclass(eq=False)
class Loaded:
    """A segmenter with its predictor, as the predict panel uses it."""

    choice: ModelChoice
    version: int
    model: Any
    predictor: Any
    options: PredictorOptions
    precision_warning: str | None = None  # the chosen precision is emulated (slow) here
    # the output layers' colours, built in the worker (a napari colormap is not free to build)
    colormap: Any = None

    @property
    def identity(self) -> tuple:
        """What tiles painted into a layer depend on (model, its weights version, tiling,
        precision)."""
        p = self.predictor
        return (self.choice, self.version, id(self.model), p.tile_size, p.overlap, p.amp_dtype)

    def summary(self) -> str:
        """The model line, then device (and what it has), precision, threads and batch."""
        p = self.predictor
        runtime = describe_runtime(p.device, p.amp_dtype, GUI_THREADS.share(), p.batch_size)
        return f"{describe(self.model, p.device, p.tile_size)}\n{runtime}"


def precision_warning(predictor: Any) -> str | None:
    """One line if the predictor's autocast precision is emulated (slower) on this hardware.

    Runs a one-off micro-timing (cached per process), so call it from a worker thread."""
    if predictor.amp_dtype is None:
        return None
    model = predictor.model
    check = check_precision(predictor.device, predictor.amp_dtype,
                            int(getattr(getattr(model, "encoder", None), "dim", 128)),
                            int(getattr(model, "head_dim", 32)))
    return check.message if check.slow else None


class ModelLoader:
    """Thread-safe cache of loaded models and their predictors (one load per model)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[tuple, Any] = {}
        self._loaded: dict[tuple, Loaded] = {}

    def get(self, choice: ModelChoice, options: PredictorOptions) -> Loaded:
        with self._lock:
            version = registry().session_version(choice.value) if choice.kind == SESSION else 0
            mkey = (choice, version)
            model = self._models.get(mkey)
            if model is None:
                model = load_segmenter(choice)
                # Keep the few most recent models only: each can be hundreds of MB.
                while len(self._models) >= 3:
                    self._models.pop(next(iter(self._models)))
                self._models[mkey] = model
            pkey = (mkey, options)
            loaded = self._loaded.get(pkey)
            if loaded is None:
                predictor = options.make(model)
                loaded = Loaded(choice, version, model, predictor, options,
                                precision_warning(predictor), L.model_colormap(model))
                while len(self._loaded) >= 4:
                    self._loaded.pop(next(iter(self._loaded)))
                self._loaded[pkey] = loaded
            return loaded

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._loaded.clear()


def load_job(loader: ModelLoader, choice: ModelChoice, options: PredictorOptions) -> Loaded:
    """Worker: load ``choice`` (for the model description line)."""
    return loader.get(choice, options)


class SourceCache:
    """One :class:`PyramidSource` per (layer data, plane): the engine's tile cache is keyed by
    the source object, so reusing it is what makes re-visiting a region free."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sources: dict[tuple, tuple[Any, Any]] = {}

    def get(self, layer: Any, plane: L.LayerPlane) -> Any:
        key = (id(layer), plane.key(), plane.rgb)
        data = layer.data
        with self._lock:
            hit = self._sources.get(key)
            if hit is not None and hit[0] is data:
                return hit[1]
        source = L.plane_source(layer, plane)
        with self._lock:
            self._sources[key] = (data, source)
        return source

    def drop_layer(self, layer: Any) -> None:
        with self._lock:
            for key in [k for k in self._sources if k[0] == id(layer)]:
                del self._sources[key]


def with_channels(plane: L.LayerPlane, in_channels: int) -> L.LayerPlane:
    """The plane with its leading axis read as channels when the model wants that many."""
    if plane.channel_axis is not None or plane.rgb or in_channels <= 1:
        return plane
    shape0 = plane.level_shapes[0]
    if plane.ndim >= 3 and 0 not in plane.displayed and shape0[0] == in_channels:
        index = {a: i for a, i in plane.index.items() if a != 0}
        return replace(plane, channel_axis=0, index=index)
    return plane


# ---------------------------------------------------------------------------------------------
# predict jobs
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class ViewRequest:
    """Everything a predict job needs, captured in the main thread."""

    layer: Any
    plane: L.LayerPlane
    region: np.ndarray
    choice: ModelChoice
    options: PredictorOptions
    probabilities: bool
    live: bool
    uncertainty: bool = False  # the uncertainty layer (also needs the class probabilities)


@dataclass(eq=False)
class Job:
    """A predict job: its request, cancel token, the main-thread handshake and its results.

    Attributes the main thread fills in: ``loaded``/``plane`` (from the handshake),
    ``target`` (the output: a :class:`~.outputs.ViewTarget` or the whole image's Labels
    layer), ``total`` tiles to compute and ``painted`` so far, ``sink`` (whole image).
    """

    kind: str  # "view" | "image"
    request: Any = None
    out_path: Path | None = None
    token: CancelToken = field(default_factory=CancelToken)
    go: threading.Event = field(default_factory=threading.Event)
    proceed: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    worker: Any = None
    loaded: Loaded | None = None
    plane: L.LayerPlane | None = None
    target: Any = None
    total: int = 0
    painted: int = 0
    started: float = field(default_factory=time.perf_counter)
    progress_bar: Any = None
    sink: Any = None
    relay: Any = None  # the view's queued-signal relay, kept alive with the job
    # where a whole-image job writes when not to ``out_path`` itself (labels inside the
    # source OME-Zarr: an :class:`~napari_muvit.engine.ome_labels.SourceLabels`)
    sink_target: Any = None
    limit: int | None = None  # live: new tiles the time budget allows (centre first)
    budget_stop: bool = False  # live: stopped at ``limit``; a click on Predict view finishes

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def answer(self, proceed: bool) -> None:
        """The main thread's answer to the Ready handshake (go or no-go)."""
        self.proceed = bool(proceed)
        self.go.set()

    def cancel(self) -> None:
        # Only the token: the engine stops within one batch and the generator's ``finally``
        # runs.  (``worker.quit()`` would stop superqt's loop *without* closing the
        # generator, so its cleanup would wait for garbage collection.)
        self.token.cancel()
        self.go.set()  # release a worker waiting for the handshake


@dataclass(eq=False)
class Ready:
    """Yielded by a view job once the model is loaded and the source is open."""

    loaded: Loaded
    plane: L.LayerPlane
    source: Any
    region: np.ndarray


@dataclass(eq=False)
class PointsFound:
    """Yielded by a view job of a point detector: the points of ``region`` (level-0 ``y, x``
    of the plane, ``class``, ``score``; :meth:`PointPredictor.predict_table`)."""

    table: dict[str, np.ndarray]
    region: np.ndarray


@dataclass(eq=False)
class SinkReady:
    """Yielded by a whole-image job once its zarr store exists."""

    loaded: Loaded
    plane: L.LayerPlane
    sink: Any
    remaining: int


def wait_go(job: Job) -> bool:
    """Block the worker until the main thread answered the Ready handshake."""
    while not job.go.wait(0.05):
        if job.token.cancelled:
            return False
    return job.proceed and not job.token.cancelled


def view_job(
    job: Job, loader: ModelLoader, sources: SourceCache, previous: Job | None
) -> Iterator[Any]:
    """Worker: load the model, hand over, then stream the view's tiles."""
    req: ViewRequest = job.request
    try:
        loaded = loader.get(req.choice, req.options)
        plane = with_channels(req.plane, loaded.model.in_channels)
        source = sources.get(req.layer, plane)
        loaded.predictor.check_source(source)
        # Whole tile cells only: a tile computed for a clipped core would leave its cell half
        # empty, and the next view would have to recompute it to fill the rest.
        region = grid_cell_region(req.region, loaded.predictor.step, plane.shape)
        yield Ready(loaded, plane, source, region)
        if not wait_go(job):
            return
        if previous is not None:
            # The superseded job stops within one batch; waiting keeps the predictor (and its
            # cache) single-threaded.
            while not previous.done.wait(0.05):
                if job.token.cancelled:
                    return
        with GUI_THREADS.job("predict view") as share:
            # tuned within the panel's share, unless the user set Threads
            loaded.predictor.adapt_threads = share.adaptive
            if is_detector(loaded.model):
                # points are decoded and de-duplicated over the whole region, then shown at once
                table = loaded.predictor.predict_table(source, region, cancel=job.token)
                if not job.token.cancelled:
                    yield PointsFound(table, region)
                return
            yield from loaded.predictor.iter_tiles(
                source, region=region, cancel=job.token,
                probabilities=req.probabilities or req.uncertainty,
            )
    finally:
        job.done.set()


def image_job(
    job: Job,
    loader: ModelLoader,
    sources: SourceCache,
    progress: Callable[[int, int], None],
    overwrite: bool,
) -> Iterator[Any]:
    """Worker: predict the whole plane into a resumable OME-Zarr store; returns whether the
    store is complete.  ``progress(done, total)`` is called from this thread."""
    req: ViewRequest = job.request
    sink = None
    try:
        loaded = loader.get(req.choice, req.options)
        if is_detector(loaded.model):
            raise InputError(
                "'Predict whole image' writes labels; for a point detector's points of the "
                "whole image use 'napari-muvit predict IMAGE --model FOLDER --out points.csv'"
            )
        plane = with_channels(req.plane, loaded.model.in_channels)
        source = sources.get(req.layer, plane)
        base = loaded.predictor
        # A separate predictor without tile cache: whole-image tiles are visited once, and
        # this job must not share mutable state with a concurrent live view.
        pred = req.options.make(loaded.model, device=base.device, batch_size=base.batch_size,
                                tile_size=base.tile_size, cache_tiles=0)
        pred.check_source(source)
        sink = create_zarr_sink(
            pred, source, job.sink_target or job.out_path, probabilities=req.probabilities,
            overwrite=overwrite,
        )
        remaining = sink.remaining()
        yield SinkReady(loaded, plane, sink, remaining)
        if not wait_go(job):
            sink.close(complete=False)
            return
        with GUI_THREADS.job("whole image") as share:
            pred.threads = share  # re-read before every batch: training may start or end
            pred.predict(
                source,
                sink=sink,
                progress=lambda done, total, _msg: progress(int(done), int(total)),
                cancel=job.token,
            )
        return sink.complete
    finally:
        # Aborted between creating the store and predicting (viewer closed, worker quit):
        # free the store for other runs now, not when the sink is garbage-collected.
        if sink is not None:
            sink.release_lock()
        job.done.set()


# ---------------------------------------------------------------------------------------------
# train jobs
# ---------------------------------------------------------------------------------------------


def preload_training_modules() -> None:
    """Import what the trainer would import on first use, in the calling (main) thread.

    Importing them from the training thread holds the GIL in long stretches and froze the
    event loop for ~0.4 s at the start of training.  torch._dynamo (and sympy with it) is
    pulled in by the first ``torch.optim`` optimizer (``add_param_group``), the sampler by the
    trainer's dataset.
    """
    import torch._dynamo  # noqa: F401

    import napari_muvit.data.sampler  # noqa: F401


@dataclass(eq=False)
class TrainRequest:
    """Everything the training worker needs, captured in the main thread."""

    image: Any
    plane: L.LayerPlane
    labels: Any  # 2-D array-like view of the painted plane
    start: ModelChoice
    start_model: Any  # a session model object to continue from, else None
    class_names: dict[int, str]
    config: Any
    name: str
    publish_every: int
    # clicked points (a PointTable of the plane) instead of ``labels``: trains a point detector
    points: Any = None


@dataclass(eq=False)
class TrainJob:
    """A fine-tuning job: the request, its cancel token, the worker's trainer and what it
    reported (``steps_seen``, ``regions_sent`` painted while training, ``history``)."""

    request: TrainRequest
    token: CancelToken = field(default_factory=CancelToken)
    done: threading.Event = field(default_factory=threading.Event)
    trainer: Any = None
    worker: Any = None
    relay: Any = None
    history: dict[str, Any] | None = None
    steps_seen: int = 0
    regions_sent: int = 0
    snapshots_published: int = 0
    started: float = field(default_factory=time.perf_counter)
    ended: bool = False  # its end reached the panel: the status and buttons are final

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    def cancel(self) -> None:
        self.token.cancel()


@dataclass(frozen=True)
class TrainCallbacks:
    """How the training worker reports (all called from the worker thread)."""

    ready: Callable[[Any], None]  # the Trainer, once built
    progressed: Callable[[dict[str, Any]], None]  # every progress report
    snapshot: Callable[[Any, int], None]  # (model copy, step) every ``publish_every`` steps


def resolve_start(request: TrainRequest, in_channels: int) -> tuple[Any, list[str]]:
    """The model a fine-tuning run starts from (and notes about how it was adapted)."""
    start = request.start
    if start.kind == SESSION:
        if request.start_model is None:
            raise InputError(f"the fine-tuned model {start.value!r} is no longer available")
        init: Any = copy.deepcopy(request.start_model)
    elif start.kind == ENCODER:
        init = None  # the engine picks the bundled encoder (or says why it cannot)
    elif start.kind == BUNDLED:
        init = bundled_segmenter_path()
    else:
        init = Path(start.value)
    return prepare_start_model(init, in_channels=in_channels, seed=request.config.seed)


def train_job(job: TrainJob, report: TrainCallbacks) -> dict[str, Any]:
    """Worker: build the trainer, report it, train; snapshots every ``publish_every`` steps."""
    req = job.request
    try:
        source = L.plane_source(req.image, req.plane)
        model, notes = resolve_start(req, source.channels)
        last_publish = [0]
        share = None

        def progress(info: dict[str, Any]) -> None:
            if share is not None:
                share.apply()  # after every step: a view job may have started or ended
            report.progressed(dict(info))
            step = int(info.get("step", 0))
            final = info.get("status") not in (None, "running")
            if step and (final or step - last_publish[0] >= req.publish_every):
                last_publish[0] = step
                snap = trainer.snapshot()
                # the predictor reads its tile size from meta: predict with the training crop
                snap.meta = {**dict(getattr(snap, "meta", {}) or {}), "crop_size": trainer.crop_size}
                report.snapshot(snap, step)

        common = dict(
            progress=progress,
            cancel=job.token,
            class_names=req.class_names or None,
            provenance={"napari_layer": req.image.name, "source": "napari-muvit TrainWidget"},
            notes=notes,
        )
        quick = None
        if req.points is not None:
            # as train_points: the whole plane counts as annotated (unclicked = no point)
            trainer: Trainer = PointTrainer(model, [(source, req.points, None)], req.config,
                                            **common)
        elif starts_with_quick_fit(model, "pixel"):
            # a new head (or a pixel head again): the forest's answer within seconds, published
            # at once; a fine-tunable head then publishes every ``publish_every`` steps too
            published: list[int] = []

            def publish(snap: Any, info: dict[str, Any]) -> None:
                step = int(info["step"])
                if info["stage"] == "final" and (published[-1:] == [step] or last_publish[0] == step):
                    return  # already shown (the forest's fit, or the last fine-tuning step)
                snap.meta = {**dict(getattr(snap, "meta", {}) or {}),
                             "crop_size": quick.trainer.crop_size}
                published.append(step)
                report.snapshot(snap, step)

            quick = QuickTrainer(model, [(source, req.labels)], replace(req.config, head="pixel"),
                                 QuickConfig(snapshot_every=0), on_snapshot=publish, **common)
            trainer = quick.trainer
        else:
            head = getattr(model, "head_type", "unetr")
            check_quick_options_apply(
                req.config, False, f"the {head} head of the starting model is fine-tuned")
            trainer = Trainer(model, [(source, req.labels)], req.config, **common)
        job.trainer = trainer
        report.ready(trainer)
        with GUI_THREADS.job("train") as share:
            if share.adaptive:
                trainer.tune_threads(share)
            return (quick or trainer).run()
    finally:
        job.done.set()


def train_config(state: Any, val_region: np.ndarray | None) -> Any:
    """The :class:`TrainConfig` of a :class:`~.state.TrainState`."""
    steps = int(state.steps)
    return TrainConfig(
        steps=steps,
        classifier=state.classifier,
        forest_levels=state.forest_levels,
        color_space=state.color_space,
        batch_size=int(state.batch_size),
        crop_size=int(state.crop_size) or None,
        lr=float(state.lr),
        device=state.device,
        val_region=None if val_region is None else val_region.tolist(),
        # validate ~10 times per run: cheap enough, and the curve is readable
        val_every=max(1, steps // 10),
        checkpoint_every=1e9,  # the panel saves explicitly (Save as…)
    )


def latest_model(job: TrainJob | None, fallback: Any) -> Any:
    """A snapshot of the job's current weights with its training metadata (else
    ``fallback``, the last published snapshot)."""
    trainer = None if job is None else job.trainer
    if trainer is None:
        return fallback
    model = trainer.snapshot()
    model.meta = {
        **dict(getattr(model, "meta", {}) or {}),
        "crop_size": trainer.crop_size,
        "train_config": trainer.config.to_dict(),
        "trained_steps": trainer.step,
        "napari_layer": job.request.image.name,
    }
    return model


def save_job(model: Any, folder: Path, overwrite: bool) -> Path:
    """Worker: save ``model`` as a model folder."""
    return Path(model.save(folder, overwrite=overwrite))


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def export_job(model: Any, out: Path, layer: Any = None, plane: L.LayerPlane | None = None) -> Path:
    """Worker: write ``model`` (a segmenter, a model folder/package, or ``None`` for the bundled
    one) as a bioimage.io package at ``out``, its test tile cut from ``layer``'s plane when the
    channels fit (else the Synthetic sample)."""
    from napari_muvit.engine.predictor import resolve_model
    from napari_muvit.export import export_bioimageio

    seg = resolve_model(model)
    image = None
    if layer is not None and plane is not None:
        source = L.plane_source(layer, with_channels(plane, seg.in_channels))
        if source.channels == seg.in_channels and min(source.shape) >= seg.meta.get("crop_size", 64):
            image = source
    # the file dialog already asked before replacing an existing file
    return export_bioimageio(model, out, image=image, overwrite=True)

"""Dask scale-out of whole-image prediction into one resumable zarr store.

The coordinator (this process) validates the inputs, creates (or resumes) the
:class:`~napari_muvit.engine.sinks.ZarrSink`, and cuts the region into *blocks* of whole zarr
chunks. Each block is one Dask task: the worker loads the model once (cached on the worker),
opens the image once, and runs the ordinary :class:`~napari_muvit.engine.predictor.Predictor`
over the block, writing straight into the store. Blocks own whole chunks (labels,
probabilities and done flags), so workers never write the same chunk, and each chunk is batched
exactly like in the single-process path: labels are bit-identical. The coordinator then builds
the coarse pyramid levels (one task per coarse chunk, level by level) and marks the store
complete.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_muvit.data import open_image
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.predictor import Predictor, _token, resolve_model
from napari_muvit.engine.sinks import ZarrSink, build_pyramid_chunk, pyramid_chunk_boxes
from napari_muvit.engine.stores import create_zarr_sink
from napari_muvit.engine.threads import (
    PASSIVE_ENV,
    USER_POLICY_VARS,
    available_cores,
    worker_threads,
)
from napari_muvit.errors import CancelledError, InputError, MuViTError

__all__ = ["plan_blocks", "predict_distributed"]

DEFAULT_BLOCK = 2048  # world pixels per block side (rounded to whole chunks)

_LOCAL = threading.local()
_PROCESS_CACHE: dict[tuple, Any] = {}
_PROCESS_LOCK = threading.Lock()


def plan_blocks(chunk_boxes: list[Any], chunk_size: int, block_size: int) -> list[np.ndarray]:
    """Group chunk bboxes into chunk-aligned blocks of about ``block_size`` world pixels.

    Blocks keep the centre-first order of their first chunk; each block is the bounding box of
    its chunks (all on one aligned ``n×n`` chunk super-grid, so no chunk is in two blocks).
    """
    n = max(1, round(block_size / chunk_size))
    groups: dict[tuple[int, int], list[np.ndarray]] = {}
    for box in chunk_boxes:
        box = np.asarray(box, dtype=np.int64)
        key = (int(box[0, 0]) // (chunk_size * n), int(box[0, 1]) // (chunk_size * n))
        groups.setdefault(key, []).append(box)
    blocks = []
    for boxes in groups.values():
        stack = np.stack(boxes)
        blocks.append(np.stack([stack[:, 0].min(axis=0), stack[:, 1].max(axis=0)]))
    return blocks


# --------------------------------------------------------------------------------------------
# worker side
# --------------------------------------------------------------------------------------------


def _worker_cache() -> tuple[dict[tuple, Any], threading.Lock]:
    """A cache living on the Dask worker (one per worker, also with in-process workers)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return _PROCESS_CACHE, _PROCESS_LOCK
    cache = getattr(worker, "_napari_muvit_cache", None)
    if cache is None:
        cache = ({}, threading.Lock())
        worker._napari_muvit_cache = cache
    return cache


def _model_key(model_spec: Any) -> tuple:
    if isinstance(model_spec, str):
        folder = Path(model_spec)
        stamps = tuple(
            (p.name, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()
        )
        return ("folder", str(folder), stamps)
    return ("object", _token(model_spec))


def _worker_predictor(model_spec: Any, options: dict[str, Any]) -> Any:
    """The worker's Predictor for this model and options (model loaded once per worker)."""
    cache, lock = _worker_cache()
    key = ("predictor", _model_key(model_spec), tuple(sorted(options.items())))
    with lock:
        pred = cache.get(key)
        if pred is None:
            threads = options.get("torch_threads")
            if threads and os.getpid() != options.get("client_pid"):
                import torch

                torch.set_num_threads(int(threads))  # no oversubscription across workers
            model = resolve_model(model_spec if not isinstance(model_spec, str) else Path(model_spec))
            kw = {k: v for k, v in options.items() if k not in ("torch_threads", "client_pid")}
            pred = Predictor(model, cache_tiles=0, **kw)
            cache[key] = pred
            cache["models_loaded"] = cache.get("models_loaded", 0) + 1
    return pred


def _worker_source(image_spec: Any, normalization: dict | None) -> Any:
    """The worker's PyramidSource (opened once), with the coordinator's normalisation."""
    if not isinstance(image_spec, str):
        source = image_spec
    else:
        cache, lock = _worker_cache()
        with lock:
            source = cache.get(("source", image_spec))
            if source is None:
                source = open_image(image_spec)
                cache[("source", image_spec)] = source
    if normalization is not None and source.normalization.to_dict() != normalization:
        source = copy.copy(source)  # never mutate a source that may be the caller's object
        source.normalization = normalization
    return source


def _predict_block(
    block: np.ndarray, image_spec: Any, model_spec: Any, out: str,
    options: dict[str, Any], normalization: dict | None, cancel_event: str,
) -> dict[str, Any]:
    """Dask task: predict one chunk-aligned block into the shared store."""
    t0 = time.perf_counter()
    pred = _worker_predictor(model_spec, options)
    source = _worker_source(image_spec, normalization)
    sink = ZarrSink.open(out, write_pyramid=False)
    todo = sink.remaining(np.asarray(block))
    before = pred.stats["model_calls"]
    pred.predict(source, region=np.asarray(block), sink=sink, cancel=_EventToken(cancel_event))
    cache, _lock = _worker_cache()
    return {
        "tiles": todo,
        "model_calls": pred.stats["model_calls"] - before,
        "seconds": time.perf_counter() - t0,
        "models_loaded": cache.get("models_loaded", 0),
        "pid": os.getpid(),
    }


def _pyramid_task(out: str, level: int, box: np.ndarray) -> int:
    """Dask task: write one chunk of a coarse pyramid level."""
    build_pyramid_chunk(ZarrSink.open(out), level, box)
    return level


# --------------------------------------------------------------------------------------------
# coordinator
# --------------------------------------------------------------------------------------------


def _client(scheduler: Any, workers: int | None, processes: bool, threads_per_worker: int
            ) -> tuple[Any, Callable[[], None]]:
    """A dask.distributed Client (and how to close what we started)."""
    from distributed import Client, LocalCluster

    if scheduler is not None and not isinstance(scheduler, str):
        return scheduler, lambda: None  # an existing Client
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise InputError(f"scheduler: cannot connect to {scheduler!r} ({err})") from None
        return client, client.close
    n = int(workers) if workers is not None else _default_workers()
    if n < 1:
        raise InputError(f"workers: expected a positive integer, got {workers!r}")
    # worker processes inherit os.environ; say the wait policy explicitly anyway, so that a
    # worker spawned by a nanny with its own environment does not spin (the user's choice wins)
    extra: dict[str, Any] = {}
    if processes and not any(os.environ.get(k) for k in USER_POLICY_VARS):
        extra["env"] = dict(PASSIVE_ENV)  # in-process workers share this process's runtime
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=threads_per_worker, processes=processes,
        dashboard_address=None, **extra,
    )
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def _default_workers() -> int:
    """Local workers when none are asked for: half the cores, 1 to 4."""
    return max(1, min(4, available_cores() // 2))


class _EventToken:
    """CancelToken look-alike on the worker side, backed by a distributed ``Event`` so that a
    cancel reaches running tasks within one batch (Dask cannot interrupt a running task).

    The scheduler is asked at most every ``interval`` seconds (one round trip per check).
    """

    def __init__(self, name: str, interval: float = 0.25) -> None:
        from distributed import Event

        self._event = Event(name)
        self._interval = interval
        self._last = 0.0
        self._state = False

    @property
    def cancelled(self) -> bool:
        now = time.monotonic()
        if not self._state and now - self._last >= self._interval:
            self._last = now
            self._state = bool(self._event.is_set())
        return self._state

    def raise_if_cancelled(self, message: str = "cancelled by the user") -> None:
        if self.cancelled:
            raise CancelledError(message)


def _wait(futures: list, total: int, progress: Any, cancel: CancelToken | None,
          client: Any, event: Any) -> list[dict[str, Any]]:
    """Collect block results, reporting progress; on cancel (or any error) tell the running
    tasks to stop and wait for them, so nothing writes to the store after we return."""
    from distributed import wait

    done = 0
    results = []
    pending = set(futures)
    try:
        while pending:
            if cancel is not None:
                cancel.raise_if_cancelled("cancelled by the user; finished blocks are kept")
            try:  # poll, so that a cancel is noticed while long blocks run
                finished, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            for fut in finished:
                res = fut.result()
                results.append(res)
                done += res["tiles"]
            if progress is not None and finished:
                progress(min(done, total), total, f"{done}/{total} tiles")
    except BaseException:
        event.set()
        # Running tasks stop within one batch. Futures that were cancelled or failed make
        # ``wait`` raise too; that must not mask the reason we are stopping.
        with contextlib.suppress(Exception):
            wait(futures, timeout=600)
        raise
    return results


def predict_distributed(
    image_path: Any,
    model_folder: Any,
    out: str | Path,
    scheduler: Any = None,
    workers: int | None = None,
    *,
    region: Any = None,
    device: str = "auto",
    batch_size: int | None = None,
    overlap: int = 0,
    probabilities: bool = False,
    progress: Any = None,
    cancel: CancelToken | None = None,
    overwrite: bool = False,
    skip_empty: bool | float = False,
    tile_size: int | None = None,
    amp: str | bool | None = "auto",
    block_size: int = DEFAULT_BLOCK,
    chunk_size: int | None = None,
    processes: bool = True,
    threads_per_worker: int = 1,
    torch_threads: int | None = None,
    stats: dict[str, Any] | None = None,
) -> Path:
    """Predict a whole image (or ``region``) with Dask workers into the zarr store ``out``.

    Parameters
    ----------
    image_path
        Image path (each worker opens it itself) or a picklable source/array (sent once).
    model_folder
        Model folder (each worker loads it once), a ``MuViTSegmenter`` (broadcast once), or
        ``None`` for the bundled default.
    out
        Output OME-Zarr path (created, or resumed when an unfinished matching store exists).
    scheduler
        A scheduler address (``"tcp://host:8786"``) or a ``distributed.Client``; default: a
        ``LocalCluster`` with ``workers`` workers (``processes=False`` keeps them in-process).
    block_size
        Block side in world pixels (whole chunks); one Dask task per block.
    torch_threads
        torch threads per worker process (default: cores / workers for local clusters).
    stats
        If given, filled with ``blocks`` and per-block ``results`` (tiles, seconds, worker
        pid, models loaded on that worker).

    The remaining arguments are those of :func:`napari_muvit.engine.api.predict`.
    Returns the store path; the store is marked complete at the end.
    """
    source = open_image(str(image_path) if isinstance(image_path, Path) else image_path)
    model = resolve_model(model_folder)
    options = {
        "device": device, "batch_size": batch_size, "overlap": overlap, "skip_empty": skip_empty,
        "tile_size": tile_size, "amp": amp,
    }
    pred = Predictor(model, **{**options, "device": "cpu"}, cache_tiles=0)
    pred.check_source(source)
    if block_size < 1:
        raise InputError(f"block_size: expected a positive number of pixels, got {block_size!r}")
    sink = create_zarr_sink(pred, source, out, region=region, probabilities=probabilities,
                            overwrite=overwrite, write_pyramid=False, chunk_size=chunk_size)
    # The store's lock is held by this (client) process for the whole run, not by the workers:
    # they write disjoint chunks of a store that no other run may touch meanwhile.
    close: Callable[[], None] | None = None
    try:
        blocks = plan_blocks(sink.blocks(), sink.chunk_size, block_size)
        total = sink.remaining()
        sink.expect_external_writes()
        norm = pred._reading_source(source)[1].normalization.to_dict()
        # a count the user gave is exact; a default one is a budget the workers tune within
        options["adapt_threads"] = torch_threads is None
        if scheduler is None and torch_threads is None and processes:
            # N torch processes on one machine divide its cores (no oversubscription)
            torch_threads = worker_threads(workers or _default_workers())
        options.update(torch_threads=torch_threads, client_pid=os.getpid())
        client, close = _client(scheduler, workers, processes, threads_per_worker)
        image_spec = str(Path(image_path).absolute()) if isinstance(image_path, (str, Path)) else source
        model_spec = (
            str(Path(model_folder).absolute())
            if isinstance(model_folder, (str, Path))
            else model
        )
        # hash=False: content-hashed keys would be shared with an earlier (e.g. cancelled) run
        # on the same client, whose release then cancels these tasks ("lost dependencies").
        if not isinstance(image_spec, str):
            image_spec = client.scatter(image_spec, broadcast=True, hash=False)
        if not isinstance(model_spec, str):
            model_spec = client.scatter(model_spec, broadcast=True, hash=False)
        from distributed import Event

        event_name = f"napari-muvit-cancel-{uuid.uuid4().hex}"
        event = Event(event_name, client=client)
        futures = [
            client.submit(_predict_block, b, image_spec, model_spec, str(sink.path), options,
                          norm, event_name, pure=False)
            for b in blocks
        ]
        results = _wait(futures, total, progress, cancel, client, event)
        if stats is not None:
            stats.update(blocks=[b.tolist() for b in blocks], results=results, total=total)
        missing = sink.remaining()
        if missing:
            raise MuViTError(f"{missing} tiles are still missing after all blocks finished")
        _build_pyramid(client, sink, cancel)
        sink.mark("complete")
    finally:
        if close is not None:
            close()
        sink.release_lock()
    return sink.path


def _build_pyramid(client: Any, sink: Any, cancel: CancelToken | None) -> None:
    """Coarse levels from level 0, one task per coarse chunk, level by level."""
    from distributed import wait


    for level in range(1, sink.n_levels):
        if cancel is not None:
            cancel.raise_if_cancelled()
        boxes = pyramid_chunk_boxes(sink, level, sink.region)
        futures = [client.submit(_pyramid_task, str(sink.path), level, b, pure=False)
                   for b in boxes]
        wait(futures)
        for f in futures:
            f.result()  # re-raise worker errors

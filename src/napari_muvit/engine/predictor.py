"""Tiled MuViT prediction: nested context crops, batching, caching, blending and sinks.

The :class:`Predictor` covers a region with level-1 tiles on the global tile grid
(:func:`~napari_muvit.data.geometry.plan_tiles`), reads each tile's nested context crops
(:func:`~napari_muvit.data.geometry.centered_nested_bboxes`), runs the segmenter in batches
and hands :class:`TileResult` objects (the labels of the output pixels each tile owns) to a
sink. Because tiles sit on a global grid, the same tile always gets the same bboxes, which makes
three things cheap:

* a tile cache (LRU) so that re-requesting an overlapping region (the user panned) only
  computes new tiles;
* resuming a zarr prediction (a tile's cell is either done or not);
* identical results from the single-process and the Dask paths.

It knows nothing of Qt: progress is a ``progress(done, total, message)`` callback and
cancellation a :class:`~napari_muvit.engine.cancel.CancelToken` checked before every batch.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import time
import uuid
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from napari_muvit.data.geometry import (
    Tile,
    blend_weights,
    centered_nested_bboxes,
    clip_region,
    grid_cell_range,
    plan_tiles,
    tile_contributors,
)
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.device import (
    autocast,
    free_memory_bytes,
    is_out_of_memory,
    release_cached_memory,
    resolve_amp,
    resolve_device,
)
from napari_muvit.engine.sinks import MemorySink, TileResult, ZarrSink, label_dtype
from napari_muvit.engine.threads import ThreadTuner
from napari_muvit.errors import IncompatibleModelError, InputError, MuViTError

__all__ = [
    "Predictor",
    "TileCache",
    "default_overlap",
    "model_digest",
    "resolve_model",
]

Progress = Callable[[int, int, str], Any]

DEFAULT_TILE_SIZE = 128
DEFAULT_EMPTY_STD = 0.02  # normalised units: 2% of the 1-99.8 percentile range
CPU_BATCH = 4  # best or within 5% of best on CPU (docs/benchmarks.md, bench_predict.py)
MAX_AUTO_BATCH = 64


def default_overlap(tile_size: int, model: Any = None) -> int:
    """The blending overlap used when none is given: ``tile_size // 8`` (8 px for 64² tiles),
    ``tile_size // 4`` for a filter-bank head that does not use the encoder (a forest).

    Without overlap, tile borders showed as seams: labels changed 1.7× (the bundled model) to
    6–11× (models trained for a minute on strokes) more often across tile borders than inside
    tiles; with ``tile_size // 8`` px of raised-cosine blending the ratio was 0.94–1.01 at
    1.5–1.8× the prediction time (``benchmarks/bench_seams.py``, docs/benchmarks.md). A forest
    reads image filters (σ up to 5 px) whose responses at a tile's edge see replicated pixels:
    on a real RGB photograph, labels within 2 px of a seam then differed from a prediction in
    4× larger tiles at 0.33 % of the pixels with an eighth, 0.06 % with a quarter
    (``benchmarks/bench_scribbles.py --cli-defaults``, docs/benchmarks.md).
    """
    head = getattr(model, "head", None)
    filter_bank = head is not None and not getattr(head, "uses_encoder", True)
    return max(0, int(tile_size) // (4 if filter_bank else 8))


# --------------------------------------------------------------------------------------------
# results and cache
# --------------------------------------------------------------------------------------------


@dataclass
class _TileOutput:
    """Full ``S×S`` model output of one tile (the cache value)."""

    labels: np.ndarray  # (S, S) label values, argmax of float32 logits
    probs: np.ndarray | None  # (K, S, S) float16
    skipped: bool = False
    cached: bool = False

    @property
    def nbytes(self) -> int:
        return self.labels.nbytes + (0 if self.probs is None else self.probs.nbytes)


class TileCache:
    """LRU cache of tile outputs keyed by model version, source, normalisation and bboxes."""

    def __init__(self, max_tiles: int = 512) -> None:
        self.max_tiles = max(0, int(max_tiles))
        self._data: OrderedDict[tuple, _TileOutput] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple, need_probs: bool) -> _TileOutput | None:
        """The cached output, or ``None`` (also when probabilities are needed but absent)."""
        out = self._data.get(key)
        if out is None or (need_probs and out.probs is None and not out.skipped):
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return out

    def put(self, key: tuple, out: _TileOutput) -> None:
        if self.max_tiles == 0:
            return
        self._data[key] = out
        self._data.move_to_end(key)
        while len(self._data) > self.max_tiles:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __len__(self) -> int:
        return len(self._data)


# identity tokens that never collide when Python reuses an object id
_TOKENS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def _token(obj: Any) -> str:
    try:
        tok = _TOKENS.get(obj)
        if tok is None:
            tok = uuid.uuid4().hex
            _TOKENS[obj] = tok
        return tok
    except TypeError:  # not weak-referenceable
        return f"id:{id(obj)}"


def _model_version(model: torch.nn.Module) -> tuple[int, int]:
    """Changes whenever weights change in place (optimizer steps, load_state_dict) or are
    replaced: tensor version counters and storage addresses."""
    version = 0
    address = 0
    for t in (*model.parameters(), *model.buffers()):
        version += int(t._version)
        address ^= int(t.data_ptr())
    return version, address


def model_digest(model: torch.nn.Module) -> str:
    """SHA-256 of the model's weights (names, dtypes, shapes, bytes): identifies a model for
    resuming a zarr prediction, whatever folder it was loaded from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        arr = t.detach().to("cpu").contiguous().reshape(-1)  # 0-d buffers cannot be viewed
        h.update(f"{name}:{arr.dtype}:{tuple(t.shape)}".encode())
        h.update(arr.view(torch.uint8).numpy().tobytes() if arr.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# jobs: one block of target tiles and the tiles they need
# --------------------------------------------------------------------------------------------


@dataclass
class _Need:
    tile: Tile
    bboxes: np.ndarray  # (L, 2, 2)
    key: tuple


@dataclass
class _Job:
    """Targets of one block, the tiles they depend on, and outputs available so far."""

    targets: list[Tile]
    contributors: dict[tuple[int, int], list[tuple[int, int]]]
    needs: dict[tuple[int, int], _Need]
    batches: list[list[_Need]] = field(default_factory=list)
    avail: dict[tuple[int, int], _TileOutput] = field(default_factory=dict)
    refs: dict[tuple[int, int], int] = field(default_factory=dict)
    waiting: list[Tile] = field(default_factory=list)


@dataclass
class _Batch:
    job: _Job
    needs: list[_Need]
    crops: np.ndarray | None = None  # (B, L, C, S, S) of the non-empty tiles
    bboxes: np.ndarray | None = None  # (B, L, 2, 2)
    empty: np.ndarray | None = None  # (n,) bool over needs
    read_s: float = 0.0


# --------------------------------------------------------------------------------------------
# predictor
# --------------------------------------------------------------------------------------------


class Predictor:
    """Tiled, batched, cached MuViT inference.

    Parameters
    ----------
    model
        A :class:`~napari_muvit.model.MuViTSegmenter` (moved to ``device``).
    device
        ``"auto"`` (CUDA > MPS > CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"``.
    batch_size
        Tiles per forward pass; ``None`` adapts to free GPU memory (4 on CPU/MPS). A CUDA
        out-of-memory error halves it and retries the batch.
    amp
        ``"auto"`` (bf16/fp16 autocast on CUDA, float32 elsewhere), ``"bf16"``, ``"fp16"``,
        ``"off"``.
    overlap
        Pixels shared by neighbouring tiles; probabilities are blended with
        :func:`~napari_muvit.data.geometry.blend_weights` (raised cosine) to remove seams.
    skip_empty
        Skip tiles whose coarsest context crop is flat (std of normalised intensities below
        ``0.02``, or below the given float); they get label 0 ("not predicted").
    cache_tiles
        Capacity of the LRU tile cache (0 disables it).
    tile_size
        Level-1 tile size ``S``; default ``model.meta["crop_size"]`` (the training crop) or 128.
    prefetch
        Read the next batch's crops in a background thread while the model runs; ``None``
        (default) enables it on CUDA/MPS and disables it on CPU, where it did not help.
    threads
        torch CPU threads while predicting, set in the thread that predicts (and restored
        after): an int, a callable re-read before every batch (a
        :class:`~napari_muvit.engine.threads.ThreadShares` job share), or ``None`` (default)
        to keep the calling thread's count. See :mod:`napari_muvit.engine.threads`.
    adapt_threads
        On the CPU, let :class:`~napari_muvit.engine.threads.ThreadTuner` choose each batch's
        count from the measured time per tile, at most the count above (fewer threads are
        faster when other programs keep every core busy). ``None`` (default): unless
        ``threads`` fixes a count (an int, or a share whose count the user set).

    :attr:`seconds_per_tile` is a running estimate of the time one computed tile costs here
    (read + model), for budgets expressed in seconds (:meth:`tiles_within`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
        amp: str | bool | None = "auto",
        overlap: int | None = 0,
        skip_empty: bool | float = False,
        cache_tiles: int = 512,
        tile_size: int | None = None,
        prefetch: bool | None = None,
        threads: int | Callable[[], int] | None = None,
        adapt_threads: bool | None = None,
    ) -> None:
        _check_segmenter(model)
        self.device = resolve_device(device)
        self.amp_dtype = resolve_amp(
            amp, self.device, dim=int(getattr(getattr(model, "encoder", None), "dim", 128)),
            head_dim=int(getattr(model, "head_dim", 32)),
        )
        if threads is not None and not callable(threads) and (
                int(threads) != threads or threads < 1):
            raise InputError(f"threads: expected a positive integer, got {threads!r}")
        self.threads = threads
        self.adapt_threads = adapt_threads
        self.thread_tuner = ThreadTuner()
        self.seconds_per_tile: float | None = None
        self.model = model.to(self.device)
        self.tile_size = tile_size_of(model, tile_size)
        self.levels = tuple(float(v) for v in model.levels)
        if self.levels[0] != 1:
            raise InputError(
                f"model levels {tuple(model.levels)}: the finest level must be 1 (the labels are "
                "predicted at full resolution)"
            )
        if overlap is None:
            overlap = default_overlap(self.tile_size, model)
        self.overlap = int(overlap)
        if self.overlap != overlap or not 0 <= self.overlap < self.tile_size // 2 + 1:
            raise InputError(
                f"overlap: expected an integer in [0, {self.tile_size // 2}] (at most half the "
                f"tile size {self.tile_size}), got {overlap!r}"
            )
        self.step = self.tile_size - self.overlap
        self.empty_std = _empty_threshold(skip_empty)
        if batch_size is not None and (int(batch_size) != batch_size or batch_size < 1):
            raise InputError(f"batch_size: expected a positive integer, got {batch_size!r}")
        self.batch_size = int(batch_size) if batch_size is not None else self._auto_batch_size()
        self.cache = TileCache(cache_tiles)
        # reading overlaps compute only where the model runs asynchronously on an accelerator;
        # on CPU the reader thread competes with torch for the cores (measured: no gain)
        self.prefetch = self.device.type != "cpu" if prefetch is None else bool(prefetch)
        self.num_classes = int(model.num_classes)
        self.label_values = [int(v) for v in model.label_values]
        self._lut = torch.as_tensor(self.label_values, dtype=torch.int64, device=self.device)
        self._label_dtype = label_dtype(self.num_classes, self.label_values)
        self._weights = (
            blend_weights(self.tile_size, self.overlap) if self.overlap else None
        )
        # source -> (normalisation key, source to read from, model normalisation it was made for)
        self._sources: weakref.WeakKeyDictionary[Any, tuple[str, Any, str]] = weakref.WeakKeyDictionary()
        self.stats: dict[str, float] = {}
        self.reset_stats()

    # ---------------------------------------------------------------- setup helpers

    def reset_stats(self) -> None:
        """Zero the counters in :attr:`stats` (model calls, tiles, cache hits, timings)."""
        self.stats = {
            "model_calls": 0, "tiles_computed": 0, "tiles_skipped": 0, "cache_hits": 0,
            "batches": 0, "oom_retries": 0, "read_s": 0.0, "compute_s": 0.0, "wait_s": 0.0,
        }

    def tiles_within(self, seconds: float) -> int | None:
        """How many new tiles fit in ``seconds`` at the measured :attr:`seconds_per_tile`
        (``None`` before the first computed batch)."""
        if self.seconds_per_tile is None:
            return None
        return max(0, int(seconds / self.seconds_per_tile))

    def describe(self) -> str:
        """One line: device, precision, threads, batch (for the CLI and the panel)."""
        from napari_muvit.engine.hardware import describe_runtime

        return describe_runtime(self.device, self.amp_dtype, self._thread_count(),
                                self.batch_size)

    def _thread_count(self) -> int | None:
        return self.threads() if callable(self.threads) else self.threads

    def _apply_threads(self) -> None:
        n = self._thread_count()
        if n and n != torch.get_num_threads():
            torch.set_num_threads(int(n))

    def _adaptive(self) -> bool:
        if self.device.type != "cpu":
            return False
        if self.adapt_threads is not None:
            return bool(self.adapt_threads)
        return bool(getattr(self.threads, "adaptive", self.threads is None))

    def _tuned_threads(self, budget: int) -> int | None:
        """Set the next batch's thread count chosen by the tuner (None: not tuned)."""
        if not self._adaptive():
            return None
        return self.thread_tuner.apply(self._thread_count() or budget)

    def _update_tile_time(self, seconds: float, tiles: int) -> None:
        """Running mean (recent batches weigh more) of read + model seconds per tile."""
        if tiles <= 0:
            return
        per_tile = seconds / tiles
        old = self.seconds_per_tile
        self.seconds_per_tile = per_tile if old is None else 0.7 * old + 0.3 * per_tile

    def clear_cache(self) -> None:
        """Forget all cached tiles (e.g. after the image data changed in place)."""
        self.cache.clear()

    def _auto_batch_size(self) -> int:
        """Batch size from free accelerator memory (a conservative activation estimate)."""
        free = free_memory_bytes(self.device)
        if free is None:
            return CPU_BATCH
        dim = int(getattr(getattr(self.model, "encoder", None), "dim", 512))
        head_dim = int(getattr(self.model, "head_dim", 256))
        tokens = len(self.levels) * (self.tile_size // self.model.patch_size) ** 2
        bytes_per = 2 if self.amp_dtype is not None else 4
        # inference keeps ~one layer alive: residual, qkv, MLP (~12·dim per token); the head's
        # full-resolution maps (~4·head_dim per pixel) and float32 logits/probabilities
        per_tile = bytes_per * (tokens * dim * 12 + 4 * head_dim * self.tile_size**2)
        per_tile += 3 * 4 * int(self.model.num_classes) * self.tile_size**2
        # use half of the free memory: allocator fragmentation and other processes; an OOM
        # still halves the batch at run time
        return int(max(1, min(MAX_AUTO_BATCH, 0.5 * free // max(per_tile, 1))))

    def check_source(self, source: Any) -> None:
        """Raise :class:`InputError` if ``source`` cannot feed this model (before any work)."""
        if source.channels != self.model.in_channels:
            raise IncompatibleModelError(
                f"image has {source.channels} channel(s) but the model expects "
                f"{self.model.in_channels}; pick a matching model or image, or fit one on a few "
                "strokes in seconds (the fine-tune panel, or napari-muvit train IMAGE --labels "
                "STROKES --out MODEL)"
            )
        source.check_levels(self.levels)
        if hasattr(source, "check_finite"):
            source.check_finite()  # NaN/inf named up front, once per source
        coarsest = self.levels[-1]
        if coarsest > max(source.shape):
            raise IncompatibleModelError(
                f"model level {coarsest:g} is coarser than the whole image {tuple(source.shape)}: "
                f"one pixel of that level covers more than the image; use a model with "
                f"levels up to {max(source.shape)} or a larger image"
            )

    def _reading_source(self, source: Any) -> tuple[str, Any]:
        """(cache key, source to read from) with the model's normalisation if it has one.

        A shallow copy keeps the caller's source untouched while sharing its pyramid levels.
        """
        want = getattr(self.model, "normalization", None)
        wanted = json.dumps(want, sort_keys=True, default=str)
        cached = self._sources.get(source) if _weakrefable(source) else None
        if cached is not None and cached[2] == wanted and (
            want is not None  # else the source's own normalisation may have been changed
            or cached[0] == json.dumps(source.normalization.to_dict(), sort_keys=True, default=str)
        ):
            return cached[:2]
        if want is None:
            reader = source
        else:
            from napari_muvit.data.normalization import normalization_for_image

            # the model's range, adapted (or warned about) when the image cannot match it
            norm, note = normalization_for_image(want, source)
            if note is not None:
                warnings.warn(note, RuntimeWarning, stacklevel=3)
            reader = source if source.normalization == norm else copy.copy(source)
            reader.normalization = norm
        key = json.dumps(reader.normalization.to_dict(), sort_keys=True, default=str)
        if _weakrefable(source):
            self._sources[source] = (key, reader, wanted)
        return key, reader

    # ---------------------------------------------------------------- planning

    def plan(self, source: Any, region: Any = None) -> list[Tile]:
        """Tiles covering ``region`` (default: whole image), centre-first."""
        reg = clip_region(region, source.shape)
        return plan_tiles(reg, self.tile_size, source.shape, self.overlap)

    def _cell_count(self, region: np.ndarray) -> int:
        rows, cols = grid_cell_range(region, self.step)
        return len(rows) * len(cols)

    def _make_job(
        self, source: Any, src_key: tuple, block: np.ndarray,
        is_done: Callable[[Tile], bool], need_probs: bool,
    ) -> _Job | None:
        """Plan one block: its targets, the tiles they need, cache hits and batches."""
        targets = [t for t in plan_tiles(block, self.tile_size, source.shape, self.overlap)
                   if not is_done(t)]
        if not targets:
            return None
        contributors, pool = tile_contributors(targets, source.shape, self.overlap)
        needs = {g: self._need(t, src_key) for g, t in pool.items()}
        job = _Job(targets=targets, contributors=contributors, needs=needs, waiting=list(targets))
        for grids in contributors.values():
            for g in grids:
                job.refs[g] = job.refs.get(g, 0) + 1
        misses = []
        for g in _order(pool, targets):
            hit = self.cache.get(needs[g].key, need_probs)
            if hit is None:
                misses.append(needs[g])
            else:
                job.avail[g] = _TileOutput(hit.labels, hit.probs, hit.skipped, cached=True)
                self.stats["cache_hits"] += 1
        b = self.batch_size
        job.batches = [misses[i : i + b] for i in range(0, len(misses), b)]
        return job

    def _need(self, tile: Tile, src_key: tuple) -> _Need:
        bboxes = centered_nested_bboxes(tile.origin, self.tile_size, self.levels)
        key = (*src_key, self.amp_dtype, self.tile_size, tile.bbox.tobytes(), bboxes.tobytes())
        return _Need(tile, bboxes, key)

    # ---------------------------------------------------------------- reading

    def _read(self, reader: Any, batch: _Batch) -> _Batch:
        """Read the nested crops of a batch (runs in the prefetch thread)."""
        t0 = time.perf_counter()
        n = len(batch.needs)
        empty = np.zeros(n, dtype=bool)
        if self.empty_std is not None:
            for i, need in enumerate(batch.needs):
                empty[i] = self._is_empty(reader, need)
        keep = [need for need, e in zip(batch.needs, empty) if not e]
        s, L = self.tile_size, len(self.levels)
        crops = np.empty((len(keep), L, reader.channels, s, s), dtype=np.float32)
        bbs = np.empty((len(keep), L, 2, 2), dtype=np.float64)
        for i, need in enumerate(keep):
            crops[i], _valid = reader.read_nested(need.bboxes, self.levels, s)
            bbs[i] = need.bboxes
        batch.crops, batch.bboxes, batch.empty = crops, bbs, empty
        batch.read_s = time.perf_counter() - t0
        return batch

    def _is_empty(self, reader: Any, need: _Need) -> bool:
        """Coarsest context crop flat (std below the threshold over its in-image pixels)."""
        crop, valid = reader.read(
            need.bboxes[-1], self.levels[-1], self.tile_size, return_valid=True
        )
        if not valid.any():
            return True
        return bool(crop[:, valid].std(axis=1).max() < self.empty_std)

    # ---------------------------------------------------------------- model

    def _forward(self, crops: np.ndarray, bboxes: np.ndarray, need_probs: bool
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass: label values (B, S, S) and float16 probabilities (B, K, S, S)."""
        x = torch.from_numpy(crops).to(self.device, non_blocking=True)
        bb = torch.from_numpy(bboxes).to(self.device)
        if self.device.type == "mps":
            bb = bb.float()  # MPS has no float64
        self.stats["model_calls"] += 1
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            logits = self.model(x, bb)
        logits = logits.float()
        labels = self._lut[logits.argmax(1)].to("cpu").numpy().astype(self._label_dtype)
        probs = None
        if need_probs:
            probs = torch.softmax(logits, dim=1).to(torch.float16).to("cpu").numpy()
        return labels, probs

    def _run_model(self, crops: np.ndarray, bboxes: np.ndarray, need_probs: bool
                   ) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward the batch in sub-batches of :attr:`batch_size`; on out-of-memory halve the
        batch size and retry (never crash unless a single tile does not fit)."""
        n = len(crops)
        labels: list[np.ndarray] = []
        probs: list[np.ndarray] = []
        i = 0
        while i < n:
            m = min(self.batch_size, n - i)
            try:
                lab, pr = self._forward(crops[i : i + m], bboxes[i : i + m], need_probs)
            except Exception as err:
                if not is_out_of_memory(err):
                    raise
                release_cached_memory(self.device)
                if m == 1:
                    raise MuViTError(
                        f"out of memory on {self.device} even with batch size 1 at tile size "
                        f"{self.tile_size}; use a smaller model, --device cpu or free GPU memory"
                    ) from None
                self.batch_size = max(1, m // 2)
                self.stats["oom_retries"] += 1
                continue
            labels.append(lab)
            if pr is not None:
                probs.append(pr)
            i += m
        lab_all = np.concatenate(labels) if labels else np.zeros((0,), self._label_dtype)
        return lab_all, (np.concatenate(probs) if probs else None)

    def _compute(self, batch: _Batch, need_probs: bool) -> list[tuple[_Need, _TileOutput]]:
        """Model outputs of a read batch (empty tiles get a skipped output)."""
        t0 = time.perf_counter()
        labels = probs = None
        if len(batch.crops):
            _check_finite_crops(batch)
            with _eval_mode(self.model):
                labels, probs = self._run_model(batch.crops, batch.bboxes, need_probs)
        out = []
        j = 0
        s = self.tile_size
        for need, empty in zip(batch.needs, batch.empty):
            if empty:
                res = _TileOutput(np.zeros((s, s), self._label_dtype), None, skipped=True)
                self.stats["tiles_skipped"] += 1
            else:
                res = _TileOutput(labels[j], None if probs is None else probs[j])
                j += 1
                self.stats["tiles_computed"] += 1
            self.cache.put(need.key, res)
            out.append((need, res))
        self.stats["batches"] += 1
        self.stats["compute_s"] += time.perf_counter() - t0
        return out

    # ---------------------------------------------------------------- assembling results

    def _result(self, job: _Job, target: Tile, need_probs: bool) -> TileResult:
        """The target's core from its own output, or blended from its contributors."""
        grids = job.contributors[target.grid]
        outs = [job.avail[g] for g in grids]
        cached = all(o.cached for o in outs)
        if self.overlap == 0:
            o = outs[0]
            sl = target.core_in_tile
            probs = None
            if need_probs:
                probs = (np.zeros((self.num_classes, *o.labels[sl].shape), np.float16)
                         if o.probs is None else o.probs[(slice(None), *sl)].copy())
            return TileResult(target, o.labels[sl].copy(), probs, o.skipped, cached)
        return self._blend(job, target, grids, outs, need_probs, cached)

    def _blend(self, job: _Job, target: Tile, grids: list, outs: list[_TileOutput],
               need_probs: bool, cached: bool) -> TileResult:
        core = target.core
        h, w = (int(v) for v in core[1] - core[0])
        acc = np.zeros((self.num_classes, h, w), dtype=np.float32)
        wsum = np.zeros((h, w), dtype=np.float32)
        for g, o in zip(grids, outs):
            if o.skipped or o.probs is None:
                continue
            other = job.needs[g].tile
            dst, src = _overlap_slices(core, np.asarray(other.origin), self.tile_size)
            wt = self._weights[src]
            acc[(slice(None), *dst)] += wt * o.probs[(slice(None), *src)].astype(np.float32)
            wsum[dst] += wt
        covered = wsum > 0
        probs = acc / np.where(covered, wsum, 1.0)
        labels = np.where(covered, np.asarray(self.label_values)[probs.argmax(0)], 0)
        return TileResult(
            target,
            labels.astype(self._label_dtype),
            probs.astype(np.float16) if need_probs else None,
            skipped=not covered.any(),
            cached=cached,
        )

    def _ready(self, job: _Job, need_probs: bool) -> list[TileResult]:
        """Emit (and forget) every waiting target whose contributors are all available."""
        out, still = [], []
        for t in job.waiting:
            if all(g in job.avail for g in job.contributors[t.grid]):
                out.append(self._result(job, t, need_probs))
                for g in job.contributors[t.grid]:
                    job.refs[g] -= 1
                    if job.refs[g] == 0:
                        job.avail.pop(g, None)  # free memory as soon as nobody needs it
            else:
                still.append(t)
        job.waiting = still
        return out

    # ---------------------------------------------------------------- the pipeline

    def _batches(
        self, source: Any, reader_key: tuple, blocks: Iterable[np.ndarray],
        is_done: Callable[[Tile], bool], need_probs: bool,
    ) -> Iterator[_Batch]:
        """Batches of all blocks; an empty batch marks cache-only progress / a job's start."""
        for block in blocks:
            job = self._make_job(source, reader_key, np.asarray(block), is_done, need_probs)
            if job is None:
                continue
            yield _Batch(job, [])  # lets cached targets out before any compute
            for needs in job.batches:
                yield _Batch(job, needs)

    def _stream(
        self, source: Any, blocks: Iterable[np.ndarray], is_done: Callable[[Tile], bool],
        need_probs: bool, total: int, progress: Progress | None, cancel: CancelToken | None,
    ) -> Iterator[TileResult]:
        """Run all blocks, reading the next batch while the current one computes."""
        key, reader = self._reading_source(source)
        src_key = (_token(self.model), _model_version(self.model), _token(source), key)
        # full-tile probabilities are needed for blending even if the caller wants labels only
        tile_probs = need_probs or self.overlap > 0
        batches = self._batches(source, src_key, blocks, is_done, tile_probs)
        done = 0
        _report(progress, 0, total, "starting")
        pool = ThreadPoolExecutor(1, thread_name_prefix="napari-muvit-read") if self.prefetch else None
        threads_before = torch.get_num_threads()
        try:
            self._apply_threads()
            pending = self._submit(pool, reader, next(batches, None))
            while pending is not None:
                if cancel is not None:
                    cancel.raise_if_cancelled()
                if callable(self.threads):
                    self._apply_threads()  # another job started or ended: new share
                t0 = time.perf_counter()
                batch = pending.result() if isinstance(pending, Future) else pending
                self.stats["wait_s"] += time.perf_counter() - t0
                self.stats["read_s"] += batch.read_s
                pending = self._submit(pool, reader, next(batches, None))
                if batch.needs:
                    tuned = self._tuned_threads(threads_before)
                    t_compute = time.perf_counter()
                    outputs = self._compute(batch, tile_probs)
                    computed = int(len(batch.needs) - batch.empty.sum())
                    compute_s = time.perf_counter() - t_compute
                    if tuned is not None:
                        self.thread_tuner.record(tuned, compute_s, computed)
                    self._update_tile_time(compute_s + batch.read_s, computed)
                else:
                    outputs = []
                for need, out in outputs:
                    batch.job.avail[need.tile.grid] = out
                results = self._ready(batch.job, need_probs)
                yield from results
                done += len(results)
                if results:
                    _report(progress, done, total, f"{done}/{total} tiles")
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if torch.get_num_threads() != threads_before:
                torch.set_num_threads(threads_before)

    def _submit(self, pool: ThreadPoolExecutor | None, reader: Any, batch: _Batch | None
                ) -> Future | _Batch | None:
        if batch is None:
            return None
        if pool is None or not batch.needs:
            return self._read(reader, batch) if batch.needs else _empty_batch(batch)
        return pool.submit(self._read, reader, batch)

    # ---------------------------------------------------------------- public API

    def iter_tiles(
        self, source: Any, region: Any = None, progress: Progress | None = None,
        cancel: CancelToken | None = None, probabilities: bool = False,
    ) -> Iterator[TileResult]:
        """Yield :class:`TileResult` for every tile of ``region``, centre-first, as they finish.

        The input is validated when this is called (not at the first ``next``). Iterating
        raises :class:`~napari_muvit.errors.CancelledError` (within one batch) when ``cancel``
        is triggered; every result yielded before is complete.
        """
        self.check_source(source)
        reg = clip_region(region, source.shape)
        return self._stream(
            source, [reg], lambda t: False, probabilities, self._cell_count(reg), progress, cancel
        )

    def predict(
        self, source: Any, region: Any = None, sink: Any = None, probabilities: bool = False,
        progress: Progress | None = None, cancel: CancelToken | None = None,
    ) -> Any:
        """Predict ``region`` into ``sink`` (default: a new :class:`MemorySink`) and return it.

        With a :class:`ZarrSink`, ``region`` (default: the store's region) is processed chunk by
        chunk, skipping tiles already done; the store is marked complete when nothing is
        missing. On cancel or error the sink is flushed (all written tiles stay valid) and the
        exception propagates.
        """
        self.check_source(source)
        if sink is None:
            reg = clip_region(region, source.shape)
            sink = MemorySink(reg, self.num_classes, probabilities, self.label_values)
        else:
            reg = None if region is None else clip_region(region, source.shape)
            self._check_sink(source, sink)
        blocks = sink.blocks(reg)
        remaining = sink.remaining(reg)
        total = remaining if remaining is not None else sum(self._cell_count(b) for b in blocks)
        need_probs = bool(sink.wants_probabilities)
        try:
            for res in self._stream(source, blocks, sink.is_done, need_probs, total, progress, cancel):
                sink.write(res)
        except BaseException:
            sink.close(complete=False)
            raise
        sink.close()
        return sink

    def _check_sink(self, source: Any, sink: Any) -> None:
        if isinstance(sink, ZarrSink):
            if tuple(sink.image_shape) != tuple(source.shape):
                raise InputError(
                    f"output store {sink.path} is for an image of shape {sink.image_shape}, "
                    f"the image has shape {tuple(source.shape)}"
                )
            if (sink.tile_size, sink.overlap) != (self.tile_size, self.overlap):
                raise InputError(
                    f"output store {sink.path} uses tile size {sink.tile_size} / overlap "
                    f"{sink.overlap}, the predictor {self.tile_size} / {self.overlap}"
                )


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the forward pass, restoring every submodule's own flag afterwards (the
    widget may predict with a model that is being trained, possibly partly frozen)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _report(progress: Progress | None, done: int, total: int, message: str) -> None:
    if progress is not None:
        progress(done, total, message)


def _empty_batch(batch: _Batch) -> _Batch:
    batch.crops = np.zeros((0,), np.float32)
    batch.empty = np.zeros(0, dtype=bool)
    return batch


def _weakrefable(obj: Any) -> bool:
    try:
        weakref.ref(obj)
    except TypeError:
        return False
    return True


def _order(pool: dict[tuple[int, int], Tile], targets: list[Tile]) -> list[tuple[int, int]]:
    """Needed tiles in target order (centre-first), then the remaining margin tiles."""
    seen: dict[tuple[int, int], None] = {}
    for t in targets:
        if t.grid in pool:
            seen[t.grid] = None
    centre = np.mean([t.centre for t in targets], axis=0)
    rest = sorted((g for g in pool if g not in seen),
                  key=lambda g: (round(float(np.hypot(*(pool[g].centre - centre))), 6), g))
    return [*seen, *rest]


def _overlap_slices(core: np.ndarray, origin: np.ndarray, size: int
                    ) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Slices into the core and into an ``S×S`` tile at ``origin`` of their intersection."""
    lo = np.maximum(core[0], origin)
    hi = np.minimum(core[1], origin + size)
    dst = tuple(slice(int(lo[a] - core[0, a]), int(hi[a] - core[0, a])) for a in range(2))
    src = tuple(slice(int(lo[a] - origin[a]), int(hi[a] - origin[a])) for a in range(2))
    return dst, src  # type: ignore[return-value]


def _check_finite_crops(batch: _Batch) -> None:
    """Per-batch guard behind the up-front NaN check (which samples large images): name the
    first tile whose crops hold NaN/inf."""
    finite = np.isfinite(batch.crops)  # (B, L, C, S, S)
    bad = ~finite.reshape(len(finite), -1).all(axis=1)
    if not bad.any():
        return
    in_tile = ~finite[:, 0].reshape(len(finite), -1).all(axis=1)  # the full-resolution crop
    first = int(np.argmax(in_tile)) if in_tile.any() else int(np.argmax(bad))
    tiles = [need.tile for need, empty in zip(batch.needs, batch.empty) if not empty]
    (y0, x0), (y1, x1) = np.asarray(tiles[first].bbox).astype(int).tolist()
    where = "in" if in_tile.any() else "in the coarse context of"
    raise InputError(
        f"the image has NaN or infinite values {where} the tile at y {y0}-{y1}, x {x0}-{x1} "
        "(world pixels); replace them (e.g. numpy.nan_to_num) and rerun - tiles written so far "
        "are kept"
    )


def _check_segmenter(model: Any) -> None:
    missing = [a for a in ("levels", "num_classes", "label_values", "in_channels", "patch_size")
               if not hasattr(model, a)]
    if not isinstance(model, torch.nn.Module) or missing:
        raise InputError(
            f"model: expected a MuViTSegmenter (or a segmenter folder), got {type(model).__name__}"
        )


def tile_size_of(model: Any, tile_size: int | None) -> int:
    """The prediction tile size: ``tile_size``, else the model's training crop size, else
    :data:`DEFAULT_TILE_SIZE`; a multiple of the patch size or an :class:`InputError`."""
    meta = getattr(model, "meta", None) or {}
    size = tile_size if tile_size is not None else meta.get("crop_size", DEFAULT_TILE_SIZE)
    try:
        s = int(size)
    except (TypeError, ValueError):
        raise InputError(f"tile_size: expected a positive integer, got {size!r}") from None
    p = int(model.patch_size)
    if s != size or s < p or s % p:
        raise InputError(
            f"tile_size: expected a positive multiple of the patch size {p}, got {size!r}"
        )
    return s


def _empty_threshold(skip_empty: bool | float) -> float | None:
    if skip_empty is False or skip_empty is None:
        return None
    if skip_empty is True:
        return DEFAULT_EMPTY_STD
    value = float(skip_empty)
    if not value > 0:
        raise InputError(f"skip_empty: expected True/False or a positive std threshold, got {skip_empty!r}")
    return value


# --------------------------------------------------------------------------------------------
# the model a prediction uses
# --------------------------------------------------------------------------------------------


def resolve_model(model: Any = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A segmenter from an instance, a model folder, or ``None`` (the bundled default)."""
    if isinstance(model, torch.nn.Module):
        _check_segmenter(model)
        return model
    from napari_muvit.model.loading import load_predictor_model

    return load_predictor_model(model, map_location="cpu")

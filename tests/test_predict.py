"""Prediction engine: exactness, cache, OOM back-off, cancel, blending, skip-empty, inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _predict_support import (
    CROP,
    reference_labels,
    rings,
    rings_source,
    tile_probs,
    tiny_segmenter,
)

from napari_muvit.data import PyramidSource, blend_weights, plan_tiles
from napari_muvit.engine import CancelToken, Predictor, resolve_device
from napari_muvit.engine.device import resolve_amp
from napari_muvit.engine.api import predict as predict_api
from napari_muvit.errors import CancelledError, InputError, MuViTError


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def source():
    return rings_source(192)


def test_region_equals_stitched_model_outputs(model, source) -> None:
    region = np.array([[13, 21], [150, 171]])  # not on the tile grid on purpose
    pred = Predictor(model, device="cpu", batch_size=4)
    sink = pred.predict(source, region, probabilities=True)
    ref = reference_labels(model, source, region)
    assert sink.labels.shape == (137, 150)
    np.testing.assert_array_equal(sink.labels, ref)
    assert set(np.unique(sink.labels)) <= {1, 2, 3} and len(np.unique(sink.labels)) >= 2
    assert sink.labels.dtype == np.uint8
    # probabilities are a distribution whose maximum is at the label (float16 may tie)
    np.testing.assert_allclose(sink.probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    at_label = np.take_along_axis(sink.probs, (sink.labels - 1)[None].astype(np.int64), 0)[0]
    np.testing.assert_array_equal(at_label, sink.probs.max(0))
    cells = len(plan_tiles(region, CROP, source.shape))
    assert pred.stats["tiles_computed"] == cells and pred.stats["model_calls"] == -(-cells // 4)


def test_iter_tiles_centre_first_and_partition(model, source) -> None:
    region = np.array([[0, 0], [192, 192]])
    pred = Predictor(model, device="cpu", batch_size=3)
    seen = np.zeros((192, 192), dtype=np.int32)
    results = list(pred.iter_tiles(source, region))
    for r in results:
        (y0, x0), (y1, x1) = r.tile.core
        assert r.labels.shape == (y1 - y0, x1 - x0) and r.probs is None
        seen[y0:y1, x0:x1] += 1
    assert (seen == 1).all()  # cores partition the region exactly once
    first = results[0].tile.core
    assert first[0, 0] <= 96 <= first[1, 0] and first[0, 1] <= 96 <= first[1, 1]
    dist = [np.hypot(*(r.tile.centre - 96)) for r in results]
    assert dist == sorted(dist)


def test_cache_recomputes_only_new_tiles_after_pan(model, source) -> None:
    pred = Predictor(model, device="cpu", batch_size=4)
    a = np.array([[0, 0], [96, 96]])
    b = a + 40  # the user panned by 40 px: overlaps a
    first = pred.predict(source, a).labels
    calls_a = pred.stats["tiles_computed"]
    tiles_a = {t.grid for t in plan_tiles(a, CROP, source.shape)}
    tiles_b = {t.grid for t in plan_tiles(b, CROP, source.shape)}
    pred.reset_stats()
    second = pred.predict(source, b).labels
    assert calls_a == len(tiles_a) == 9
    assert pred.stats["tiles_computed"] == len(tiles_b - tiles_a) == 12
    assert pred.stats["cache_hits"] == len(tiles_b & tiles_a) == 4
    np.testing.assert_array_equal(second[:56, :56], first[40:, 40:])
    np.testing.assert_array_equal(second, reference_labels(model, source, b))
    # same region again: nothing computed, no model call
    pred.reset_stats()
    pred.predict(source, b)
    assert pred.stats["model_calls"] == 0 and pred.stats["cache_hits"] == 16


def test_cache_invalidated_by_weight_update_and_other_source(model, source) -> None:
    m = tiny_segmenter(seed=3)
    pred = Predictor(m, device="cpu", batch_size=4)
    region = np.array([[0, 0], [64, 64]])
    before = pred.predict(source, region).labels.copy()
    with torch.no_grad():  # an optimizer step changes weights in place
        m.head.out.bias.add_(torch.tensor([5.0, 0.0, 0.0]))
    pred.reset_stats()
    after = pred.predict(source, region).labels
    assert pred.stats["cache_hits"] == 0 and pred.stats["tiles_computed"] == 4
    assert not np.array_equal(before, after)
    pred.reset_stats()
    pred.predict(rings_source(192, seed=2), region)  # another image, same bboxes
    assert pred.stats["cache_hits"] == 0


class _OOMAbove(torch.nn.Module):
    """Wraps a segmenter and raises CUDA OOM for batches larger than ``limit``."""

    def __init__(self, inner: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.train()  # mixed modes: the engine must switch to eval and restore each module's
        inner.eval()
        self.seen: list[int] = []
        for name in ("levels", "num_classes", "label_values", "in_channels", "patch_size",
                     "meta", "normalization"):
            setattr(self, name, getattr(inner, name))

    def forward(self, x, bbox):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner(x, bbox)


def test_oom_halves_batch_and_retries(model, source) -> None:
    fake = _OOMAbove(model, limit=2)
    pred = Predictor(fake, device="cpu", batch_size=8)
    region = np.array([[0, 0], [96, 128]])  # 12 tiles
    labels = pred.predict(source, region).labels
    np.testing.assert_array_equal(labels, reference_labels(model, source, region))
    assert pred.batch_size == 2
    assert pred.stats["oom_retries"] == 2  # 8 -> 4 -> 2, then it stays at 2
    assert fake.seen[:3] == [8, 4, 2] and max(fake.seen[3:]) == 2
    assert fake.training and not model.training  # every module's own mode restored


def test_oom_at_batch_one_is_a_clear_error(model, source) -> None:
    pred = Predictor(_OOMAbove(model, limit=0), device="cpu", batch_size=2)
    with pytest.raises(MuViTError, match="even with batch size 1"):
        pred.predict(source, [[0, 0], [32, 32]])


def test_cancel_stops_within_one_batch_and_keeps_written_tiles(model, source) -> None:
    token = CancelToken()
    pred = Predictor(model, device="cpu", batch_size=2, prefetch=True)
    calls = []

    def progress(done: int, total: int, message: str) -> None:
        calls.append(done)
        if done >= 2:
            token.cancel()

    from napari_muvit.engine.sinks import MemorySink

    region = np.array([[0, 0], [192, 192]])
    sink = MemorySink(region, 3, label_values=[1, 2, 3])
    with pytest.raises(CancelledError):
        pred.predict(source, region, sink=sink, progress=progress, cancel=token)
    assert pred.stats["model_calls"] == 1  # cancelled right after the first batch
    assert calls[-1] == 2 and sink.written.sum() == 2 * CROP * CROP
    ref = reference_labels(model, source, region)
    np.testing.assert_array_equal(sink.labels[sink.written], ref[sink.written])
    assert token.cancelled and "cancelled=True" in repr(token)


def test_overlap_blends_probabilities(model, source) -> None:
    ov = 8
    pred = Predictor(model, device="cpu", batch_size=4, overlap=ov)
    region = np.array([[40, 40], [120, 120]])
    sink = pred.predict(source, region, probabilities=True)
    np.testing.assert_allclose(sink.probs.astype(np.float32).sum(0), 1.0, atol=3e-3)
    # pixel (world 71, 71) lies in the overlap of the tiles of cells (2,2),(2,3),(3,2),(3,3)
    step = CROP - ov
    y = x = 71
    w = blend_weights(CROP, ov)
    acc = np.zeros(3)
    wsum = 0.0
    for gy in (2, 3):
        for gx in (2, 3):
            oy, ox = gy * step - ov // 2, gx * step - ov // 2
            if oy <= y < oy + CROP and ox <= x < ox + CROP:
                p = tile_probs(model, source, (oy, ox)).astype(np.float16).astype(np.float32)
                acc += w[y - oy, x - ox] * p[:, y - oy, x - ox]
                wsum += w[y - oy, x - ox]
    np.testing.assert_allclose(sink.probs[:, y - 40, x - 40].astype(np.float32), acc / wsum,
                               atol=2e-3)
    assert sink.labels[y - 40, x - 40] == 1 + int(np.argmax(acc))


def test_prefetch_does_not_change_results(model, source) -> None:
    region = np.array([[0, 0], [160, 96]])
    a = Predictor(model, device="cpu", batch_size=3, prefetch=True).predict(source, region)
    b = Predictor(model, device="cpu", batch_size=3, prefetch=False).predict(source, region)
    np.testing.assert_array_equal(a.labels, b.labels)


def test_skip_empty_skips_flat_tiles(model) -> None:
    img = np.asarray(rings(192)[0]).copy()
    img[:, 128:] = 40  # a flat background band
    src = PyramidSource([img], normalization={"kind": "divide", "low": 0.0, "high": 255.0})
    pred = Predictor(model, device="cpu", batch_size=4, skip_empty=True)
    labels = pred.predict(src).labels
    assert pred.stats["tiles_skipped"] > 0
    skipped_cells = pred.stats["tiles_skipped"]
    assert (labels == 0).sum() == skipped_cells * CROP * CROP
    full = Predictor(model, device="cpu", batch_size=4).predict(src).labels
    keep = labels != 0
    np.testing.assert_array_equal(labels[keep], full[keep])
    assert (labels[:, :64] != 0).all()  # textured tiles are never skipped


def test_model_normalization_is_used_and_source_untouched(source) -> None:
    norm = {"kind": "divide", "low": 0.0, "high": 255.0}
    m = tiny_segmenter(normalization=norm)
    before = source.normalization.to_dict()
    region = np.array([[0, 0], [64, 64]])
    got = Predictor(m, device="cpu").predict(source, region).labels
    assert source.normalization.to_dict() == before
    ref = reference_labels(m, PyramidSource(rings(192), normalization=norm), region)
    np.testing.assert_array_equal(got, ref)
    assert not np.array_equal(got, reference_labels(m, source, region))


def test_bad_inputs_fail_before_work(model, source) -> None:
    pred = Predictor(model, device="cpu")
    rgb = PyramidSource([np.zeros((128, 128, 3), np.uint8)], rgb=True)
    with pytest.raises(InputError, match="3 channel"):
        pred.predict(rgb)
    with pytest.raises(InputError, match="region"):
        pred.predict(source, [[50, 50], [50, 80]])
    with pytest.raises(InputError, match="region"):
        pred.iter_tiles(source, [[500, 500], [600, 600]])  # validated eagerly
    coarse = tiny_segmenter(levels=(1, 4, 256))
    with pytest.raises(InputError, match="coarser than the whole image"):
        Predictor(coarse, device="cpu").predict(source)
    with pytest.raises(InputError, match="multiple of the patch size"):
        Predictor(model, device="cpu", tile_size=30)
    with pytest.raises(InputError, match="overlap"):
        Predictor(model, device="cpu", overlap=20)
    with pytest.raises(InputError, match="batch_size"):
        Predictor(model, device="cpu", batch_size=0)
    assert pred.stats["model_calls"] == 0


def test_resolve_device_and_amp() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(InputError, match="device must be"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_amp("auto", torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16
    assert resolve_amp("off", torch.device("cuda")) is None
    with pytest.raises(InputError, match="amp"):
        resolve_amp("fp8", torch.device("cpu"))


def test_python_api_in_memory(model, source) -> None:
    region = [[0, 0], [64, 96]]
    labels = predict_api(source, model=model, region=region, device="cpu", overlap=0)
    np.testing.assert_array_equal(labels, reference_labels(model, source, np.array(region)))
    labels_np, probs = predict_api(np.asarray(rings(192)[0]), model=model, region=region,
                                 device="cpu", probabilities=True, overlap=0)
    assert probs.shape == (3, 64, 96) and probs.dtype == np.float16
    np.testing.assert_array_equal(labels_np, labels)
    with pytest.raises(InputError, match="out="):
        predict_api(source, model=model, workers=2)
    # the lazily exported name still calls predict() after the submodule was imported
    import napari_muvit

    np.testing.assert_array_equal(napari_muvit.predict(source, model=model, region=region,
                                                       device="cpu", overlap=0), labels)


def test_auto_batch_size_follows_free_memory(model, monkeypatch) -> None:
    import napari_muvit.engine.predictor as engine_predict

    assert Predictor(model, device="cpu").batch_size == engine_predict.CPU_BATCH
    sizes = {}
    for free in (2**20, 2**23, 2**24, 2**36):
        monkeypatch.setattr(engine_predict, "free_memory_bytes", lambda device, f=free: f)
        sizes[free] = Predictor(model, device="cpu").batch_size
    assert sizes[2**20] == 1 and sizes[2**36] == engine_predict.MAX_AUTO_BATCH
    assert 1 < sizes[2**23] < sizes[2**24] < engine_predict.MAX_AUTO_BATCH
    assert abs(sizes[2**24] / sizes[2**23] - 2) < 0.2  # proportional to free memory

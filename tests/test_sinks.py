"""Sinks: MemorySink, the OME-Zarr store (metadata, pyramid, resume, safety, bounded memory)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zarr
from _predict_support import reference_labels, rings_source, tiny_segmenter

from napari_muvit.data import plan_tiles
from napari_muvit.engine import CancelToken, MemorySink, Predictor, ZarrSink
from napari_muvit.engine.api import predict as predict_api
from napari_muvit.engine.sinks import TileResult, label_dtype, read_store_info
from napari_muvit.engine.stores import create_zarr_sink
from napari_muvit.errors import CancelledError, InputError


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def source():
    return rings_source(192)


def test_label_dtype() -> None:
    assert label_dtype(3) == np.uint8
    assert label_dtype(2, [0, 300]) == np.uint16
    assert label_dtype(2, [1, 70000]) == np.uint32
    with pytest.raises(InputError):
        label_dtype(2, [-1, 1])


def test_memory_sink_writes_core_inside_region() -> None:
    sink = MemorySink([[10, 10], [50, 40]], 2, probabilities=True, label_values=[1, 2])
    tile = plan_tiles([[0, 0], [64, 64]], 32, (64, 64))[0]
    h, w = (tile.core[1] - tile.core[0]).tolist()
    probs = np.full((2, h, w), 0.5, np.float16)
    sink.write(TileResult(tile, np.full((h, w), 2, np.uint8), probs))
    (y0, x0), (y1, x1) = tile.core
    expect = np.zeros((40, 30), bool)
    expect[max(y0, 10) - 10 : min(y1, 50) - 10, max(x0, 10) - 10 : min(x1, 40) - 10] = True
    np.testing.assert_array_equal(sink.written, expect)
    assert (sink.labels[expect] == 2).all() and (sink.labels[~expect] == 0).all()
    assert (sink.probs[:, expect] == 0.5).all()


def test_zarr_store_metadata_pyramid_and_labels(model, source, tmp_path) -> None:
    out = tmp_path / "pred.zarr"
    path = predict_api(source, model=model, out=out, device="cpu", batch_size=4,
                       probabilities=True, overlap=0)  # compared with unblended tiles
    assert path == out.absolute()
    info = read_store_info(out)
    assert info["status"] == "complete" and info["format"] == "napari-muvit-prediction"
    meta = json.loads((out / "zarr.json").read_text())
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5" and meta["zarr_format"] == 3
    datasets = ome["multiscales"][0]["datasets"]
    assert [d["path"] for d in datasets] == ["0"]  # 192 px: no coarser level needed
    assert [p["label-value"] for p in ome["image-label"]["properties"]] == [1, 2, 3]
    g = zarr.open_group(str(out), mode="r")
    labels = g["0"][:]
    assert labels.dtype == np.uint8 and labels.shape == (192, 192)
    np.testing.assert_array_equal(labels, reference_labels(model, source, np.array([[0, 0], [192, 192]])))
    probs = g["probabilities/0"]
    assert probs.shape == (3, 192, 192) and probs.dtype == np.float16
    assert g["done"][:].all()


def test_zarr_pyramid_nearest_and_chunking(model, tmp_path) -> None:
    src = rings_source(640, seed=4)
    pred = Predictor(model, device="cpu", batch_size=8)
    region = np.array([[100, 180], [420, 560]])
    sink = create_zarr_sink(pred, src, tmp_path / "p.zarr", region=region, chunk_size=128)
    assert sink.chunk_size == 128 and sink.n_levels == 3  # 640 -> 320 -> 160
    pred.predict(src, sink=sink)
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    l0 = g["0"][:]
    ref = reference_labels(model, src, region)
    np.testing.assert_array_equal(l0[100:420, 180:560], ref)
    assert (l0[:96] == 0).all()  # outside the (grid-expanded) region nothing is written
    for k in (1, 2):  # nearest neighbour: level k = level 0 sampled every 2^k pixels
        np.testing.assert_array_equal(g[str(k)][:], l0[:: 2**k, :: 2**k])
    assert g["0"].chunks == (128, 128)
    assert sink.complete


def test_existing_outputs_are_protected(model, source, tmp_path) -> None:
    foreign = tmp_path / "mine.zarr"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    pred = Predictor(model, device="cpu")
    for overwrite in (False, True):
        with pytest.raises(InputError, match="not a napari-muvit prediction"):
            create_zarr_sink(pred, source, foreign, overwrite=overwrite)
    assert (foreign / "precious.txt").read_text() == "user data"
    file_out = tmp_path / "file.zarr"
    file_out.write_text("x")
    with pytest.raises(InputError, match="not a napari-muvit prediction"):
        create_zarr_sink(pred, source, file_out, overwrite=True)

    out = tmp_path / "ours.zarr"
    region = [[0, 0], [32, 32]]
    predict_api(source, model=model, out=out, region=region, device="cpu")
    with pytest.raises(InputError, match="already exists"):
        predict_api(source, model=model, out=out, region=region, device="cpu")
    predict_api(source, model=model, out=out, region=[[0, 0], [64, 64]], device="cpu",
                overwrite=True)
    assert read_store_info(out)["region"] == [[0, 0], [64, 64]]

    empty = tmp_path / "empty.zarr"
    empty.mkdir()
    create_zarr_sink(pred, source, empty)  # an empty folder is free to use
    with pytest.raises(InputError, match="cannot create folder|not writable|not a folder"):
        create_zarr_sink(pred, source, tmp_path / "file.zarr" / "sub" / "out.zarr")


def test_resume_computes_only_missing_tiles(model, source, tmp_path) -> None:
    out = tmp_path / "resume.zarr"
    token = CancelToken()
    pred = Predictor(model, device="cpu", batch_size=4)
    sink = create_zarr_sink(pred, source, out, chunk_size=64)

    def stop_after_two_chunks(done: int, total: int, message: str) -> None:
        if sink.chunks_written >= 2:
            token.cancel()

    with pytest.raises(CancelledError):
        pred.predict(source, sink=sink, progress=stop_after_two_chunks, cancel=token)
    info = read_store_info(out)
    assert info["status"] == "incomplete"
    done = zarr.open_group(str(out), mode="r")["done"][:]
    n_done = int(done.sum())
    assert 8 <= n_done < 36  # at least two whole chunks (4 cells each), not everything

    # a different model must not resume this store
    other = tiny_segmenter(seed=5)
    with pytest.raises(InputError, match="different settings"):
        create_zarr_sink(Predictor(other, device="cpu"), source, out)

    pred2 = Predictor(model, device="cpu", batch_size=4)
    sink2 = create_zarr_sink(pred2, source, out, chunk_size=64)
    assert sink2.resumed and sink2.remaining() == 36 - n_done
    pred2.predict(source, sink=sink2)
    assert pred2.stats["tiles_computed"] == 36 - n_done
    assert read_store_info(out)["status"] == "complete"
    labels = zarr.open_group(str(out), mode="r")["0"][:]
    np.testing.assert_array_equal(labels, reference_labels(model, source, np.array([[0, 0], [192, 192]])))


def test_zarr_memory_is_bounded_by_buffered_chunks(model, tmp_path) -> None:
    src = rings_source(320, seed=2)
    pred = Predictor(model, device="cpu", batch_size=8, cache_tiles=0)
    sink = create_zarr_sink(pred, src, tmp_path / "b.zarr", chunk_size=64)
    sink.max_buffered_chunks = 2
    peak = []
    original = sink.write

    def spy(result: TileResult) -> None:
        original(result)
        peak.append(len(sink._buffers))

    sink.write = spy  # type: ignore[method-assign]
    pred.predict(src, sink=sink)
    assert max(peak) <= 1  # chunk-major order: a chunk is flushed before the next starts
    assert sink.chunks_written == 25 and sink.complete


def test_overlap_store_matches_memory(model, source, tmp_path) -> None:
    pred = Predictor(model, device="cpu", batch_size=4, overlap=8)
    mem = pred.predict(source, [[0, 0], [192, 192]]).labels
    pred2 = Predictor(model, device="cpu", batch_size=4, overlap=8)
    sink = create_zarr_sink(pred2, source, tmp_path / "o.zarr", chunk_size=48)
    pred2.predict(source, sink=sink)
    np.testing.assert_array_equal(sink.labels(0)[:], mem)


def test_huge_fresh_store_plans_without_reading_flags(tmp_path) -> None:
    import time

    t0 = time.perf_counter()
    sink = ZarrSink.create(tmp_path / "huge.zarr", (65536, 65536), 128, 2)
    blocks = sink.blocks()
    assert len(blocks) == 128 * 128 and sink.remaining() == 512 * 512
    assert blocks[0] in (((32256, 32256), (32768, 32768)), ((32768, 32768), (33280, 33280)),
                         ((32256, 32768), (32768, 33280)), ((32768, 32256), (33280, 32768)))
    assert sink.n_levels == 9 and sink.labels(8).shape == (256, 256)
    assert time.perf_counter() - t0 < 5.0  # metadata only: no chunk is probed or written
    files = [p for p in (tmp_path / "huge.zarr").rglob("*") if p.is_file()]
    assert all(p.name == "zarr.json" for p in files)


def test_store_interrupted_during_creation_is_recreated(model, source, tmp_path) -> None:
    import shutil

    out = tmp_path / "half.zarr"
    pred = Predictor(model, device="cpu")
    create_zarr_sink(pred, source, out)
    shutil.rmtree(out / "0")  # as if the process died between the metadata and the arrays
    sink = create_zarr_sink(pred, source, out)
    assert not sink.resumed and sink.labels(0).shape == (192, 192)

"""Dask scale-out: bit-exact with the single-process store, model loaded once per worker."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from _predict_support import rings, tiny_segmenter

from napari_muvit.engine import Predictor, predict_distributed
from napari_muvit.engine.distributed import plan_blocks
from napari_muvit.engine.stores import create_zarr_sink
from napari_muvit.engine.sinks import read_store_info

pytest.importorskip("distributed")


def test_plan_blocks_groups_whole_chunks() -> None:
    boxes = [np.array([[y, x], [y + 64, x + 64]]) for y in range(0, 256, 64) for x in range(0, 192, 64)]
    blocks = plan_blocks(boxes, 64, 128)
    assert len(blocks) == 4  # 2x2 chunks per block; the last column holds one chunk per row
    covered = np.zeros((256, 192), np.int32)
    for b in blocks:
        covered[b[0, 0] : b[1, 0], b[0, 1] : b[1, 1]] += 1
        assert (b[0] % 64 == 0).all()
    assert (covered == 1).all()


def test_distributed_is_bit_exact_and_loads_model_once_per_worker(tmp_path) -> None:
    model = tiny_segmenter()
    folder = model.save(tmp_path / "model")
    image = tmp_path / "image.npy"
    np.save(image, np.asarray(rings((256, 320), seed=3)[0]))

    from napari_muvit.data import open_image

    source = open_image(image)
    pred = Predictor(model, device="cpu", batch_size=4, cache_tiles=0)
    sink = create_zarr_sink(pred, source, tmp_path / "single.zarr", chunk_size=64,
                            probabilities=True)
    pred.predict(source, sink=sink)
    single = zarr.open_group(str(tmp_path / "single.zarr"), mode="r")

    stats: dict = {}
    seen = []
    out = predict_distributed(
        image, folder, tmp_path / "dask.zarr", workers=2, processes=False, device="cpu",
        batch_size=4, chunk_size=64, block_size=128, probabilities=True, stats=stats,
        progress=lambda d, t, m: seen.append((d, t)),
    )
    dask = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(dask["0"][:], single["0"][:])
    np.testing.assert_array_equal(dask["1"][:], single["1"][:])  # pyramid built at the end
    np.testing.assert_array_equal(dask["probabilities/0"][:], single["probabilities/0"][:])
    assert read_store_info(out)["status"] == "complete"
    assert dask["1"].shape == (128, 160)
    assert len(stats["blocks"]) == 6 and sum(r["tiles"] for r in stats["results"]) == 80
    assert all(r["models_loaded"] == 1 for r in stats["results"])  # cached per worker
    assert seen[-1] == (80, 80)


def test_workers_tune_their_thread_count_unless_the_user_gave_one(tmp_path, monkeypatch) -> None:
    """``predict_distributed(torch_threads=N)`` is exact in every worker; without it each
    worker tunes within its share of the cores."""
    import os

    from napari_muvit.engine import distributed

    folder = str(tiny_segmenter().save(tmp_path / "model"))
    monkeypatch.setattr(distributed, "_PROCESS_CACHE", {})
    for adapt in (True, False):
        options = {"device": "cpu", "adapt_threads": adapt, "torch_threads": None,
                   "client_pid": os.getpid()}
        assert distributed._worker_predictor(folder, options)._adaptive() is adapt
    image = tmp_path / "image.npy"
    np.save(image, np.asarray(rings((128, 128), seed=3)[0]))
    made: list = []
    real = distributed._worker_predictor
    monkeypatch.setattr(distributed, "_worker_predictor",
                        lambda spec, options: made.append(dict(options)) or real(spec, options))
    for threads, adapt in ((1, False), (None, True)):
        made.clear()
        predict_distributed(image, folder, tmp_path / f"out{threads}.zarr", workers=1,
                            processes=False, device="cpu", chunk_size=64, torch_threads=threads)
        assert made and all(o["adapt_threads"] is adapt for o in made)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                           dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def test_scheduler_address_via_cli_and_objects_via_scatter(client, tmp_path, capsys) -> None:
    from napari_muvit.cli import main
    from napari_muvit.data import PyramidSource

    model = tiny_segmenter()
    folder = model.save(tmp_path / "model")
    image = tmp_path / "image.npy"
    np.save(image, np.asarray(rings(192)[0]))
    out = tmp_path / "cli.zarr"
    code = main(["predict", str(image), "--model", str(folder), "--out", str(out), "--device",
                 "cpu", "--batch", "4", "--scheduler", client.scheduler.address, "--quiet",
                 "--overlap", "0"])  # compared with unblended tiles below
    assert code == 0, capsys.readouterr().err
    cli_labels = zarr.open_group(str(out), mode="r")["0"][:]

    # in-memory model and source are broadcast to the workers instead of loaded from disk
    source = PyramidSource(rings(192))
    out2 = predict_distributed(source, model, tmp_path / "obj.zarr", scheduler=client,
                               device="cpu", batch_size=4)
    np.testing.assert_array_equal(zarr.open_group(str(out2), mode="r")["0"][:], cli_labels)
    from _predict_support import reference_labels

    np.testing.assert_array_equal(
        cli_labels, reference_labels(model, source, np.array([[0, 0], [192, 192]]))
    )


def test_cancel_leaves_an_incomplete_resumable_store(client, tmp_path) -> None:
    from napari_muvit.data import PyramidSource
    from napari_muvit.engine import CancelToken
    from napari_muvit.errors import CancelledError

    model = tiny_segmenter()
    source = PyramidSource(rings(192))
    token = CancelToken()
    token.cancel()
    out = tmp_path / "c.zarr"
    with pytest.raises(CancelledError):
        predict_distributed(source, model, out, scheduler=client, device="cpu", batch_size=4,
                            chunk_size=64, block_size=64, cancel=token)
    assert read_store_info(out)["status"] == "incomplete"
    stats: dict = {}
    predict_distributed(source, model, out, scheduler=client, device="cpu", batch_size=4,
                        chunk_size=64, block_size=64, stats=stats)
    assert read_store_info(out)["status"] == "complete"
    assert stats["total"] == sum(r["tiles"] for r in stats["results"]) <= 36


def test_client_holds_the_store_lock_for_the_whole_run(client, tmp_path) -> None:
    import os
    import threading

    from napari_muvit.data import PyramidSource
    from napari_muvit.locks import LockedError, advisory_lock, lock_path, read_lock

    model = tiny_segmenter()
    source = PyramidSource(rings(192))
    out = tmp_path / "locked.zarr"
    seen: list = []

    def progress(done: int, total: int, message: str) -> None:
        holder = read_lock(out)
        refused = []

        def other_writer() -> None:  # e.g. a second run started from the same session
            try:
                with advisory_lock(out):
                    pass
            except LockedError:
                refused.append(True)

        thread = threading.Thread(target=other_writer)
        thread.start()
        thread.join()
        seen.append((holder.pid if holder else None, bool(refused)))

    predict_distributed(source, model, out, scheduler=client, device="cpu", batch_size=4,
                        chunk_size=64, block_size=64, progress=progress)
    assert seen and all(s == (os.getpid(), True) for s in seen)  # the client, not the workers
    assert not lock_path(out).exists()
    # a store locked by someone else is refused before anything is written
    other = tmp_path / "busy.zarr"
    holder = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with advisory_lock(other, "prediction store"):
            holder.set()
            release.wait(60)

    thread = threading.Thread(target=hold)
    thread.start()
    holder.wait(60)
    try:
        with pytest.raises(LockedError, match="in use by another job"):
            predict_distributed(source, model, other, scheduler=client, device="cpu")
        assert not other.exists()
    finally:
        release.set()
        thread.join()

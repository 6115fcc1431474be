"""Prediction stores never mix, lose or corrupt data (issue 14): resume identity, --overwrite,
locks, kill -9, damaged chunks, and one-line errors for bad inputs."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from _predict_support import reference_labels, rings, rings_source, tiny_segmenter

from napari_muvit.cli import main
from napari_muvit.engine import CancelToken, Predictor
from napari_muvit.engine.api import predict as predict_api
from napari_muvit.engine.stores import create_zarr_sink
from napari_muvit.engine.sinks import read_store_info
from napari_muvit.errors import CancelledError, InputError
from napari_muvit.locks import LockedError, advisory_lock, lock_path

SRC = str(Path(__file__).resolve().parents[1] / "src")
FULL = np.array([[0, 0], [192, 192]])


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def files(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("safety")
    folder = model.save(root / "model")
    a, b = root / "a.npy", root / "b.npy"
    np.save(a, np.asarray(rings(192, seed=1)[0]))
    np.save(b, np.asarray(rings(192, seed=3)[0]))
    return {"root": root, "model": folder, "a": a, "b": b}


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "napari_muvit", "predict", *args],
                          capture_output=True, text=True, env=_env(), timeout=300)


def _interrupted_store(model, source, out: Path, chunks: int = 2):
    """A store cancelled after ``chunks`` chunks (64 px chunks: 9 chunks for 192²)."""
    token = CancelToken()
    pred = Predictor(model, device="cpu", batch_size=4)
    sink = create_zarr_sink(pred, source, out, chunk_size=64)

    def stop(done: int, total: int, message: str) -> None:
        if sink.chunks_written >= chunks:
            token.cancel()

    with pytest.raises(CancelledError):
        pred.predict(source, sink=sink, progress=stop, cancel=token)
    assert read_store_info(out)["status"] == "incomplete"
    return int(zarr.open_group(str(out), mode="r")["done"][:].sum())


def _labels(out: Path) -> np.ndarray:
    return zarr.open_group(str(out), mode="r")["0"][:]


# ------------------------------------------------------------------ resume identity / overwrite


def test_resume_onto_another_image_is_refused(model, tmp_path) -> None:
    a, b = rings_source(192, seed=1), rings_source(192, seed=3)  # same shape and dtype
    out = tmp_path / "X.zarr"
    _interrupted_store(model, a, out)
    pred = Predictor(model, device="cpu", batch_size=4)
    with pytest.raises(InputError) as err:
        create_zarr_sink(pred, b, out, chunk_size=64)
    message = str(err.value)
    assert "the input image differs (its pixels)" in message and "--overwrite" in message
    assert "\n" not in message
    assert not lock_path(out).exists()  # the refused run did not keep the lock
    # --overwrite: a fresh store for b, none of a's labels survive
    sink = create_zarr_sink(pred, b, out, chunk_size=64, overwrite=True)
    assert not sink.resumed and sink.remaining() == 36
    pred.predict(b, sink=sink)
    np.testing.assert_array_equal(_labels(out), reference_labels(model, b, FULL))
    assert read_store_info(out)["status"] == "complete"


def test_overwrite_never_resumes_a_matching_store(model, tmp_path) -> None:
    source = rings_source(192)
    out = tmp_path / "Y.zarr"
    n_done = _interrupted_store(model, source, out)
    assert n_done >= 8
    pred = Predictor(model, device="cpu", batch_size=4)
    sink = create_zarr_sink(pred, source, out, chunk_size=64, overwrite=True)
    assert not sink.resumed and sink.remaining() == 36
    assert not np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).any()
    sink.close(complete=False)
    assert not [p for p in tmp_path.iterdir() if "trash" in p.name]  # old store fully removed


def test_store_records_a_shape_dtype_and_pixel_fingerprint(model, files, tmp_path) -> None:
    out = tmp_path / "f.zarr"
    predict_api(str(files["a"]), model=model, out=out, region=[[0, 0], [32, 32]], device="cpu")
    info = read_store_info(out)
    fp = info["fingerprint"]["input"]
    assert fp["shape"] == [192, 192] and fp["dtype"] == "uint8" and len(fp["pixels_sha256"]) == 32
    assert info["input_path"] == str(files["a"].absolute())
    from napari_muvit.data import PyramidSource
    from napari_muvit.data.pyramid import input_fingerprint

    pixels = np.asarray(rings(192, seed=1)[0]).copy()
    assert input_fingerprint(PyramidSource(pixels)) == fp  # same pixels, in memory: same identity
    pixels[100, 100] ^= 1  # an image up to 1 Mpx is hashed whole: one pixel is enough
    assert input_fingerprint(PyramidSource(pixels))["pixels_sha256"] != fp["pixels_sha256"]
    # with coarse levels the coarsest is hashed whole (it feeds the model's coarse context)
    assert input_fingerprint(rings_source(192))["pixels_sha256"] != fp["pixels_sha256"]


# ------------------------------------------------------------------ locks


HOLD = """
import sys, time
from napari_muvit.locks import advisory_lock
with advisory_lock(sys.argv[1], "prediction store"):
    print("locked", flush=True)
    time.sleep(300)
"""


def test_second_writer_gets_one_line_lock_error_and_store_is_untouched(model, files) -> None:
    out = files["root"] / "S.zarr"
    predict_api(str(files["a"]), model=model, out=out, region=[[0, 0], [32, 32]], device="cpu")
    before = (out / "zarr.json").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                              text=True, env=_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = _cli(str(files["b"]), "--model", str(files["model"]), "--out", str(out),
                      "--overwrite", "--quiet", "--device", "cpu")
        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "is in use by another napari-muvit run" in lines[0]
        assert f"pid {holder.pid}" in lines[0]
        # the in-process API is refused the same way
        with pytest.raises(LockedError):
            predict_api(str(files["b"]), model=model, out=out, overwrite=True, device="cpu")
    finally:
        holder.kill()
        holder.wait()
    assert (out / "zarr.json").read_bytes() == before  # nothing of the holder's store changed
    # the holder died (kill -9): its lock is stale and the next run proceeds
    assert lock_path(out).exists()
    predict_api(str(files["b"]), model=model, out=out, overwrite=True, device="cpu",
                region=[[0, 0], [32, 32]])
    assert not lock_path(out).exists()


def test_store_lock_is_held_from_creation_to_close(model, tmp_path) -> None:
    source = rings_source(192)
    out = tmp_path / "L.zarr"
    pred = Predictor(model, device="cpu", batch_size=4)
    sink = create_zarr_sink(pred, source, out, chunk_size=64)
    assert lock_path(out).exists()
    refused = []

    def other_thread() -> None:  # e.g. a second widget job on the same store
        try:
            create_zarr_sink(Predictor(model, device="cpu"), source, out, overwrite=True)
        except LockedError as exc:
            refused.append(str(exc))

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert len(refused) == 1 and "another job of this napari-muvit session" in refused[0]
    pred.predict(source, sink=sink)
    assert not lock_path(out).exists() and sink.complete


KILLABLE = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[3])
from _predict_support import rings_source
from napari_muvit.engine import Predictor
from napari_muvit.engine.predictor import resolve_model
from napari_muvit.engine.stores import create_zarr_sink
source = rings_source(192)
pred = Predictor(resolve_model(sys.argv[1]), device="cpu", batch_size=1)
sink = create_zarr_sink(pred, source, sys.argv[2], chunk_size=64)
print("resumed" if sink.resumed else "fresh", sink.remaining(), flush=True)
pred.predict(source, sink=sink)
print("complete" if sink.complete else "incomplete", flush=True)
"""


def test_kill_9_mid_run_leaves_a_resumable_store_and_a_stale_lock(model, files, tmp_path) -> None:
    out = tmp_path / "K.zarr"
    tests_dir = str(Path(__file__).parent)
    args = [sys.executable, "-c", KILLABLE, str(files["model"]), str(out), tests_dir]
    run = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=_env())
    assert run.stdout.readline().split() == ["fresh", "36"]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # kill once some (not all) chunks are on disk
        done = (out / "done" / "c").exists() and any((out / "done" / "c").rglob("*"))
        if done or run.poll() is not None:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert lock_path(out).exists()  # kill -9 leaves the lock: recovered below (pid gone)
    rerun = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    first, last = rerun.stdout.split("\n")[0].split(), rerun.stdout.strip().split("\n")[-1]
    assert first[0] == "resumed" and int(first[1]) < 36
    assert last == "complete"
    np.testing.assert_array_equal(_labels(out), reference_labels(model, rings_source(192), FULL))
    assert not lock_path(out).exists()


# ------------------------------------------------------------------ damaged chunks


def _chunk(out: Path, array: str, *coords: int) -> Path:
    return out.joinpath(array, "c", *(str(c) for c in coords))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def test_damaged_chunks_are_reported_and_recomputed_on_resume(model, tmp_path) -> None:
    from napari_muvit.data import PyramidSource

    source = PyramidSource(rings((192, 288)))  # wider than 256 px: the store has a level 1
    region = np.array([[0, 0], [64, 288]])  # 2 × 9 tiles in 5 chunks of 64 px
    out = tmp_path / "D.zarr"
    token = CancelToken()
    pred = Predictor(model, device="cpu", batch_size=2)
    sink = create_zarr_sink(pred, source, out, region=region, chunk_size=64)
    with pytest.raises(CancelledError):
        pred.predict(source, sink=sink, cancel=token,
                     progress=lambda *a: sink.chunks_written >= 3 and token.cancel())
    done = np.asarray(zarr.open_group(str(out), mode="r")["done"][:])
    finished = sorted({(int(y) // 2, int(x) // 2) for y, x in zip(*np.nonzero(done))})
    assert len(finished) >= 3
    labels_chunk = _chunk(out, "0", *finished[0])
    flags_chunk = _chunk(out, "done", *finished[-1])
    coarse_chunk = _files(out / "1" / "c")[0]
    rng = np.random.default_rng(0)
    for file in (labels_chunk, flags_chunk, coarse_chunk):
        assert file.is_file()
        file.write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    pred = Predictor(model, device="cpu", batch_size=2)
    with pytest.warns(RuntimeWarning) as caught:
        sink = create_zarr_sink(pred, source, out, region=region, chunk_size=64)
    messages = [str(w.message) for w in caught]
    for file in (labels_chunk, flags_chunk, coarse_chunk):
        assert any(str(file) in m and "recomputed" in m for m in messages), messages
    assert sorted(sink.repaired) == sorted(map(str, (labels_chunk, flags_chunk, coarse_chunk)))
    assert sink.resumed
    pred.predict(source, sink=sink)
    assert sink.complete
    ref = np.zeros((192, 288), np.uint8)
    ref[:64] = reference_labels(model, source, region)
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["0"][:], ref)
    np.testing.assert_array_equal(group["1"][:], ref[::2, ::2])  # pyramid rebuilt too


def _damaged_cli_store(model, files, out: Path) -> Path:
    """An unfinished store exactly like the CLI's for image a (default 512-px chunks: one chunk
    for 192²) whose half-done label chunk holds random bytes; returns that chunk."""
    from napari_muvit.data import open_image

    sink = create_zarr_sink(Predictor(model, device="cpu"), open_image(str(files["a"])), out)
    sink.close(complete=False)
    group = zarr.open_group(str(out), mode="r+")
    group["0"][:] = 1  # a written chunk, half of whose tiles are marked done
    group["done"][:3] = True
    chunk = out / "0" / "c" / "0" / "0"
    chunk.write_bytes(os.urandom(200))
    return chunk


def test_cli_overwrite_always_works_on_a_damaged_store(model, files, tmp_path) -> None:
    out = tmp_path / "E.zarr"
    _damaged_cli_store(model, files, out)
    # --overwrite starts afresh without reading anything of the damaged store
    code = main(["predict", str(files["a"]), "--model", str(files["model"]), "--out", str(out),
                 "--overwrite", "--quiet", "--device", "cpu", "--overlap", "0"])
    assert code == 0
    np.testing.assert_array_equal(_labels(out), reference_labels(model, rings_source(192), FULL))


def test_cli_resume_names_the_damaged_chunk_on_one_line(model, files, tmp_path) -> None:
    out = tmp_path / "G.zarr"
    chunk = _damaged_cli_store(model, files, out)
    result = _cli(str(files["a"]), "--model", str(files["model"]), "--out", str(out), "--quiet",
                  "--device", "cpu", "--overlap", "0")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-muvit predict: warning:"), lines
    assert str(chunk) in lines[0] and "recomputed" in lines[0]
    np.testing.assert_array_equal(_labels(out), reference_labels(model, rings_source(192), FULL))


# ------------------------------------------------------------------ bad inputs: one-line errors


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "Traceback" not in err[0]
    return err[0]


def test_cli_bad_images_are_named_before_any_store_exists(files, capsys) -> None:
    root = files["root"]
    empty, nan, trunc = root / "empty.npy", root / "nan.npy", root / "trunc.npy"
    np.save(empty, np.zeros((0, 0), np.float32))
    image = np.asarray(rings(192)[0]).astype(np.float32)
    image[50, 60] = np.nan
    np.save(nan, image)
    trunc.write_bytes(files["a"].read_bytes()[:5000])
    cases = [(empty, "non-empty 2-D image"), (nan, "contains NaN values"),
             (trunc, "truncated or damaged")]
    for path, needle in cases:
        out = root / f"{path.stem}.zarr"
        code = main(["predict", str(path), "--model", str(files["model"]), "--out", str(out),
                     "--quiet", "--device", "cpu"])
        assert code == 2
        line = _one_line(capsys)
        assert needle in line and str(path) in line, line
        assert not out.exists() and not lock_path(out).exists()


def test_cli_negative_region_is_a_region_not_an_option(files, capsys) -> None:
    out = files["root"] / "neg.zarr"
    code = main(["predict", str(files["a"]), "--model", str(files["model"]), "--out", str(out),
                 "--region", "-100,0,50,40", "--quiet", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert read_store_info(out)["region"] == [[0, 0], [50, 40]]  # clipped to the image


def test_output_onto_its_own_input_is_refused_even_with_overwrite(model, files, capsys) -> None:
    store = files["root"] / "labels_in.zarr"
    predict_api(str(files["a"]), model=model, out=store, region=[[0, 0], [32, 32]], device="cpu")
    before = _labels(store)
    result = _cli(str(store), "--model", str(files["model"]), "--out", str(store), "--overwrite",
                  "--quiet", "--device", "cpu")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is the input image" in lines[0], result.stderr
    np.testing.assert_array_equal(_labels(store), before)
    # an output folder that contains the input would be deleted by --overwrite too
    with pytest.raises(InputError, match="or contains it"):
        predict_api(str(store / "0"), model=model, out=store, overwrite=True, device="cpu")


def test_api_wrong_argument_types_are_clear(model) -> None:
    with pytest.raises(InputError, match="out: expected the path of an output .zarr store, got 5"):
        predict_api(np.zeros((64, 64), np.uint8), model=model, out=5, device="cpu")
    with pytest.raises(InputError, match="out: expected the path of an output .zarr store"):
        predict_api(np.zeros((64, 64), np.uint8), model=model, out="  ", device="cpu")


# ------------------------------------------------------------------ bit depth vs the model's range


FIXED_8BIT = {"kind": "percentile", "low": 8.0, "high": 200.0, "pmin": 1.0, "pmax": 99.8}


def _predict_warned(model, image):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        labels = predict_api(image, model=model, device="cpu", batch_size=4)
    return labels, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def test_uint16_image_gets_the_8bit_models_range_scaled_and_a_note() -> None:
    model = tiny_segmenter(normalization=FIXED_8BIT)  # like the bundled model's config
    img8 = np.asarray(rings(128)[0])
    labels8, notes8 = _predict_warned(model, img8)
    assert notes8 == []  # the training bit depth: used as is, nothing to say
    labels16, notes16 = _predict_warned(model, img8.astype(np.uint16) * 257)
    np.testing.assert_array_equal(labels16, labels8)  # was 52 % different (issue 14)
    assert len(notes16) == 1 and "scaled by 257" in notes16[0] and "uint16" in notes16[0]
    # a range no bit-depth ratio explains (12-bit data): kept, with a one-line warning
    labels12, notes12 = _predict_warned(model, img8.astype(np.uint16) * 16)
    assert len(notes12) == 1 and "does not match the model's fixed intensity range" in notes12[0]
    assert "\n" not in notes12[0]


def test_per_image_mode_normalises_each_image_by_its_own_percentiles() -> None:
    model = tiny_segmenter(normalization={**FIXED_8BIT, "extra": {"mode": "per_image"}})
    img8 = np.asarray(rings(128)[0])
    labels8, notes8 = _predict_warned(model, img8)
    labels12, notes12 = _predict_warned(model, img8.astype(np.uint16) * 16)
    assert notes8 == notes12 == []
    np.testing.assert_array_equal(labels12, labels8)
    with pytest.raises(InputError, match="normalization mode"):
        predict_api(img8, model=tiny_segmenter(normalization={**FIXED_8BIT, "extra": {"mode": "x"}}),
                    device="cpu")


def test_cli_prints_the_bit_depth_note_on_one_line(files, tmp_path) -> None:
    image = tmp_path / "u16.npy"
    np.save(image, np.asarray(rings(192)[0]).astype(np.uint16) * 257)
    result = _cli(str(image), "--out", str(tmp_path / "u16.zarr"), "--region", "0,0,64,64",
                  "--quiet", "--device", "cpu")  # the bundled model
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("napari-muvit predict: warning:"), lines
    assert "scaled by 257" in lines[0] and str(image) in lines[0]


def test_nan_missed_by_the_sample_stops_at_its_tile_and_keeps_the_store(model, tmp_path) -> None:
    from napari_muvit.data import PyramidSource

    image = np.asarray(rings(192)[0]).astype(np.float32)
    image[150, 20] = np.nan
    source = PyramidSource(image, normalization={"kind": "divide", "low": 0.0, "high": 255.0})
    source._finite_checked = True  # as if the up-front sample of a huge image had missed it
    out = tmp_path / "nan.zarr"
    with pytest.raises(InputError, match=r"NaN or infinite values (in|in the coarse context "
                                         r"of) the tile at y \d+-\d+, x \d+-\d+") as err:
        predict_api(source, model=model, out=out, device="cpu", batch_size=1)
    assert "\n" not in str(err.value)
    # the tile named holds the NaN, or sees it in its 4× context (128 px around)
    y0, y1, x0, x1 = map(int, re.findall(r"y (\d+)-(\d+), x (\d+)-(\d+)", str(err.value))[0])
    if "coarse context" in str(err.value):
        assert abs((y0 + y1) / 2 - 150) <= 80 and abs((x0 + x1) / 2 - 20) <= 80
    else:
        assert y0 <= 150 < y1 and x0 <= 20 < x1
    assert read_store_info(out)["status"] == "incomplete" and not lock_path(out).exists()

"""Labels written into the source OME-Zarr (``predict --into-source``), read back by
ome-zarr-py and napari-ome-zarr; the image itself must stay byte-identical."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import zarr

from _predict_support import reference_labels, rings, tiny_segmenter

from napari_muvit.cli import main
from napari_muvit.data import PyramidSource, open_image
from napari_muvit.engine import CancelToken
from napari_muvit.engine.api import predict
from napari_muvit.engine.sinks import read_store_info
from napari_muvit.errors import CancelledError, InputError

ome_zarr = pytest.importorskip("ome_zarr", reason="needs ome-zarr (the testing extra)")
from ome_zarr.format import FormatV04, FormatV05  # noqa: E402
from ome_zarr.io import parse_url  # noqa: E402
from ome_zarr.reader import Label, Multiscales, Reader  # noqa: E402
from ome_zarr.writer import write_image, write_labels  # noqa: E402

SIZE = 200  # ome-zarr-py's pyramid: 200, 100, 50, 25, 12 (floor): a non-trivial last level
FORMATS = {"0.4": FormatV04, "0.5": FormatV05}


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


def write_ome_image(path: Path, version: str, image: np.ndarray, axes: str = "yx") -> Path:
    """An OME-Zarr image written by ome-zarr-py (the library behind napari-ome-zarr)."""
    fmt = FORMATS[version]()
    store = parse_url(str(path), mode="w", fmt=fmt).store
    root = zarr.group(store=store, zarr_format=fmt.zarr_format)
    write_image(image, root, axes=axes, fmt=fmt)
    return path


def image_hashes(path: Path) -> dict[str, str]:
    """sha256 of every file of the store outside ``labels/``."""
    return {
        str(f.relative_to(path)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.relative_to(path).parts[0] != "labels"
    }


def expected_labels(model, src: Path) -> np.ndarray:
    """The tile-by-tile reference prediction of the whole image as read from ``src``."""
    return reference_labels(model, open_image(str(src)), np.array([[0, 0], [SIZE, SIZE]]))


def label_nodes(path: Path) -> list:
    return [n for n in Reader(parse_url(str(path)))() if any(isinstance(s, Label) for s in n.specs)]


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_into_source_written_as_ngff_labels(model, tmp_path, version) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", version, rings(SIZE)[0])
    before = image_hashes(src)
    out = predict(str(src), model=model, into_source=True, device="cpu")
    assert out == src.absolute() / "labels" / "muvit"
    assert image_hashes(src) == before  # every byte of the image, arrays and metadata

    # ome-zarr-py: a label node of the image, with the image's level shapes
    image_node = next(n for n in Reader(parse_url(str(src)))() if n.zarr.path.rstrip("/").endswith("img.ome.zarr"))
    (node,) = label_nodes(src)
    assert node.metadata["name"] == "muvit"
    assert [d.shape for d in node.data] == [d.shape for d in image_node.data]
    assert node.data[0].shape == (SIZE, SIZE)
    assert {v: p["class"] for v, p in node.metadata["properties"].items()} == {
        1: "class 0", 2: "class 1", 3: "class 2"}
    assert set(node.metadata["color"]) == {1, 2, 3}

    # spec layout of the store's own version
    labels_dir = src / "labels"
    if version == "0.5":
        group_attrs = json.loads((labels_dir / "zarr.json").read_text())["attributes"]["ome"]
        meta = json.loads((labels_dir / "muvit" / "zarr.json").read_text())
        label_attrs = meta["attributes"]["ome"]
        assert label_attrs["version"] == "0.5" and meta["zarr_format"] == 3
        assert json.loads((labels_dir / "muvit" / "0" / "zarr.json").read_text())["zarr_format"] == 3
    else:
        group_attrs = json.loads((labels_dir / ".zattrs").read_text())
        label_attrs = json.loads((labels_dir / "muvit" / ".zattrs").read_text())
        assert label_attrs["multiscales"][0]["version"] == "0.4"
        assert label_attrs["image-label"]["version"] == "0.4"
        assert json.loads((labels_dir / "muvit" / "0" / ".zarray").read_text())["dimension_separator"] == "/"
    assert group_attrs["labels"] == ["muvit"]
    assert label_attrs["image-label"]["source"] == {"image": "../../"}
    image_ms = zarr.open_group(str(src), mode="r").attrs.asdict()
    image_ms = (image_ms.get("ome") or image_ms)["multiscales"][0]
    assert [d["coordinateTransformations"] for d in label_attrs["multiscales"][0]["datasets"]] == [
        d["coordinateTransformations"] for d in image_ms["datasets"]]

    # the pixels: the in-memory prediction at level 0, nearest neighbour below
    levels = [np.asarray(d) for d in node.data]
    np.testing.assert_array_equal(
        levels[0], expected_labels(model, src))
    for k, f in enumerate((1, 2, 4, 8, 16)):
        np.testing.assert_array_equal(levels[k], levels[0][::f, ::f][: levels[k].shape[0], : levels[k].shape[1]])
    assert read_store_info(out)["status"] == "complete"


def test_into_source_channel_axis_has_size_one(tmp_path) -> None:
    """A (c, y, x) image gets (1, y, x) labels with the image's axes (NGFF: 'the same, or 1')."""
    model = tiny_segmenter(in_channels=2)
    image = np.stack([rings(SIZE)[0], rings(SIZE)[0][::-1]])
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", image, axes="cyx")
    before = image_hashes(src)
    predict(str(src), model=model, into_source="cells", device="cpu")
    assert image_hashes(src) == before
    (node,) = label_nodes(src)
    assert node.data[0].shape == (1, SIZE, SIZE)
    assert [a["name"] for a in node.metadata["axes"]] == ["c", "y", "x"]
    np.testing.assert_array_equal(np.asarray(node.data[0])[0], expected_labels(model, src))


def test_into_source_resumes_after_cancel(model, tmp_path) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    token = CancelToken()

    def cancel_early(done: int, total: int, message: str = "") -> None:
        if done >= 5:
            token.cancel()

    with pytest.raises(CancelledError):
        predict(str(src), model=model, into_source=True, device="cpu", progress=cancel_early,
                cancel=token)
    out = src / "labels" / "muvit"
    assert read_store_info(out)["status"] == "incomplete"
    done_before = int(np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum())
    assert done_before >= 5
    calls = []
    predict(str(src), model=model, into_source=True, device="cpu",
            progress=lambda d, t, m="": calls.append(t))
    assert calls and calls[-1] == int(np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).size) - done_before
    assert read_store_info(out)["status"] == "complete"
    (node,) = label_nodes(src)
    np.testing.assert_array_equal(
        np.asarray(node.data[0]),
        expected_labels(model, src))
    assert json.loads((src / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["muvit"]


def test_foreign_labels_are_never_touched(model, tmp_path) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.4", rings(SIZE)[0])
    root = zarr.open_group(str(src), mode="r+", zarr_format=2)
    theirs = (rings(SIZE)[0] > 100).astype(np.uint8)
    write_labels(theirs, root, name="cells", axes="yx", fmt=FormatV04())
    before = image_hashes(src)
    cells = {str(f): f.read_bytes() for f in (src / "labels" / "cells").rglob("*") if f.is_file()}
    for overwrite in (False, True):
        with pytest.raises(InputError, match="'cells' .* not written by napari-muvit"):
            predict(str(src), model=model, into_source="cells", overwrite=overwrite, device="cpu")
    assert {str(f): f.read_bytes() for f in (src / "labels" / "cells").rglob("*") if f.is_file()} == cells
    # a second label image goes next to theirs, appended to the list
    predict(str(src), model=model, into_source=True, device="cpu")
    assert json.loads((src / "labels" / ".zattrs").read_text())["labels"] == ["cells", "muvit"]
    assert sorted(n.metadata["name"] for n in label_nodes(src)) == ["cells", "muvit"]
    assert image_hashes(src) == before


def test_overwrite_replaces_only_our_labels(model, tmp_path) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    predict(str(src), model=model, into_source=True, device="cpu")
    with pytest.raises(InputError, match="already exists .*finished prediction"):
        predict(str(src), model=tiny_segmenter(seed=3), into_source=True, device="cpu")
    other = tiny_segmenter(seed=3)
    predict(str(src), model=other, into_source=True, overwrite=True, device="cpu")
    (node,) = label_nodes(src)
    np.testing.assert_array_equal(
        np.asarray(node.data[0]),
        expected_labels(other, src))
    assert json.loads((src / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["muvit"]


def test_read_only_store_is_refused_before_any_write(model, tmp_path, monkeypatch) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    real_write = pathlib.Path.write_bytes

    def denied(self: Path, data: bytes) -> int:
        if str(self).startswith(str(src.absolute())):
            raise PermissionError(13, "Permission denied", str(self))
        return real_write(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", denied)
    with pytest.raises(InputError, match="is read-only .*--out"):
        predict(str(src), model=model, into_source=True, device="cpu")
    assert not (src / "labels").exists()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="file permissions do not restrict root")
def test_read_only_folder_is_refused(model, tmp_path) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    src.chmod(0o555)
    try:
        with pytest.raises(InputError, match="is read-only"):
            predict(str(src), model=model, into_source=True, device="cpu")
    finally:
        src.chmod(0o755)


def test_not_an_ngff_image_and_bad_names(model, tmp_path) -> None:
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", data=rings(SIZE)[0])
    with pytest.raises(InputError, match="no OME-NGFF multiscales"):
        predict(str(plain), model=model, into_source=True, device="cpu")
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    for bad in ("../escape", "a/b", ".hidden", ""):
        with pytest.raises(InputError, match="labels name"):
            predict(str(src), model=model, into_source=bad or "?", device="cpu")
    with pytest.raises(InputError, match="probabilities"):
        predict(str(src), model=model, into_source=True, probabilities=True, device="cpu")
    with pytest.raises(InputError, match="one of them"):
        predict(str(src), model=model, into_source=True, out=tmp_path / "o.zarr", device="cpu")
    assert not (src / "labels").exists()


def test_cli_into_source(model, tmp_path, capsys) -> None:
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.4", rings(SIZE)[0])
    model.save(tmp_path / "model")
    before = image_hashes(src)
    args = ["predict", str(src), "--model", str(tmp_path / "model"), "--device", "cpu", "--quiet"]
    assert main([*args, "--into-source", "--labels-name", "seg"]) == 0
    assert capsys.readouterr().out.strip() == str(src.absolute() / "labels" / "seg")
    assert image_hashes(src) == before
    assert [n.metadata["name"] for n in label_nodes(src)] == ["seg"]
    assert main([*args, "--into-source", "--labels-name", "seg"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--overwrite" in err
    assert main([*args, "--into-source", "--labels-name", "seg", "--overwrite"]) == 0
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "o.zarr"), "--labels-name", "seg"]) == 2
    assert "--labels-name: only used with --into-source" in capsys.readouterr().err


def test_our_own_store_reads_as_a_label_image(model, tmp_path) -> None:
    """The separate store (--out) stays a multiscale label image for ome-zarr-py."""
    out = predict(PyramidSource(rings(SIZE)), model=model, out=tmp_path / "pred.zarr", device="cpu")
    nodes = list(Reader(parse_url(str(out)))())
    node = nodes[0]
    assert any(isinstance(s, Label) for s in node.specs)
    assert any(isinstance(s, Multiscales) for s in node.specs)
    assert node.data[0].shape == (SIZE, SIZE)
    assert sorted(node.metadata["properties"]) == [1, 2, 3]


def test_napari_ome_zarr_shows_the_labels(model, tmp_path) -> None:
    """napari-ome-zarr (the reader napari uses for OME-Zarr) returns the labels layer."""
    reader_mod = pytest.importorskip("napari_ome_zarr._reader", reason="needs napari-ome-zarr")
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    predict(str(src), model=model, into_source="muvit", device="cpu")
    layers = reader_mod.napari_get_reader(str(src))(str(src))
    kinds = {kind: (data, kw) for data, kw, kind in layers}
    assert set(kinds) == {"image", "labels"}
    data, kw = kinds["labels"]
    assert kw["name"].endswith("muvit")
    assert [d.shape for d in data] == [d.shape for d in kinds["image"][0]]
    np.testing.assert_array_equal(kw["scale"], kinds["image"][1]["scale"])
    np.testing.assert_array_equal(
        np.asarray(data[0]),
        expected_labels(model, src))


def test_labels_list_is_locked_while_another_run_updates_it(model, tmp_path) -> None:
    """The labels group's list is updated under the advisory lock: a second writer waits for
    nothing and gets a one-line error naming the holder; the lock file never stays behind."""
    import threading

    from napari_muvit.locks import LockedError, advisory_lock

    src = write_ome_image(tmp_path / "img.ome.zarr", "0.5", rings(SIZE)[0])
    before = image_hashes(src)
    held, release = threading.Event(), threading.Event()

    def other_run() -> None:
        with advisory_lock(src / "labels", "OME-Zarr labels group"):
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        assert held.wait(60)
        with pytest.raises(LockedError, match="labels group"):
            predict(str(src), model=model, into_source=True, device="cpu")
    finally:
        release.set()
        thread.join()
    predict(str(src), model=model, into_source=True, device="cpu")  # resumes, then lists it
    assert json.loads((src / "labels" / "zarr.json").read_text())["attributes"]["ome"]["labels"] == ["muvit"]
    assert image_hashes(src) == before  # no lock file left in the image folder


@pytest.mark.gui
def test_napari_viewer_opens_the_image_with_its_muvit_labels(make_napari_viewer, model, tmp_path) -> None:
    """File > Open of the slide in a real viewer (napari-ome-zarr): image + MuViT labels."""
    pytest.importorskip("napari_ome_zarr", reason="needs napari-ome-zarr")
    src = write_ome_image(tmp_path / "img.ome.zarr", "0.4", rings(SIZE)[0])
    predict(str(src), model=model, into_source=True, device="cpu")
    viewer = make_napari_viewer()
    viewer.open(str(src), plugin="napari-ome-zarr")
    kinds = {type(layer).__name__: layer for layer in viewer.layers}
    assert set(kinds) == {"Image", "Labels"}
    labels = kinds["Labels"]
    assert labels.name.endswith("muvit") and labels.multiscale
    assert labels.data[0].shape == kinds["Image"].data[0].shape == (SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(labels.data[0]), expected_labels(model, src))


def test_into_source_with_dask_workers(model, tmp_path) -> None:
    """Dask workers attach to the label group (zarr v2 here) and build its pyramid."""
    from napari_muvit.engine.distributed import predict_distributed
    from napari_muvit.engine.ome_labels import SourceLabels

    src = write_ome_image(tmp_path / "img.ome.zarr", "0.4", rings(SIZE)[0])
    before = image_hashes(src)
    out = predict_distributed(str(src), model, SourceLabels(src, "muvit"), workers=2,
                              processes=False, device="cpu", chunk_size=64)
    assert out == src.absolute() / "labels" / "muvit"
    assert image_hashes(src) == before
    (node,) = label_nodes(src)
    levels = [np.asarray(d) for d in node.data]
    np.testing.assert_array_equal(levels[0], expected_labels(model, src))
    for k, f in enumerate((1, 2, 4, 8, 16)):
        np.testing.assert_array_equal(levels[k], levels[0][::f, ::f][: levels[k].shape[0], : levels[k].shape[1]])
    assert read_store_info(out)["status"] == "complete"


def test_ome_image_of_tells_writable_images_apart(tmp_path) -> None:
    from napari_muvit.engine.ome_labels import ome_image_of

    for version in ("0.4", "0.5"):
        src = write_ome_image(tmp_path / f"img{version}.ome.zarr", version, rings(SIZE)[0])
        assert ome_image_of(str(src)) == src.absolute()
    plain = tmp_path / "plain.zarr"
    zarr.open_group(str(plain), mode="w").create_array("0", data=rings(SIZE)[0])
    np.save(tmp_path / "img.npy", rings(SIZE)[0])
    for other in (plain, tmp_path / "img.npy", tmp_path / "missing.zarr", None, ""):
        assert ome_image_of(other) is None


def test_stacks_are_refused(model, tmp_path) -> None:
    """A z-stack gets no 2-D labels written as if it were one plane."""
    from napari_muvit.engine.ome_labels import SourceLabels, prepare_source_labels

    stack = np.stack([rings(SIZE)[0]] * 3)
    src = write_ome_image(tmp_path / "stack.ome.zarr", "0.5", stack, axes="zyx")
    with pytest.raises(InputError, match="2-D images"):
        prepare_source_labels(SourceLabels(src), (SIZE, SIZE), [1, 2, 3], None)
    assert not (src / "labels").exists()

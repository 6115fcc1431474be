"""The trainer's index of annotated pixels: chunk-wise scan once, incremental updates."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

from napari_muvit.engine._labels import LabelIndex
from napari_muvit.engine.trainer import open_labels
from napari_muvit.errors import InputError


def painted() -> np.ndarray:
    labels = np.zeros((3000, 2500), np.uint8)
    labels[10:20, 10:20] = 1
    labels[2900, 2400] = 2
    return labels


def test_numpy_labels_indexed_by_value() -> None:
    labels = painted().astype(np.int32)
    labels[0, 0] = -1  # negative values are never classes
    index = LabelIndex(labels)
    assert index.counts() == {1: 100, 2: 1}
    pts = index.points_by_value()
    assert pts[2].tolist() == [[2900, 2400]]
    assert pts[1][:, 0].min() == 10 and pts[1][:, 0].max() == 19


def test_zarr_scan_skips_chunks_that_were_never_written() -> None:
    z = zarr.create_array(store={}, shape=(3000, 2500), chunks=(128, 128), dtype="u1", fill_value=0)
    z[10:20, 10:20] = 1
    z[2900, 2400] = 2
    index = LabelIndex(z)
    assert index.counts() == {1: 100, 2: 1}
    # 2 of the 12x10 tiles of 256 px hold written chunks: only those were read
    assert index.tiles_scanned == 2


def test_dask_labels_irregular_chunks() -> None:
    labels = da.from_array(painted(), chunks=(700, 900))
    index = LabelIndex(labels)
    assert index.counts() == {1: 100, 2: 1}
    assert index.edges[0].tolist() == [0, 700, 1400, 2100, 2800, 3000]


def test_update_rescans_only_touched_tiles() -> None:
    labels = painted()
    index = LabelIndex(labels)
    labels[1500, 1500] = 3
    labels[10:20, 10:20] = 0  # erased
    assert index.update([[[1500, 1500], [1501, 1501]], [[10, 10], [20, 20]]]) == 2
    assert index.counts() == {2: 1, 3: 1}


def test_dense_mode_caps_points_per_tile_and_exclusion() -> None:
    labels = np.zeros((512, 512), np.uint8)
    labels[:, 256:] = 1
    index = LabelIndex(labels, dense=True, max_points_per_tile=100)
    assert index.counts() == {0: 100, 1: 100}
    held_out = LabelIndex(painted(), exclude=[[0, 0], [15, 15]])
    assert held_out.counts() == {1: 75, 2: 1}


def test_bad_labels() -> None:
    with pytest.raises(InputError, match="2D"):
        LabelIndex(np.zeros((2, 3, 4), np.uint8))
    with pytest.raises(InputError, match="integers"):
        LabelIndex(np.zeros((3, 4), np.float32))
    with pytest.raises(InputError, match="does not exist"):
        open_labels("/nonexistent/labels.npy")


def test_open_labels_from_files(tmp_path) -> None:
    labels = painted()[:64, :64]
    np.save(tmp_path / "l.npy", labels)
    assert np.array_equal(np.asarray(open_labels(tmp_path / "l.npy")), labels)
    z = zarr.create_array(
        store=str(tmp_path / "l.zarr"), shape=labels.shape, chunks=(32, 32), dtype="u1"
    )
    z[:] = labels
    assert np.array_equal(np.asarray(open_labels(tmp_path / "l.zarr")[:]), labels)

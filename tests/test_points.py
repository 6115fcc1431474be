"""Point detection: CSV input, the virtual point raster, targets/loss/decoding, the detector
folder, tiled prediction with an oracle detector (exact points, no duplicates across tiles),
the resumable CSV sink, training and the command line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from napari_muvit.cli import main
from napari_muvit.data.points_io import (
    PointRaster,
    PointTable,
    points_from_labels,
    read_points,
    write_points_csv,
)
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.engine.points import (
    PointCsvSink,
    PointMerger,
    PointPredictor,
    predict_points,
    train_points,
)
from napari_muvit.errors import CancelledError, InputError
from napari_muvit.model import MuViTEncoder, MuViTPointDetector, load_model
from napari_muvit.model.points import (
    decode_points,
    nms_points,
    offset_scale,
    point_consistency_loss,
    point_loss,
    point_maps,
    point_targets,
)


# ============================================================================ CSV input
def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_read_yx_class_and_default_class(tmp_path: Path) -> None:
    t = read_points(_write(tmp_path / "a.csv", "y,x,class\n1.5,2,1\n10,20.25,3\n"), (50, 50))
    np.testing.assert_array_equal(t.yx, [[1.5, 2.0], [10.0, 20.25]])
    np.testing.assert_array_equal(t.classes, [1, 3])
    t = read_points(_write(tmp_path / "b.csv", "x,y\n2,1\n"))  # column order from the header
    np.testing.assert_array_equal(t.yx, [[1.0, 2.0]])
    np.testing.assert_array_equal(t.classes, [1])


def test_read_napari_points_csv_with_class_names(tmp_path: Path) -> None:
    text = "index,axis-0,axis-1,class,other\n0,5.0,6.0,tumour,x\n1,7,8,lymphocyte,y\n2,9,9,tumour,z\n"
    path = _write(tmp_path / "napari.csv", text)
    t = read_points(path)  # alphabetical: lymphocyte=1, tumour=2
    np.testing.assert_array_equal(t.classes, [2, 1, 2])
    assert t.class_names == {1: "lymphocyte", 2: "tumour"}
    t = read_points(path, class_names=["tumour", "lymphocyte"])
    np.testing.assert_array_equal(t.classes, [1, 2, 1])
    np.testing.assert_array_equal(t.yx, [[5, 6], [7, 8], [9, 9]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("y,x\n", "no points"),
        ("a,b\n1,2\n", "expected a header with columns y,x"),
        ("y,x,class\n1,2,0\n", "class '0'"),
        ("y,x,class\n1,2,1.5\n", "integers >= 1"),
        ("y,x\n1,abc\n", "expected numbers"),
        ("y,x\n1,200\n", "outside the image"),
        ("index,axis-0,axis-1,axis-2\n0,1,2,3\n", "2-D points"),
    ],
)
def test_bad_points_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path / "bad.csv", text)
    with pytest.raises(InputError) as err:
        read_points(path, (100, 100))
    msg = str(err.value)
    assert message in msg and str(path) in msg and "\n" not in msg


def test_points_from_labels_and_csv_round_trip(tmp_path: Path) -> None:
    inst = np.zeros((20, 20), np.int32)
    inst[2:5, 2:5] = 1  # centre (3, 3)
    inst[10:12, 14:18] = 7  # centre (10.5, 15.5)
    sem = np.where(inst == 7, 2, np.where(inst > 0, 1, 0))
    t = points_from_labels(inst, sem)
    np.testing.assert_allclose(t.yx, [[3, 3], [10.5, 15.5]])
    np.testing.assert_array_equal(t.classes, [1, 2])
    back = read_points(write_points_csv(tmp_path / "p.csv", t))
    np.testing.assert_allclose(back.yx, t.yx)
    np.testing.assert_array_equal(back.classes, t.classes)


def test_point_raster_values_region_and_exclude() -> None:
    table = PointTable(np.array([[2.2, 3.6], [8.0, 8.0], [1.0, 9.0]]), np.array([1, 2, 1]))
    r = PointRaster(table, (10, 12), region=[[0, 0], [6, 6]])
    full = np.asarray(r)
    assert full.shape == (10, 12) and full.dtype == np.int32
    assert full[2, 4] == 2 and full[8, 8] == 3 and full[1, 9] == 2  # class + 1
    assert (full[:6, :6] >= 1).all() and full[0, 0] == 1
    assert full[9, 0] == 0  # outside the annotated region
    np.testing.assert_array_equal(r[1:4, 3:10], full[1:4, 3:10])
    held = PointRaster(table, (10, 12), exclude=[[0, 0], [5, 5]])
    arr = np.asarray(held)
    assert (arr[:5, :5] == 0).all() and arr[8, 8] == 3 and arr[9, 11] == 1
    assert len(held.table) == 2  # the point in the held-out box is gone


# ============================================================================ model
def _perfect_raw(types: torch.Tensor, offsets: torch.Tensor, num_classes: int, scale: float,
                 type_head: str) -> torch.Tensor:
    """Raw outputs that are certain and right for the targets of :func:`point_targets`."""
    fg = types.clamp_min(0)
    if type_head == "shared":
        logits = torch.nn.functional.one_hot(fg, num_classes + 1).permute(0, 3, 1, 2) * 20.0
    else:
        obj = torch.where(fg > 0, 20.0, -20.0)[:, None]
        kind = torch.nn.functional.one_hot((fg - 1).clamp_min(0), num_classes)
        logits = torch.cat([obj, kind.permute(0, 3, 1, 2) * 20.0], 1)
    return torch.cat([logits.float(), offsets / scale], 1)


def _tiny_detector(levels=(1, 4), classes=2, **opts) -> MuViTPointDetector:
    enc = MuViTEncoder(1, levels, patch_size=8, dim=48, num_layers=2, heads=2)
    return MuViTPointDetector(enc, num_classes=classes, head_dim=16, head_options=opts)


def test_targets_positives_and_offsets() -> None:
    t = torch.zeros(1, 32, 32, dtype=torch.long)
    t[0, 10, 12] = 2
    types, off, pos, ann = point_targets(t, stride=1, pos_radius=3.0)
    assert int(pos.sum()) == 29  # lattice points within 3 px
    assert int(types[0, 10, 12]) == 2 and int(types[0, 10, 16]) == 0
    assert off[0, :, 9, 11].tolist() == [1.0, 1.0]  # from (9, 11) to the point
    assert bool(ann.all())
    # stride 4: the cell centre (9.5, 13.5) holds the point; offsets from cell centres
    types4, off4, pos4, _ = point_targets(t, stride=4, pos_radius=3.0)
    assert int(types4[0, 2, 3]) == 2 and off4[0, :, 2, 3].tolist() == [0.5, -1.5]
    # nothing annotated: the loss is exactly zero and differentiable
    raw = torch.zeros(1, 5, 32, 32, requires_grad=True)
    loss, _ = point_loss(raw, torch.full((1, 32, 32), -1), 2, 1, 3.0)
    loss.backward()
    assert float(loss.detach()) == 0.0


@pytest.mark.parametrize("type_head", ["separate", "shared"])
@pytest.mark.parametrize("stride", [1, 4])
def test_perfect_raw_outputs_decode_to_the_points(stride: int, type_head: str) -> None:
    pts = {(10, 12): 1, (20, 5): 2, (21, 25): 1}
    t = torch.zeros(1, 32, 32, dtype=torch.long)
    for (y, x), c in pts.items():
        t[0, y, x] = c
    types, off, _, _ = point_targets(t, stride, 3.0)
    raw = _perfect_raw(types, off, 2, offset_scale(stride, 3.0), type_head)
    maps = point_maps(raw, 2, stride, 3.0, 32, type_head=type_head)
    found = decode_points(maps, 0.5, 4.0)[0]
    got = sorted((round(float(y), 3), round(float(x), 3), int(c) + 1)
                 for (y, x), c in zip(found["yx"], found["class_index"]))
    assert got == sorted((float(y), float(x), c) for (y, x), c in pts.items())
    # the loss of these outputs is small (perfect types at 20-logit margin, exact offsets)
    loss, parts = point_loss(raw, t, 2, stride, 3.0, type_head=type_head)
    assert parts["loss_reg"] < 1e-10 and parts["loss_type"] < 1e-6
    assert parts["loss_obj"] < 1e-6


def test_separate_type_loss_sees_only_the_points() -> None:
    """MUSE's layout: the type logits learn from the positive locations only (background
    locations cannot drown them), objectness from every annotated location."""
    t = torch.zeros(1, 32, 32, dtype=torch.long)
    t[0, 10, 12], t[0, 22, 20] = 2, 1
    raw = torch.randn(1, 5, 8, 8, requires_grad=True)
    loss, parts = point_loss(raw, t, 2, 4, 3.0, type_head="separate")
    loss.backward()
    _, _, positive, _ = point_targets(t, 4, 3.0)
    type_grad = raw.grad[0, 1:3].abs().sum(0)
    assert bool((type_grad[~positive[0]] == 0).all()) and bool((type_grad[positive[0]] > 0).all())
    assert bool((raw.grad[0, 0] != 0).all())  # objectness: every annotated location
    assert parts["loss_type"] > 0 and parts["loss_obj"] > 0
    # the shared softmax (old detectors) puts class gradient on the background too
    raw.grad = None
    point_loss(raw, t, 2, 4, 3.0, type_head="shared")[0].backward()
    assert bool((raw.grad[0, 1:3].abs().sum(0)[~positive[0]] > 0).all())


def test_consistency_loss_of_the_separate_head() -> None:
    """Confident teacher locations outside the annotation become pseudo labels: objectness both
    ways, the type only where the teacher is sure of it; unconfident ones are not used."""
    teacher = torch.zeros(1, 5, 8, 8)
    teacher[0, 0] = -20.0  # sure: background
    teacher[0, 0, 2, 3] = 20.0  # sure: a point ...
    teacher[0, 1:3, 2, 3] = torch.tensor([0.0, 20.0])  # ... of the second type
    teacher[0, 0, 5, 5] = 0.0  # unsure
    target = torch.full((1, 32, 32), -1)
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    loss, frac = point_consistency_loss(teacher.clone(), teacher, target, valid, 2, 4, 0.9,
                                        type_head="separate")
    assert frac == pytest.approx(63 / 64) and float(loss) < 1e-6
    student = teacher.clone()
    student[0, 1:3, 2, 3] = torch.tensor([20.0, 0.0])  # the other type at the point
    wrong, _ = point_consistency_loss(student, teacher, target, valid, 2, 4, 0.9,
                                      type_head="separate")
    assert float(wrong) > 10
    student = teacher.clone()
    student[0, 1:3, 4, 4] = torch.tensor([20.0, 0.0])  # types of background are free
    student[0, 0, 5, 5] = 20.0  # and so is the unsure location
    free, _ = point_consistency_loss(student, teacher, target, valid, 2, 4, 0.9,
                                     type_head="separate")
    assert float(free) < 1e-6


def test_nms_keeps_best_then_first() -> None:
    yx = [[0, 0], [0, 3], [0, 6], [10, 10]]
    keep = nms_points(yx, [0.5, 0.9, 0.5, 0.1], 4.0)
    assert sorted(keep.tolist()) == [1, 3]  # 0 and 2 lie within 4 px of the best point 1
    # exactly min_distance apart is not a duplicate
    assert sorted(nms_points(yx, [1, 1, 1, 1], 3.0).tolist()) == [0, 1, 2, 3]


def test_detector_folder_round_trip(tmp_path: Path) -> None:
    det = _tiny_detector(stride=2, pos_radius=2.5, min_distance=5.0)
    det.class_names = ["a", "b"]
    det.save(tmp_path / "det")
    text = (tmp_path / "det" / "config.yaml").read_text()
    assert "kind: points" in text
    back = load_model(tmp_path / "det")
    assert isinstance(back, MuViTPointDetector) and back.task == "points"
    assert back.head_config == det.head_config and back.class_names == ["a", "b"]
    x = torch.randn(1, 2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), det.eval()(x))
    assert MuViTPointDetector.from_pretrained(tmp_path / "det").num_classes == 2
    assert back.type_head == "separate" and back.head_options["context"] is True


def test_detector_saved_before_the_type_head_loads_as_shared(tmp_path: Path) -> None:
    """Checkpoints without ``type_head`` in their config had the shared softmax: they load
    with it, give the same outputs, and decode with its meaning."""
    det = _tiny_detector(type_head="shared").eval()
    det.save(tmp_path / "old")
    cfg = tmp_path / "old" / "config.yaml"
    lines = cfg.read_text().splitlines()
    kept = [ln for ln in lines if ln.strip().split(":")[0] not in ("type_head", "context",
                                                                    "type_hidden")]
    assert len(kept) == len(lines) - 3
    cfg.write_text("\n".join(kept) + "\n")
    back = load_model(tmp_path / "old")
    assert back.type_head == "shared" and back.head_options["context"] is False
    x = torch.randn(1, 2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), det(x))
    # a new detector defaults to the separate layout; bad values are one-line errors
    assert _tiny_detector().type_head == "separate"
    with pytest.raises(InputError, match="type_head"):
        _tiny_detector(type_head="joint")


def test_type_head_learns_a_class_only_the_coarse_level_shows() -> None:
    """Every cell looks the same at level 1; its class is the brightness of the 4x context
    around it. The separate type head (with every level's tokens at the location) learns it
    on a frozen encoder; MuViT[1] sees identical inputs for both classes (the cue is coarse
    only), so it cannot."""
    torch.manual_seed(0)
    det = _tiny_detector(levels=(1, 4), stride=4, type_classifier="mlp")
    for p in det.encoder.parameters():
        p.requires_grad_(False)
    cell = torch.zeros(32, 32)
    cell[13:19, 13:19] = 1.0
    target = torch.zeros(8, 32, 32, dtype=torch.long)
    classes = torch.arange(8) % 2 + 1
    target[:, 16, 16] = classes
    x = torch.zeros(8, 2, 1, 32, 32)
    x[:, 0, 0] = cell
    x[:, 1, 0] = torch.where(classes == 2, 1.0, -1.0)[:, None, None]  # the context
    x[:, 1, 0, 14:18, 14:18] += 0.25  # the cell at 4x: the same for both classes
    opt = torch.optim.Adam([p for p in det.parameters() if p.requires_grad], lr=3e-3)
    det.train()
    for _ in range(40):
        loss, _ = point_loss(det(x), target, 2, 4, 3.0, type_head="separate")
        opt.zero_grad()
        loss.backward()
        opt.step()
    det.eval()
    with torch.no_grad():
        maps = det.maps(det(x), 32)
    found = decode_points(maps, 0.5, 4.0)
    assert all(len(f["yx"]) == 1 for f in found)
    got = torch.stack([f["class_index"][0] for f in found]) + 1
    assert got.tolist() == classes.tolist()
    one = _tiny_detector(levels=(1,), stride=4, type_classifier="mlp").eval()
    with torch.no_grad():
        out = one(x[:, :1])
    torch.testing.assert_close(out[0::2], out[1::2])


def test_merger_drops_cross_tile_duplicates() -> None:
    m = PointMerger(4.0)
    core_a = np.array([[0, 0], [64, 64]])
    core_b = np.array([[0, 64], [64, 128]])
    assert m.add(np.array([[30.0, 62.0], [30.0, 10.0]]), core_a).tolist() == [True, True]
    assert m.add(np.array([[31.0, 65.0], [30.0, 100.0]]), core_b).tolist() == [False, True]


# ============================================================================ oracle prediction
class OracleDetector(MuViTPointDetector):
    """Outputs the perfect raw maps of known points for whatever tile it is shown (from the
    tile's level-1 bbox): prediction must then return exactly those points."""

    def __init__(self, table: PointTable, shape, **opts) -> None:
        enc = MuViTEncoder(1, (1, 4), patch_size=8, dim=48, num_layers=1, heads=2)
        super().__init__(enc, num_classes=2, head_dim=16, head_options=opts)
        self.raster = PointRaster(table, shape)

    def forward(self, x, bbox=None):
        s = x.shape[-1]
        outs = []
        for b in range(x.shape[0]):
            y0, x0 = (int(round(float(v))) for v in bbox[b, 0, 0])
            crop = np.full((s, s), -1, np.int64)
            ys, xs = slice(max(y0, 0), max(y0 + s, 0)), slice(max(x0, 0), max(x0 + s, 0))
            block = self.raster[ys, xs].astype(np.int64) - 1
            crop[ys.start - y0 : ys.start - y0 + block.shape[0],
                 xs.start - x0 : xs.start - x0 + block.shape[1]] = block
            t = torch.from_numpy(crop)[None]
            types, off, _, _ = point_targets(t, self.stride, self.head_options["pos_radius"])
            outs.append(_perfect_raw(types, off, 2, self.loss_scale(), self.type_head))
        return torch.cat(outs)


def _oracle_case(rng, n=40, shape=(100, 90)):
    yx = np.stack([rng.integers(2, shape[0] - 2, n), rng.integers(2, shape[1] - 2, n)], 1)
    # keep points >= 6 px apart (one nucleus each)
    keep = []
    for i, p in enumerate(yx):
        if all(np.hypot(*(p - yx[j])) >= 6 for j in keep):
            keep.append(i)
    table = PointTable(yx[keep].astype(np.float64), rng.integers(1, 3, len(keep)))
    image = rng.normal(size=shape).astype(np.float32)
    return table, image


@pytest.mark.parametrize(("overlap", "stride", "type_head"),
                         [(0, 1, "separate"), (8, 1, "separate"), (0, 4, "separate"),
                          (0, 4, "shared")])
def test_tiled_prediction_recovers_points_once(rng, overlap: int, stride: int,
                                               type_head: str) -> None:
    table, image = _oracle_case(rng)
    oracle = OracleDetector(table, image.shape, stride=stride, type_head=type_head)
    oracle.meta["crop_size"] = 32
    out = predict_points(image, oracle, device="cpu", overlap=overlap)
    got = sorted(zip(out["y"].round(3), out["x"].round(3), out["class"]))
    want = sorted(zip(table.yx[:, 0], table.yx[:, 1], table.classes))
    assert got == want
    assert (out["score"] > 0.99).all()


def test_csv_sink_resumes_and_protects(rng, tmp_path: Path) -> None:
    table, image = _oracle_case(rng)
    oracle = OracleDetector(table, image.shape)
    oracle.meta["crop_size"] = 32
    path = tmp_path / "pred.csv"
    cancel = CancelToken()
    seen = []

    def stop_after_two(done, total, message):
        seen.append(done)
        if done >= 2:
            cancel.cancel()

    with pytest.raises(CancelledError):
        predict_points(image, oracle, out=path, device="cpu", progress=stop_after_two,
                       cancel=cancel)
    assert not path.exists() and (tmp_path / ".pred.csv.partial").exists()
    pred = PointPredictor(oracle, device="cpu")
    from napari_muvit.data import open_image

    sink = PointCsvSink(pred, path, open_image(image))
    assert sink.resumed_tiles >= 2
    sink.close(complete=False)
    out = predict_points(image, oracle, out=path, device="cpu")
    rows = np.loadtxt(out, delimiter=",", skiprows=1)
    assert path.read_text().splitlines()[0] == "y,x,class,score"
    got = sorted(zip(rows[:, 0], rows[:, 1], rows[:, 2].astype(int)))
    assert got == sorted(zip(table.yx[:, 0], table.yx[:, 1], table.classes))
    assert not (tmp_path / ".pred.csv.partial").exists()
    with pytest.raises(InputError, match="already exists"):
        predict_points(image, oracle, out=path, device="cpu")


# ============================================================================ training + CLI
def _two_tissue_cells(seed: int, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Identical bright cells on two tissues (left dark, right bright): a cell's class is its
    tissue. Returns the image and ``(N, 3)`` rows ``y, x, class``."""
    rng = np.random.default_rng(seed)
    image = rng.normal(0, 2, (size, size)).astype(np.float32)
    image[:, size // 2 :] += 60
    rows = []
    for y in range(12, size - 8, 18):
        for x in range(12, size - 8, 18):
            cy, cx = y + int(rng.integers(-3, 4)), x + int(rng.integers(-3, 4))
            image[cy - 3 : cy + 4, cx - 3 : cx + 4] += 100
            rows.append((cy, cx, 1 if cx < size // 2 else 2))
    return image, np.asarray(rows, np.float64)


def _type_at_points(det: MuViTPointDetector, image: np.ndarray, yx: np.ndarray,
                    tile: int = 32) -> np.ndarray:
    """The detector's type (class id) at the grid location of each point, each computed in
    the tile of the global grid that holds it, as prediction reads it."""
    from napari_muvit.data import Normalization, open_image
    from napari_muvit.data.geometry import centered_nested_bboxes

    source = open_image(image)
    source.normalization = Normalization.from_dict(det.normalization)
    levels = tuple(float(v) for v in det.levels)
    out = []
    for y, x in np.asarray(yx, np.int64):
        origin = (y // tile * tile, x // tile * tile)
        bb = centered_nested_bboxes(origin, tile, levels)
        crop = torch.from_numpy(source.read_nested(bb, levels, tile)[0])[None]
        with torch.no_grad():
            raw = det.eval()(crop, torch.from_numpy(bb)[None])
        cy, cx = (y - origin[0]) // det.stride, (x - origin[1]) // det.stride
        out.append(det.label_values[int(raw[0, 1 : det.num_classes + 1, cy, cx].argmax())])
    return np.asarray(out)


def test_forest_type_head_is_fitted_from_clicked_points(tmp_path: Path) -> None:
    """A new detector's types come from a random forest on every level's filter bank, fitted
    on the clicked points before fine-tuning: right on another image after one step, saved
    and reloaded to identical outputs, and kept (not refitted) on resume."""
    from napari_muvit.engine.trainer import TrainConfig

    image, rows = _two_tissue_cells(0)
    test_image, test_rows = _two_tissue_cells(1)
    cfg = TrainConfig(steps=1, batch_size=2, crop_size=32, device="cpu")
    det = train_points(image, rows, out=tmp_path / "det", preset="tiny", levels="1,4",
                       config=cfg)
    assert det.head_options["type_classifier"] == "forest"
    assert det.head_options["forest_trees"] == 100 and det.type_forest.forest.num_trees == 100
    assert "type forest (100 trees) fitted on" in (tmp_path / "det" / "history.json").read_text()
    got = _type_at_points(det, test_image, test_rows[:, :2])
    assert (got == test_rows[:, 2]).mean() >= 0.95, got
    back = load_model(tmp_path / "det")
    assert back.head_config == det.head_config
    x = torch.from_numpy(np.stack([image[None, None, :32, :32]] * 2, 1)[0])[None]
    bb = torch.tensor([[[0.0, 0.0], [32.0, 32.0]], [[-48.0, -48.0], [80.0, 80.0]]])[None]
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x, bb), det.eval()(x, bb))
    leaves = det.type_forest.forest.leaf_probs.clone()
    cfg2 = TrainConfig(steps=2, batch_size=2, crop_size=32, device="cpu")
    resumed = train_points(image, rows, out=tmp_path / "det", resume=True, config=cfg2)
    torch.testing.assert_close(resumed.type_forest.forest.leaf_probs, leaves)
    assert (tmp_path / "det" / "history.json").read_text().count("type forest (") == 1


def test_type_classifier_options_and_old_checkpoints(tmp_path: Path) -> None:
    """Detectors saved before the forest type head load with their trained type MLP; bad
    forest options are one-line errors; the shared layout has no forest."""
    det = _tiny_detector(type_classifier="mlp").eval()
    det.save(tmp_path / "old")
    cfg = tmp_path / "old" / "config.yaml"
    keys = ("type_classifier", "type_sigmas", "forest_trees", "forest_nodes", "forest_depth")
    lines = cfg.read_text().splitlines()
    kept, skipping = [], False
    for ln in lines:
        key = ln.strip().split(":")[0]
        if key in keys:
            skipping = key == "type_sigmas" and ln.strip().endswith(":")
            continue
        if skipping and ln.strip().startswith("- "):
            continue
        skipping = False
        kept.append(ln)
    cfg.write_text("\n".join(kept) + "\n")
    back = load_model(tmp_path / "old")
    assert back.head_options["type_classifier"] == "mlp" and back.type_forest is None
    x = torch.randn(1, 2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), det(x))
    assert _tiny_detector().type_forest is not None
    assert _tiny_detector(type_head="shared").head_options["type_classifier"] == "mlp"
    with pytest.raises(InputError, match="type_classifier"):
        _tiny_detector(type_classifier="svm")
    with pytest.raises(InputError, match="type_sigmas"):
        _tiny_detector(type_sigmas=[])


@pytest.fixture
def point_files(tmp_path: Path):
    rng = np.random.default_rng(1)
    image = rng.normal(20, 3, (96, 96)).astype(np.float32)
    pts = [(20, 20, 1), (20, 60, 2), (60, 30, 1), (70, 75, 2)]
    for y, x, _ in pts:
        image[y - 3 : y + 4, x - 3 : x + 4] += 100
    np.save(tmp_path / "image.npy", image)
    (tmp_path / "pts.csv").write_text("y,x,class\n" + "".join(f"{y},{x},{c}\n" for y, x, c in pts))
    return tmp_path / "image.npy", tmp_path / "pts.csv"


TINY = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--device", "cpu", "--quiet"]


def test_cli_train_points_then_predict_csv(point_files, tmp_path: Path, capsys) -> None:
    image, pts = point_files
    out = tmp_path / "det"
    args = ["train", str(image), "--points", str(pts), "--out", str(out), *TINY,
            "--region", "0,0,96,96", "--class-names", "round,square", "--pseudo-labels"]
    assert main([*args, "--steps", "2", "--checkpoint-every", "1steps"]) == 0
    det = load_model(out)
    assert isinstance(det, MuViTPointDetector) and det.label_values == [1, 2]
    assert det.class_names == ["round", "square"]
    assert det.meta["provenance"]["points"] == [str(pts)]
    assert det.head_options["type_classifier"] == "forest" and det.head_options["forest_trees"]
    import json

    config = json.loads((out / "history.json").read_text())["config"]
    assert (config["lr"], config["encoder_lr_factor"]) == (1e-3, 1.0)  # the points defaults
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert load_model(out).meta["history"]["steps"] == [1, 2, 3]
    capsys.readouterr()
    csv = tmp_path / "pred.csv"
    assert main(["predict", str(image), "--model", str(out), "--out", str(csv), "--quiet",
                 "--device", "cpu"]) == 0
    assert csv.read_text().splitlines()[0] == "y,x,class,score"
    # a segmenter output path for a detector and vice versa: one-line errors
    assert main(["predict", str(image), "--out", str(tmp_path / "x.csv"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "needs a point detector" in err and err.count("\n") == 1
    mlp = tmp_path / "mlp"
    assert main(["train", str(image), "--points", str(pts), "--out", str(mlp), *TINY,
                 "--steps", "1", "--type-classifier", "mlp", "--lr", "2e-4"]) == 0
    assert load_model(mlp).head_options["type_classifier"] == "mlp"
    assert json.loads((mlp / "history.json").read_text())["config"]["lr"] == 2e-4


def test_cli_bad_points_file_is_one_line(point_files, tmp_path: Path, capsys) -> None:
    image, _ = point_files
    bad = _write(tmp_path / "zero.csv", "y,x,class\n5,5,0\n")
    code = main(["train", str(image), "--points", str(bad), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "class '0'" in err and err.count("\n") == 1
    outside = _write(tmp_path / "out.csv", "y,x\n5,500\n")
    code = main(["train", str(image), "--points", str(outside), "--out", str(tmp_path / "o"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "outside the image of shape (96, 96)" in err and err.count("\n") == 1


def test_train_points_validation_and_api_predict(point_files) -> None:
    import napari_muvit
    from napari_muvit.engine.trainer import TrainConfig

    image, pts = point_files
    cfg = TrainConfig(steps=2, batch_size=2, crop_size=32, device="cpu",
                      val_region=[[0, 0], [48, 96]], val_every=1)
    seen = []
    det = train_points(image, pts, preset="tiny", levels="1,4", config=cfg, progress=seen.append)
    assert det.task == "points"
    assert all("val_f1" in s for s in seen) and 0.0 <= seen[-1]["val_f1"] <= 1.0
    table = napari_muvit.predict(str(image), model=det, device="cpu")
    assert set(table) == {"y", "x", "class", "score"}
    assert len({len(v) for v in table.values()}) == 1


def test_second_writer_on_the_same_csv_is_refused(rng, tmp_path: Path) -> None:
    from napari_muvit.locks import advisory_lock

    table, image = _oracle_case(rng, n=5, shape=(40, 40))
    oracle = OracleDetector(table, image.shape)
    oracle.meta["crop_size"] = 32
    path = tmp_path / "pred.csv"
    with advisory_lock(path, "other run"), pytest.raises(InputError):
        import threading

        errors = []

        def other() -> None:
            try:
                predict_points(image, oracle, out=path, device="cpu")
            except InputError as err:
                errors.append(err)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        raise errors[0]
    assert not path.exists()


def test_ring_profile_is_orientation_free_and_sees_the_surroundings() -> None:
    """The forest's ring features: the same for a crop turned by 90° (sorted over directions),
    and different for a pixel inside a bright ring and one outside it."""
    from napari_muvit.model.points import ring_profile

    rng = np.random.default_rng(0)
    crop = torch.from_numpy(rng.normal(0, 1, (1, 1, 48, 48)).astype(np.float32))
    prof = ring_profile(crop, [4.0, 9.0])
    assert prof.shape == (1, 2 * (8 + 2), 48, 48)
    turned = ring_profile(torch.rot90(crop, 1, (2, 3)), [4.0, 9.0])
    torch.testing.assert_close(turned, torch.rot90(prof, 1, (2, 3)))
    yy, xx = np.mgrid[:48, :48]
    r = np.hypot(yy - 24, xx - 24)
    ring = torch.from_numpy(((r > 8) & (r < 12)).astype(np.float32))[None, None]
    inside, outside = ring_profile(ring, [10.0])[0, :, 24, 24], ring_profile(ring, [10.0])[0, :, 24, 42]
    assert inside[:8].min() > 0.5  # the ring all around the centre
    assert outside[:8].min() < 0.1 < outside[:8].max()  # the ring on one side only

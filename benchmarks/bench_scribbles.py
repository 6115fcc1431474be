"""Time to quality from a few strokes: mDSC against seconds since *Train* (issue 13).

For each data set, the same simulated strokes (:func:`napari_muvit.data.strokes.simulate_strokes`:
``--strokes`` short strokes per class, seeded) are given to every method; the clock starts
when training starts and stops for evaluation (each snapshot is scored afterwards on the
whole image against the ground truth, mean Dice over the classes present). The clock is the
process's CPU time (all threads summed, ``time.process_time``): on a shared machine wall-clock
time measures the other jobs; on an idle 2-core CPU with 2 threads, wall time is about half
of it at best. Wall-clock seconds are recorded as well.

Data sets (all ship offline):

``context``
    The paper's Synthetic task (:func:`~napari_muvit.data.synthetic.synthetic_field`, one
    512² ring system, seed 3): a cell's class, outer or inner ring, shows only in the context.
``nuclei``
    The 2-D fluorescence nuclei image and its instance mask shipped in the ``stardist``
    wheel (``stardist/data/images/img2d.tif``, ``mask2d.tif``; ``pip install stardist
    --no-deps``), as two classes: background, nucleus.
``vesicles``
    A real EM image with an expert's outline: the presynaptic terminal of spatstat.data
    (R package; Debian: ``r-cran-spatstat.data``, files ``rawdata/vesicles/vesiclesimage.tif``
    and ``vesiclesmask.tif``, 420×250), as three classes: elsewhere, presynaptic cytoplasm,
    mitochondrion. Found in R's library folders or ``$SPATSTAT_DATA_DIR``.
``food``
    A real RGB photograph with a hand-drawn 4-region ground truth, shipped in the
    napari-convpaint wheel for its tests (``_tests/test_imgs/0000_img.png``, 384×512): the RGB
    stand-in for the issue's H&E image (none with ground truth ships offline).

``he-nuclei``
    Real H&E: 512² RGB tiles of glioblastoma at 40× with expert nucleus contours (GBM40, Kong
    et al., ISBI 2016; the ``data/GBM40`` folder of github.com/pengyzhang/cell_seg_matlab:
    ``raw_image/NN.tif``, ``contour_annotation_xml/NN_data.xml``), as two classes: elsewhere,
    nucleus. Stroke seed *k* uses tile ``HE_TILES[k % 9]``. Found in ``$GBM40_DIR``; not
    shipped (no licence is stated), so download it to run this set.

``skin``
    Real H&E tissue layers: scikit-image's ``skin`` section (960×1280 RGB; the Wikimedia
    Commons file Normal_Epidermis_and_Dermis_with_Intradermal_Nevus_10x.JPG, public domain,
    resized from 2048×1536), the issue's image, as four classes: background, stratum corneum,
    epidermis, dermis. The layer map is derived from the image by :func:`skin_layers`
    (colour thresholds, checked by eye: ``--truth-figure``), not drawn by an expert. Found
    through ``$SKIN_IMAGE`` (the JPEG) or scikit-image's download cache.

A data set whose files are missing is skipped with a message saying what to install.

Methods:

``muvit``
    The defaults of ``napari-muvit train``: :class:`~napari_muvit.engine.quicktrain.QuickTrainer`
    with the forest pixel head (extremely randomised trees) on the filter bank of the levels' crops (levels 1, 4, 16
    of the bundled encoder), the levels it reads chosen on held-out strokes
    (:func:`~napari_muvit.engine.quicktrain.choose_forest_levels`), and for RGB images its
    filters on CIELAB or on the stain densities, also chosen on held-out strokes; fitted in
    seconds; nothing to fine-tune.
``muvit-rf``
    The same with Breiman's random forest instead of extremely randomised trees
    (:func:`napari_muvit.engine.forests.random_forest`).
``muvit-no-wide``
    The same without the coarse levels' wide filters (head option ``context_sigmas``).
``muvit-stop23``
    The default before stop 24: a random forest without the wide filters.
``muvit-all-levels``
    The same forest always on every level (the default before the level choice).
``muvit-lab``, ``muvit-hed``
    The same forest with its filters always on CIELAB, or always on the stain densities
    (haematoxylin, eosin, DAB), instead of the better of the two on held-out strokes.
``muvit-level1``
    The same forest on level 1 only (the bundled encoder restricted to level 1): what the
    coarse levels' context adds.
``muvit-mlp``
    The previous default: the MLP pixel head on level-1 filters and the encoder's features,
    then fine-tuning of the whole segmenter.
``muvit-unetr``
    The default before that: :class:`~napari_muvit.engine.trainer.Trainer` with a fresh UNETR
    head.
``convpaint``
    napari-convpaint 1.2.0 with the only feature extractor that works offline (``gaussian``:
    its Gaussian filter on an image pyramid, ``fe_scalings`` 1, 2, 4, 8) and its default
    CatBoost classifier (random forest if catboost is missing); its other extractors
    (VGG16, DINOv2, Cellpose, ilastik) need downloads or conda packages.

Usage::

    python benchmarks/bench_scribbles.py --datasets context --budget 180 \\
        --json docs/data/scribbles_context.json
    python benchmarks/bench_scribbles.py --plot docs/images/scribbles.png docs/data/scribbles_context.json docs/data/scribbles_nuclei.json

Prints one line per snapshot; runs torch on ``--threads`` threads (default 2) and records the
machine's load average. Snapshots are scored unblended (overlap 0); ``--cli-defaults`` also
scores the quick fit's and the final model as ``napari-muvit predict`` runs them by default
(its blended overlap: a quarter of the tile for a forest) with their tile seams
(:func:`napari_muvit.metrics.seam_ratio`; the issue asks for at most 1.5).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_muvit.data import PyramidSource
from napari_muvit.data.strokes import simulate_strokes
from napari_muvit.engine.cancel import CancelToken
from napari_muvit.metrics import mean_dice
from napari_muvit.engine.api import predict
from napari_muvit.engine.quicktrain import QuickConfig, QuickTrainer
from napari_muvit.engine.trainer import TrainConfig, Trainer, prepare_start_model


# ------------------------------------------------------------------------------ data
def load_dataset(name: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """``(image, truth, pyramid levels)`` of a data set (truth values 0..K-1)."""
    if name == "context":
        from napari_muvit.data.synthetic import synthetic_field

        im = synthetic_field(grid=1, seed=3)
        return im.image, im.labels.astype(np.int32), list(im.pyramid)
    if name == "nuclei":
        import importlib.util

        import tifffile

        spec = importlib.util.find_spec("stardist")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("nuclei: install the stardist wheel (pip install stardist --no-deps)")
        folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "images"
        image = tifffile.imread(folder / "img2d.tif")
        truth = (tifffile.imread(folder / "mask2d.tif") > 0).astype(np.int32)
        return image, truth, [image]
    if name == "vesicles":
        return _vesicles()
    if name == "food":
        return _food()
    if name == "he-nuclei":
        return _he_nuclei(seed)
    if name == "skin":
        return _skin()
    raise SystemExit(f"unknown data set {name!r} ({', '.join(DATASETS)})")


DATASETS = ("context", "nuclei", "vesicles", "food", "he-nuclei", "skin")
#: GBM40 tiles used by ``he-nuclei`` (stroke seed k -> HE_TILES[k % len])
HE_TILES = ("03", "20", "06", "10", "17", "21", "26", "30", "33")
#: where R keeps the spatstat.data package (Debian's r-cran-spatstat.data, or CRAN's install)
SPATSTAT_DATA = [Path(p) / "spatstat.data" for p in (
    "/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library")]


def _vesicles() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """The EM image of a presynaptic terminal in spatstat.data and its expert outline.

    ``rawdata/vesicles/vesiclesmask.tif`` is the drawn presynapse minus the drawn mitochondrion;
    filling its hole gives the presynapse. Classes: 0 elsewhere, 1 presynaptic cytoplasm,
    2 mitochondrion. Looked for in ``$SPATSTAT_DATA_DIR`` (the ``spatstat.data`` folder), then in
    R's library folders.
    """
    import tifffile
    from scipy import ndimage

    env = os.environ.get("SPATSTAT_DATA_DIR")
    folders = ([Path(env)] if env else []) + SPATSTAT_DATA
    found = next((f / "rawdata" / "vesicles" for f in folders
                  if (f / "rawdata" / "vesicles" / "vesiclesimage.tif").is_file()), None)
    if found is None:
        raise DatasetMissing(
            "vesicles: needs R's spatstat.data (apt-get install r-cran-spatstat.data, or "
            "apt-get download it, dpkg-deb -x it and set SPATSTAT_DATA_DIR=<...>/spatstat.data)")
    image = tifffile.imread(found / "vesiclesimage.tif")
    cytoplasm = tifffile.imread(found / "vesiclesmask.tif") > 0
    presynapse = ndimage.binary_fill_holes(cytoplasm)
    truth = cytoplasm.astype(np.int32) + 2 * (presynapse & ~cytoplasm)
    return image, truth, [image]


def _food() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """napari-convpaint's test photograph (RGB 384×512) and its 4-region ground truth."""
    import importlib.util

    import imageio.v3 as iio

    spec = importlib.util.find_spec("napari_convpaint")
    folder = (Path(list(spec.submodule_search_locations)[0]) / "_tests" / "test_imgs"
              if spec is not None and spec.submodule_search_locations else None)
    if folder is None or not (folder / "0000_ground_truth.png").is_file():
        raise DatasetMissing("food: needs napari-convpaint's wheel (pip install napari-convpaint "
                             "--no-deps), which ships _tests/test_imgs/0000_*.png")
    image = np.ascontiguousarray(iio.imread(folder / "0000_img.png")[..., :3])
    values = iio.imread(folder / "0000_ground_truth.png")
    truth = np.unique(values, return_inverse=True)[1].reshape(values.shape).astype(np.int32)
    return image, truth, [image]


def _he_nuclei(seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A GBM40 H&E tile and its nucleus mask, rasterised from the expert's contour polygons."""
    import xml.etree.ElementTree as ET

    import tifffile
    from skimage.draw import polygon

    folder = Path(os.environ.get("GBM40_DIR", "data/GBM40"))
    tile = HE_TILES[seed % len(HE_TILES)]
    image_path = folder / "raw_image" / f"{tile}.tif"
    contours = folder / "contour_annotation_xml" / f"{tile}_data.xml"
    if not (image_path.is_file() and contours.is_file()):
        raise DatasetMissing(
            "he-nuclei: set GBM40_DIR to the data/GBM40 folder of "
            "https://github.com/pengyzhang/cell_seg_matlab (raw_image/, contour_annotation_xml/)")
    image = np.ascontiguousarray(tifffile.imread(image_path)[..., :3])
    truth = np.zeros(image.shape[:2], np.int32)
    for shape in ET.parse(contours).getroot().iter("Shape"):
        yx = [(float(p.get("Y")), float(p.get("X"))) for p in shape.iter("Point")]
        if len(yx) >= 3:
            rows, cols = polygon(*np.asarray(yx).T, truth.shape)
            truth[rows, cols] = 1
    return image, truth, [image]


def _skin() -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """scikit-image's H&E skin section (960×1280) and its 4-layer map (:func:`skin_layers`)."""
    path = os.environ.get("SKIN_IMAGE")
    if path:
        from PIL import Image

        with Image.open(path) as picture:  # the 2048×1536 original is 1.6× scikit-image's
            image = np.asarray(picture.convert("RGB").resize((1280, 960), Image.LANCZOS))
    else:
        try:
            from skimage.data import skin

            image = skin()
        except Exception as missing:  # noqa: BLE001 - offline, pooch cannot download it
            raise DatasetMissing(
                "skin: set SKIN_IMAGE to Normal_Epidermis_and_Dermis_with_Intradermal_Nevus_"
                "10x.JPG (Wikimedia Commons, public domain), or cache skimage.data.skin() "
                f"({type(missing).__name__})") from None
    image = np.ascontiguousarray(image[..., :3])
    return image, skin_layers(image), [image]


def skin_layers(image: np.ndarray) -> np.ndarray:
    """A layer map of the skin section: 0 background, 1 stratum corneum, 2 epidermis, 3 dermis.

    Not an expert's drawing (none ships offline): derived from the image and checked by eye
    against it (docs/images/skin_layers.jpg). Background: unsaturated bright pixels connected
    to the top edge, once the corneum's basket weave is closed (disk of 9 px). Epidermis: the
    largest region whose CIELAB a* smoothed at σ 6 px exceeds 29 (the valley between the
    epidermis's mode, 36, and the dermis's, 19), holes filled, opened by a disk of 4 px.
    Stratum corneum: tissue above the epidermis in each column. Dermis: the rest.
    """
    from scipy import ndimage as ndi
    from skimage import color, filters, measure, morphology

    rgb = image.astype(np.float64) / 255
    white = (rgb.mean(-1) > 0.6) & (np.ptp(rgb, axis=-1) < 0.09)
    tissue = morphology.opening(morphology.closing(~white, morphology.disk(9)),
                                morphology.disk(3))
    gaps = measure.label(~tissue)
    background = np.isin(gaps, [v for v in np.unique(gaps[0]) if v])

    def largest(mask: np.ndarray) -> np.ndarray:
        regions = measure.label(mask)
        sizes = np.bincount(regions.ravel())
        sizes[0] = 0
        return regions == sizes.argmax()

    redness = filters.gaussian(color.rgb2lab(image)[..., 1], 6)
    epidermis = ndi.binary_fill_holes(largest((redness > 29) & ~background))
    epidermis = largest(morphology.opening(epidermis, morphology.disk(4)))
    top_of_epidermis = np.where(epidermis.any(0), epidermis.argmax(0), image.shape[0])
    above = np.arange(image.shape[0])[:, None] < top_of_epidermis[None, :]
    truth = np.full(image.shape[:2], 3, np.int32)
    truth[above & ~background] = 1
    truth[epidermis] = 2
    truth[background] = 0
    return truth


class DatasetMissing(Exception):
    """A data set's files are not installed (the run skips it with this message)."""


# ------------------------------------------------------------------------------ methods
MUVIT_METHODS: dict[str, dict[str, Any]] = {
    # name: (quick trainer?, pixel classifier, levels of the start model: None = the encoder's)
    "muvit": {"quick": True, "classifier": "forest", "levels": None},
    "muvit-all-levels": {"quick": True, "classifier": "forest", "levels": None,
                         "select_levels": False},
    "muvit-level1": {"quick": True, "classifier": "forest", "levels": "1"},
    "muvit-lab": {"quick": True, "classifier": "forest", "levels": None, "color_space": "lab"},
    "muvit-hed": {"quick": True, "classifier": "forest", "levels": None, "color_space": "hed"},
    "muvit-rf": {"quick": True, "classifier": "forest", "levels": None, "tree_kind": "random"},
    "muvit-no-wide": {"quick": True, "classifier": "forest", "levels": None,
                      "head_options": {"context_sigmas": []}},
    "muvit-stop23": {"quick": True, "classifier": "forest", "levels": None, "tree_kind": "random",
                     "head_options": {"context_sigmas": []}},
    "muvit-mlp": {"quick": True, "classifier": "mlp", "levels": None},
    "muvit-unetr": {"quick": False, "classifier": "forest", "levels": None},
}


def run_muvit(pyramid, strokes, budget: float, method: str, snapshot_every: int) -> list:
    """Snapshots ``(seconds since Train, model copy)`` of a plugin training run."""
    spec = MUVIT_METHODS[method]
    source = PyramidSource(pyramid)
    model, _ = prepare_start_model(levels=spec["levels"])
    with _new_pixel_head_options(spec.get("head_options", {})):
        return _run_muvit(model, source, strokes, budget, spec, snapshot_every)


@contextlib.contextmanager
def _new_pixel_head_options(changes: dict[str, Any]):
    """A method's own options for the new pixel head (ablations of the default)."""
    from napari_muvit.engine import _models

    saved = dict(_models.NEW_PIXEL_HEAD_OPTIONS)
    _models.NEW_PIXEL_HEAD_OPTIONS.update(changes)
    try:
        yield
    finally:
        _models.NEW_PIXEL_HEAD_OPTIONS.clear()
        _models.NEW_PIXEL_HEAD_OPTIONS.update(saved)


def _run_muvit(model, source, strokes, budget: float, spec: dict[str, Any],
               snapshot_every: int) -> list:
    cancel = CancelToken()
    snaps: list[tuple[float, float, str, Any]] = []
    start, wall = time.process_time(), time.monotonic()

    steps: list[int] = []

    def keep(m: Any, info: dict) -> None:
        cpu = time.process_time() - start
        if info["stage"] == "final" and steps and steps[-1] == info.get("step"):
            return  # nothing was fine-tuned since the last snapshot: the same answer
        steps.append(info.get("step", -1))
        snaps.append((cpu, time.monotonic() - wall, info["stage"], m))
        if cpu > budget:
            cancel.cancel()

    cfg = TrainConfig(steps=100_000, device="cpu", checkpoint_every=1e9,
                      classifier=spec["classifier"], color_space=spec.get("color_space", "auto"))
    if spec["quick"]:
        quick = QuickConfig(snapshot_every=snapshot_every,
                            select_levels=spec.get("select_levels", True),
                            tree_kind=spec.get("tree_kind", QuickConfig.tree_kind))
        QuickTrainer(model, [(source, strokes)], cfg, quick, on_snapshot=keep,
                     cancel=cancel).run()
    else:
        trainer: Trainer

        def progress(info: dict) -> None:
            step = int(info["step"])
            if info.get("status") == "running" and step % snapshot_every == 0:
                keep(trainer.snapshot(), {"stage": "unetr"})

        start, wall = time.process_time(), time.monotonic()
        trainer = Trainer(model, [(source, strokes)], cfg, progress=progress, cancel=cancel)
        trainer.run()
    return snaps


def _import_convpaint_without_deep_extractors() -> None:
    """Make convpaint's Gaussian extractor importable without timm/torchvision.

    ``napari_convpaint.feature_extractors/__init__.py`` imports every extractor, and the deep
    ones need timm and torchvision (no offline CPU build matches this torch). Registering the
    sub-package without running its ``__init__`` lets convpaint import ``gaussian.py`` (numpy
    and scikit-image only) itself; the deep extractors then fail to register, with a warning.
    """
    import importlib.util
    import types

    name = "napari_convpaint.feature_extractors"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec("napari_convpaint")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("convpaint: pip install napari-convpaint --no-deps (and catboost)")
    package = types.ModuleType(name)
    package.__path__ = [str(Path(list(spec.submodule_search_locations)[0]) / "feature_extractors")]
    sys.modules[name] = package


def run_convpaint(image, strokes, classifier: str) -> tuple[float, float, np.ndarray, str]:
    """(CPU and wall seconds to train and segment, labels, setting) of napari-convpaint."""
    _import_convpaint_without_deep_extractors()
    from napari_convpaint.convpaint_model import ConvpaintModel

    use_rf = classifier == "rf"
    if not use_rf:
        try:
            import catboost  # noqa: F401
        except ImportError:
            use_rf = True
    cp = ConvpaintModel(fe_name="gaussian_features")
    cp.set_params(fe_scalings=[1, 2, 4, 8], channel_mode="rgb" if image.ndim == 3 else "single")
    img = np.moveaxis(image, -1, 0) if image.ndim == 3 else image
    t0, w0 = time.process_time(), time.monotonic()
    with contextlib.redirect_stdout(io.StringIO()):  # CatBoost prints every iteration
        cp.train(img, strokes, use_rf=use_rf)
    seg = cp.segment(img)
    setting = f"gaussian FE, scalings 1,2,4,8, {'random forest' if use_rf else 'CatBoost'}"
    return time.process_time() - t0, time.monotonic() - w0, np.asarray(seg), setting


# ------------------------------------------------------------------------------ main
def evaluate(model: Any, pyramid, truth: np.ndarray) -> float:
    lab = predict(PyramidSource(pyramid), model, device="cpu")
    return mean_dice(lab, truth + 1)


def evaluate_at_cli_defaults(model: Any, pyramid, truth: np.ndarray,
                             overlap: int | None = None) -> dict[str, float]:
    """The prediction ``napari-muvit predict`` makes by default (its blended overlap) scored,
    and its tile seams measured two ways:

    * ``seam_ratio``: label changes across tile borders / inside tiles (the issue's measure,
      goal ≤ 1.5), beside ``truth_seam_ratio``, the same of the ground truth on the same grid:
      what the image's own structure gives without any tiling;
    * ``seam_disagreement`` / ``inside_disagreement``: the fraction of pixels within 2 px of a
      seam (8+ px inside a tile) whose label differs from a prediction in 4× larger tiles.

    ``overlap`` replaces the default overlap (to compare settings).
    """
    from napari_muvit.engine.predictor import default_overlap, tile_size_of
    from napari_muvit.metrics import seam_ratio

    tile = tile_size_of(model, None)
    overlap = default_overlap(tile, model) if overlap is None else int(overlap)
    step = tile - overlap
    source = PyramidSource(pyramid)
    lab = predict(source, model, device="cpu", overlap=overlap)
    large = predict(source, model, device="cpu", tile_size=4 * tile,
                    overlap=default_overlap(4 * tile, model))
    rows, cols = np.ogrid[: lab.shape[0], : lab.shape[1]]
    seam = np.minimum(np.minimum(rows % step, step - 1 - rows % step),
                      np.minimum(cols % step, step - 1 - cols % step))
    differs = lab != large
    return {"mdsc": round(mean_dice(lab, truth + 1), 4), "overlap": overlap,
            "seam_ratio": round(seam_ratio(lab, step)["ratio"], 3),
            "truth_seam_ratio": round(seam_ratio(truth + 1, step)["ratio"], 3),
            "seam_disagreement": round(float(differs[seam < 2].mean()), 5),
            "inside_disagreement": round(float(differs[seam >= 8].mean()), 5)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["context", "nuclei"], choices=DATASETS)
    p.add_argument("--methods", nargs="+", default=["muvit", "muvit-unetr", "convpaint"],
                   choices=[*MUVIT_METHODS, "convpaint"])
    p.add_argument("--budget", type=float, default=180.0, help="training seconds per run")
    p.add_argument("--strokes", type=int, default=6, help="strokes per class")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="stroke seeds")
    p.add_argument("--snapshot-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cli-defaults", action="store_true",
                   help="also score the trained model as `napari-muvit predict` runs it (blended "
                        "overlap) and its tile seams (border/interior label-change ratio)")
    p.add_argument("--cli-overlap", type=int, default=None, metavar="PX",
                   help="with --cli-defaults: this overlap instead of the CLI's default")
    p.add_argument("--json", type=Path)
    p.add_argument("--truth-figure", type=Path, metavar="PNG",
                   help="write the first data set's image with its ground truth's borders "
                        "(green) at half size, and exit")
    p.add_argument("--plot", type=Path, help="write a PNG of the curves in the given JSON files")
    p.add_argument("inputs", nargs="*", type=Path, help="JSON files for --plot")
    args = p.parse_args(argv)
    if args.plot:
        plot([json.loads(f.read_text()) for f in args.inputs], args.plot)
        return 0
    if args.truth_figure:
        image, truth, _ = load_dataset(args.datasets[0])
        write_truth_figure(image, truth, args.truth_figure)
        return 0
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "script": "benchmarks/bench_scribbles.py",
        "command": "python benchmarks/bench_scribbles.py " + " ".join(sys.argv[1:]),
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "load_average_start": os.getloadavg(),
        "runs": [],
    }
    for ds, seed in ((d, s) for d in args.datasets for s in args.seeds):
        try:
            image, truth, pyramid = load_dataset(ds, seed)
        except DatasetMissing as missing:
            print(f"[{ds}] skipped: {missing}", flush=True)
            result.setdefault("skipped", {})[ds] = str(missing)
            continue
        strokes = simulate_strokes(truth, strokes_per_class=args.strokes, seed=seed)
        painted = {int(v): int(n) for v, n in enumerate(np.bincount(strokes.ravel())) if v and n}
        print(f"[{ds}] seed {seed}: image {image.shape}, painted pixels per label {painted}",
              flush=True)
        tile = {"tile": HE_TILES[seed % len(HE_TILES)]} if ds == "he-nuclei" else {}
        for method in args.methods:
            run: dict[str, Any] = {"dataset": ds, "method": method, "seed": seed,
                                   "painted": painted, "curve": [], **tile}
            if method == "convpaint":
                seconds, wall, seg, setting = run_convpaint(image, strokes, "catboost")
                score = mean_dice(seg, truth + 1)
                run["setting"] = setting
                run["curve"].append({"seconds": round(seconds, 2), "wall": round(wall, 2),
                                     "mdsc": round(score, 4)})
                print(f"[{ds}] {method}: {seconds:.1f} CPU s ({wall:.1f} s wall) mDSC "
                      f"{score:.3f} ({setting})", flush=True)
            else:
                snaps = run_muvit(pyramid, strokes, args.budget, method, args.snapshot_every)
                for seconds, wall, stage, model in snaps:
                    t0 = time.process_time()
                    score = evaluate(model, pyramid, truth)
                    predict_cpu = time.process_time() - t0
                    point = {"seconds": round(seconds, 2), "wall": round(wall, 2),
                             "stage": stage, "mdsc": round(score, 4),
                             "predict_cpu_s": round(predict_cpu, 2)}
                    if args.cli_defaults and stage in ("quick", "final"):
                        point["cli_defaults"] = evaluate_at_cli_defaults(
                            model, pyramid, truth, args.cli_overlap)
                        print(f"[{ds}] {method} {stage} at the CLI's default overlap: "
                              f"{point['cli_defaults']}", flush=True)
                    read = model.head_options.get("forest_levels")
                    if read is not None:  # the levels the forest chose to read
                        point["forest_levels"] = list(model.levels)[:read]
                        point["sub_forests"] = model.head_options.get("forest_sub_levels")
                    run["curve"].append(point)
                    print(f"[{ds}] {method} {stage}: {seconds:.1f} CPU s ({wall:.1f} s wall) "
                          f"mDSC {score:.3f} (predicting the image: {predict_cpu:.1f} CPU s)"
                          + (f", forest on levels {point['forest_levels']} (sub-forests on "
                             f"{point['sub_forests']} levels)" if read else ""),
                          flush=True)
            result["runs"].append(run)
    result["load_average_end"] = os.getloadavg()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def write_truth_figure(image: np.ndarray, truth: np.ndarray, out: Path) -> None:
    """The image (RGB or grey) with the borders of its ground truth's regions in green."""
    import imageio.v3 as iio
    from skimage.segmentation import find_boundaries

    rgb = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
    rgb = np.array(rgb, np.uint8)
    rgb[find_boundaries(truth, mode="thick")] = (0, 220, 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(out, rgb[::2, ::2])


def plot(results: list[dict], out: Path) -> None:
    """mDSC against seconds, one panel per data set; a run of a later file replaces an earlier
    file's run of the same data set, method and seed (a re-measured method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latest = {(r["dataset"], r["method"], r["seed"]): r for res in results for r in res["runs"]}
    runs = list(latest.values())
    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 3.6), squeeze=False)
    methods = sorted({r["method"] for r in runs})
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for ax, ds in zip(axes[0], datasets):
        labelled: set[str] = set()
        for r in (r for r in runs if r["dataset"] == ds):
            xs = [c["seconds"] for c in r["curve"]]
            ys = [c["mdsc"] for c in r["curve"]]
            style = "o" if len(xs) == 1 else ".-"
            label = None if r["method"] in labelled else r["method"]  # one entry per method
            labelled.add(r["method"])
            ax.plot(xs, ys, style, color=colours[r["method"]], label=label, alpha=0.8)
        ax.set_title(ds)
        ax.set_xlabel("CPU seconds since Train")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_ylabel("mDSC")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    sys.exit(main())

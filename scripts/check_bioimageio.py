"""Export the bundled model as a bioimage.io package and check it with the bioimage.io tools.

    python scripts/check_bioimageio.py --out docs/data/bioimageio.json

Writes the package to a temporary folder, validates it with ``bioimageio.spec``, runs
``bioimageio.core``'s model test (both weight formats), loads it back with
``napari_muvit.load_model`` and compares whole-image predictions with the original model on
a 512² Synthetic rings field. The JSON records versions, statuses, sizes and seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: print only)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import bioimageio.core
    import bioimageio.spec

    import napari_muvit as nm
    from napari_muvit.data import PyramidSource
    from napari_muvit.data.samples import synthetic_sample_image

    result: dict = {
        "command": "python scripts/check_bioimageio.py --out docs/data/bioimageio.json",
        "versions": {"napari_muvit": nm.__version__, "torch": torch.__version__,
                     "bioimageio.spec": bioimageio.spec.__version__,
                     "bioimageio.core": bioimageio.core.__version__, "python": platform.python_version()},
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch_threads": 1,
    }
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        package = nm.export_bioimageio(None, Path(tmp) / "muvit_rings.zip")
        result["export_s"] = round(time.perf_counter() - t, 1)
        result["package_bytes"] = package.stat().st_size
        t = time.perf_counter()
        summary = bioimageio.spec.load_description(str(package)).validation_summary
        result["spec_validation"] = {"status": summary.status,
                                     "warnings": sorted({d.name for d in summary.details if d.status != "passed"}
                                                        | {w.msg for d in summary.details for w in d.warnings}),
                                     "seconds": round(time.perf_counter() - t, 1)}
        t = time.perf_counter()
        test = bioimageio.core.test_model(str(package))
        result["core_test"] = {"status": test.status,
                               "checks": [f"{d.status}: {d.name}" for d in test.details],
                               "seconds": round(time.perf_counter() - t, 1)}
        t = time.perf_counter()
        loaded = nm.load_model(package)
        result["load_s"] = round(time.perf_counter() - t, 2)
        syn = synthetic_sample_image(size=512, seed=11)
        source = PyramidSource(syn.pyramid, downsample_factors=list(syn.factors))
        a = nm.predict(source, model=loaded, device="cpu")
        b = nm.predict(source, model=None, device="cpu")
        result["round_trip"] = {"image": "synthetic_sample_image(size=512, seed=11)",
                                "identical_labels": bool(np.array_equal(a, b)),
                                "pixels": int(a.size)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

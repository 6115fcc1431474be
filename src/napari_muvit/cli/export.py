"""``napari-muvit export``: write a segmenter as a bioimage.io model package (spec 0.5).

Examples::

    napari-muvit export --out muvit_rings.zip                  # the bundled model
    napari-muvit export my_model/ --out my_model.zip --image slide.ome.zarr \\
        --name "MuViT kidney glomeruli" --author "Ada Lovelace" --validation scores.md

The zip passes ``bioimageio.spec`` validation and ``bioimageio.core``'s model test; load it
back with ``napari_muvit.load_model("my_model.zip")`` or ``--model my_model.zip``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from napari_muvit.errors import InputError


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``export`` sub-command."""
    p = subparsers.add_parser(
        "export",
        help="write a model as a bioimage.io package (zip)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="segmenter folder or package (default: the bundled model)")
    p.add_argument("--out", metavar="NAME.zip", required=True, help="package file to write")
    p.add_argument("--image", metavar="IMAGE", default=None,
                   help="image the test tile is cut from (default: the Synthetic rings sample)")
    p.add_argument("--name", default=None, help="model name shown on bioimage.io")
    p.add_argument("--description", default=None, help="one-sentence description")
    p.add_argument("--author", action="append", default=None, metavar="NAME",
                   help="an author (repeat for several; default: napari-muvit developers)")
    p.add_argument("--license", default="BSD-3-Clause", help="SPDX licence id (default BSD-3-Clause)")
    p.add_argument("--validation", metavar="FILE.md", default=None,
                   help="markdown for the '# Validation' section (default: the model folder's "
                        "validation.md, else what training recorded)")
    p.add_argument("--no-torchscript", action="store_true",
                   help="only pytorch_state_dict weights (skip tracing)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute ``export``; user errors raise MuViTError (one line, exit 2)."""
    from pathlib import Path

    from napari_muvit.export import export_bioimageio

    validation = None
    if args.validation is not None:
        vpath = Path(args.validation)
        if not vpath.is_file():
            raise InputError(f"--validation {args.validation!r}: no such file")
        validation = vpath.read_text(encoding="utf-8")
    out = export_bioimageio(
        args.model, args.out, image=args.image, name=args.name, description=args.description,
        authors=args.author, license=args.license, validation=validation,
        torchscript=not args.no_torchscript, overwrite=args.overwrite,
    )
    print(out)
    print(f"napari-muvit export: wrote {out}", file=sys.stderr)
    return 0

"""The ``napari-muvit`` command line.

Each sub-command lives in its own module exposing ``register(subparsers)``, which adds an
argparse parser whose ``func`` default is called with the parsed arguments and returns the exit
code.  User errors (:class:`~napari_muvit.errors.MuViTError`) become a one-line message and
exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from napari_muvit import __version__
from napari_muvit.errors import MuViTError

SUBCOMMAND_MODULES = ("demo", "predict", "train")
SUBCOMMAND_MODULES += ("export",)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command registered."""
    parser = argparse.ArgumentParser(
        prog="napari-muvit",
        description="MuViT multi-resolution segmentation of large microscopy images.",
    )
    parser.add_argument("--version", action="version", version=f"napari-muvit {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = import_module(f"napari_muvit.cli.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"napari_muvit.cli.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except MuViTError as err:
        print(f"napari-muvit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"napari-muvit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

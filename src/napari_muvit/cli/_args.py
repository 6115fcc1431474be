"""argparse value types shared by the sub-commands (messages name the expected value)."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from napari_muvit.errors import InputError


def number_at_least(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], float]:
    """An argparse ``type=``: a ``kind`` (``int`` or ``float``) ``>= minimum`` (``>`` if strict)."""
    noun = "an integer" if kind is int else "a number"
    expected = f"{noun} {'>' if strict else '>='} {minimum:g}"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = number_at_least(int, 1)
non_negative_int = number_at_least(int, 0)
positive_float = number_at_least(float, 0, strict=True)


def parse_region(text: str, option: str = "--region") -> list[list[float]]:
    """``"y0,x0,y1,x1"`` -> ``[[y0, x0], [y1, x1]]`` in world pixels (``option`` names the flag in
    errors). Fractional edges are allowed: the engine widens a region to whole pixels
    (:func:`~napari_muvit.data.geometry.clip_region`)."""
    try:
        y0, x0, y1, x1 = (float(p) for p in text.split(","))
    except ValueError:
        raise InputError(f"{option}: expected four numbers y0,x0,y1,x1, got {text!r}") from None
    if y1 <= y0 or x1 <= x0:
        raise InputError(f"{option}: expected y0 < y1 and x0 < x1, got {text!r} (empty region)")
    return [[y0, x0], [y1, x1]]

"""argparse value types shared by the sub-commands (messages name the expected value)."""

from __future__ import annotations

import argparse
from collections.abc import Callable


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

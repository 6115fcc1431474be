"""Reliability table: faults tried on real runs, what the user sees, what is preserved.

Run ``python benchmarks/reliability.py`` (a few minutes on 2 cores); it writes
``docs/data/reliability.json`` and prints the Markdown table of ``docs/reliability.md``.

Row format (shared with ``benchmarks/_reliability_train.py``, whose ``cases()`` returns a list
of such rows for the training half). One row per fault, a plain JSON-serialisable dict::

    {
        "area": "predict",            # "predict", "train", "input" or "model folder"
        "fault": "kill -9 at a random moment",          # what was done to the run
        "how": "napari-muvit predict a.npy --out S.zarr, SIGKILL after U(0.5, 8) s, rerun",
        "trials": 20,                 # how many times it was tried
        "passed": 20,                 # trials whose outcome met the expectation
        "user_sees": "exit -9; the rerun resumes and exits 0",   # message / exit code
        "preserved": "resumed labels bit-identical to an uninterrupted run",
        "ok": True,                   # passed == trials
        "details": {},                # optional numbers (JSON-serialisable)
    }

Use :func:`row` to build one (it checks the fields).
"""

from __future__ import annotations

from typing import Any

AREAS = ("predict", "train", "input", "model folder")
FIELDS = ("area", "fault", "how", "trials", "passed", "user_sees", "preserved", "ok", "details")


def row(area: str, fault: str, how: str, trials: int, passed: int, user_sees: str,
        preserved: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row in the shared format (``ok`` is derived: every trial passed)."""
    if area not in AREAS:
        raise ValueError(f"area: expected one of {AREAS}, got {area!r}")
    if not 0 <= passed <= trials or trials < 1:
        raise ValueError(f"trials/passed: expected 0 <= passed <= trials, got {passed}/{trials}")
    return {
        "area": area, "fault": fault, "how": how, "trials": int(trials), "passed": int(passed),
        "user_sees": user_sees, "preserved": preserved, "ok": passed == trials,
        "details": dict(details or {}),
    }

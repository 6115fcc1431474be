"""Shared test configuration.

Tests run on a 2-core CPU: keep torch to the cores we have and make every test deterministic.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("NAPARI_MUVIT_SETTINGS_DIR", str(Path(__file__).parent / ".settings-unused"))

import torch  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (scripts, not a package), for tests of their
    helpers."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO_ROOT / "benchmarks"
                                                  / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the like look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


# Checkpoints and reference outputs saved by the official muvit 0.1.0 (see their README):
# kept in the repository so that a fresh clone runs the parity tests.
OFFICIAL_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "muvit-official"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Deterministic, single-threaded torch in every test.

    The tiny test models are dominated by per-op overhead: on a loaded 2-core runner 2 threads
    were measured 10-30x slower than 1, and one thread leaves a core to napari's event loop.
    """
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _own_settings(tmp_path, monkeypatch):
    """Widget settings in a fresh folder: no test sees another test's choices."""
    monkeypatch.setenv("NAPARI_MUVIT_SETTINGS_DIR", str(tmp_path / "settings"))


@pytest.fixture
def official_fixtures() -> Path:
    assert OFFICIAL_FIXTURES.exists(), f"official muvit fixtures missing from {OFFICIAL_FIXTURES}"
    return OFFICIAL_FIXTURES


@pytest.fixture(scope="session")
def table4():
    """``experiments/synthetic_table4.py`` imported as a module (it is a script, not a package)."""
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "experiments" / "synthetic_table4.py"
    spec = importlib.util.spec_from_file_location("synthetic_table4", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["synthetic_table4"] = module  # dataclasses/pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop("synthetic_table4", None)
    return module


def pytest_sessionfinish(session, exitstatus) -> None:
    """Let cancelled widget workers end before the interpreter does: a worker that emits into
    Qt objects already torn down at exit makes PyQt abort the process (exit 134) after every
    test passed."""
    import sys

    if "qtpy" not in sys.modules:
        return
    from qtpy.QtCore import QThreadPool

    QThreadPool.globalInstance().waitForDone(60_000)

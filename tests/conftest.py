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

# One thread: the small test models are dominated by per-op overhead, and 2 threads on a
# loaded 2-core runner were measured 10-30x slower than 1 for them.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
OFFICIAL_FIXTURES = SHARED / "fixtures" / "muvit-official"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def official_fixtures() -> Path:
    if not OFFICIAL_FIXTURES.exists():
        pytest.skip(f"official muvit fixtures not found at {OFFICIAL_FIXTURES}")
    return OFFICIAL_FIXTURES

"""Packaging: manifest, console script, lazy imports."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO_ROOT


def test_manifest_lives_in_the_package_once_and_its_commands_resolve() -> None:
    """One napari.yaml: the packaged one that the npe2 entry point names; every command's
    ``python_name`` imports (widgets included, after any module renames)."""
    import importlib

    import yaml

    packaged = REPO_ROOT / "src" / "napari_muvit" / "napari.yaml"
    assert packaged.is_file()
    assert not (REPO_ROOT / "napari.yaml").exists(), "keep a single manifest (the packaged one)"
    assert 'napari-muvit = "napari_muvit:napari.yaml"' in (REPO_ROOT / "pyproject.toml").read_text()
    manifest = yaml.safe_load(packaged.read_text())
    names = [c["python_name"] for c in manifest["contributions"]["commands"]]
    assert "napari_muvit.widgets:PredictWidget" in names
    assert "napari_muvit.widgets:TrainWidget" in names
    for name in names:
        module, _, attr = name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), name


def test_npe2_validates_manifest() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "napari-muvit"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def _run_python(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (a clean ``sys.modules``)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_import_does_not_import_torch_or_qt() -> None:
    result = _run_python(
        "import sys, napari_muvit; "
        "bad = [m for m in ('torch', 'qtpy', 'PyQt5', 'napari') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cli_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "napari_muvit", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert result.stdout.strip().startswith("napari-muvit 0.")


def test_entry_point_functions_are_one_object_wherever_imported_from() -> None:
    result = _run_python(
        "import inspect, napari_muvit as nm, napari_muvit.engine as eng; "
        "from napari_muvit.engine import predictor, trainer, pretrainer; "
        "assert all(inspect.isfunction(getattr(nm, n)) for n in ('predict', 'train', 'pretrain')); "
        "assert nm.predict is eng.predict is predictor.predict; "
        "assert nm.train is eng.train is trainer.train; "
        "assert nm.pretrain is eng.pretrain is pretrainer.pretrain"
    )
    assert result.returncode == 0, result.stderr


def test_status_line_throttles_in_logs_and_always_draws_the_final_line() -> None:
    import io

    from napari_muvit.cli._terminal import StatusLine, clock

    assert clock(75) == "01:15" and clock(3725) == "1:02:05"
    stream = io.StringIO()  # not a terminal: one line per log_interval, plus the final one
    line = StatusLine(stream, log_interval=3600)
    drawn = [line.due() for _ in range(5)] + [line.due(final=True)]
    assert drawn == [True, False, False, False, False, True]
    line.write("a")
    line.close()
    assert stream.getvalue() == "a\n"

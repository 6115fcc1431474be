"""Packaging: manifest, console script, lazy imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "src" / "napari_muvit"
GUI_MODULES = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "superqt", "magicgui", "vispy",
               "napari")


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
        "from napari_muvit.engine import api, pretrainer; "
        "assert all(inspect.isfunction(getattr(nm, n)) for n in ('predict', 'train', 'pretrain')); "
        "assert nm.predict is eng.predict is api.predict; "
        "assert nm.train is eng.train is api.train; "
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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Every module of the package -> the modules it imports, at any depth of the file
    (function-level imports included), ``from pkg import submodule`` resolved to the submodule."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                deps.add(base)
                deps.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One import cycle among ``nodes``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node] & nodes):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(nodes):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_import_graph_layers_are_acyclic_and_free_of_gui() -> None:
    """model/, data/ and engine/ never import Qt or napari (not even inside a function); the
    modules of model/ and of engine/ import each other downward only (no cycle, deferred
    imports included); model/ and data/ know nothing of engine/, widgets/ or cli/."""
    graph = _import_graph()
    assert "napari_muvit.engine.api" in graph and "napari_muvit.engine.predictor" in graph
    core = {m for m in graph if m.split(".")[1:2] in (["model"], ["data"], ["engine"])}
    for module in sorted(core):
        gui = sorted(d for d in graph[module] if d.split(".")[0] in GUI_MODULES)
        assert not gui, f"{module} imports {gui}"
    for layer in ("model", "engine"):
        # the package __init__ resolves names lazily (by string) and is not part of the graph
        members = {m for m in graph if m.startswith(f"napari_muvit.{layer}.")}
        assert len(members) > 5
        cycle = _cycle(graph, members)
        assert cycle is None, f"import cycle in {layer}/: {' -> '.join(cycle)}"
    above = {"engine", "widgets", "cli"}
    for module in (m for m in core if m.split(".")[1] in ("model", "data")):
        upward = sorted(d for d in graph[module]
                        if d.startswith("napari_muvit.") and d.split(".")[1] in above)
        assert not upward, f"{module} imports {upward}"
    # data/ reads pixels and knows no model: it imports nothing of the project but these
    for module in (m for m in core if m.split(".")[1] == "data"):
        foreign = sorted(d for d in graph[module] if d.startswith("napari_muvit.")
                         and d.split(".")[1] not in ("data", "errors", "files"))
        assert not foreign, f"{module} imports {foreign}"


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph, set(graph)) == ["a", "b", "c", "a"]
    assert _cycle(graph, {"a", "b", "d"}) is None

"""The documentation's numbers are reproducible: the convention at the top of docs/benchmarks.md.

* every result file ``docs/data/*.json`` a page cites exists, parses, names the script that
  wrote it, and that script is in the repository; none lies there uncited;
* every script or test a page names exists, and every relative link resolves;
* every ``##`` section of the measurement pages whose tables hold numbers names a command (a
  script in ``benchmarks/`` or ``experiments/``, or a test);
* a table after ``<!-- rows: docs/data/NAME.json#TABLE -->`` holds the header and every row of
  ``tables[TABLE]`` of that file, cell for cell;
* on the results page every table with numbers is such a checked table, lies in a section
  that cites its result file, or is marked ``<!-- settings: tests/test_NAME.py -->`` (settings,
  not measurements, and the test that checks them).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DATA = DOCS / "data"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
# pages whose tables report measurements: each of their sections must name its command
MEASUREMENT_PAGES = [DOCS / "benchmarks.md", DOCS / "results.md", DOCS / "model-card.md"]

DATA_REF = re.compile(r"docs/data/[\w.-]+\.json")
SCRIPT_REF = re.compile(r"(?<![\w/.-])((?:benchmarks|experiments|scripts|tests)/[\w/.-]+\.py)")
COMMAND = re.compile(r"(?:benchmarks|experiments)/\w+\.py|tests/test_\w+\.py")
ROWS_MARKER = re.compile(r"<!--\s*rows:\s*(docs/data/[\w.-]+\.json)#([\w/.-]+)\s*-->")
SETTINGS_MARKER = re.compile(r"<!--\s*settings:\s*(tests/test_\w+\.py)\s*-->")
# pages of results: every number in a table comes from a committed result file
RESULT_PAGES = [DOCS / "results.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _cells(line: str) -> list[str]:
    """Cells of a markdown table row, without emphasis markers or surrounding spaces."""
    return [c.replace("**", "").strip() for c in line.strip().strip("|").split("|")]


def _table_after(lines: list[str], start: int) -> list[list[str]]:
    """The markdown table that starts at or after line ``start`` (separator row dropped)."""
    i = start
    while i < len(lines) and not lines[i].lstrip().startswith("|"):
        if lines[i].strip():
            return []  # something other than a table follows the marker
        i += 1
    rows = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        cells = _cells(lines[i])
        if not all(re.fullmatch(r":?-+:?", c) for c in cells):
            rows.append(cells)
        i += 1
    return rows


def _sections(text: str) -> list[tuple[str, str]]:
    """``(heading, body)`` per ``##`` section (``###`` subsections belong to their section)."""
    parts = re.split(r"^(## .*)$", text, flags=re.M)
    return [(parts[i].strip(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def _data_files() -> list[Path]:
    return sorted(DATA.glob("*.json"))


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_cited_result_files_exist(page: Path) -> None:
    for ref in set(DATA_REF.findall(_text(page))):
        assert (ROOT / ref).is_file(), f"{_rel(page)} cites {ref}, which does not exist"


@pytest.mark.parametrize("data", _data_files(), ids=lambda p: p.name)
def test_result_files_name_a_committed_script_and_are_cited(data: Path) -> None:
    content = json.loads(data.read_text(encoding="utf-8"))
    assert isinstance(content.get("command"), str) and content["command"], (
        f"{data.name}: no 'command' (the command line that wrote it)"
    )
    script = content.get("script")
    assert script and (ROOT / script).is_file(), f"{data.name}: script {script!r} not in the repo"
    for name, rows in content.get("tables", {}).items():
        assert rows and all(isinstance(r, list) and all(isinstance(c, str) for c in r)
                            for r in rows), f"{data.name}: tables[{name!r}] is not rows of text"
    cited_by = [p for p in PAGES if f"docs/data/{data.name}" in _text(p)]
    assert cited_by, f"docs/data/{data.name} is cited by no page (README.md, docs/*.md)"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_named_scripts_and_links_exist(page: Path) -> None:
    text = _text(page)
    for script in set(SCRIPT_REF.findall(text)):
        assert (ROOT / script).is_file(), f"{_rel(page)} names {script}, which does not exist"
    for target in set(LINK.findall(text)):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # web link or anchor
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{_rel(page)} links to {target}, which does not exist"


@pytest.mark.parametrize("page", MEASUREMENT_PAGES, ids=_rel)
def test_every_section_with_numbers_names_its_command(page: Path) -> None:
    for heading, body in _sections(_text(page)):
        numbered = [line for line in body.splitlines()
                    if line.lstrip().startswith("|") and re.search(r"\d", line)
                    and not re.fullmatch(r"[\s|:-]+", line)]
        if numbered:
            assert COMMAND.search(body), (
                f"{_rel(page)}, section {heading!r}: its tables hold numbers but it names no "
                f"command (a script in benchmarks/ or experiments/, or tests/test_*.py)"
            )


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_marked_tables_match_their_result_files(page: Path) -> None:
    lines = _text(page).splitlines()
    for i, line in enumerate(lines):
        match = ROWS_MARKER.search(line)
        if not match:
            continue
        ref, table = match.groups()
        tables = json.loads((ROOT / ref).read_text(encoding="utf-8")).get("tables", {})
        assert table in tables, f"{_rel(page)} line {i + 1}: {ref} has no table {table!r}"
        expected = [[c.replace("**", "").strip() for c in row] for row in tables[table]]
        shown = _table_after(lines, i + 1)
        assert shown, f"{_rel(page)} line {i + 1}: no table follows the marker"
        assert shown[0] == expected[0], f"{_rel(page)} line {i + 1}: header differs from {ref}"
        for row in expected[1:]:
            assert row in shown[1:], (
                f"{_rel(page)} line {i + 1}: row {row} of {ref}#{table} is not in the table"
            )


def _numeric_tables(text: str) -> list[tuple[str, list[str], list[str]]]:
    """``(section heading, the non-empty lines around the table: before, after)`` of every
    table whose rows hold numbers; "around" is the paragraph before it and the two after."""
    found = []
    for heading, body in _sections(text):
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].lstrip().startswith("|"):
                i += 1
                continue
            start = i
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                i += 1
            rows = [ln for ln in lines[start:i] if not re.fullmatch(r"[\s|:-]+", ln)]
            if any(re.search(r"\d", ln) for ln in rows):
                before = _paragraphs(lines[:start][::-1], 1)[::-1]
                after = _paragraphs(lines[i:], 2)
                found.append((heading, before, after))
    return found


def _paragraphs(lines: list[str], count: int) -> list[str]:
    """The non-empty lines of the first ``count`` paragraphs of ``lines`` (up to a table)."""
    out: list[str] = []
    seen = 0
    for line in lines:
        if line.lstrip().startswith("|"):
            break
        if not line.strip():
            seen += bool(out)
            if seen >= count:
                break
            continue
        out.append(line)
    return out


def _table_has_a_source(before: list[str], after: list[str]) -> bool:
    """Checked rows, settings checked by an existing test, or a result file cited next to it."""
    if before and ROWS_MARKER.search(before[-1]):
        return True
    settings = SETTINGS_MARKER.search(before[-1]) if before else None
    if settings:
        return (ROOT / settings.group(1)).is_file()
    return any(DATA_REF.search(line) for line in before + after)


@pytest.mark.parametrize("page", RESULT_PAGES, ids=_rel)
def test_every_results_table_comes_from_a_result_file(page: Path) -> None:
    tables = _numeric_tables(_text(page))
    assert tables
    for heading, before, after in tables:
        assert _table_has_a_source(before, after), (
            f"{_rel(page)}, section {heading!r}: a table with numbers that is neither checked "
            "against docs/data (<!-- rows: -->), nor next to a sentence citing its docs/data "
            "result file, nor marked <!-- settings: tests/test_NAME.py -->"
        )


def test_the_results_table_check_sees_a_table_without_a_source() -> None:
    page = "## Numbers\n\nText.\n\n| run | score |\n|---|---|\n| a | 0.9 |\n\nMore.\n"
    (_, before, after), = _numeric_tables(page)
    assert not _table_has_a_source(before, after)
    cited = page + "\nFrom `docs/data/demo.json`.\n"
    assert _table_has_a_source(*_numeric_tables(cited)[0][1:])
    far = page + "\nA.\n\nB.\n\nFrom `docs/data/demo.json`.\n"  # a later paragraph's
    assert not _table_has_a_source(*_numeric_tables(far)[0][1:])
    marked = page.replace("| run |", "<!-- settings: tests/test_docs.py -->\n| run |")
    assert _table_has_a_source(*_numeric_tables(marked)[0][1:])
    wrong = page.replace("| run |", "<!-- settings: tests/test_nothing.py -->\n| run |")
    assert not _table_has_a_source(*_numeric_tables(wrong)[0][1:])


def test_the_checks_see_a_wrong_number() -> None:
    """The row check compares numbers, not just shapes: one changed digit is caught."""
    content = json.loads((DATA / "model_size.json").read_text(encoding="utf-8"))
    row = content["tables"]["heads"][1]
    page = _text(DOCS / "benchmarks.md").splitlines()
    marker = next(i for i, line in enumerate(page) if "model_size.json#heads" in line)
    shown = _table_after(page, marker + 1)
    assert row in shown
    tampered = [*row[:-1], row[-1] + "1"]
    assert tampered not in shown


def test_code_cites_only_docs_that_exist() -> None:
    """Comments and docstrings that point to a page or result file point to one that exists."""
    cited = re.compile(r"docs/[\w./-]*[\w/]")
    missing = []
    for folder in ("src", "benchmarks", "experiments", "scripts"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for ref in set(cited.findall(path.read_text(encoding="utf-8"))):
                if not (ROOT / ref).exists():
                    missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "code cites docs that do not exist:\n" + "\n".join(missing)

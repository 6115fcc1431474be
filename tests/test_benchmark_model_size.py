"""benchmarks/model_size.py: the FLOP counts behind the "Decoder heads" table are complete.

torch's FLOP counter has no formula for the CPU flash-attention kernel; the script adds one.
On a small encoder the count must equal the analytic count (qkv, output and feed-forward GEMMs,
4·N²·D for attention, patch embedding), so the committed table does not silently drop the
attention term.
"""

from __future__ import annotations

import json

from conftest import load_benchmark


def _script():
    return load_benchmark("model_size")


def test_counts_match_the_analytic_flops_and_the_doc_rows(tmp_path) -> None:
    levels, crop, patch, dim, layers = 3, 32, 8, 48, 2
    out = tmp_path / "size.json"
    _script().main(["--levels", "1", "4", "16", "--crop", str(crop), "--dim", str(dim),
                    "--layers", str(layers), "--heads", "2", "--head-dim", "32", "--json",
                    str(out)])
    summary = json.loads(out.read_text())
    n = levels * (crop // patch) ** 2
    per_layer = 2 * n * dim * 3 * dim + 2 * n * dim * dim + 4 * n * n * dim + 8 * n * dim * dim
    analytic = layers * per_layer + 2 * n * patch * patch * dim
    assert summary["encoder"]["gflop"] * 1e9 == analytic
    heads = summary["heads"]
    assert heads["unetr_taper"]["gflop"] < heads["unetr"]["gflop"]
    assert heads["unetr_taper"]["params_M"] < heads["unetr"]["params_M"]
    # the doc rows are the measured values, formatted
    row = summary["tables"]["heads"][1]
    assert row[:4] == ["UNETR", "constant", f"{heads['unetr']['params_M']:.2f}",
                       f"{heads['unetr']['gflop']:.1f}"]
    assert summary["command"].startswith("python benchmarks/model_size.py --levels 1 4 16")

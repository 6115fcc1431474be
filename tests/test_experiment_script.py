"""experiments/synthetic_table4.py: the staged training schedule it runs through the CLI.

The experiment itself takes tens of minutes; these tests check what it would run (commands
recorded instead of executed) and how it parses its options.
"""

from __future__ import annotations

import json
import subprocess

import pytest


def _option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_parse_schedule(table4) -> None:
    assert table4.parse_schedule("800@1e-3,1600@5e-4") == ((800, 1e-3), (1600, 5e-4))
    assert table4.parse_schedule("4000@0.001") == ((4000, 1e-3),)
    for bad in ("", "800", "0@1e-3", "800@-1"):
        with pytest.raises(SystemExit, match="--schedule"):
            table4.parse_schedule(bad)


def test_stages_chain_through_train_init(table4, tmp_path, monkeypatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    scale = table4.SCALES["cpu"]
    images, labels = [tmp_path / "a.npy"], [tmp_path / "a_labels.npy"]
    out = tmp_path / "naive"
    schedule = table4.parse_schedule("800@1e-3,1600@5e-4,1600@3e-4")
    table4.train_variant("naive", scale, images, labels, out, schedule, seed=10)

    assert [int(_option(c, "--steps")) for c in calls] == [800, 1600, 1600]
    assert [float(_option(c, "--lr")) for c in calls] == [1e-3, 5e-4, 3e-4]
    assert [int(_option(c, "--seed")) for c in calls] == [10, 11, 12]
    outs = [_option(c, "--out") for c in calls]
    assert outs[-1] == str(out)  # the last stage is the variant's model
    # each stage starts from the previous one; the first from a fresh random model
    assert _option(calls[0], "--init") == str(tmp_path / "naive_init")
    assert [_option(c, "--init") for c in calls[1:]] == outs[:-1]
    assert all("--naive-bbox" in c and _option(c, "--levels") == "1,4" for c in calls)
    assert all(float(_option(c, "--encoder-lr-factor")) == scale["enc_factor"] for c in calls)
    assert (tmp_path / "naive_init" / "config.yaml").is_file()


def test_summary_merges_runs_and_rebuilds_the_doc_rows(table4, tmp_path) -> None:
    summary = tmp_path / "data" / "synthetic_table4.json"
    scores = {"outer": 0.98494, "inner": 0.97966, "mDSC": 0.9823}
    noisy = {"8": {"outer": 0.98, "inner": 0.97, "mDSC": 0.9745}}
    table4.write_summary(summary, "bundled", {"muvit14": {
        "label": table4.BUNDLED_LABEL, "variant": "muvit14", "test": scores, "noise": noisy}})
    table4.write_summary(summary, "cpu", {"muvit1": {
        "label": "MuViT[1]+UNETR", "test": {"outer": 0.825, "inner": 0.009, "mDSC": 0.417}}})

    content = json.loads(summary.read_text())
    assert set(content["runs"]) == {"bundled", "cpu"}  # the second run did not replace the first
    assert content["script"] == "experiments/synthetic_table4.py"
    assert content["runs"]["cpu"]["command"].startswith("python experiments/synthetic_table4.py")
    rows = content["tables"]["bundled/table4"]
    assert rows[0][:4] == ["Method", "outer", "inner", "mDSC"]
    # scores rounded as the doc shows them, the paper's row of the same variant beside them
    assert rows[1] == [table4.BUNDLED_LABEL, "0.985", "0.980", "0.982", "0.950", "0.958", "0.954"]
    assert content["tables"]["bundled/noise"] == [
        ["σ (px)", "0", "8"], [table4.BUNDLED_LABEL, "0.982", "0.975"]]
    assert content["tables"]["cpu/table4"][1][:4] == ["MuViT[1]+UNETR", "0.825", "0.009", "0.417"]
    assert "cpu/noise" not in content["tables"]

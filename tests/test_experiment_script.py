"""experiments/synthetic_table4.py: the staged training schedule it runs through the CLI.

The experiment itself takes tens of minutes; these tests check what it would run (commands
recorded instead of executed) and how it parses its options.
"""

from __future__ import annotations

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

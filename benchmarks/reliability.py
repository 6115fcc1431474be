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

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

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


# --------------------------------------------------------------------------------------------
# the runs
# --------------------------------------------------------------------------------------------


ROOT = Path(__file__).resolve().parents[1]
SIZE = 288  # 9 × 9 tiles of the 32-px test model, 25 chunks of 64 px, a 2-level pyramid
CHUNK = 64
LOCK_SUFFIX = ".napari-muvit.lock"
PAUSE_ENV = "NAPARI_MUVIT_RELIABILITY_PAUSE"


def _env(src: Path | None = None) -> dict[str, str]:
    """The environment of every run: this checkout's ``src`` first (or
    ``$NAPARI_MUVIT_RELIABILITY_SRC``: another checkout whose code is measured)."""
    if src is None:
        src = Path(os.environ.get("NAPARI_MUVIT_RELIABILITY_SRC", ROOT / "src"))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def child(argv: list[str]) -> int:
    """``napari-muvit predict`` with 64-px zarr chunks (many points to interrupt and resume
    from on a small image); everything else is the real command line."""
    import torch

    from napari_muvit.cli import main
    from napari_muvit.engine import sinks

    torch.set_num_threads(1)
    sinks.DEFAULT_CHUNK = CHUNK
    pause = os.environ.get(PAUSE_ENV)
    if pause:  # test hook: hold still after the first chunk until the pause file is removed
        flush = sinks.ZarrSink._flush

        def paused_flush(self, key):
            flush(self, key)
            while Path(pause).exists():
                time.sleep(0.05)

        sinks.ZarrSink._flush = paused_flush
    return main(["predict", *argv])


def predict_cmd(image: Path, out: Path, model: Path, *extra: str, mode: str = "child"
                ) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), mode, str(image), "--model",
            str(model), "--out", str(out), "--device", "cpu", "--batch", "2", "--probabilities",
            "--quiet", *extra]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "napari_muvit", "predict", *args]


def run(cmd: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def store_arrays(out: Path) -> dict[str, np.ndarray] | None:
    """Every array of a finished store (labels levels, probabilities), None if unfinished."""
    import zarr

    from napari_muvit.engine.sinks import read_store_info

    info = read_store_info(out)
    if info is None or info.get("status") != "complete":
        return None
    group = zarr.open_group(str(out), mode="r")
    arrays = {str(k): group[str(k)][:] for k in range(int(info["pyramid_levels"]))}
    if info.get("probabilities"):
        arrays["probabilities"] = group["probabilities/0"][:]
    return arrays


def identical(out: Path, reference: dict[str, np.ndarray]) -> bool:
    arrays = store_arrays(out)
    return arrays is not None and arrays.keys() == reference.keys() and all(
        np.array_equal(arrays[k], reference[k]) for k in reference
    )


def store_state(out: Path) -> str:
    import zarr

    from napari_muvit.engine.sinks import read_store_info

    info = read_store_info(out)
    if info is None:
        return "absent" if not out.exists() else "not a store yet"
    if info.get("status") == "complete":
        return "complete"
    try:
        done = int(np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum())
    except Exception:
        return "incomplete (being created)"
    return f"incomplete ({done}/81 tiles)"


def leftovers(out: Path) -> list[str]:
    """Lock or trash files of ``out`` left in its folder."""
    return [p.name for p in out.parent.iterdir()
            if p.name.startswith(f".{out.name}") and (LOCK_SUFFIX in p.name or "trash" in p.name)]


def done_cells(out: Path) -> int:
    import zarr

    try:
        return int(np.asarray(zarr.open_group(str(out), mode="r")["done"][:]).sum())
    except Exception:
        return 0


def start_and_wait(cmd: list[str], until, timeout: float = 600) -> subprocess.Popen:
    """Start ``cmd``; return once ``until()`` holds or the process ended."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not until() and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    _out, err = proc.communicate(timeout=600)
    return proc.returncode, err


# --------------------------------------------------------------------------------------------
# cases
# --------------------------------------------------------------------------------------------


def case_kill9(ctx: dict, trials: int, rng: random.Random) -> dict:
    outcomes: list[dict] = []
    for i in range(trials):
        out = ctx["tmp"] / f"kill{i}.zarr"
        # the store's life is where a kill can do harm: even trials at a random point of
        # progress (between and during chunk writes), odd trials at a random time after the
        # store appears (also its creation, the final pyramid/status write and the exit)
        target = rng.randint(0, 80) if i % 2 == 0 else None
        delay = 0.0 if target is not None else rng.uniform(0.0, ctx["compute_s"])
        proc = start_and_wait(predict_cmd(ctx["a"], out, ctx["model"]),
                              lambda out=out, target=target: (out / "zarr.json").exists()
                              and (target is None or done_cells(out) >= target))
        time.sleep(delay)
        code, _err = kill(proc)
        state = store_state(out)
        rerun_exit = None
        if state != "complete":  # a finished store is refused by a rerun (it is done)
            rerun_exit = run(predict_cmd(ctx["a"], out, ctx["model"])).returncode
        ok = rerun_exit in (None, 0) and identical(out, ctx["ref_a"]) and not leftovers(out)
        outcomes.append({"at_tiles": target, "after_s": round(delay, 2), "exit": code,
                         "state": state, "rerun_exit": rerun_exit, "identical": ok})
        shutil.rmtree(out, ignore_errors=True)
    states = [o["state"].split(" (")[0] for o in outcomes]
    return row(
        "predict", "kill -9 at a random moment",
        "SIGKILL once a random number (0-80 of 81) of tiles is done (even trials) or "
        f"U(0, {ctx['compute_s']:.1f} s) after the store appears (odd trials; the uninterrupted "
        "run's time from there to its exit), then the same command again", trials, sum(o["identical"] for o in outcomes),
        "the process dies; the rerun resumes (a dead run's lock is taken over) and exits 0",
        "resumed store bit-identical to an uninterrupted run (labels, pyramid, probabilities); "
        f"states at the kill: {', '.join(f'{states.count(s)} {s}' for s in sorted(set(states)))}",
        {"trials": outcomes},
    )


def case_ctrl_c(ctx: dict, trials: int, rng: random.Random) -> dict:
    outcomes = []
    for i in range(trials):
        out = ctx["tmp"] / f"int{i}.zarr"
        target = rng.randint(0, 72)  # of 81 tiles: interrupt at a random point of progress
        proc = start_and_wait(predict_cmd(ctx["a"], out, ctx["model"]),
                              lambda out=out, target=target: (out / "zarr.json").exists()
                              and done_cells(out) >= target)
        code, err = kill(proc, signal.SIGINT)
        state = store_state(out)
        rerun_exit = None
        if state != "complete":
            rerun_exit = run(predict_cmd(ctx["a"], out, ctx["model"])).returncode
        # a SIGINT after the store was finished (while Python exits) may end it with -2
        ok = ((code == 130 or state == "complete") and rerun_exit in (None, 0)
              and identical(out, ctx["ref_a"]) and not leftovers(out))
        outcomes.append({"at_tiles": target, "exit": code, "message": last_line(err),
                         "state": state, "identical": ok})
        shutil.rmtree(out, ignore_errors=True)
    shown = next((o["message"] for o in outcomes if o["exit"] == 130), "")
    return row(
        "predict", "Ctrl-C (SIGINT) during the run",
        "SIGINT once a random number (0-72 of 81) of tiles is done, then the same command "
        "again", trials,
        sum(o["identical"] for o in outcomes), f"exit 130, `{shown}`",
        "store marked incomplete, lock released; the rerun resumes, bit-identical",
        {"trials": outcomes},
    )


def case_full_disk(ctx: dict) -> dict:
    mnt = ctx["tmp"] / "small_disk"
    mnt.mkdir()
    size_kb = max(64, ctx["store_kb"] // 2)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                              str(mnt)], capture_output=True).returncode == 0
    if not mounted:
        return row("predict", "full disk", "a tmpfs of half the store's size (needs root to "
                   "mount; not available here)", 1, 0, "not run", "not run",
                   {"skipped": "mount -t tmpfs failed (needs root)"})
    try:
        out = mnt / "S.zarr"
        first = run(predict_cmd(ctx["a"], out, ctx["model"]))
        state = store_state(out)
        subprocess.run(["mount", "-o", f"remount,size={4 * ctx['store_kb'] + 1024}k", str(mnt)],
                       check=True)
        rerun = run(predict_cmd(ctx["a"], out, ctx["model"]))
        ok = (first.returncode == 2 and "no space left" in last_line(first.stderr)
              and len(first.stderr.strip().splitlines()) == 1
              and rerun.returncode == 0 and identical(out, ctx["ref_a"]) and not leftovers(out))
        return row(
            "predict", "full disk",
            f"--out on a {size_kb} KiB tmpfs (the finished store needs ~{ctx['store_kb']} KiB); "
            "then the disk is enlarged and the same command rerun", 1, int(ok),
            f"exit {first.returncode}, `{last_line(first.stderr)}`",
            f"store left {state}; the rerun resumes, bit-identical",
            {"first_exit": first.returncode, "state": state, "rerun_exit": rerun.returncode},
        )
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def case_concurrent(ctx: dict) -> dict:
    out = ctx["tmp"] / "shared.zarr"
    pause = ctx["tmp"] / "pause-A"
    pause.touch()  # A holds still after its first chunk (lock held) until this file goes
    env = {**_env(), PAUSE_ENV: str(pause)}
    a = subprocess.Popen(predict_cmd(ctx["a"], out, ctx["model"]), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 600
    while a.poll() is None and done_cells(out) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    busy = a.poll() is None
    seen = []
    for extra in ((), ("--overwrite",)):
        b = run(predict_cmd(ctx["b"], out, ctx["model"], *extra))
        lines = b.stderr.strip().splitlines()
        seen.append((b.returncode, lines[-1] if lines else "", len(lines)))
    pause.unlink()
    a.communicate(timeout=600)
    ok = (busy and all(s[0] == 2 and "in use by another napari-muvit run" in s[1] and s[2] == 1
                       for s in seen)
          and a.returncode == 0 and identical(out, ctx["ref_a"]) and not leftovers(out))
    return row(
        "predict", "a second writer on the same store",
        "run A writes S.zarr (held after its first chunk); meanwhile run B predicts another "
        "image into S.zarr, without and with --overwrite", 2, 2 * int(ok),
        f"B: exit 2, `{seen[-1][1]}`",
        "A finishes undisturbed, bit-identical to a lone run; B writes nothing",
        {"b": seen, "a_exit": a.returncode, "a_busy_when_b_ran": busy},
    )


def _partial(ctx: dict, out: Path, image: Path, chunks: int = 3) -> None:
    """An unfinished store: the run is killed once ``chunks`` chunks are done."""
    proc = start_and_wait(predict_cmd(image, out, ctx["model"]),
                          lambda: done_cells(out) >= 4 * chunks)
    kill(proc)


def case_corrupt_chunk(ctx: dict, trials: int, rng: random.Random) -> dict:
    outcomes = []
    for i in range(trials):
        out = ctx["tmp"] / f"corrupt{i}.zarr"
        _partial(ctx, out, ctx["a"])
        chunks = sorted(p for name in ("0", "1", "probabilities/0", "done")
                        for p in (out / name / "c").rglob("*") if p.is_file())
        if not chunks:
            outcomes.append({"skipped": "no chunk written before the kill"})
            continue
        victim = rng.choice(chunks)
        victim.write_bytes(os.urandom(max(16, victim.stat().st_size)))
        rerun = run(predict_cmd(ctx["a"], out, ctx["model"]))
        message = last_line(rerun.stderr)
        ok = (rerun.returncode == 0 and str(victim) in message and identical(out, ctx["ref_a"]))
        outcomes.append({"chunk": str(victim.relative_to(out)), "message": message,
                         "identical": ok})
        shutil.rmtree(out, ignore_errors=True)
    shown = next((o["message"] for o in outcomes if o.get("message")), "")
    return row(
        "predict", "random bytes in one chunk of an unfinished store",
        "kill -9 after 3 chunks, overwrite a random chunk file (labels, pyramid, "
        "probabilities or done flags) with random bytes, rerun", trials,
        sum(bool(o.get("identical")) for o in outcomes), f"exit 0, `{shown}`",
        "the chunk is recomputed (pyramid chunks rebuilt); result bit-identical; --overwrite "
        "always starts afresh", {"trials": outcomes},
    )


def case_other_image(ctx: dict) -> dict:
    out = ctx["tmp"] / "mixed.zarr"
    _partial(ctx, out, ctx["a"])
    before = (out / "zarr.json").read_bytes()
    refused = run(predict_cmd(ctx["b"], out, ctx["model"]))
    unchanged = (out / "zarr.json").read_bytes() == before
    fresh = run(predict_cmd(ctx["b"], out, ctx["model"], "--overwrite"))
    ok = (refused.returncode == 2 and "the input image differs" in last_line(refused.stderr)
          and unchanged and fresh.returncode == 0 and identical(out, ctx["ref_b"]))
    return row(
        "predict", "resume onto another image of the same shape",
        "image a into X.zarr, killed; then image b into X.zarr; then b with --overwrite", 1,
        int(ok), f"exit 2, `{last_line(refused.stderr)}`",
        "a's store untouched; --overwrite starts a fresh store: b's labels only (bit-identical)",
        {"refused_exit": refused.returncode, "overwrite_exit": fresh.returncode},
    )


def case_hostile_outputs(ctx: dict) -> dict:
    tmp = ctx["tmp"]
    user = tmp / "my_folder"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    prediction = tmp / "labels_as_input.zarr"
    shutil.copytree(ctx["ref_store"], prediction)
    image_bytes = ctx["a"].read_bytes()
    attempts = [
        ("--out = the input .npy file", cli_cmd(str(ctx["a"]), "--out", str(ctx["a"]),
                                               "--overwrite", "--model", str(ctx["model"]))),
        ("--out = the input store, --overwrite", cli_cmd(str(prediction), "--out",
                                                         str(prediction), "--overwrite",
                                                         "--model", str(ctx["model"]))),
        ("--out = a folder of user files, --overwrite", cli_cmd(str(ctx["a"]), "--out",
                                                               str(user), "--overwrite",
                                                               "--model", str(ctx["model"]))),
        ("--out = /", cli_cmd(str(ctx["a"]), "--out", "/", "--overwrite", "--model",
                              str(ctx["model"]))),
    ]
    outcomes = []
    for name, cmd in attempts:
        result = run(cmd)
        lines = result.stderr.strip().splitlines()
        outcomes.append({"case": name, "exit": result.returncode,
                         "message": lines[-1] if lines else "", "one_line": len(lines) == 1})
    intact = (ctx["a"].read_bytes() == image_bytes and (user / "notes.txt").read_text() == "keep me"
              and [p.name for p in user.iterdir()] == ["notes.txt"]
              and identical(prediction, ctx["ref_a"]))
    passed = sum(o["exit"] == 2 and o["one_line"] for o in outcomes) if intact else 0
    return row(
        "predict", "hostile output paths",
        "; ".join(name for name, _ in attempts), len(attempts), passed,
        " / ".join(f"`{o['message']}`" for o in outcomes[:2]) + " / ...",
        "input image, input store and the user's folder unchanged",
        {"attempts": outcomes},
    )


def case_bad_inputs(ctx: dict) -> list[dict]:
    tmp = ctx["tmp"]
    rows = []
    image = np.load(ctx["a"])
    files = {
        "empty image (0×0 .npy)": ("empty.npy", np.zeros((0, 0), np.uint8), "non-empty"),
        "NaN in a float image": ("nan.npy", _with(image.astype(np.float32), np.nan), "NaN"),
        "infinity in a float image": ("inf.npy", _with(image.astype(np.float32), np.inf),
                                      "infinite"),
    }
    for fault, (name, data, needle) in files.items():
        np.save(tmp / name, data)
        rows.append(_one_line_row(ctx, fault, tmp / name, needle))
    trunc = tmp / "truncated.npy"
    trunc.write_bytes(ctx["a"].read_bytes()[:5000])
    rows.append(_one_line_row(ctx, "truncated .npy", trunc, "truncated or damaged"))
    junk = tmp / "junk.tif"
    junk.write_bytes(os.urandom(4096))
    rows.append(_one_line_row(ctx, "random bytes named .tif", junk, str(junk)))
    out = tmp / "neg.zarr"
    result = run(cli_cmd(str(ctx["a"]), "--model", str(ctx["model"]), "--out", str(out),
                         "--region", "-100,0,50,40", "--quiet", "--device", "cpu"))
    from napari_muvit.engine.sinks import read_store_info

    region = (read_store_info(out) or {}).get("region")
    rows.append(row("input", "negative --region value", "--region -100,0,50,40", 1,
                    int(result.returncode == 0 and region == [[0, 0], [50, 40]]),
                    f"exit {result.returncode}; the region is clipped to {region}",
                    "-", {"exit": result.returncode}))
    u16 = tmp / "u16.npy"
    np.save(u16, image.astype(np.uint16) * 257)
    outs = {}
    for name, path in (("u8", ctx["a"]), ("u16", u16)):
        outs[name] = run(cli_cmd(str(path), "--out", str(tmp / f"bundled_{name}.zarr"),
                                 "--region", "0,0,128,128", "--quiet", "--device", "cpu"))
    import zarr

    same = all(r.returncode == 0 for r in outs.values()) and np.array_equal(
        zarr.open_group(str(tmp / "bundled_u8.zarr"), mode="r")["0"][:],
        zarr.open_group(str(tmp / "bundled_u16.zarr"), mode="r")["0"][:])
    rows.append(row(
        "input", "uint16 image with the bundled (8-bit) model",
        "the same image as uint8 and as uint16 (×257), bundled model", 1, int(same),
        f"`{last_line(outs['u16'].stderr)}`",
        "identical labels (the model's fixed 8-200 range is scaled by 257)",
        {"exits": {k: r.returncode for k, r in outs.items()}},
    ))
    return rows


def _with(data: np.ndarray, value: float) -> np.ndarray:
    data = data.copy()
    data[data.shape[0] // 2, data.shape[1] // 3] = value
    return data


def _one_line_row(ctx: dict, fault: str, path: Path, needle: str) -> dict:
    out = ctx["tmp"] / f"{path.stem}_out.zarr"
    result = run(cli_cmd(str(path), "--model", str(ctx["model"]), "--out", str(out), "--quiet",
                         "--device", "cpu"))
    lines = result.stderr.strip().splitlines()
    ok = (result.returncode == 2 and len(lines) == 1 and needle in lines[0]
          and str(path) in lines[0] and not out.exists() and not leftovers(out))
    return row("input", fault, f"napari-muvit predict {path.name} --out OUT.zarr", 1, int(ok),
               f"exit {result.returncode}, `{lines[-1] if lines else ''}`",
               "nothing written (checked before the store is created)",
               {"exit": result.returncode, "lines": len(lines)})


def train_rows(path: Path, kills: int, seed: int) -> list[dict]:
    """Rows of the training half (``cases()`` of ``_reliability_train.py``), run in a
    subprocess that measures the code of that file's checkout (its ``src``)."""
    if not path.is_file():
        return []
    repo = path.resolve().parents[1]
    code = ("import json, sys; sys.path[:0] = sys.argv[1:3]; import _reliability_train as t; "
            f"print(json.dumps(t.cases(kills={int(kills)}, seed={int(seed)})))")
    env = _env(repo / "src")
    env["NAPARI_MUVIT_RELIABILITY_SRC"] = str(repo / "src")
    result = subprocess.run(
        [sys.executable, "-c", code, str(path.resolve().parent), str(Path(__file__).resolve().parent)],
        capture_output=True, text=True, env=env, timeout=7200,
    )
    if result.returncode != 0:
        return [row("train", "training cases", str(path), 1, 0,
                    f"the training cases failed: {last_line(result.stderr)}", "-")]
    return [{**r, "ok": r["passed"] == r["trials"]} for r in json.loads(last_line(result.stdout))]


# --------------------------------------------------------------------------------------------
# setup and report
# --------------------------------------------------------------------------------------------


def setup(tmp: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    from _predict_support import rings, tiny_segmenter

    ctx: dict = {"tmp": tmp}
    ctx["model"] = tiny_segmenter().save(tmp / "model")
    for name, seed in (("a", 1), ("b", 3)):
        ctx[name] = tmp / f"{name}.npy"
        np.save(ctx[name], np.asarray(rings(SIZE, seed=seed)[0]))
    for name in ("a", "b"):
        out = tmp / f"ref_{name}.zarr"
        t0 = time.monotonic()
        result = run(predict_cmd(ctx[name], out, ctx["model"]))
        if result.returncode != 0:
            raise SystemExit(f"baseline run failed: {result.stderr}")
        if name == "a":
            ctx["baseline_s"] = time.monotonic() - t0
            ctx["ref_store"] = out
            ctx["store_kb"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) // 1024
        ctx[f"ref_{name}"] = store_arrays(out)
    # time from the store's creation to the end (the part a Ctrl-C should hit)
    out = tmp / "timing.zarr"
    proc = start_and_wait(predict_cmd(ctx["a"], out, ctx["model"]),
                          lambda: (out / "zarr.json").exists())
    t0 = time.monotonic()
    proc.wait()
    ctx["compute_s"] = time.monotonic() - t0
    shutil.rmtree(out)
    return ctx


def _train_json_rows(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return [r for r in data["rows"] if r["area"] != "predict"]


def render(path: Path, train_json: Path | None) -> int:
    """Re-render ``path``'s table, replacing its training rows by ``train_json``'s."""
    data = json.loads(path.read_text())
    if train_json is not None:
        train = json.loads(train_json.read_text())
        data["rows"] = [r for r in data["rows"] if r["area"] != "train"] + _train_json_rows(
            train_json)
        data["train_command"] = train.get("command")
        data["train_load_average_before_after"] = train.get("load_average_before_after")
        data["train_note"] = train.get("note")
        data["all_ok"] = all(r["ok"] for r in data["rows"])
    data["script"] = "benchmarks/reliability.py"
    data["tables"] = {"faults": table(data["rows"])}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    if path.resolve() == (ROOT / "docs" / "data" / "reliability.json").resolve():
        update_doc(data)
    print(markdown(data["rows"]))
    return 0 if data["all_ok"] else 1


DOC = ROOT / "docs" / "reliability.md"
DOC_START, DOC_END = "<!-- reliability-table: written by benchmarks/reliability.py -->", \
    "<!-- /reliability-table -->"


def update_doc(data: dict) -> None:
    """Put the table and its provenance between the markers of docs/reliability.md."""
    if not DOC.is_file() or DOC_START not in DOC.read_text():
        return
    text = DOC.read_text()
    head, rest = text.split(DOC_START, 1)
    _old, tail = rest.split(DOC_END, 1)
    load = data["load_average_before_after"]
    note = (f"Numbers from `{data['command']}` ({data['date']}, {data['seconds']:.0f} s on "
            f"{data['cpu_count']} CPU cores, load average {load[0]} before / {load[1]} after: "
            "other jobs shared the machine)")
    if data.get("train_command"):
        tl = data.get("train_load_average_before_after") or ["?", "?"]
        note += (f"; training rows from `{data['train_command']}` (load average {tl[0]} / "
                 f"{tl[1]}; docs/data/reliability_train.json)")
        if data.get("train_note"):
            note += f". Note on the training rows: {data['train_note']}"
    note = note.rstrip(".")
    DOC.write_text(f"{head}{DOC_START}\n<!-- rows: docs/data/reliability.json#faults -->\n"
                   f"{markdown(data['rows'])}\n{note}.\n{DOC_END}{tail}")


HEADER = ["area", "fault", "how", "passed", "what the user sees", "what is preserved"]


def table(rows: list[dict]) -> list[list[str]]:
    """The Markdown table as rows of cells (``tables.faults`` of the JSON, checked against the
    page by tests/test_docs.py)."""
    cells = [[r["area"], r["fault"], r["how"],
              f"{r['passed']}/{r['trials']}" + ("" if r["ok"] else " FAIL"),
              r["user_sees"], r["preserved"]] for r in rows]
    return [HEADER, *[[c.replace("|", "/").replace("\n", " ") for c in row] for row in cells]]


def markdown(rows: list[dict]) -> str:
    header, *body = table(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace(" FAIL", " **FAIL**") for c in row) + " |"
              for row in body]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kill -9 trials (default 20)")
    parser.add_argument("--trials", type=int, default=5,
                        help="Ctrl-C and corrupt-chunk trials (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-cases", type=Path,
                        default=Path(__file__).resolve().parent / "_reliability_train.py",
                        help="the training half's cases() (skipped if missing)")
    parser.add_argument("--train-json", type=Path, default=None,
                        help="take the training rows from this file (written by "
                        "`python benchmarks/_reliability_train.py --json FILE`) instead of "
                        "running them")
    parser.add_argument("--render-only", action="store_true",
                        help="do not run anything: re-render --json (with --train-json's rows)")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "data" / "reliability.json")
    args = parser.parse_args(argv)
    if args.render_only:
        return render(args.json, args.train_json)
    rng = random.Random(args.seed)
    load_before = os.getloadavg()
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="napari-muvit-reliability-") as name:
        ctx = setup(Path(name))
        rows = [case_kill9(ctx, args.kills, rng), case_ctrl_c(ctx, args.trials, rng),
                case_full_disk(ctx), case_concurrent(ctx),
                case_corrupt_chunk(ctx, args.trials, rng), case_other_image(ctx),
                case_hostile_outputs(ctx), *case_bad_inputs(ctx)]
        timing = {k: round(ctx[k], 2) for k in ("baseline_s", "compute_s")}
    if args.train_json is not None:
        rows += _train_json_rows(args.train_json)
    else:
        rows += train_rows(args.train_cases, args.kills, args.seed)
    for r in rows:
        missing = [f for f in FIELDS if f not in r]
        if missing:
            raise SystemExit(f"row {r.get('fault')!r} lacks {missing}")
    result = {
        "command": " ".join(["python benchmarks/reliability.py", *(
            a if not a.endswith(".py") else f"benchmarks/{Path(a).name}"
            for a in (sys.argv[1:] if argv is None else argv))]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "seconds": round(time.monotonic() - t0, 1),
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpu_count": os.cpu_count(),
        "setup": {"image": f"{SIZE}² Synthetic rings (uint8)", "model": "tiny test segmenter "
                  "(tests/_predict_support.py), 32-px tiles", "chunk": CHUNK, **timing},
        "all_ok": all(r["ok"] for r in rows),
        "rows": rows,
        "script": "benchmarks/reliability.py",
        "tables": {"faults": table(rows)},
    }
    # temporary folders differ per run and machine: shown as <tmp>
    text = re.sub(re.escape(tempfile.gettempdir()) + r"/napari-muvit-reliability[\w-]*", "<tmp>",
                  json.dumps(result, indent=1, ensure_ascii=False))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(text + "\n")
    rows = json.loads(text)["rows"]
    if args.json.resolve() == (ROOT / "docs" / "data" / "reliability.json").resolve():
        update_doc(json.loads(text))
    print(markdown(rows))
    print(f"{sum(r['ok'] for r in rows)}/{len(rows)} rows ok; wrote {args.json}")
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("child", "child-wait"):
        if sys.argv[1] == "child-wait":  # imports first, then wait for "go" on stdin
            import napari_muvit.cli.predict  # noqa: F401
            import napari_muvit.engine.predictor  # noqa: F401

            sys.stdin.readline()
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())

"""The training half of the reliability table (``benchmarks/reliability.py`` runs :func:`cases`).

Every case runs the real command line, ``python -m napari_muvit train`` (tiny preset, 32-px
crops, a checkpoint after every step), on a 96² image with two painted classes, and checks the
folder the way a user would find it afterwards:

* kill -9 at random moments: the folder holds nothing yet, or one complete checkpoint
  (weights, ``train_state.pt`` and ``history.json`` of the same step, no temporary files); the
  same command with ``--resume`` then finishes with weights equal to an uninterrupted run;
* Ctrl-C: exit 130 with a checkpoint; ``--resume`` finishes equal to an uninterrupted run;
* a second trainer on the same folder: one-line error, the first run undisturbed;
* hostile ``--init`` folders (YAML alias bomb, implausible dimensions): one-line error within
  seconds, bounded memory;
* a full disk (a small tmpfs, needs root): "no space left on ...", the previous checkpoint kept,
  ``--resume`` after freeing space finishes equal to an uninterrupted run;
* the user's files in the run folder survive ``--resume`` and ``--overwrite``;
* bad training inputs (negative labels, one painted class, a refused ``train_state.pt``).

Rows use the format defined at the top of ``benchmarks/reliability.py``. Standalone:
``python benchmarks/_reliability_train.py [--kills 20]`` prints the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reliability as rel  # noqa: E402 - the shared row format and process helpers

STEPS = 12
TRAIN_OPTS = ["--preset", "tiny", "--crop", "32", "--batch", "2", "--device", "cpu", "--quiet",
              "--seed", "0", "--checkpoint-every", "1steps"]
OWNED = ["config.yaml", "history.json", "model.safetensors", "train_state.pt"]


def _log(text: str) -> None:
    print(f"[train cases] {text}", file=sys.stderr, flush=True)


def train_cmd(ctx: dict, out: Path, *extra: str, labels: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "napari_muvit", "train", str(ctx["image"]), "--labels",
            str(labels or ctx["labels"]), "--out", str(out), *TRAIN_OPTS, *extra]


def _run(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """``cmd`` to its end, and the child's peak memory in MiB (from its own rusage)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=rel._env())
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    return result, usage.ru_maxrss / 1024  # Linux: KiB


def weights(out: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def leftovers(out: Path) -> list[str]:
    """Temporary, journal or lock files of ``out`` (inside it or beside it)."""
    inside = [p.name for p in out.iterdir()
              if p.name.startswith(".")] if out.is_dir() else []
    beside = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")
              or p.name.startswith(f"..{out.name}")]
    return inside + beside


def folder_state(out: Path) -> tuple[str, int | None]:
    """What a user finds: ``("absent"|"empty", None)``, ``("checkpoint", step)`` when weights,
    state and history are one complete checkpoint, else ``("BROKEN: why", None)``."""
    from napari_muvit.engine import _checkpointing as ckpt
    from napari_muvit.model import load_history, load_model

    if not out.exists():
        return "absent", None
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if not names:
        return "empty", None
    try:
        step = int(ckpt.load_train_state(out)["step"])
        history = load_history(out) or {}
        load_model(out)
    except Exception as err:  # noqa: BLE001 - any failure is a broken folder
        return f"BROKEN: {err}", None
    if history.get("step") != step or len(history.get("loss", [])) != step:
        return f"BROKEN: history at step {history.get('step')}, state at {step}", None
    return "checkpoint", step


# ------------------------------------------------------------------------------------- cases
def case_kill9(ctx: dict, trials: int, rng: random.Random) -> dict:
    outcomes = []
    for i in range(trials):
        out = ctx["tmp"] / f"kill{i}"
        # even trials: from the start (interpreter start-up, the first checkpoint); odd trials:
        # during training (a checkpoint after every step), from the first checkpoint on
        after_first = i % 2 == 1
        span = ctx["compute_s"] if after_first else ctx["baseline_s"]
        delay = rng.uniform(0.0, span)
        proc = rel.start_and_wait(
            train_cmd(ctx, out, "--steps", str(STEPS)),
            (lambda out=out: (out / "train_state.pt").exists()) if after_first else (lambda: True),
        )
        time.sleep(delay)
        code, _ = rel.kill(proc)
        state, step = folder_state(out)
        # what the user finds before anything repairs the folder: only finished files count
        ok = not state.startswith("BROKEN")
        rerun, _ = _run(train_cmd(ctx, out, "--steps", str(STEPS), "--resume"))
        diff = max_diff(weights(out), ctx["ref"]) if rerun.returncode == 0 else float("inf")
        ok = ok and rerun.returncode == 0 and diff <= 1e-6 and not leftovers(out)
        outcomes.append({"kill_after_s": round(delay, 2), "after_first_checkpoint": after_first,
                         "exit": code, "state": state,
                         "step": step, "rerun_exit": rerun.returncode,
                         "max_weight_diff": diff, "ok": ok})
        _log(f"kill {i}: {outcomes[-1]}")
        shutil.rmtree(out, ignore_errors=True)
    states = [o["state"] if o["step"] is None else "checkpoint" for o in outcomes]
    exact = sum(o["max_weight_diff"] == 0.0 for o in outcomes)
    return rel.row(
        "train", "kill -9 at a random moment",
        f"`train --steps {STEPS} --checkpoint-every 1steps` (tiny preset), SIGKILL after "
        f"U(0, {ctx['baseline_s']:.1f} s) from the start (the uninterrupted run's time; even "
        f"trials) or U(0, {ctx['compute_s']:.1f} s) from the first checkpoint (odd trials), then "
        "the same command with --resume", trials, sum(o["ok"] for o in outcomes),
        "the process dies; --resume takes the dead run's lock over, continues and exits 0",
        "no folder yet or one complete checkpoint (weights, train_state.pt, history.json of the "
        f"same step; {', '.join(f'{states.count(s)} {s}' for s in sorted(set(states)))}); "
        f"resumed weights equal an uninterrupted run ({exact}/{trials} bit-identical, all within "
        "1e-6); no temporary files left",
        {"trials": outcomes},
    )


def case_ctrl_c(ctx: dict, trials: int, rng: random.Random) -> dict:
    outcomes = []
    for i in range(trials):
        out = ctx["tmp"] / f"int{i}"
        proc = rel.start_and_wait(train_cmd(ctx, out, "--steps", str(STEPS)),
                                  lambda out=out: (out / "train_state.pt").exists())
        time.sleep(rng.uniform(0.0, 0.5 * ctx["compute_s"]))
        code, err = rel.kill(proc, signal.SIGINT)
        state, step = folder_state(out)
        rerun, _ = _run(train_cmd(ctx, out, "--steps", str(STEPS), "--resume"))
        diff = max_diff(weights(out), ctx["ref"]) if rerun.returncode == 0 else float("inf")
        # 130: stopped with a checkpoint; 0: it had finished; -SIGINT: the signal came as the
        # interpreter was exiting after the last checkpoint (a shell shows 130 for both)
        ok = (code in (0, 130, -signal.SIGINT) and state == "checkpoint" and rerun.returncode == 0
              and diff <= 1e-6 and not leftovers(out))
        outcomes.append({"exit": code, "message": rel.last_line(err), "state": state,
                         "step": step, "max_weight_diff": diff, "ok": ok})
        _log(f"ctrl-c {i}: {outcomes[-1]}")
        shutil.rmtree(out, ignore_errors=True)
    shown = next((o["message"] for o in outcomes if o["exit"] == 130), "")
    return rel.row(
        "train", "Ctrl-C (SIGINT) during training",
        "SIGINT at a random moment after the first checkpoint, then the same command with "
        "--resume", trials, sum(o["ok"] for o in outcomes), f"exit 130, `{shown}`",
        "a checkpoint of the last finished step; the resumed run equals an uninterrupted one",
        {"trials": outcomes},
    )


def case_concurrent(ctx: dict) -> dict:
    steps = 4 * STEPS  # long enough for two more interpreters to start while A trains
    out = ctx["tmp"] / "shared"
    first = rel.start_and_wait(train_cmd(ctx, out, "--steps", str(steps)),
                               lambda: (out / "train_state.pt").exists())
    others = [subprocess.Popen(train_cmd(ctx, out, "--steps", str(steps), *extra),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=rel._env())
              for extra in (("--resume",), ("--steps", "3", "--overwrite"))]
    seen = [(p.wait(timeout=900), p.communicate()[1]) for p in others]
    still_running = first.poll() is None  # B and C really met a live run
    first.communicate(timeout=900)
    lone, _ = _run(train_cmd(ctx, ctx["tmp"] / "lone", "--steps", str(steps)))
    refused = [err for code, err in seen if code == 2 and len(err.strip().splitlines()) == 1
               and "in use by another napari-muvit run" in err]
    diff = (max_diff(weights(out), weights(ctx["tmp"] / "lone"))
            if first.returncode == lone.returncode == 0 else float("inf"))
    ok = first.returncode == 0 and diff <= 1e-6 and not leftovers(out) and still_running
    return rel.row(
        "train", "a second trainer on the same folder",
        f"run A trains {steps} steps into OUT; meanwhile run B `--resume`s OUT and run C "
        "`--overwrite`s it", 2, len(refused) if ok else 0,
        f"B, C: exit 2, `{rel.last_line(seen[0][1])}`",
        "A finishes undisturbed (weights equal a lone run); B and C write nothing",
        {"b_c_exits": [code for code, _ in seen], "a_exit": first.returncode,
         "a_still_running_after_b_c": still_running, "max_weight_diff": diff},
    )


def case_hostile_init(ctx: dict) -> list[dict]:
    from napari_muvit.model import read_config

    enc = ctx["tmp"] / "enc"
    run, _ = _run([sys.executable, "-m", "napari_muvit", "pretrain", str(ctx["image"]),
                   "--levels", "1,4", "--out", str(enc), "--steps", "1", *TRAIN_OPTS])
    if run.returncode != 0:
        raise SystemExit(f"pretrain failed: {run.stderr}")
    good = (enc / "config.yaml").read_text()
    bomb = ["  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    cfg = read_config(enc)
    variants = {
        "a 1 KB YAML alias bomb in `meta` (10⁹ values expanded)":
            good.replace("meta:\n", "meta:\n" + "\n".join(bomb) + "\n", 1),
        "`encoder.dim: 65536, num_layers: 64` (51.5 GB if built)":
            good.replace(f"  dim: {cfg['encoder']['dim']}\n", "  dim: 65536\n", 1).replace(
                f"  num_layers: {cfg['encoder']['num_layers']}\n", "  num_layers: 64\n", 1),
        "`encoder.dim: 8192, num_layers: 64` (plausible, but not these weights)":
            good.replace(f"  dim: {cfg['encoder']['dim']}\n", "  dim: 8192\n", 1).replace(
                f"  num_layers: {cfg['encoder']['num_layers']}\n", "  num_layers: 64\n", 1),
    }
    rows = []
    for what, text in variants.items():
        (enc / "config.yaml").write_text(text)
        out = ctx["tmp"] / "from_hostile"
        start = time.monotonic()
        result, peak = _run(train_cmd(ctx, out, "--steps", "1", "--init", str(enc)))
        seconds = time.monotonic() - start
        lines = result.stderr.strip().splitlines()
        ok = (result.returncode == 2 and len(lines) == 1 and not out.exists() and seconds < 60
              and peak < 2048)
        rows.append(rel.row(
            "model folder", f"hostile --init folder: {what}",
            "`napari-muvit train ... --init HOSTILE`", 1, int(ok),
            f"exit {result.returncode} after {seconds:.1f} s (incl. start-up), peak memory "
            f"{peak:.0f} MiB, `{lines[-1] if lines else ''}`",
            "nothing allocated or written (bounded YAML; sizes checked against the weights file "
            "before building)", {"seconds": round(seconds, 2), "exit": result.returncode,
                                  "peak_mib": round(peak)}))
    (enc / "config.yaml").write_text(good)
    return rows


def case_full_disk(ctx: dict) -> dict:
    mnt = ctx["tmp"] / "small_disk"
    mnt.mkdir()
    size_kb = int(ctx["checkpoint_kb"] * 1.5) + 16  # one checkpoint fits, not two at once
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs",
                              str(mnt)], capture_output=True).returncode == 0
    if not mounted:
        return rel.row("train", "full disk during training", "a small tmpfs (needs root to "
                       "mount; not available here)", 1, 0, "not run", "not run",
                       {"skipped": "mount -t tmpfs failed (needs root)"})
    try:
        out = mnt / "run"
        first, _ = _run(train_cmd(ctx, out, "--steps", str(STEPS)))
        state, step = folder_state(out)
        subprocess.run(["mount", "-o", f"remount,size={4 * size_kb + 1024}k", str(mnt)],
                       check=True)
        rerun, _ = _run(train_cmd(ctx, out, "--steps", str(STEPS), "--resume"))
        diff = max_diff(weights(out), ctx["ref"]) if rerun.returncode == 0 else float("inf")
        lines = first.stderr.strip().splitlines()
        ok = (first.returncode == 2 and len(lines) == 1 and "no space left on" in lines[0]
              and state == "checkpoint" and rerun.returncode == 0 and diff <= 1e-6
              and not leftovers(out))
        return rel.row(
            "train", "full disk during training",
            f"--out on a {size_kb} KiB tmpfs (one checkpoint is ~{ctx['checkpoint_kb']} KiB, a "
            "replacement needs room for two); then the disk is enlarged and --resume run", 1,
            int(ok), f"exit {first.returncode}, `{lines[-1] if lines else ''}`",
            f"the previous checkpoint (step {step}) complete; --resume finishes equal to an "
            "uninterrupted run", {"first_exit": first.returncode, "state": state,
                                  "rerun_exit": rerun.returncode, "max_weight_diff": diff},
        )
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def case_user_files(ctx: dict) -> dict:
    out = ctx["tmp"] / "with_notes"
    first, _ = _run(train_cmd(ctx, out, "--steps", "4"))
    (out / "NOTES.txt").write_text("my notes")
    (out / "my_predictions.zarr").mkdir()
    (out / "my_predictions.zarr" / "zarr.json").write_text("{}")
    resumed, _ = _run(train_cmd(ctx, out, "--steps", str(STEPS), "--resume"))
    kept_resume = (out / "NOTES.txt").is_file() and (out / "my_predictions.zarr").is_dir()
    over, _ = _run(train_cmd(ctx, out, "--steps", "2", "--overwrite"))
    kept_over = (out / "NOTES.txt").read_text() == "my notes" and (
        out / "my_predictions.zarr" / "zarr.json").read_text() == "{}"
    codes = [first.returncode, resumed.returncode, over.returncode]
    passed = int(codes[:2] == [0, 0] and kept_resume) + int(codes[2] == 0 and kept_over)
    return rel.row(
        "train", "the user's files in the run folder",
        "NOTES.txt and my_predictions.zarr put into a run folder, then `--resume` and "
        "`--overwrite`", 2, passed, "exit 0 both times",
        "both files untouched; only config.yaml, model.safetensors, history.json and "
        "train_state.pt are replaced", {"exits": codes})


def case_bad_inputs(ctx: dict) -> dict:
    import torch

    values = np.load(ctx["labels"])
    outcomes = {}
    negative = ctx["tmp"] / "negative_labels.npy"
    np.save(negative, np.where(values == 2, -1, values).astype(np.int16))
    single = ctx["tmp"] / "one_class_labels.npy"
    np.save(single, np.where(values == 2, 0, values).astype(np.int16))
    for name, labels, needle in ((negative.name, negative, "negative values"),
                                 (single.name, single, "paint at least two classes")):
        result, _ = _run(train_cmd(ctx, ctx["tmp"] / "bad_out", "--steps", "1", labels=labels))
        lines = result.stderr.strip().splitlines()
        outcomes[name] = (result.returncode, lines[-1] if lines else "",
                          result.returncode == 2 and len(lines) == 1 and needle in lines[0])
    run_dir = ctx["tmp"] / "evil_state"
    _run(train_cmd(ctx, run_dir, "--steps", "1"))

    class Evil:
        def __reduce__(self):
            return (print, ("this would run",))

    torch.save({"step": 1, "payload": Evil()}, run_dir / "train_state.pt")
    result, _ = _run(train_cmd(ctx, run_dir, "--steps", "2", "--resume"))
    lines = result.stderr.strip().splitlines()
    outcomes["train_state.pt with a foreign object"] = (
        result.returncode, lines[-1] if lines else "",
        result.returncode == 2 and len(lines) == 1 and "weights_only=False" not in result.stderr
        and "this would run" not in result.stdout)
    shown = "; ".join(f"{k}: `{v[1]}`" for k, v in outcomes.items())
    return rel.row(
        "input", "bad training inputs (negative labels, one painted class, a foreign "
        "train_state.pt)", "`napari-muvit train` with each", len(outcomes),
        sum(v[2] for v in outcomes.values()), f"exit 2, one line each: {shown}",
        "nothing written; the foreign pickle is never run",
        {k: list(v) for k, v in outcomes.items()})


# ------------------------------------------------------------------------------------- setup
def setup(tmp: Path) -> dict:
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (96, 96)).astype(np.float32)
    image[40:70, 40:70] += 80
    labels = np.zeros((96, 96), np.int16)
    labels[5:8, 5:30] = 1
    labels[50:53, 45:65] = 2
    ctx: dict = {"tmp": tmp, "image": tmp / "image.npy", "labels": tmp / "labels.npy"}
    np.save(ctx["image"], image)
    np.save(ctx["labels"], labels)
    ref = tmp / "reference"
    start = time.monotonic()
    result, _ = _run(train_cmd(ctx, ref, "--steps", str(STEPS)))
    if result.returncode != 0:
        raise SystemExit(f"reference run failed: {result.stderr}")
    ctx["baseline_s"] = time.monotonic() - start
    ctx["ref"] = weights(ref)
    ctx["checkpoint_kb"] = sum(p.stat().st_size for p in ref.iterdir()) // 1024
    # time from the first checkpoint to the end (the part a Ctrl-C should hit)
    out = tmp / "timing"
    proc = rel.start_and_wait(train_cmd(ctx, out, "--steps", str(STEPS)),
                              lambda: (out / "train_state.pt").exists())
    start = time.monotonic()
    proc.communicate(timeout=900)
    ctx["compute_s"] = time.monotonic() - start
    shutil.rmtree(out)
    _log(f"reference: {ctx['baseline_s']:.1f} s, training part {ctx['compute_s']:.1f} s, "
         f"checkpoint {ctx['checkpoint_kb']} KiB")
    return ctx


def cases(kills: int = 20, trials: int = 3, seed: int = 0) -> list[dict]:
    """All training rows (format: ``benchmarks/reliability.py``)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="napari-muvit-reliability-train-") as name:
        ctx = setup(Path(name))
        rows = [case_kill9(ctx, kills, rng), case_ctrl_c(ctx, trials, rng), case_concurrent(ctx),
                case_full_disk(ctx), case_user_files(ctx), *case_hostile_init(ctx),
                case_bad_inputs(ctx)]
    # the temporary folder's path means nothing in a table (and names this machine)
    return json.loads(json.dumps(rows).replace(str(Path(name)), "<tmp>"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the rows with the command and machine load here "
                        "(e.g. docs/data/reliability_train.json)")
    args = parser.parse_args()
    load_before, started = os.getloadavg()[0], time.monotonic()
    rows = cases(args.kills, args.trials, args.seed)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "command": "python benchmarks/_reliability_train.py " + " ".join(sys.argv[1:]),
            "script": "benchmarks/_reliability_train.py",
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": round(time.monotonic() - started, 1),
            "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "cpu_count": os.cpu_count(),
            "all_ok": all(r["ok"] for r in rows),
            "rows": rows,
        }, indent=1) + "\n")
    print(json.dumps(rows))

"""Hardware detection, precision checks, thread budgets and the OpenMP wait policy."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
from _predict_support import rings_source, tiny_segmenter

from napari_muvit.cli import main
from napari_muvit.engine import hardware, threads
from napari_muvit.engine.device import resolve_amp, validate_precision
from napari_muvit.engine.hardware import (
    SlowPrecisionWarning,
    check_precision,
    cpu_capabilities,
    describe_runtime,
)
from napari_muvit.engine.predictor import Predictor
from napari_muvit.engine.threads import (
    ThreadShares,
    ThreadTuner,
    configure_wait_policy,
    thread_budget,
    worker_threads,
)

CPU = torch.device("cpu")

# --------------------------------------------------------------------------- wait policy


def test_wait_policy_is_set_only_when_the_user_did_not_choose_one() -> None:
    env: dict[str, str] = {}
    policy = configure_wait_policy(env, torch_loaded=False)
    assert policy.status == "passive"
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}

    env = {"GOMP_SPINCOUNT": "1000"}
    policy = configure_wait_policy(env, torch_loaded=False)
    assert policy.status == "user" and "GOMP_SPINCOUNT=1000" in policy.detail
    assert env == {"GOMP_SPINCOUNT": "1000"}  # untouched

    env = {}
    policy = configure_wait_policy(env, torch_loaded=True)
    assert policy.status == "late"  # this process spins; children still inherit PASSIVE
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "torch imported first" in policy.short


def _policy_in_fresh_process(code_before: str) -> str:
    code = (f"{code_before}\nimport os, napari_muvit\n"
            "from napari_muvit.engine.threads import wait_policy\n"
            "print(wait_policy().status, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in threads.USER_POLICY_VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    return out.stdout.strip()


def test_importing_the_package_sets_the_policy_before_torch_and_detects_a_late_import() -> None:
    assert _policy_in_fresh_process("") == "passive PASSIVE"
    assert _policy_in_fresh_process("import torch") == "late PASSIVE"


# --------------------------------------------------------------------------- thread budgets


def test_thread_budget_applies_to_the_calling_thread_only() -> None:
    main_before = torch.get_num_threads()
    seen: dict[str, int] = {}
    inside = threading.Event()
    release = threading.Event()

    def job() -> None:
        with thread_budget(main_before + 1):
            torch.ones(8).sum()
            seen["inside"] = torch.get_num_threads()
            inside.set()
            release.wait(5)
        seen["after"] = torch.get_num_threads()

    t = threading.Thread(target=job)
    t.start()
    assert inside.wait(5)
    seen["main_meanwhile"] = torch.get_num_threads()
    release.set()
    t.join()
    assert seen["inside"] == main_before + 1
    assert seen["main_meanwhile"] == main_before  # the budget did not leak into this thread
    assert torch.get_num_threads() == main_before


def test_thread_shares_divide_the_cores_and_leave_the_gui_a_core() -> None:
    pool = ThreadShares(reserve=1, cores=lambda: 9)
    assert pool.budget == 8
    with pool.job("train") as train:
        assert train() == 8 and torch.get_num_threads() == 8
        with pool.job("live predict") as live:
            assert train() == 4 and live() == 4  # a running job re-reads its share
            assert sorted(pool.running()) == ["live predict", "train"]
        assert train() == 8
    assert pool.running() == []
    assert ThreadShares(reserve=1, cores=lambda: 2).share() == 1  # never zero
    assert ThreadShares(threads=3, cores=lambda: 64).budget == 3  # the user's setting wins
    with ThreadShares(cores=lambda: 8).job("fixed", threads=2) as fixed:
        assert fixed() == 2


def test_workers_on_one_machine_divide_the_cores() -> None:
    assert worker_threads(2, cores=2) == 1
    assert worker_threads(3, cores=8) == 2
    assert worker_threads(4, cores=2) == 1


def test_core_count_respects_a_container_quota(tmp_path) -> None:
    quota = tmp_path / "cpu.max"
    quota.write_text("250000 100000\n")
    assert threads._cgroup_cpu_limit(str(quota)) == 2
    quota.write_text("max 100000\n")
    assert threads._cgroup_cpu_limit(str(quota)) is None
    assert threads._cgroup_cpu_limit(str(tmp_path / "missing")) is None
    assert 1 <= threads.available_cores() <= (__import__("os").cpu_count() or 1)


# --------------------------------------------------------------------------- hardware


def test_cpuinfo_flags_decide_native_bf16(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor : 0\nmodel name : Some CPU\nflags : fpu avx2 avx512f avx512_bf16\n")
    name, flags = hardware._cpuinfo(str(info))
    assert name == "Some CPU" and {"avx512f", "avx512_bf16"} <= flags
    caps = cpu_capabilities()
    assert caps.native_bf16 == (caps.avx512_bf16 or caps.amx_bf16)
    assert caps.isa == torch.backends.cpu.get_cpu_capability()
    assert ("bf16" in caps.short) and caps.isa in caps.short


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(hardware, "_WARNED", set())


def test_emulated_bf16_warns_once_with_the_measured_slowdown(monkeypatch, fresh_warnings) -> None:
    monkeypatch.setattr(hardware, "measure_amp_speedup", lambda *a, **k: 0.25)
    check = check_precision(CPU, torch.bfloat16)
    assert check.slow and check.speedup == 0.25
    assert "4.0x slower than float32" in check.message and "'auto'" in check.message
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_amp("bf16", CPU) == torch.bfloat16  # explicit is honoured ...
        assert resolve_amp("bf16", CPU) == torch.bfloat16
    slow = [w for w in caught if issubclass(w.category, SlowPrecisionWarning)]
    assert len(slow) == 1 and "4.0x slower" in str(slow[0].message)  # ... and warned once


def test_native_fast_precision_does_not_warn(monkeypatch, fresh_warnings) -> None:
    monkeypatch.setattr(hardware, "measure_amp_speedup", lambda *a, **k: 1.45)
    assert not check_precision(CPU, torch.bfloat16).slow
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPrecisionWarning)
        assert resolve_amp("bf16", CPU) == torch.bfloat16
    assert resolve_amp("auto", CPU) is None  # auto is float32 on every CPU


def test_a_remembered_slow_precision_falls_back_to_auto(monkeypatch) -> None:
    monkeypatch.setattr(hardware, "measure_amp_speedup", lambda *a, **k: 1 / 30)
    choice, message = validate_precision("bf16", CPU)
    assert choice == "auto" and "'bf16' not used" in message and "30.0x slower" in message
    assert validate_precision("auto", CPU) == ("auto", None)
    assert validate_precision("off", CPU) == ("off", None)
    monkeypatch.setattr(hardware, "measure_amp_speedup", lambda *a, **k: 1.4)
    assert validate_precision("bf16", CPU) == ("bf16", None)  # fast here: kept


def test_micro_timing_measures_both_precisions() -> None:
    speed = hardware.measure_amp_speedup(CPU, torch.bfloat16, dim=32, head_dim=16)
    assert 0 < speed < 100
    assert hardware.measure_amp_speedup(CPU, torch.bfloat16, dim=32, head_dim=16) == speed  # cached


def test_runtime_line_names_device_precision_threads_and_batch() -> None:
    line = describe_runtime(CPU, None, threads=3, batch_size=4)
    assert line.startswith("cpu (") and cpu_capabilities().short in line
    assert "float32" in line and "3 threads" in line and "batch 4" in line
    assert "bf16 autocast" in describe_runtime(CPU, torch.bfloat16, threads=1)


# --------------------------------------------------------------------------- predictor


def test_predictor_runs_with_its_thread_budget_and_restores_the_callers() -> None:
    model = tiny_segmenter()
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    want = before + 1
    Predictor(model, device="cpu", threads=want, batch_size=2).predict(rings_source(96))
    assert seen and set(seen) == {want}
    assert torch.get_num_threads() == before

    shares = iter([1, 2, 1, 2, 1, 2, 1, 2, 1, 2, 1, 2] * 10)
    seen.clear()
    Predictor(model, device="cpu", threads=lambda: next(shares), batch_size=2).predict(
        rings_source(96))
    assert set(seen) == {1, 2}  # a share is re-read before every batch
    with pytest.raises(Exception, match="threads"):
        Predictor(model, device="cpu", threads=0)


def _tuned_counts(tuner: ThreadTuner, budget: int, seconds_per_item: dict[int, float],
                  batches: int) -> list[int]:
    """The counts a tuner chooses over ``batches`` batches of 4 items on a machine where each
    count takes the given seconds per item."""
    chosen = []
    for _ in range(batches):
        n = tuner.choose(budget)
        tuner.record(n, 4 * seconds_per_item[n], 4)
        chosen.append(n)
    return chosen


def test_thread_tuner_uses_the_fastest_count_and_follows_a_change_of_load() -> None:
    assert ThreadTuner.candidates(1) == [1]
    assert ThreadTuner.candidates(2) == [2, 1]
    assert ThreadTuner.candidates(8) == [8, 4, 1]
    tuner = ThreadTuner(explore_every=10)
    assert tuner.choose(1) == 1 and tuner.best() is None
    # a quiet machine: the whole budget is fastest
    quiet = {8: 0.05, 4: 0.08, 1: 0.2}
    chosen = _tuned_counts(tuner, 8, quiet, 200)
    assert chosen[:4] == [8, 8, 4, 1]  # the warm-up batch (not counted), then each count once
    assert tuner.best() == 8 and chosen[4:].count(8) >= 0.88 * len(chosen[4:])
    assert {4, 1} <= set(chosen[4:])  # the others are tried again now and then
    # every core becomes busy: one thread is fastest now; the tuner follows within a few
    # rounds of exploring, and then spends at most one batch in ten elsewhere
    busy = {8: 0.6, 4: 0.3, 1: 0.1}
    chosen = _tuned_counts(tuner, 8, busy, 200)
    assert tuner.best() == 1
    switched = chosen.index(1)
    assert switched <= 2 * 10 * 2
    assert chosen[switched:].count(1) >= 0.88 * len(chosen[switched:])
    # the budget shrinks (another job started): only counts within it
    assert set(_tuned_counts(tuner, 2, {2: 0.1, 1: 0.1}, 30)) <= {1, 2}


def test_an_adaptive_predictor_times_its_candidates_and_keeps_fixed_counts_fixed() -> None:
    model = tiny_segmenter()
    source = rings_source(160)
    fixed = Predictor(model, device="cpu", threads=2, batch_size=2, cache_tiles=0)
    expected = fixed.predict(source, probabilities=True).probs
    assert not fixed.thread_tuner.seconds_per_item  # an explicit count is the user's
    seen: list[int] = []
    model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    tuned = Predictor(model, device="cpu", threads=2, adapt_threads=True, batch_size=2,
                      cache_tiles=0)
    result = tuned.predict(source, probabilities=True)
    assert set(tuned.thread_tuner.seconds_per_item) == {1, 2} and set(seen) == {1, 2}
    assert torch.get_num_threads() == before
    np.testing.assert_allclose(result.probs, expected, atol=1e-5)
    # no count given: the calling thread's is the budget, tuned; a share is tuned unless the
    # user set the Threads count
    assert Predictor(model, device="cpu")._adaptive()
    pool = ThreadShares(threads=None, cores=lambda: 4)
    with pool.job("view") as share:
        assert share.adaptive and Predictor(model, device="cpu", threads=share)._adaptive()
    pool.threads = 3
    with pool.job("view") as share:
        assert not share.adaptive
    with pool.job("view", threads=2) as share:
        assert not share.adaptive


def test_predictor_estimates_seconds_per_tile() -> None:
    pred = Predictor(tiny_segmenter(), device="cpu", batch_size=2, cache_tiles=0)
    assert pred.seconds_per_tile is None and pred.tiles_within(1.0) is None
    pred.predict(rings_source(96))
    spt = pred.seconds_per_tile
    assert spt is not None and spt > 0
    assert pred.tiles_within(10.5 * spt) == 10
    assert pred.tiles_within(0.0) == 0
    line = pred.describe()
    assert "float32" in line and "batch 2" in line


# --------------------------------------------------------------------------- CLI


def test_cli_warns_in_one_line_and_takes_threads(tmp_path, monkeypatch, capsys,
                                                 fresh_warnings) -> None:
    monkeypatch.setattr(hardware, "measure_amp_speedup", lambda *a, **k: 0.1)
    folder = tiny_segmenter().save(tmp_path / "model")
    image = tmp_path / "image.npy"
    np.save(image, np.zeros((64, 64), np.uint8))
    seen: list[int] = []
    import napari_muvit.engine.predictor as engine_predict

    real = engine_predict.Predictor.predict

    def spy(self, *a, **k):
        seen.append(self.threads)
        return real(self, *a, **k)

    monkeypatch.setattr(engine_predict.Predictor, "predict", spy)
    code = main(["predict", str(image), "--model", str(folder), "--out", str(tmp_path / "o.zarr"),
                 "--device", "cpu", "--amp", "bf16", "--threads", "1"])
    assert code == 0
    err = capsys.readouterr().err.splitlines()
    warn = [line for line in err if "warning:" in line]
    assert len(warn) == 1, err
    assert warn[0].startswith("napari-muvit predict: warning: bf16 is emulated")
    assert "10.0x slower" in warn[0]
    assert any("bf16 autocast" in line and "1 thread," in line for line in err)  # runtime line
    assert seen == [1]

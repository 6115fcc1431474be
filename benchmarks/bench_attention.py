"""Attention and RoPE kernels of one encoder layer, timed alternately in one process (CPU).

The numbers behind "RoPE" and "Why the bf16 goal is not reached" in docs/benchmarks.md, at
the paper encoder's shapes (B 1, 8 heads, N 3072 tokens = 3 levels × 32², head dim 64):

* attention: PyTorch's SDPA (the CPU flash kernel) in float32 and bfloat16, against a chunked
  bfloat16 ``bmm → softmax → bmm`` (the fastest alternative found); error = max |Δ| / max |fp32
  SDPA output|; GFLOP/s = 4·N²·dh·heads / time;
* RoPE: q and k rotated by :func:`napari_muvit.model.rope.apply_rope` (one complex multiply
  into a contiguous buffer) against the real-valued formula on strided views of the fused
  projection (the official package's way), float32 and bfloat16 inputs;
* a dense float32 2048³ matmul as the machine's reference rate.

Every case is the best of ``--reps`` alternating runs. Writes a small JSON summary (default
``docs/data/attention.json``) with the machine load and the rows of the doc tables.

    python benchmarks/bench_attention.py                # 1 thread, 5 reps (~1 CPU-minute)
    python benchmarks/bench_attention.py --threads 2 --json /tmp/attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from napari_muvit.model.rope import apply_rope

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "docs" / "data" / "attention.json"


def best_of(cases: dict[str, Callable[[], Any]], reps: int) -> dict[str, float]:
    """Best wall time (s) per case, cases run alternately (order reversed every repetition)."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for fn in cases.values():  # warm-up: oneDNN primitive creation, allocator
        fn()
    for rep in range(reps):
        for name in (list(cases) if rep % 2 == 0 else list(reversed(cases))):
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int
                      ) -> torch.Tensor:
    """``softmax(q kᵀ / √d) v`` in query chunks with bmm (logits in the input dtype)."""
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    out = torch.empty_like(q)
    for i in range(0, q.shape[-2], chunk):
        logits = torch.matmul(q[..., i : i + chunk, :], kt) * scale
        out[..., i : i + chunk, :] = torch.matmul(torch.softmax(logits, dim=-1), v)
    return out


def reference_rope(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The real-valued rotation of interleaved pairs on the strided (2, B, H, N, dh) view, in
    float32 (``x·cos + rotate_half(x)·sin`` with per-element cos/sin)."""
    B, N, half = cos.shape
    c = cos.repeat_interleave(2, -1).reshape(B, 1, N, 2 * half)
    s = sin.repeat_interleave(2, -1).reshape(B, 1, N, 2 * half)
    x = qk.float()
    rotated = torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    return (x * c + rotated * s).to(qk.dtype)


def attention_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    B, H, N, dh = 1, args.heads, args.tokens, args.head_dim
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, dh, generator=gen) for _ in range(3))
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    cases = {
        "SDPA fp32 (flash kernel)": lambda: F.scaled_dot_product_attention(q, k, v),
        "SDPA bf16 (flash kernel)": lambda: F.scaled_dot_product_attention(qb, kb, vb),
        "bf16 bmm → softmax → bmm, 128-query chunks":
            lambda: chunked_attention(qb, kb, vb, 128),
    }
    best = best_of(cases, args.reps)
    exact = F.scaled_dot_product_attention(q, k, v)
    scale = float(exact.abs().max())
    flop = 4 * N * N * dh * H
    rows = []
    for name, fn in cases.items():
        err = float((fn().float() - exact).abs().max()) / scale
        rows.append({"case": name, "ms": best[name] * 1e3, "gflops": flop / best[name] / 1e9,
                     "error": err})
        print(f"{name:<45} {best[name] * 1e3:8.1f} ms {flop / best[name] / 1e9:7.1f} GFLOP/s "
              f"error {err:.1e}", flush=True)
    return rows


def rope_section(args: argparse.Namespace) -> list[dict[str, Any]]:
    B, H, N, dh = 1, args.heads, args.tokens, args.head_dim
    gen = torch.Generator().manual_seed(1)
    ang = torch.rand(B, N, dh // 2, generator=gen) * 100
    cos, sin = ang.cos(), ang.sin()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        # (3, B, H, N, dh) strided view of a fused projection output (B, N, 3, H, dh)
        proj = torch.randn(B, N, 3, H, dh, generator=gen).to(dtype)
        qk = proj.permute(2, 0, 3, 1, 4)[:2]
        cases = {
            "ours": lambda qk=qk: apply_rope(qk, cos, sin),
            "reference": lambda qk=qk: reference_rope(qk, cos, sin),
        }
        best = best_of(cases, args.reps)
        diff = float((cases["ours"]().float() - cases["reference"]().float()).abs().max())
        name = "fp32" if dtype == torch.float32 else "bf16"
        rows.append({"dtype": name, "ours_ms": best["ours"] * 1e3,
                     "reference_ms": best["reference"] * 1e3,
                     "speedup": best["reference"] / best["ours"], "max_abs_diff": diff})
        print(f"RoPE {name}: ours {best['ours'] * 1e3:.1f} ms, reference "
              f"{best['reference'] * 1e3:.1f} ms (x{best['reference'] / best['ours']:.1f}), "
              f"max |diff| {diff:.1e}", flush=True)
    return rows


def matmul_gflops(reps: int, n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = best_of({"mm": lambda: a @ b}, reps)["mm"]
    return 2 * n**3 / best / 1e9


def doc_tables(out: dict[str, Any]) -> dict[str, list[list[str]]]:
    attention = [["attention", "ms", "GFLOP/s", "error"]]
    for r in out["attention"]:
        attention.append([r["case"], f"{r['ms']:.0f}", f"{r['gflops']:.0f}",
                          "0" if r["error"] == 0 else f"{r['error']:.1e}"])
    rope = [["input", "ours ms", "reference ms", "speed-up"]]
    for r in out["rope"]:
        rope.append([r["dtype"], f"{r['ours_ms']:.1f}", f"{r['reference_ms']:.1f}",
                     f"×{r['speedup']:.1f}"])
    return {"attention": attention, "rope": rope}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=3072)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    out: dict[str, Any] = {"matmul_fp32_gflops": matmul_gflops(args.reps)}
    print(f"dense fp32 matmul: {out['matmul_fp32_gflops']:.0f} GFLOP/s", flush=True)
    out["attention"] = attention_section(args)
    out["rope"] = rope_section(args)
    summary = {
        "script": "benchmarks/bench_attention.py",
        "command": " ".join(["python", "benchmarks/bench_attention.py", *argv]),
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%MZ"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.backends.cpu.get_cpu_capability()}), {args.threads} thread(s)",
        "load_average_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        **out,
        "tables": doc_tables(out),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

"""Encoder speed: napari-muvit ``MuViTEncoder`` vs the official muvit 0.1.0 encoder.

Both models hold the same weights (ours exported with the official key names and loaded into
the official class) and are timed alternately in one process, fp32 and under bf16 autocast,
so machine load affects both equally. Also reports the achieved GFLOP/s against a dense matmul
measured in the same run, and a CUDA section (fp32 / bf16 / fp16, flash SDPA) when a GPU exists.

The official package is heavy (lightning, wandb, ...) and is installed ONLY in a separate venv::

    python -m venv --system-site-packages /tmp/muvit-venv
    /tmp/muvit-venv/bin/pip install muvit==0.1.0
    /tmp/muvit-venv/bin/python benchmarks/bench_encoder.py            # paper config
    /tmp/muvit-venv/bin/python benchmarks/bench_encoder.py --quick    # 2 layers, fast

Without ``muvit`` importable the baseline is :class:`ReferenceEncoder` below, a faithful
re-implementation of the official math (separate q/k/v projections, x-transformers style RoPE
in float32 with concatenation, einops-like head reshapes), and the output says so.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from napari_muvit.model import MuViTEncoder
from napari_muvit.model.checkpoint import ours_to_official


# ----------------------------------------------------------------------------- baseline
class ReferenceEncoder(nn.Module):
    """The official encoder's math written out plainly (spec §4), official key names.

    Used as the baseline when the official package is not importable.
    """

    def __init__(
        self, in_channels: int, levels, patch_size: int, dim: int, num_layers: int, heads: int
    ):
        super().__init__()
        self.levels, self.P, self.D, self.H = tuple(levels), patch_size, dim, heads
        L = len(levels)
        self.level_embed = nn.Parameter(torch.zeros(L, 1, 1, dim))
        self.proj = nn.ModuleList(
            nn.Sequential(nn.Linear(patch_size * patch_size * in_channels, dim), nn.LayerNorm(dim))
            for _ in range(L)
        )
        dh = dim // heads
        d_x = 2 * ((dh // 2) // 2)
        self.split = (dh - d_x, d_x)
        layers = []
        for _ in range(num_layers):
            m = nn.Module()
            m.attn = nn.Module()
            for n in ("to_q", "to_k", "to_v", "to_out"):
                setattr(m.attn, n, nn.Linear(dim, dim, bias=False))
            m.norm1, m.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            m.ff = nn.Module()
            m.ff.ff = nn.Sequential(
                nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU()),
                nn.Identity(),
                nn.Linear(2 * dim, dim),
            )
            m.rotary_pos_embs = nn.ModuleList()
            for d in self.split:
                r = nn.Module()
                r.inv_freq = nn.Parameter(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
                m.rotary_pos_embs.append(r)
            layers.append(m)
        self.layers = nn.ModuleList(layers)

    def _rope(self, t: Tensor, freqs: Tensor) -> Tensor:
        with torch.autocast(t.device.type, enabled=False):
            tf = t.float()
            f = freqs[:, None].float()
            x = tf.unflatten(-1, (-1, 2))
            rot = torch.stack((-x[..., 1], x[..., 0]), -1).flatten(-2)  # rotate_half, interleaved
            return (tf * f.cos() + rot * f.sin()).to(t.dtype)

    def forward(self, x: Tensor) -> Tensor:
        B, _, C, Hh, Ww = x.shape
        P = self.P
        h, w = Hh // P, Ww // P
        toks, coords = [], []
        for i, lv in enumerate(self.levels):
            p = x[:, i].reshape(B, C, h, P, w, P).permute(0, 2, 4, 3, 5, 1).reshape(B, h * w, -1)
            toks.append(self.proj[i](p) + self.level_embed[i, 0, 0])
            tl = torch.tensor([-lv * (Hh / 2 - 0.5), -lv * (Ww / 2 - 0.5)])
            uy, ux = torch.linspace(0, 1, h), torch.linspace(0, 1, w)
            g = torch.stack(torch.meshgrid(uy, ux, indexing="ij"), -1).reshape(-1, 2)
            coords.append(tl + g * (-2 * tl))
        t = torch.cat(toks, 1)
        c = torch.cat(coords, 0)[None].expand(B, -1, -1).to(x.device)
        Hd = self.H
        for m in self.layers:
            fy = c[..., 0:1] * m.rotary_pos_embs[0].inv_freq
            fx = c[..., 1:2] * m.rotary_pos_embs[1].inv_freq
            freqs = torch.cat(
                (torch.stack((fy, fy), -1).flatten(-2), torch.stack((fx, fx), -1).flatten(-2)), -1
            )
            u = m.norm1(t)
            q, k, v = (
                getattr(m.attn, n)(u).unflatten(-1, (Hd, -1)).transpose(1, 2)
                for n in ("to_q", "to_k", "to_v")
            )
            q, k = self._rope(q, freqs), self._rope(k, freqs)
            o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
            t = t + m.attn.to_out(o)
            t = t + m.ff.ff(m.norm2(t))
        return t


def make_official(cfg: dict, state: dict) -> tuple[nn.Module, str]:
    try:
        from muvit.encoders import MuViTEncoder2d  # type: ignore[import-not-found]
    except ImportError as exc:  # not installed here: use the reference implementation
        ref = ReferenceEncoder(
            cfg["in_channels"],
            cfg["levels"],
            cfg["patch_size"],
            cfg["dim"],
            cfg["num_layers"],
            cfg["heads"],
        )
        ref.load_state_dict(state)
        return (
            ref,
            f"in-script reference implementation (muvit not importable: {exc.__class__.__name__})",
        )
    import muvit  # type: ignore[import-not-found]

    off = MuViTEncoder2d(
        in_channels=cfg["in_channels"],
        levels=tuple(cfg["levels"]),
        patch_size=cfg["patch_size"],
        num_layers=cfg["num_layers"],
        dim=cfg["dim"],
        heads=cfg["heads"],
    )
    off.load_state_dict(state)

    class _Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)[0]

    return _Wrap(off), f"official muvit {getattr(muvit, '__version__', '0.1.0')}"


# ----------------------------------------------------------------------------- helpers
def encoder_flops(
    levels: int, size: int, patch: int, dim: int, layers: int, channels: int = 1
) -> float:
    """Multiply-adds ×2 of one forward (batch 1): embeddings + per layer qkv/out/attn/FF."""
    N = levels * (size // patch) ** 2
    per_layer = (
        2 * N * dim * 3 * dim + 2 * N * dim * dim + 4 * N * N * dim + 2 * 2 * N * dim * 2 * dim
    )
    return layers * per_layer + 2 * N * patch * patch * channels * dim


def timeit(fn: Callable[[], object], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def matmul_gflops(dtype: torch.dtype, device: str = "cpu", n: int = 2048, reps: int = 3) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    best = min(timeit(lambda: a @ b, sync) for _ in range(reps))
    return 2 * n**3 / best / 1e9


def run_pair(
    ours: nn.Module,
    base: nn.Module,
    x: Tensor,
    ctx: Callable,
    reps: int,
    sync: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[float]]:
    """Alternate ours/baseline ``reps`` times after one warm-up each; order flips every rep."""
    t_o, t_b = [], []
    with torch.inference_mode():
        for m in (ours, base):
            with ctx():
                m(x)
        for r in range(reps):
            order = [(ours, t_o), (base, t_b)] if r % 2 == 0 else [(base, t_b), (ours, t_o)]
            for m, acc in order:
                with ctx():
                    acc.append(timeit(lambda m=m: m(x), sync))
    return t_o, t_b


def fmt(ts: list[float]) -> str:
    return f"median {statistics.median(ts):.3f} s (min {min(ts):.3f})"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=float, nargs="+", default=[1, 8, 32])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 reps")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU section")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.reps = 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    levels = [int(v) if float(v).is_integer() else v for v in args.levels]
    ours = MuViTEncoder(
        1,
        levels,
        patch_size=args.patch,
        dim=args.dim,
        num_layers=args.layers,
        heads=args.heads,
        coord_mode="linspace",
    ).eval()
    state, _ = ours_to_official(ours)
    base, base_name = make_official(ours.config, state)
    base.eval()
    x = torch.rand(args.batch, len(levels), 1, args.size, args.size)
    flops = encoder_flops(len(levels), args.size, args.patch, args.dim, args.layers) * args.batch
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, python {sys.version.split()[0]}"
    )
    print(
        f"config: levels {levels}, {args.size}^2, D {args.dim}, {args.layers} layers, "
        f"{args.heads} heads, P {args.patch}, batch {args.batch}, "
        f"{len(levels) * (args.size // args.patch) ** 2} tokens, {flops / 1e9:.1f} GFLOP/forward"
    )
    print(f"baseline: {base_name}")
    from napari_muvit.engine.hardware import cpu_capabilities

    caps = cpu_capabilities()
    print(f"hardware: {caps.model} | {caps.short} | load avg "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (bf16 rows below are emulated "
          f"unless the CPU has native bf16)")
    with torch.inference_mode():
        a, b = ours(x), base(x)
    print(
        f"max |ours - baseline| / max |baseline| (fp32): {float((a - b).abs().max() / b.abs().max()):.2e}"
    )

    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if not args.no_cpu:
        mm32, mm16 = matmul_gflops(torch.float32), matmul_gflops(torch.bfloat16)
        print(f"dense matmul 2048^3: fp32 {mm32:.0f} GFLOP/s, bf16 {mm16:.0f} GFLOP/s")
        for name, ctx, mm in (
            ("fp32", contextlib.nullcontext, mm32),
            ("bf16 autocast", bf16, mm16),
        ):
            to, tb = run_pair(ours, base, x, ctx, args.reps)
            mo, mb = statistics.median(to), statistics.median(tb)
            print(
                f"CPU {name:13s} ours {fmt(to)} | baseline {fmt(tb)} | speed-up x{mb / mo:.2f} "
                f"| ours {flops / mo / 1e9:.0f} GFLOP/s = {flops / mo / 1e9 / mm:.0%} of matmul"
            )
        with torch.inference_mode():
            ref = ours(x)
            with bf16():
                low = ours(x).float()
        print(
            f"bf16 vs fp32 features (ours): max rel err {float((low - ref).abs().max() / ref.abs().max()):.2e}"
        )

    if torch.cuda.is_available():
        dev = "cuda"
        ours_c, base_c, xc = ours.to(dev), base.to(dev), x.to(dev)
        sync = torch.cuda.synchronize
        print(f"CUDA: {torch.cuda.get_device_name()}")
        for name, dt in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            ctx = (
                contextlib.nullcontext
                if dt is None
                else (lambda dt=dt: torch.autocast("cuda", dtype=dt))
            )
            mm = matmul_gflops(dt or torch.float32, dev, 8192)
            to, tb = run_pair(ours_c, base_c, xc, ctx, max(args.reps, 10), sync)
            mo, mb = statistics.median(to), statistics.median(tb)
            print(
                f"CUDA {name}: ours {fmt(to)} | baseline {fmt(tb)} | speed-up x{mb / mo:.2f} | "
                f"ours {flops / mo / 1e12:.1f} TFLOP/s = {flops / mo / 1e9 / mm:.0%} of matmul"
            )


if __name__ == "__main__":
    main()

"""Parameters and forward FLOPs of the MuViT encoder and the two decoder heads.

The numbers behind "Decoder heads" in docs/benchmarks.md. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode`` during one real forward pass of batch 1 (2 FLOPs
per multiply-add, counting matmuls, convolutions and attention, whose CPU kernel torch's table
misses and this script adds; elementwise ops are not counted), so they do not depend on the
machine. The heads get random encoder features of the
right shapes (their cost does not depend on the values). Writes a small JSON summary
(default ``docs/data/model_size.json``) with the rows the doc table is checked against.

    python benchmarks/model_size.py                 # paper config: D 512, 12 layers, 256², K 12
    python benchmarks/model_size.py --dim 64 --layers 2 --crop 64 --json /tmp/small.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from napari_muvit.data.geometry import centered_nested_bboxes
from napari_muvit.model import MuViTEncoder, MuViTSegmenter

DEFAULT_JSON = Path(__file__).resolve().parents[1] / "docs" / "data" / "model_size.json"
# MuViT paper, Table S2 (M parameters): segmenters with one or three levels
PAPER_PARAMS = {
    ("unetr", (1,)): 31.66,
    ("unetr", (1, 8, 32)): 35.02,
    ("mask2former", (1,)): 33.44,
    ("mask2former", (1, 8, 32)): 36.80,
}


def millions(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def encoder(args: argparse.Namespace, levels: tuple[float, ...]) -> MuViTEncoder:
    torch.manual_seed(0)
    return MuViTEncoder(args.channels, levels, patch_size=args.patch, dim=args.dim,
                        num_layers=args.layers, heads=args.heads)


def _attention_flop(q_shape: Any, k_shape: Any, v_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(q_shape, k_shape, v_shape)


def count_gflop(fn: Any) -> float:
    # no torch.no_grad() here: the counter's module hooks fail under it; the models are frozen
    # (requires_grad False) instead, so no autograd graph is built either
    # torch's table has no entry for the CPU flash-attention kernel: count it like the others
    cpu_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    counter = FlopCounterMode(display=False, custom_mapping={cpu_flash: _attention_flop})
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def measure(args: argparse.Namespace) -> dict[str, Any]:
    levels = tuple(float(v) for v in args.levels)
    S, P = args.crop, args.patch
    x = torch.randn(1, len(levels), args.channels, S, S)
    bbox = torch.as_tensor(centered_nested_bboxes((0, 0), S, levels))[None]
    enc = encoder(args, levels).eval().requires_grad_(False)
    out: dict[str, Any] = {
        "encoder": {"params_M": millions(enc), "gflop": count_gflop(lambda: enc(x, bbox))},
        "heads": {},
        "segmenters": {},
    }
    h = w = S // P
    n = h * w
    coords = enc.token_coords(bbox, x.shape, x.device)
    tokens = torch.randn(1, n * len(levels), args.dim)
    for head in ("unetr", "mask2former"):
        for taper in (False, True):
            seg = MuViTSegmenter(encoder(args, levels), head=head, num_classes=args.classes,
                                 head_dim=args.head_dim, head_options={"taper": taper})
            seg.eval().requires_grad_(False)
            maps = [torch.randn(1, args.dim, h, w) for _ in seg.head_options["skips"]]
            gflop = count_gflop(lambda: seg.head(maps, x[:, 0], tokens=tokens, coords=coords))
            out["heads"][f"{head}{'_taper' if taper else ''}"] = {
                "params_M": millions(seg.head), "gflop": gflop}
            print(f"{head:<12} taper={taper!s:<5} {millions(seg.head):6.2f} M  {gflop:7.1f} GFLOP",
                  flush=True)
        for seg_levels in ((1.0,), levels):
            seg = MuViTSegmenter(encoder(args, seg_levels), head=head, num_classes=args.classes,
                                 head_dim=args.head_dim)
            key = f"{head}[{','.join(f'{v:g}' for v in seg_levels)}]"
            paper = PAPER_PARAMS.get((head, tuple(int(v) for v in seg_levels)))
            out["segmenters"][key] = {"params_M": millions(seg), "paper_params_M": paper}
    print(f"encoder {out['encoder']['params_M']:.2f} M  {out['encoder']['gflop']:.1f} GFLOP")
    return out


def doc_tables(out: dict[str, Any]) -> dict[str, list[list[str]]]:
    """The rows of the doc tables (header first), formatted as docs/benchmarks.md shows them."""
    enc = out["encoder"]
    heads = [["head", "channels", "parameters (M)", "GFLOP per crop",
              "GFLOP per crop with the encoder"]]
    for key, r in out["heads"].items():
        name, _, taper = key.partition("_")
        heads.append([{"unetr": "UNETR", "mask2former": "Mask2Former"}[name],
                      "halved per stage" if taper else "constant",
                      f"{r['params_M']:.2f}", f"{r['gflop']:.1f}",
                      f"{r['gflop'] + enc['gflop']:.0f}"])
    segs = [["segmenter", "parameters (M)", "paper (M)"]]
    for key, r in out["segmenters"].items():
        head, _, levels = key.partition("[")
        name = f"MuViT[{levels}+{ {'unetr': 'UNETR', 'mask2former': 'Mask2Former'}[head]}"
        paper = r["paper_params_M"]
        segs.append([name, f"{r['params_M']:.2f}", "" if paper is None else f"{paper:.2f}"])
    return {"heads": heads, "segmenters": segs}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=float, nargs="+", default=[1, 8, 32])
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = measure(args)
    summary = {
        "script": "benchmarks/model_size.py",
        "command": " ".join(["python", "benchmarks/model_size.py", *argv]),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "counting": "torch.utils.flop_counter.FlopCounterMode, batch 1, 2 FLOPs per multiply-add",
        "torch": torch.__version__,
        **out,
        "tables": doc_tables(out),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

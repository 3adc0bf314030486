"""The one-token kernels of this checkout (b) against an earlier copy of them (a), on the
same random weights, one GPU, no vLLM.

26B-A4B's attention projections (``marlin_gemv``), its experts (``marlin_moe``, routing
included, top 8 of 128; both int4 in Marlin's layout) and its bf16 dense MLP
(``dense_decode``'s two kernels, each timed alone). Weights are cycled past L2 as decode
reads them (the projections and the dense MLP: copies of the weights; the experts: router
logits whose top 8 are disjoint from call to call). Each side gets the fastest tiles of
the same sweep (``--wide``: b also tries programs of up to 32 warps, a row tile a warp,
where fewer programs share a tile's K); a / b is printed per shape, with how far the two
outputs differ (both sides are within 0.2% of the exact product, 0.31% the experts; tests/).

    git archive REV src/gemma4_quant/kernels | tar -x -C OLD
    python bench/int4_loop_ab.py --old OLD/src/gemma4_quant/kernels [--out F.json] \
        [--skip-moe] [--skip-dense] [--wide] [--prefetch 1,2,4] [--shapes qkv,o,...] \
        [--maxnreg 80,96,128]

The dense MLP's side b also tries each tile with ``ahead`` (each step loading the next
one's columns first). ``--maxnreg``: side b also tries ``MAXNREG_SWEEP*``'s tiles with each
register limit for ``ptxas`` (the kernels' ``maxnreg`` tiles; bench/int4_sass.py shows
what it does to the loops).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_decode import fastest_tiles, rotated  # noqa: E402  (bench/moe_decode.py)

from gemma4_quant.kernels import dense_decode, marlin_gemv, marlin_moe  # noqa: E402

GROUP = 32
# (name, K, N) of 26B-A4B's attention projections
SHAPES = (("qkv", 2816, 8192), ("o", 4096, 2816), ("qkv_global", 2816, 10240),
          ("o_global", 8192, 2816))  # fmt: skip
HIDDEN, INTER, EXPERTS, TOP_K = 2816, 704, 128, 8
# small sweeps (each tile compiles once per side); they hold the earlier kernels' best, and
# 16 row tiles a step, where the new loop's instructions per weight are lowest (int4_sass.py)
GEMV_SWEEP = {"split": (4, 8, 16), "block_kt": (4, 8, 16), "warps": (4, 8)}
MOE_SWEEP13 = {"split13": (4, 8), "block_kt13": (4, 8, 16), "warps13": (4,)}
MOE_SWEEP2 = {"split2": (1, 2), "block_kt2": (2, 4, 8), "warps2": (4,)}
# --wide: side b also tries whole row tiles a warp with up to 32 warps a program, where
# fewer programs share a tile's K (fewer split-K atomics, the sum across warps in shared
# memory instead)
WIDE = ((8, 8), (16, 16), (32, 32), (16, 8), (32, 16))  # (row tiles a step, warps)
GEMV_WIDE = [{"split": s, "block_kt": b, "warps": w} for s in (1, 2, 4, 8, 16) for b, w in WIDE]
MOE_WIDE13 = [{"split13": s, "block_kt13": b, "warps13": w}
              for s in (1, 2, 4, 8) for b, w in WIDE[:3]]  # fmt: skip
MOE_WIDE2 = [{"split2": s, "block_kt2": b, "warps2": w} for s in (1, 2, 4) for b, w in WIDE[:2]]
# --maxnreg: the tiles side b also tries with each register limit
MAXNREG_SWEEP = {"split": (4, 8, 16), "block_kt": (4, 8), "warps": (4,)}
MAXNREG_SWEEP13 = {"split13": (4, 8), "block_kt13": (4, 8), "warps13": (4,)}
MAXNREG_SWEEP2 = {"split2": (1, 2), "block_kt2": (4, 8), "warps2": (4,)}
DENSE_INTER = 2112
DENSE_SWEEP = {"block_n": (2, 4, 8), "block_k": (256, 512), "warps": (4, 8)}


def load_kernels(path: Path | None = None):
    """``marlin_gemv``, ``marlin_moe`` and ``dense_decode`` of this checkout, or of an earlier
    ``gemma4_quant/kernels`` folder (imported as the package ``old_kernels``)."""
    if path is None:
        return marlin_gemv, marlin_moe, dense_decode
    spec = importlib.util.spec_from_file_location(
        "old_kernels", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["old_kernels"] = package
    spec.loader.exec_module(package)
    return tuple(importlib.import_module(f"old_kernels.{name}")
                 for name in ("marlin_gemv", "marlin_moe", "dense_decode"))  # fmt: skip


def grid(sweep: dict) -> list[dict]:
    return [dict(zip(sweep, v, strict=True)) for v in itertools.product(*sweep.values())]


TIMINGS: dict[str, list[dict]] = {}  # every tile's time, by kernel and side (--out)


def fastest(name: str, make, candidates: list[dict], calls: int) -> tuple[float, dict]:
    """``fastest_tiles``'s choice, with its time per call."""
    timings = TIMINGS.setdefault(name, [])
    tiles = fastest_tiles(name, candidates, make, timings, calls)
    return min(r["us"] for r in timings if r["tune"] == tiles), tiles


def sweep(side: str, standard: list[dict], wide: list[dict] | None) -> list[dict]:
    """The tiles a side tries: ``standard``, and for side b ``wide`` too (``--wide``)."""
    return standard + wide if side == "b" and wide else standard


def with_maxnreg(side: str, tiles: dict, limits: list[int], suffix: str = "") -> list[dict]:
    """For side b, ``grid(tiles)`` with each register limit (``--maxnreg``)."""
    if side != "b":
        return []
    return [{**t, f"maxnreg{suffix}": r} for t in grid(tiles) for r in limits]


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gemv_calls(module, x: torch.Tensor, copies: list):
    """tiles -> one call per copy of the weights."""

    def make(tiles: dict):
        return rotated(lambda w, s: lambda: module.marlin_gemv(x, w, s, GROUP, **tiles), copies)

    return make


def gemv_rows(
    old_gemv,
    gen: torch.Generator,
    wide: bool,
    shapes: set[str],
    prefetch: list[int],
    maxnreg: list[int],
) -> list[dict]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, k, n in (shape for shape in SHAPES if shape[0] in shapes):
        words, scales = random_marlin(gen, k, n)
        x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
        count = max(2, math.ceil(3 * l2 / (words.numel() * 4 + scales.numel() * 2)))
        copies = [(words.clone(), scales.clone()) for _ in range(count)]
        row = {"shape": name, "k": k, "n": n}
        for side, module in (("a", old_gemv), ("b", marlin_gemv)):
            make = gemv_calls(module, x, copies)
            tried = sweep(side, grid(GEMV_SWEEP), GEMV_WIDE if wide else None)
            tried += with_maxnreg(side, MAXNREG_SWEEP, maxnreg)
            if side == "b":  # a's fastest tiles with each prefetch distance too
                tried += [{**row["a_tiles"], "prefetch": d} for d in prefetch]
            us, tiles = fastest(f"{name} {side}", make, tried, count)
            row[f"{side}_us"], row[f"{side}_tiles"] = round(us, 2), tiles
        outs = [m.marlin_gemv(x, words, scales, GROUP, **row[f"{s}_tiles"])
                for s, m in (("a", old_gemv), ("b", marlin_gemv))]  # fmt: skip
        row["a_over_b"] = round(row["a_us"] / row["b_us"], 3)
        row["output_diff"] = diff(outs[1], outs[0])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def tiles_of(tiles: dict, kernel: str) -> dict:
    """The entries of MoE ``tiles`` that belong to kernel ``"13"`` or ``"2"``."""
    return {key: v for key, v in tiles.items() if key.endswith(kernel)}


def random_marlin(gen: torch.Generator, k: int, n: int, *experts: int):
    """Random 4-bit words and scales of a ``[K, N]`` matrix in Marlin's layout (``experts``:
    that many of them, stacked)."""
    words = torch.randint(-(2**31), 2**31 - 1, (*experts, k // 16, 2 * n), generator=gen,
                          device="cuda", dtype=torch.int32)  # fmt: skip
    scales = torch.rand(*experts, k // GROUP, n, generator=gen, device="cuda") * 0.02 + 0.005
    return words, scales.bfloat16()


def random_experts(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """26B-A4B's experts in Marlin's layout: w13, its scales, w2, its scales, and the
    per-expert scale."""
    w13, s13 = random_marlin(gen, HIDDEN, 2 * INTER, EXPERTS)
    w2, s2 = random_marlin(gen, INTER, HIDDEN, EXPERTS)
    scale = torch.rand(EXPERTS, generator=gen, device="cuda").bfloat16() + 0.5
    return w13, s13, w2, s2, scale


def moe_row(
    old_moe, gen: torch.Generator, wide: bool, prefetch: list[int], maxnreg: list[int]
) -> dict:
    w13, s13, w2, s2, scale = random_experts(gen)
    x = torch.randn(1, HIDDEN, generator=gen, device="cuda").bfloat16()
    # one call per set of 8 experts, no two sets sharing one: no call finds its experts in L2
    sets = EXPERTS // TOP_K
    logits = torch.randn(sets, 1, EXPERTS, generator=gen, device="cuda")
    for i in range(sets):
        logits[i, 0, i * TOP_K : (i + 1) * TOP_K] += 20.0
    row: dict = {"shape": "moe"}
    for side, module in (("a", old_moe), ("b", marlin_moe)):

        def make(tiles, module=module):
            calls = [lambda r=logits[i]: module.marlin_moe(x, r, scale, w13, s13, w2, s2,
                                                          top_k=TOP_K, **tiles)
                     for i in range(sets)]  # fmt: skip
            return lambda: [c() for c in calls]

        w2_fixed = {"split2": 2, "block_kt2": 4, "warps2": 4}
        tried = [
            {**t, **w2_fixed} for t in sweep(side, grid(MOE_SWEEP13), MOE_WIDE13 if wide else None)
        ]
        tried += [{**t, **w2_fixed} for t in with_maxnreg(side, MAXNREG_SWEEP13, maxnreg, "13")]
        if side == "b":  # a's fastest tiles with each prefetch distance too
            tried += [{**row["a_tiles"], **w2_fixed, "prefetch13": d} for d in prefetch]
        _, best13 = fastest(f"W13 {side}", make, tried, sets)
        tried = [
            {**best13, **t} for t in sweep(side, grid(MOE_SWEEP2), MOE_WIDE2 if wide else None)
        ]
        tried += [{**best13, **t} for t in with_maxnreg(side, MAXNREG_SWEEP2, maxnreg, "2")]
        if side == "b":
            tried += [{**best13, **tiles_of(row["a_tiles"], "2"), "prefetch2": d} for d in prefetch]
        us, tiles = fastest(f"W2 {side}", make, tried, sets)
        row[f"{side}_us"], row[f"{side}_tiles"] = round(us, 2), tiles
    outs = [m.marlin_moe(x, logits[0], scale, w13, s13, w2, s2, top_k=TOP_K, **row[f"{s}_tiles"])
            for s, m in (("a", old_moe), ("b", marlin_moe))]  # fmt: skip
    row["a_over_b"] = round(row["a_us"] / row["b_us"], 3)
    row["output_diff"] = diff(outs[1], outs[0])
    print(json.dumps(row), flush=True)
    return row


def dense_rows(old_dense, gen: torch.Generator) -> list[dict]:
    """``gate_up_act`` (2816 -> 2 x 2112, GELU(tanh) and-mul) and ``down`` (2112 -> 2816),
    each timed alone on copies of its bf16 weights."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    x = torch.randn(1, HIDDEN, generator=gen, device="cuda").bfloat16()
    act = torch.randn(1, DENSE_INTER, generator=gen, device="cuda").bfloat16()
    kernels = (
        ("dense gate_up", (2 * DENSE_INTER, HIDDEN), "1",
         lambda m, w, t: m.gate_up_act(x, w, torch.empty_like(act), activation="gelu_tanh", **t)),
        ("dense down", (HIDDEN, DENSE_INTER), "2",
         lambda m, w, t: m.down(act, w, torch.empty_like(x), **t)),
    )  # fmt: skip
    rows = []
    for name, shape, suffix, call in kernels:
        w = (torch.randn(shape, generator=gen, device="cuda") / shape[1] ** 0.5).bfloat16()
        count = max(2, math.ceil(3 * l2 / (w.numel() * 2)))
        copies = [(w.clone(),) for _ in range(count)]
        tried = [{f"{key}{suffix}": v for key, v in t.items()} for t in grid(DENSE_SWEEP)]
        row: dict = {"shape": name}
        for side, module in (("a", old_dense), ("b", dense_decode)):

            def make(tiles, module=module, call=call, copies=copies):
                return rotated(lambda w_: lambda: call(module, w_, tiles), copies)

            # b: each tile with its steps loading the next one's columns first, too
            ahead = [{**t, f"ahead{suffix}": 1} for t in tried] if side == "b" else []
            us, tiles = fastest(f"{name} {side}", make, tried + ahead, count)
            row[f"{side}_us"], row[f"{side}_tiles"] = round(us, 2), tiles
        outs = [call(m, w, row[f"{s}_tiles"]) for s, m in (("a", old_dense), ("b", dense_decode))]
        row["a_over_b"] = round(row["a_us"] / row["b_us"], 3)
        row["output_diff"] = diff(outs[1], outs[0])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="an earlier kernels folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-moe", action="store_true")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--wide", action="store_true", help="side b also tries WIDE tiles")
    parser.add_argument(
        "--prefetch",
        default="",
        help="prefetch distances b also tries with a's fastest tiles, e.g. 1,2,4",
    )
    parser.add_argument("--maxnreg", default="", help="register limits b also tries, 80,96,128")
    parser.add_argument("--shapes", default=",".join(s[0] for s in SHAPES),
                        help="the projections to time (default: all)")  # fmt: skip
    args = parser.parse_args()
    old_gemv, old_moe, old_dense = load_kernels(args.old)
    gen = torch.Generator(device="cuda").manual_seed(0)
    prefetch = [int(d) for d in args.prefetch.split(",") if d]
    maxnreg = [int(r) for r in args.maxnreg.split(",") if r]
    rows = [] if args.skip_moe else [moe_row(old_moe, gen, args.wide, prefetch, maxnreg)]
    shapes = set(args.shapes.split(","))
    rows += gemv_rows(old_gemv, gen, args.wide, shapes, prefetch, maxnreg)
    rows += [] if args.skip_dense else dense_rows(old_dense, gen)
    print(f"\n{torch.cuda.get_device_name()}\n| shape | a us | b us | a / b | outputs differ |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['a_us']} | {r['b_us']} | {r['a_over_b']} | "
              f"{r['output_diff']:.2e} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows,
                                        "timings": TIMINGS}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-token int4 kernels of this checkout (b) against an earlier copy of them (a), on
the same random weights in Marlin's layout, one GPU, no vLLM.

26B-A4B's attention projections (``marlin_gemv``) and its experts (``marlin_moe``, routing
included, top 8 of 128). Weights are cycled past L2 as decode reads them (the projections:
copies of the weights; the experts: router logits whose top 8 are disjoint from call to
call). Each side gets the fastest tiles of the same sweep; b / a is printed per shape, with
how far the two outputs differ (both are within 0.2% of the exact product; tests/).

    git archive REV src/gemma4_quant/kernels | tar -x -C OLD
    python bench/int4_loop_ab.py --old OLD/src/gemma4_quant/kernels [--out F.json]
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

from gemma4_quant.kernels import marlin_gemv, marlin_moe  # noqa: E402

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


def load_old(path: Path):
    """An earlier ``gemma4_quant/kernels`` folder as the package ``old_kernels``."""
    spec = importlib.util.spec_from_file_location(
        "old_kernels", path / "__init__.py", submodule_search_locations=[str(path)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["old_kernels"] = package
    spec.loader.exec_module(package)
    return (importlib.import_module("old_kernels.marlin_gemv"),
            importlib.import_module("old_kernels.marlin_moe"))  # fmt: skip


def grid(sweep: dict) -> list[dict]:
    return [dict(zip(sweep, v, strict=True)) for v in itertools.product(*sweep.values())]


def fastest(name: str, make, candidates: list[dict], calls: int) -> tuple[float, dict]:
    """``fastest_tiles``'s choice, with its time per call."""
    timings: list[dict] = []
    tiles = fastest_tiles(name, candidates, make, timings, calls)
    return min(r["us"] for r in timings if r["tune"] == tiles), tiles


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def gemv_calls(module, x: torch.Tensor, copies: list):
    """tiles -> one call per copy of the weights."""

    def make(tiles: dict):
        return rotated(lambda w, s: lambda: module.marlin_gemv(x, w, s, GROUP, **tiles), copies)

    return make


def gemv_rows(old_gemv, gen: torch.Generator) -> list[dict]:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    rows = []
    for name, k, n in SHAPES:
        words = torch.randint(-(2**31), 2**31 - 1, (k // 16, 2 * n), generator=gen,
                              device="cuda", dtype=torch.int32)  # fmt: skip
        scales = (torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.02 + 0.005).bfloat16()
        x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
        count = max(2, math.ceil(3 * l2 / (words.numel() * 4 + scales.numel() * 2)))
        copies = [(words.clone(), scales.clone()) for _ in range(count)]
        row = {"shape": name, "k": k, "n": n}
        for side, module in (("a", old_gemv), ("b", marlin_gemv)):
            make = gemv_calls(module, x, copies)
            us, tiles = fastest(f"{name} {side}", make, grid(GEMV_SWEEP), count)
            row[f"{side}_us"], row[f"{side}_tiles"] = round(us, 2), tiles
        outs = [m.marlin_gemv(x, words, scales, GROUP, **row[f"{s}_tiles"])
                for s, m in (("a", old_gemv), ("b", marlin_gemv))]  # fmt: skip
        row["a_over_b"] = round(row["a_us"] / row["b_us"], 3)
        row["output_diff"] = diff(outs[1], outs[0])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def moe_row(old_moe, gen: torch.Generator) -> dict:
    w13 = torch.randint(-(2**31), 2**31 - 1, (EXPERTS, HIDDEN // 16, 4 * INTER), generator=gen,
                        device="cuda", dtype=torch.int32)  # fmt: skip
    w2 = torch.randint(-(2**31), 2**31 - 1, (EXPERTS, INTER // 16, 2 * HIDDEN), generator=gen,
                       device="cuda", dtype=torch.int32)  # fmt: skip
    s13 = (torch.rand(EXPERTS, HIDDEN // GROUP, 2 * INTER, generator=gen, device="cuda") * 0.02
           + 0.005).bfloat16()  # fmt: skip
    s2 = (torch.rand(EXPERTS, INTER // GROUP, HIDDEN, generator=gen, device="cuda") * 0.02
          + 0.005).bfloat16()  # fmt: skip
    scale = torch.rand(EXPERTS, generator=gen, device="cuda").bfloat16() + 0.5
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

        _, best13 = fastest(f"W13 {side}", make, [{**t, "split2": 2, "block_kt2": 4, "warps2": 4}
                                      for t in grid(MOE_SWEEP13)], sets)  # fmt: skip
        us, tiles = fastest(f"W2 {side}", make, [{**best13, **t} for t in grid(MOE_SWEEP2)], sets)
        row[f"{side}_us"], row[f"{side}_tiles"] = round(us, 2), tiles
    outs = [m.marlin_moe(x, logits[0], scale, w13, s13, w2, s2, top_k=TOP_K, **row[f"{s}_tiles"])
            for s, m in (("a", old_moe), ("b", marlin_moe))]  # fmt: skip
    row["a_over_b"] = round(row["a_us"] / row["b_us"], 3)
    row["output_diff"] = diff(outs[1], outs[0])
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="an earlier kernels folder")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skip-moe", action="store_true")
    args = parser.parse_args()
    old_gemv, old_moe = load_old(args.old)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = [] if args.skip_moe else [moe_row(old_moe, gen)]
    rows += gemv_rows(old_gemv, gen)
    print(f"\n{torch.cuda.get_device_name()}\n| shape | a us | b us | a / b | outputs differ |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['a_us']} | {r['b_us']} | {r['a_over_b']} | "
              f"{r['output_diff']:.2e} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                       indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel against kernel: the small-batch int4 MoE (``gemma4_quant.kernels.moe_decode``)
against vLLM's Marlin MoE (``fused_marlin_moe``), at Gemma 4 26B-A4B's real shapes.

No model, no engine: random symmetric int4 group-32 experts in the compressed-tensors
layout (the Triton kernels read it as is; Marlin gets the same values repacked the way
vLLM's WNA16 Marlin MoE method repacks them), random routing, batch 1 - 8. Per path:

- error against the exact float32 product of the dequantized weights (no intermediate
  rounding), relative Frobenius norm;
- GPU time per MoE call inside a CUDA graph (decode runs in CUDA graphs), from
  ``--graph-calls`` calls captured back to back and replayed ``--replays`` times;
- kernels per call (torch profiler);
- the bandwidth fraction: bytes of the chosen experts' weights and scales per call over
  the time, against ``--bandwidth`` (H200: 4.8 TB/s peak).

Prints one JSON line per (path, batch) and a table with b/a = Marlin time / Triton time.

    python bench/moe_decode.py [--hidden 2816 --inter 704 --experts 128 --topk 8]
        [--batches 1,2,4,8] [--tune] [--out results.json]

Needs a CUDA GPU, vLLM 0.24+ (``fused_moe/experts/marlin_moe.py``; 0.20 - 0.23 keep it in
``fused_moe/fused_marlin_moe.py``, also tried) and Triton.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gemma4_quant.int4 import pack_int4_raw, unpack_int4_raw  # noqa: E402
from gemma4_quant.kernels.moe_decode import (  # noqa: E402
    DEFAULT_TILES,
    moe_decode,
    w2_sum,
    w13_act,
)

GROUP = 32


def make_experts(e: int, n: int, k: int, gen: torch.Generator, device: str):
    q = torch.randint(-8, 8, (e, n, k), generator=gen, device=device, dtype=torch.int32)
    scale = (torch.rand(e, n, k // GROUP, generator=gen, device=device) * 0.02 + 0.005).to(
        torch.bfloat16
    )
    packed = pack_int4_raw((q + 8).reshape(e * n, k)).reshape(e, n, k // 8)
    return packed, scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    e, n, words = packed.shape
    q = unpack_int4_raw(packed.reshape(e * n, words)).reshape(e, n, words * 8).float() - 8
    return q * scale.float().repeat_interleave(GROUP, dim=-1)


def exact(x, ids, weights, w13f, w2f) -> torch.Tensor:
    """float32 throughout, GELU(tanh): the error reference for both paths."""
    inter = w2f.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = w13f[e] @ x[t].float()
            a = torch.nn.functional.gelu(h[:inter], approximate="tanh") * h[inter:]
            out[t] += weights[t, j] * (w2f[e] @ a)
    return out


def marlin_path(w13, s13, w2, s2, hidden: int, inter: int, experts: int):
    """vLLM's Marlin MoE on the same values: GPTQ-ordered (K-first) words repacked with
    ``gptq_marlin_moe_repack``, scales with ``marlin_moe_permute_scales``."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_make_workspace_new,
        marlin_moe_permute_scales,
    )
    from vllm.scalar_type import scalar_types

    try:
        from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
    except ImportError:
        from vllm.model_executor.layers.fused_moe.fused_marlin_moe import fused_marlin_moe
    try:
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation

        act = {"activation": MoEActivation.GELU_TANH}
    except ImportError:
        act = {"activation": "gelu"}

    def to_marlin(packed, scale):
        e, n, words = packed.shape
        k = words * 8
        nib = unpack_int4_raw(packed.reshape(e * n, words)).reshape(e, n, k)
        k_first = pack_int4_raw(nib.transpose(1, 2).contiguous(), dim=1)  # [E, K/8, N]
        perm = torch.empty((e, 0), dtype=torch.int32, device=packed.device)
        q = ops.gptq_marlin_moe_repack(k_first, perm, k, n, 4)
        s = marlin_moe_permute_scales(
            s=scale.transpose(1, 2).contiguous(), size_k=k, size_n=n, group_size=GROUP
        )
        return q, s

    mw13, ms13 = to_marlin(w13, s13)
    mw2, ms2 = to_marlin(w2, s2)
    empty = torch.empty((experts, 0), dtype=torch.int32, device=w13.device)
    workspace = marlin_make_workspace_new(w13.device, 4)

    def run(x, ids, weights):
        return fused_marlin_moe(
            x, mw13, mw2, None, None, ms13, ms2, weights, ids,
            quant_type_id=scalar_types.uint4b8.id, global_num_experts=experts,
            g_idx1=empty, g_idx2=empty, sort_indices1=empty, sort_indices2=empty,
            workspace=workspace, is_k_full=True, **act,
        )  # fmt: skip

    run.tensors = (mw13, ms13, mw2, ms2)  # what the Marlin-layout kernels read
    return run


def graph_time_us(fn, graph_calls: int, replays: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(graph_calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * graph_calls)


def rotated(make_call: Callable, copies: list) -> Callable:
    """One call per copy of the weights, so that no call finds its weights in L2."""
    calls = [make_call(*c) for c in copies]
    return lambda: [c() for c in calls]


def kernels_per_call(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    return round(len(kernels) / 10)


def fastest_tiles(
    kernel: str, candidates: Iterable[dict], make: Callable, rows: list, calls: int = 1
) -> dict:
    """The tiles of ``candidates`` whose call ``make(tiles)`` is fastest inside a CUDA
    graph; every timing goes into ``rows``, a tile that does not compile is skipped.
    ``calls``: kernel calls per call of ``make(tiles)`` (the times are per kernel call)."""
    best: tuple[float, dict] | None = None
    for t in candidates:
        try:
            us = graph_time_us(make(t), 10, 10) / calls
        except Exception as exc:
            print(f"tile {t}: {type(exc).__name__}: {exc}"[:200], file=sys.stderr)
            continue
        rows.append({"tune": t, "us": round(us, 2)})
        if best is None or us < best[0]:
            best = (us, t)
    print(json.dumps({"kernel": kernel, "best": best}), flush=True)
    if best is None:
        raise RuntimeError(f"no tile of kernel {kernel} ran")
    return best[1]


def measure(fn: Callable, want: torch.Tensor, args) -> tuple[float, dict]:
    """GPU time per call inside a CUDA graph (``--graph-calls``, ``--replays``), and the
    row fields every path reports: time, error against ``want``, kernels per call."""
    got = fn().float()
    us = graph_time_us(fn, args.graph_calls, args.replays)
    return us, {
        "us": round(us, 2),
        "rel_err": (got - want).norm().item() / want.norm().item(),
        "kernels": kernels_per_call(fn),
    }


def record(rows: list, row: dict) -> None:
    """``row`` into ``rows``, and printed as it comes (a run cut short keeps its rows)."""
    rows.append(row)
    print(json.dumps(row), flush=True)


def save(args, rows: list) -> int:
    """``rows`` and the arguments into ``--out``; the exit status (1 where a time is not
    finite)."""
    if args.out:
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "rows": rows}))
    return 0 if math.isfinite(sum(r.get("us", 0) for r in rows)) else 1


def print_ab_table(rows: list, batches: str, a: str, b: str, header: str) -> None:
    """The markdown table of paths ``a`` and ``b`` per batch: times, a / b, kernels, errors."""
    print(f"\n{header}\n|---|---|---|---|---|---|---|")
    by = {(r["path"], r["batch"]): r for r in rows if "path" in r}
    for m in map(int, batches.split(",")):
        ra, rb = by[(a, m)], by[(b, m)]
        print(
            f"| {m} | {ra['us']:.1f} | {rb['us']:.1f} | {ra['us'] / rb['us']:.2f} | "
            f"{ra['kernels']}/{rb['kernels']} | {ra['rel_err']:.4f} | {rb['rel_err']:.4f} |"
        )


def tune(args, w13, s13, w2, s2, rows: list) -> dict:
    """Each kernel's tiles at batch 1 (CUDA-graph time), the two kernels separately."""
    dev, h, e, k = "cuda", args.hidden, args.experts, args.topk
    inter = w2.shape[2] * 8
    gen = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, h, device=dev, generator=gen).to(torch.bfloat16)
    ids = torch.randperm(e, device=dev, generator=gen)[:k].view(1, k).to(torch.int32)
    weights = torch.softmax(torch.randn(1, k, device=dev, generator=gen), -1)
    act = torch.empty(k, inter, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(x)

    def w13_tile(t: dict) -> Callable:
        return lambda: w13_act(x, ids, w13, s13, act, group_size=GROUP, activation="gelu_tanh", **t)

    def w2_tile(t: dict) -> Callable:
        return lambda: w2_sum(act, ids, weights, w2, s2, out, group_size=GROUP, **t)

    grid13 = itertools.product((4, 8, 16, 32), (32, 64, 128), (2, 4, 8))
    grid2 = itertools.product((2, 4, 8, 16), (16, 32, 64, 128), (2, 4, 8))
    keys13, keys2 = ("block_n13", "block_w13", "warps13"), ("block_n2", "block_w2", "warps2")
    return {
        **fastest_tiles("13", (dict(zip(keys13, v, strict=True)) for v in grid13), w13_tile, rows),
        **fastest_tiles("2", (dict(zip(keys2, v, strict=True)) for v in grid2), w2_tile, rows),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--inter", type=int, default=704)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--graph-calls", type=int, default=30)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=4.8e12)
    p.add_argument("--tune", action="store_true", help="try tile sizes at batch 1 first")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    h, i, e, k = args.hidden, args.inter, args.experts, args.topk
    w13, s13 = make_experts(e, 2 * i, h, gen, dev)
    w2, s2 = make_experts(e, h, i, gen, dev)
    w13f, w2f = dequantize(w13, s13), dequantize(w2, s2)
    marlin = marlin_path(w13, s13, w2, s2, h, i, e)
    per_expert = (w13.numel() + w2.numel()) * 4 / e + (s13.numel() + s2.numel()) * 2 / e

    tiles = dict(DEFAULT_TILES)
    rows = []
    if args.tune:
        tiles = tune(args, w13, s13, w2, s2, rows)
        print(json.dumps({"best_tiles": tiles}), flush=True)

    for m in map(int, args.batches.split(",")):
        x = torch.randn(m, h, device=dev, generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k] for _ in range(m)])
        ids = ids.to(torch.int32)
        weights = torch.softmax(torch.randn(m, k, device=dev, generator=gen), -1)
        want = exact(x, ids, weights, w13f, w2f)
        distinct = len(set(ids.flatten().tolist()))
        nbytes = distinct * per_expert
        paths = {
            "triton": lambda x=x, ids=ids, w=weights: moe_decode(
                x, ids, w, w13, s13, w2, s2, **tiles
            ),
            "marlin": lambda x=x, ids=ids, w=weights: marlin(x, ids, w),
        }
        for name, fn in paths.items():
            us, measured = measure(fn, want, args)
            row = {
                "path": name,
                "batch": m,
                **measured,
                "bytes": int(nbytes),
                "bandwidth_fraction": nbytes / (us * 1e-6) / args.bandwidth,
                "tiles": tiles if name == "triton" else None,
            }
            record(rows, row)

    print_ab_table(
        rows,
        args.batches,
        "marlin",
        "triton",
        "| batch | Marlin us | Triton us | b/a (Marlin/Triton) | kernels M/T | err M | err T |",
    )
    return save(args, rows)


if __name__ == "__main__":
    sys.exit(main())

"""Kernel against kernel at Gemma 4 26B-A4B's real shapes, decode batch sizes, one GPU:

1. the bf16 dense MLP (hidden 2816, intermediate 2112): vLLM's path (GEMM, GELU(tanh)
   and-mul, GEMM: ``F.linear`` and vLLM's ``gelu_tanh_and_mul`` op where vLLM is
   installed) against ``gemma4_quant.kernels.dense_decode`` (two Triton kernels);
2. ``--overlap``: the dense MLP and the MoE are independent branches of every 26B-A4B
   layer (both read the layer's residual; their outputs are added). At batch 1 neither
   fills the GPU, so each MoE path (Marlin where vLLM is installed, the Triton
   ``moe_decode``) is timed after the dense MLP on one stream and beside it on a second
   stream (fork and join inside the CUDA graph).

No model, no engine: random weights; error against the exact float32 product; GPU time
per call inside a CUDA graph (decode runs in CUDA graphs); kernels per call (torch
profiler); bandwidth fraction against ``--bandwidth`` (H200: 4.8 TB/s).

    python bench/dense_decode.py [--batches 1,2,4,8] [--tune] [--overlap] [--out F.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_decode import (  # noqa: E402  (bench/moe_decode.py)
    fastest_tiles,
    graph_time_us,
    make_experts,
    marlin_path,
    measure,
    print_ab_table,
    record,
    save,
)

from gemma4_quant.kernels.dense_decode import (  # noqa: E402
    DEFAULT_TILES,
    dense_decode,
    down,
    gate_up_act,
)
from gemma4_quant.kernels.moe_decode import moe_decode  # noqa: E402


def vllm_path(gate_up: torch.Tensor, down_w: torch.Tensor) -> Callable:
    """GEMM, vLLM's fused GELU(tanh)-and-mul op (torch's ops without vLLM), GEMM."""
    try:
        import vllm._custom_ops  # noqa: F401  (registers torch.ops._C)

        op = torch.ops._C.gelu_tanh_and_mul
    except (ImportError, AttributeError):
        op = None
    inter = down_w.shape[1]

    def run(x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, gate_up)
        if op is not None:
            a = torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device)
            op(a, h)
        else:
            a = F.gelu(h[:, :inter], approximate="tanh") * h[:, inter:]
        return F.linear(a, down_w)

    return run


def exact(x: torch.Tensor, gate_up: torch.Tensor, down_w: torch.Tensor) -> torch.Tensor:
    inter = down_w.shape[1]
    h = x.float() @ gate_up.float().T
    return (F.gelu(h[:, :inter], approximate="tanh") * h[:, inter:]) @ down_w.float().T


def tune(gate_up: torch.Tensor, down_w: torch.Tensor, rows: list) -> dict:
    """Each kernel's tiles at batch 1 (CUDA-graph time), the two kernels separately."""
    h, i = gate_up.shape[1], down_w.shape[1]
    x = torch.randn(1, h, device="cuda").to(torch.bfloat16)
    act = torch.empty(1, i, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)

    def gate_up_tile(t: dict) -> Callable:
        return lambda: gate_up_act(x, gate_up, act, activation="gelu_tanh", **t)

    def down_tile(t: dict) -> Callable:
        return lambda: down(act, down_w, out, **t)

    grid = list(itertools.product((4, 8, 16, 32), (128, 256, 512), (2, 4, 8)))
    keys1, keys2 = ("block_n1", "block_k1", "warps1"), ("block_n2", "block_k2", "warps2")
    return {
        **fastest_tiles("1", (dict(zip(keys1, v, strict=True)) for v in grid), gate_up_tile, rows),
        **fastest_tiles("2", (dict(zip(keys2, v, strict=True)) for v in grid), down_tile, rows),
    }


def two_streams(first: Callable, second: Callable) -> Callable:
    """``first`` on a side stream beside ``second`` on the current one, joined after."""
    side = torch.cuda.Stream()

    def run():
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            a = first()
        b = second()
        main.wait_stream(side)
        return a, b

    return run


def overlap(args, gate_up, down_w, tiles: dict, rows: list) -> None:
    """Dense MLP then MoE on one stream, and the two side by side, per MoE path."""
    h, i, e, k = args.hidden, args.moe_inter, args.experts, args.topk
    gen = torch.Generator(device="cuda").manual_seed(2)
    w13, s13 = make_experts(e, 2 * i, h, gen, "cuda")
    w2, s2 = make_experts(e, h, i, gen, "cuda")
    moes: dict[str, Callable] = {}
    try:
        marlin = marlin_path(w13, s13, w2, s2, h, i, e)
        moes["marlin"] = lambda x, ids, w: marlin(x, ids, w)
    except Exception as exc:  # no vLLM, or no Marlin for these shapes: Triton alone
        print(f"no Marlin MoE: {type(exc).__name__}: {exc}"[:300], file=sys.stderr)
    moes["triton"] = lambda x, ids, w: moe_decode(x, ids, w, w13, s13, w2, s2)
    denses = {
        "vllm": vllm_path(gate_up, down_w),
        "triton": lambda x: dense_decode(x, gate_up, down_w, **tiles),
    }
    for m in map(int, args.overlap_batches.split(",")):
        x = torch.randn(m, h, device="cuda", generator=gen).to(torch.bfloat16)
        ids = torch.stack([torch.randperm(e, device="cuda", generator=gen)[:k] for _ in range(m)])
        ids = ids.to(torch.int32)
        weights = torch.softmax(torch.randn(m, k, device="cuda", generator=gen), -1)
        for (dn, dense_fn), (mn, moe_fn) in itertools.product(denses.items(), moes.items()):
            d = lambda x=x, f=dense_fn: f(x)  # noqa: E731
            mo = lambda x=x, ids=ids, w=weights, f=moe_fn: f(x, ids, w)  # noqa: E731
            try:
                t_dense = graph_time_us(d, args.graph_calls, args.replays)
                t_moe = graph_time_us(mo, args.graph_calls, args.replays)
                t_seq = graph_time_us(
                    lambda d=d, mo=mo: (d(), mo()), args.graph_calls, args.replays
                )
                t_par = graph_time_us(two_streams(d, mo), args.graph_calls, args.replays)
            except Exception as exc:  # one pair failing leaves the others' figures
                print(f"overlap {dn} + {mn} batch {m}: {type(exc).__name__}: {exc}"[:300])
                continue
            row = {
                "overlap": f"dense {dn} + moe {mn}",
                "batch": m,
                "dense_us": round(t_dense, 2),
                "moe_us": round(t_moe, 2),
                "sequential_us": round(t_seq, 2),
                "two_streams_us": round(t_par, 2),
                "saved_us": round(t_seq - t_par, 2),
            }
            record(rows, row)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--inter", type=int, default=2112, help="the dense MLP's intermediate size")
    p.add_argument("--moe-inter", type=int, default=704)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--overlap-batches", default="1,4")
    p.add_argument("--graph-calls", type=int, default=30)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--bandwidth", type=float, default=4.8e12)
    p.add_argument("--tune", action="store_true", help="try tile sizes at batch 1 first")
    p.add_argument("--overlap", action="store_true", help="dense MLP beside the MoE")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    h, i = args.hidden, args.inter
    gate_up = (torch.randn(2 * i, h, device="cuda", generator=gen) / math.sqrt(h)).bfloat16()
    down_w = (torch.randn(h, i, device="cuda", generator=gen) / math.sqrt(i)).bfloat16()
    nbytes = (gate_up.numel() + down_w.numel()) * 2

    rows: list = []
    tiles = tune(gate_up, down_w, rows) if args.tune else dict(DEFAULT_TILES)
    print(json.dumps({"best_tiles": tiles}), flush=True)
    paths = {
        "vllm": vllm_path(gate_up, down_w),
        "triton": lambda x: dense_decode(x, gate_up, down_w, **tiles),
    }
    for m in map(int, args.batches.split(",")):
        x = torch.randn(m, h, device="cuda", generator=gen).to(torch.bfloat16)
        want = exact(x, gate_up, down_w)
        for name, path in paths.items():
            us, measured = measure(lambda x=x, f=path: f(x), want, args)
            row = {
                "path": name,
                "batch": m,
                **measured,
                "bandwidth_fraction": nbytes / (us * 1e-6) / args.bandwidth,
            }
            record(rows, row)

    print_ab_table(
        rows,
        args.batches,
        "vllm",
        "triton",
        "| batch | vLLM path us | Triton us | vLLM / Triton | kernels | err vLLM | err T |",
    )
    if args.overlap:
        overlap(args, gate_up, down_w, tiles, rows)
        print("\n| batch | pair | dense us | MoE us | one stream us | two streams us | saved us |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            if "overlap" in r:
                print(
                    f"| {r['batch']} | {r['overlap']} | {r['dense_us']} | {r['moe_us']} | "
                    f"{r['sequential_us']} | {r['two_streams_us']} | {r['saved_us']} |"
                )
    return save(args, rows)


if __name__ == "__main__":
    sys.exit(main())

"""Kernel against kernel, one token, Gemma 4 26B-A4B's MoE on one GPU: vLLM's path (Gemma 4's
routing kernel, then ``fused_marlin_moe``, what vLLM runs for compressed-tensors W4A16
experts) against ``gemma4_quant.kernels.marlin_moe`` (routing inside, two kernels) on the
same repacked experts.

No model, no engine: 128 random symmetric int4 experts, group 32, in the
compressed-tensors layout, repacked as vLLM's WNA16 Marlin MoE method repacks them
(``bench/moe_decode.py``'s ``marlin_path``). Each captured call routes its own random
router logits, so consecutive calls pick different experts and read them from memory, not
from L2 (decode reads each layer's 8 experts once per token). Per path: GPU time per call
inside a CUDA graph, kernels per call, error against the exact float32 product with the
same routing. The Triton tiles are the fastest of a sweep (W13's first, then W2's).

    python bench/marlin_moe.py [--calls 32] [--out F.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_decode import (  # noqa: E402  (bench/moe_decode.py)
    GROUP,
    dequantize,
    exact,
    fastest_tiles,
    graph_time_us,
    kernels_per_call,
    make_experts,
    marlin_path,
)

from gemma4_quant.kernels.marlin_moe import DEFAULT_TILES, marlin_moe  # noqa: E402

SWEEP13 = {"split13": (1, 2, 4, 8), "block_kt13": (2, 4, 8, 16), "warps13": (4, 8)}
SWEEP2 = {"split2": (1, 2, 4), "block_kt2": (1, 2, 4, 8), "warps2": (4, 8)}


def vllm_routing() -> Callable:
    """Gemma 4's routing as vLLM runs it on a GPU: its Triton kernel where the release has
    one, else its torch function."""
    from vllm.model_executor.models import gemma4

    fn = getattr(gemma4, "gemma4_fused_routing_kernel_triton", None)
    return fn or gemma4.gemma4_routing_function_torch


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().reshape(want.shape) - want).norm() / want.norm()).item()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--inter", type=int, default=704)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--calls", type=int, default=32, help="captured calls, each its own routing")
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    h, i, e, k = args.hidden, args.inter, args.experts, args.topk
    w13, s13 = make_experts(e, 2 * i, h, gen, dev)
    w2, s2 = make_experts(e, h, i, gen, dev)
    marlin = marlin_path(w13, s13, w2, s2, h, i, e)
    mw13, ms13, mw2, ms2 = marlin.tensors
    route = vllm_routing()
    expert_scale = (torch.rand(e, generator=gen, device=dev) + 0.5).bfloat16()
    x = torch.randn(1, h, generator=gen, device=dev).bfloat16()
    logits = [torch.randn(1, e, generator=gen, device=dev) * 2 for _ in range(args.calls)]

    def vllm_call(lg: torch.Tensor) -> torch.Tensor:
        weights, ids = route(lg, k, expert_scale)
        return marlin(x, ids, weights)

    def triton_call(lg: torch.Tensor, tiles: dict) -> torch.Tensor:
        return marlin_moe(x, lg, expert_scale, mw13, ms13, mw2, ms2, top_k=k, **tiles)

    def cycled(one: Callable) -> Callable:
        return lambda: [one(lg) for lg in logits]

    # the reference: vLLM's routing of the first logits, the exact float32 product of the
    # experts it picks (only those dequantized: all 128 in float32 take 3 GB)
    weights, ids = route(logits[0], k, expert_scale)
    chosen = ids[0].long()
    local = torch.arange(k, device=dev, dtype=torch.int32).view(1, k)
    want = exact(
        x, local, weights, dequantize(w13[chosen], s13[chosen]), dequantize(w2[chosen], s2[chosen])
    )
    del w13, s13, w2, s2  # both paths read the Marlin copies

    rows: list[dict] = []
    vllm_us = graph_time_us(cycled(vllm_call), 1, args.replays) / args.calls
    vllm_err = error(vllm_call(logits[0]), want)

    def make(tiles: dict) -> Callable:
        return cycled(lambda lg: triton_call(lg, tiles))

    grid13 = [dict(zip(SWEEP13, v, strict=True)) for v in itertools.product(*SWEEP13.values())]
    best13 = fastest_tiles("13", ({**DEFAULT_TILES, **t} for t in grid13), make, rows, args.calls)
    grid2 = [dict(zip(SWEEP2, v, strict=True)) for v in itertools.product(*SWEEP2.values())]
    tiles = fastest_tiles("2", ({**best13, **t} for t in grid2), make, rows, args.calls)
    triton_us = min(r["us"] for r in rows if r["tune"] == tiles)
    got = triton_call(logits[0], tiles)
    nbytes = k * (mw13[0].numel() * 4 + ms13[0].numel() * 2 + mw2[0].numel() * 4)
    nbytes += k * ms2[0].numel() * 2
    result = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "shape": {"hidden": h, "inter": i, "experts": e, "topk": k, "group": GROUP},
        "calls_cycled": args.calls,
        "mbytes_per_call": round(nbytes / 1e6, 2),
        "vllm_us": round(vllm_us, 2),
        "triton_us": triton_us,
        "vllm_over_triton": round(vllm_us / triton_us, 3),
        "kernels_vllm": kernels_per_call(lambda: vllm_call(logits[0])),
        "kernels_triton": kernels_per_call(lambda: triton_call(logits[0], tiles)),
        "error_vllm": round(vllm_err, 5),
        "error_triton": round(error(got, want), 5),
        "triton_vs_vllm": round(error(got, vllm_call(logits[0]).float()), 5),
        "tb_s_vllm": round(nbytes / vllm_us / 1e6, 2),
        "tb_s_triton": round(nbytes / triton_us / 1e6, 2),
        "tiles": tiles,
        "sweep": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}), flush=True)
    print(
        f"\n{result['device']}, one token, top {k} of {e}, hidden {h}, intermediate {i}, "
        f"group {GROUP}, each call its own routing\n"
        "| path | us | kernels | error vs exact | TB/s |\n|---|---|---|---|---|\n"
        f"| vLLM (routing + fused_marlin_moe) | {result['vllm_us']} | "
        f"{result['kernels_vllm']} | {result['error_vllm']} | {result['tb_s_vllm']} |\n"
        f"| marlin_moe | {triton_us} | {result['kernels_triton']} | "
        f"{result['error_triton']} | {result['tb_s_triton']} |\n"
        f"vLLM / Triton {result['vllm_over_triton']}; Triton vs vLLM {result['triton_vs_vllm']}; "
        f"tiles {tiles}"
    )
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Kernel against kernel, one token, Gemma 4 26B-A4B's int4 attention projections, one GPU:
vLLM's Marlin GEMM (``apply_gptq_marlin_linear``, what vLLM runs for compressed-tensors
W4A16 linears) against ``gemma4_quant.kernels.marlin_gemv`` on the same repacked weights.

No model, no engine: random symmetric int4 weights, group 32, repacked by vLLM's CUDA
``gptq_marlin_repack`` (and checked equal to vLLM's Python reference packer, the one the
CPU tests use). GPU time per call inside a CUDA graph, cycling through enough copies of
the weights to exceed the L2 cache three times (decode reads every layer's weights once
per token, never from L2); error of each against the exact float32 product; the Triton
tiles are the fastest of a sweep, per shape.

    python bench/marlin_gemv.py [--shapes qkv,o,qkv_global,o_global] [--out F.json]

``--limits`` asks where the kernel's time goes instead: per shape, over a small tile grid,
the kernel against the same program grid and loads with no arithmetic (the words and
scales summed, nothing dequantized), and against a Triton stream over the same words, each
program summing one contiguous share (what Triton reads with no layout to follow).
Loads-only near the kernel: the access pattern or the grid holds it back; near the stream:
the arithmetic does.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_decode import fastest_tiles, graph_time_us, rotated  # noqa: E402  (bench/moe_decode.py)

from gemma4_quant.kernels.marlin_gemv import marlin_gemv, share  # noqa: E402

GROUP = 32
# (K, N) of 26B-A4B's attention projections: sliding layers (16 heads of 256, 8 KV heads),
# global layers (16 heads of 512, 2 KV heads; K is loaded into the V slot too)
SHAPES = {
    "qkv": (2816, 8192),
    "o": (4096, 2816),
    "qkv_global": (2816, 10240),
    "o_global": (8192, 2816),
}
SWEEP = {"split": (1, 2, 4, 8, 16), "block_kt": (2, 4, 8, 16), "warps": (4, 8)}
STAGES = (1, 2, 3, 4, 5)  # software pipelining depth (SWEEP runs Triton's 3), for SWEEP's best


def _call(fn: Callable, **kwargs):
    """``fn`` with the keyword arguments its signature names (they differ by release)."""
    names = inspect.signature(fn).parameters
    return fn(**{k: v for k, v in kwargs.items() if k in names})


def make_weights(k: int, n: int, gen: torch.Generator):
    """(Marlin words, Marlin scales, float32 W [K, N]) of random symmetric int4 weights."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.layers.quantization.utils import marlin_utils_test as ref
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_permute_scales,
    )

    q = torch.randint(0, 16, (k, n), generator=gen, device="cuda")
    scale = (torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.02 + 0.005).bfloat16()
    w = (q - 8).float() * scale.float().repeat_interleave(GROUP, dim=0)
    shifts = (4 * torch.arange(8, device="cuda")).view(1, 8, 1)
    gptq = (q.view(k // 8, 8, n).to(torch.int64) << shifts).sum(dim=1)  # packed along K
    gptq = torch.where(gptq >= 2**31, gptq - 2**32, gptq).to(torch.int32)
    empty = torch.empty(0, dtype=torch.int, device="cuda")
    words = _call(
        ops.gptq_marlin_repack, b_q_weight=gptq, perm=empty, size_k=k, size_n=n, num_bits=4
    )
    reference = ref.marlin_weights(q.cpu(), k, n, 4, ref.get_weight_perm(4))
    if not torch.equal(words.cpu(), reference):
        raise AssertionError(f"gptq_marlin_repack differs from the reference at K {k}, N {n}")
    return words, marlin_permute_scales(scale, k, n, GROUP), w


def marlin_path(words: torch.Tensor, scales: torch.Tensor, k: int, n: int) -> Callable:
    from vllm.model_executor.layers.quantization.utils import marlin_utils as mu
    from vllm.scalar_type import scalar_types

    empty = mu.marlin_make_empty_g_idx(torch.device("cuda"))
    ws = mu.marlin_make_workspace_new(torch.device("cuda"))
    fixed = {
        "weight": words,
        "weight_scale": scales,
        "weight_zp": empty,
        "g_idx": empty,
        "g_idx_sort_indices": empty,
        "workspace": ws,
        "wtype": scalar_types.uint4b8,
        "output_size_per_partition": n,
        "input_size_per_partition": k,
        "is_k_full": True,
    }
    return lambda x: _call(mu.apply_gptq_marlin_linear, input=x, **fixed)


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def bench_shape(name: str, k: int, n: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(k * n)
    words, scales, w = make_weights(k, n, gen)
    x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
    want = x.float() @ w
    nbytes = words.numel() * 4 + scales.numel() * scales.element_size()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    count = max(2, math.ceil(3 * l2 / nbytes))
    copies = [(words.clone(), scales.clone()) for _ in range(count)]

    marlin = marlin_path(words, scales, k, n)
    marlin_error = error(marlin(x), want)
    marlin_calls = rotated(lambda a, b: functools.partial(marlin_path(a, b, k, n), x), copies)
    marlin_us = graph_time_us(marlin_calls, 3, 20) / count

    def triton(tiles: dict) -> Callable:
        return rotated(lambda a, b: functools.partial(marlin_gemv, x, a, b, GROUP, **tiles), copies)

    rows: list[dict] = []
    candidates = [dict(zip(SWEEP, v, strict=True)) for v in itertools.product(*SWEEP.values())]
    top = fastest_tiles(name, candidates, triton, rows, calls=count)
    stages = [{**top, "stages": s} for s in STAGES]
    tiles = fastest_tiles(name, stages, triton, rows, calls=count)
    triton_us = min(r["us"] for r in rows if r["tune"] == tiles)
    got = marlin_gemv(x, words, scales, GROUP, **tiles)
    result = {
        "shape": name,
        "k": k,
        "n": n,
        "mbytes": round(nbytes / 1e6, 2),
        "copies": count,
        "marlin_us": round(marlin_us, 2),
        "triton_us": triton_us,
        "marlin_over_triton": round(marlin_us / triton_us, 3),
        "tiles": tiles,
        "error_marlin": round(marlin_error, 5),
        "error_triton": round(error(got, want), 5),
        "triton_vs_marlin": round(error(got, marlin(x).float()), 5),
        "tb_s_marlin": round(nbytes / marlin_us / 1e6, 2),
        "tb_s_triton": round(nbytes / triton_us / 1e6, 2),
        "sweep": rows,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}), flush=True)
    return result


@triton.jit
def _loads_only_kernel(
    w_ptr, s_ptr, out_ptr, n, k_tiles, tiles_per_split, GROUP: tl.constexpr, BLOCK_KT: tl.constexpr
):
    """``marlin_gemv``'s program grid and loads, with the arithmetic left out."""
    g = tl.program_id(0)
    split = tl.program_id(1)
    kt_idx = tl.arange(0, BLOCK_KT)[:, None, None, None]
    ci = tl.arange(0, 8)[None, :, None, None]
    t = tl.arange(0, 4)[None, None, :, None]
    j = tl.arange(0, 4)[None, None, None, :]
    words = g * 128 + 16 * ci + 4 * t + j
    s_col = g * 64 + 8 * ci + 2 * j
    acc = tl.zeros([BLOCK_KT, 8, 4, 4], dtype=tl.int32)
    acc_s = tl.zeros([BLOCK_KT, 8, 1, 4], dtype=tl.float32)
    kt_begin = split * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    for kt0 in range(kt_begin, kt_end, BLOCK_KT):
        kt = kt0 + kt_idx
        kt_mask = kt < kt_end
        acc += tl.load(w_ptr + kt * (2 * n) + words, mask=kt_mask, other=0)
        kg = (kt * 16) // GROUP
        acc_s += tl.load(s_ptr + kg * n + s_col, mask=kt_mask, other=0.0).to(tl.float32)
        acc_s += tl.load(s_ptr + kg * n + s_col + 1, mask=kt_mask, other=0.0).to(tl.float32)
    total = tl.sum(tl.sum(tl.sum(tl.sum(acc.to(tl.float32), 3), 2), 1), 0)
    total += tl.sum(tl.sum(tl.sum(tl.sum(acc_s, 3), 2), 1), 0)
    tl.store(out_ptr + g * tl.num_programs(1) + split, total)


def loads_only(words: torch.Tensor, scales: torch.Tensor, k: int, n: int, tiles: dict):
    split, block_kt = tiles["split"], tiles["block_kt"]
    k_tiles = k // 16
    per = share(k_tiles, split, block_kt)
    out = torch.empty((n // 64) * split, device="cuda", dtype=torch.float32)

    def call():
        _loads_only_kernel[(n // 64, split)](
            words, scales, out, n, k_tiles, per, GROUP=GROUP, BLOCK_KT=block_kt,
            num_warps=tiles["warps"],
        )  # fmt: skip
        return out

    return call


@triton.jit
def _stream_kernel(w_ptr, out_ptr, total, per_program, BLOCK: tl.constexpr):
    """Program ``p`` sums words ``p * per_program ..`` of a flat int32 array, ``BLOCK`` a step."""
    p = tl.program_id(0)
    begin = p * per_program
    end = tl.minimum(begin + per_program, total)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(begin, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(w_ptr + idx, mask=idx < end, other=0)
    tl.store(out_ptr + p, tl.sum(acc, 0))


def stream(words: torch.Tensor, tiles: dict):
    total = words.numel()
    programs, block = tiles["programs"], tiles["block"]
    per = share(total, programs, block)
    out = torch.empty(programs, device="cuda", dtype=torch.int32)

    def call():
        _stream_kernel[(programs,)](words, out, total, per, BLOCK=block, num_warps=tiles["warps"])
        return out

    return call


LIMITS_SWEEP = {"split": (2, 4, 8, 16), "block_kt": (4, 8, 16), "warps": (4, 8)}
STREAM_SWEEP = {"programs": (264, 528, 1056, 2112), "block": (1024, 4096), "warps": (4, 8)}


def limits_shape(name: str, k: int, n: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(k * n)
    words, scales, _ = make_weights(k, n, gen)
    x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
    nbytes = words.numel() * 4 + scales.numel() * scales.element_size()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    count = max(2, math.ceil(3 * l2 / nbytes))
    copies = [(words.clone(), scales.clone()) for _ in range(count)]
    rows: list[dict] = []

    def grid_of(sweep: dict) -> list[dict]:
        return [dict(zip(sweep, v, strict=True)) for v in itertools.product(*sweep.values())]

    grid = grid_of(LIMITS_SWEEP)

    def kernel(tiles: dict) -> Callable:
        return rotated(lambda a, b: functools.partial(marlin_gemv, x, a, b, GROUP, **tiles), copies)

    def loads(tiles: dict) -> Callable:
        return rotated(lambda a, b: loads_only(a, b, k, n, tiles), copies)

    best_kernel = fastest_tiles(f"{name} kernel", grid, kernel, rows, calls=count)
    kernel_rows = list(rows)
    best_loads = fastest_tiles(f"{name} loads", grid, loads, rows, calls=count)
    loads_rows = rows[len(kernel_rows) :]
    best_stream = fastest_tiles(
        f"{name} stream",
        grid_of(STREAM_SWEEP),
        lambda tiles: rotated(lambda a, b: stream(a, tiles), copies),
        rows,
        calls=count,
    )
    stream_rows = rows[len(kernel_rows) + len(loads_rows) :]
    words_bytes = words.numel() * 4

    kernel_us = min(r["us"] for r in kernel_rows if r["tune"] == best_kernel)
    loads_us = min(r["us"] for r in loads_rows if r["tune"] == best_loads)
    stream_us = min(r["us"] for r in stream_rows if r["tune"] == best_stream)
    result = {
        "shape": name,
        "k": k,
        "n": n,
        "mbytes": round(nbytes / 1e6, 2),
        "kernel_us": kernel_us,
        "kernel_tiles": best_kernel,
        "loads_only_us": loads_us,
        "loads_only_tiles": best_loads,
        "stream_us": stream_us,
        "stream_tiles": best_stream,
        "tb_s": {
            "kernel": round(nbytes / kernel_us / 1e6, 2),
            "loads_only": round(nbytes / loads_us / 1e6, 2),
            "stream_words": round(words_bytes / stream_us / 1e6, 2),
        },
        "sweep": {"kernel": kernel_rows, "loads_only": loads_rows, "stream": stream_rows},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "sweep"}), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--limits", action="store_true", help="where the kernel's time goes")
    args = parser.parse_args()
    import vllm._custom_ops  # noqa: F401  (registers Marlin's ops)

    if args.limits:
        results = [limits_shape(s, *SHAPES[s]) for s in args.shapes.split(",")]
        print(f"\n{torch.cuda.get_device_name()}: TB/s, weights cycled past L2")
        print("| shape | MB | kernel | loads only, same grid | Triton stream of the words |")
        print("|---|---|---|---|---|")
        for r in results:
            b = r["tb_s"]
            print(
                f"| {r['shape']} | {r['mbytes']} | {b['kernel']} ({r['kernel_us']} us) | "
                f"{b['loads_only']} ({r['loads_only_us']} us) | "
                f"{b['stream_words']} ({r['stream_us']} us, {r['stream_tiles']}) |"
            )
        if args.out:
            args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                            "results": results}, indent=1) + "\n")  # fmt: skip
        return 0

    results = [bench_shape(s, *SHAPES[s]) for s in args.shapes.split(",")]
    print(f"\n{torch.cuda.get_device_name()}, one token, group {GROUP}, weights cycled past L2")
    print("| shape | K | N | MB | Marlin us | Triton us | Marlin/Triton | tiles | error Marlin | "
          "error Triton | TB/s Marlin / Triton |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        t = r["tiles"]
        print(
            f"| {r['shape']} | {r['k']} | {r['n']} | {r['mbytes']} | {r['marlin_us']} | "
            f"{r['triton_us']} | {r['marlin_over_triton']} | split {t['split']}, "
            f"{t['block_kt']} row tiles, {t['warps']} warps, {t.get('stages', 3)} stages | "
            f"{r['error_marlin']} | "
            f"{r['error_triton']} | {r['tb_s_marlin']} / {r['tb_s_triton']} |"
        )
    if args.out:
        summary = {
            "device": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "results": results,
        }
        args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

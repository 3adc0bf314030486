"""Gemma 4's router, kernel against kernel, 26B-A4B's shape (hidden 2816, 128 experts), one
GPU: vLLM's ``Gemma4Router`` (its RMSNorm without weight and both scalings compiled by
Inductor, as vLLM compiles the model, then ``GateLinear``'s own GEMM choice) against
``gemma4_quant.kernels.router_decode`` (one Triton kernel); and the projection alone,
vLLM's ``GateLinear`` against ``router_proj`` (what the ``router_decode`` patch replaces:
vLLM fuses the norm with the layer's other norms).

No model, no engine: random weights; error against the exact float32 router; GPU time per
call inside a CUDA graph (decode runs in CUDA graphs); kernels per call (torch profiler).
These calls find the weights in L2. ``--cold`` also times the projection at one token with
its weights cycled past L2, as decode reads them (every layer's once a token), and tunes
the kernel's tiles that way: inside vLLM the projection took what cuBLAS takes although
the kernel was 2 - 3 times faster here (docs/gpu-results.md 3i).
Where vLLM is not installed, path a is the same arithmetic in torch (compiled), with
``F.linear`` for the projection.

    python bench/router_decode.py [--batches 1,2,4,8] [--tune] [--cold] [--out F.json]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from moe_decode import (  # noqa: E402  (bench/moe_decode.py)
    fastest_tiles,
    graph_time_us,
    measure,
    print_ab_table,
    record,
    rotated,
    save,
)

from gemma4_quant.kernels.router_decode import (  # noqa: E402
    DEFAULT_TILES,
    router_decode,
    router_proj,
)

EPS = 1e-6


def vllm_router(hidden: int, experts: int, scale: torch.Tensor, weight: torch.Tensor):
    """vLLM's own ``Gemma4Router`` on these weights (a one-rank group of its own), or None
    where vLLM is not installed."""
    try:
        from transformers import PretrainedConfig
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.model_executor.models.gemma4 import Gemma4Router
        from vllm.utils.network_utils import get_open_port
    except ImportError as e:
        print(f"vLLM's Gemma4Router unavailable ({e}); path a is torch's", file=sys.stderr)
        return None
    config = PretrainedConfig(hidden_size=hidden, rms_norm_eps=EPS, num_experts=experts)
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, "nccl")
        initialize_model_parallel(1, 1)
        with torch.device("cuda"):
            torch.set_default_dtype(torch.bfloat16)
            router = Gemma4Router(config, prefix="router")
            torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        router.scale.copy_(scale)
        router.proj.weight.copy_(weight)
    router.requires_grad_(False)  # as vLLM runs it: no autograd graph to trace
    print(f"path a: vLLM's Gemma4Router, {type(router.proj).__name__}", file=sys.stderr)
    return router


def torch_router(scale: torch.Tensor, weight: torch.Tensor, root: float) -> Callable:
    def forward(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        h = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
        h = h * torch.tensor(root, dtype=x.dtype, device=x.device) * scale
        return torch.nn.functional.linear(h, weight).float()

    return forward


def exact(x, scale, weight, root: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (normed * root * scale.float()) @ weight.float().T


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2816)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--graph-calls", type=int, default=30)
    p.add_argument("--replays", type=int, default=20)
    p.add_argument("--tune", action="store_true", help="try tile sizes at batch 1 first")
    p.add_argument(
        "--cold", action="store_true", help="the projection with its weights cycled past L2"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    dev, h, e = "cuda", args.hidden, args.experts
    gen = torch.Generator(device=dev).manual_seed(0)
    scale = (torch.rand(h, device=dev, generator=gen) + 0.5).to(torch.bfloat16)
    weight = (torch.randn(e, h, device=dev, generator=gen) * 0.05).to(torch.bfloat16)
    root = torch.tensor(h**-0.5).to(torch.bfloat16).item()
    router = vllm_router(h, e, scale, weight)
    stock = torch.compile(
        router.forward if router is not None else torch_router(scale, weight, root)
    )

    gate = router.proj if router is not None else lambda t: (t @ weight.T, None)
    rows: list = []
    tiles, proj_tiles = dict(DEFAULT_TILES), dict(DEFAULT_TILES)
    if args.tune:
        x1 = torch.randn(1, h, device=dev, generator=gen).to(torch.bfloat16)
        out = torch.empty(1, e, device=dev)
        tiles = fastest_tiles(
            "router",
            tile_grid(),
            lambda t: lambda: router_decode(x1, scale, weight, eps=EPS, root=root, out=out, **t),
            rows,
        )
        proj_tiles = fastest_tiles(
            "router_proj",
            tile_grid(),
            lambda t: lambda: router_proj(x1, weight, out=out, **t),
            rows,
        )

    nbytes = weight.numel() * 2
    for m in map(int, args.batches.split(",")):
        x = (torch.randn(m, h, device=dev, generator=gen) * 3).to(torch.bfloat16)
        want = exact(x, scale, weight, root)
        paths = {
            "vllm": (lambda x=x: stock(x), want),
            "triton": (
                lambda x=x: router_decode(x, scale, weight, eps=EPS, root=root, **tiles),
                want,
            ),
        }
        # the projection alone, on activations already normed and scaled
        xn = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS) * root
        xn = (xn * scale.float()).to(torch.bfloat16)
        want_proj = xn.float() @ weight.float().T
        paths["vllm-proj"] = (lambda xn=xn: gate(xn)[0].float(), want_proj)
        paths["triton-proj"] = (lambda xn=xn: router_proj(xn, weight, **proj_tiles), want_proj)
        for name, (fn, reference) in paths.items():
            us, measured = measure(fn, reference, args)
            row = {"path": name, "batch": m, **measured, "bytes": nbytes}
            row["tiles"] = {"triton": tiles, "triton-proj": proj_tiles}.get(name)
            record(rows, row)

    print_ab_table(
        rows,
        args.batches,
        "vllm",
        "triton",
        "| batch | vLLM us | Triton us | b/a (vLLM/Triton) | kernels v/T | err v | err T |",
    )
    print_ab_table(
        rows,
        args.batches,
        "vllm-proj",
        "triton-proj",
        "| batch (projection) | GateLinear us | Triton us | b/a | kernels v/T | err v | err T |",
    )
    if args.cold:
        cold_projection(gate, weight, rows)
    return save(args, rows)


def cold_projection(gate, weight: torch.Tensor, rows: list) -> None:
    """One token's projection with the weights cycled past L2 (three L2 sizes of copies):
    ``GateLinear`` (vLLM's module, its weight swapped per copy while the graph is
    captured) against the kernel at its fastest tiles that way."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(1, weight.shape[1], device="cuda", generator=gen).to(torch.bfloat16)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    count = max(2, math.ceil(3 * l2 / (weight.numel() * weight.element_size())))
    copies = [(weight.clone(),) for _ in range(count)]

    def vllm_call(w: torch.Tensor):
        if getattr(gate, "weight", None) is None:  # no vLLM: torch's product
            return lambda: (x @ w.T).float()

        def call():
            gate.weight.data = w
            return gate(x)[0]

        return call

    tiles = fastest_tiles(
        "router_proj (cold)",
        tile_grid((1, 2, 4), (512, 1024, 2048, 4096)),
        lambda t: rotated(lambda w: lambda: router_proj(x, w, **t), copies),
        rows,
        calls=count,
    )
    vllm_us = graph_time_us(rotated(vllm_call, copies), 3, 20) / count
    triton_us = graph_time_us(rotated(lambda w: lambda: router_proj(x, w, **tiles), copies), 3, 20)
    triton_us /= count
    row = {"path": "cold", "batch": 1, "copies": count, "tiles": tiles}
    record(rows, row | {"vllm_us": round(vllm_us, 2), "triton_us": round(triton_us, 2)})
    print(
        f"\nprojection, one token, weights cycled past L2 ({count} copies): GateLinear "
        f"{vllm_us:.2f} us, Triton {triton_us:.2f} us ({vllm_us / triton_us:.2f}x), tiles {tiles}"
    )


# 2048 and 4096 columns a step: one or two steps over 2816, every load issued up front
# (at 1024 each of the three steps waits for its own loads: load lead 12 instructions,
# bench/int4_sass.py's measure)
def tile_grid(block_n=(1, 2, 4, 8), block_k=(256, 512, 1024, 2048, 4096), warps=(2, 4, 8)):
    grid = itertools.product(block_n, block_k, warps)
    return (dict(zip(("block_n", "block_k", "warps"), v, strict=True)) for v in grid)


if __name__ == "__main__":
    sys.exit(main())

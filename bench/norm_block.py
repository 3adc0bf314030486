"""Gemma 4's norm blocks as torch.compile builds them, against one Triton kernel a block that
issues every load first; one GPU, no vLLM.

Inside vLLM, at one token, a 26B-A4B decoder layer spends 14.6 us of an H100 in four
Inductor kernels around its projections (docs/gpu-results.md 3l), 6.6 us in the one after
attention's o projection. Inductor makes a row of more than 1024 (hidden 2816) a looped
reduction: one program walks the row once per dependent sum (post-attention norm, then
the residual's norm), so one SM does it all at one token. The ``triton`` variant holds the
row in registers and reads it once: both blocks' kernels are the plugin's
(``gemma4_quant.kernels.norm_blocks``: ``post_attention_norms`` and, linked,
``end_of_layer_norms`` with the next input norm's weight), rounding each step as vLLM's
eager modules do.

The blocks are the decoder layer's (vLLM's ``Gemma4DecoderLayer.forward`` with
``RMSNorm.forward_native``):

- ``post_attention``: ``h = norm(o) + residual``; the dense MLP's, the experts' and the
  router's inputs (``norm(h)`` with three weights and the router's scalings);
- ``end_of_layer``: ``norm(norm(d) + norm(m)) + h`` times the layer scalar, and the next
  layer's input norm;
- ``post_attention_router``: ``post_attention`` with the router's projection ([128, 2816]
  bf16, float32 logits) in place of its input: ``triton`` is the plugin's two kernels
  (``post_attention_norms``, then ``router_decode``'s), ``fused`` its one
  (``post_attention_router``), ``default`` Inductor's norms and cuBLAS.

Each Inductor variant compiles the block from cold (``torch._dynamo.reset``), for the batch
alone or with the batch symbolic (``dynamic``, as vLLM compiles its graph for every batch size),
and times it in a CUDA graph of 64 calls on distinct inputs, at each batch; the outputs
must match the default's within 1% (Inductor keeps some products in float32 where eager
rounds them; the post-attention kernel rounds as eager does: they differ by ~0.5%).
Prints us per call and default / variant.

In that graph every input and weight stays in L2 (64 sets of ~34 KB), where inside vLLM
the norms' weights were last read a whole decode step earlier, ~2.4 GB of weights ago.
``--cold`` times each call behind a write of 128 MB (the L2 flushed), from the GPU's own
trace (the block's kernels only, not the flush): a looped reduction waits for memory once
per step of each of its passes, the Triton kernels once. (A persistent reduction asked of
Inductor through its choices handler was never taken with torch 2.11: the traces name
``triton_red_`` kernels, so that variant is gone.)

    python bench/norm_block.py [--batches 1,16,64] [--cold] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_decode import graph_time_us  # noqa: E402  (bench/moe_decode.py)

HIDDEN, EPS, CALLS = 2816, 1e-6, 64


def rms(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    """vLLM's ``RMSNorm.forward_native``: float32 statistics, rounded, times the weight."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + EPS)
    x = x.to(dtype)
    return x if w is None else x * w


def post_attention(o, residual, w_pa, w_ff, w_ff2, r_scale):
    h = rms(o, w_pa) + residual
    router_in = rms(h, None) * (HIDDEN**-0.5) * r_scale
    return h, rms(h, w_ff), rms(h, w_ff2), router_in


def post_attention_router(o, residual, w_pa, w_ff, w_ff2, r_scale, w_router):
    h, ff, ff2, router_in = post_attention(o, residual, w_pa, w_ff, w_ff2, r_scale)
    return h, ff, ff2, torch.mm(router_in, w_router.t(), out_dtype=torch.float32)


def end_of_layer(d, m, h, w1, w2, w, scalar, w_next):
    # the layer scalar is one value ([1]); the inputs hold a vector in its place
    y = (rms(rms(d, w1) + rms(m, w2), w) + h) * scalar[:1]
    return y, rms(y, w_next)


BLOCKS = {
    "post_attention": (post_attention, 2, 4),
    "end_of_layer": (end_of_layer, 3, 5),
    "post_attention_router": (post_attention_router, 2, 4),
}
EXPERTS = 128  # the router's rows


def _hand_kernels():
    """One program a row, every load issued before the first sum: a single memory latency."""

    def post_attention_hand(o, residual, w_pa, w_ff, w_ff2, r_scale):
        # the plugin's kernel (``norm_blocks``); the router's root as vLLM rounds it
        from gemma4_quant.kernels.norm_blocks import post_attention_norms

        root = torch.tensor(HIDDEN**-0.5).bfloat16().item()
        return post_attention_norms(o, residual, w_pa, w_ff, w_ff2, r_scale, root, EPS)

    def end_of_layer_hand(d, m, h, w1, w2, w, scalar, w_next):
        # the plugin's kernel (``norm_blocks``, linked: with the next layer's input norm)
        from gemma4_quant.kernels.norm_blocks import end_of_layer_norms

        return end_of_layer_norms(d, m, h, w1, w2, w, scalar[:1], EPS, w_next)

    def post_attention_router_hand(o, residual, w_pa, w_ff, w_ff2, r_scale, w_router):
        # the plugin's kernels without the fusion: the norms' kernel, then router_decode's
        from gemma4_quant.kernels.router_decode import router_proj

        h, ff, ff2, router_in = post_attention_hand(o, residual, w_pa, w_ff, w_ff2, r_scale)
        return h, ff, ff2, router_proj(router_in, w_router)

    def post_attention_router_fused(o, residual, w_pa, w_ff, w_ff2, r_scale, w_router):
        from gemma4_quant.kernels.norm_blocks import post_attention_router as kernel

        root = torch.tensor(HIDDEN**-0.5).bfloat16().item()
        return kernel(o, residual, w_pa, w_ff, w_ff2, r_scale, w_router, root, EPS)

    return {
        "post_attention": post_attention_hand,
        "end_of_layer": end_of_layer_hand,
        "post_attention_router": post_attention_router_hand,
        "post_attention_router/fused": post_attention_router_fused,
    }


# default: Inductor, the batch fixed; dynamic: the batch symbolic, as vLLM compiles its graph;
# triton: _hand_kernels, one Triton kernel a block, not Inductor's; fused: the router's
# projection inside the post-attention kernel (that block only)
VARIANTS = ("default", "dynamic", "triton", "fused")


def cold_us(calls: list, replays: int = 10) -> tuple[float, list[str]]:
    """GPU microseconds per call of the kernels of ``calls``, each call behind an L2 flush,
    in one CUDA graph, from the profiler's trace (the flush's own kernels left out), and
    the names of those kernels."""
    flush = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")

    def run() -> None:
        for call in calls:
            flush.zero_()
            call()

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memset")]
    flushes = [e for e in kernels if any(k in e["name"].lower() for k in ("fill", "memset"))]
    if len(flushes) != replays * len(calls):
        raise RuntimeError(f"{len(flushes)} flush kernels traced, expected {replays * len(calls)}")
    block = [e for e in kernels if e not in flushes]
    names = sorted({e["name"] for e in block})
    return sum(float(e["dur"]) for e in block) / (replays * len(calls)), names


def inputs(gen: torch.Generator, batch: int, rows: int, vectors: int, router: bool):
    def vec() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device="cuda")).bfloat16()

    acts = [torch.randn(batch, HIDDEN, generator=gen, device="cuda") for _ in range(rows)]
    weights = []
    if router:
        weights = [torch.randn(EXPERTS, HIDDEN, generator=gen, device="cuda") / HIDDEN**0.5]
    return (
        [a.bfloat16() for a in acts]
        + [vec() for _ in range(vectors)]
        + [w.bfloat16() for w in weights]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--cold", action="store_true", help="each call behind an L2 flush")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (fn, acts, vectors) in BLOCKS.items():
        for batch in (int(b) for b in args.batches.split(",")):
            router = name == "post_attention_router"
            sets = [inputs(gen, batch, acts, vectors, router) for _ in range(CALLS)]
            reference = None
            for variant in VARIANTS:
                if variant == "fused" and not router:
                    continue
                torch._dynamo.reset()
                dynamic = variant == "dynamic"
                if variant == "triton":
                    compiled = _hand_kernels()[name]
                elif variant == "fused":
                    compiled = _hand_kernels()[f"{name}/fused"]
                else:
                    compiled = torch.compile(fn, dynamic=None if dynamic else False)
                for t in sets[0][:acts] if dynamic else ():
                    torch._dynamo.mark_dynamic(t, 0)
                outs = compiled(*sets[0])
                run = [lambda c=compiled, s=s: c(*s) for s in sets]
                names = None
                if args.cold:
                    us, names = cold_us(run)
                else:
                    us = graph_time_us(lambda run=run: [r() for r in run], 1, 20) / CALLS
                if reference is None:
                    reference = outs
                err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                          for a, b in zip(outs, reference, strict=True))  # fmt: skip
                row = {"block": name, "batch": batch, "variant": variant, "us": round(us, 2),
                       "diff_vs_default": err, "kernels": names}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    device = torch.cuda.get_device_name() + ", L2 flushed" * args.cold
    print(f"\n{device}\n| block | batch | variant | us | default / this |")
    print("|---|---|---|---|---|")
    base = {}
    for r in rows:
        key = (r["block"], r["batch"])
        base.setdefault(key, r["us"])
        print(f"| {r['block']} | {r['batch']} | {r['variant']} | {r['us']} | "
              f"{base[key] / r['us']:.3f} |")  # fmt: skip
    if args.out:
        out = {"device": torch.cuda.get_device_name(), "cold": args.cold, "rows": rows}
        args.out.write_text(json.dumps(out, indent=1))
    return 0 if all(r["diff_vs_default"] < 1e-2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

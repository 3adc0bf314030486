"""Gemma 4's norm blocks as torch.compile builds them, timed with Inductor's defaults and with
a persistent reduction for rows of up to 4096; one GPU, no vLLM.

Inside vLLM, at one token, a 26B-A4B decoder layer spends 14.6 us of an H100 in four
Inductor kernels around its projections (docs/gpu-results.md 3l), 6.6 us in the one after
attention's o projection. Inductor makes a row of more than 1024 (hidden 2816) a looped
reduction: one program walks the row once per dependent sum (post-attention norm, then
the residual's norm), so one SM does it all at one token. A persistent reduction holds the
row in registers and reads it once.

The blocks are the decoder layer's (vLLM's ``Gemma4DecoderLayer.forward`` with
``RMSNorm.forward_native``):

- ``post_attention``: ``h = norm(o) + residual``; the dense MLP's, the experts' and the
  router's inputs (``norm(h)`` with three weights and the router's scalings);
- ``end_of_layer``: ``norm(norm(d) + norm(m)) + h`` times the layer scalar, and the next
  layer's input norm.

Each variant compiles the block from cold (``torch._dynamo.reset``), for the batch alone or
with the batch symbolic (``dynamic``, as vLLM compiles its graph for every batch size),
and times it in a CUDA graph of 64 calls on distinct inputs, at each batch; the outputs
must match the default's within bf16 rounding. Prints us per call and default / variant.

    python bench/norm_block.py [--batches 1,16,64] [--out F.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from moe_decode import graph_time_us  # noqa: E402  (bench/moe_decode.py)

HIDDEN, EPS, CALLS = 2816, 1e-6, 64
PERSISTENT_UP_TO = 4096


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


def end_of_layer(d, m, h, w1, w2, w, scalar, w_next):
    y = (rms(rms(d, w1) + rms(m, w2), w) + h) * scalar
    return y, rms(y, w_next)


BLOCKS = {"post_attention": (post_attention, 2, 4), "end_of_layer": (end_of_layer, 3, 5)}


@contextlib.contextmanager
def persistent_rows(limit: int):
    """Inductor's choices with inner reductions of up to ``limit`` persistent."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.codegen.simd_kernel_features import SIMDKernelFeatures
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class Persistent(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: SIMDKernelFeatures, cooperative_reduction):
            if (
                config.triton.persistent_reductions
                and not cooperative_reduction
                and features.get_reduction_hint() == ReductionHint.INNER
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, limit)
            ):
                return True
            return InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)

    V.set_choices_handler(Persistent())
    try:
        yield
    finally:
        V.set_choices_handler(InductorChoices())


VARIANTS = {
    "default": contextlib.nullcontext,
    "persistent": lambda: persistent_rows(PERSISTENT_UP_TO),
    "dynamic": contextlib.nullcontext,  # the batch symbolic, as vLLM compiles a graph
    "dynamic+persistent": lambda: persistent_rows(PERSISTENT_UP_TO),
}


def inputs(gen: torch.Generator, batch: int, rows: int, vectors: int) -> list[torch.Tensor]:
    def vec() -> torch.Tensor:
        return (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device="cuda")).bfloat16()

    acts = [torch.randn(batch, HIDDEN, generator=gen, device="cuda") for _ in range(rows)]
    return [a.bfloat16() for a in acts] + [vec() for _ in range(vectors)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,16,64")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (fn, acts, vectors) in BLOCKS.items():
        for batch in (int(b) for b in args.batches.split(",")):
            sets = [inputs(gen, batch, acts, vectors) for _ in range(CALLS)]
            reference = None
            for variant, context in VARIANTS.items():
                torch._dynamo.reset()
                with context():
                    dynamic = variant.startswith("dynamic")
                    compiled = torch.compile(fn, dynamic=None if dynamic else False)
                    for t in sets[0][:acts] if dynamic else ():
                        torch._dynamo.mark_dynamic(t, 0)
                    outs = compiled(*sets[0])
                    run = [lambda c=compiled, s=s: c(*s) for s in sets]
                    us = graph_time_us(lambda run=run: [r() for r in run], 1, 20) / CALLS
                if reference is None:
                    reference = outs
                err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                          for a, b in zip(outs, reference, strict=True))  # fmt: skip
                row = {"block": name, "batch": batch, "variant": variant, "us": round(us, 2),
                       "diff_vs_default": err}  # fmt: skip
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{torch.cuda.get_device_name()}\n| block | batch | variant | us | default / this |")
    print("|---|---|---|---|---|")
    base = {}
    for r in rows:
        key = (r["block"], r["batch"])
        base.setdefault(key, r["us"])
        print(f"| {r['block']} | {r['batch']} | {r['variant']} | {r['us']} | "
              f"{base[key] / r['us']:.3f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                       indent=1))  # fmt: skip
    return 0 if all(r["diff_vs_default"] < 1e-2 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A driver for Nsight Compute: one-token kernels of a kernels folder at 26B-A4B's shapes,
called a few times on random weights, so that ``ncu`` can profile one call.

    ncu --set full --launch-skip 4 --launch-count 1 -k regex:_marlin_gemv_kernel \\
        python bench/kernel_ncu.py qkv [--kernels OLD/src/gemma4_quant/kernels]
    ncu --set full --import-source no --page source --print-source sass ...  # per instruction

Shapes: ``qkv`` (2816 -> 8192) and ``o`` (4096 -> 2816) through ``marlin_gemv``,
``moe`` (128 experts, top 8, hidden 2816, intermediate 704; ``-k regex:_w13_kernel|_w2_kernel``)
through ``marlin_moe``, ``dense`` through ``dense_decode.gate_up_act`` (2816 -> 2 x 2112),
each at the tiles ``kernels.tiles`` holds for capability 9.0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_loop_ab import (  # noqa: E402
    DENSE_INTER,
    EXPERTS,
    GROUP,
    HIDDEN,
    INTER,
    TOP_K,
    load_kernels,
)

from gemma4_quant.kernels import tiles  # noqa: E402

GEMV = {"qkv": (2816, 8192, tiles.GEMV_K2816), "o": (4096, 2816, tiles.GEMV_K4096_UP)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=(*GEMV, "moe", "dense"))
    parser.add_argument("--kernels", type=Path, help="a kernels folder (default: this checkout's)")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    gemv, moe, dense = load_kernels(args.kernels)
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.shape in GEMV:
        k, n, gemv_tiles = GEMV[args.shape]
        w = torch.randint(-(2**31), 2**31 - 1, (k // 16, 2 * n), generator=gen, device="cuda",
                          dtype=torch.int32)  # fmt: skip
        s = (torch.rand(k // GROUP, n, generator=gen, device="cuda") * 0.02 + 0.005).bfloat16()
        x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
        for _ in range(args.calls):
            gemv.marlin_gemv(x, w, s, GROUP, **gemv_tiles)
    elif args.shape == "moe":
        e, h, i = EXPERTS, HIDDEN, INTER
        w13 = torch.randint(-(2**31), 2**31 - 1, (e, h // 16, 4 * i), generator=gen,
                            device="cuda", dtype=torch.int32)  # fmt: skip
        w2 = torch.randint(-(2**31), 2**31 - 1, (e, i // 16, 2 * h), generator=gen, device="cuda",
                           dtype=torch.int32)  # fmt: skip
        s13 = torch.rand(e, h // GROUP, 2 * i, generator=gen, device="cuda") * 0.02 + 0.005
        s2 = torch.rand(e, i // GROUP, h, generator=gen, device="cuda") * 0.02 + 0.005
        s13, s2 = s13.bfloat16(), s2.bfloat16()
        scale = torch.rand(e, generator=gen, device="cuda").bfloat16() + 0.5
        x = torch.randn(1, h, generator=gen, device="cuda").bfloat16()
        logits = torch.randn(1, e, generator=gen, device="cuda")
        for _ in range(args.calls):
            moe.marlin_moe(x, logits, scale, w13, s13, w2, s2, top_k=TOP_K)
    else:
        w = torch.randn(2 * DENSE_INTER, HIDDEN, generator=gen, device="cuda") / HIDDEN**0.5
        w = w.bfloat16()
        x = torch.randn(1, HIDDEN, generator=gen, device="cuda").bfloat16()
        out = torch.empty(1, DENSE_INTER, device="cuda", dtype=torch.bfloat16)
        gate_up_tiles = {key: v for key, v in tiles.DENSE_MLP.items() if key.endswith("1")}
        for _ in range(args.calls):
            dense.gate_up_act(x, w, out, activation="gelu_tanh", **gate_up_tiles)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())

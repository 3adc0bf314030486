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

from int4_loop_ab import load_kernels  # noqa: E402

GEMV = {"qkv": (2816, 8192, 8), "o": (4096, 2816, 16)}  # K, N, split


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=(*GEMV, "moe", "dense"))
    parser.add_argument("--kernels", type=Path, help="a kernels folder (default: this checkout's)")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    gemv, moe, dense = load_kernels(args.kernels) if args.kernels else load_kernels()
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.shape in GEMV:
        k, n, split = GEMV[args.shape]
        w = torch.randint(-(2**31), 2**31 - 1, (k // 16, 2 * n), generator=gen, device="cuda",
                          dtype=torch.int32)  # fmt: skip
        s = (torch.rand(k // 32, n, generator=gen, device="cuda") * 0.02 + 0.005).bfloat16()
        x = torch.randn(1, k, generator=gen, device="cuda").bfloat16()
        for _ in range(args.calls):
            gemv.marlin_gemv(x, w, s, 32, split=split, block_kt=4, warps=4)
    elif args.shape == "moe":
        e, h, i = 128, 2816, 704
        w13 = torch.randint(-(2**31), 2**31 - 1, (e, h // 16, 4 * i), generator=gen,
                            device="cuda", dtype=torch.int32)  # fmt: skip
        w2 = torch.randint(-(2**31), 2**31 - 1, (e, i // 16, 2 * h), generator=gen, device="cuda",
                           dtype=torch.int32)  # fmt: skip
        s13 = torch.rand(e, h // 32, 2 * i, generator=gen, device="cuda") * 0.02 + 0.005
        s2 = torch.rand(e, i // 32, h, generator=gen, device="cuda") * 0.02 + 0.005
        s13, s2 = s13.bfloat16(), s2.bfloat16()
        scale = torch.rand(e, generator=gen, device="cuda").bfloat16() + 0.5
        x = torch.randn(1, h, generator=gen, device="cuda").bfloat16()
        logits = torch.randn(1, e, generator=gen, device="cuda")
        for _ in range(args.calls):
            moe.marlin_moe(x, logits, scale, w13, s13, w2, s2, top_k=8)
    else:
        w = (torch.randn(2 * 2112, 2816, generator=gen, device="cuda") / 53).bfloat16()
        x = torch.randn(1, 2816, generator=gen, device="cuda").bfloat16()
        out = torch.empty(1, 2112, device="cuda", dtype=torch.bfloat16)
        for _ in range(args.calls):
            dense.gate_up_act(x, w, out, activation="gelu_tanh", block_n1=4, block_k1=512,
                              warps1=4)  # fmt: skip
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two changes to the int4 loop of ``marlin_gemv``, timed against it on 26B-A4B's q/k/v and
o projections: tensor cores (``mma=True``: one ``mma.sync`` per word through inline PTX,
the weights made bf16 by an and-or, as Marlin does) and the words prefetched two steps
ahead (``depth=2``). Same weights and timing as bench/marlin_gemv.py (CUDA graph, weights
cycled past L2); one line per tile setting: its error against the exact float32 product
and its time per call.

    python bench/int4_loop_probe.py
"""

from __future__ import annotations

import functools
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from marlin_gemv import GROUP, SHAPES, make_weights, rotated  # noqa: E402
from moe_decode import graph_time_us  # noqa: E402

from gemma4_quant.kernels.marlin_gemv import marlin_gemv  # noqa: E402

# (split, row tiles per step, warps)
TILES = [(4, 8, 8), (4, 8, 4), (8, 4, 4), (8, 8, 4), (16, 4, 4), (16, 2, 4), (8, 2, 4), (4, 4, 4)]
VARIANTS = ({"depth": 1}, {"depth": 2}, {"mma": True})


def main() -> int:
    import vllm._custom_ops  # noqa: F401  (registers Marlin's repack)

    for name in ("qkv", "o"):
        k, n = SHAPES[name]
        gen = torch.Generator(device="cuda").manual_seed(k)
        words, scales, w = make_weights(k, n, gen)
        x = torch.randn(1, k, device="cuda", generator=gen).bfloat16()
        want = x.float() @ w
        count = max(2, math.ceil(150e6 / (words.numel() * 4)))
        copies = [(words.clone(), scales.clone()) for _ in range(count)]
        for extra in VARIANTS:
            for split, block_kt, warps in TILES:
                for stages in (2, 3):
                    t = {"split": split, "block_kt": block_kt, "warps": warps, **extra}
                    t["stages"] = stages
                    call = functools.partial(marlin_gemv, x, group=GROUP, **t)
                    try:
                        got = call(w_q=words, w_s=scales)
                        err = ((got.float() - want).norm() / want.norm()).item()
                        cycled = rotated(lambda a, b, c=call: functools.partial(c, w_q=a, w_s=b),
                                         copies)  # fmt: skip
                        us = graph_time_us(cycled, 3, 10) / count
                        print(k, n, t, f"err {err:.5f} us {us:.2f}", flush=True)
                    except Exception as e:  # noqa: BLE001  (a tile that fails is reported)
                        print(k, n, t, type(e).__name__, str(e)[-300:], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

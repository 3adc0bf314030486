"""The tiles of the one-token kernels that were measured, in one module without Triton.

The patches, which run in every vLLM process and must not import Triton there, decide
with them which GPUs and shapes take a kernel (their ``TILES``); ``marlin_moe`` and
``router_decode`` take theirs as their defaults too. Each set was measured on an H100
(capability 9.0) at Gemma 4 26B-A4B's shapes, and the four kernels together with these
tiles measured faster end to end (docs/gpu-results.md 3k, 3l; bench/results/h100-2026-12-07).
"""

from __future__ import annotations

# marlin_gemv, the fastest of bench/int4_loop_ab.py's sweep at 26B-A4B's projections: 9.9 us
# at q/k/v (2816 -> 8192), 11.4 at global q/k/v (2816 -> 10240) ...
GEMV_K2816 = {"split": 8, "block_kt": 4, "warps": 4}
# ... 7.7 at o (4096 -> 2816) and 10.9 at global o (8192 -> 2816)
GEMV_K4096_UP = {"split": 16, "block_kt": 4, "warps": 4}

# marlin_moe, the experts (hidden 2816, intermediate 704, top 8 of 128): 28.2 us, routing
# included (bench/results/h100-2026-12-07/ab/int4_loop_ab.json)
MARLIN_MOE = {
    "split13": 8,
    "block_kt13": 4,
    "warps13": 4,
    "split2": 2,
    "block_kt2": 4,
    "warps2": 4,
}

# router_decode (bench/router_decode.py --tune, weights in L2, [128, 2816]): the router 2.36
# us (fastest), the projection alone 2.10 (fastest 2.07); both 3.05 and 3.76 with the 4 x 512
# tiles of the first end-to-end run, where the projection took 5.8 us inside vLLM (its
# weights come from HBM there)
ROUTER = {"block_n": 2, "block_k": 1024, "warps": 4}

# dense_decode, the bf16 dense MLP (hidden 2816, intermediate 2112), the fastest of
# bench/int4_loop_ab.py's sweep: gate_up 10.2 us, down 6.7
# (bench/results/h100-2026-12-07b/twostream, side a)
DENSE_MLP = {"block_n1": 4, "block_k1": 512, "warps1": 4, "block_n2": 4, "block_k2": 512,
             "warps2": 4}  # fmt: skip

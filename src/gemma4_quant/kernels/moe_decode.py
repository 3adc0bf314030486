"""Small-batch int4 MoE in two Triton kernels, for Gemma 4 decode.

Why:
    At decode batch sizes vLLM's Marlin MoE path is six kernels per layer (block
    alignment, W13 GEMM, activation, W2 GEMM, weighted sum and their helpers), each
    paying a launch-and-drain floor of a few microseconds, while one Gemma 4 26B-A4B MoE
    layer reads only ~27 MB (8 of 128 experts, int4 group 32). Here the chosen experts
    are read directly, with no block alignment:

    1. ``w13_act``: per (token, chosen expert), the gate and up rows of W13, then
       GELU(tanh) (or GELU, SiLU) of the gate times up: the intermediate activations;
    2. ``w2_sum``: per token, W2 of every chosen expert, weighted by the router and
       summed in float32 registers, written once as the layer's output.

Layout:
    The compressed-tensors pack-quantized layout itself, N-first: ``packed`` int32
    ``[E, N, K / 8]`` (nibble ``j`` of word ``w`` holds column ``8w + j``), ``scale``
    ``[E, N, K / group]``; symmetric, values ``(nibble - 8) * scale`` (``uint4b8``).
    cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit stores exactly this, so the kernels read the
    checkpoint's tensors as they are.

How:
    A program owns a tile of rows and walks K in ``BLOCK_W`` words. Each word holds 8
    columns; the 8 nibble planes of the tile are multiplied by the 8 matching
    (stride-8) slices of the activations, so all arithmetic stays element-wise on a
    ``[rows, words]`` tile and the only reduction is the final one over K. The group
    scale multiplies the partial sum of its 4 words.

Numerics:
    Products accumulate in float32, are scaled once per word by the group's scale and
    summed in float32. W13's outputs, the activation product and each expert's W2 output
    are rounded to the activation dtype, where vLLM's path rounds them too; the weighted
    sum over experts stays in float32 and is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ACTIVATIONS, act_and_mul, nibble_minus_8

PACK = 8  # int4 values per int32 word
# Tile defaults, measured on an H200 at the 26B-A4B's shapes (bench/moe_decode.py --tune).
DEFAULT_TILES = {
    "block_n13": 16,
    "block_w13": 64,
    "warps13": 4,
    "block_n2": 4,
    "block_w2": 64,
    "warps2": 4,
}


@triton.jit
def _rows_dot(
    w_ptr,  # int32 [N, K / 8] of one expert
    s_ptr,  # scales [N, K / GROUP] of one expert
    x_ptr,  # activations [K]
    rows,  # [ROWS] row indices
    row_mask,
    k_words,  # K / 8
    k_groups,  # K / GROUP
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """sum_k (nibble(w[n, k]) - 8) * scale[n, k // GROUP] * x[k] for ``rows``, in fp32."""
    WORDS_PER_GROUP: tl.constexpr = GROUP // 8
    acc = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_W)
    for w0 in range(0, k_words, BLOCK_W):
        words = w0 + offs
        word_mask = words < k_words
        mask = row_mask[:, None] & word_mask[None, :]
        w = tl.load(w_ptr + rows[:, None] * k_words + words[None, :], mask=mask, other=0)
        part = tl.zeros([ROWS, BLOCK_W], dtype=tl.float32)
        for j in tl.static_range(8):
            xj = tl.load(x_ptr + words * 8 + j, mask=word_mask, other=0.0).to(tl.float32)
            part += nibble_minus_8(w, j) * xj[None, :]
        groups = words // WORDS_PER_GROUP
        s = tl.load(s_ptr + rows[:, None] * k_groups + groups[None, :], mask=mask, other=0.0)
        acc += part * s.to(tl.float32)
    return tl.sum(acc, axis=1)


@triton.jit
def _w13_act_kernel(
    x_ptr,  # [M, K] activations
    ids_ptr,  # [M, TOPK] expert ids
    w_ptr,  # [E, 2I, K / 8] int32
    s_ptr,  # [E, 2I, K / GROUP]
    out_ptr,  # [M * TOPK, I]
    inter,  # I
    hidden,  # K
    TOPK: tl.constexpr,
    GROUP: tl.constexpr,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    pair = tl.program_id(0)
    token = pair // TOPK
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    # gate row n and up row I + n side by side (even / odd), split after the dot
    r = tl.arange(0, 2 * BLOCK_N)
    n = tl.program_id(1) * BLOCK_N + r // 2
    rows = n + (r % 2) * inter
    k_words = hidden // 8
    k_groups = hidden // GROUP
    both = _rows_dot(
        w_ptr + expert * (2 * inter) * k_words,
        s_ptr + expert * (2 * inter) * k_groups,
        x_ptr + token.to(tl.int64) * hidden,
        rows,
        n < inter,
        k_words,
        k_groups,
        GROUP,
        2 * BLOCK_N,
        BLOCK_W,
    )
    gate, up = tl.split(tl.reshape(both, (BLOCK_N, 2)))
    # rounded to the activation dtype first, as vLLM's W13 GEMM writes them
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    act = act_and_mul(gate, up, out_ptr.dtype.element_ty, ACT)
    tl.store(out_ptr + pair.to(tl.int64) * inter + cols, act, mask=cols < inter)


@triton.jit
def _w2_sum_kernel(
    a_ptr,  # [M * TOPK, I] intermediate activations
    ids_ptr,  # [M, TOPK]
    weights_ptr,  # [M, TOPK] float32 router weights
    w_ptr,  # [E, H, I / 8] int32
    s_ptr,  # [E, H, I / GROUP]
    out_ptr,  # [M, H]
    inter,  # I (this kernel's K)
    hidden,  # H (this kernel's N)
    TOPK: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < hidden
    k_words = inter // 8
    k_groups = inter // GROUP
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in range(TOPK):
        pair = token * TOPK + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.load(weights_ptr + pair).to(tl.float32)
        part = _rows_dot(
            w_ptr + expert * hidden * k_words,
            s_ptr + expert * hidden * k_groups,
            a_ptr + pair.to(tl.int64) * inter,
            rows,
            row_mask,
            k_words,
            k_groups,
            GROUP,
            BLOCK_N,
            BLOCK_W,
        )
        # each expert's output rounded to the activation dtype, as vLLM's W2 GEMM writes it
        acc += weight * part.to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + token.to(tl.int64) * hidden + rows, acc, mask=row_mask)


def check_shapes(
    hidden: int,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    group_size: int,
) -> int:
    """The intermediate size, after checking every weight tensor against ``hidden``."""
    inter = w2_packed.shape[2] * PACK
    if hidden % group_size or inter % group_size or group_size % PACK:
        raise ValueError(f"group size {group_size} must divide {hidden} and {inter}")
    expected = {
        "w13_packed": (w13_packed, (2 * inter, hidden // PACK)),
        "w13_scale": (w13_scale, (2 * inter, hidden // group_size)),
        "w2_packed": (w2_packed, (hidden, inter // PACK)),
        "w2_scale": (w2_scale, (hidden, inter // group_size)),
    }
    for name, (t, want) in expected.items():
        if tuple(t.shape[1:]) != want:
            raise ValueError(
                f"{name} {tuple(t.shape)} does not match hidden {hidden} and intermediate "
                f"{inter} (expected [E, {want[0]}, {want[1]}])"
            )
    return inter


def w13_act(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    out: torch.Tensor,
    *,
    group_size: int,
    activation: str,
    block_n13: int,
    block_w13: int,
    warps13: int,
) -> torch.Tensor:
    pairs, inter = out.shape
    _w13_act_kernel[(pairs, triton.cdiv(inter, block_n13))](
        x,
        topk_ids,
        w13_packed,
        w13_scale,
        out,
        inter,
        x.shape[1],
        TOPK=topk_ids.shape[1],
        GROUP=group_size,
        ACT=ACTIVATIONS[activation],
        BLOCK_N=block_n13,
        BLOCK_W=block_w13,
        num_warps=warps13,
    )
    return out


def w2_sum(
    inter_act: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    out: torch.Tensor,
    *,
    group_size: int,
    block_n2: int,
    block_w2: int,
    warps2: int,
) -> torch.Tensor:
    m, hidden = out.shape
    _w2_sum_kernel[(m, triton.cdiv(hidden, block_n2))](
        inter_act,
        topk_ids,
        topk_weights,
        w2_packed,
        w2_scale,
        out,
        inter_act.shape[1],
        hidden,
        TOPK=topk_ids.shape[1],
        GROUP=group_size,
        BLOCK_N=block_n2,
        BLOCK_W=block_w2,
        num_warps=warps2,
    )
    return out


def moe_decode(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13_packed: torch.Tensor,
    w13_scale: torch.Tensor,
    w2_packed: torch.Tensor,
    w2_scale: torch.Tensor,
    *,
    group_size: int = 32,
    activation: str = "gelu_tanh",
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    **tiles: int,
) -> torch.Tensor:
    """The routed experts' weighted sum for ``x`` [M, H] (small M), int4 weights as above;
    ``tiles`` override ``DEFAULT_TILES``."""
    m, hidden = x.shape
    inter = check_shapes(hidden, w13_packed, w13_scale, w2_packed, w2_scale, group_size)
    t = {**DEFAULT_TILES, **tiles}
    if workspace is None:
        workspace = torch.empty((m * topk_ids.shape[1], inter), dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty_like(x)
    topk_ids = topk_ids.contiguous()
    w13_act(
        x.contiguous(),
        topk_ids,
        w13_packed,
        w13_scale,
        workspace,
        group_size=group_size,
        activation=activation,
        block_n13=t["block_n13"],
        block_w13=t["block_w13"],
        warps13=t["warps13"],
    )
    return w2_sum(
        workspace,
        topk_ids,
        topk_weights.to(torch.float32).contiguous(),
        w2_packed,
        w2_scale,
        out,
        group_size=group_size,
        block_n2=t["block_n2"],
        block_w2=t["block_w2"],
        warps2=t["warps2"],
    )

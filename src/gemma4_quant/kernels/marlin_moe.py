"""One token through Gemma 4's routed experts, on the weights Marlin's MoE already holds, in
two Triton kernels: routing, the chosen experts, activation and weighted sum.

Why:
    At one token vLLM runs Gemma 4's MoE as eight kernels per layer: routing, block
    alignment and its helpers, Marlin's W13 GEMM, the activation, Marlin's W2 GEMM and the
    weighted sum. The two GEMMs take 24.4 us and the rest 10.8 us of a ~125 us layer on an
    H100, for 26.8 MB of weights (8.0 us at the bound; docs/gpu-results.md, section 3d).
    Marlin repacks the experts when the model loads, so a one-token path has to read that
    layout (``kernels.moe_decode`` reads the checkpoint's, which is gone by then).

Layout:
    Per expert exactly ``marlin_gemv``'s (``gptq_marlin_moe_repack`` runs
    ``gptq_marlin_repack`` per expert; scales go through ``marlin_permute_scales`` per
    expert): ``w13`` int32 ``[E, K / 16, 2 N13]`` with ``N13 = 2 I`` columns, gate
    ``0 .. I`` then up ``I .. 2 I``; ``w2`` int32 ``[E, I / 16, 2 H]``; scales ``[E, K /
    group, N]``. ``I`` may be Marlin's padded intermediate size: its padded columns have
    zero scales, so they add nothing.

How:
    Routing is Gemma 4's: softmax over all experts, the top k, renormalized over them
    (which is a softmax over the top k logits), times the expert's ``per_expert_scale``.
    Each program recomputes it from the router's logits (128 values, in registers), so no
    routing kernel runs and no expert ids are stored.

    1. ``_w13_kernel``: per (tile of 64 gate columns of W13, top-k slot, share of K), that
       slot's expert, the gate tile and its up tile; split-K partial sums, the last
       program of a tile writing the activation of gate times up (gate and up rounded to
       the activation dtype first, as Marlin's GEMM writes them for vLLM's activation).
    2. ``_w2_kernel``: per (tile of 64 output columns, slot, share of K), W2 of the slot's
       expert times its routing weight; the last program of a tile adds every slot's and
       share's float32 partial sums and writes the layer's output once.

Numerics:
    As ``marlin_gemv``: products and sums in float32, scales per group in float32; the
    W13 output and the activation rounded to the activation dtype, as vLLM's path rounds
    them; the weighted sum over experts stays in float32 and is rounded once.

Speed (each call its own routing; docs/gpu-results.md 3f, 3g, 3k):
    on an H100 28.2 us (bench/int4_loop_ab.py; the loop before this one, whose W2 also
    computed the activation, 32.3) where vLLM 0.26.0's routing kernel and
    ``fused_marlin_moe`` (7 kernels) took 37.8, for 26.8 MB; inside vLLM at one token 27.6
    us a layer against 35.3 in 8 kernels. Error 0.31% against the exact product (vLLM
    0.45%).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .common import ACTIVATIONS, act_and_mul, launch_options, pdl_for, pdl_wait
from .marlin_gemv import (
    TILE_N,
    aligned_pairs,
    finish_tile,
    last_of_split,
    share,
    split_sum,
    tile_columns,
    tile_dot,
)

DEFAULT_TILES = tiles.MARLIN_MOE


@triton.jit
def route(logits_ptr, scale_ptr, slot, n_experts, TOPK: tl.constexpr, BLOCK_E: tl.constexpr):
    """The expert and routing weight of top-k ``slot``: softmax over all experts, top k,
    renormalized over the top k, times the expert's scale (Gemma 4's routing). Ties go to
    the lower expert id; NaN logits give NaN weights and an expert id in range."""
    e = tl.arange(0, BLOCK_E)
    logits = tl.load(logits_ptr + e, mask=e < n_experts, other=float("-inf")).to(tl.float32)
    top = tl.max(logits, axis=0)
    work = logits
    denom = 0.0
    mine = 0.0
    expert = 0
    for i in tl.static_range(TOPK):
        best = tl.max(work, axis=0)
        # NaN logits match no expert: the last one then, never an address past the experts
        idx = tl.minimum(tl.min(tl.where(work == best, e, BLOCK_E), axis=0), n_experts - 1)
        p = tl.exp(best - top)
        denom += p
        expert = tl.where(slot == i, idx, expert)
        mine = tl.where(slot == i, p, mine)
        work = tl.where(e == idx, float("-inf"), work)
    weight = mine / denom * tl.load(scale_ptr + expert).to(tl.float32)
    return expert.to(tl.int64), weight


@triton.jit
def finish_act(
    r0, r1, u0, u1,
    part_ptr,  # float32 [SPLIT, N13] partial sums of this slot (SPLIT > 1)
    count_ptr,  # int32: finished programs of this gate tile, zero between calls
    out_ptr,  # [N13 / 2] this slot's activation row
    n,  # N13
    g,
    split,
    SPLIT: tl.constexpr,
    ACT: tl.constexpr,
):  # fmt: skip
    """Writes the activation of gate tile ``g`` (``r``) times its up tile (``u``): at once
    without split-K; else each program stores its float32 partial sums of both, and the
    last one of the tile adds them and writes, then resets the counter. Gate and up are
    rounded to the output dtype first, as vLLM's GEMM writes them for its activation."""
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    col0, col1 = tile_columns(g)  # the up columns are n / 2 further
    half = n // 2
    if SPLIT == 1:
        tl.store(out_ptr + col0, act_and_mul(r0, u0, dtype, ACT).to(dtype))
        tl.store(out_ptr + col1, act_and_mul(r1, u1, dtype, ACT).to(dtype))
    else:
        part = part_ptr + split * n
        tl.store(part + col0, r0)
        tl.store(part + col1, r1)
        tl.store(part + half + col0, u0)
        tl.store(part + half + col1, u1)
        if last_of_split(count_ptr, SPLIT):
            for col in tl.static_range(2):
                cols = col0 + 8 * col
                gate = split_sum(part_ptr, n, cols, SPLIT)
                up = split_sum(part_ptr, n, half + cols, SPLIT)
                tl.store(out_ptr + cols, act_and_mul(gate, up, dtype, ACT).to(dtype))
            tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _w13_kernel(
    x_ptr,  # [K] activations
    logits_ptr,  # [E] router logits
    scale_ptr,  # [E] per-expert scale
    w_ptr,  # int32 [E, K / 16, 2 N]
    s_ptr,  # [E, K / GROUP, N]
    part_ptr,  # float32 [TOPK, SPLIT, N]
    count_ptr,  # int32 [TOPK, N / 128]
    out_ptr,  # [TOPK, N / 2] activation rows
    n_experts,
    n,
    k_tiles,
    tiles_per_split,
    TOPK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_KT: tl.constexpr,
    ACT: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    g = tl.program_id(0)  # a tile of gate columns; its up columns are n / 128 tiles further
    slot = tl.program_id(1)
    split = tl.program_id(2)
    pdl_wait(PDL)  # the logits come from the kernel ahead, and the weights' address from them
    expert, _ = route(logits_ptr, scale_ptr, slot, n_experts, TOPK, BLOCK_E)
    kt_begin = split * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    w = w_ptr + expert * k_tiles * (2 * n)
    s = s_ptr + expert * ((k_tiles * 16) // GROUP) * n
    r0, r1 = tile_dot(x_ptr, w, s, n, g, kt_begin, kt_end, GROUP, BLOCK_KT, PREFETCH)
    u0, u1 = tile_dot(x_ptr, w, s, n, g + n // 128, kt_begin, kt_end, GROUP, BLOCK_KT, PREFETCH)
    finish_act(
        r0, r1, u0, u1, part_ptr + slot * SPLIT * n, count_ptr + slot * (n // 128) + g,
        out_ptr + slot * (n // 2), n, g, split, SPLIT, ACT,
    )  # fmt: skip


@triton.jit
def _w2_kernel(
    h_ptr,  # [TOPK, I] activation rows
    logits_ptr,
    scale_ptr,
    w_ptr,  # int32 [E, I / 16, 2 H]
    s_ptr,  # [E, I / GROUP, H]
    part_ptr,  # float32 [TOPK * SPLIT, H]
    count_ptr,  # int32 [H / 64]
    out_ptr,  # [H]
    n_experts,
    n,  # H
    k_tiles,  # I / 16
    tiles_per_split,
    TOPK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_KT: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    g = tl.program_id(0)
    slot = tl.program_id(1)
    split = tl.program_id(2)
    pdl_wait(PDL)
    expert, weight = route(logits_ptr, scale_ptr, slot, n_experts, TOPK, BLOCK_E)
    inter = k_tiles * 16
    kt_begin = split * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    r0, r1 = tile_dot(
        h_ptr + slot * inter,
        w_ptr + expert * k_tiles * (2 * n),
        s_ptr + expert * (inter // GROUP) * n,
        n,
        g,
        kt_begin,
        kt_end,
        GROUP,
        BLOCK_KT,
        PREFETCH,
    )
    finish_tile(
        r0 * weight,
        r1 * weight,
        part_ptr,
        count_ptr + g,
        out_ptr,
        n,
        g,
        slot * SPLIT + split,
        TOPK * SPLIT,
    )


def check_shapes(
    hidden: int,
    n_experts: int,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
) -> tuple[int, int]:
    """(intermediate size, group size) of Marlin MoE tensors for ``hidden`` and
    ``n_experts``; a ValueError naming the tensor otherwise."""
    if w13.dim() != 3 or s13.dim() != 3 or w2.dim() != 3 or s2.dim() != 3:
        raise ValueError("marlin_moe: expert tensors must be [E, ., .]")
    inter = w2.shape[1] * 16
    groups = s13.shape[1]
    group = hidden // groups if groups else 0
    # one group over all of K is channelwise to Marlin, whose scales are permuted otherwise
    if (
        not group
        or hidden % group
        or group % 16
        or inter % group
        or group >= min(hidden, inter)
        or hidden % TILE_N
    ):
        raise ValueError(
            f"marlin_moe: hidden {hidden}, intermediate {inter}, {groups} scale groups: "
            "expected a group size of a multiple of 16, smaller than both, dividing both"
        )
    expected = {
        "w13": (w13, (n_experts, hidden // 16, 4 * inter)),
        "w13 scales": (s13, (n_experts, hidden // group, 2 * inter)),
        "w2": (w2, (n_experts, inter // 16, 2 * hidden)),
        "w2 scales": (s2, (n_experts, inter // group, hidden)),
    }
    for name, (t, want) in expected.items():
        if tuple(t.shape) != want:
            raise ValueError(
                f"marlin_moe: {name} {tuple(t.shape)}, expected {want} for hidden {hidden}, "
                f"intermediate {inter}, group {group}, {n_experts} experts"
            )
    if inter % TILE_N:
        raise ValueError(f"marlin_moe: intermediate {inter} is not a multiple of 64")
    return inter, group


_workspaces: dict[tuple, tuple[torch.Tensor, ...]] = {}


def workspace(
    top_k: int, n13: int, hidden: int, split13: int, split2: int, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Partial sums and tile counters of both kernels, made once per device and shape: calls
    on one stream follow each other, and each call leaves the counters at zero. Make it
    before a CUDA graph is captured (the plugin's build-time check does)."""
    key = (str(device), top_k, n13, hidden, split13, split2)
    if key not in _workspaces:
        f32, i32 = torch.float32, torch.int32
        _workspaces[key] = (
            torch.empty((top_k, split13, n13), dtype=f32, device=device),
            torch.zeros((top_k, n13 // (2 * TILE_N)), dtype=i32, device=device),
            torch.empty((top_k * split2, hidden), dtype=f32, device=device),
            torch.zeros(hidden // TILE_N, dtype=i32, device=device),
        )
    return _workspaces[key]


def marlin_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    expert_scale: torch.Tensor,
    w13: torch.Tensor,
    s13: torch.Tensor,
    w2: torch.Tensor,
    s2: torch.Tensor,
    *,
    top_k: int,
    activation: str = "gelu_tanh",
    **tiles: int,
) -> torch.Tensor:
    """Gemma 4's routed experts for one token ``x`` ``[1, H]``: ``[1, H]``. ``router_logits``
    ``[1, E]`` (float32 as Gemma 4's router writes them), ``expert_scale`` ``[E]``; the
    experts as Marlin's MoE holds them (above); ``tiles`` override ``DEFAULT_TILES``
    (``pdl``: both kernels launched with programmatic dependent launch; ``maxnreg13``,
    ``maxnreg2``: ``ptxas``' register limit of each, ``common.launch_options``)."""
    hidden = x.shape[-1]
    n_experts = router_logits.shape[-1]
    if x.numel() != hidden or router_logits.numel() != n_experts or top_k > n_experts:
        raise ValueError(
            f"marlin_moe: one token expected: x {tuple(x.shape)}, router logits "
            f"{tuple(router_logits.shape)}, top {top_k}"
        )
    if tuple(expert_scale.shape) != (n_experts,):
        raise ValueError(
            f"marlin_moe: per-expert scale {tuple(expert_scale.shape)}, expected ({n_experts},)"
        )
    inter, group = check_shapes(hidden, n_experts, w13, s13, w2, s2)
    t = {**DEFAULT_TILES, **tiles}
    pdl = pdl_for(t.get("pdl", 0), x.device)
    n13 = 2 * inter
    part13, count13, part2, count2 = workspace(
        top_k, n13, hidden, t["split13"], t["split2"], x.device
    )
    act = torch.empty((top_k, inter), dtype=x.dtype, device=x.device)
    out = torch.empty((1, hidden), dtype=x.dtype, device=x.device)
    logits = router_logits.contiguous()
    block_e = triton.next_power_of_2(n_experts)
    k13 = hidden // 16
    per13 = share(k13, t["split13"], t["block_kt13"])
    _w13_kernel[(inter // TILE_N, top_k, t["split13"])](
        aligned_pairs(x),
        logits,
        expert_scale,
        w13,
        s13,
        part13,
        count13,
        act,
        n_experts,
        n13,
        k13,
        per13,
        TOPK=top_k,
        BLOCK_E=block_e,
        GROUP=group,
        SPLIT=t["split13"],
        BLOCK_KT=t["block_kt13"],
        PREFETCH=t.get("prefetch13", 0),
        PDL=pdl,
        ACT=ACTIVATIONS[activation],
        num_warps=t["warps13"],
        **launch_options(pdl, t.get("maxnreg13", 0)),
    )
    k2 = inter // 16
    per2 = share(k2, t["split2"], t["block_kt2"])
    _w2_kernel[(hidden // TILE_N, top_k, t["split2"])](
        act,
        logits,
        expert_scale,
        w2,
        s2,
        part2,
        count2,
        out,
        n_experts,
        hidden,
        k2,
        per2,
        TOPK=top_k,
        BLOCK_E=block_e,
        GROUP=group,
        SPLIT=t["split2"],
        BLOCK_KT=t["block_kt2"],
        PREFETCH=t.get("prefetch2", 0),
        PDL=pdl,
        num_warps=t["warps2"],
        **launch_options(pdl, t.get("maxnreg2", 0)),
    )
    return out

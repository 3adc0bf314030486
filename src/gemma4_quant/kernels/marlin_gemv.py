"""One token through an int4 linear stored in Marlin's layout, in one Triton kernel.

Why:
    At one token vLLM runs Gemma 4's int4 attention projections through Marlin's GEMM,
    which moves their weights at about a third of an H100's bandwidth (docs/gpu-results.md,
    section 3d: qkv and o take 20.2 us per layer for 20.8 MB, 6.2 us at the bound). Marlin
    repacks the weights when the model loads, so a faster one-token path has to read
    that layout, or keep a second copy of the weights.

Layout (``gptq_marlin_repack`` of 4-bit weights, bf16/fp16 activations):
    ``w_q`` int32 ``[K / 16, 2 N]``: row ``kt`` holds rows ``16 kt .. 16 kt + 15`` of the
    ``[K, N]`` matrix in tiles of 64 columns, 128 words each. In the tile of columns
    ``64 g ..``, word ``16 ci + 4 t + j`` holds, in nibble ``4 a + 2 b + c``, the value of
    row ``2 t + a + 8 c`` and column ``16 j + 8 b + ci`` (the tensor-core fragment order).
    ``w_s`` ``[K / group, N]``: within each 64 columns of a row, column ``c`` sits at
    ``8 (c % 8) + c // 8``. Values are ``(nibble - 8) * scale`` (``uint4b8``).
    Derived from vLLM's reference packer (``marlin_utils_test.marlin_weights``); the
    tests compare against it, and the plugin checks each layer against Marlin itself
    before it takes this path.

How:
    A program owns one tile of 64 columns and a share of the K rows (split-K). Each step
    loads ``BLOCK_KT`` row tiles as ``[BLOCK_KT, 8, 4, 4]`` words (ci, t, j), multiplies
    their nibble planes (minus 8, made float by bit operations) by the matching
    activations, scales per group and accumulates in float32. With split-K, each program
    writes its float32 partial sums, and the last program of a tile (a counter per tile)
    adds them, writes the output and resets the counter: one kernel per call, as Marlin.

Numerics:
    Products and sums in float32, scaled per group in float32, rounded once to the
    activation dtype. Marlin rounds the dequantized weight times its scale to the
    activation dtype first, so the two differ by bf16 rounding (0.23 - 0.24% measured;
    against the exact product the kernel errs 0.16%, Marlin 0.22%).

Speed (weights cycled past L2, bench/marlin_gemv.py; docs/gpu-results.md 3e - 3g):
    on an H100, Marlin / this kernel 0.87 at 26B-A4B's q/k/v and 1.21 at its o projection
    (1.1 and 0.8 TB/s). The kernel takes about twice the time of its own grid and loads
    with no arithmetic (``--limits``), which run within 16% of a plain Triton stream of the
    same words: the arithmetic, not the access pattern, sets its pace.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from .common import act_and_mul, nibble_plain, nibble_unit

TILE_N = 64  # columns per Marlin tile group (128 words)


@triton.jit
def load_x(x_ptr, idx, mask, inter, ACT_IN: tl.constexpr):
    """Activations ``idx`` as float32. ``ACT_IN`` (0 SiLU, 1 GELU, 2 GELU(tanh); -1 none):
    ``x_ptr`` holds a gate-and-up row ``[2 inter]`` instead, and the activation of its gate
    times its up is taken here, rounded to its dtype as vLLM's activation kernel writes it."""
    if ACT_IN < 0:
        return tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(x_ptr + idx, mask=mask, other=0.0)
    up = tl.load(x_ptr + inter + idx, mask=mask, other=0.0)
    dtype = x_ptr.dtype.element_ty
    return act_and_mul(gate, up, dtype, ACT_IN).to(dtype).to(tl.float32)


@triton.jit
def step_inputs(
    x_ptr, w_ptr, s_ptr, n, words, s_col, t, kt, kt_end, inter, GROUP: tl.constexpr,
    ACT_IN: tl.constexpr, WORDS: tl.constexpr = True,
):  # fmt: skip
    """What one step of ``tile_dot`` reads for row tiles ``kt``: the words, the four
    activation vectors (rows ``2 t + a + 8 c`` of each row tile) and the two scale rows."""
    kt_mask = kt < kt_end
    w = tl.load(w_ptr + kt * (2 * n) + words, mask=kt_mask & WORDS, other=0)
    x00 = load_x(x_ptr, kt * 16 + 2 * t, kt_mask, inter, ACT_IN)
    x01 = load_x(x_ptr, kt * 16 + 2 * t + 8, kt_mask, inter, ACT_IN)
    x10 = load_x(x_ptr, kt * 16 + 2 * t + 1, kt_mask, inter, ACT_IN)
    x11 = load_x(x_ptr, kt * 16 + 2 * t + 9, kt_mask, inter, ACT_IN)
    kg = (kt * 16) // GROUP
    s0 = tl.load(s_ptr + kg * n + s_col, mask=kt_mask, other=0.0).to(tl.float32)
    s1 = tl.load(s_ptr + kg * n + s_col + 1, mask=kt_mask, other=0.0).to(tl.float32)
    return w, x00, x01, x10, x11, s0, s1


# One m16n8k16 tensor-core product per word. In Marlin's layout the word of lane (ci, t),
# j of a row tile is exactly the A fragment of the transposed tile (rows: the 16 columns
# 16 j + 8 b + ci; columns: its 16 rows 2 t + a + 8 c), register r holding nibbles r' and
# r' + 4 as a pair (r' = 0, 2, 1, 3: b, c). An and-or puts each nibble pair into the
# mantissas of 128 (1024 for fp16), exact values 128 + n: two weights per instruction,
# no conversion. B is the activations in column 0 (lanes ci = 0), zero elsewhere, so the
# product lands in lane t = 0 (rows ci and ci + 8) and the other lanes hold zeros.
_MMA_ASM = """{
.reg .b32 a<4>, s;
.reg .f32 z, d<2>;
mov.f32 z, 0f00000000;
lop3.b32 a0, $2, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $2, 8;
lop3.b32 a1, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $2, 4;
lop3.b32 a2, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $2, 12;
lop3.b32 a3, s, 0x000F000F, MAGIC, 0xEA;
mma.sync.aligned.m16n8k16.row.col.f32.TYPE.TYPE.f32
    {$0, d0, $1, d1}, {a0, a1, a2, a3}, {$3, $4}, {z, z, z, z};
}"""
MMA_BF16 = tl.constexpr(_MMA_ASM.replace("MAGIC", "0x43004300").replace("TYPE", "bf16"))
MMA_FP16 = tl.constexpr(_MMA_ASM.replace("MAGIC", "0x64006400").replace("TYPE", "f16"))


@triton.jit
def pack_pair(lo, hi, dtype: tl.constexpr):
    """Two float32 values, exact in ``dtype`` (16 bits), as one int32: ``lo`` in the low half."""
    lo16 = lo.to(dtype).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi16 = hi.to(dtype).to(tl.int16, bitcast=True).to(tl.int32)
    return lo16 | (hi16 << 16)


@triton.jit
def unpack_pair(pair, dtype: tl.constexpr):
    lo = (pair & 0xFFFF).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    hi = (pair >> 16).to(tl.int16).to(dtype, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def mma_words(w, xa, xb, dtype: tl.constexpr, MMA: tl.constexpr):
    """Per word of ``[BLOCK_KT, 128]`` (lane ``4 ci + t`` of its row tile, ``j`` within the
    lane): the sums of rows ``ci`` and ``ci + 8`` of its 16 x 16 block over all 16 rows in
    the lanes ``t = 0``, zero in the others, the weights taken as ``n + 128`` (``n + 1024``
    for fp16). ``xa``, ``xb``: the lane's activation pairs (rows ``2 t``, ``2 t + 1`` and
    ``+ 8``), zero outside the lanes ``ci = 0``. ``MMA`` 2 takes the same sums lane by lane
    (the Triton interpreter runs no PTX)."""
    if MMA == 1:
        p0, p1 = tl.inline_asm_elementwise(
            MMA_FP16 if dtype == tl.float16 else MMA_BF16,
            "=f,=f,r,r,r",
            [w, xa, xb],
            dtype=(tl.float32, tl.float32),
            is_pure=True,
            pack=1,
        )
    else:
        magic: tl.constexpr = 1024.0 if dtype == tl.float16 else 128.0
        kts: tl.constexpr = w.shape[0]
        w4 = tl.reshape(w, [kts, 8, 4, 4])  # (kt, ci, t, j)
        # B's column 0 (lanes ci = 0) against each lane's weights, summed into t = 0
        xa = tl.sum(tl.reshape(xa, [kts, 8, 4, 4]), axis=1, keep_dims=True)
        xb = tl.sum(tl.reshape(xb, [kts, 8, 4, 4]), axis=1, keep_dims=True)
        b00, b10 = unpack_pair(xa, dtype)
        b01, b11 = unpack_pair(xb, dtype)
        q0 = (nibble_plain(w4, 0) + magic) * b00 + (nibble_plain(w4, 1) + magic) * b01
        q0 += (nibble_plain(w4, 4) + magic) * b10 + (nibble_plain(w4, 5) + magic) * b11
        q1 = (nibble_plain(w4, 2) + magic) * b00 + (nibble_plain(w4, 3) + magic) * b01
        q1 += (nibble_plain(w4, 6) + magic) * b10 + (nibble_plain(w4, 7) + magic) * b11
        first = tl.arange(0, 4)[None, None, :, None] == 0
        p0 = tl.where(first, tl.sum(q0, axis=2, keep_dims=True), 0.0)
        p1 = tl.where(first, tl.sum(q1, axis=2, keep_dims=True), 0.0)
        p0 = tl.reshape(p0, [kts, 128])
        p1 = tl.reshape(p1, [kts, 128])
    return p0, p1


@triton.jit
def own_pair(v, j, t, BLOCK_KT: tl.constexpr):
    """Of the four values a lane holds (``j``), the one at ``t``, in all four."""
    mine = tl.where(j == t, v, 0)
    one = tl.sum(tl.reshape(mine, (BLOCK_KT, 32, 4)), axis=2, keep_dims=True)
    return tl.reshape(tl.broadcast_to(one, (BLOCK_KT, 32, 4)), (BLOCK_KT, 128))


@triton.jit
def mma_inputs(
    x_ptr, w_ptr, s_ptr, n, words, s_pairs, first, j, t, kt, kt_end, inter,
    GROUP: tl.constexpr, BLOCK_KT: tl.constexpr, ACT_IN: tl.constexpr,
):  # fmt: skip
    """What one step of ``tile_dot_mma`` reads for row tiles ``kt`` ``[BLOCK_KT, 1]``: the
    words, the activation pairs of lanes ``ci = 0`` (``first``) and zeros elsewhere, the sum
    of each row tile's 16 activations and the two scale rows. Only the words and scales are
    loaded per word, both as whole 16-byte rows of a lane, so that Triton keeps the words'
    lane order; the activations are one ``[BLOCK_KT, 16]`` load, spread from there."""
    kt_mask = kt < kt_end
    w = tl.load(w_ptr + kt * (2 * n) + words, mask=kt_mask, other=0)
    dtype = x_ptr.dtype.element_ty
    if ACT_IN < 0:
        # each lane loads the four pairs of its half (16 bytes, as the words: Triton keeps
        # one layout) and keeps its own, t; lanes ci > 0 load nothing
        pairs = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        ja = tl.load(pairs + kt * 8 + j, mask=kt_mask & first, other=0)
        jb = tl.load(pairs + kt * 8 + 4 + j, mask=kt_mask & first, other=0)
        xa = own_pair(ja, j, t, BLOCK_KT)
        xb = own_pair(jb, j, t, BLOCK_KT)
        rows = kt * 16 + tl.arange(0, 16)[None, :]
        x_sum = tl.sum(load_x(x_ptr, rows, kt_mask, inter, ACT_IN), axis=1, keep_dims=True)
    else:
        x = load_x(x_ptr, kt * 16 + tl.arange(0, 16)[None, :], kt_mask, inter, ACT_IN)
        x_sum = tl.sum(x, axis=1, keep_dims=True)
        lo, hi = tl.split(tl.reshape(x, [BLOCK_KT, 2, 4, 2]))  # row 2 t + a + 8 c: (kt, c, t), a
        xa, xb = tl.split(tl.permute(pack_pair(lo, hi, dtype), (0, 2, 1)))  # (kt, t), c
        xa = tl.reshape(tl.broadcast_to(xa[:, None, :, None], (BLOCK_KT, 8, 4, 4)), (BLOCK_KT, 128))
        xb = tl.reshape(tl.broadcast_to(xb[:, None, :, None], (BLOCK_KT, 8, 4, 4)), (BLOCK_KT, 128))
        xa = tl.where(first, xa, 0)
        xb = tl.where(first, xb, 0)
    kg = (kt * 16) // GROUP
    scales = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    s0, s1 = unpack_pair(tl.load(scales + kg * (n // 2) + s_pairs, mask=kt_mask, other=0), dtype)
    return w, xa, xb, x_sum, s0, s1


@triton.jit
def tile_dot_mma(
    x_ptr, w_ptr, s_ptr, n, g, kt_begin, kt_end, inter, GROUP: tl.constexpr,
    BLOCK_KT: tl.constexpr, ACT_IN: tl.constexpr, MMA: tl.constexpr,
):  # fmt: skip
    """``tile_dot`` on tensor cores (``mma_words``, the layout comment above it). A row
    tile's 128 words are one contiguous ``[128]`` row, so Triton gives each lane 4 of them
    (lane ``4 ci + t``, ``j`` within it), the order the instruction needs; the weights as
    ``n + 128`` add 136 times the activations' sum to each row, taken off once per row tile
    (a quarter in each lane ``t``)."""
    c = tl.arange(0, 128)[None, :]  # word 16 ci + 4 t + j of a row tile
    words = g * 128 + c
    s_pairs = g * 32 + 4 * (c // 16) + c % 4  # columns 8 ci + 2 j (b = 0) and + 1 (b = 1)
    first = c < 16  # ci = 0
    kt_idx = tl.arange(0, BLOCK_KT)[:, None]
    dtype = x_ptr.dtype.element_ty
    bias: tl.constexpr = 0.25 * (1032.0 if dtype == tl.float16 else 136.0)
    acc0 = tl.zeros([BLOCK_KT, 128], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_KT, 128], dtype=tl.float32)
    w, xa, xb, x_sum, s0, s1 = mma_inputs(
        x_ptr, w_ptr, s_ptr, n, words, s_pairs, first, c % 4, (c // 4) % 4, kt_begin + kt_idx,
        kt_end, inter, GROUP, BLOCK_KT, ACT_IN,
    )  # fmt: skip
    for kt0 in range(kt_begin, kt_end, BLOCK_KT):
        nw, nxa, nxb, nx_sum, ns0, ns1 = mma_inputs(
            x_ptr, w_ptr, s_ptr, n, words, s_pairs, first, c % 4, (c // 4) % 4,
            kt0 + BLOCK_KT + kt_idx, kt_end, inter, GROUP, BLOCK_KT, ACT_IN,
        )  # fmt: skip
        p0, p1 = mma_words(w, xa, xb, dtype, MMA)
        acc0 += (p0 - bias * x_sum) * s0
        acc1 += (p1 - bias * x_sum) * s1
        w, xa, xb, x_sum, s0, s1 = nw, nxa, nxb, nx_sum, ns0, ns1
    r0 = tl.sum(tl.reshape(tl.sum(acc0, axis=0), [8, 4, 4]), axis=1)  # [8, 4] (ci, j)
    r1 = tl.sum(tl.reshape(tl.sum(acc1, axis=0), [8, 4, 4]), axis=1)
    return r0, r1


@triton.jit
def tile_dot(
    x_ptr,
    w_ptr,  # int32 [K / 16, 2 n] of one matrix
    s_ptr,  # [K / GROUP, n] of one matrix
    n,
    g,  # the tile of 64 columns
    kt_begin,
    kt_end,
    inter,
    GROUP: tl.constexpr,
    BLOCK_KT: tl.constexpr,
    ACT_IN: tl.constexpr,
    MMA: tl.constexpr = 0,
    DEPTH: tl.constexpr = 1,
):
    """Rows ``16 kt_begin .. 16 kt_end`` of ``x @ W`` for the 64 columns of tile ``g``, in
    float32: two ``[8, 4]`` halves (ci, j), columns ``64 g + 16 j + ci`` and ``+ 8``.
    ``MMA`` 0: CUDA cores, as below; 1: tensor cores (``tile_dot_mma``); 2: its arithmetic
    without its instruction (for the Triton interpreter).

    Each step loads the next step's inputs before it computes its own: all programs of an
    SM start together and would otherwise wait for their loads together, then compute
    together (5 - 8% faster on an H100). Each nibble ``n`` becomes ``f = 1 + n / 16`` by a
    shift and an and-or, and ``n - 8 = 16 f - 24``: the 24 times the activations is taken
    once per row, not once per weight."""
    if MMA != 0:
        return tile_dot_mma(
            x_ptr, w_ptr, s_ptr, n, g, kt_begin, kt_end, inter, GROUP, BLOCK_KT, ACT_IN, MMA
        )  # fmt: skip
    kt_idx = tl.arange(0, BLOCK_KT)[:, None, None, None]
    ci = tl.arange(0, 8)[None, :, None, None]
    t = tl.arange(0, 4)[None, None, :, None]
    j = tl.arange(0, 4)[None, None, None, :]
    words = g * 128 + 16 * ci + 4 * t + j  # [1, 8, 4, 4]
    # scale column of b = 0; b = 1 is the next one
    s_col = g * 64 + 8 * ci + 2 * j  # [1, 8, 1, 4]
    acc0 = tl.zeros([BLOCK_KT, 8, 4, 4], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_KT, 8, 4, 4], dtype=tl.float32)
    w, x00, x01, x10, x11, s0, s1 = step_inputs(
        x_ptr, w_ptr, s_ptr, n, words, s_col, t, kt_begin + kt_idx, kt_end, inter, GROUP, ACT_IN
    )
    # DEPTH 2: the words two steps ahead (the scales and activations stay one ahead)
    kt_far = kt_begin + BLOCK_KT + kt_idx
    far_mask = (kt_far < kt_end) & (DEPTH == 2)
    w_far = tl.load(w_ptr + kt_far * (2 * n) + words, mask=far_mask, other=0)
    for kt0 in range(kt_begin, kt_end, BLOCK_KT):
        nw, nx00, nx01, nx10, nx11, ns0, ns1 = step_inputs(
            x_ptr, w_ptr, s_ptr, n, words, s_col, t, kt0 + BLOCK_KT + kt_idx, kt_end, inter,
            GROUP, ACT_IN, DEPTH == 1,
        )  # fmt: skip
        if DEPTH == 2:
            kt_far = kt0 + 2 * BLOCK_KT + kt_idx
            nw = w_far
            w_far = tl.load(w_ptr + kt_far * (2 * n) + words, mask=kt_far < kt_end, other=0)
        # nibble 4 a + 2 b + c: row 2 t + a + 8 c, column half b; n - 8 = 16 f - 24
        xs = 1.5 * (x00 + x01 + x10 + x11)
        p0 = nibble_unit(w, 0) * x00 + nibble_unit(w, 1) * x01
        p0 += nibble_unit(w, 4) * x10 + nibble_unit(w, 5) * x11
        p1 = nibble_unit(w, 2) * x00 + nibble_unit(w, 3) * x01
        p1 += nibble_unit(w, 6) * x10 + nibble_unit(w, 7) * x11
        acc0 += (p0 - xs) * s0
        acc1 += (p1 - xs) * s1
        w, x00, x01, x10, x11, s0, s1 = nw, nx00, nx01, nx10, nx11, ns0, ns1
    r0 = 16.0 * tl.sum(tl.sum(acc0, axis=0), axis=1)  # [8, 4] (ci, j)
    r1 = 16.0 * tl.sum(tl.sum(acc1, axis=0), axis=1)
    return r0, r1


@triton.jit
def finish_tile(
    r0,
    r1,
    part_ptr,  # float32 [SPLIT, n] partial sums of this output row (SPLIT > 1)
    count_ptr,  # int32: finished programs of this tile, zero between calls
    out_ptr,  # [n] this output row
    n,
    g,
    split,
    SPLIT: tl.constexpr,
):
    """Writes tile ``g`` of the output: at once without split-K; else each program stores
    its float32 partial sums, and the last one of the tile adds them, writes the output and
    resets the counter (one kernel per call, as Marlin)."""
    ci2 = tl.arange(0, 8)[:, None]
    j2 = tl.arange(0, 4)[None, :]
    col0 = g * 64 + 16 * j2 + ci2  # b = 0
    col1 = col0 + 8
    if SPLIT == 1:
        tl.store(out_ptr + col0, r0.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + col1, r1.to(out_ptr.dtype.element_ty))
    else:
        tl.store(part_ptr + split * n + col0, r0)
        tl.store(part_ptr + split * n + col1, r1)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr, 1, sem="acq_rel")
        if done == SPLIT - 1:
            t0 = tl.zeros([8, 4], dtype=tl.float32)
            t1 = tl.zeros([8, 4], dtype=tl.float32)
            for s in tl.static_range(SPLIT):
                t0 += tl.load(part_ptr + s * n + col0, cache_modifier=".cg")
                t1 += tl.load(part_ptr + s * n + col1, cache_modifier=".cg")
            tl.store(out_ptr + col0, t0.to(out_ptr.dtype.element_ty))
            tl.store(out_ptr + col1, t1.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(count_ptr, 0)


@triton.jit
def _marlin_gemv_kernel(
    x_ptr,  # [K] activations
    w_ptr,  # int32 [K / 16, 2 N]
    s_ptr,  # [K / GROUP, N], Marlin-permuted
    part_ptr,  # float32 [SPLIT, N] partial sums (SPLIT > 1)
    count_ptr,  # int32 [N / 64] finished programs per tile, zero between calls
    out_ptr,  # [N]
    n,
    k_tiles,
    tiles_per_split,
    GROUP: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_KT: tl.constexpr,
    MMA: tl.constexpr,
    DEPTH: tl.constexpr,
):
    g = tl.program_id(0)
    split = tl.program_id(1)
    kt_begin = split * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    r0, r1 = tile_dot(
        x_ptr, w_ptr, s_ptr, n, g, kt_begin, kt_end, 0, GROUP, BLOCK_KT, -1, MMA, DEPTH
    )  # fmt: skip
    finish_tile(r0, r1, part_ptr, count_ptr + g, out_ptr, n, g, split, SPLIT)


def mma_mode(enabled: bool, x: torch.Tensor, kernel) -> int:
    """``tile_dot``'s ``MMA`` for a call: 0 unless asked; 2 where ``kernel`` runs in
    Triton's interpreter; 1 on an NVIDIA GPU of compute capability 8.0 or later with bf16
    or fp16 activations; a ValueError otherwise."""
    if not enabled:
        return 0
    if isinstance(kernel, InterpretedFunction):
        return 2
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"int4 tensor-core path: activations {x.dtype}, expected bf16 or fp16")
    if x.device.type != "cuda" or torch.version.cuda is None:
        raise ValueError(f"int4 tensor-core path: needs an NVIDIA GPU, got {x.device}")
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        raise ValueError("int4 tensor-core path: needs compute capability 8.0 or later")
    return 1


def share(total: int, parts: int, step: int) -> int:
    """Each of ``parts`` programs' share of ``total`` items (split-K row tiles), rounded up
    to whole steps of ``step``: the last share may be short or empty."""
    return triton.cdiv(triton.cdiv(total, parts), step) * step


_workspaces: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def workspace(n: int, split: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial sums and tile counters for ``n`` columns, made once per device, width and
    split: calls on one stream follow each other, and each call leaves the counters at zero.
    Make it before a CUDA graph is captured (the plugin's build-time check does)."""
    key = (str(device), n, split)
    if key not in _workspaces:
        _workspaces[key] = (
            torch.empty((max(split, 1), n), dtype=torch.float32, device=device),
            torch.zeros(n // TILE_N, dtype=torch.int32, device=device),
        )
    return _workspaces[key]


def marlin_gemv(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_s: torch.Tensor,
    group: int,
    *,
    split: int = 1,
    block_kt: int = 4,
    warps: int = 4,
    stages: int = 3,
    mma: bool = False,
    depth: int = 1,
) -> torch.Tensor:
    """``x [1, K] @ W [K, N]`` for one token, ``W`` in Marlin's 4-bit layout: ``[1, N]``;
    ``mma``: on tensor cores (``tile_dot_mma``)."""
    k = x.shape[-1]
    n = w_s.shape[-1]
    # one group over all of K is channelwise to Marlin, whose scales are permuted otherwise
    if x.numel() != k or k % 16 or n % TILE_N or k % group or group >= k:
        raise ValueError(f"marlin_gemv: x {tuple(x.shape)}, N {n}, group {group}")
    if tuple(w_q.shape) != (k // 16, 2 * n) or tuple(w_s.shape) != (k // group, n):
        raise ValueError(
            f"marlin_gemv: w_q {tuple(w_q.shape)}, w_s {tuple(w_s.shape)} for K {k}, N {n}, "
            f"group {group}: expected ({k // 16}, {2 * n}) and ({k // group}, {n})"
        )
    k_tiles = k // 16
    tiles_per_split = share(k_tiles, split, block_kt)
    part, count = workspace(n, split, x.device)
    out = torch.empty((1, n), dtype=x.dtype, device=x.device)
    _marlin_gemv_kernel[(n // TILE_N, split)](
        x,
        w_q,
        w_s,
        part,
        count,
        out,
        n,
        k_tiles,
        tiles_per_split,
        GROUP=group,
        SPLIT=split,
        BLOCK_KT=block_kt,
        MMA=mma_mode(mma, x, _marlin_gemv_kernel),
        DEPTH=depth,
        num_warps=warps,
        num_stages=stages,
    )
    return out

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
    loads ``BLOCK_KT`` row tiles as ``[BLOCK_KT, 32, 4]`` words: lane ``4 ci + t`` takes
    its four words ``j`` in one 16-byte load, and needs only its own four activations and
    eight scales (two 32-bit loads and one 16-byte load), so no data moves between lanes
    inside the loop. Nibbles become float32 by bit operations: four shifts per word, then
    one ``lop3`` and one FMA per nibble. With split-K, each program writes its float32
    partial sums, and the last program of a tile (a counter per tile) adds them, writes the
    output and resets the counter: one kernel per call, as Marlin.

Numerics:
    Products and sums in float32, scaled per group in float32, rounded once to the
    activation dtype. Marlin rounds the dequantized weight times its scale to the
    activation dtype first, so the two differ by bf16 rounding (0.23 - 0.24% measured;
    against the exact product the kernel errs 0.16%, Marlin 0.22%).

Speed (weights cycled past L2; docs/gpu-results.md 3e - 3k):
    on an H100 (bench/int4_loop_ab.py, 3k) 9.9 us at 26B-A4B's q/k/v, 7.7 at its o
    projection, 11.4 and 10.9 at the global layers', where Marlin took 9.8, 9.8, 11.8 and
    12.8 (3g); 1.06 - 1.14x faster than the loop before this one (a ``[kt, 8, 4, 4]`` tile
    whose scales and activations moved between lanes through shared memory: compiled for
    an H100, 209 instructions per 32 weights a thread and four barriers, this loop 147 and
    none; bench/int4_sass.py). It still takes 1.5 - 2 times its own grid's loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import PTX, launch_options, pdl_for, pdl_wait, prefetch_l2

TILE_N = 64  # columns per Marlin tile group (128 words)


@triton.jit
def float_pair(v, DTYPE: tl.constexpr):
    """The two 16-bit floats of the 32-bit words ``v`` (low half first) as float32."""
    if DTYPE == tl.bfloat16:  # a bf16 is the top half of its float32
        low = (v << 16).to(tl.float32, bitcast=True)
        high = (v & -65536).to(tl.float32, bitcast=True)
    else:
        low = (v & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
        high = ((v >> 16) & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def load_x_pair(x_ptr, row, mask):
    """Activations ``row`` and ``row + 1`` (``row`` even) as float32, by one 32-bit load."""
    words = x_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    return float_pair(tl.load(words + row // 2, mask=mask, other=0), x_ptr.dtype.element_ty)


@triton.jit
def step_inputs(
    x_ptr, w_ptr, s_ptr, n, words, pairs, t, kt, kt_end, GROUP: tl.constexpr
):  # fmt: skip
    """What one step of ``tile_dot`` reads for row tiles ``kt`` ``[BLOCK_KT, 1, 1]``: each
    lane's four words (16 bytes), its four activations (rows ``2 t + a + 8 c``: pairs
    ``a = 0, 1`` in one 32-bit load) and its eight scales (pairs ``b = 0, 1``, 16 bytes)."""
    kt_mask = kt < kt_end
    w = tl.load(w_ptr + kt * (2 * n) + words, mask=kt_mask, other=0)
    x00, x10 = load_x_pair(x_ptr, kt * 16 + 2 * t, kt_mask)
    x01, x11 = load_x_pair(x_ptr, kt * 16 + 2 * t + 8, kt_mask)
    s_words = s_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    s = tl.load(s_words + ((kt * 16) // GROUP) * (n // 2) + pairs, mask=kt_mask, other=0)
    s0, s1 = float_pair(s, s_ptr.dtype.element_ty)
    return w, x00, x01, x10, x11, s0, s1


@triton.jit
def unit(v, HIGH: tl.constexpr):
    """``1 + n / 16`` for the nibble ``n`` in bits 19 - 22 of ``v`` (``HIGH``), else
    ``1 + n / 256`` for the one in bits 15 - 18, as float32, exact, by one ``lop3`` (no
    shift, no integer-to-float conversion; the compiler makes the and and the or two)."""
    mask: tl.constexpr = 0x780000 if HIGH else 0x78000
    if PTX:
        return tl.inline_asm_elementwise(
            f"lop3.b32 $0, $1, {mask}, 0x3F800000, 0xEA;", "=r,r", [v], dtype=tl.float32,
            is_pure=True, pack=1,
        )  # fmt: skip
    return ((v & mask) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def tile_dot(
    x_ptr,
    w_ptr,  # int32 [K / 16, 2 n] of one matrix
    s_ptr,  # [K / GROUP, n] of one matrix
    n,
    g,  # the tile of 64 columns
    kt_begin,
    kt_end,
    GROUP: tl.constexpr,
    BLOCK_KT: tl.constexpr,
    PREFETCH: tl.constexpr = 0,
):
    """Rows ``16 kt_begin .. 16 kt_end`` of ``x @ W`` for the 64 columns of tile ``g``, in
    float32: two ``[8, 4]`` halves (ci, j), columns ``64 g + 16 j + ci`` and ``+ 8``.

    The words of a row tile are ``[32, 4]``: lane ``4 ci + t`` holds words ``j = 0 .. 3``
    (one 16-byte load), which need only its own four activations and eight scales, so
    nothing moves between lanes inside the loop. Each step loads the next step's inputs
    before it computes its own (all programs of an SM start together and would otherwise
    wait for their loads together). Four shifts put two nibbles of a word at a time into
    the top mantissa bits of 1.0 (bits 19 - 22: ``1 + n / 16``; bits 15 - 18:
    ``1 + n / 256``), so a nibble costs one and-or and one FMA; the offsets (the 1s and
    the 8) come off once per lane and row tile.

    ``ptxas`` issues the next step's loads at the end of a step, so each step waits for
    memory (docs/gpu-results.md 3k, 3l), unless the launch allows it more registers
    (``maxnreg`` 96: the loads at the top of the step, 80 - 94 registers instead of 56 -
    80; ``bench/int4_sass.py --maxnreg``, not yet timed); ``PREFETCH`` > 0 also asks L2
    for the words of the step that many steps after the next one, so that step's loads
    wait for L2 only (measured 2% slower at distance 2 in a layer's chain of these
    kernels, 3m)."""
    kt_idx = tl.arange(0, BLOCK_KT)[:, None, None]
    lane = tl.arange(0, 32)[None, :, None]  # 4 ci + t
    j = tl.arange(0, 4)[None, None, :]
    t = lane % 4
    words = g * 128 + 4 * lane + j  # [1, 32, 4]
    # scale pairs (b = 0, 1) of columns 64 g + 8 ci + 2 j, as 32-bit words
    pairs = g * 32 + 4 * (lane // 4) + j
    acc0 = tl.zeros([BLOCK_KT, 32, 4], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_KT, 32, 4], dtype=tl.float32)
    w, x00, x01, x10, x11, s0, s1 = step_inputs(
        x_ptr, w_ptr, s_ptr, n, words, pairs, t, kt_begin + kt_idx, kt_end, GROUP
    )  # fmt: skip
    for kt0 in range(kt_begin, kt_end, BLOCK_KT):
        nw, nx00, nx01, nx10, nx11, ns0, ns1 = step_inputs(
            x_ptr, w_ptr, s_ptr, n, words, pairs, t, kt0 + BLOCK_KT + kt_idx, kt_end, GROUP
        )  # fmt: skip
        if PREFETCH > 0:  # each lane its own 16 bytes of words (8 lanes share a line)
            ahead = tl.minimum(kt0 + (1 + PREFETCH) * BLOCK_KT + kt_idx, kt_end - 1)
            prefetch_l2(w_ptr + ahead * (2 * n) + g * 128 + 4 * lane)
        # nibble 4 a + 2 b + c: row 2 t + a + 8 c, column half b. With f = 1 + n / 16
        # (c = 1, bits 19 - 22) and 1 + n / 256 (c = 0, bits 15 - 18), the sum of
        # (n - 8) x over a word's four nibbles of one b is 16 (hi + 16 lo - off).
        off = 1.5 * (x01 + x11) + 16.5 * (x00 + x10)
        v = w >> 9  # nibbles 7 (hi), 6 (lo)
        hi1 = unit(v, True) * x11 - off
        lo1 = unit(v, False) * x10
        v = w >> 1  # nibbles 5, 4
        hi0 = unit(v, True) * x11 - off
        lo0 = unit(v, False) * x10
        v = w << 7  # nibbles 3, 2
        hi1 += unit(v, True) * x01
        lo1 += unit(v, False) * x00
        v = w << 15  # nibbles 1, 0
        hi0 += unit(v, True) * x01
        lo0 += unit(v, False) * x00
        acc0 += (hi0 + 16.0 * lo0) * s0
        acc1 += (hi1 + 16.0 * lo1) * s1
        w, x00, x01, x10, x11, s0, s1 = nw, nx00, nx01, nx10, nx11, ns0, ns1
    r0 = tl.reshape(tl.sum(acc0, axis=0), (8, 4, 4))  # (ci, t, j)
    r1 = tl.reshape(tl.sum(acc1, axis=0), (8, 4, 4))
    return 16.0 * tl.sum(r0, axis=1), 16.0 * tl.sum(r1, axis=1)


@triton.jit
def tile_columns(g):
    """The output columns of tile ``g``'s two ``[8, 4]`` halves (ci, j): ``b = 0, 1``."""
    col0 = g * 64 + 16 * tl.arange(0, 4)[None, :] + tl.arange(0, 8)[:, None]
    return col0, col0 + 8


@triton.jit
def last_of_split(count_ptr, SPLIT: tl.constexpr):
    """Called once a program has stored its partial sums: whether it is the tile's last
    (the one that adds them and then resets ``count_ptr`` to zero)."""
    tl.debug_barrier()
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT - 1


@triton.jit
def split_sum(part_ptr, n, col, SPLIT: tl.constexpr):
    """Columns ``col`` (``[8, 4]``) of the float32 partial sums ``[SPLIT, n]``, added."""
    total = tl.zeros([8, 4], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        total += tl.load(part_ptr + s * n + col, cache_modifier=".cg")
    return total


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
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    col0, col1 = tile_columns(g)
    if SPLIT == 1:
        tl.store(out_ptr + col0, r0.to(dtype))
        tl.store(out_ptr + col1, r1.to(dtype))
    else:
        tl.store(part_ptr + split * n + col0, r0)
        tl.store(part_ptr + split * n + col1, r1)
        if last_of_split(count_ptr, SPLIT):
            tl.store(out_ptr + col0, split_sum(part_ptr, n, col0, SPLIT).to(dtype))
            tl.store(out_ptr + col1, split_sum(part_ptr, n, col1, SPLIT).to(dtype))
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
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    g = tl.program_id(0)
    split = tl.program_id(1)
    kt_begin = split * tiles_per_split
    kt_end = tl.minimum(kt_begin + tiles_per_split, k_tiles)
    pdl_wait(PDL)
    r0, r1 = tile_dot(x_ptr, w_ptr, s_ptr, n, g, kt_begin, kt_end, GROUP, BLOCK_KT, PREFETCH)
    finish_tile(r0, r1, part_ptr, count_ptr + g, out_ptr, n, g, split, SPLIT)


def aligned_pairs(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous, its first element on a 4-byte boundary: the kernels read the
    activations as 32-bit pairs (a row of a larger tensor may start on any element)."""
    x = x.contiguous()
    return x if x.data_ptr() % 4 == 0 else x.clone()


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
    prefetch: int = 0,
    pdl: int = 0,
    maxnreg: int = 0,
) -> torch.Tensor:
    """``x [1, K] @ W [K, N]`` for one token, ``W`` in Marlin's 4-bit layout: ``[1, N]``.
    ``pdl``: launched with programmatic dependent launch (compute capability 9.0 and later;
    measured no faster, docs/gpu-results.md 3m); ``maxnreg``: ``ptxas``' register limit
    (``common.launch_options``)."""
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
    x = aligned_pairs(x)
    pdl = pdl_for(pdl, x.device)
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
        PREFETCH=prefetch,
        PDL=pdl,
        num_warps=warps,
        num_stages=stages,
        **launch_options(pdl, maxnreg),
    )
    return out

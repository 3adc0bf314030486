"""Small-batch bf16 dense MLP in two Triton kernels, for Gemma 4 decode.

Why:
    Every Gemma 4 26B-A4B decoder layer has a dense MLP beside its MoE (hidden 2816,
    intermediate 2112, left unquantized by the public checkpoints). At decode batch sizes
    vLLM runs it as three kernels: cuBLAS for gate_up (split-K at M = 1), the GELU(tanh)
    and-mul kernel, cuBLAS for down; on an H200 they take ~23 us for the ~36 MB the layer
    reads, about a third of the bandwidth bound. Here:

    1. ``gate_up_act``: per token, the gate and up rows side by side, GELU(tanh) (or
       GELU, SiLU) of the gate times up, written once;
    2. ``down``: per token, the down projection of those activations.

Layout:
    vLLM's own parameters: ``gate_up`` [2I, H] (gate rows, then up rows, as
    ``MergedColumnParallelLinear`` stores them), ``down`` [H, I]; K is contiguous.

How:
    A program owns a tile of output rows of one token and walks K in ``BLOCK_K`` columns,
    accumulating element-wise products in a float32 ``[rows, BLOCK_K]`` tile that is
    reduced once at the end (no ``tl.dot``: at M = 1 it would pad M to 16); with
    ``ahead1`` / ``ahead2`` each step first loads the next one's columns (not yet timed on
    a GPU; off by default). A token per
    program re-reads the weights for every token, from L2 after the first: the kernels
    are meant for batch 1 - 2; larger batches keep vLLM's GEMMs.

Numerics:
    As vLLM's path rounds: gate and up are rounded to the activation dtype before the
    activation, the activation product is rounded once, down accumulates in float32 and
    is rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    ACTIVATIONS,
    act_and_mul,
    launch_options,
    pdl_for,
    pdl_wait,
    require_contiguous,
)

# Tile defaults; bench/dense_decode.py --tune measures them on a GPU.
DEFAULT_TILES = {
    "block_n1": 8,
    "block_k1": 256,
    "warps1": 4,
    "block_n2": 8,
    "block_k2": 256,
    "warps2": 4,
}


@triton.jit
def _rows_step(w_ptr, x_ptr, rows, row_mask, k, cols):
    """Columns ``cols`` of the rows and of ``x`` (zeros past ``k``: no memory read there)."""
    col_mask = cols < k
    w = tl.load(
        w_ptr + rows[:, None].to(tl.int64) * k + cols[None, :],
        mask=row_mask[:, None] & col_mask[None, :],
        other=0.0,
    )
    return w, tl.load(x_ptr + cols, mask=col_mask, other=0.0)


@triton.jit
def _rows_dot_bf16(
    w_ptr,  # [N, K]
    x_ptr,  # [K]
    rows,  # [ROWS] row indices
    row_mask,
    k,
    ROWS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    AHEAD: tl.constexpr = 0,
):
    """``AHEAD``: each step loads the next step's columns before it multiplies its own
    (with a register limit for ``ptxas``, ``maxnreg``, the loads stay a step ahead;
    bench/int4_sass.py --dense); else each step waits for its own loads."""
    acc = tl.zeros([ROWS, BLOCK_K], dtype=tl.float32)
    offs = tl.arange(0, BLOCK_K)
    if AHEAD:
        w, x = _rows_step(w_ptr, x_ptr, rows, row_mask, k, offs)
        for k0 in range(0, k, BLOCK_K):
            nw, nx = _rows_step(w_ptr, x_ptr, rows, row_mask, k, k0 + BLOCK_K + offs)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w, x = nw, nx
    else:
        for k0 in range(0, k, BLOCK_K):
            w, x = _rows_step(w_ptr, x_ptr, rows, row_mask, k, k0 + offs)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    return tl.sum(acc, axis=1)


@triton.jit
def _gate_up_act_kernel(
    x_ptr,  # [M, H]
    w_ptr,  # [2I, H]
    out_ptr,  # [M, I]
    inter,
    hidden,
    ACT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    AHEAD: tl.constexpr = 0,
):
    token = tl.program_id(1).to(tl.int64)
    # gate row n and up row I + n side by side (even / odd), split after the dot
    r = tl.arange(0, 2 * BLOCK_N)
    n = tl.program_id(0) * BLOCK_N + r // 2
    pdl_wait(PDL)
    both = _rows_dot_bf16(
        w_ptr, x_ptr + token * hidden, n + (r % 2) * inter, n < inter, hidden, 2 * BLOCK_N, BLOCK_K,
        AHEAD,
    )  # fmt: skip
    gate, up = tl.split(tl.reshape(both, (BLOCK_N, 2)))
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    act = act_and_mul(gate, up, out_ptr.dtype.element_ty, ACT)
    tl.store(out_ptr + token * inter + cols, act, mask=cols < inter)


@triton.jit
def _down_kernel(
    a_ptr,  # [M, I]
    w_ptr,  # [H, I]
    out_ptr,  # [M, H]
    inter,
    hidden,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
    AHEAD: tl.constexpr = 0,
):
    token = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = rows < hidden
    pdl_wait(PDL)
    acc = _rows_dot_bf16(w_ptr, a_ptr + token * inter, rows, mask, inter, BLOCK_N, BLOCK_K, AHEAD)
    tl.store(out_ptr + token * hidden + rows, acc, mask=mask)


def check_shapes(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> int:
    """The intermediate size, after checking the weights against ``x`` [M, H]."""
    hidden = x.shape[-1]
    inter = down.shape[1]
    expected = {"gate_up": (gate_up, (2 * inter, hidden)), "down": (down, (hidden, inter))}
    require_contiguous(expected, f"for hidden {hidden} and intermediate {inter}")
    return inter


def gate_up_act(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    out: torch.Tensor,
    *,
    activation: str,
    block_n1: int,
    block_k1: int,
    warps1: int,
    pdl: int = 0,
    ahead1: int = 0,
    maxnreg1: int = 0,
) -> torch.Tensor:
    m, inter = out.shape
    pdl = pdl_for(pdl, x.device)
    _gate_up_act_kernel[(triton.cdiv(inter, block_n1), m)](
        x,
        gate_up,
        out,
        inter,
        x.shape[1],
        ACT=ACTIVATIONS[activation],
        BLOCK_N=block_n1,
        BLOCK_K=block_k1,
        PDL=pdl,
        AHEAD=ahead1,
        num_warps=warps1,
        **launch_options(pdl, maxnreg1),
    )
    return out


def down(
    act: torch.Tensor,
    down_w: torch.Tensor,
    out: torch.Tensor,
    *,
    block_n2: int,
    block_k2: int,
    warps2: int,
    pdl: int = 0,
    ahead2: int = 0,
    maxnreg2: int = 0,
) -> torch.Tensor:
    m, hidden = out.shape
    pdl = pdl_for(pdl, act.device)
    _down_kernel[(triton.cdiv(hidden, block_n2), m)](
        act,
        down_w,
        out,
        act.shape[1],
        hidden,
        BLOCK_N=block_n2,
        BLOCK_K=block_k2,
        PDL=pdl,
        AHEAD=ahead2,
        num_warps=warps2,
        **launch_options(pdl, maxnreg2),
    )
    return out


def dense_decode(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down_w: torch.Tensor,
    *,
    activation: str = "gelu_tanh",
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    **tiles: int,
) -> torch.Tensor:
    """down(act(x @ gate.T) * (x @ up.T)) for ``x`` [M, H] (small M); ``tiles`` override
    ``DEFAULT_TILES`` (``pdl``: both kernels launched with programmatic dependent
    launch; ``ahead1``, ``ahead2``: each step loads the next one's columns first;
    ``maxnreg1``, ``maxnreg2``: ``ptxas``' register limit, ``common.launch_options``)."""
    inter = check_shapes(x, gate_up, down_w)
    t = {**DEFAULT_TILES, **tiles}
    x = x.contiguous()
    if workspace is None:
        workspace = torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device)
    if out is None:
        out = torch.empty_like(x)
    gate_up_act(
        x,
        gate_up,
        workspace,
        activation=activation,
        block_n1=t["block_n1"],
        block_k1=t["block_k1"],
        warps1=t["warps1"],
        pdl=t.get("pdl", 0),
        ahead1=t.get("ahead1", 0),
        maxnreg1=t.get("maxnreg1", 0),
    )
    return down(
        workspace,
        down_w,
        out,
        block_n2=t["block_n2"],
        block_k2=t["block_k2"],
        warps2=t["warps2"],
        pdl=t.get("pdl", 0),
        ahead2=t.get("ahead2", 0),
        maxnreg2=t.get("maxnreg2", 0),
    )

"""Gemma 4's MoE router for a few tokens in one Triton kernel, whole or its projection alone.

Why:
    ``Gemma4Router.forward`` is an RMSNorm without weight, two scalings (``root_size``,
    then the learned per-channel ``scale``) and a bf16 [E, H] projection with float32
    output (``GateLinear``). At batch 1 on an H100 (vLLM 0.26.0, docs/gpu-results.md 3d)
    the projection alone is two kernels (cuBLAS split-K and its reduction, 5.7 us per
    layer for 0.7 MB), beside the Inductor kernel that does the norm and scalings.

How:
    Both scalings are per channel and the norm is one factor per token, so the logits are
    ``rms(x) * root * sum_k W[e, k] * x[k] * scale[k]``: a program owns ``BLOCK_N``
    experts of one token and walks the hidden size once, accumulating the dot and the
    token's sum of squares together; the norm's factor is applied at the end. Every
    program re-reads the token (a few KB, from L2).

Numerics:
    float32 throughout from bf16 inputs: closer to the exact product than vLLM's path,
    which rounds the normed activations to bf16 twice before its GEMM (its 0.2 - 0.4%
    against the exact product; this kernel's is float32 summation order). ``root`` is
    passed as vLLM holds it (``root_size`` rounded to the activation dtype), so the logits
    keep vLLM's scale.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tiles
from .common import (
    launch_options,
    pdl_for,
    pdl_wait,
    require_contiguous,
)

DEFAULT_TILES = tiles.ROUTER


@triton.jit
def _router_kernel(
    x_ptr,  # [M, H]
    scale_ptr,  # [H]
    w_ptr,  # [E, H]
    out_ptr,  # [M, E] float32
    hidden,
    n_experts,
    eps,
    root,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_experts
    pdl_wait(PDL)
    offs = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    squares = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        cols = k0 + offs
        col_mask = cols < hidden
        x = tl.load(x_ptr + token * hidden + cols, mask=col_mask, other=0.0).to(tl.float32)
        w = tl.load(
            w_ptr + rows[:, None].to(tl.int64) * hidden + cols[None, :],
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        if NORM:
            s = tl.load(scale_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            squares += x * x
            acc += w.to(tl.float32) * (x * s)[None, :]
        else:
            acc += w.to(tl.float32) * x[None, :]
    logits = tl.sum(acc, axis=1)
    if NORM:
        logits = logits * (root / tl.sqrt(tl.sum(squares, axis=0) / hidden + eps))
    tl.store(out_ptr + token * n_experts + rows, logits, mask=row_mask)


def router_decode(
    x: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    *,
    eps: float,
    root: float,
    out: torch.Tensor | None = None,
    **tiles: int,
) -> torch.Tensor:
    """``(rmsnorm(x) * root * scale) @ weight.T`` in float32 for ``x`` [M, H] (small M),
    ``scale`` [H], ``weight`` [E, H]; ``tiles`` override ``DEFAULT_TILES``."""
    hidden = x.shape[-1]
    require_contiguous({"scale": (scale, (hidden,))}, f"for hidden {hidden}")
    return _launch(x, scale, weight, out, eps, root, True, tiles)


def router_proj(
    x: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None, **tiles: int
) -> torch.Tensor:
    """``x @ weight.T`` in float32 for ``x`` [M, H] (small M) and ``weight`` [E, H]: the
    router's projection alone; ``tiles`` override ``DEFAULT_TILES``."""
    return _launch(x, weight, weight, out, 0.0, 1.0, False, tiles)


def _launch(
    x: torch.Tensor,
    scale: torch.Tensor,
    weight: torch.Tensor,
    out: torch.Tensor | None,
    eps: float,
    root: float,
    norm: bool,
    tiles: dict[str, int],
) -> torch.Tensor:
    hidden = x.shape[-1]
    n_experts = weight.shape[0]
    require_contiguous({"weight": (weight, (n_experts, hidden))}, f"for hidden {hidden}")
    t = {**DEFAULT_TILES, **tiles}
    pdl = pdl_for(t.get("pdl", 0), x.device)
    x = x.reshape(-1, hidden).contiguous()
    if out is None:
        out = torch.empty((x.shape[0], n_experts), dtype=torch.float32, device=x.device)
    _router_kernel[(triton.cdiv(n_experts, t["block_n"]), x.shape[0])](
        x,
        scale,
        weight,
        out,
        hidden,
        n_experts,
        eps,
        root,
        BLOCK_N=t["block_n"],
        BLOCK_K=t["block_k"],
        NORM=norm,
        PDL=pdl,
        num_warps=t["warps"],
        **launch_options(pdl),
    )
    return out

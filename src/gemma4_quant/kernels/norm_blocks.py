"""Gemma 4's norms between attention and the feed-forward blocks, and those at the end of a
decoder layer, in one Triton kernel each.

Why:
    After attention's o projection a decoder layer normalizes o (``post_attention_layernorm``),
    adds the residual, and normalizes the sum three ways: the dense MLP's input
    (``pre_feedforward_layernorm``), the experts' (``pre_feedforward_layernorm_2``) and the
    router's (``Gemma4Router.norm``, no weight, then ``root_size`` and ``scale``). The hidden
    size (2816) is past Inductor's limit for a persistent reduction (1024), so torch.compile
    makes this a looped reduction: one program a token walks the row once per dependent
    sum, waiting on memory at every step, and at one token the weights come from DRAM
    (read a whole decode step earlier). Inside vLLM 0.26.0 on an H100 that kernel took
    6.6 - 10.5 us a layer at batch 1; alone, with L2 flushed before each call, 3.95 us,
    where this kernel takes 3.23 (batch 64: 4.28 against 3.73; bench/norm_block.py
    ``--cold``, docs/gpu-results.md 3n).

    At the end of the layer torch.compile's kernel for the two post-feed-forward norms,
    their sum, the last norm, the residual add and the layer scalar took 4.6 us a layer on
    an H200 at batch 1 (docs/gpu-results.md 3o); the same block with the next layer's
    input norm took 2.8 us in one program a token where Inductor took 5.8 (bench/norm_block.py
    ``--cold``, H100, 3n); ``end_of_layer_norms`` computes that input norm too, given its
    weight.

    The router's projection ([128, 2816] bf16, float32 logits) follows the post-attention
    block as a kernel of its own (``router_decode``: 2.8 us a layer inside vLLM 0.26.0 on
    an H100, 3k), behind a kernel boundary. ``post_attention_router`` computes it in the
    same kernel.

How:
    One program a token holds the whole row (the hidden size rounded up to a power of two)
    and issues every load before the first sum: one memory latency, one pass. With the
    router, ``E / 2`` programs a token each load two rows of the router's weight with the
    token's rows, compute the norms again (the rows and the norms' weights come from L2
    after the first program's read) and two logits; the first also writes the rows.

Numerics:
    vLLM's eager roundings (``vllm.ir.ops.rms_norm``): float32 statistics, the normed row
    rounded to bf16, times the weight rounded to bf16; the residual sum and each scaling
    rounded to bf16, to nearest even through the float32 bits (``_to_bf16``). A whole
    layer then gives vLLM's eager outputs bit for bit on CPU, and the kernel's values equal
    torch's on an H100 at 1 and 64 tokens. Keeping float32 between the steps, as
    torch.compile's own kernel does, is 0.6 us faster a call on an H100 (2.59 against
    3.23 us, L2 flushed), but left a tiny layer's output 12% off vLLM's eager one for one
    set of three tokens (the same experts chosen; not traced further).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import require_contiguous


@triton.jit
def _to_bf16(x):
    """``x`` rounded to the nearest bf16 (ties to even), kept in float32, through the bits:
    Triton folds ``x.to(tl.bfloat16).to(tl.float32)`` away when compiling for a GPU, and
    its interpreter's conversion truncates."""
    bits = x.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _normed_bf16(x, n, eps):
    """vLLM's eager ``rms_norm`` of a float32 row holding bf16 values (zero past ``n``),
    before its weight: float32 statistics, the normed row rounded to bf16."""
    return _to_bf16(x * tl.rsqrt(tl.sum(x * x, axis=0) / n + eps))


@triton.jit
def _rms_bf16(x, w, n, eps):
    """The same norm times its weight, the product rounded."""
    return _to_bf16(_normed_bf16(x, n, eps) * w)


@triton.jit
def _post_attention(x, res, wp, sc, root, N: tl.constexpr, eps):
    """``h = rms(o) * w_post + residual``, ``rms(h)`` before its weights, and the router's
    input (``rms(h)`` times ``root`` then ``scale``), each rounded as vLLM's eager forward."""
    h = _to_bf16(_rms_bf16(x, wp, N, eps) + res)
    hn = _normed_bf16(h, N, eps)
    return h, hn, _to_bf16(_to_bf16(hn * root) * sc)


@triton.jit
def _store_rows(h_out, ff_out, ff2_out, row, cols, mask, h, hn, wf, wf2):
    """``h`` and the dense MLP's and the experts' inputs (``rms(h)`` times each weight)."""
    tl.store(h_out + row + cols, h.to(h_out.dtype.element_ty), mask=mask)
    tl.store(ff_out + row + cols, _to_bf16(hn * wf).to(ff_out.dtype.element_ty), mask=mask)
    tl.store(ff2_out + row + cols, _to_bf16(hn * wf2).to(ff2_out.dtype.element_ty), mask=mask)


@triton.jit
def _post_attention_kernel(
    o,
    residual,
    w_post,
    w_ff,
    w_ff2,
    scale,
    h_out,
    ff_out,
    ff2_out,
    router_out,
    root,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(o + row + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(residual + row + cols, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(w_post + cols, mask=mask, other=0.0).to(tl.float32)
    wf = tl.load(w_ff + cols, mask=mask, other=0.0).to(tl.float32)
    wf2 = tl.load(w_ff2 + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale + cols, mask=mask, other=0.0).to(tl.float32)

    h, hn, router = _post_attention(x, res, wp, sc, root, N, eps)
    _store_rows(h_out, ff_out, ff2_out, row, cols, mask, h, hn, wf, wf2)
    tl.store(router_out + row + cols, router.to(router_out.dtype.element_ty), mask=mask)


@triton.jit
def _post_attention_router_kernel(
    o,
    residual,
    w_post,
    w_ff,
    w_ff2,
    scale,
    router_w,
    h_out,
    ff_out,
    ff2_out,
    logits_out,
    root,
    eps,
    n_experts,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    p = tl.program_id(0)
    token = tl.program_id(1).to(tl.int64)
    row = token * N
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    experts = p * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = experts < n_experts
    # this program's router rows, the only loads that are its own: every program reads the
    # token's rows and the norms' weights (from L2 after the first) and recomputes the norms
    w = tl.load(router_w + experts[:, None].to(tl.int64) * N + cols[None, :],
                mask=e_mask[:, None] & mask[None, :], other=0.0)  # fmt: skip
    x = tl.load(o + row + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(residual + row + cols, mask=mask, other=0.0).to(tl.float32)
    wp = tl.load(w_post + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scale + cols, mask=mask, other=0.0).to(tl.float32)

    h, hn, router = _post_attention(x, res, wp, sc, root, N, eps)
    logits = tl.sum(w.to(tl.float32) * router[None, :], axis=1)
    tl.store(logits_out + token * n_experts + experts, logits, mask=e_mask)
    if p == 0:
        wf = tl.load(w_ff + cols, mask=mask, other=0.0).to(tl.float32)
        wf2 = tl.load(w_ff2 + cols, mask=mask, other=0.0).to(tl.float32)
        _store_rows(h_out, ff_out, ff2_out, row, cols, mask, h, hn, wf, wf2)


@triton.jit
def _end_of_layer_kernel(
    dense,
    experts,
    residual,
    w1,
    w2,
    w,
    scalar,
    w_next,
    out,
    next_out,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    NEXT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    d = tl.load(dense + row + cols, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(experts + row + cols, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(residual + row + cols, mask=mask, other=0.0).to(tl.float32)
    v1 = tl.load(w1 + cols, mask=mask, other=0.0).to(tl.float32)
    v2 = tl.load(w2 + cols, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(w + cols, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(scalar).to(tl.float32)

    both = _to_bf16(_rms_bf16(d, v1, N, eps) + _rms_bf16(m, v2, N, eps))
    y = _to_bf16(_to_bf16(_rms_bf16(both, v, N, eps) + res) * sc)
    tl.store(out + row + cols, y.to(out.dtype.element_ty), mask=mask)
    if NEXT:  # the next layer's input norm of this output
        vn = tl.load(w_next + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(next_out + row + cols, _rms_bf16(y, vn, N, eps).to(next_out.dtype.element_ty),
                 mask=mask)  # fmt: skip


def _check(
    op: str, rows: dict[str, torch.Tensor], vectors: dict[str, torch.Tensor], scalars=()
) -> None:
    """Every row tensor a contiguous bf16 [T, H] like the first, every vector [H], every
    scalar [1]: a clear error naming the tensor, not a wrong read."""
    first, o = next(iter(rows.items()))
    if o.dtype != torch.bfloat16 or o.dim() != 2 or not o.is_contiguous():
        raise ValueError(f"{op}: {first} must be a contiguous bf16 [T, H], got "
                         f"{o.dtype} {tuple(o.shape)}")  # fmt: skip
    hidden = o.shape[-1]
    expected = {name: (t, tuple(o.shape)) for name, t in rows.items() if name != first}
    expected |= {name: (v, (hidden,)) for name, v in vectors.items()}
    expected |= {name: (v, (1,)) for name, v in dict(scalars).items()}
    require_contiguous(expected, f"for {first} {tuple(o.shape)}")
    for name, (t, _) in expected.items():
        if t.dtype != o.dtype:
            raise ValueError(f"{op}: {name} must be bf16 like {first}, got {t.dtype}")


def post_attention_norms(
    o: torch.Tensor,
    residual: torch.Tensor,
    w_post: torch.Tensor,
    w_ff: torch.Tensor,
    w_ff2: torch.Tensor,
    scale: torch.Tensor,
    root: float,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, dense MLP input, experts' input, router input)`` of tokens ``o`` [T, H]:
    ``h = rms(o) * w_post + residual``, then ``rms(h)`` times ``w_ff``, times ``w_ff2``, and
    times ``root`` then ``scale``. ``root`` as vLLM holds it (``root_size`` rounded to
    bf16)."""
    _check("post_attention_norms", {"o": o, "residual": residual},
           {"w_post": w_post, "w_ff": w_ff, "w_ff2": w_ff2, "scale": scale})  # fmt: skip
    outs = tuple(torch.empty_like(o) for _ in range(4))
    tokens, hidden = o.shape
    if tokens:
        block = triton.next_power_of_2(hidden)
        _post_attention_kernel[(tokens,)](
            o, residual, w_post, w_ff, w_ff2, scale, *outs, float(root), float(eps),
            N=hidden, BLOCK=block, num_warps=max(1, min(8, block // 512)),  # 8 at 2816: timed
        )  # fmt: skip
    return outs


# router rows a program of ``post_attention_router``: 64 programs at 128 experts
ROUTER_ROWS = 2


def post_attention_router(
    o: torch.Tensor,
    residual: torch.Tensor,
    w_post: torch.Tensor,
    w_ff: torch.Tensor,
    w_ff2: torch.Tensor,
    scale: torch.Tensor,
    router_w: torch.Tensor,
    root: float,
    eps: float,
    *,
    rows: int = ROUTER_ROWS,
    warps: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``post_attention_norms``' first three outputs and, in place of the router's input,
    its logits: that input times ``router_w`` [E, H] in float32 (``Gemma4Router.proj``), in
    one kernel of ``E / rows`` programs a token, each of which computes the norms again
    (from L2) and ``rows`` logits; the first also writes the three rows. For a token or
    two: every token's programs read all of ``router_w``."""
    _check("post_attention_router", {"o": o, "residual": residual},
           {"w_post": w_post, "w_ff": w_ff, "w_ff2": w_ff2, "scale": scale})  # fmt: skip
    tokens, hidden = o.shape
    n_experts = router_w.shape[0]
    require_contiguous({"router_w": (router_w, (n_experts, hidden))}, f"for o {tuple(o.shape)}")
    if router_w.dtype != o.dtype:
        raise ValueError(f"post_attention_router: router_w must be bf16, got {router_w.dtype}")
    outs = tuple(torch.empty_like(o) for _ in range(3))
    logits = torch.empty((tokens, n_experts), dtype=torch.float32, device=o.device)
    if tokens:
        _post_attention_router_kernel[(triton.cdiv(n_experts, rows), tokens)](
            o, residual, w_post, w_ff, w_ff2, scale, router_w, *outs, logits, float(root),
            float(eps), n_experts, N=hidden, BLOCK=triton.next_power_of_2(hidden),
            BLOCK_E=rows, num_warps=warps,
        )  # fmt: skip
    return (*outs, logits)


def end_of_layer_norms(
    dense: torch.Tensor,
    experts: torch.Tensor,
    residual: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w: torch.Tensor,
    scalar: torch.Tensor,
    eps: float,
    w_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layer's output ``y`` from its dense MLP's and experts' outputs [T, H]:
    ``(rms(rms(dense) * w1 + rms(experts) * w2) * w + residual) * scalar``, each step
    rounded to bf16 as vLLM's eager forward rounds it; ``scalar`` the layer scalar [1].
    With ``w_next`` also the next layer's input, ``rms(y) * w_next`` (the same epsilon),
    from the same read of the row; else None."""
    vectors = {"w1": w1, "w2": w2, "w": w} | ({"w_next": w_next} if w_next is not None else {})
    _check("end_of_layer_norms", {"dense": dense, "experts": experts, "residual": residual},
           vectors, {"scalar": scalar})  # fmt: skip
    out = torch.empty_like(dense)
    next_out = torch.empty_like(dense) if w_next is not None else None
    tokens, hidden = dense.shape
    if tokens:
        block = triton.next_power_of_2(hidden)
        _end_of_layer_kernel[(tokens,)](
            dense, experts, residual, w1, w2, w, scalar,
            w if w_next is None else w_next, out, out if next_out is None else next_out,
            float(eps), N=hidden, BLOCK=block, NEXT=w_next is not None,
            num_warps=max(1, min(8, block // 512)),
        )  # fmt: skip
    return out, next_out

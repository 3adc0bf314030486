"""Gemma 4's router in one kernel (``gemma4_quant.kernels.router_decode``) against the exact
float32 router and against vLLM's own norm with ``Gemma4Router.forward``'s roundings.

Runs Triton's interpreter on CPU (``TRITON_INTERPRET=1``); speed is
``bench/router_decode.py``'s, on a GPU. Skips where Triton is not installed.
"""

from __future__ import annotations

import pytest
from triton_env import DEVICE, need_triton

torch = need_triton()

from gemma4_quant.kernels.router_decode import router_decode  # noqa: E402

EPS = 1e-6


def _inputs(m: int, hidden: int, experts: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, hidden, generator=gen) * 3).to(torch.bfloat16)
    scale = (torch.rand(hidden, generator=gen) + 0.5).to(torch.bfloat16)
    weight = (torch.randn(experts, hidden, generator=gen) * 0.05).to(torch.bfloat16)
    root = torch.tensor(hidden**-0.5).to(torch.bfloat16).item()  # vLLM's root_size.to(x.dtype)
    return x, scale, weight, root


def exact(x, scale, weight, root: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (normed * root * scale.float()) @ weight.float().T


def vllm_path(x, scale, weight, root: float) -> torch.Tensor:
    """``Gemma4Router.forward``: vLLM's RMSNorm without weight, both scalings in the
    activation dtype, then a bf16 projection with float32 output."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(x.shape[-1], eps=EPS, has_weight=False)
    h = norm.forward_native(x)
    h = h * torch.tensor(root, dtype=x.dtype)
    h = h * scale
    return (h.float() @ weight.float().T).float()


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).norm() / want.norm()).item()


@pytest.mark.parametrize(
    ("m", "hidden", "experts", "tiles"),
    [
        (1, 2816, 128, {}),  # 26B-A4B's router
        (2, 2816, 128, {"block_n": 16, "block_k": 256}),
        (3, 200, 72, {"block_n": 16, "block_k": 64}),  # nothing divides any tile
    ],
)
def test_matches_the_exact_router(m: int, hidden: int, experts: int, tiles: dict) -> None:
    x, scale, weight, root = _inputs(m, hidden, experts, seed=m + hidden + experts)
    got = router_decode(*(t.to(DEVICE) for t in (x, scale, weight)), eps=EPS, root=root, **tiles)
    assert got.dtype == torch.float32 and tuple(got.shape) == (m, experts)
    want = exact(x, scale, weight, root)
    # float32 from exact bf16 inputs: only the summation order differs from the reference
    assert _error(got, want) < 1e-5
    # vLLM's own path rounds the normed activations to bf16 twice: the kernel is closer to
    # the exact router than vLLM is, and agrees with vLLM to that rounding
    theirs = vllm_path(x, scale, weight, root)
    assert 1e-4 < _error(theirs, want) < 1e-2
    assert _error(got, theirs) < 1e-2
    # the experts a token picks (top 8 of vLLM's logits) are the kernel's where the eighth
    # and ninth are apart by more than the rounding
    top = theirs.topk(min(9, experts), dim=-1)
    for row, (values, ids) in enumerate(zip(top.values, top.indices, strict=True)):
        if values[7] - values[8] > 1e-2 * values.abs().max():
            assert set(got[row].cpu().topk(8).indices.tolist()) == set(ids[:8].tolist())


def test_rejects_mismatched_shapes() -> None:
    x, scale, weight, root = _inputs(1, 128, 16, seed=0)
    with pytest.raises(ValueError, match=r"weight \(16, 64\) must be a contiguous \[16, 128\]"):
        router_decode(x, scale, weight[:, :64].contiguous(), eps=EPS, root=root)
    with pytest.raises(ValueError, match=r"scale \(64,\) must be a contiguous \[128\]"):
        router_decode(x, scale[:64].contiguous(), weight, eps=EPS, root=root)

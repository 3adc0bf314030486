"""The small-batch bf16 dense MLP kernels (``gemma4_quant.kernels.dense_decode``) against
an exact float32 product with vLLM's roundings.

Runs Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set before Triton is imported),
so indexing, masking and numerics are checked without a GPU; speed is
``bench/dense_decode.py``'s job, on a GPU. Skips where Triton is not installed.
"""

from __future__ import annotations

import math

import pytest
import torch

# test_moe_decode skips this module with its own where Triton cannot run
from test_moe_decode import DEVICE, _gelu_tanh, to_bf16

from gemma4_quant.kernels.dense_decode import dense_decode


def reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """float32 products; gate and up, the activation product and the output rounded to
    bf16, as vLLM's GEMM - GeluAndMul - GEMM path writes them."""
    inter = down.shape[1]
    h = to_bf16(x.float() @ gate_up.float().T)
    a = to_bf16(_gelu_tanh(h[:, :inter]) * h[:, inter:])
    return to_bf16(a @ down.float().T)


@pytest.mark.parametrize(
    ("m", "hidden", "inter", "tiles"),
    [
        (1, 2816, 2112, {}),  # 26B-A4B's dense MLP
        (2, 2816, 1056, {"block_n1": 16, "block_k1": 512, "pdl": 1}),  # one TP=2 rank
        (3, 200, 72, {"block_n2": 16, "block_k2": 64, "pdl": 1}),  # nothing divides any tile
        # each step loading the next one's columns first, the last step's past K masked
        (1, 2816, 2112, {"ahead1": 1, "ahead2": 1, "maxnreg1": 96, "maxnreg2": 96}),
        (3, 200, 72, {"block_k1": 64, "block_k2": 32, "ahead1": 1, "ahead2": 1}),
    ],
)
def test_matches_exact_product(m: int, hidden: int, inter: int, tiles: dict) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + inter)
    x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(2 * inter, hidden, generator=gen) / math.sqrt(hidden)).to(torch.bfloat16)
    down = (torch.randn(hidden, inter, generator=gen) / math.sqrt(inter)).to(torch.bfloat16)
    got = dense_decode(*(t.to(DEVICE) for t in (x, gate_up, down)), **tiles).float().cpu()
    want = reference(x, gate_up, down)
    # Same roundings in the same places; the float32 accumulation order differs, which can
    # move a value across a bf16 rounding boundary (one ulp, 2^-8 relative). A wrong row,
    # column, token or gate/up pairing is off by far more than 1%.
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel
    flipped = (got - want).abs() > 2**-6 * want.abs() + 1e-3 * want.abs().max()
    assert flipped.float().mean().item() < 0.01


def test_rejects_mismatched_shapes() -> None:
    x = torch.randn(1, 128).to(torch.bfloat16)
    gate_up = torch.zeros(2 * 64, 128, dtype=torch.bfloat16)
    down = torch.zeros(256, 64, dtype=torch.bfloat16)  # hidden 256 != 128
    with pytest.raises(ValueError, match=r"down \(256, 64\) must be a contiguous \[128, 64\]"):
        dense_decode(x, gate_up, down)


# --------------------------------------------------------------------- the plugin's op


def _op_inputs(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7 + m)
    hidden, inter = 256, 192
    x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
    gate_up = (torch.randn(2 * inter, hidden, generator=gen) / math.sqrt(hidden)).to(torch.bfloat16)
    down = (torch.randn(hidden, inter, generator=gen) / math.sqrt(inter)).to(torch.bfloat16)
    return x, gate_up, down


@pytest.fixture(scope="module")
def dense_mlp():
    """``torch.ops.gemma4_quant.dense_mlp`` as the fast_decode patch registers it, with
    vLLM's kernel library loaded for its many-token path (``gelu_tanh_and_mul``)."""
    from vllm.platforms import current_platform

    from gemma4_quant.patches import fast_decode

    current_platform.import_kernels()
    fast_decode.register_op(fast_decode.TILES[(9, 0)])
    return torch.ops.gemma4_quant.dense_mlp


@pytest.mark.parametrize("m", [1, 3])
def test_op_takes_the_kernels_for_one_token_only(dense_mlp, m: int) -> None:
    """One token: exactly the Triton kernels' result, the exact product to bf16 rounding;
    more: exactly vLLM's own three kernels (GEMM, gelu_tanh_and_mul, GEMM)."""
    x, gate_up, down = (t.to(DEVICE) for t in _op_inputs(m))
    got = dense_mlp(x, gate_up, down)
    if m == 1:
        from gemma4_quant.patches.fast_decode import TILES

        assert torch.equal(got, dense_decode(x, gate_up, down, **TILES[(9, 0)]))
        want = reference(*(t.cpu() for t in (x, gate_up, down)))
        assert ((got.float().cpu() - want).norm() / want.norm()).item() < 2e-3
    else:
        act = torch.empty(m, down.shape[1], dtype=x.dtype, device=x.device)
        torch.ops._C.gelu_tanh_and_mul(act, torch.nn.functional.linear(x, gate_up))
        assert torch.equal(got, torch.nn.functional.linear(act, down))


def test_op_is_traced_whole(dense_mlp) -> None:
    """torch.compile traces a caller of the op in one graph, whatever the token count
    (the op decides inside, at run time), and its fake implementation gives the shape."""

    def mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return dense_mlp(x, gate_up, down) * 2

    compiled = torch.compile(mlp, backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (1, 3):
        x, gate_up, down = (t.to(DEVICE) for t in _op_inputs(m))
        assert torch.equal(compiled(x, gate_up, down), mlp(x, gate_up, down))


def test_build_time_check_passes_the_kernels(monkeypatch) -> None:
    """The check every eligible layer passes before it takes the kernels (one token at
    26B-A4B's shape against the float32 product) passes the kernels themselves."""
    from gemma4_quant.patches import fast_decode

    monkeypatch.setattr(fast_decode, "_checked", {})
    assert fast_decode.kernels_work(fast_decode.TILES[(9, 0)], 2816, 2112, device=DEVICE)

"""The small-batch int4 MoE kernels (``gemma4_quant.kernels.moe_decode``) against an exact
float32 product of the independently unpacked weights (``tests/unpack.py``).

Runs Triton's interpreter on CPU (``TRITON_INTERPRET=1``, set before Triton is imported),
so the kernels' indexing, masking and numerics are checked without a GPU; their speed is
``bench/moe_decode.py``'s job, on a GPU. Skips where Triton is not installed.
"""

from __future__ import annotations

import math

import pytest
from triton_env import DEVICE, need_triton

torch = need_triton()

from unpack import ct_int4  # noqa: E402

from gemma4_quant.int4 import pack_int4_raw  # noqa: E402
from gemma4_quant.kernels.moe_decode import moe_decode  # noqa: E402

GROUP = 32


def _experts(e: int, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random symmetric int4 experts in the compressed-tensors layout (packed, scale)."""
    q = torch.randint(-8, 8, (e, n, k), generator=gen)
    scale = (torch.rand(e, n, k // GROUP, generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    packed = pack_int4_raw((q + 8).reshape(e * n, k)).reshape(e, n, k // 8)
    return packed, scale


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 -> float32 as the kernels round: to nearest on a GPU; Triton's
    interpreter (numpy has no bf16) truncates the low 16 bits instead."""
    if DEVICE == "cpu":
        return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return x.to(torch.bfloat16).float()


def reference(x, ids, weights, w13, s13, w2, s2) -> torch.Tensor:
    """The exact float32 product of the unpacked weights, with vLLM's roundings: W13's
    outputs in bf16, the activation product in bf16, each expert's W2 output in bf16, and
    the weighted sum over experts in float32, rounded once."""
    w13f, w2f = ct_int4(w13, s13, GROUP), ct_int4(w2, s2, GROUP)
    inter = w2f.shape[2]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            h = to_bf16(w13f[e] @ x[t].float())
            a = to_bf16(_gelu_tanh(h[:inter]) * h[inter:])
            y = to_bf16(w2f[e] @ a)
            out[t] += weights[t, j].float() * y
    return to_bf16(out)


@pytest.mark.parametrize(
    ("m", "experts", "topk", "hidden", "inter"),
    [
        (1, 8, 2, 256, 96),  # K of W2 = 3 groups: a partial last K step
        (3, 8, 4, 160, 64),  # hidden 5 groups, repeated experts across tokens
        (1, 4, 2, 2816, 352),  # the real hidden size, one TP=2 rank's experts
    ],
)
def test_matches_exact_product(m, experts, topk, hidden, inter) -> None:
    gen = torch.Generator().manual_seed(m * 1000 + hidden)
    w13, s13 = _experts(experts, 2 * inter, hidden, gen)
    w2, s2 = _experts(experts, hidden, inter, gen)
    x = torch.randn(m, hidden, generator=gen).to(torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(m)])
    ids = ids.to(torch.int32)
    weights = torch.softmax(torch.randn(m, topk, generator=gen), dim=-1)
    dev = [t.to(DEVICE) for t in (x, ids, weights, w13, s13, w2, s2)]
    got = moe_decode(*dev, group_size=GROUP).float().cpu()
    want = reference(x, ids, weights, w13, s13, w2, s2)
    # Same roundings in the same places; only the float32 accumulation order differs
    # (~1e-7 relative), which can move a value across a bf16 rounding boundary: one ulp
    # (2^-8 relative) at that rounding, rarely propagated. A wrong nibble, group, scale,
    # expert or row is off by far more than 1%.
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel
    flipped = (got - want).abs() > 2**-6 * want.abs() + 1e-3 * want.abs().max()
    assert flipped.float().mean().item() < 0.01


def test_rejects_mismatched_shapes() -> None:
    gen = torch.Generator().manual_seed(0)
    w13, s13 = _experts(4, 2 * 64, 128, gen)
    w2, s2 = _experts(4, 256, 64, gen)  # hidden 256 != 128
    x = torch.randn(1, 128).to(torch.bfloat16)
    ids, weights = torch.tensor([[0, 1]], dtype=torch.int32), torch.tensor([[0.5, 0.5]])
    with pytest.raises(ValueError, match=r"w2_packed \(4, 256, 8\) does not match hidden 128"):
        moe_decode(x, ids, weights, w13, s13, w2, s2)

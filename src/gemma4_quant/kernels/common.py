"""Triton pieces the int4 decode kernels share."""

from __future__ import annotations

import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def require_contiguous(expected: dict, context: str) -> None:
    """``expected``: name -> (tensor, shape); a tensor of another shape, or not contiguous
    (the kernels index rows by their size), raises a ValueError that names it."""
    for name, (t, want) in expected.items():
        if tuple(t.shape) != want or not t.is_contiguous():
            raise ValueError(f"{name} {tuple(t.shape)} must be a contiguous {list(want)} {context}")


@triton.jit
def nibble_minus_8(w, i: tl.constexpr):
    """Nibble ``i`` of ``w`` minus 8, as float32, without an integer-to-float conversion
    (a quarter-rate instruction on NVIDIA GPUs, eight of them per word): the nibble goes
    into the low mantissa bits of 2**23, and 2**23 + 8 is subtracted, exactly."""
    bits = ((w >> (4 * i)) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388616.0


@triton.jit
def act_and_mul(gate, up, dtype: tl.constexpr, ACT: tl.constexpr):
    """act(gate) * up in float32, gate and up rounded to ``dtype`` first, as vLLM's GEMM
    writes them (ACT: 0 SiLU, 1 GELU, 2 GELU(tanh))."""
    gate = gate.to(dtype).to(tl.float32)
    up = up.to(dtype).to(tl.float32)
    if ACT == 0:
        act = gate / (1.0 + tl.exp(-gate))
    elif ACT == 1:
        act = 0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476))
    else:
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate - gate / (1.0 + tl.exp(2.0 * inner))  # 0.5 * g * (1 + tanh(inner))
    return act * up

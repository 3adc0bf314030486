"""Triton pieces the int4 decode kernels share."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}
# Inline PTX where it compiles for a GPU; Triton's CPU interpreter (the tests) has none
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")
PTX = tl.constexpr(not INTERPRETED)


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and _triton_launches_pdl()


def _triton_launches_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__


def pdl_for(pdl: int, device: torch.device) -> int:
    """``pdl`` where the kernel can launch with programmatic dependent launch (a CUDA GPU of
    compute capability 9.0 or later, a Triton that launches it), else 0; Triton's
    interpreter keeps it (the wait is a no-op there)."""
    if not pdl or INTERPRETED:
        return pdl
    if device.type != "cuda":
        return 0
    index = device.index if device.index is not None else torch.cuda.current_device()
    return pdl if _pdl_device(index) else 0


@functools.cache
def _triton_takes_maxnreg() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "maxnreg" in CUDAOptions.__dataclass_fields__


def launch_options(pdl: int, maxnreg: int = 0) -> dict:
    """The launch keywords of a kernel whose ``PDL`` is ``pdl`` (from ``pdl_for``), and a
    register limit for ``ptxas`` where ``maxnreg`` is set (a Triton without the option
    compiles without it).

    The limit changes more than occupancy: left to itself, ``ptxas`` compiles the int4
    loops in 56 registers by issuing the next step's loads at the end of a step, where
    they are waited for at once (docs/gpu-results.md 3l); allowed 96, it issues them at
    the top, a whole step ahead (``bench/int4_sass.py --maxnreg``)."""
    options = {"launch_pdl": True} if pdl and not INTERPRETED else {}
    if maxnreg and _triton_takes_maxnreg():
        options["maxnreg"] = maxnreg
    return options


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With programmatic dependent launch a kernel may start while the kernel before it on
    the stream still runs, so that its launch overlaps that kernel's tail. Here it waits
    until that kernel has finished and its writes are visible (``griddepcontrol.wait``),
    then lets the next kernel launch the same way. Nothing before this call may read what
    an earlier kernel wrote, or write anything. Hopper (compute capability 9.0) and later.
    Measured no faster in a layer's chain of these kernels on an H100, and L2 prefetches
    of a kernel's weights before the wait slower (docs/gpu-results.md 3m)."""
    if PDL and PTX:
        tl.inline_asm_elementwise(
            "griddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n\tmov.u32 $0, 0;",
            "=r", [], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def prefetch_l2(ptr):
    """Asks L2 for the line at each of ``ptr`` (``prefetch.global.L2``): no register waits
    for it, so a later load finds it in L2 instead of memory."""
    if PTX:
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptr], dtype=tl.int32,
            is_pure=False, pack=1,
        )  # fmt: skip


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

"""The start every Triton kernel test shares: Triton's interpreter on CPU unless the caller
asked for a GPU (``TRITON_INTERPRET=0``; Triton reads it when it is imported, so a test
module imports this first), Triton itself, and the device the kernels' tensors go to."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"


def need_triton():
    """``torch``, where Triton can run the kernels here; skips the calling module otherwise."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton", reason="Triton is not installed in this environment")
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("Triton without its interpreter needs a GPU", allow_module_level=True)
    return torch


def marlin_reference():
    """vLLM's Marlin reference packer (``marlin_utils_test``); skips the calling module where
    this vLLM has none."""
    return pytest.importorskip(
        "vllm.model_executor.layers.quantization.utils.marlin_utils_test",
        reason="this vLLM has no Marlin reference packer",
    )


def marlin_matrix(k: int, n: int, group: int, gen, live: int | None = None, rows: bool = False):
    """A random symmetric int4 [K, N] matrix as Marlin holds it: (Marlin words, Marlin
    scales, float32 W), packed by vLLM's reference packer and ``marlin_permute_scales``.
    With ``live``, the scales of the columns (``rows``: row groups) from ``live`` on are
    zero, as Marlin's padding of the intermediate size leaves them: W13's gate and up
    columns (``live`` then counts within each half), W2's rows."""
    import torch
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_permute_scales,
    )

    packer = marlin_reference()
    q = torch.randint(0, 16, (k, n), generator=gen)
    scale = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.005).to(torch.bfloat16)
    if live is not None and rows:
        scale[live // group :] = 0
    elif live is not None:
        scale[:, live : n // 2] = 0
        scale[:, n // 2 + live :] = 0
    w = (q - 8).float() * scale.float().repeat_interleave(group, dim=0)
    words = packer.marlin_weights(q, k, n, 4, packer.get_weight_perm(4))
    return words, marlin_permute_scales(scale, k, n, group), w

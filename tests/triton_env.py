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

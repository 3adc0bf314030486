"""vLLM's CUDA mixed-precision linear kernels (Machete, Marlin, Triton W4A16, Exllama,
Conch, AllSpark, Humming): each one's conditions, tried in the order this vLLM lists them
(kernels/linear/__init__.py ``_POSSIBLE_KERNELS``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from . import rules
from .core import Ctx, Hit, Module, Scheme, short_name

# scheme, (K per partition, N per partition, K), capability, model dtype, vLLM features.
_CudaCheck = Callable[[Scheme, tuple[int, int, int], int, str, dict[str, Any]], str | None]


def _machete(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    k, n, _ = shape
    if cap != 90:
        return "Machete requires compute capability 9.0"
    if rules.group_size(s) not in (-1, 64, 128):
        return f"Machete: group size {rules.group_size(s)} not in [-1, 64, 128]"
    if k % 64 or n % 128:
        return f"Machete: K % 64 and N % 128 needed (K={k}, N={n})"
    return None


def _marlin(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    k, n, k_full = shape
    group = rules.group_size(s)
    if cap < 75:
        return "Marlin requires compute capability 7.5"
    if group not in (-1, 32, 64, 128):
        return f"Marlin: group size {group} not in [-1, 32, 64, 128]"
    if group != -1 and group < k_full and k % group:
        return f"Marlin: K per partition {k} not divisible by group size {group}"
    if not f.get("marlin_pads") and (n % 64 or k % 128):
        return f"Marlin needs N % 64 and K % 128 per partition (N={n}, K={k})"
    return None


def _triton_w4a16(
    s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any
) -> str | None:
    k, n, k_full = shape
    group = rules.group_size(s)
    if s.bits != 4:
        return "TritonW4A16: 4-bit only"
    if n % 8:
        return f"TritonW4A16: N ({n}) % 8"
    if group not in (-1, 32, 64, 128, 256) and group != k_full:
        return f"TritonW4A16: group size {group}"
    if k % (group if group != -1 else k):
        return f"TritonW4A16: K {k} not divisible by group size {group}"
    return None


def _exllama(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    return None if dtype in ("float16", "half") else "Exllama only supports float16 activations"


def _conch(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    return None if importlib.util.find_spec("conch") else "conch-triton-kernels is not installed"


def _allspark(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    # allspark_utils.py: Ampere only, per-channel uint8b128 (8-bit symmetric)
    if not 80 <= cap < 90:
        return "AllSpark runs on compute capability 8.x only"
    if rules.group_size(s) != -1 or s.bits != 8 or not s.symmetric:
        return "AllSpark: per-channel symmetric 8-bit only"
    return None


def _humming(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    return None if importlib.util.find_spec("humming") else "Humming is not installed"


_CUDA_LINEAR_KERNELS: dict[str, _CudaCheck] = {
    "MacheteLinearKernel": _machete,
    "AllSparkLinearKernel": _allspark,
    "MarlinLinearKernel": _marlin,
    "ConchLinearKernel": _conch,
    "ExllamaLinearKernel": _exllama,
    "TritonW4A16LinearKernel": _triton_w4a16,
    "HummingLinearKernel": _humming,
}


def check_wna16_linear_cuda(module: Module, ctx: Ctx) -> Hit | None:
    scheme = rules.built_scheme(module, ctx)
    env = ctx.env
    if (
        env.platform != "cuda"
        or not rules.is_wna16(scheme)
        or not rules.is_representative(module, ctx)
    ):
        return None
    shape = rules.partition_shape(module, ctx)
    if shape is None or env.capability is None:
        return None
    reasons = []
    for name in env.features.get("cuda_linear_kernels") or list(_CUDA_LINEAR_KERNELS):
        check = _CUDA_LINEAR_KERNELS.get(name)
        if check is None:
            continue  # W4A8 / not-installed kernels: not for bf16 weight-only layers
        refusal = check(scheme, shape, env.capability, ctx.analysis.dtype, env.features)
        if refusal is None:
            return rules.forced(module, scheme, ctx, linear=True)
        reasons.append(refusal)
    layer, _ = rules.vllm_layer(module, ctx)
    message = "no CUDA kernel for the WNA16 linear layer"
    k, n, _ = shape
    error = (
        f"{short_name(layer)} (K={k}, N={n}, group {rules.group_size(scheme)}): ValueError: "
        "Failed to find a kernel that can implement the WNA16 linear layer: " + "; ".join(reasons)
    )
    return rules.served_by_fallback(module, scheme, ctx, True, message, error)

"""compressed-tensors FP8 experts without an FP8 MoE backend: dequantized once at load.

vLLM's compressed-tensors FP8 MoE method (``CompressedTensorsW8A8Fp8MoEMethod``, RedHatAI's
``gemma-4-26B-A4B-it-FP8-Dynamic``) asks ``select_fp8_moe_backend`` for a backend in its
constructor. On CPU the only ones are vLLM's CPU FP8 MoE kernels, which need AMX (and,
depending on the build, an activation Gemma 4 does not use); elsewhere the oracle returns
``Fp8MoeBackend.NONE``. Construction and loading pass, and weight processing then stops
with ``ValueError: Unsupported FP8 MoE backend: NONE`` (``convert_to_fp8_moe_kernel_format``):
the checkpoint cannot be served on such a CPU.

Where the method vLLM built holds exactly that ``NONE`` backend, the layer instead gets
``CompressedTensorsFp8DequantizedMoEMethod``: vLLM's own FP8 method registers the
buffers (``create_weights``; loaded by vLLM's loader as always), and
``process_weights_after_loading`` turns them into ``weight * scale`` in the model dtype
(per-channel or per-tensor scales; the product of an FP8 and a float32-widened bf16 value
is exact in float32, rounded once), then hands over to ``UnquantizedFusedMoEMethod``.
Activations stay in the model dtype (weight-only semantics, as vLLM's W8A16 FP8 paths).
Where vLLM has a backend (AMX CPUs with a supported activation, GPUs) its FP8 method
stays; ``GEMMA4_QUANT_FALLBACK=force`` dequantizes there too, ``off`` never.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ... import envs, vllm_code
from .. import vllm_source, wrap_once
from .common import logger

if TYPE_CHECKING:
    from types import ModuleType

    import torch

_CT = "model_executor/layers/quantization/compressed_tensors/"
METHOD = "CompressedTensorsW8A8Fp8MoEMethod"
# vLLM's FP8 MoE method: in a module of its own (0.20+), or the factory's (0.19)
_METHOD_FILES = (
    _CT + "compressed_tensors_moe/compressed_tensors_moe_w8a8_fp8.py",
    _CT + "compressed_tensors_moe.py",
)
_ORACLE_FILE = "model_executor/layers/fused_moe/oracle/fp8.py"
NO_FP8_MOE_BACKEND = "Unsupported FP8 MoE backend"
_MARK = "__gemma4_quant_fp8_fallback__"
_WHY = "activations stay in the model dtype"
# the buffers vLLM's FP8 method registers (input scales: static activations only)
_PARAMS = (
    "w13_weight",
    "w2_weight",
    "w13_weight_scale",
    "w2_weight_scale",
    "w13_input_scale",
    "w2_input_scale",
)
# weight strategies whose scales the fallback expands (block scales: left to vLLM)
STRATEGIES = ("channel", "tensor")


def ct_fp8_moe_recognized() -> bool:
    """The factory builds vLLM's FP8 MoE method, whose constructor stores the oracle's
    backend (``NONE`` where none fits: the oracle's "Unsupported" error comes at weight
    processing) and whose ``create_weights`` registers FP8 weights and their scales."""
    from . import factory_builds, method_functions

    oracle = vllm_source(_ORACLE_FILE)
    if not factory_builds(METHOD) or vllm_code.find_class(oracle, "Fp8MoeBackend") is None:
        return False
    if not vllm_code.has_string(vllm_code.parse(oracle or ""), NO_FP8_MOE_BACKEND):
        return False
    found = method_functions(_METHOD_FILES, METHOD)
    if found is None:
        return False
    _, init, create = found
    return (
        any(vllm_code.calls(init, "select_fp8_moe_backend"))
        and vllm_code.assigns_self(init, "fp8_backend")
        and set(_PARAMS[:4]) <= set(vllm_code.strings(create))
    )


def backend_refusal(method: Any) -> str | None:
    """Why vLLM's FP8 MoE method cannot serve its layer here (None: it can)."""
    backend = getattr(method, "fp8_backend", None)
    if str(getattr(backend, "value", backend)) == "NONE":
        return f"{NO_FP8_MOE_BACKEND}: NONE (no FP8 MoE backend for these experts here)"
    return None


def unsupported_reason(strategy: str | None, bits: int | None) -> str | None:
    """Why the fallback does not reproduce an FP8 expert scheme (None: it does)."""
    if bits != 8:
        return f"{bits}-bit float weights"
    if strategy not in STRATEGIES:
        return f"FP8 {strategy} scales ({' or '.join(STRATEGIES)} only)"
    return None


def patch_ct_fp8_moe_factory(module: ModuleType) -> None:
    """``CompressedTensorsMoEMethod.get_moe_method``: vLLM's FP8 method, unless it holds
    no backend."""

    def make(original: Any) -> Any:
        def get_moe_method(quant_config, layer: torch.nn.Module, layer_name: str):  # noqa: ANN001
            method = original(quant_config, layer, layer_name)
            mode = envs.fallback_mode()
            if type(method).__name__ != METHOD or mode == "off":
                return method
            reason = backend_refusal(method)
            if reason is None and mode == "force":
                reason = "GEMMA4_QUANT_FALLBACK=force"
            if reason is None:
                return method
            strategy = method.weight_quant.strategy
            strategy = str(getattr(strategy, "value", strategy)).lower()
            why_not = unsupported_reason(strategy, method.weight_quant.num_bits)
            if why_not is not None:
                logger.info(
                    "gemma4_quant: no dequantizing fallback for %s: %s", layer_name, why_not
                )
                return method
            return dequantized_fp8_moe_method_class()(method, reason, layer_name)

        return get_moe_method

    wrap_once(module.CompressedTensorsMoEMethod, "get_moe_method", _MARK, make, static=True)


@functools.cache
def dequantized_fp8_moe_method_class() -> type:
    """Built on first use: vLLM's MoE classes are only imported where a layer needs them."""
    import torch

    from ... import int4
    from .nvfp4 import _dequantized_moe_method_base

    class CompressedTensorsFp8DequantizedMoEMethod(_dequantized_moe_method_base()):
        """vLLM's FP8 expert buffers in (its own method's ``create_weights``), vLLM's
        unquantized MoE out."""

        params = _PARAMS
        format_name = "FP8"
        packed_dtype = torch.float8_e4m3fn
        values_per_code = 1
        why = _WHY

        def __init__(self, fp8_method: Any, reason: str, layer_name: str) -> None:
            super().__init__(fp8_method.moe, reason, layer_name)
            self.fp8_method = fp8_method
            self.packed_class = type(fp8_method)

        def packed_method(self) -> Any:
            return self.fp8_method  # built: vLLM's oracle answered NONE, it did not raise

        def _dequantize(self, layer: torch.nn.Module, stem: str) -> torch.Tensor:
            """[E, N, K] FP8 with [E, N, 1] channel scales, or [E, shards] / [E] tensor
            scales (w13: gate rows [0, I), up rows [I, 2I), each with its own)."""
            weight = self._tensor(layer, stem, "weight")
            scale = self._tensor(layer, stem, "weight_scale")
            experts, rows, _ = weight.shape
            if scale.dim() < 3:
                shards = scale.reshape(experts, -1)
                if rows % shards.shape[1]:
                    raise ValueError(
                        f"{self.layer_name}.{stem}_weight {tuple(weight.shape)}: per-tensor "
                        f"scales {tuple(scale.shape)} do not split its rows evenly"
                    )
                scale = shards.repeat_interleave(rows // shards.shape[1], dim=1).unsqueeze(-1)
            if scale.shape != (experts, rows, 1):
                raise ValueError(
                    f"{self.layer_name}.{stem}_weight_scale {tuple(scale.shape)}: expected "
                    f"{(experts, rows, 1)}, one scale per output channel of "
                    f"{stem}_weight {tuple(weight.shape)}"
                )
            return int4.dequantize_fp8(weight, scale, dtype=self.params_dtype)

    return CompressedTensorsFp8DequantizedMoEMethod

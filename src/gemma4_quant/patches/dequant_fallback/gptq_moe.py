"""GPTQ experts without a MoE kernel: built unquantized, dequantized as they stream in.

vLLM's GPTQ configs (``GPTQMarlinConfig`` 0.20 - 0.29, ``AutoGPTQConfig`` 0.30+) build
MoE experts through one module function, ``get_moe_quant_method``, whose method asks the
WNA16 MoE backend oracle for a kernel; on CPU none takes Gemma 4's experts (AMX only,
SiLU only before 0.33, ...): ``NotImplementedError: No WNA16 MoE backend supports the
deployment configuration``, and a GPTQ export (GPTQModel's, g64) cannot be built.

Where exactly that error is raised, the experts get vLLM's ``UnquantizedFusedMoEMethod``
instead (what vLLM's own dynamic rules give an excluded MoE in the same function), and the
checkpoint's per-expert GPTQ tensors are dequantized on their way into the loader: the
``dequantize`` stage of the load stream, the one ``unquantized_experts`` uses for INC's
unquantized experts (same GPTQ v1 codec, same shape checks, same error messages).
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from ... import envs, vllm_code
from .. import vllm_source
from . import _MARK, NO_MOE_KERNEL
from .common import logger

# (file, module) of the GPTQ config that builds MoE methods through get_moe_quant_method
_LOCATIONS = (
    ("model_executor/layers/quantization/auto_gptq.py", "AutoGPTQConfig"),
    ("model_executor/layers/quantization/gptq_marlin.py", "GPTQMarlinConfig"),
)
_PACKAGE = "vllm.model_executor.layers.quantization."
_UNQUANTIZED = "return UnquantizedFusedMoEMethod(layer.moe_config)"


def gptq_moe_module() -> str | None:
    """The module whose ``get_moe_quant_method`` builds GPTQ experts here (None: unknown)."""
    for path, config in _LOCATIONS:
        text = vllm_source(path)
        function = vllm_code.find_function(text, "get_moe_quant_method")
        caller = vllm_code.find_function(text, f"{config}.get_quant_method")
        if function is None or caller is None:
            continue
        if any(vllm_code.calls(caller, "get_moe_quant_method")) and vllm_code.has_code(
            function, _UNQUANTIZED
        ):
            return _PACKAGE + path.rsplit("/", 1)[1].removesuffix(".py")
        return None
    return None


def patch_gptq_moe(module: ModuleType) -> None:
    original = module.get_moe_quant_method
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_moe_quant_method(config: Any, layer: Any, prefix: str, moe_method_cls: type):
        try:
            return original(config, layer, prefix, moe_method_cls)
        except NotImplementedError as exc:
            bits = getattr(config, "weight_bits", None)
            if NO_MOE_KERNEL not in str(exc) or envs.fallback_mode() == "off":
                raise
            if bits not in (2, 4, 8):
                raise
        logger.info(
            "gemma4_quant: %s: no WNA16 MoE backend for GPTQ %d-bit experts here; building "
            "them unquantized (the checkpoint's experts are dequantized as they load)",
            prefix,
            bits,
        )
        return module.UnquantizedFusedMoEMethod(layer.moe_config)

    setattr(get_moe_quant_method, _MARK, True)
    module.get_moe_quant_method = get_moe_quant_method

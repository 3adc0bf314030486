"""INC (AutoRound) int8 linears on CPU: vLLM's INC config refuses every width but 4 there
(``INC on CPU: unsupported config`` 0.30+, ``INC on CPU only supports 4-bit
quantization`` before), although the GPTQ linear method it uses for int4 takes int8 as
well (``uint8b128``). Mixed-width AutoRound exports (Intel's ``int4-mixed``: int8
attention, dense MLP and router) cannot be built at all.

The refusal is replaced by the method vLLM builds for a 4-bit layer, at the layer's own
width: 0.30+ ``AutoGPTQLinearMethod`` (what ``INCWNA16LinearScheme`` wraps; its kernel
choice the linear fallback covers: CPUWNA16 takes no int8, so the layer is dequantized at
load),
0.20 - 0.29 ``apply_gptq_quant_layer`` (0.20: loads, and that release has no CPU kernel for
GPTQ linears at any width; 0.21 - 0.29 build only Marlin there and refuse the layer on CPU,
which then gets 0.30's ``AutoGPTQLinearMethod`` as above). Only symmetric GPTQ-packed int8
is routed; anything else keeps vLLM's error.
"""

from __future__ import annotations

import ast
import functools
from types import ModuleType
from typing import Any

from ... import envs, vllm_code
from .. import vllm_source, wrap_once

SCHEME_MODULE = "vllm.model_executor.layers.quantization.inc.schemes.inc_wna16_scheme"
CONFIG_MODULE = "vllm.model_executor.layers.quantization.inc"
_SCHEME_FILE = "model_executor/layers/quantization/inc/schemes/inc_wna16_scheme.py"
_LINEAR_FILE = "model_executor/layers/quantization/inc/schemes/inc_wna16_linear.py"
_CONFIG_FILE = "model_executor/layers/quantization/inc.py"
# vLLM's refusals (0.30+, 0.20 - 0.29)
REFUSAL_SCHEME = "INC on CPU: unsupported config"
REFUSAL_CONFIG = "INC on CPU only supports 4-bit quantization"
MARLIN_ONLY = "quantization is supported with Marlin kernels"
_INT8_TYPE = ("(8, True)", "scalar_types.uint8b128")
_MARK = "__gemma4_quant_inc_int8__"
INT8 = 8

GENERATION_SCHEME = "scheme"  # INCWna16Scheme.get_linear_method (0.30+)
GENERATION_CONFIG = "config"  # INCConfig.apply_cpu_w4a16_quant_layer (0.20 - 0.29)


def inc_int8_generation() -> str | None:
    """Which INC code refuses int8 linears on CPU here (None: neither form is known)."""
    scheme = vllm_code.find_function(vllm_source(_SCHEME_FILE), "INCWna16Scheme.get_linear_method")
    if scheme is not None:
        linear = vllm_code.find_class(vllm_source(_LINEAR_FILE), "INCWNA16LinearScheme")
        refuses = any(t.startswith(REFUSAL_SCHEME) for t in vllm_code.fstring_templates(scheme))
        if refuses and _maps_int8(linear):
            return GENERATION_SCHEME
        return None
    config = vllm_source(_CONFIG_FILE)
    method = vllm_code.find_function(config, "INCConfig.apply_cpu_w4a16_quant_layer")
    if vllm_code.has_string(method, REFUSAL_CONFIG) and any(
        vllm_code.calls(method, "apply_gptq_quant_layer")
    ):
        return GENERATION_CONFIG
    return None


def _maps_int8(node: ast.AST | None) -> bool:
    """The GPTQ type map of INCWNA16LinearScheme has symmetric int8 (``uint8b128``)."""
    if node is None:
        return False
    return any(
        (ast.unparse(key), ast.unparse(value)) == _INT8_TYPE
        for child in ast.walk(node) if isinstance(child, ast.Dict)
        for key, value in zip(child.keys, child.values, strict=True) if key is not None
    )  # fmt: skip


def _routable(bits: int, sym: bool, gptq: bool) -> bool:
    return bits == INT8 and sym and gptq and envs.fallback_mode() != "off"


def patch_inc_scheme(module: ModuleType) -> None:
    """0.30+: the CPU refusal becomes vLLM's GPTQ linear method at the layer's width."""

    def make(original: Any) -> Any:
        def get_linear_method(self, config, layer, prefix, layer_config):  # noqa: ANN001
            try:
                return original(self, config, layer, prefix, layer_config)
            except NotImplementedError as exc:
                lc = layer_config
                if REFUSAL_SCHEME not in str(exc) or not _routable(lc.bits, lc.sym, lc.is_gptq):
                    raise
            return gptq_linear_method(layer_config.bits, layer_config.group_size)

        return get_linear_method

    wrap_once(module.INCWna16Scheme, "get_linear_method", _MARK, make)


def gptq_linear_method(bits: int, group_size: int) -> Any:
    """vLLM's ``AutoGPTQLinearMethod`` for symmetric ``bits``-wide GPTQ weights, as
    ``INCWNA16LinearScheme`` builds it for int4, without the Marlin type check of its
    ``__init__`` (on CPU, Marlin's list has 4-bit types only): the kernel is chosen when
    the weights are created, by ``choose_mp_linear_kernel``, which the linear fallback
    answers where no kernel takes the layer."""
    from vllm.model_executor.layers.quantization.auto_gptq import (
        AutoGPTQConfig,
        AutoGPTQLinearMethod,
    )

    config = AutoGPTQConfig(
        weight_bits=bits,
        group_size=group_size,
        desc_act=False,
        is_sym=True,
        lm_head_quantized=False,
        dynamic={},
        full_config={},
    )
    method = AutoGPTQLinearMethod.__new__(AutoGPTQLinearMethod)
    method.quant_config = config
    method.input_dtype = None
    method.quant_type = config.quant_type
    return method


def patch_inc_config(module: ModuleType) -> None:
    """0.20 - 0.29: the CPU refusal becomes the GPTQ method the config builds elsewhere."""

    def make(original: Any) -> Any:
        @functools.wraps(original)
        def apply_cpu_w4a16_quant_layer(self, layer, prefix: str):  # noqa: ANN001
            try:
                return original(self, layer, prefix)
            except NotImplementedError as exc:
                if REFUSAL_CONFIG not in str(exc):
                    raise
                bits, group_size, sym = self.get_layer_config(layer, prefix)
                gptq = "gptq" in f"{self.packing_format} {self.backend}"
                if not _routable(bits, sym, gptq):
                    raise
            try:
                return self.apply_gptq_quant_layer(layer, prefix)
            except NotImplementedError as exc:
                # 0.21 - 0.29 build GPTQ linears with Marlin only, and Marlin's check
                # fails on CPU: the method it would have built, at this width
                if MARLIN_ONLY not in str(exc):
                    raise
            return gptq_linear_method(bits, group_size)

        return apply_cpu_w4a16_quant_layer

    wrap_once(module.INCConfig, "apply_cpu_w4a16_quant_layer", _MARK, make)

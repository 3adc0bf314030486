"""INC (AutoRound) linears on CPU that vLLM refuses or builds with a CUDA-only method.

- int8: vLLM's INC config refuses every width but 4 on CPU (``INC on CPU: unsupported
  config`` 0.30+, ``INC on CPU only supports 4-bit quantization`` 0.20 - 0.29), although
  the GPTQ linear method it uses for int4 takes int8 as well (``uint8b128``).
  Mixed-width AutoRound exports (Intel's ``int4-mixed``: int8 attention, dense MLP and
  router) cannot be built at all.
- 0.19.x refuses every quantized layer on CPU (``INC quantization is not supported
  during xpu kernel migration``): no AutoRound checkpoint can be built.
- 0.20 - 0.21 build CPU linears with the exllama ``GPTQLinearMethod``, whose op
  (``gptq_gemm``) is a CUDA kernel: the model loads and fails at its first forward.

Each of these gets the method vLLM builds for a 4-bit GPTQ layer elsewhere, at the
layer's own width: ``AutoGPTQLinearMethod`` (0.22+; what ``INCWNA16LinearScheme`` wraps
from 0.30), ``GPTQMarlinLinearMethod`` before (the same class under its old name). Its
kernel is chosen when the weights are created, by ``choose_mp_linear_kernel``: the CPU
int4 kernel where it fits, else the linear fallback, which dequantizes the layer at load.
On 0.19 the MoE experts get no method (vLLM's unquantized FusedMoE), as INC gives them
on CPU from 0.20 on; ``unquantized_experts`` dequantizes their GPTQ tensors as they
stream in. Only symmetric GPTQ-packed 4- and 8-bit layers are routed; anything else
keeps vLLM's error.
"""

from __future__ import annotations

import ast
import functools
import importlib
from types import ModuleType
from typing import Any

from ... import envs, vllm_code
from .. import vllm_source, wrap_once

SCHEME_MODULE = "vllm.model_executor.layers.quantization.inc.schemes.inc_wna16_scheme"
CONFIG_MODULE = "vllm.model_executor.layers.quantization.inc"
_SCHEME_FILE = "model_executor/layers/quantization/inc/schemes/inc_wna16_scheme.py"
_LINEAR_FILE = "model_executor/layers/quantization/inc/schemes/inc_wna16_linear.py"
_CONFIG_FILE = "model_executor/layers/quantization/inc.py"
# vLLM's refusals (0.30+, 0.20 - 0.29, 0.19)
REFUSAL_SCHEME = "INC on CPU: unsupported config"
REFUSAL_CONFIG = "INC on CPU only supports 4-bit quantization"
REFUSAL_EVERY_LAYER = "INC quantization is not supported during xpu kernel migration"
# the exllama GPTQ method 0.20 - 0.21 build CPU linears with (its op is a CUDA kernel)
CUDA_ONLY_METHOD = "GPTQLinearMethod"
MARLIN_ONLY = "quantization is supported with Marlin kernels"
_INT8_TYPE = ("(8, True)", "scalar_types.uint8b128")
_MARK = "__gemma4_quant_inc_cpu__"
_MARLIN_CHECK = "verify_marlin_supported"
INT8 = 8

GENERATION_SCHEME = "scheme"  # INCWna16Scheme.get_linear_method (0.30+)
GENERATION_CONFIG = "config"  # INCConfig.apply_cpu_w4a16_quant_layer (0.20 - 0.29)
GENERATION_REFUSES = "refuses-every-layer"  # INCConfig.apply_ipex_quant_layer (0.19)


def inc_cpu_generation() -> str | None:
    """Which INC code refuses (or builds with a CUDA-only method) CPU linears here
    (None: no form is known)."""
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
    if cpu_refuses_every_layer(config) and vllm_code.find_function(
        config, "INCConfig.get_layer_config"
    ):
        return GENERATION_REFUSES
    return None


def cpu_refuses_every_layer(config: str | None) -> bool:
    """0.19's INC: ``get_quant_method`` sends CPU layers to ``apply_ipex_quant_layer``,
    which raises NotImplementedError for every quantized one (linears and experts)."""
    dispatch = vllm_code.find_function(config, "INCConfig.get_quant_method")
    ipex = vllm_code.find_function(config, "INCConfig.apply_ipex_quant_layer")
    if dispatch is None or ipex is None:
        return False
    raises = any(
        isinstance(node, ast.Raise)
        and isinstance(node.exc, ast.Call)
        and vllm_code.is_name(node.exc.func, "NotImplementedError")
        for node in ipex.body
    )
    return (
        raises
        and vllm_code.has_string(ipex, REFUSAL_EVERY_LAYER)
        and any(vllm_code.calls(dispatch, "is_cpu"))
        and any(vllm_code.calls(dispatch, "apply_ipex_quant_layer"))
    )


def _maps_int8(node: ast.AST | None) -> bool:
    """The GPTQ type map of INCWNA16LinearScheme has symmetric int8 (``uint8b128``)."""
    if node is None:
        return False
    return any(
        (ast.unparse(key), ast.unparse(value)) == _INT8_TYPE
        for child in ast.walk(node) if isinstance(child, ast.Dict)
        for key, value in zip(child.keys, child.values, strict=True) if key is not None
    )  # fmt: skip


def _routable(bits: int, sym: bool, gptq: bool, widths: tuple[int, ...] = (INT8,)) -> bool:
    return bits in widths and sym and gptq and envs.fallback_mode() != "off"


def _is_gptq(config: Any) -> bool:
    return "gptq" in f"{config.packing_format} {config.backend}"


def patch_inc_scheme(module: ModuleType, gptq_linear: tuple[str, str] | None) -> None:
    """0.30+: the CPU refusal becomes vLLM's GPTQ linear method at the layer's width."""

    def make(original: Any) -> Any:
        def get_linear_method(self, config, layer, prefix, layer_config):  # noqa: ANN001
            try:
                return original(self, config, layer, prefix, layer_config)
            except NotImplementedError as exc:
                lc = layer_config
                if REFUSAL_SCHEME not in str(exc) or not _routable(lc.bits, lc.sym, lc.is_gptq):
                    raise
            return gptq_linear_method(layer_config.bits, layer_config.group_size, gptq_linear)

        return get_linear_method

    wrap_once(module.INCWna16Scheme, "get_linear_method", _MARK, make)


def gptq_linear_method(bits: int, group_size: int, location: tuple[str, str] | None) -> Any:
    """vLLM's GPTQ linear method (``AutoGPTQLinearMethod``, ``GPTQMarlinLinearMethod``
    before 0.22) for symmetric ``bits``-wide GPTQ weights, as INC builds it for int4 on a
    GPU, built by its own ``__init__`` without the Marlin check in it (on CPU, Marlin's
    list has no types): the kernel is chosen when the weights are created, by
    ``choose_mp_linear_kernel``, which the linear fallback answers where no kernel takes
    the layer. ``location``: that method's (module, class), as detection found it."""
    if location is None:
        raise NotImplementedError("no GPTQ linear method with a mixed-precision kernel")
    module_name, method_name = location
    module = importlib.import_module(module_name)
    config = getattr(module, method_name.replace("LinearMethod", "Config"))(
        weight_bits=bits,
        group_size=group_size,
        desc_act=False,
        is_sym=True,
        lm_head_quantized=False,
        dynamic={},
        full_config={},
    )
    verify = getattr(module, _MARLIN_CHECK, None)
    if verify is None:
        return getattr(module, method_name)(config)
    # the module-level name __init__ looks up, put back before anything else runs
    setattr(module, _MARLIN_CHECK, lambda *args, **kwargs: None)
    try:
        return getattr(module, method_name)(config)
    finally:
        setattr(module, _MARLIN_CHECK, verify)


def patch_inc_config(module: ModuleType, gptq_linear: tuple[str, str] | None) -> None:
    """0.20 - 0.29: the CPU int8 refusal becomes the GPTQ method the config builds
    elsewhere; the CUDA-only exllama method (0.20 - 0.21) becomes the one with a kernel."""

    def make(original: Any) -> Any:
        @functools.wraps(original)
        def apply_cpu_w4a16_quant_layer(self, layer, prefix: str):  # noqa: ANN001
            try:
                method = original(self, layer, prefix)
            except NotImplementedError as exc:
                if REFUSAL_CONFIG not in str(exc):
                    raise
                bits, group_size, sym = self.get_layer_config(layer, prefix)
                if not _routable(bits, sym, _is_gptq(self)):
                    raise
                try:
                    method = self.apply_gptq_quant_layer(layer, prefix)
                except NotImplementedError as exc:
                    # 0.21 - 0.29 build GPTQ linears with Marlin only, and Marlin's check
                    # fails on CPU: the method it would have built, at this width
                    if MARLIN_ONLY not in str(exc):
                        raise
                    return gptq_linear_method(bits, group_size, gptq_linear)
            if type(method).__name__ != CUDA_ONLY_METHOD or envs.fallback_mode() == "off":
                return method
            bits, group_size, sym = self.get_layer_config(layer, prefix)
            if not _routable(bits, sym, _is_gptq(self), (4, INT8)):
                return method
            return gptq_linear_method(bits, group_size, gptq_linear)

        return apply_cpu_w4a16_quant_layer

    wrap_once(module.INCConfig, "apply_cpu_w4a16_quant_layer", _MARK, make)


def patch_inc_refusal(module: ModuleType, gptq_linear: tuple[str, str] | None) -> None:
    """0.19: CPU linears get vLLM's GPTQ linear method; MoE experts none (vLLM's
    unquantized FusedMoE, whose GPTQ tensors ``unquantized_experts`` dequantizes)."""
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    from vllm.platforms import current_platform

    def make(original: Any) -> Any:
        @functools.wraps(original)
        def apply_ipex_quant_layer(self, layer, prefix: str):  # noqa: ANN001
            try:
                return original(self, layer, prefix)
            except NotImplementedError as exc:
                if REFUSAL_EVERY_LAYER not in str(exc) or not current_platform.is_cpu():
                    raise
                bits, group_size, sym = self.get_layer_config(layer, prefix)
                if not _routable(bits, sym, _is_gptq(self), (4, INT8)):
                    raise
            if isinstance(layer, (LinearBase, ParallelLMHead)):
                return gptq_linear_method(bits, group_size, gptq_linear)
            return None

        return apply_ipex_quant_layer

    wrap_once(module.INCConfig, "apply_ipex_quant_layer", _MARK, make)

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

Where the config's MoE method is Marlin's without a backend oracle (``GPTQMarlinMoEMethod``
on 0.19), vLLM builds it on any platform and its ``create_weights`` allocates Marlin's
workspace, one slot per compute unit: on CPU ``NotImplementedError: num_compute_units is
not implemented for the current platform`` while the model is built. The experts take the
same unquantized path there, where the platform counts no compute units.
"""

from __future__ import annotations

import ast
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


# Marlin's MoE workspace: one slot per compute unit of the device (SMs)
_WORKSPACE = "marlin_make_workspace_new"


def marlin_workspace_methods(module: str) -> frozenset[str]:
    """The MoE methods of ``module`` (a GPTQ config's) that allocate Marlin's workspace
    in ``create_weights`` without asking a backend oracle first: vLLM builds them on any
    platform."""
    text = vllm_source(module.removeprefix("vllm.").replace(".", "/") + ".py")
    tree = vllm_code.parse(text or "")
    methods = set()
    for node in tree.body if tree is not None else ():
        if not isinstance(node, ast.ClassDef):
            continue
        init = vllm_code.find_function(text, f"{node.name}.__init__")
        create = vllm_code.find_function(text, f"{node.name}.create_weights")
        if create is None or not any(vllm_code.calls(create, _WORKSPACE)):
            continue
        if init is not None and not any(vllm_code.calls(init, "select_wna16_moe_backend")):
            methods.add(node.name)
    return frozenset(methods)


def _uncounted_compute_units() -> str | None:
    """Why this platform cannot size Marlin's workspace (None: it can)."""
    from vllm.platforms import current_platform

    try:
        current_platform.num_compute_units()
    except NotImplementedError as exc:
        return str(exc).rstrip(".")
    return None


def patch_gptq_moe(module: ModuleType) -> None:
    original = module.get_moe_quant_method
    if getattr(original, _MARK, False):
        return
    workspace_methods = marlin_workspace_methods(module.__name__)

    @functools.wraps(original)
    def get_moe_quant_method(config: Any, layer: Any, prefix: str, moe_method_cls: type):
        bits = getattr(config, "weight_bits", None)
        try:
            method = original(config, layer, prefix, moe_method_cls)
        except NotImplementedError as exc:
            if NO_MOE_KERNEL not in str(exc) or envs.fallback_mode() == "off":
                raise
            if bits not in (2, 4, 8):
                raise
            reason = "no WNA16 MoE backend"
        else:
            if type(method).__name__ not in workspace_methods or envs.fallback_mode() == "off":
                return method
            uncounted = _uncounted_compute_units()
            if uncounted is None or bits not in (4, 8):
                return method
            reason = f"{type(method).__name__} needs Marlin's workspace ({uncounted})"
        logger.info(
            "gemma4_quant: %s: %s for GPTQ %d-bit experts here; building them unquantized "
            "(the checkpoint's experts are dequantized as they load)",
            prefix,
            reason,
            bits,
        )
        return module.UnquantizedFusedMoEMethod(layer.moe_config)

    setattr(get_moe_quant_method, _MARK, True)
    module.get_moe_quant_method = get_moe_quant_method

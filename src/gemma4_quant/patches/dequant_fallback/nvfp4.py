"""ModelOpt NVFP4 experts without a MoE kernel: dequantized once at load.

vLLM's NVFP4 MoE backends are GPU kernels (CUTLASS, FlashInfer, Marlin FP4, emulation
through Triton); on CPU ``select_nvfp4_moe_backend`` raises ``NotImplementedError: No
NvFp4 MoE backend supports the deployment configuration`` while the model is built, so
no ModelOpt NVFP4 MoE checkpoint (nvidia's Gemma 4 export) can be built there.

Where exactly that error is raised, the experts get ``ModelOptNvFp4DequantizedMoEMethod``: its
buffers are vLLM's own (``ModelOptNvFp4FusedMoE.create_weights``, on an instance that
skipped the backend selection), so vLLM's loader places weights, block scales, global
scales and input scales as it always does; ``process_weights_after_loading`` turns them
into ``(e2m1 * weight_scale) * weight_scale_2`` (``gemma4_quant.int4``: exact, rounded
once to the model dtype), frees them and hands over to ``UnquantizedFusedMoEMethod``.
The activations stay in the model dtype: the weight-only semantics of vLLM's own Marlin
NVFP4 path (GPUs without FP4 tensor cores); the checkpoint's ``input_scale`` (activation
quantization on Blackwell) is loaded and unused.
"""

from __future__ import annotations

import ast
import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ... import envs, vllm_code
from .. import vllm_source, wrap_once
from .common import COST_REPORT, _drop_params, _nbytes, keep_checkpoint_sizes

MODELOPT_MODULE = "vllm.model_executor.layers.quantization.modelopt"
_MODELOPT_FILE = "model_executor/layers/quantization/modelopt.py"
_ORACLE_FILE = "model_executor/layers/fused_moe/oracle/nvfp4.py"
NO_NVFP4_MOE_KERNEL = "No NvFp4 MoE backend supports the deployment configuration"
NO_NVFP4_LINEAR_KERNEL = "Failed to find a kernel that can implement the NVFP4 linear layer"
_MARK = "__gemma4_quant_nvfp4_fallback__"
_PARAMS = (
    "w13_weight",
    "w2_weight",
    "w13_weight_scale",
    "w2_weight_scale",
    "w13_weight_scale_2",
    "w2_weight_scale_2",
    "w13_input_scale",
    "w2_input_scale",
)


def nvfp4_moe_recognized() -> bool:
    """ModelOpt's NVFP4 MoE method asks the backend oracle in ``__init__`` and registers
    the checkpoint's tensors (weight, weight_scale, weight_scale_2, input_scale) in
    ``create_weights``, from ``quant_config``, ``moe`` and ``use_global_sf`` alone."""
    text = vllm_source(_MODELOPT_FILE)
    method = vllm_code.find_class(text, "ModelOptNvFp4FusedMoE")
    init = vllm_code.find_function(text, "ModelOptNvFp4FusedMoE.__init__")
    create = vllm_code.find_function(text, "ModelOptNvFp4FusedMoE.create_weights")
    oracle = vllm_code.parse(vllm_source(_ORACLE_FILE) or "")
    if method is None or init is None or create is None or oracle is None:
        return False
    registered = set(vllm_code.strings(create))
    used = {
        node.attr
        for node in ast.walk(create)
        if isinstance(node, ast.Attribute) and vllm_code.is_name(node.value, "self")
    }
    from . import _EXPERT_LOADERS

    loaders = (vllm_code.find_function(vllm_source(f), name) for f, name in _EXPERT_LOADERS)
    loader = next((found for found in loaders if found is not None), None)
    return (
        # the experts' loader takes ModelOpt's scale paths by the method's class name
        vllm_code.has_string(loader, "ModelOpt")
        and any(vllm_code.calls(init, "select_nvfp4_moe_backend"))
        and vllm_code.has_string(oracle, NO_NVFP4_MOE_KERNEL)
        and set(_PARAMS) <= registered
        and used <= {"quant_config", "moe", "use_global_sf"}
    )


def patch_modelopt(module: ModuleType) -> None:
    def make(original: Any) -> Any:
        def get_quant_method(self, layer, prefix: str):  # noqa: ANN001
            try:
                return original(self, layer, prefix)
            except NotImplementedError as exc:
                if NO_NVFP4_MOE_KERNEL not in str(exc) or envs.fallback_mode() == "off":
                    raise
                if getattr(layer, "moe_config", None) is None:
                    raise
                reason = str(exc)
            return dequantized_nvfp4_moe_method_class()(self, layer.moe_config, reason)

        return get_quant_method

    wrap_once(module.ModelOptNvFp4Config, "get_quant_method", _MARK, make)
    if callable(getattr(module, "init_nvfp4_linear_kernel", None)):
        wrap_once(module, "init_nvfp4_linear_kernel", _MARK, _make_linear_kernel_choice)


def _make_linear_kernel_choice(original: Any) -> Any:
    def init_nvfp4_linear_kernel(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except ValueError as exc:
            if NO_NVFP4_LINEAR_KERNEL not in str(exc) or envs.fallback_mode() == "off":
                raise
        return dequantized_nvfp4_linear_kernel_class()()

    return init_nvfp4_linear_kernel


@functools.cache
def dequantized_nvfp4_linear_kernel_class() -> type:
    """The NVFP4 linear kernel interface ModelOpt's linear method drives (process, apply,
    the input key fusion asks for), over vLLM's unquantized linear method."""
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from ... import int4

    class DequantizedNvFp4LinearKernel:
        """ModelOpt's NVFP4 linear tensors in, vLLM's unquantized linear out."""

        supports_pre_processed_weights = False

        def __init__(self) -> None:
            self.unquantized = UnquantizedLinearMethod()

        def input_quant_key(self) -> None:
            return None  # activations stay in the model dtype

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            # vLLM's method has turned weight_scale_2 (one per fused shard) into one
            # weight_global_scale, their maximum, which its own kernels use for every
            # shard; ModelOpt exports one value for shards that share an input
            global_scale = getattr(layer, "weight_global_scale", None)
            if global_scale is None:
                global_scale = layer.weight_scale_2.max()
            dtype = layer.params_dtype  # the model dtype (LinearBase keeps it)
            weight = int4.dequantize_modelopt_nvfp4(
                layer.weight.data, layer.weight_scale.data, global_scale.data, dtype
            )
            COST_REPORT.add(
                "linear layers",
                _nbytes(layer.weight) + _nbytes(layer.weight_scale),
                weight.numel() * weight.element_size(),
                f"{NO_NVFP4_LINEAR_KERNEL} (NVFP4 weights dequantized, activations stay in "
                "the model dtype)",
            )
            COST_REPORT.flush(dtype)
            for name in list(layer._parameters):
                if name in _LINEAR_PARAMS:
                    del layer._parameters[name]
            layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
            self.unquantized.process_weights_after_loading(layer)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            return self.unquantized.apply(layer, x, bias)

    return DequantizedNvFp4LinearKernel


# ModelOpt's NVFP4 linear parameters, as loaded and as its method renames them
_LINEAR_PARAMS = (
    "weight",
    "weight_scale",
    "weight_scale_2",
    "weight_global_scale",
    "input_scale",
    "input_global_scale",
    "input_global_scale_inv",
    "alpha",
)


@functools.cache
def dequantized_nvfp4_moe_method_class() -> type:
    """Built on first use: vLLM's MoE classes are only imported where a layer needs them."""
    import torch
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import (
        FusedMoEMethodBase,
    )
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4FusedMoE

    from ... import int4

    class ModelOptNvFp4DequantizedMoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's NVFP4 expert buffers in, vLLM's unquantized MoE out. The experts'
        weight loader takes ModelOpt's scale paths for methods whose class name says
        "ModelOpt", so this one's does."""

        def __init__(self, quant_config: Any, moe: Any, reason: str) -> None:
            super().__init__(moe)
            self.quant_config = quant_config
            self.reason = reason

        def uses_weight_scale_2_pattern(self) -> bool:
            return True  # the loader maps `weight_scale_2` names as for NVFP4 experts

        maybe_roundup_sizes = keep_checkpoint_sizes

        def create_weights(
            self,
            layer: torch.nn.Module,
            num_experts: int,
            hidden_size: int,
            intermediate_size_per_partition: int,
            params_dtype: torch.dtype,
            **extra_weight_attrs: Any,
        ) -> None:
            packed = ModelOptNvFp4FusedMoE.__new__(ModelOptNvFp4FusedMoE)
            FusedMoEMethodBase.__init__(packed, self.moe)
            packed.quant_config = self.quant_config
            packed.use_global_sf = False  # one input scale per local expert
            ModelOptNvFp4FusedMoE.create_weights(
                packed,
                layer,
                num_experts,
                hidden_size,
                intermediate_size_per_partition,
                params_dtype,
                **extra_weight_attrs,
            )
            numel = 2 * (layer.w13_weight.numel() + layer.w2_weight.numel())
            COST_REPORT.add(
                "MoE layers",
                sum(_nbytes(p) for n, p in layer.named_parameters() if n in _PARAMS),
                numel * params_dtype.itemsize,
                f"{self.reason} (NVFP4 experts: weights dequantized, activations stay in the "
                "model dtype, as on vLLM's Marlin FP4 path)",
            )

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if layer.w13_weight.dtype == torch.uint8:
                dtype = layer.params_dtype
                COST_REPORT.flush(dtype)
                weights = {"w13": self._w13(layer, dtype), "w2": self._w2(layer, dtype)}
                _drop_params(layer, _PARAMS)
                for stem, weight in weights.items():
                    layer.register_parameter(
                        f"{stem}_weight", torch.nn.Parameter(weight, requires_grad=False)
                    )
            super().process_weights_after_loading(layer)

        @staticmethod
        def _w13(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
            """[E, 2I, H]: gate rows [0, I) and up rows [I, 2I), each with its own global
            scale (``w13_weight_scale_2`` [E, 2])."""
            weight, scale = layer.w13_weight.data, layer.w13_weight_scale.data
            global_scale = layer.w13_weight_scale_2.data.reshape(weight.shape[0], -1)
            shards = global_scale.shape[1]
            rows = weight.shape[1] // shards
            return torch.cat(
                [
                    int4.dequantize_modelopt_nvfp4(
                        weight[:, s * rows : (s + 1) * rows],
                        scale[:, s * rows : (s + 1) * rows],
                        global_scale[:, s],
                        dtype,
                    )
                    for s in range(shards)
                ],
                dim=1,
            )

        @staticmethod
        def _w2(layer: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor:
            return int4.dequantize_modelopt_nvfp4(
                layer.w2_weight.data,
                layer.w2_weight_scale.data,
                layer.w2_weight_scale_2.data.reshape(-1),
                dtype,
            )

    return ModelOptNvFp4DequantizedMoEMethod

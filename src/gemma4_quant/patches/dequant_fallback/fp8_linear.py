"""compressed-tensors FP8 linears without a weight-only FP8 kernel: dequantized once at load.

On a platform without a compute capability (the CPU), 0.20 - 0.23 build compressed-tensors
FP8 linears (RedHatAI's ``gemma-4-26B-A4B-it-FP8-Dynamic``) with the weight-only scheme
``CompressedTensorsW8A16Fp8``, whose ``create_weights`` asks ``init_wfp8_a16_linear_kernel``
for a kernel. That list has Marlin FP8 for CUDA and nothing for the CPU (nor ROCm), so
construction stops: ``ValueError: Failed to find a kernel that can implement the ScaledMM
linear layer``. 0.24+ route FP8 on CPU through their W8A8 kernels instead. On 0.19 the
scheme runs Marlin FP8 itself, with no kernel choice: construction and loading pass on the
CPU, and repacking for Marlin then needs CUDA ops.

Where that selection raises exactly this error (0.19: on a platform without CUDA), the
scheme instead gets ``DequantizedFp8LinearKernel``: the scheme's own parameters load as
always (FP8 ``weight`` [N, K], per-channel or per-tensor ``weight_scale``, one per fused
shard), and processing turns them into ``weight * scale``
in the layer's dtype (exact in float32, rounded once: the values vLLM's Marlin FP8 path
computes with on GPUs without FP8), then vLLM's unquantized linear method serves the layer.
Activations stay in the model dtype: the scheme's own weight-only semantics. Block-scaled
weights keep vLLM's error. ``GEMMA4_QUANT_FALLBACK=force`` dequantizes wherever the scheme
runs, ``off`` never.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from ... import envs, vllm_code
from .. import vllm_source, wrap_once
from .common import COST_REPORT, install_unquantized, logger, route_to_kernel
from .fp8 import STRATEGIES

if TYPE_CHECKING:
    from types import ModuleType

    import torch

_CT = "model_executor/layers/quantization/compressed_tensors/"
SCHEME = "CompressedTensorsW8A16Fp8"
SCHEME_MODULE = (
    "vllm.model_executor.layers.quantization.compressed_tensors.schemes."
    "compressed_tensors_w8a16_fp8"
)
_SCHEME_FILE = _CT + "schemes/compressed_tensors_w8a16_fp8.py"
_KERNELS_FILE = "model_executor/kernels/linear/__init__.py"
_SELECT = "init_wfp8_a16_linear_kernel"
NO_SCALED_MM_KERNEL = "Failed to find a kernel that can implement the ScaledMM linear layer"
_MARK = "__gemma4_quant_fp8_linear_fallback__"
_DROP = ("weight", "weight_scale", "input_scale")


GENERATION_KERNEL = "kernel"  # the scheme takes a kernel from init_wfp8_a16_linear_kernel
GENERATION_MARLIN = "marlin"  # the scheme repacks for and runs Marlin FP8 itself (0.19)
_KERNEL_ATTR = "_gemma4_quant_fp8_kernel"


def ct_fp8_linear_generation() -> str | None:
    """How the W8A16 FP8 scheme, which registers ``weight`` and ``weight_scale``, runs its
    layers: through a kernel from ``init_wfp8_a16_linear_kernel`` (which raises the
    no-kernel error), or through Marlin FP8 calls of its own (None: neither)."""
    text = vllm_source(_SCHEME_FILE)
    create = vllm_code.find_function(text, f"{SCHEME}.create_weights")
    process = vllm_code.find_function(text, f"{SCHEME}.process_weights_after_loading")
    apply = vllm_code.find_function(text, f"{SCHEME}.apply_weights")
    if create is None or not {"weight", "weight_scale"} <= set(vllm_code.strings(create)):
        return None
    if _kernel_generation(create, process, apply):
        return GENERATION_KERNEL
    if (
        not vllm_code.assigns_self(create, "linear_kernel")
        and any(vllm_code.calls(process, "prepare_fp8_layer_for_marlin"))
        and any(vllm_code.calls(apply, "apply_fp8_marlin_linear"))
    ):
        return GENERATION_MARLIN
    return None


def _kernel_generation(create: Any, process: Any, apply: Any) -> bool:
    kernels = vllm_source(_KERNELS_FILE)
    return (
        vllm_code.assigns_self(create, "linear_kernel")
        and any(vllm_code.calls(create, _SELECT))
        and vllm_code.has_code(process, "self.linear_kernel.process_weights_after_loading(layer)")
        and vllm_code.has_code(apply, "self.linear_kernel.apply_weights")
        and vllm_code.find_function(kernels, _SELECT) is not None
        and vllm_code.has_string(vllm_code.parse(kernels or ""), NO_SCALED_MM_KERNEL[:40])
    )


def unsupported_key(weight_quant_key: Any) -> str | None:
    """Why the fallback does not reproduce weights of this quant key (None: it does)."""
    shape = getattr(getattr(weight_quant_key, "scale", None), "group_shape", None)
    if shape is not None and (shape.is_per_tensor() or shape.is_per_channel()):
        return None
    return f"FP8 weight scales {shape} (per-channel or per-tensor only)"


def patch_ct_fp8_linear(module: ModuleType) -> None:
    """``init_wfp8_a16_linear_kernel`` as the W8A16 FP8 scheme's module calls it."""

    def make(original: Any) -> Any:
        def init_wfp8_a16_linear_kernel(*args: Any, **kwargs: Any) -> Any:
            mode = envs.fallback_mode()
            if mode == "off":
                return original(*args, **kwargs)
            key = kwargs.get("weight_quant_key", args[0] if args else None)
            try:
                kernel = original(*args, **kwargs)
            except ValueError as exc:
                why_not = unsupported_key(key)
                if NO_SCALED_MM_KERNEL not in str(exc) or why_not is not None:
                    if why_not is not None:
                        logger.info("gemma4_quant: no dequantizing fallback: %s", why_not)
                    raise
                reason = str(exc).split(" Reasons:")[0]
            else:
                if mode != "force" or unsupported_key(key) is not None:
                    return kernel
                reason = "GEMMA4_QUANT_FALLBACK=force"
            shape = kwargs.get("weight_shape", args[2] if len(args) > 2 else None)
            dtype = kwargs.get("out_dtype", args[4] if len(args) > 4 else None)
            return dequantized_fp8_linear_kernel_class()(reason, tuple(shape), dtype)

        return init_wfp8_a16_linear_kernel

    wrap_once(module, _SELECT, _MARK, make)


def patch_marlin_scheme(module: ModuleType) -> None:
    """0.19: the scheme's own Marlin FP8 steps, replaced per layer where Marlin cannot run
    (no CUDA) by the dequantizing kernel, chosen when the layer is built."""
    scheme = getattr(module, SCHEME)

    def make_create(original: Any) -> Any:
        def create_weights(self: Any, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
            original(self, layer, *args, **kwargs)
            reason = _marlin_refusal(self)
            if reason is not None:
                kernel = dequantized_fp8_linear_kernel_class()
                setattr(self, _KERNEL_ATTR, kernel(reason, layer.weight.shape, layer.orig_dtype))

        return create_weights

    wrap_once(scheme, "create_weights", _MARK, make_create)
    route_to_kernel(scheme, "apply_weights", _MARK, lambda s: getattr(s, _KERNEL_ATTR, None))


def _marlin_refusal(scheme: Any) -> str | None:
    """Why the 0.19 scheme's Marlin FP8 cannot serve its layer here (None: it can, or the
    fallback does not reproduce the layer's weights)."""
    mode = envs.fallback_mode()
    if mode == "off":
        return None
    strategy = getattr(scheme.strategy, "value", scheme.strategy)
    if str(strategy).lower() not in STRATEGIES:
        logger.info("gemma4_quant: no dequantizing fallback: FP8 %s scales", strategy)
        return None
    if mode == "force":
        return "GEMMA4_QUANT_FALLBACK=force"
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return None
    return (
        "vLLM's weight-only FP8 scheme runs Marlin FP8 only, which needs CUDA "
        f"(platform: {current_platform.device_name})"
    )


@functools.cache
def dequantized_fp8_linear_kernel_class() -> type:
    """Built on first use: vLLM's linear classes are only imported where a layer needs it."""
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from ... import int4

    class DequantizedFp8LinearKernel:
        """The W8A16 FP8 scheme's tensors in, vLLM's unquantized linear out."""

        def __init__(
            self, reason: str, weight_shape: tuple[int, ...], dtype: torch.dtype | None
        ) -> None:
            self.unquantized = UnquantizedLinearMethod()
            self.reason = reason
            rows, cols = weight_shape
            itemsize = (dtype or torch.get_default_dtype()).itemsize
            COST_REPORT.add(
                "linear layers",
                rows * cols + rows * 4,  # FP8 weights, float32 channel scales
                rows * cols * itemsize,
                f"{reason} (FP8 linears: weights dequantized, activations stay in the model dtype)",
            )

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            dtype = getattr(layer, "orig_dtype", None) or torch.get_default_dtype()
            COST_REPORT.flush(dtype)
            weight, scale = layer.weight.data, layer.weight_scale.data
            rows = getattr(layer, "output_size_per_partition", weight.shape[0])
            cols = getattr(layer, "input_size_per_partition", weight.shape[-1])
            name = getattr(layer, "prefix", "") or type(layer).__name__
            if tuple(weight.shape) != (rows, cols):
                raise ValueError(
                    f"{name}.weight {tuple(weight.shape)}: expected ({rows}, {cols}), FP8 "
                    "rows of output channels"
                )
            widths = getattr(layer, "logical_widths", None) or [rows]
            if scale.dim() == 1 and scale.numel() == len(widths) > 1:
                # per-tensor scales of fused shards (0.19 leaves them for its kernel to widen)
                scale = scale.repeat_interleave(torch.tensor(widths, device=scale.device))
                scale = scale.unsqueeze(1)
            if scale.numel() == 1:
                scale = scale.reshape(1, 1)
            if tuple(scale.shape) not in ((rows, 1), (1, 1)):
                raise ValueError(
                    f"{name}.weight_scale {tuple(scale.shape)}: expected ({rows}, 1), one "
                    f"scale per output channel of weight {tuple(weight.shape)}"
                )
            dequantized = int4.dequantize_fp8(weight, scale, dtype=dtype)
            install_unquantized(layer, dequantized, _DROP, self.unquantized)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            return self.unquantized.apply(layer, x, bias)

    return DequantizedFp8LinearKernel

"""The MoE fallback: compressed-tensors WNA16 experts without a kernel are dequantized
into vLLM's unquantized MoE method (see the package docstring)."""

from __future__ import annotations

import functools
from fractions import Fraction
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ... import envs
from . import _MARK, GENERATION_BY_KERNEL, GENERATION_LEGACY, NO_MOE_KERNEL, SYMMETRIC_ONLY
from .common import COST_REPORT, _data, _drop_params, _nbytes, keep_checkpoint_sizes, logger

# --------------------------------------------------------------------- MoE


def patch_moe_factory(module: ModuleType, generation: str | None) -> None:
    factory_cls = module.CompressedTensorsMoEMethod
    original = factory_cls.get_moe_method
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_moe_method(quant_config, layer: torch.nn.Module, layer_name: str):
        mode = envs.fallback_mode()
        if mode == "off":
            return original(quant_config, layer, layer_name)
        try:
            method = original(quant_config, layer, layer_name)
        except (NotImplementedError, AssertionError) as exc:
            if NO_MOE_KERNEL not in str(exc) and SYMMETRIC_ONLY not in str(exc):
                raise
            fallback = _moe_fallback(quant_config, layer, layer_name, str(exc), generation)
            if fallback is None:
                raise
            return fallback
        reason = None
        if type(method).__name__ in _WNA16_METHODS:
            if mode == "force":
                reason = "GEMMA4_QUANT_FALLBACK=force"
            elif generation == GENERATION_LEGACY and _on_cpu():
                reason = f"{type(method).__name__} runs GPU kernels only (Marlin / Triton)"
        if reason is not None:
            fallback = _moe_fallback(quant_config, layer, layer_name, reason, generation)
            if fallback is not None:
                return fallback
        return method

    setattr(get_moe_method, _MARK, True)
    factory_cls.get_moe_method = staticmethod(get_moe_method)


# The methods whose buffers the fallback reproduces.
_WNA16_METHODS = ("CompressedTensorsWNA16MoEMethod", "CompressedTensorsWNA16MarlinMoEMethod")


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _moe_fallback(
    quant_config: Any,
    layer: torch.nn.Module,
    layer_name: str,
    reason: str,
    generation: str | None,
) -> Any:
    """The dequantizing method for this layer, or None if its scheme is not one we
    reproduce exactly (then vLLM's own outcome stands)."""
    weight_quant, input_quant = _moe_scheme(quant_config, layer, layer_name)
    why_not = unsupported_reason(weight_quant, input_quant)
    if why_not is not None:
        logger.info("gemma4_quant: no dequantizing fallback for %s: %s", layer_name, why_not)
        return None
    method_cls = _dequantized_moe_method_class()
    return method_cls(layer.moe_config, weight_quant, input_quant, reason, generation)


def _moe_scheme(quant_config: Any, layer: torch.nn.Module, layer_name: str) -> tuple[Any, Any]:
    """(weights, input_activations) QuantizationArgs of the experts, looked up as the
    factory does (it has already merged the MoE targets into the scheme map)."""
    proj = getattr(layer, "ckpt_down_proj_name", "down_proj")
    scheme = quant_config.get_scheme_dict(layer, f"{layer_name}.0.{proj}")
    if not scheme:
        return None, None
    return scheme.get("weights"), scheme.get("input_activations")


def _enum_name(value: object) -> str:
    return str(getattr(value, "value", value)).lower()


def unsupported_reason(weight_quant: Any, input_quant: Any) -> str | None:
    """Why the fallback cannot reproduce this scheme exactly (None: it can)."""
    if weight_quant is None:
        return "no weight quantization"
    if input_quant is not None:
        return "activations are quantized too"
    if _enum_name(weight_quant.type) != "int":
        return f"weight type {_enum_name(weight_quant.type)} is not int"
    if weight_quant.num_bits != 4:
        return f"{weight_quant.num_bits}-bit weights (only int4 is verified)"
    if _enum_name(weight_quant.strategy) not in ("group", "channel"):
        return f"strategy {_enum_name(weight_quant.strategy)}"
    if _enum_name(getattr(weight_quant, "actorder", None)) == "group":
        # activation-ordered groups need g_idx, which these buffers do not carry
        return "actorder group"
    return None


_PACKED_EXPERT_PARAMS = (
    "w13_weight_packed",
    "w2_weight_packed",
    "w13_weight_scale",
    "w2_weight_scale",
    "w13_weight_zero_point",
    "w2_weight_zero_point",
    "w13_weight_shape",
    "w2_weight_shape",
    "w13_weight_g_idx",
    "w2_weight_g_idx",
)


@functools.cache
def _dequantized_moe_method_class() -> type:
    """Built on first use: vLLM's MoE classes are only imported where a layer needs them."""
    import torch
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import (
        FusedMoEMethodBase,
    )
    from vllm.model_executor.utils import set_weight_attrs

    from ... import int4

    class DequantizedWNA16MoEMethod(UnquantizedFusedMoEMethod):
        """vLLM's packed WNA16 expert buffers in, vLLM's unquantized MoE out."""

        def __init__(
            self,
            moe: Any,
            weight_quant: Any,
            input_quant: Any,
            reason: str,
            generation: str | None,
        ) -> None:
            super().__init__(moe)
            self.weight_quant = weight_quant
            self.reason = reason
            self.generation = generation
            self.packed_layout = None
            if generation != GENERATION_LEGACY:
                self.packed_layout = self._packed_layout(moe, weight_quant, input_quant)

        @staticmethod
        def _packed_layout(moe: Any, weight_quant: Any, input_quant: Any) -> Any:
            """vLLM's own WNA16 method minus its kernel selection (the step that fails),
            used only for ``create_weights``: the attributes its ``__init__`` sets."""
            from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 import (  # noqa: E501
                CompressedTensorsWNA16MoEMethod,
            )

            method = CompressedTensorsWNA16MoEMethod.__new__(CompressedTensorsWNA16MoEMethod)
            FusedMoEMethodBase.__init__(method, moe)
            method.weight_quant = weight_quant
            method.input_quant = input_quant
            method.symmetric = weight_quant.symmetric
            method.num_bits = weight_quant.num_bits
            method.packed_factor = Fraction(32, weight_quant.num_bits)
            method.strategy = weight_quant.strategy
            group_size = weight_quant.group_size
            method.group_size = -1 if group_size is None else group_size
            # N-first [E, N, K / pack] is the checkpoint's own layout: vLLM's loader
            # copies it without transposing, whatever kernel would have run.
            method.is_transposed = False
            method.input_dtype = None
            return method

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
            # (experts, hidden, expert intermediate of this rank)
            sizes = (num_experts, hidden_size, intermediate_size_per_partition)
            if self.packed_layout is None:
                self._create_packed(layer, sizes, params_dtype, extra_weight_attrs)
            else:
                self._create_as_vllm(layer, sizes, params_dtype, extra_weight_attrs)
            COST_REPORT.add(
                "MoE layers",
                sum(_nbytes(p) for n, p in layer.named_parameters() if n in _PACKED_EXPERT_PARAMS),
                self._dequantized_bytes(layer, params_dtype),
                self.reason,
            )

        def _create_as_vllm(
            self, layer: torch.nn.Module, sizes: tuple[int, int, int], params_dtype: Any, attrs: Any
        ) -> None:
            """vLLM's own WNA16 buffers, placed by vLLM's loader as usual."""
            packed = self.packed_layout
            own_zero_points = not packed.symmetric and self.generation == GENERATION_BY_KERNEL
            if own_zero_points:
                # This generation only knows K-first (Marlin) zero points: build the
                # rest as vLLM does and add N-first zero points below.
                packed.symmetric = True
            try:
                packed.create_weights(layer, *sizes, params_dtype, **attrs)
            finally:
                packed.symmetric = self.weight_quant.symmetric
            if own_zero_points:
                self._create_zero_points(layer, attrs)

        def _create_packed(
            self, layer: torch.nn.Module, sizes: tuple[int, int, int], params_dtype: Any, attrs: Any
        ) -> None:
            """The checkpoint's own N-first layout, where vLLM's WNA16 buffers are K-first
            and symmetric-only: packed [E, N, K / pack], scales [E, N, K / group], zero
            points [E, N / pack, K / group], shapes [E, 2]. FusedMoE's loader shards them
            along N (w13) or K (w2) as it does any N-first expert weight."""
            wq = self.weight_quant
            num_experts, hidden, inter = sizes
            pack = 32 // wq.num_bits
            group = wq.group_size if wq.group_size not in (None, -1) else None
            attrs = {**attrs, "is_transposed": False, "quant_method": wq.strategy}
            w13_n = (2 if self.moe.is_act_and_mul else 1) * inter
            for stem, n, k in (("w13", w13_n, hidden), ("w2", hidden, inter)):
                groups = 1 if group is None else k // group
                shapes = {
                    "weight_packed": ((num_experts, n, k // pack), torch.int32),
                    "weight_scale": ((num_experts, n, groups), params_dtype),
                    "weight_shape": ((num_experts, 2), torch.int64),
                }
                for suffix, (shape, dtype) in shapes.items():
                    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
                    layer.register_parameter(f"{stem}_{suffix}", param)
                    set_weight_attrs(param, attrs)
            if not wq.symmetric:
                self._create_zero_points(layer, attrs)

        def _create_zero_points(self, layer: torch.nn.Module, attrs: dict[str, Any]) -> None:
            """N-first zero points [E, N / pack, K / group], shaped after the scales."""
            pack = 32 // self.weight_quant.num_bits
            attrs = {**attrs, "is_transposed": False, "quant_method": self.weight_quant.strategy}
            for stem in ("w13", "w2"):
                num_experts, rows, groups = getattr(layer, f"{stem}_weight_scale").shape
                zp = torch.nn.Parameter(
                    torch.zeros(num_experts, rows // pack, groups, dtype=torch.int32),
                    requires_grad=False,
                )
                layer.register_parameter(f"{stem}_weight_zero_point", zp)
                set_weight_attrs(zp, attrs)

        def _dequantized_bytes(self, layer: torch.nn.Module, dtype: torch.dtype) -> int:
            pack = 32 // self.weight_quant.num_bits
            numel = layer.w13_weight_packed.numel() + layer.w2_weight_packed.numel()
            return numel * pack * dtype.itemsize

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            if getattr(layer, "w13_weight_packed", None) is not None:
                dtype = layer.w13_weight_scale.dtype  # the model dtype (params_dtype)
                COST_REPORT.flush(dtype)
                self._dequantize(layer, dtype)
            super().process_weights_after_loading(layer)

        def _dequantize(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
            weights = {
                stem: int4.dequantize_packed(
                    getattr(layer, f"{stem}_weight_packed").data,
                    getattr(layer, f"{stem}_weight_scale").data,
                    _data(getattr(layer, f"{stem}_weight_zero_point", None)),
                    num_bits=self.weight_quant.num_bits,
                    dtype=dtype,
                )
                for stem in ("w13", "w2")
            }
            _drop_params(layer, _PACKED_EXPERT_PARAMS)
            for stem, weight in weights.items():
                layer.register_parameter(
                    f"{stem}_weight", torch.nn.Parameter(weight, requires_grad=False)
                )

    return DequantizedWNA16MoEMethod

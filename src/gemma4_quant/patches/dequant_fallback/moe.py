"""The MoE fallback: compressed-tensors WNA16 experts without a kernel are dequantized
into vLLM's unquantized MoE method (see the package docstring)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from fractions import Fraction
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ... import envs
from . import _MARK, GENERATION_BY_KERNEL, GENERATION_LEGACY, NO_MOE_KERNEL, SYMMETRIC_ONLY
from .common import (
    COST_REPORT,
    _data,
    _nbytes,
    install_unquantized_experts,
    keep_checkpoint_sizes,
    logger,
)

# --------------------------------------------------------------------- MoE

# Integer widths the fallback unpacks (compressed-tensors pack-quantized: 8 or 4 values to
# an int32 word), the widths of vLLM's WNA16 MoE method.
PACKED_BITS = (4, 8)


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
            reason = str(exc)
            if NO_MOE_KERNEL not in reason and SYMMETRIC_ONLY not in reason:
                # 0.23 - 0.29: the Marlin method's constructor asserts what its GPU kernel
                # takes (int8 experts: per-channel only); on CPU no such kernel runs
                if not (isinstance(exc, AssertionError) and _on_cpu()):
                    raise
                reason = f"vLLM's WNA16 MoE method refuses this scheme (AssertionError {reason})"
            fallback = _moe_fallback(quant_config, layer, layer_name, reason, generation)
            if fallback is None:
                raise
            return fallback
        reason = None
        if type(method).__name__ in _WNA16_METHODS:
            if mode == "force":
                reason = "GEMMA4_QUANT_FALLBACK=force"
            elif generation == GENERATION_LEGACY and _on_cpu():
                reason = f"{type(method).__name__} runs GPU kernels only (Marlin / Triton)"
            else:
                # vLLM refuses these shards (0.30+) or loads them with the wrong scale
                # groups (before): decided from the layer's own per-rank size
                weight_quant, _ = _moe_scheme(quant_config, layer, layer_name)
                reason = split_groups(layer.moe_config, weight_quant)
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
    split = split_groups(layer.moe_config, weight_quant) if why_not is None else None
    if split is not None:
        per_rank = layer.moe_config.intermediate_size_per_partition
        why_not = GroupWindow.refusal(per_rank, weight_quant.num_bits)
        if split not in reason:
            reason = " ".join(reason.split()).rstrip(".") + f"; {split}"
    if why_not is not None:
        logger.info("gemma4_quant: no dequantizing fallback for %s: %s", layer_name, why_not)
        return None
    method_cls = _dequantized_moe_method_class()
    return method_cls(layer.moe_config, weight_quant, input_quant, reason, generation, layer_name)


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


def _group(weight_quant: Any) -> int | None:
    """The group size of grouped weights (None: per channel, or no scheme)."""
    if weight_quant is None or _enum_name(weight_quant.strategy) != "group":
        return None
    group = weight_quant.group_size
    return group if group and group > 0 else None


def split_groups(moe: Any, weight_quant: Any) -> str | None:
    """Why this rank's share of the experts' intermediate dim cuts a scale group (None:
    it holds whole groups). The down projection's input columns are that dim: vLLM
    0.30+ refuses such shards ("Scale groups would otherwise cross TP shard
    boundaries"), earlier releases give every rank ``per_rank // group`` scale columns
    from column ``rank * (per_rank // group)``, the wrong groups past the first cut."""
    group = _group(weight_quant)
    per_rank, tp = moe.intermediate_size_per_partition, moe.tp_size
    if group is None or tp == 1 or per_rank % group == 0:
        return None
    return (
        f"expert intermediate {per_rank * tp} / TP {tp} = {per_rank} per rank is not a "
        f"whole number of groups of {group}"
    )


@dataclass(frozen=True)
class GroupWindow:
    """The scale groups one rank's block of down_proj input columns lies in, where a TP
    shard splits a group: the rank's columns [start, start + width) of the intermediate
    dim lie in groups [first, first + count), starting ``offset`` columns into the first.
    The rank loads those groups whole (the neighbouring rank loads the shared group too)
    and dequantizes its own columns of them."""

    first: int
    count: int
    offset: int

    @classmethod
    def of(cls, moe: Any, group: int) -> GroupWindow:
        width = moe.intermediate_size_per_partition
        start = moe.tp_rank * width
        first = start // group
        return cls(first, -(-(start + width) // group) - first, start - first * group)

    @staticmethod
    def refusal(per_rank: int, bits: int) -> str | None:
        """Why a split layer cannot be served this way (None: it can): the packed words,
        and an asymmetric layer's zero points packed along gate/up rows, still shard
        along the intermediate dim as vLLM's loader cuts them, in whole words."""
        pack = 32 // bits
        if per_rank % pack:
            return f"{per_rank} intermediate columns per rank do not fill words of {pack}"
        return None


def unsupported_reason(weight_quant: Any, input_quant: Any) -> str | None:
    """Why the fallback cannot reproduce this scheme exactly (None: it can)."""
    if weight_quant is None:
        return "no weight quantization"
    if input_quant is not None:
        return "activations are quantized too"
    if _enum_name(weight_quant.type) != "int":
        return f"weight type {_enum_name(weight_quant.type)} is not int"
    if weight_quant.num_bits not in PACKED_BITS:
        return f"{weight_quant.num_bits}-bit weights (int4 and int8 are verified)"
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
            layer_name: str = "",
        ) -> None:
            super().__init__(moe)
            self.weight_quant = weight_quant
            self.reason = reason
            self.generation = generation
            self.layer_name = layer_name
            self.window = None
            if split_groups(moe, weight_quant) is not None:
                self.window = GroupWindow.of(moe, _group(weight_quant))
            self.packed_layout = None
            if generation != GENERATION_LEGACY and self.window is None:
                # vLLM's own buffers (its create_weights refuses split groups: those
                # layers take the fallback's own N-first buffers below)
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
            # 0.27 - 0.29's create_weights sizes the w2 scales by it
            method.actorder = getattr(weight_quant, "actorder", None)
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
                self.layer_name,
            )

        def _create_as_vllm(
            self, layer: torch.nn.Module, sizes: tuple[int, int, int], params_dtype: Any, attrs: Any
        ) -> None:
            """vLLM's own WNA16 buffers, placed by vLLM's loader as usual."""
            packed = self.packed_layout
            # 0.26 - 0.29: the experts layer passes the unsharded intermediate size to the
            # WNA16 methods it knows by class name, which this one is not, and those
            # methods require it
            needs_full_size = getattr(layer, "_needs_intermediate_size_param", None)
            if needs_full_size is not None and needs_full_size(packed):
                attrs = {"intermediate_size_full": layer.moe_config.intermediate_size, **attrs}
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
            and symmetric-only, or refuse a TP shard that splits a group: packed
            [E, N, K / pack], scales [E, N, K / group], zero points [E, N / pack,
            K / group], shapes [E, 2]. FusedMoE's loader shards them along N (w13) or K
            (w2) as it does any N-first expert weight; where the shard splits a group,
            w2's scales and zero points hold the rank's ``GroupWindow`` and load it."""
            wq = self.weight_quant
            num_experts, hidden, inter = sizes
            pack = 32 // wq.num_bits
            group = _group(wq)
            attrs = {**attrs, "is_transposed": False, "quant_method": wq.strategy}
            w13_n = (2 if self.moe.is_act_and_mul else 1) * inter
            for stem, n, k in (("w13", w13_n, hidden), ("w2", hidden, inter)):
                groups = 1 if group is None else k // group
                if stem == "w2" and self.window is not None:
                    groups = self.window.count
                shapes = {
                    "weight_packed": ((num_experts, n, k // pack), torch.int32),
                    "weight_scale": ((num_experts, n, groups), params_dtype),
                    "weight_shape": ((num_experts, 2), torch.int64),
                }
                for suffix, (shape, dtype) in shapes.items():
                    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=False)
                    layer.register_parameter(f"{stem}_{suffix}", param)
                    set_weight_attrs(param, self._attrs(layer, f"{stem}_{suffix}", attrs))
            if not wq.symmetric:
                self._create_zero_points(layer, attrs)

        def _attrs(self, layer: torch.nn.Module, name: str, attrs: dict[str, Any]) -> dict:
            """A parameter's weight attributes: the window's loader for w2's group
            tensors where the shard splits a group, vLLM's own attributes otherwise."""
            if self.window is None or name not in ("w2_weight_scale", "w2_weight_zero_point"):
                return attrs
            return {**attrs, "weight_loader": self._window_loader(layer, name)}

        def _window_loader(self, layer: torch.nn.Module, name: str) -> Any:
            """Loads the checkpoint's groups [first, first + count) of every row whole:
            vLLM's loader would cut ``count`` groups from group ``rank * count``."""
            window = self.window
            to_local = getattr(layer, "_map_global_expert_id_to_local_expert_id", None)

            def load(
                param: torch.nn.Parameter,
                loaded_weight: torch.Tensor,
                weight_name: str = "",
                shard_id: str = "w2",
                expert_id: int = 0,
                return_success: bool = False,
                **_: Any,
            ) -> bool | None:
                groups = loaded_weight.shape[-1]
                if window.first + window.count > groups:
                    raise ValueError(
                        f"{weight_name or name}: {groups} groups along the expert "
                        f"intermediate dim, but TP rank {self.moe.tp_rank} needs groups "
                        f"{window.first} - {window.first + window.count - 1} "
                        f"(shape {tuple(loaded_weight.shape)})"
                    )
                part = loaded_weight.narrow(-1, window.first, window.count)
                if loaded_weight.dim() == param.dim():  # every expert at once
                    param.data.copy_(part)
                    return True if return_success else None
                # MoE tensor parallel keeps every expert on every rank; the layer's own
                # map is asked all the same
                local = expert_id if to_local is None else to_local(expert_id)
                if local < 0:
                    return False if return_success else None
                param.data[local].copy_(part)
                return True if return_success else None

            return load

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
                name = f"{stem}_weight_zero_point"
                layer.register_parameter(name, zp)
                set_weight_attrs(zp, self._attrs(layer, name, attrs))

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
            weights = {}
            for stem in ("w13", "w2"):
                args = (
                    getattr(layer, f"{stem}_weight_packed").data,
                    getattr(layer, f"{stem}_weight_scale").data,
                    _data(getattr(layer, f"{stem}_weight_zero_point", None)),
                )
                bits = self.weight_quant.num_bits
                if stem == "w2" and self.window is not None:
                    weights[stem] = int4.dequantize_packed_columns(
                        *args,
                        group_size=_group(self.weight_quant),
                        offset=self.window.offset,
                        num_bits=bits,
                        dtype=dtype,
                    )
                else:
                    weights[stem] = int4.dequantize_packed(*args, num_bits=bits, dtype=dtype)
            install_unquantized_experts(layer, weights, _PACKED_EXPERT_PARAMS)

    return DequantizedWNA16MoEMethod

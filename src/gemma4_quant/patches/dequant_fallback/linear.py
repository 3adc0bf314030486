"""The linear fallback: WNA16 linears (compressed-tensors, AutoGPTQ) without a usable
kernel are dequantized into vLLM's unquantized linear method (see the package docstring)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from ... import envs
from .. import wrap_once
from . import _KERNEL_OPS, _MARK, NO_LINEAR_KERNEL
from .common import COST_REPORT, _data, install_unquantized
from .moe import PACKED_BITS

# --------------------------------------------------------------------- linear


def patch_linear_scheme(
    module: ModuleType, zero_points: bool = True, widths: tuple[int, ...] = PACKED_BITS
) -> None:
    """Wrap ``module.choose_mp_linear_kernel`` (the name the scheme's module calls);
    ``zero_points=False``: configs with zero points keep vLLM's kernel choice; ``widths``:
    the integer widths this scheme's layers are dequantized at."""

    def supported(config: Any) -> bool:
        return (
            _linear_supported(config)
            and config.weight_type.size_bits in widths
            and (zero_points or not config.zero_points)
        )

    def make(original: Callable) -> Callable:
        def choose_mp_linear_kernel(config: Any, *args: Any, **kwargs: Any) -> type:
            mode = envs.fallback_mode()
            if mode == "off":
                return original(config, *args, **kwargs)
            try:
                kernel = original(config, *args, **kwargs)
            except ValueError as exc:
                if NO_LINEAR_KERNEL not in str(exc) or not supported(config):
                    raise
                return _dequantized_linear_kernel(str(exc).split(" Reasons:")[0])
            if not supported(config):
                return kernel
            if mode == "force":
                return _dequantized_linear_kernel("GEMMA4_QUANT_FALLBACK=force")
            missing = _missing_op(kernel)
            if missing is not None:
                return _dequantized_linear_kernel(
                    f"vLLM picked {kernel.__name__}, but its op torch.ops._C.{missing} is "
                    "not in the vLLM kernel library this CPU loads"
                )
            return kernel

        return choose_mp_linear_kernel

    wrap_once(module, "choose_mp_linear_kernel", _MARK, make)


def _linear_supported(config: Any) -> bool:
    """Integer 4- or 8-bit weights (with or without zero points): the values we reproduce."""
    weight_type = config.weight_type
    return weight_type.size_bits in PACKED_BITS and not weight_type.is_floating_point()


def _missing_op(kernel: type) -> str | None:
    """The op of ``kernel`` that the loaded vLLM extension lacks, if any."""
    import torch

    op = _KERNEL_OPS.get(kernel.__name__)
    if op is None:
        return None
    import vllm._custom_ops  # noqa: F401  (loads the platform's kernel library)

    return None if hasattr(torch.ops._C, op) else op


@functools.cache
def _dequantized_linear_kernel(reason: str) -> type:
    """A mixed-precision linear kernel class that dequantizes at load (one per reason)."""
    import torch
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearKernel,
    )
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from ... import int4

    class DequantizedLinearKernel(MPLinearKernel):
        """The scheme's packed parameters in, vLLM's unquantized linear out."""

        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c: Any) -> tuple[bool, str | None]:
            if not _linear_supported(c):
                return False, f"{c.weight_type} is not a 4- or 8-bit integer type"
            if getattr(c, "has_g_idx", False):
                # activation-ordered groups: the weight's columns need g_idx to regroup
                return False, "activation order (g_idx) is not dequantized"
            return True, None

        def __init__(self, c: Any, *param_names: str | None, **named: str | None) -> None:
            # the parameter names vLLM passes (0.19 - 0.29 add w_gidx_param_name)
            super().__init__(c, *param_names, **named)
            self.unquantized = UnquantizedLinearMethod()
            in_features, out_features = c.partition_weight_shape
            itemsize = torch.empty((), dtype=c.act_type).element_size()
            groups = 1 if c.group_size in (-1, None) else in_features // c.group_size
            bits = c.weight_type.size_bits
            packed = out_features * in_features * bits // 8 + out_features * groups * itemsize
            if c.zero_points:
                packed += out_features * groups * bits // 8
            COST_REPORT.add("linear layers", packed, out_features * in_features * itemsize, reason)

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            w_q, w_s, w_zp = self._get_weight_params(layer)[:3]  # 0.19 - 0.29 add g_idx
            dtype = w_s.dtype  # the model dtype (params_dtype)
            COST_REPORT.flush(dtype)
            packed, scale = w_q.data, w_s.data
            zero_point = _data(w_zp) if self.config.zero_points else None
            if getattr(w_q, "input_dim", 1) == 0:
                # GPTQ: qweight [K / pack, N] packed along K, scales [G, N]; transposed,
                # the N-first layout int4.dequantize_packed reads (value k of word w is input
                # pack * w + k in both)
                if zero_point is not None:
                    raise ValueError("K-first packed weights with zero points")
                packed, scale = packed.t().contiguous(), scale.t().contiguous()
            bits = self.config.weight_type.size_bits
            weight = int4.dequantize_packed(packed, scale, zero_point, num_bits=bits, dtype=dtype)
            quantized = (self.w_q_name, self.w_s_name, self.w_zp_name or "")
            drop = (*quantized, "weight_shape", "weight_g_idx")
            install_unquantized(layer, weight, drop, self.unquantized)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            return self.unquantized.apply(layer, x, bias)

    DequantizedLinearKernel.reason = reason
    return DequantizedLinearKernel

"""Quantized layers that vLLM has no kernel for are dequantized once at load time.

Why:
    vLLM refuses to build a compressed-tensors W4A16 MoE layer whenever none of its WNA16
    MoE kernels fits the deployment: on CPUs without AMX, for asymmetric int4, for group
    size 32 (``cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit``), for GELU on older CPU kernels.
    Construction dies with ``NotImplementedError: No WNA16 MoE backend supports the
    deployment configuration`` (``select_wna16_moe_backend``), so the checkpoint cannot
    be served at all there; forcing the CPU int4 MoE kernel gives wrong numbers. Quantized
    linears fail the same way where no mixed-precision kernel fits (``ValueError: Failed
    to find a kernel that can implement the WNA16 linear layer``; Hopper with K = 2112),
    and on x86 CPUs without AVX-512 vLLM picks ``CPUWNA16LinearKernel`` although its op
    ``torch.ops._C.cpu_gemm_wna16`` is not in the AVX2 build of its extension, so the
    server starts and dies on the first request.

How:
    Dequantize-on-load, only where vLLM finds no kernel (``GEMMA4_QUANT_FALLBACK=auto``,
    the default), everywhere (``force``) or nowhere (``off``: vLLM's own error stands).
    - MoE: ``CompressedTensorsMoEMethod.get_moe_method`` (the compressed-tensors MoE
      method factory) is wrapped; where it raises exactly the no-backend error, the layer
      gets ``DequantizedWNA16MoEMethod``. Its ``create_weights`` is vLLM's own
      ``CompressedTensorsWNA16MoEMethod.create_weights`` (on an instance that skipped the
      kernel selection), so vLLM's loader places packed / scale / zero-point tensors
      exactly as usual; ``process_weights_after_loading`` dequantizes them once into
      ``w13_weight`` / ``w2_weight``, frees them, and hands over to
      ``UnquantizedFusedMoEMethod`` (its base class): vLLM's unquantized MoE path of the
      current platform.
    - Linear: ``choose_mp_linear_kernel`` as the compressed-tensors WNA16 scheme calls it
      is wrapped, and as ``AutoGPTQLinearMethod`` calls it (the linears of AutoRound / INC
      GPTQ checkpoints on 0.30+; symmetric only, where its kernels ignore ``qzeros``);
      where it raises the no-kernel error (or picks a CPU kernel whose op is missing), it
      returns ``DequantizedLinearKernel``, which keeps the method's packed parameters
      (N-first ``weight_packed`` or K-first GPTQ ``qweight``, read from their layout
      attributes), dequantizes them into ``weight`` and runs ``UnquantizedLinearMethod``.
    Values are ``(q - zero_point) * scale`` in float32, rounded once to the model dtype:
    the checkpoint's exact values. One warning per loaded model says why and what it
    costs (bytes of dequantized weights vs packed).

Upstream PR:
    None yet. Upstream's nearest is the ``EMULATION`` WNA16 MoE backend (GPU only,
    Triton); a dequantizing fallback in ``select_wna16_moe_backend`` /
    ``choose_mp_linear_kernel`` and an op check in ``CPUWNA16LinearKernel.can_implement``
    would remove this patch.

Releases:
    0.31.0 - 0.33.0 (packed expert buffers always in the checkpoint's N-first layout);
    0.30.0 (layout chosen from the kernel: the fallback pins the N-first layout and
    allocates N-first zero points itself). Earlier releases build compressed-tensors MoE
    layers differently: UNRECOGNIZED. AutoGPTQ linears wherever ``AutoGPTQLinearMethod``
    picks a mixed-precision kernel for K-first ``qweight`` (0.30.0 - 0.32.0). Detected from
    the code, never from the version.

Removal:
    When every supported release falls back by itself where no WNA16 kernel fits.
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .. import envs
from . import Detection, vllm_source, when_imported

NAME = "dequant_fallback"
SUMMARY = "quantized MoE experts / linears without a vLLM kernel are dequantized at load"

logger = logging.getLogger("vllm.gemma4_quant")

_CT = "model_executor/layers/quantization/compressed_tensors/"
_CT_MODULE = "vllm.model_executor.layers.quantization.compressed_tensors."
FACTORY_MODULE = _CT_MODULE + "compressed_tensors_moe.compressed_tensors_moe"
LINEAR_SCHEME_MODULE = _CT_MODULE + "schemes.compressed_tensors_wNa16"
GPTQ_LINEAR_MODULE = "vllm.model_executor.layers.quantization.auto_gptq"
_FACTORY_FILE = _CT + "compressed_tensors_moe/compressed_tensors_moe.py"
_WNA16_MOE_FILE = _CT + "compressed_tensors_moe/compressed_tensors_moe_wna16.py"
_LINEAR_SCHEME_FILE = _CT + "schemes/compressed_tensors_wNa16.py"
_GPTQ_LINEAR_FILE = "model_executor/layers/quantization/auto_gptq.py"
_ORACLE_FILE = "model_executor/layers/fused_moe/oracle/int_wna16.py"
_UNQUANTIZED_MOE_FILE = "model_executor/layers/fused_moe/unquantized_fused_moe_method.py"
_LINEAR_KERNELS_FILE = "model_executor/kernels/linear/__init__.py"
_MP_KERNEL_FILE = "model_executor/kernels/linear/mixed_precision/MPLinearKernel.py"

# The errors vLLM raises when no kernel fits; the only failures the fallback catches.
NO_MOE_KERNEL = "No WNA16 MoE backend supports the deployment configuration"
NO_LINEAR_KERNEL = "Failed to find a kernel that can implement the WNA16 linear layer"
_MARK = "__gemma4_quant_dequant_fallback__"

# Packed expert buffers: N-first [E, N, K / pack] on every build (0.31+), or chosen
# from the selected kernel's layout (0.30: "Marlin" K-first / "Flashinfer" N-first).
_N_FIRST = '"w13_weight": (num_experts, w13_n, hidden_size // pf)'
_LAYOUT_BY_KERNEL = 'backend_key = "Marlin" if self.is_transposed else "Flashinfer"'

GENERATION_N_FIRST = "n-first"
GENERATION_BY_KERNEL = "layout-by-kernel"

# Kernels vLLM may pick although their op is missing from the extension it loaded.
_KERNEL_OPS = {"CPUWNA16LinearKernel": "cpu_gemm_wna16"}


# --------------------------------------------------------------------- detection


def _moe_generation() -> tuple[str | None, str]:
    """Which compressed-tensors WNA16 MoE code the installed vLLM has, and how we know."""
    factory = vllm_source(_FACTORY_FILE)
    wna16 = vllm_source(_WNA16_MOE_FILE)
    oracle = vllm_source(_ORACLE_FILE)
    unquantized = vllm_source(_UNQUANTIZED_MOE_FILE)
    if factory is None or "def get_moe_method(" not in factory:
        return None, "no CompressedTensorsMoEMethod.get_moe_method"
    if wna16 is None or "class CompressedTensorsWNA16MoEMethod" not in wna16:
        return None, "no CompressedTensorsWNA16MoEMethod"
    if "select_wna16_moe_backend(" not in wna16:
        return None, "CompressedTensorsWNA16MoEMethod selects no WNA16 MoE backend"
    if oracle is None or NO_MOE_KERNEL not in oracle:
        return None, "select_wna16_moe_backend has no 'no backend' error"
    if unquantized is None or "def process_weights_after_loading" not in unquantized:
        return None, "no UnquantizedFusedMoEMethod.process_weights_after_loading"
    for needed in ('"w13_weight_packed"', '"w2_weight_packed"', '"w13_weight_scale"'):
        if needed not in wna16:
            return None, f"CompressedTensorsWNA16MoEMethod registers no {needed}"
    if _N_FIRST in wna16:
        return GENERATION_N_FIRST, "WNA16 MoE buffers are N-first"
    if _LAYOUT_BY_KERNEL in wna16:
        return GENERATION_BY_KERNEL, "WNA16 MoE buffer layout follows the kernel"
    return None, "unknown CompressedTensorsWNA16MoEMethod.get_weight_shape"


def _linear_recognized() -> bool:
    scheme = vllm_source(_LINEAR_SCHEME_FILE) or ""
    kernels = vllm_source(_LINEAR_KERNELS_FILE) or ""
    base = vllm_source(_MP_KERNEL_FILE) or ""
    return (
        "kernel_type = choose_mp_linear_kernel(" in scheme
        and "Failed to find a kernel that can implement the " in kernels
        and "def apply_weights(" in base
    )


def _gptq_linear_recognized() -> bool:
    """``AutoGPTQLinearMethod`` (AutoRound / INC GPTQ linears) picks a mixed-precision
    kernel for K-first ``qweight`` [K / pack, N] and ``scales`` [G, N]."""
    text = vllm_source(_GPTQ_LINEAR_FILE) or ""
    method = text.split("class AutoGPTQLinearMethod", 1)[-1].split("\nclass ", 1)[0]
    return (
        _linear_recognized()
        and "kernel_type = choose_mp_linear_kernel(" in method
        and re.search(r"input_dim=0,\s*output_dim=1,\s*packed_dim=0,", method) is not None
    )


def detect() -> Detection:
    generation, why = _moe_generation()
    if generation is None:
        return Detection.unrecognized(why)
    linear = ""
    if _linear_recognized():
        linear = (
            "and WNA16 linears (compressed-tensors, AutoGPTQ) "
            if _gptq_linear_recognized()
            else "and WNA16 linears "
        )
    return Detection.needed(f"{why}; dequantize experts {linear}where no kernel fits")


def apply() -> None:
    generation, _ = _moe_generation()
    when_imported(FACTORY_MODULE, functools.partial(_patch_moe_factory, generation=generation))
    if _linear_recognized():
        when_imported(LINEAR_SCHEME_MODULE, _patch_linear_scheme)
    if _gptq_linear_recognized():
        # AutoGPTQLinearMethod builds symmetric configs only (zero_points=False); its
        # kernels never read qzeros, and neither does the fallback.
        when_imported(
            GPTQ_LINEAR_MODULE, functools.partial(_patch_linear_scheme, zero_points=False)
        )


# --------------------------------------------------------------------- dequantization


def dequantize_int(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """compressed-tensors pack-quantized weights -> ``dtype``, exactly.

    ``packed`` int32 [N, K / pack] (value k of word w is column pack * w + k, stored
    with the offset 2**(bits - 1)), ``scale`` [N, G] (group = K / G), ``zero_point``
    int32 [N / pack, G] packed along N with the same offset, or None (symmetric).
    Returns ``(q - zp) * scale`` [N, K], written into ``out`` if given.

    Exact: ``q - zp`` is a small integer, so its product with a 16-bit float scale is
    exact in float32, and rounding it once to ``dtype`` gives the checkpoint's value bit
    for bit. Where ``dtype`` is the scale's own 16-bit type the product is computed in
    it directly: IEEE multiplication rounds the exact product once, the same value.
    """
    import torch

    pack = 32 // num_bits
    mask = (1 << num_bits) - 1
    rows, groups = packed.shape[0], scale.shape[-1]
    shifts = torch.arange(pack, dtype=torch.int32, device=packed.device) * num_bits
    # In place where possible, and scales broadcast over their group instead of being
    # repeated: this runs over every expert weight of the model at load time.
    q = packed.unsqueeze(-1) >> shifts  # [N, K / pack, pack]
    q &= mask
    q = q.view(rows, groups, -1)  # [N, G, group]
    if zero_point is None:
        q -= 1 << (num_bits - 1)  # the storage offset is the zero point
    else:
        zp = (zero_point.unsqueeze(-2) >> shifts.view(-1, 1)) & mask  # [N / pack, pack, G]
        q -= zp.flatten(-3, -2).unsqueeze(-1)
    compute = dtype if scale.dtype == dtype else torch.float32
    if out is None:
        out = torch.empty(rows, packed.shape[1] * pack, dtype=dtype, device=packed.device)
    torch.mul(q.to(compute), scale.to(compute).unsqueeze(-1), out=out.view(rows, groups, -1))
    return out


def dequantize_experts(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    num_bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """[E, N, K / pack] packed experts -> [E, N, K]; one expert at a time, so the
    temporaries stay the size of one expert's matrix."""
    import torch

    num_experts, rows, words = packed.shape
    out = torch.empty(
        num_experts, rows, words * (32 // num_bits), dtype=dtype, device=packed.device
    )
    for e in range(num_experts):
        zp = None if zero_point is None else zero_point[e]
        dequantize_int(packed[e], scale[e], zp, num_bits, dtype, out=out[e])
    return out


def _data(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.data


def _drop_params(layer: torch.nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        if name in layer._parameters:
            del layer._parameters[name]


# --------------------------------------------------------------------- the one warning


class _CostReport:
    """Collects the fallback layers of one model, so that one warning covers them.

    Layers are built (``add``) before any is processed (``flush``), so the first
    processed layer reports the whole model.
    """

    def __init__(self) -> None:
        self.pending: dict[str, list[tuple[int, int]]] = {}
        self.reasons: set[str] = set()

    def add(self, kind: str, packed_bytes: int, dequantized_bytes: int, reason: str) -> None:
        self.pending.setdefault(kind, []).append((packed_bytes, dequantized_bytes))
        # vLLM's refusals can span lines (one per backend it tried); the warning stays one
        # line, so that a grep of the log finds it whole
        self.reasons.add(" ".join(reason.split()).rstrip("."))

    def flush(self, dtype: torch.dtype) -> None:
        if not self.pending:
            return
        sizes = [s for layers in self.pending.values() for s in layers]
        packed = sum(p for p, _ in sizes)
        dequantized = sum(d for _, d in sizes)
        what = " and ".join(f"{len(v)} {kind}" for kind, v in sorted(self.pending.items()))
        logger.warning(
            "gemma4_quant: %s. Dequantizing %s to %s at load time: %.4f GiB of weights "
            "instead of %.4f GiB packed (+%.4f GiB). GEMMA4_QUANT_FALLBACK=off keeps "
            "vLLM's error instead.",
            "; ".join(sorted(self.reasons)),
            what,
            str(dtype).removeprefix("torch."),
            dequantized / 2**30,
            packed / 2**30,
            (dequantized - packed) / 2**30,
        )
        self.pending.clear()
        self.reasons.clear()


COST_REPORT = _CostReport()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# --------------------------------------------------------------------- MoE


def _patch_moe_factory(module: ModuleType, generation: str | None) -> None:
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
        except NotImplementedError as exc:
            if NO_MOE_KERNEL not in str(exc):
                raise
            fallback = _moe_fallback(quant_config, layer, layer_name, str(exc), generation)
            if fallback is None:
                raise
            return fallback
        if mode == "force" and type(method).__name__ == "CompressedTensorsWNA16MoEMethod":
            reason = "GEMMA4_QUANT_FALLBACK=force"
            fallback = _moe_fallback(quant_config, layer, layer_name, reason, generation)
            if fallback is not None:
                return fallback
        return method

    setattr(get_moe_method, _MARK, True)
    factory_cls.get_moe_method = staticmethod(get_moe_method)


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
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe.compressed_tensors_moe_wna16 import (  # noqa: E501
        CompressedTensorsWNA16MoEMethod,
    )
    from vllm.model_executor.utils import set_weight_attrs

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
            self.packed_layout = self._packed_layout(moe, weight_quant, input_quant)

        @staticmethod
        def _packed_layout(moe: Any, weight_quant: Any, input_quant: Any) -> Any:
            """vLLM's own WNA16 method minus its kernel selection (the step that fails),
            used only for ``create_weights``: the attributes its ``__init__`` sets."""
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

        def maybe_roundup_sizes(
            self, hidden_size: int, intermediate_size_per_partition: int, *args: Any
        ) -> tuple[int, int]:
            # The packed buffers take the checkpoint's sizes, as the WNA16 method's
            # would; an unquantized backend's padding would not match them.
            return FusedMoEMethodBase.maybe_roundup_sizes(
                self, hidden_size, intermediate_size_per_partition, *args
            )

        def create_weights(
            self,
            layer: torch.nn.Module,
            num_experts: int,
            hidden_size: int,
            intermediate_size_per_partition: int,
            params_dtype: torch.dtype,
            **extra_weight_attrs: Any,
        ) -> None:
            packed = self.packed_layout
            own_zero_points = not packed.symmetric and self.generation == GENERATION_BY_KERNEL
            if own_zero_points:
                # This generation only knows K-first (Marlin) zero points: build the
                # rest as vLLM does and add N-first zero points below.
                packed.symmetric = True
            try:
                packed.create_weights(
                    layer,
                    num_experts,
                    hidden_size,
                    intermediate_size_per_partition,
                    params_dtype,
                    **extra_weight_attrs,
                )
            finally:
                packed.symmetric = self.weight_quant.symmetric
            if own_zero_points:
                self._create_zero_points(layer, extra_weight_attrs)
            COST_REPORT.add(
                "MoE layers",
                sum(_nbytes(p) for n, p in layer.named_parameters() if n in _PACKED_EXPERT_PARAMS),
                self._dequantized_bytes(layer, params_dtype),
                self.reason,
            )

        def _create_zero_points(self, layer: torch.nn.Module, attrs: dict[str, Any]) -> None:
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
                stem: dequantize_experts(
                    getattr(layer, f"{stem}_weight_packed").data,
                    getattr(layer, f"{stem}_weight_scale").data,
                    _data(getattr(layer, f"{stem}_weight_zero_point", None)),
                    self.weight_quant.num_bits,
                    dtype,
                )
                for stem in ("w13", "w2")
            }
            _drop_params(layer, _PACKED_EXPERT_PARAMS)
            for stem, weight in weights.items():
                layer.register_parameter(
                    f"{stem}_weight", torch.nn.Parameter(weight, requires_grad=False)
                )

    return DequantizedWNA16MoEMethod


# --------------------------------------------------------------------- linear


def _patch_linear_scheme(module: ModuleType, zero_points: bool = True) -> None:
    """Wrap ``module.choose_mp_linear_kernel`` (the name the scheme's module calls);
    ``zero_points=False``: configs with zero points keep vLLM's kernel choice."""
    original = module.choose_mp_linear_kernel
    if getattr(original, _MARK, False):
        return

    def supported(config: Any) -> bool:
        return _linear_supported(config) and (zero_points or not config.zero_points)

    @functools.wraps(original)
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
                f"vLLM picked {kernel.__name__}, but its op torch.ops._C.{missing} is not "
                "in the vLLM kernel library this CPU loads"
            )
        return kernel

    setattr(choose_mp_linear_kernel, _MARK, True)
    module.choose_mp_linear_kernel = choose_mp_linear_kernel


def _linear_supported(config: Any) -> bool:
    """Integer 4-bit weights (with or without zero points): the values we reproduce."""
    weight_type = config.weight_type
    return weight_type.size_bits == 4 and not weight_type.is_floating_point()


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

    class DequantizedLinearKernel(MPLinearKernel):
        """The scheme's packed parameters in, vLLM's unquantized linear out."""

        @classmethod
        def get_min_capability(cls) -> int:
            return -1

        @classmethod
        def can_implement(cls, c: Any) -> tuple[bool, str | None]:
            if not _linear_supported(c):
                return False, f"{c.weight_type} is not a 4-bit integer type"
            return True, None

        def __init__(
            self,
            c: Any,
            w_q_param_name: str,
            w_s_param_name: str,
            w_zp_param_name: str | None = None,
        ) -> None:
            super().__init__(c, w_q_param_name, w_s_param_name, w_zp_param_name)
            self.unquantized = UnquantizedLinearMethod()
            in_features, out_features = c.partition_weight_shape
            itemsize = torch.empty((), dtype=c.act_type).element_size()
            groups = 1 if c.group_size in (-1, None) else in_features // c.group_size
            packed = out_features * in_features // 2 + out_features * groups * itemsize
            if c.zero_points:
                packed += out_features * groups // 2
            COST_REPORT.add("linear layers", packed, out_features * in_features * itemsize, reason)

        def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
            w_q, w_s, w_zp = self._get_weight_params(layer)
            dtype = w_s.dtype  # the model dtype (params_dtype)
            COST_REPORT.flush(dtype)
            packed, scale = w_q.data, w_s.data
            zero_point = _data(w_zp) if self.config.zero_points else None
            if getattr(w_q, "input_dim", 1) == 0:
                # GPTQ: qweight [K / pack, N] packed along K, scales [G, N]; transposed,
                # the N-first layout dequantize_int reads (value k of word w is input
                # pack * w + k in both)
                if zero_point is not None:
                    raise ValueError("K-first packed weights with zero points")
                packed, scale = packed.t().contiguous(), scale.t().contiguous()
            weight = dequantize_int(packed, scale, zero_point, 4, dtype)
            _drop_params(
                layer,
                (
                    self.w_q_name,
                    self.w_s_name,
                    self.w_zp_name or "",
                    "weight_shape",
                    "weight_g_idx",
                ),
            )
            layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
            self.unquantized.process_weights_after_loading(layer)

        def apply_weights(
            self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
        ) -> torch.Tensor:
            return self.unquantized.apply(layer, x, bias)

    DequantizedLinearKernel.reason = reason
    return DequantizedLinearKernel


__all__ = [
    "NAME",
    "SUMMARY",
    "detect",
    "apply",
    "dequantize_int",
    "dequantize_experts",
    "unsupported_reason",
]

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
    server starts and dies on the first request. Under tensor parallel, a rank's share of
    the experts' intermediate dim that is not a whole number of groups (704 / TP 4 = 176
    = 5.5 groups of 32) is refused by 0.30+ ("Scale groups would otherwise cross TP shard
    boundaries") and loaded with the wrong scale groups before (every rank narrows
    ``per_rank // group`` groups from group ``rank * that``): silently wrong experts.
    vLLM's CPU WNA16 kernels take int4 only: int8 compressed-tensors weights
    (``cyankiwi/gemma-4-26B-A4B-it-AWQ-8bit``, ``uint8b128``) have no CPU linear or MoE
    kernel at all.

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
      current platform. Where the layer's own per-rank intermediate size splits a group
      (read from its ``moe_config`` at construction), the wrapper takes the layer whatever
      method vLLM picked; its buffers are then the fallback's own N-first ones, and w2's
      scales (and zero points) load, through a weight loader of their own, the whole
      groups the rank's columns lie in, dequantized from the right column offset.
    - Linear: ``choose_mp_linear_kernel`` as the compressed-tensors WNA16 scheme calls it
      is wrapped, and as vLLM's GPTQ linear method calls it (``AutoGPTQLinearMethod``,
      ``GPTQMarlinLinearMethod`` before 0.22: the linears of AutoRound / INC GPTQ
      checkpoints, which ``inc.py`` sends there on CPU where INC refuses them or builds
      them with a CUDA-only method; symmetric only, where its kernels ignore ``qzeros``);
      where it raises the no-kernel error (or picks a CPU kernel whose op is missing), it
      returns ``DequantizedLinearKernel``, which keeps the method's packed parameters
      (N-first ``weight_packed`` or K-first GPTQ ``qweight``, read from their layout
      attributes), dequantizes them into ``weight`` and runs ``UnquantizedLinearMethod``.
    - NVFP4 (ModelOpt; compressed-tensors W4A4 linears and experts): where vLLM's NVFP4
      kernel or MoE backend selection raises its no-kernel error, vLLM's own buffers are
      dequantized at load and run unquantized, activations in the model dtype
      (``nvfp4.py``); so where the linear methods pick a backend enum that vLLM
      refuses (``No NVFP4 GEMM backend selected``), and where the MoE oracle stops on a
      backend whose kernel module needs a missing GPU library.
    - FP8 experts (compressed-tensors, RedHatAI's FP8-Dynamic): where vLLM's FP8 MoE
      method got ``Fp8MoeBackend.NONE`` from its oracle (CPUs without AMX), which would
      stop weight processing with ``Unsupported FP8 MoE backend: NONE``, its buffers are
      dequantized at load and run unquantized (``fp8.py``); vLLM's FP8 path stays
      wherever it has a backend.
    - FP8 linears (compressed-tensors): where the weight-only FP8 scheme finds no kernel
      (``Failed to find a kernel that can implement the ScaledMM linear layer``: the CPU
      on 0.20 - 0.23, whose W8A16 FP8 kernel list is empty), or where its Marlin FP8
      cannot run (0.19, no CUDA), weight times scale goes to vLLM's unquantized linear
      method (``fp8_linear.py``).
    Values are ``(q - zero_point) * scale`` in float32, rounded once to the model dtype:
    the checkpoint's exact values, for 4- and 8-bit integers alike. One warning per loaded
    model says why and what it costs (bytes of dequantized weights vs packed).

Upstream PR:
    None yet. Upstream's nearest is the ``EMULATION`` WNA16 MoE backend (GPU only,
    Triton); a dequantizing fallback in ``select_wna16_moe_backend`` /
    ``choose_mp_linear_kernel`` and an op check in ``CPUWNA16LinearKernel.can_implement``
    would remove this patch.

Releases:
    0.31.0 - 0.33.0 (packed expert buffers always in the checkpoint's N-first layout);
    0.30.0 (layout chosen from the kernel: the fallback pins the N-first layout and
    allocates N-first zero points itself). Earlier releases build compressed-tensors MoE
    layers differently: UNRECOGNIZED. GPTQ linears wherever vLLM's GPTQ linear method
    picks a mixed-precision kernel for K-first ``qweight`` (0.19.0 - 0.34.0). FP8 experts
    wherever the FP8 MoE method keeps the oracle's backend and the oracle can return
    ``NONE`` (0.19.0 - 0.32.0; on 0.19 - 0.23 stock vLLM's FP8 linears fail first, at
    weight processing on 0.19, at construction on 0.20 - 0.23). FP8 linears wherever the
    W8A16 FP8 scheme takes its kernel from ``init_wfp8_a16_linear_kernel`` (0.20.0 -
    0.32.0; vLLM routes CPU FP8 there on 0.20 - 0.23 only), or runs Marlin FP8 itself
    (0.19.x). Detected from the code, never from the version.

Removal:
    When every supported release falls back by itself where no WNA16 kernel fits.
"""

from __future__ import annotations

import ast
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import vllm_code
from .. import Detection, vllm_source, when_imported

NAME = "dequant_fallback"
SUMMARY = "quantized MoE experts / linears without a vLLM kernel are dequantized at load"


_CT = "model_executor/layers/quantization/compressed_tensors/"
_CT_MODULE = "vllm.model_executor.layers.quantization.compressed_tensors."
# The MoE methods: one package of modules (0.20+), or one module (0.19).
_MOE_LOCATIONS = (
    # (factory file, factory module, WNA16 MoE file)
    (
        _CT + "compressed_tensors_moe/compressed_tensors_moe.py",
        _CT_MODULE + "compressed_tensors_moe.compressed_tensors_moe",
        _CT + "compressed_tensors_moe/compressed_tensors_moe_wna16.py",
    ),
    (
        _CT + "compressed_tensors_moe.py",
        _CT_MODULE + "compressed_tensors_moe",
        _CT + "compressed_tensors_moe.py",
    ),
)
LINEAR_SCHEME_MODULE = _CT_MODULE + "schemes.compressed_tensors_wNa16"
_QUANT = "model_executor/layers/quantization/"
# vLLM's GPTQ linear method with a mixed-precision kernel (file, class): 0.22+, and the
# same class under its old name before (0.19 - 0.21)
GPTQ_LINEAR_LOCATIONS = (
    (_QUANT + "auto_gptq.py", "AutoGPTQLinearMethod"),
    (_QUANT + "gptq_marlin.py", "GPTQMarlinLinearMethod"),
)
_LINEAR_SCHEME_FILE = _CT + "schemes/compressed_tensors_wNa16.py"
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
_N_FIRST = "(num_experts, w13_n, hidden_size // pf)"
_LAYOUT_BY_KERNEL = 'backend_key = "Marlin" if self.is_transposed else "Flashinfer"'

GENERATION_N_FIRST = "n-first"
GENERATION_BY_KERNEL = "layout-by-kernel"
# 0.19 - 0.29: the factory picks Marlin or Triton WNA16 MoE (both GPU-only, both
# symmetric-only); the fallback registers its own N-first buffers there.
GENERATION_LEGACY = "marlin-or-triton"
# What the legacy WNA16 MoE methods assert for zero points.
SYMMETRIC_ONLY = "Only symmetric quantization is supported for MoE"
# Where the experts' weight loader lives: FusedMoE (0.19 - 0.23), RoutedExperts (0.24+).
_EXPERT_LOADERS = (
    ("model_executor/layers/fused_moe/layer.py", "FusedMoE.weight_loader"),
    ("model_executor/layers/fused_moe/routed_experts.py", "RoutedExperts.weight_loader"),
)

# Kernels vLLM may pick although their op is missing from the extension it loaded.
_KERNEL_OPS = {"CPUWNA16LinearKernel": "cpu_gemm_wna16"}


# --------------------------------------------------------------------- detection


def _moe_location() -> tuple[str | None, str, str]:
    """(factory source, factory module, WNA16 MoE file) where this release has them."""
    for factory_file, module, wna16_file in _MOE_LOCATIONS:
        factory = vllm_source(factory_file)
        if factory is not None:
            return factory, module, wna16_file
    return None, "", ""


def factory_builds(method: str) -> bool:
    """Whether the compressed-tensors MoE factory builds ``method`` (a class name)."""
    factory = vllm_code.find_function(
        _moe_location()[0], "CompressedTensorsMoEMethod.get_moe_method"
    )
    return factory is not None and any(vllm_code.calls(factory, method))


def method_functions(
    files: tuple[str, ...], method: str
) -> tuple[str, vllm_code.FunctionNode, vllm_code.FunctionNode] | None:
    """The first of ``files`` (paths under ``vllm/``) that defines ``method.__init__`` and
    ``method.create_weights``: that path and the two function nodes (None: no file does)."""
    for relpath in files:
        text = vllm_source(relpath)
        init = vllm_code.find_function(text, f"{method}.__init__")
        create = vllm_code.find_function(text, f"{method}.create_weights")
        if init is not None and create is not None:
            return relpath, init, create
    return None


def _moe_generation() -> tuple[str | None, str]:
    """Which compressed-tensors WNA16 MoE code the installed vLLM has, and how we know."""
    factory, _, wna16_file = _moe_location()
    wna16 = vllm_code.find_class(vllm_source(wna16_file), "CompressedTensorsWNA16MoEMethod")
    oracle = vllm_code.parse(vllm_source(_ORACLE_FILE) or "")
    unquantized = vllm_source(_UNQUANTIZED_MOE_FILE)
    if vllm_code.find_function(factory, "CompressedTensorsMoEMethod.get_moe_method") is None:
        return None, "no CompressedTensorsMoEMethod.get_moe_method"
    if wna16 is None:
        return None, "no CompressedTensorsWNA16MoEMethod"
    if not any(vllm_code.calls(wna16, "select_wna16_moe_backend")):
        return _legacy_generation(factory, wna16)
    if not vllm_code.has_string(oracle, NO_MOE_KERNEL):
        return None, "select_wna16_moe_backend has no 'no backend' error"
    method = "UnquantizedFusedMoEMethod.process_weights_after_loading"
    if vllm_code.find_function(unquantized, method) is None:
        return None, f"no {method}"
    registered = set(vllm_code.strings(wna16))
    for needed in ("w13_weight_packed", "w2_weight_packed", "w13_weight_scale"):
        if needed not in registered:
            return None, f"CompressedTensorsWNA16MoEMethod registers no {needed!r}"
    if vllm_code.has_code(wna16, _N_FIRST):
        return GENERATION_N_FIRST, "WNA16 MoE buffers are N-first"
    if vllm_code.has_code(wna16, _LAYOUT_BY_KERNEL):
        return GENERATION_BY_KERNEL, "WNA16 MoE buffer layout follows the kernel"
    return None, "unknown CompressedTensorsWNA16MoEMethod.get_weight_shape"


def _legacy_generation(factory: str | None, wna16: ast.ClassDef) -> tuple[str | None, str]:
    """0.19 - 0.29: Marlin where it fits (with a backend oracle from 0.23), else Triton,
    which asserts symmetric weights; the experts' weight loader places N-first group
    scales, zero points and shapes."""
    get_moe_method = vllm_code.find_function(factory, "CompressedTensorsMoEMethod.get_moe_method")
    loaders = (vllm_code.find_function(vllm_source(f), name) for f, name in _EXPERT_LOADERS)
    loader = next((found for found in loaders if found is not None), None)
    if not any(vllm_code.calls(get_moe_method, "check_moe_marlin_supports_layer")):
        return None, "CompressedTensorsWNA16MoEMethod selects no WNA16 MoE backend"
    if not vllm_code.has_string(wna16, SYMMETRIC_ONLY):
        return None, "unknown CompressedTensorsWNA16MoEMethod (no symmetric-only check)"
    placed = set(vllm_code.strings(loader))
    if not {"weight_shape", "zero", "scale"} <= placed:
        return None, "the experts' weight_loader places no group scales, zero points or shapes"
    return GENERATION_LEGACY, "WNA16 MoE is Marlin or Triton (Triton: symmetric only)"


_CHOOSE_KERNEL = "kernel_type = choose_mp_linear_kernel(mp_linear_kernel_config)"


def _linear_recognized() -> bool:
    scheme = vllm_code.find_class(vllm_source(_LINEAR_SCHEME_FILE), "CompressedTensorsWNA16")
    kernels = vllm_code.parse(vllm_source(_LINEAR_KERNELS_FILE) or "")
    base = vllm_source(_MP_KERNEL_FILE)
    return (
        vllm_code.has_code(scheme, _CHOOSE_KERNEL)
        and vllm_code.has_string(kernels, NO_LINEAR_KERNEL)
        and vllm_code.find_function(base, "MPLinearKernel.apply_weights") is not None
    )


def _gptq_linear_recognized() -> tuple[str, str] | None:
    """vLLM's GPTQ linear method (AutoRound / INC GPTQ linears) that picks a
    mixed-precision kernel for K-first ``qweight`` [K / pack, N] and ``scales`` [G, N]:
    (its module, its class), or None where none is recognized."""
    if not _linear_recognized():
        return None
    k_first = {"input_dim": 0, "output_dim": 1, "packed_dim": 0}
    for relpath, name in GPTQ_LINEAR_LOCATIONS:
        method = vllm_code.find_class(vllm_source(relpath), name)
        if method is None or not vllm_code.has_code(method, _CHOOSE_KERNEL):
            continue
        if any(
            all(
                isinstance(kw.value, ast.Constant) and kw.value.value == k_first[kw.arg]
                for kw in call.keywords
                if kw.arg in k_first
            )
            and k_first.keys() <= vllm_code.keywords(call)
            for call in ast.walk(method)
            if isinstance(call, ast.Call)
        ):
            module = "vllm." + relpath.removesuffix(".py").replace("/", ".")
            return module, name
    return None


@dataclass(frozen=True)
class Found:
    """What the fallback recognized: the MoE buffer generation and which linear paths."""

    moe_generation: str
    linear: bool
    gptq_linear: tuple[str, str] | None  # vLLM's GPTQ linear method: (module, class)
    inc_cpu: str | None = None  # which INC code refuses or misbuilds CPU linears (inc.py)
    gptq_moe: str | None = None  # the module building GPTQ experts (gptq_moe.py)
    nvfp4_moe: bool = False  # ModelOpt NVFP4 experts (nvfp4.py)
    ct_nvfp4_linear: bool = False  # compressed-tensors NVFP4 linears (nvfp4.py)
    ct_nvfp4_moe: str | None = None  # the module of compressed-tensors' NVFP4 MoE method
    modelopt_nvfp4_linear: bool = False  # ModelOpt NVFP4 linears (nvfp4.py)
    nvfp4_moe_oracle: bool = False  # unimportable NVFP4 MoE backends count as unsupported
    ct_fp8_moe: bool = False  # compressed-tensors FP8 experts without a backend (fp8.py)
    ct_fp8_linear: str | None = None  # how the W8A16 FP8 scheme runs (fp8_linear.py)


def detect() -> Detection:
    from . import nvfp4
    from .fp8 import ct_fp8_moe_recognized
    from .fp8_linear import ct_fp8_linear_generation
    from .gptq_moe import gptq_moe_module
    from .inc import inc_cpu_generation

    generation, why = _moe_generation()
    if generation is None:
        return Detection.unrecognized(why)
    found = Found(
        generation,
        _linear_recognized(),
        _gptq_linear_recognized(),
        inc_cpu_generation(),
        gptq_moe_module(),
        nvfp4.nvfp4_moe_recognized(),
        nvfp4.ct_nvfp4_linear_recognized(),
        nvfp4.ct_nvfp4_moe_module(),
        nvfp4.modelopt_nvfp4_linear_recognized(),
        nvfp4.oracle_imports_backends(),
        ct_fp8_moe_recognized(),
        ct_fp8_linear_generation(),
    )
    linear = ""
    if found.linear:
        linear = (
            "and WNA16 linears (compressed-tensors, AutoGPTQ) "
            if found.gptq_linear
            else "and WNA16 linears "
        )
    inc = f"; INC linears get vLLM's GPTQ method on CPU ({found.inc_cpu})" if found.inc_cpu else ""
    gptq = "; GPTQ experts without a kernel load dequantized" if found.gptq_moe else ""
    modelopt_parts = {"linears": found.modelopt_nvfp4_linear, "experts": found.nvfp4_moe}
    modelopt = " and ".join(part for part, ok in modelopt_parts.items() if ok)
    nvfp4 = f"; so do ModelOpt NVFP4 {modelopt}" if modelopt else ""
    ct_parts = {"linears": found.ct_nvfp4_linear, "experts": bool(found.ct_nvfp4_moe)}
    covered = " and ".join(part for part, ok in ct_parts.items() if ok)
    unknown = " and ".join(part for part, ok in ct_parts.items() if not ok)
    ct_nvfp4 = f"; so do compressed-tensors NVFP4 {covered}" if covered else ""
    if unknown:
        ct_nvfp4 += f"; compressed-tensors NVFP4 {unknown}: code not recognized, left to vLLM"
    fp8_parts = {"experts": found.ct_fp8_moe, "weight-only linears": bool(found.ct_fp8_linear)}
    fp8 = " and ".join(part for part, ok in fp8_parts.items() if ok)
    fp8 = f"; so do compressed-tensors FP8 {fp8} without a kernel" if fp8 else ""
    return Detection.needed(
        f"{why}; dequantize experts {linear}where no kernel fits{inc}{gptq}{nvfp4}{ct_nvfp4}{fp8}",
        found,
    )


def apply(detection: Detection) -> None:
    found: Found = detection.findings
    from . import inc
    from .linear import patch_linear_scheme
    from .moe import patch_moe_factory

    when_imported(
        _moe_location()[1], functools.partial(patch_moe_factory, generation=found.moe_generation)
    )
    if found.linear:
        when_imported(LINEAR_SCHEME_MODULE, patch_linear_scheme)
    if found.gptq_linear:
        # the GPTQ linear method builds symmetric configs only (zero_points=False); its
        # kernels never read qzeros, and neither does the fallback. int8 too: INC's int8
        # linears (inc.py) and GPTQ int8 exports come this way.
        when_imported(
            found.gptq_linear[0],
            functools.partial(patch_linear_scheme, zero_points=False, widths=(4, 8)),
        )
    if found.gptq_moe:
        from .. import unquantized_experts
        from .gptq_moe import patch_gptq_moe

        when_imported(found.gptq_moe, patch_gptq_moe)
        unquantized_experts.add_stream_stage(unquantized_experts.GPTQ_CONFIGS)
    from . import nvfp4

    if found.nvfp4_moe or found.modelopt_nvfp4_linear:
        patch = functools.partial(
            nvfp4.patch_modelopt, moe=found.nvfp4_moe, linear=found.modelopt_nvfp4_linear
        )
        when_imported(nvfp4.MODELOPT_MODULE, patch)
    if found.nvfp4_moe_oracle and (found.nvfp4_moe or found.ct_nvfp4_moe):
        when_imported(nvfp4.ORACLE_MODULE, nvfp4.patch_moe_oracle)
    if found.ct_nvfp4_linear:
        when_imported(nvfp4.CT_LINEAR_MODULE, nvfp4.patch_ct_linear)
    if found.ct_nvfp4_moe:
        patch = functools.partial(nvfp4.patch_ct_moe_factory, method_module=found.ct_nvfp4_moe)
        when_imported(_moe_location()[1], patch)
    if found.ct_fp8_moe:
        from .fp8 import patch_ct_fp8_moe_factory

        when_imported(_moe_location()[1], patch_ct_fp8_moe_factory)
    if found.ct_fp8_linear:
        from . import fp8_linear

        patch = (
            fp8_linear.patch_ct_fp8_linear
            if found.ct_fp8_linear == fp8_linear.GENERATION_KERNEL
            else fp8_linear.patch_marlin_scheme
        )
        when_imported(fp8_linear.SCHEME_MODULE, patch)
    # INC's routed linears get the GPTQ linear method detection found
    inc_patch = {
        inc.GENERATION_SCHEME: (inc.SCHEME_MODULE, inc.patch_inc_scheme),
        inc.GENERATION_CONFIG: (inc.CONFIG_MODULE, inc.patch_inc_config),
        inc.GENERATION_REFUSES: (inc.CONFIG_MODULE, inc.patch_inc_refusal),
    }.get(found.inc_cpu)
    if inc_patch is not None:
        module_name, patch = inc_patch
        when_imported(module_name, functools.partial(patch, gptq_linear=found.gptq_linear))


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)
# Stock vLLM has no kernel for the layer: doctor's kernel rules (doctor.kernels_cpu,
# doctor.kernels_cuda) find that, and ask fallback_refusal() whether this patch serves it.
# The rule types come from gemma4_quant.doctor.core, imported only under TYPE_CHECKING:
# every vLLM process imports this module, doctor only runs in `gemma4-quant doctor`.

if TYPE_CHECKING:
    from ...doctor.core import Ctx, Scheme


def doctor_rules() -> tuple[()]:
    return ()  # no failure of its own: it serves the layers the kernel rules find kernel-less


def checked_kernel_ops() -> dict[str, str]:
    """Kernels vLLM may pick although their op is missing, with that op: the fallback
    serves their layers too."""
    return dict(_KERNEL_OPS)


def fallback_refusal(scheme: Scheme, ctx: Ctx, linear: bool) -> str | None:
    """Why this fallback will not serve a layer (a linear, or experts) that vLLM has no
    kernel for (None: it will)."""
    if not ctx.patched(NAME):
        status = ctx.env.patches.get(NAME, ("missing", "not installed"))
        if not ctx.env.plugin:
            return "stock vLLM: no plugin, no fallback"
        return f"{NAME} {status[0]} here ({status[1]})"
    if ctx.env.fallback_mode == "off":
        return "GEMMA4_QUANT_FALLBACK=off"
    found: Found | None = detect().findings
    if scheme.method == "modelopt":
        if scheme.weight_type != "nvfp4":
            return "the fallback covers ModelOpt NVFP4 only"
        if found is None or not (found.modelopt_nvfp4_linear if linear else found.nvfp4_moe):
            what = "linear method" if linear else "MoE method"
            return f"the fallback does not recognize this vLLM's ModelOpt NVFP4 {what}"
        return None
    if scheme.method == "gptq" and not linear:
        if found is None or not found.gptq_moe:
            return "the fallback does not recognize this vLLM's GPTQ MoE code"
        return None if scheme.bits in (2, 4, 8) else f"{scheme.bits}-bit GPTQ experts"
    if scheme.method in ("auto-round", "gptq") and linear:
        if not _gptq_linear_recognized():
            return "the fallback does not recognize this vLLM's GPTQ linear code"
        if scheme.method == "auto-round" and not ctx.analysis.gptq_packed():
            return "the fallback covers GPTQ-packed AutoRound linears only"
        if not scheme.symmetric or scheme.bits not in (4, 8):
            return "not symmetric int4 or int8"
        if scheme.bits == 8 and scheme.method == "auto-round" and not (found and found.inc_cpu):
            return "INC refuses int8 on CPU in code the fallback does not recognize"
        return None
    if scheme.method != "compressed-tensors":
        return (
            "the fallback covers compressed-tensors layers, GPTQ and AutoRound linears and "
            "experts, and ModelOpt NVFP4 only"
        )
    if scheme.weight_type == "nvfp4":
        return _ct_nvfp4_refusal(scheme, found, linear)
    if scheme.storage == "fp8":
        if linear and (found is None or not found.ct_fp8_linear):
            return "the fallback does not recognize this vLLM's W8A16 FP8 linear code"
        if not linear and (found is None or not found.ct_fp8_moe):
            return "the fallback does not recognize this vLLM's compressed-tensors FP8 MoE code"
        from .fp8 import unsupported_reason as fp8_unsupported

        return fp8_unsupported(scheme.strategy, scheme.bits)
    if linear:
        if not _linear_recognized():
            return "the fallback does not recognize this vLLM's WNA16 linear code"
        supported = scheme.weight_type == "int" and scheme.bits in (4, 8)
        return None if supported else "not int4 or int8"
    from types import SimpleNamespace

    weights = SimpleNamespace(
        type=scheme.weight_type,
        num_bits=scheme.bits,
        strategy=scheme.strategy or "group",
        actorder=scheme.actorder,
        symmetric=scheme.symmetric,
        group_size=scheme.group_size,
    )
    from .moe import unsupported_reason

    return unsupported_reason(weights, scheme.activations)


def _ct_nvfp4_refusal(scheme: Scheme, found: Found | None, linear: bool) -> str | None:
    """compressed-tensors NVFP4: W4A4 layers, where the fallback recognizes vLLM's code
    (weight-only NVFP4 linears have a scheme of their own on some releases)."""
    if found is None or not (found.ct_nvfp4_linear if linear else found.ct_nvfp4_moe):
        what = "linear scheme" if linear else "MoE method"
        return f"the fallback does not recognize this vLLM's compressed-tensors NVFP4 {what}"
    if scheme.activations is None and linear:
        return "weight-only NVFP4 linears (W4A16) are not covered"
    return None

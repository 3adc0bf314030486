"""vLLM's CPU kernels for quantized layers: which one takes a layer, or why none does.

int4 (WNA16) linears go to CPUWNA16LinearKernel, int4 experts to the WNA16 MoE backend
oracle (older releases pick GPU-only methods even on CPU), FP8 linears and experts to the
W8A8 / W8A16 kernel lists and the AMX FP8 MoE experts. Where vLLM has no kernel the
plugin's dequantizing fallback may serve the layer (rules.served_by_fallback).
"""

from __future__ import annotations

import importlib.util

from .core import Ctx, Hit, Module, Outcome, Scheme, Stage, short_name
from .rules import (
    built_scheme,
    forced,
    group_size,
    is_representative,
    is_wna16,
    partition_shape,
    served_by_fallback,
    vllm_layer,
)


def _marlin_moe_fits(scheme: Scheme, ctx: Ctx) -> bool:
    """check_moe_marlin_supports_layer: what makes pre-0.30 vLLM pick the Marlin MoE method
    (not gated by platform: it is picked on CPU too)."""
    text = ctx.analysis.text_config
    hidden = int(text.get("hidden_size") or 0)
    inter = int(text.get("moe_intermediate_size") or 0) // ctx.env.tensor_parallel
    group = group_size(scheme)
    return hidden % 128 == 0 and inter % max(64, group) == 0 and group in (-1, 32, 64, 128)


def check_moe_symmetric_only(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    if not is_wna16(scheme) or scheme.method != "compressed-tensors" or scheme.symmetric:
        return None
    features = ctx.env.features
    selection = features.get("wna16_moe_selection")
    if selection == "oracle" or ctx.env.platform not in ("cpu", "cuda"):
        return None
    marlin = _marlin_moe_fits(scheme, ctx)
    if marlin and not features.get("marlin_moe_symmetric_only"):
        return None
    if not marlin and not features.get("moe_symmetric_only"):
        return None
    return served_by_fallback(
        module,
        scheme,
        ctx,
        False,
        "asymmetric int experts: this vLLM's compressed-tensors WNA16 MoE method is symmetric only",
        "AssertionError: Only symmetric quantization is supported for MoE",
    )


def cpu_int4_moe_refusals(scheme: Scheme, ctx: Ctx) -> list[str]:
    """Why vLLM's CPU WNA16 MoE backends (oracle/int_wna16.py) refuse these experts."""
    env, features = ctx.env, ctx.env.features
    reasons = []
    if importlib.util.find_spec("zentorch") is None:
        reasons.append("ZEN_CPU needs zentorch (AMD Zen)")
    elif scheme.symmetric is False:
        reasons.append("ZEN_CPU: zero points are not supported")
    cpu = env.cpu
    if cpu is None or cpu.arch not in ("x86_64", "amd64") or not cpu.amx:
        reasons.append("CPU int4 MoE needs x86 AMX tiles (this CPU has none)")
    activation = features.get("gemma4_moe_activation", "GELU_TANH")
    supported = features.get("cpu_int4_moe_activations") or []
    if activation not in supported:
        reasons.append(
            f"CPU int4 MoE runs {'/'.join(supported) or 'no'} activations, Gemma 4 uses "
            f"{activation}"
        )
    if scheme.bits != 4:
        reasons.append(f"CPU int4 MoE: {scheme.bits}-bit weights")
    if scheme.symmetric is False:
        reasons.append("CPU int4 MoE: symmetric weights only")
    if group_size(scheme) == 32:
        reasons.append("CPU int4 MoE: group size 32 is not supported")
    return reasons


def check_wna16_moe_cpu(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or not is_wna16(scheme):
        return None
    selection = ctx.env.features.get("wna16_moe_selection")
    if scheme.method == "gptq" and ctx.env.features.get("gptq_moe_marlin_workspace"):
        message = (
            "GPTQ experts are built with Marlin's MoE method, whose workspace is sized by "
            "the device's compute units, which vLLM's CPU platform does not count"
        )
        error = "NotImplementedError: num_compute_units is not implemented for the current platform"
        return _failing_unless_served(module, scheme, ctx, message, error)
    if scheme.method == "gptq":
        # GPTQ configs build the other releases' experts through the backend oracle
        return _oracle_moe_on_cpu(module, scheme, ctx)
    if scheme.method != "compressed-tensors":
        # AutoRound experts that vLLM does quantize on CPU (0.33+) go through the same
        # backend oracle; the plugin's fallback covers compressed-tensors only
        if scheme.method != "auto-round" or selection != "oracle":
            return Hit(Outcome.UNKNOWN, f"{scheme.method} experts on CPU are not modelled")
        refusals = cpu_int4_moe_refusals(scheme, ctx)
        if not refusals:
            return None
        return Hit(
            Outcome.NO_KERNEL,
            "no WNA16 MoE backend on this CPU: " + "; ".join(refusals),
            "NotImplementedError: No WNA16 MoE backend supports the deployment configuration",
        )
    if selection != "oracle":
        if check_moe_symmetric_only(module, ctx) is not None:
            return None  # that assertion comes first
        # 0.23 - 0.29 pick the Marlin method where the shapes fit, and it asks the backend
        # oracle (as 0.30+ do); elsewhere the Triton method, as before
        if selection != "hybrid" or not _marlin_moe_fits(scheme, ctx):
            return _legacy_moe_on_cpu(module, scheme, ctx)
    return _oracle_moe_on_cpu(module, scheme, ctx)


def _oracle_moe_on_cpu(module: Module, scheme: Scheme, ctx: Ctx) -> Hit | None:
    """The WNA16 MoE backend oracle on CPU (select_wna16_moe_backend)."""
    refusals = cpu_int4_moe_refusals(scheme, ctx)
    if not refusals:
        return forced(module, scheme, ctx, linear=False)
    message = "no WNA16 MoE backend on this CPU: " + "; ".join(refusals)
    error = "NotImplementedError: No WNA16 MoE backend supports the deployment configuration"
    return served_by_fallback(module, scheme, ctx, False, message, error)


def _legacy_moe_on_cpu(module: Module, scheme: Scheme, ctx: Ctx) -> Hit:
    """Before the backend oracle, compressed-tensors picks Marlin MoE when the shapes fit
    (check_moe_marlin_supports_layer, not gated by platform) and Triton otherwise; both
    are GPU kernels, so a CPU load passes construction and fails later (0.23 - 0.29: the
    Triton branch only)."""
    if _marlin_moe_fits(scheme, ctx):
        return served_by_fallback(
            module,
            scheme,
            ctx,
            False,
            "this vLLM builds compressed-tensors int experts with Marlin even on CPU: "
            "construction and loading pass, repacking needs CUDA ops",
            "AttributeError: '_OpNamespace' '_C' object has no attribute 'gptq_marlin_repack'",
            stage=Stage.PROCESS,
        )
    return served_by_fallback(
        module,
        scheme,
        ctx,
        False,
        "this vLLM builds compressed-tensors int experts with Triton's fused MoE even on "
        "CPU: construction and loading pass, the first forward needs a GPU",
        "CompressedTensorsWNA16MoEMethod.apply runs a Triton kernel",
        stage=Stage.RUN,
    )


def check_fp8_linear_cpu(module: Module, ctx: Ctx) -> Hit | None:
    """compressed-tensors FP8 linears on CPU: vLLM picks W8A8 or W8A16 kernels depending on
    how it treats a platform without a compute capability; one list is empty."""
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or scheme is None or scheme.storage != "fp8":
        return None
    if scheme.method != "compressed-tensors" or not is_representative(module, ctx):
        return None
    features = ctx.env.features
    route = features.get("cpu_fp8_route", "w8a8")
    if features.get("cpu_fp8_kernels", {}).get(route):
        return None
    if route == "w8a16" and features.get("fp8_w8a16_marlin_only"):
        return served_by_fallback(
            module,
            scheme,
            ctx,
            True,
            "no CPU kernel for FP8 linears: this vLLM runs FP8 on CPU as W8A16 with Marlin "
            "FP8 (a CUDA kernel): construction and loading pass, repacking needs CUDA ops",
            "prepare_fp8_layer_for_marlin needs CUDA ops",
            stage=Stage.PROCESS,
        )
    kind = "ScaledMM" if route == "w8a16" else "FP8ScaledMM"
    message = (
        f"no CPU kernel for FP8 linears: this vLLM runs FP8 on CPU as {route.upper()}, and "
        f"its CPU {route.upper()} kernel list is empty"
    )
    error = f"ValueError: Failed to find a kernel that can implement the {kind} linear layer"
    if route == "w8a16":  # the weight-only scheme: the plugin's fallback takes its layers
        return served_by_fallback(module, scheme, ctx, True, message, error)
    return Hit(Outcome.NO_KERNEL, message, error)


def check_fp8_moe_cpu(module: Module, ctx: Ctx) -> Hit | None:
    """vLLM's CPU FP8 MoE experts need AMX and SiLU; otherwise the oracle returns NONE and
    converting the weights fails (construction and loading pass), unless the plugin's
    fallback dequantizes them (dequant_fallback/fp8.py)."""
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or scheme is None or scheme.storage != "fp8":
        return None
    features, cpu = ctx.env.features, ctx.env.cpu
    supported = features.get("cpu_fp8_moe_activations")
    activation = features.get("gemma4_moe_activation", "GELU_TANH")
    if supported is None:
        reason = "this vLLM has no CPU FP8 MoE kernel"
    elif cpu is None or not cpu.amx:
        reason = "CPU FP8 MoE needs x86 AMX tiles (this CPU has none)"
    elif activation not in supported:
        reason = f"CPU FP8 MoE runs {'/'.join(supported)}, Gemma 4 uses {activation}"
    else:
        return forced(module, scheme, ctx, linear=False)
    return served_by_fallback(
        module,
        scheme,
        ctx,
        False,
        f"no FP8 MoE backend on this CPU: {reason}",
        "ValueError: Unsupported FP8 MoE backend: NONE",
    )


def check_ct_nvfp4_cpu(module: Module, ctx: Ctx) -> Hit | None:
    """compressed-tensors NVFP4 (FP4 E2M1 weights, W4A4 or W4A16) on CPU: vLLM's NVFP4
    linear kernel table and MoE backends have no CPU entry, so the first NVFP4 linear
    fails at construction (experts would fail after it, at their own method's backend
    selection); the plugin's fallback dequantizes them where it recognizes the code."""
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or scheme is None or scheme.storage != "nvfp4":
        return None
    if scheme.method == "modelopt":  # check_modelopt_nvfp4_cpu
        return None
    if not is_representative(module, ctx) or ctx.env.features.get("cpu_nvfp4_kernels"):
        return None
    if module.kind == "experts":
        return _nvfp4_experts_cpu(module, scheme, ctx)
    layer, _ = vllm_layer(module, ctx)
    message = "no CPU kernel for NVFP4 linears (vLLM's are GPU kernels)"
    error = (
        f"{short_name(layer)}: ValueError: Failed to find a kernel that can implement the "
        "NVFP4 linear layer"
    )
    return served_by_fallback(module, scheme, ctx, True, message, error)


def cpu_wna16_linear_refusal(module: Module, scheme: Scheme, ctx: Ctx) -> str | None:
    """Why CPUWNA16LinearKernel (mixed_precision/cpu.py) cannot take this layer."""
    if scheme.method == "auto-round" and ctx.env.features.get("inc_cpu_unsupported"):
        return "INC on CPU: INC quantization is not supported during xpu kernel migration"
    if scheme.method == "auto-round" and (scheme.bits != 4 or not scheme.symmetric):
        return "INC on CPU: only 4-bit symmetric"
    if scheme.bits != 4:
        return f"Quant type ({scheme.bits}-bit) not supported by CPUWNA16 (4-bit only)"
    group = group_size(scheme)
    if group != -1 and group % 2:
        return f"Group size ({group}) not supported by CPUWNA16"
    shape = partition_shape(module, ctx)
    if shape is None:
        return None
    k, n, _ = shape
    if k % 32:
        return f"Input size ({k}) not supported by CPUWNA16, supported sizes are multiples of 32"
    if n % 32:
        return f"Output size ({n}) not supported by CPUWNA16, supported sizes are multiples of 32"
    return None


def check_modelopt_nvfp4_cpu(module: Module, ctx: Ctx) -> Hit | None:
    """ModelOpt NVFP4 on CPU: every NVFP4 MoE backend and linear kernel vLLM has is a GPU
    kernel (the CPU lists are empty), so the model cannot be built."""
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or scheme is None or scheme.weight_type != "nvfp4":
        return None
    if scheme.method != "modelopt" or not is_representative(module, ctx):
        return None
    if module.kind == "experts":
        return _nvfp4_experts_cpu(module, scheme, ctx)
    message = "no CPU kernel for NVFP4 linears (vLLM's are GPU kernels)"
    error = "ValueError: Failed to find a kernel that can implement the NVFP4 linear layer"
    return served_by_fallback(module, scheme, ctx, True, message, error)


def _nvfp4_experts_cpu(module: Module, scheme: Scheme, ctx: Ctx) -> Hit:
    """NVFP4 experts on CPU: no MoE backend; where a backend's kernel module needs a
    package this environment lacks, vLLM's selection stops on that import first, unless
    the plugin's fallback counts such a backend as unsupported."""
    message = "no NVFP4 MoE backend on CPU (vLLM's are GPU kernels)"
    error = "NotImplementedError: No NvFp4 MoE backend supports the deployment configuration"
    missing = ctx.env.features.get("nvfp4_moe_missing_package")
    oracle_patched = ctx.patched("dequant_fallback") and ctx.env.fallback_mode != "off"
    if missing is None or oracle_patched:
        return served_by_fallback(module, scheme, ctx, False, message, error)
    message += f"; vLLM's backend selection imports a kernel module that needs {missing}"
    error = f"ModuleNotFoundError: No module named '{missing}'"
    return _failing_unless_served(module, scheme, ctx, message, error)


def _failing_unless_served(
    module: Module, scheme: Scheme, ctx: Ctx, message: str, error: str
) -> Hit:
    """Experts that vLLM fails on (``error``) before it could say it has no kernel for
    them, unless the plugin's fallback serves them."""
    hit = served_by_fallback(module, scheme, ctx, False, message, error)
    if hit.outcome is Outcome.PATCHED:
        return hit
    return Hit(Outcome.FAILS, hit.message, hit.example, stage=hit.stage)


def check_wna16_linear_cpu(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or not is_wna16(scheme) or not is_representative(module, ctx):
        return None
    refusal = cpu_wna16_linear_refusal(module, scheme, ctx)
    if refusal is None:
        return forced(module, scheme, ctx, linear=True)
    layer, _ = vllm_layer(module, ctx)
    message = "no CPU kernel for the WNA16 linear layer"
    routed = _inc_routed(scheme, ctx)
    if refusal.startswith("INC") and routed:
        return routed
    if refusal.startswith("INC"):
        error = f"NotImplementedError: {refusal}"
    else:
        error = (
            "ValueError: Failed to find a kernel that can implement the WNA16 linear layer: "
            f"CPUWNA16LinearKernel: {refusal}"
        )
    return served_by_fallback(module, scheme, ctx, True, message, f"{short_name(layer)}: {error}")


def _inc_routed(scheme: Scheme, ctx: Ctx) -> Hit | None:
    """With the plugin, the INC linears vLLM refuses on CPU get vLLM's GPTQ linear method
    (dequant_fallback/inc.py): int8 on 0.20 - 0.29, every width on 0.19."""
    from ..patches import dequant_fallback
    from ..patches.dequant_fallback import inc

    found = dequant_fallback.detect().findings
    generation = found.inc_cpu if found is not None else None
    widths = {inc.GENERATION_CONFIG: (8,), inc.GENERATION_REFUSES: (4, 8)}.get(generation, ())
    if (
        scheme.method != "auto-round"
        or scheme.bits not in widths
        or not scheme.symmetric
        or not ctx.patched(dequant_fallback.NAME)
        or ctx.env.fallback_mode == "off"
    ):
        return None
    refused = "every quantized layer" if generation == inc.GENERATION_REFUSES else "int8 linears"
    return Hit(
        Outcome.PATCHED,
        f"INC refuses {refused} on CPU; the plugin builds them with vLLM's GPTQ linear "
        "method, as INC builds int4 ones on a GPU (vLLM's CPU int4 kernel where it fits, "
        "else dequantized at load)",
        "",
        dequant_fallback.NAME,
    )


def check_cpu_int4_gemm_op(module: Module, ctx: Ctx) -> Hit | None:
    """vLLM picks CPUWNA16LinearKernel on x86 without AVX-512, whose extension lacks its op."""
    scheme = built_scheme(module, ctx)
    cpu = ctx.env.cpu
    if ctx.env.platform != "cpu" or cpu is None or not is_wna16(scheme):
        return None
    if not is_representative(module, ctx) or cpu_wna16_linear_refusal(module, scheme, ctx):
        return None
    if cpu.int4_gemm_op is not False or forced(module, scheme, ctx, linear=True):
        return None
    message = (
        f"vLLM picks CPUWNA16LinearKernel, but torch.ops._C.cpu_gemm_wna16 is not in "
        f"{cpu.kernel_library} (the library this CPU loads: no AVX-512); the server starts "
        "and the first request fails"
    )
    from ..patches import dequant_fallback

    if not dequant_fallback.checked_kernel_ops():
        return Hit(Outcome.NO_KERNEL, message, "fallback: this version does not check ops")
    return served_by_fallback(module, scheme, ctx, True, message, "missing op cpu_gemm_wna16")

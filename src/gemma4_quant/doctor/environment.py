"""The installed vLLM and this machine, as the rules see them.

Facts about vLLM come from its source text (never its version) and from the patches'
cheap ``detect()``; facts about the machine from torch's CPU probes, /proc/cpuinfo and
the vLLM extension libraries. torch is imported only inside the probes, so that the
command line works without it.
"""

from __future__ import annotations

import functools
import importlib.util
import mmap
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..cpu import vector_extensions


@dataclass
class CpuInfo:
    arch: str
    amx: bool
    avx512: bool
    avx512_bf16: bool
    kernel_library: str | None  # the vLLM extension this CPU loads (_C, _C_AVX512, _C_AVX2)
    int4_gemm_op: bool | None  # torch.ops._C.cpu_gemm_wna16 is in that library
    extensions: list[str] = field(default_factory=list)  # AVX2, AVX-512, AMX (/proc/cpuinfo)
    int4_w4a8: bool = False  # vLLM's CPU int4 linear kernel rounds activations to int8


@dataclass
class Environment:
    vllm_version: str
    generation: str | None  # expert_names: substring, dotted, underscore, generic
    generation_reason: str
    silent_skip: bool  # 0.24 - 0.30: unmatched checkpoint names are skipped silently
    patches: dict[str, tuple[str, str]]  # name -> (detect() status, reason)
    plugin: bool  # vLLM loads the plugin in this environment
    plugin_reason: str
    disabled_patches: set[str]
    fallback_mode: str
    platform: str  # cpu, cuda, rocm, unknown
    capability: int | None  # CUDA compute capability as 90 for 9.0
    device: str
    cpu: CpuInfo | None
    features: dict[str, Any]
    tensor_parallel: int = 1
    given_platform: bool = False  # --cuda-capability: another machine than this one

    def active_patches(self) -> frozenset[str]:
        if not self.plugin:
            return frozenset()
        return frozenset(
            name
            for name, (status, _) in self.patches.items()
            if status == "needed" and name not in self.disabled_patches
        )


GENERATIONS = {
    "substring": "0.19.0 expert mapping (substring match)",
    "dotted": "0.19.1 - 0.20.2 expert mapping (dotted names, D2)",
    "underscore": "0.21 - 0.30 expert mapping (knows `_<suffix>` names)",
    "generic": "0.31+ loader (AutoWeightsLoader, generic fused-expert names)",
}

_MP_KERNEL_LISTS = (
    "model_executor/kernels/linear/__init__.py",
    "model_executor/layers/quantization/kernels/mixed_precision/__init__.py",
)
_MP_KERNEL_DIRS = (
    "model_executor/kernels/linear/mixed_precision/",
    "model_executor/layers/quantization/kernels/mixed_precision/",
)
_CT_MOE_DIR = "model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/"


def _source(*relpaths: str) -> str:
    """The text of the first of ``relpaths`` the installed vLLM has ('' if none)."""
    from ..patches import vllm_source

    for relpath in relpaths:
        text = vllm_source(relpath)
        if text is not None:
            return text
    return ""


def _class_body(text: str, name: str) -> str:
    if f"class {name}" not in text:
        return ""
    return text.split(f"class {name}", 1)[1].split("\nclass ", 1)[0]


def _kernel_list(text: str, platform: str, table: str = "_POSSIBLE_KERNELS") -> list[str]:
    """Kernels vLLM tries on ``platform``, in order, from one of the ``_POSSIBLE_*KERNELS``
    tables of kernels/linear/__init__.py (default: mixed-precision WNA16 linears)."""
    block = re.search(rf"^{table}\b.*?^\}}", text, re.S | re.M)
    if block is None:
        return []
    match = re.search(rf"PlatformEnum\.{platform}: \[(.*?)\]", block.group(0), re.S)
    body = re.sub(r"#[^\n]*", "", match.group(1)) if match else ""
    return re.findall(r"(\w+Kernel)\b", body)


def _activations(class_body: str) -> list[str] | None:
    """MoE activations an experts class accepts (its ``_supports_activation``)."""
    if not class_body:
        return None
    body = class_body.split("def _supports_activation", 1)[-1].split("def ", 1)[0]
    return sorted(set(re.findall(r"MoEActivation\.(\w+)", body)))


def _inc_cpu_moe_unquantized(scheme_text: str, old_text: str) -> bool:
    """AutoRound (INC) experts on CPU get UnquantizedFusedMoEMethod: an ``is_cpu()``
    branch of ``get_moe_method`` returning it (0.24+), or the old INC config's CPU path,
    which quantizes linear layers only (<= 0.23)."""
    body = scheme_text.split("def get_moe_method", 1)[-1].split("\ndef ", 1)[0]
    branch = re.search(r"is_cpu\(\)[^\n]*:\n((?:\s{12,}[^\n]*\n|\s*\n)*)", body)
    if branch and "UnquantizedFusedMoEMethod" in branch.group(1):
        return True
    return "def apply_cpu_w4a16_quant_layer" in old_text


def vllm_features() -> dict[str, Any]:
    """What the installed vLLM code does, read from its source text (never its version).

    Each entry is one fact a rule depends on.
    """
    from ..patches.dequant_fallback.gptq_moe import gptq_moe_module, marlin_workspace_methods
    from ..patches.dequant_fallback.nvfp4 import unimportable_moe_backend

    gptq_moe = gptq_moe_module()
    single_file = "model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe.py"
    wna16_moe = _source(_CT_MOE_DIR + "compressed_tensors_moe_wna16.py", single_file)
    marlin_moe = _source(_CT_MOE_DIR + "compressed_tensors_moe_wna16_marlin.py", single_file)
    cpu_moe = _source("model_executor/layers/fused_moe/experts/cpu_moe.py")
    gemma4 = _source("model_executor/models/gemma4.py")
    kernels = _source(*_MP_KERNEL_LISTS)
    marlin = _source(*(d + "marlin.py" for d in _MP_KERNEL_DIRS))
    triton_w4a16 = _source(*(d + "triton_w4a16.py" for d in _MP_KERNEL_DIRS))
    inc_scheme = _source("model_executor/layers/quantization/inc/schemes/inc_wna16_scheme.py")
    inc_old = _source("model_executor/layers/quantization/inc.py")
    cpu_platform = _source("platforms/cpu.py")
    ct_config = _source(
        "model_executor/layers/quantization/compressed_tensors/compressed_tensors.py"
    )
    ct_wna16_linear = _source(
        "model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py"
    )
    gemma4_mm = _source("model_executor/models/gemma4_mm.py")
    ct_w8a16_fp8 = _source(
        "model_executor/layers/quantization/compressed_tensors/schemes/"
        "compressed_tensors_w8a16_fp8.py"
    )
    cuda_kernels = _kernel_list(kernels, "CUDA")
    if "only targets ROCm" in triton_w4a16:
        cuda_kernels = [k for k in cuda_kernels if k != "TritonW4A16LinearKernel"]
    return {
        # compressed-tensors WNA16 MoE: one method with a backend oracle (0.30+); Marlin
        # method with the oracle, else the Triton method (0.23 - 0.29); Marlin method when
        # the shapes fit, else the Triton method (up to 0.21)
        "wna16_moe_selection": "oracle"
        if "select_wna16_moe_backend(" in wna16_moe
        else "hybrid"
        if "select_wna16_moe_backend(" in marlin_moe
        else "legacy",
        # the Triton method (and before 0.23 the Marlin one) asserts symmetric weights
        "moe_symmetric_only": "Only symmetric quantization is supported for MoE" in wna16_moe,
        "marlin_moe_symmetric_only": (
            "Only symmetric quantization is supported for MoE"
            in marlin_moe.split("class CompressedTensorsWNA16MarlinMoEMethod", 1)[-1]
        ),
        # activations vLLM's CPU int4 and fp8 MoE kernels (AMX) run; None: no such kernel
        "cpu_int4_moe_activations": _activations(_class_body(cpu_moe, "CPUExpertsInt4")),
        "cpu_fp8_moe_activations": _activations(_class_body(cpu_moe, "CPUExpertsFp8")),
        "gemma4_moe_activation": (
            "GELU_TANH" if re.search(r"activation=\"gelu_tanh\"|GELU_TANH", gemma4) else "GELU"
        ),
        "cuda_linear_kernels": cuda_kernels,
        "cpu_linear_kernels": _kernel_list(kernels, "CPU"),
        # compressed-tensors FP8 W8A8 on a platform without a compute capability (CPU):
        # W8A8 kernels (0.24+: "return not match_exact") or W8A16 kernels ("return False")
        "cpu_fp8_route": "w8a8" if "return not match_exact" in ct_config else "w8a16",
        # NVFP4 linears on CPU: vLLM's kernel table has no CPU entry (0.20 - 0.32)
        "cpu_nvfp4_kernels": _kernel_list(kernels, "CPU", "_POSSIBLE_NVFP4_KERNELS"),
        # a package an NVFP4 MoE backend's kernel module imports at its top and this
        # environment lacks (0.19: flashinfer): the backend selection stops on it
        "nvfp4_moe_missing_package": unimportable_moe_backend(),
        # GPTQ's MoE method is Marlin's, which sizes its workspace by the device's
        # compute units at construction (0.19); vLLM's CPU platform counts none
        "gptq_moe_marlin_workspace": bool(gptq_moe and marlin_workspace_methods(gptq_moe))
        and "def num_compute_units" not in _source("platforms/cpu.py"),
        "cpu_fp8_kernels": {
            "w8a8": _kernel_list(kernels, "CPU", "_POSSIBLE_FP8_KERNELS"),
            "w8a16": _kernel_list(kernels, "CPU", "_POSSIBLE_WFP8A16_KERNELS"),
        },
        # the W8A16 FP8 scheme calls Marlin FP8 itself, choosing no kernel (0.19): on CPU
        # construction and loading pass, repacking needs CUDA
        "fp8_w8a16_marlin_only": "apply_fp8_marlin_linear" in ct_w8a16_fp8
        and "linear_kernel" not in ct_w8a16_fp8,
        # the WNA16 MoE method refuses a TP split that cuts a scale group (0.30+); before,
        # each rank narrowed I / TP // group scale columns from group rank * that: the
        # wrong groups for every column past the first cut
        "moe_tp_group_check": "otherwise cross TP shard boundaries" in wna16_moe,
        # a row-parallel WNA16 linear whose share splits a group: ValueError from
        # verify_group_size_divides_partition (0.26+), else a bare assert
        "linear_tp_group_error": "verify_group_size_divides_partition(" in ct_wna16_linear,
        # Marlin linear zero-pads misaligned shapes (0.24+); before: N % 64, K % 128
        "marlin_pads": "Tile misalignment is fixed" in marlin,
        # AutoRound (INC) MoE on CPU is built unquantized
        "inc_cpu_moe_unquantized": _inc_cpu_moe_unquantized(inc_scheme, inc_old),
        # 0.19.0: every quantized AutoRound layer raises on CPU
        "inc_cpu_unsupported": "not supported during xpu kernel migration" in inc_old,
        # which x86 kernel library the CPU platform imports
        "cpu_kernel_libraries": "_C_AVX2" in cpu_platform,
        "router_passes_quant_config": None,  # filled from the router patch's detect()
        **_multimodal_features(gemma4_mm),
    }


def _multimodal_features(source: str) -> dict[str, Any]:
    """What Gemma4ForConditionalGeneration (gemma4_mm.py) does with its towers."""
    tower = re.search(r"get_name\(\) in \[(.*?)\]:\s*\n\s*tower_quant = quant_config", source, re.S)
    return {
        # the class builds its vision tower whatever the config says (vision_config null:
        # AutoModel.from_config(None) raises)
        "mm_tower_unconditional": "AutoModel.from_config(config=config.vision_config)" in source
        and not re.search(r"config\.vision_config is (not )?None", source),
        # the towers' linears are built with the quantization config (0.26+): every
        # linear for the methods listed, else only where the tower's dims divide 64;
        # before, they are plain unquantized linears whatever the config says
        "towers_take_quant_config": "recursive_replace_linear(" in source
        and "tower_quant" in source,
        "tower_quant_methods": re.findall(r'"([\w-]+)"', tower.group(1)) if tower else [],
    }


def _cpu_info(features: dict[str, Any]) -> CpuInfo:
    import platform as host

    import torch

    arch = host.machine().lower()
    cpu = getattr(torch, "cpu", None)

    def flag(name: str) -> bool:
        probe = getattr(cpu, name, None)
        try:
            return bool(probe()) if probe is not None else False
        except Exception:
            return False

    amx, avx512 = flag("_is_amx_tile_supported"), flag("_is_avx512_supported")
    avx512_bf16 = flag("_is_avx512_bf16_supported")
    library = "_C"
    if arch in ("x86_64", "amd64") and features.get("cpu_kernel_libraries"):
        # as CpuPlatform.import_kernels chooses
        library = "_C" if avx512 and avx512_bf16 else "_C_AVX512" if avx512 else "_C_AVX2"
    return CpuInfo(
        arch,
        amx,
        avx512,
        avx512_bf16,
        library,
        _library_has(library, b"cpu_gemm_wna16"),
        vector_extensions(),
        _int4_w4a8(amx),
    )


def _int4_w4a8(amx: bool) -> bool:
    """Whether vLLM will run int4 linears as W4A8 here: its CPUWNA16 kernel has the path,
    the CPU has AMX tiles, and VLLM_CPU_INT4_W4A8 (default 1) does not turn it off."""
    kernel = _source(*(d + "cpu.py" for d in _MP_KERNEL_DIRS))
    switch = os.environ.get("VLLM_CPU_INT4_W4A8", "1").strip()
    return amx and "use_w4a8" in kernel and switch not in ("0", "")


def _library_has(library: str, symbol: bytes) -> bool | None:
    """Whether vLLM's extension ``library`` contains ``symbol`` (a registered op name)."""
    spec = importlib.util.find_spec("vllm")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for path in Path(root).glob(f"{library}.*.so"):
            with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
                return m.find(symbol) >= 0
    return None


def _plugin_state(stock: bool) -> tuple[bool, str]:
    from importlib.metadata import entry_points

    from .. import envs

    if stock:
        return False, "--stock: stock vLLM, no plugin"
    names = {ep.name for ep in entry_points(group="vllm.general_plugins")}
    if "gemma4_quant" not in names:
        return False, "the gemma4_quant vllm.general_plugins entry point is not installed"
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "gemma4_quant" not in allowed.split(","):
        return False, f"VLLM_PLUGINS={allowed!r} does not name gemma4_quant"
    if envs.disabled():
        return False, "GEMMA4_QUANT_DISABLE is set"
    return True, "vLLM loads the gemma4_quant plugin"


def probe_environment(
    *, stock: bool = False, cuda_capability: str | None = None, tensor_parallel: int = 1
) -> Environment:
    from .. import envs, vllm_version
    from ..patches import expert_names, plan

    features = vllm_features()
    patches = {item.name: (item.detection.status.value, item.detection.reason) for item in plan()}
    router = patches.get("router", ("", ""))
    features["router_passes_quant_config"] = router[0] == "not needed"
    generation, why = expert_names.generation()
    silent = patches["load_guard"][0] == "needed"
    plugin, plugin_reason = _plugin_state(stock)
    platform, capability, device, cpu = _platform(cuda_capability, features)
    return Environment(
        vllm_version(),
        generation,
        why,
        silent,
        patches,
        plugin,
        plugin_reason,
        envs.disabled_patches(),
        envs.fallback_mode(),
        platform,
        capability,
        device,
        cpu,
        features,
        tensor_parallel,
        given_platform=cuda_capability is not None,
    )


@functools.cache
def gemma4_processor_imports() -> bool:
    """Whether transformers' Gemma4Processor imports in this environment: vLLM imports it
    when it inspects the multimodal architecture (transformers 5.16 - 5.19 import their
    torchvision image processor there)."""
    try:
        from transformers.models.gemma4 import Gemma4Processor  # noqa: F401
    except Exception:
        return False
    return True


def torchvision_works() -> bool:
    """Whether torchvision imports beside this torch, with its compiled ops (a CUDA build
    of it beside a CPU torch does not): what transformers' Gemma4VideoProcessor needs,
    and so Gemma4Processor, and so every image request."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torch
        import torchvision  # noqa: F401

        torch.ops.torchvision.nms  # noqa: B018
    except Exception:
        return False
    return True


def _platform(
    cuda_capability: str | None, features: dict[str, Any]
) -> tuple[str, int | None, str, CpuInfo | None]:
    if cuda_capability:
        major, _, minor = cuda_capability.partition(".")
        return "cuda", int(major) * 10 + int(minor or 0), f"CUDA {cuda_capability} (given)", None
    try:
        import torch
    except ImportError:
        return "unknown", None, "torch is not installed", None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        name = torch.cuda.get_device_name(0)
        if getattr(torch.version, "hip", None):
            return "rocm", major * 10 + minor, name, None
        return "cuda", major * 10 + minor, f"{name} (compute capability {major}.{minor})", None
    cpu = _cpu_info(features)
    extensions = ", ".join(cpu.extensions) or "no AVX2"
    activations = "W4A8 (int8 activations)" if cpu.int4_w4a8 else "W4A16"
    return (
        "cpu",
        None,
        f"CPU {cpu.arch} ({extensions}), vLLM kernel library {cpu.kernel_library},"
        f" int4 linears run {activations}",
        cpu,
    )

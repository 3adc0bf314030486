"""``gemma4-quant doctor``: will this vLLM serve that checkpoint? Known before the download.

Every fact needed is in the checkpoint's ``config.json``, its safetensors index and the
safetensors *headers* (an 8-byte little-endian length, then a JSON table of names, dtypes
and shapes: a few MB for a 15 GB checkpoint), plus the installed vLLM and this machine.
doctor reads exactly those (for a hub repository: ``config.json`` and huggingface_hub's
header-only safetensors metadata, never a weight), then:

1. describes the checkpoint: fused 3D or per-expert experts; quantization method, bits,
   group size, symmetry; which modules are quantized (attention, experts, dense MLP,
   router), as stored and as the config's ignore list / targets tell vLLM to build them;
   ``_shape`` / ``_g_idx`` / zero-point tensors; vision and audio towers;
2. looks at the installed vLLM (which Gemma 4 loader generation, which of this project's
   patches it needs: each patch's cheap ``detect()``), whether vLLM will load the plugin
   here, and at this machine (GPU compute capability, or the CPU and its vLLM kernel
   library);
3. runs the rules (doctor's own and each patch's ``doctor_rules()``) twice, for stock
   vLLM and for vLLM with the plugin's patches, and predicts what happens: it loads (as
   is, or thanks to named patches), it loads silently wrong, it fails (with the tensor),
   or vLLM has no kernel for a layer (with the reason, and whether the plugin's
   dequantizing fallback serves it).

The prediction is for vLLM as it would run here: with the plugin when vLLM loads it
(``VLLM_PLUGINS``, ``GEMMA4_QUANT_DISABLE``, ``GEMMA4_QUANT_DISABLE_PATCHES``,
``GEMMA4_QUANT_FALLBACK`` are honoured), or stock with ``--stock``.

Exit codes:
    0   loads: as is, or with the plugin's patches (they are named)
    1   fails: vLLM stops with an error naming a tensor or layer (KeyError, ValueError, ...)
    2   loads silently wrong: a weight stays uninitialized and the model talks garbage
    3   no kernel: vLLM has no kernel for a quantized layer on this machine
    4   no prediction: vLLM is not installed, or its code or this platform is one the
        rules do not know
    10  checkpoint not found (no such directory, no config.json, no safetensors files)
    11  checkpoint unreadable (config.json or index not JSON, truncated safetensors header
        or file, a shard the index names is missing)
    12  hub unreachable (offline, network error, timeout)
    13  hub repository, revision or file not found, or access denied
    14  huggingface_hub is not installed (needed for hub repositories)
    15  usage error (bad arguments to doctor)
"""

from __future__ import annotations

from .analysis import Analysis, analyze
from .checkpoint import (
    Checkpoint,
    InputError,
    TensorInfo,
    read_checkpoint,
    read_safetensors_header,
)
from .cli import add_arguments, doctor, run
from .core import EXIT_CODES, Ctx, ExitCode, Hit, Module, Outcome, Rule, Scheme, Stage
from .environment import CpuInfo, Environment, _cpu_info, probe_environment, vllm_features
from .predict import DOCTOR_RULES, Finding, Prediction, collect_rules, evaluate, overall
from .report import describe_checkpoint, describe_environment, format_report, notes, report_dict

__all__ = [
    "DOCTOR_RULES",
    "EXIT_CODES",
    "Analysis",
    "Checkpoint",
    "CpuInfo",
    "Ctx",
    "Environment",
    "ExitCode",
    "Finding",
    "Hit",
    "InputError",
    "Module",
    "Outcome",
    "Prediction",
    "Rule",
    "Scheme",
    "Stage",
    "TensorInfo",
    "_cpu_info",
    "add_arguments",
    "analyze",
    "collect_rules",
    "describe_checkpoint",
    "describe_environment",
    "doctor",
    "evaluate",
    "format_report",
    "notes",
    "overall",
    "probe_environment",
    "read_checkpoint",
    "read_safetensors_header",
    "report_dict",
    "run",
    "vllm_features",
]

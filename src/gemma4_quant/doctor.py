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
3. runs the rules of :data:`RULES` twice, for stock vLLM and for vLLM with the plugin's
   patches, and predicts what happens: it loads (as is, or thanks to named patches), it
   loads silently wrong, it fails (with the tensor), or vLLM has no kernel for a layer
   (with the reason, and whether the plugin's dequantizing fallback serves it).

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

import argparse
import dataclasses
import enum
import importlib.util
import json
import mmap
import os
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .cpu import vector_extensions

# --------------------------------------------------------------------- outcomes


class ExitCode(enum.IntEnum):
    LOADS = 0
    FAILS = 1
    SILENTLY_WRONG = 2
    NO_KERNEL = 3
    UNKNOWN = 4
    NOT_FOUND = 10
    UNREADABLE = 11
    HUB_UNREACHABLE = 12
    HUB_NOT_FOUND = 13
    NO_HUB_CLIENT = 14
    USAGE = 15


class Outcome(str, enum.Enum):
    """What a load ends with. PATCHED marks a problem that one of the patches removes."""

    LOADS = "loads"
    LOADS_WITH_PLUGIN = "loads with the plugin"
    PATCHED = "patched"
    SILENTLY_WRONG = "silently wrong"
    FAILS = "fails"
    NO_KERNEL = "no kernel"
    UNKNOWN = "unknown"


EXIT_CODES = {
    Outcome.LOADS: ExitCode.LOADS,
    Outcome.LOADS_WITH_PLUGIN: ExitCode.LOADS,
    Outcome.SILENTLY_WRONG: ExitCode.SILENTLY_WRONG,
    Outcome.FAILS: ExitCode.FAILS,
    Outcome.NO_KERNEL: ExitCode.NO_KERNEL,
    Outcome.UNKNOWN: ExitCode.UNKNOWN,
}


class Stage(enum.IntEnum):
    """When vLLM meets a problem; a load stops at the first hard one."""

    BUILD = 1  # model construction: quantization methods and kernels are chosen
    LOAD = 2  # weight loading: checkpoint names meet parameters
    PROCESS = 3  # process_weights_after_loading: repacking for the kernel
    RUN = 4  # first forward pass

    @property
    def label(self) -> str:
        return _STAGE_LABELS[self]


_STAGE_LABELS = {
    Stage.BUILD: "model construction",
    Stage.LOAD: "weight loading",
    Stage.PROCESS: "weight processing",
    Stage.RUN: "first forward pass",
}


class InputError(Exception):
    """A checkpoint doctor cannot read: a message for the user and its exit code."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------- reading


class TensorInfo(NamedTuple):
    dtype: str  # safetensors dtype string: BF16, I32, F8_E4M3, U8, ...
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    source: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    files: list[str]


INDEX_FILE = "model.safetensors.index.json"
# A safetensors header is JSON of ~200 bytes per tensor; anything beyond this is a
# corrupt length field, not a header worth reading.
MAX_HEADER_BYTES = 512 * 2**20


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of one safetensors file, from its header alone.

    Layout: 8-byte little-endian header length N, N bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``),
    then the data. Offsets are checked against the file size, so a truncated download is
    reported here instead of halfway through vLLM's load.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise InputError(
                ExitCode.UNREADABLE, f"{path}: {size} bytes, too short for a safetensors header"
            )
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise InputError(
                ExitCode.UNREADABLE,
                f"{path}: header length {length} but the file has {size} bytes "
                "(truncated or not a safetensors file)",
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(
            ExitCode.UNREADABLE, f"{path}: safetensors header is not JSON ({exc})"
        ) from None
    if not isinstance(header, dict):
        raise InputError(ExitCode.UNREADABLE, f"{path}: safetensors header is not a table")
    data_size = size - 8 - length
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape = str(entry["dtype"]), tuple(int(d) for d in entry["shape"])
            end = int(entry["data_offsets"][1])
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(
                ExitCode.UNREADABLE, f"{path}: malformed header entry for {name!r}"
            ) from None
        if end > data_size:
            raise InputError(
                ExitCode.UNREADABLE,
                f"{path}: tensor {name!r} ends at byte {end} of the data, which has "
                f"{data_size} bytes (truncated download?)",
            )
        tensors[name] = TensorInfo(dtype, shape)
    return tensors


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(ExitCode.UNREADABLE, f"{path}: {what} is not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(ExitCode.UNREADABLE, f"{path}: {what} is not a JSON object")
    return data


def read_local(directory: Path) -> Checkpoint:
    if not directory.is_dir():
        raise InputError(ExitCode.NOT_FOUND, f"{directory}: not a directory")
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise InputError(ExitCode.NOT_FOUND, f"{directory}: no config.json")
    config = _read_json(config_path, "config.json")
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_json(index_path, INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise InputError(ExitCode.UNREADABLE, f"{index_path}: no weight_map")
        files = sorted(set(map(str, weight_map.values())))
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise InputError(
                ExitCode.UNREADABLE,
                f"{index_path} names {len(missing)} missing shard(s): {', '.join(missing[:3])}",
            )
    else:
        files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            raise InputError(ExitCode.NOT_FOUND, f"{directory}: no *.safetensors files")
    tensors: dict[str, TensorInfo] = {}
    for name in files:
        tensors.update(read_safetensors_header(directory / name))
    return Checkpoint(str(directory), config, tensors, files)


_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def read_hub(repo_id: str, revision: str | None) -> Checkpoint:
    """config.json and the safetensors headers of a hub repository; never a weight."""
    try:
        import huggingface_hub
    except ImportError:
        raise InputError(
            ExitCode.NO_HUB_CLIENT,
            f"{repo_id!r} is not a local directory, and huggingface_hub (needed to read "
            "a hub repository) is not installed",
        ) from None
    try:
        # First the metadata call: it does not retry, so an unreachable hub is reported
        # in about a second (hf_hub_download would retry for half a minute).
        metadata = huggingface_hub.get_safetensors_metadata(repo_id, revision=revision)
        config_path = huggingface_hub.hf_hub_download(repo_id, "config.json", revision=revision)
    except Exception as exc:
        raise _hub_error(repo_id, exc) from None
    config = _read_json(Path(config_path), "config.json")
    tensors = {}
    for file_meta in metadata.files_metadata.values():
        for name, info in file_meta.tensors.items():
            tensors[name] = TensorInfo(str(info.dtype), tuple(int(d) for d in info.shape))
    return Checkpoint(f"hub:{repo_id}", config, tensors, sorted(metadata.files_metadata))


def _hub_error(repo_id: str, exc: Exception) -> InputError:
    """Sort huggingface_hub's exceptions into 'cannot reach' and 'not there'."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    text = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError"}:
        return InputError(
            ExitCode.HUB_UNREACHABLE,
            f"{repo_id}: the hub cannot be reached (offline mode or no network) and the "
            f"files are not cached: {text}",
        )
    if names & {
        "RepositoryNotFoundError",
        "GatedRepoError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "RemoteEntryNotFoundError",
        "NotASafetensorsRepoError",
        "DisabledRepoError",
    }:
        return InputError(ExitCode.HUB_NOT_FOUND, f"{repo_id}: {text}")
    if "SafetensorsParsingError" in names:
        return InputError(ExitCode.UNREADABLE, f"{repo_id}: {text}")
    # Connection refused, DNS failure, timeouts: httpx's and requests' errors and OSError.
    return InputError(ExitCode.HUB_UNREACHABLE, f"{repo_id}: the hub cannot be reached: {text}")


def read_checkpoint(source: str, revision: str | None = None) -> Checkpoint:
    path = Path(source).expanduser()
    if path.exists():
        return read_local(path)
    if _REPO_ID.match(source) and not source.startswith((".", "/", "~")):
        return read_hub(source, revision)
    raise InputError(ExitCode.NOT_FOUND, f"{source}: no such directory (nor a hub repo id)")


# --------------------------------------------------------------------- the checkpoint


@dataclass(frozen=True)
class Scheme:
    """A weight quantization scheme, as the config asks vLLM to build a module."""

    method: str  # compressed-tensors, auto-round, gptq, awq, fp8, modelopt, ...
    weight_type: str  # int, float, nvfp4, mxfp4, unknown
    bits: int | None
    group_size: int | None  # -1: per channel
    symmetric: bool | None
    strategy: str | None = None
    actorder: str | None = None
    activations: str | None = None  # None: weight-only
    format: str | None = None

    @property
    def storage(self) -> str:
        """The tensors a module built with this scheme expects (see Module.stored)."""
        if self.method in ("auto-round", "gptq", "awq"):
            return "gptq"
        if self.weight_type == "int" and self.format in (None, "pack-quantized"):
            return "int-packed"
        if self.weight_type == "int":
            return "int8"
        if self.weight_type == "float" and self.bits == 8:
            return "fp8"
        return self.weight_type

    def describe(self) -> str:
        if self.weight_type == "float" and self.bits == 8:
            text = "fp8"
        elif self.weight_type in ("nvfp4", "mxfp4"):
            text = self.weight_type
        else:
            text = f"{self.weight_type}{self.bits or '?'}"
        if self.group_size and self.group_size > 0:
            text += f" g{self.group_size}"
        elif self.strategy:
            text += f" per-{self.strategy}"
        if self.symmetric is not None and self.weight_type == "int":
            text += " sym" if self.symmetric else " asym"
        if self.actorder:
            text += f" actorder={self.actorder}"
        text += f" a:{self.activations}" if self.activations else " weight-only"
        return text


@dataclass
class Module:
    """One weight-bearing module of the checkpoint (experts: one per layer)."""

    name: str  # checkpoint name, e.g. model.language_model.layers.0.self_attn.q_proj
    kind: str  # attention, dense_mlp, router, experts, embedding, lm_head, vision, audio
    layer: int | None
    stored: str  # bf16 (unquantized), int-packed, gptq, awq, fp8, nvfp4, unknown
    tensors: list[str] = field(default_factory=list)
    fused_experts: bool = False  # fused 3D [E, ...] tensors (vs experts.{e}.{proj})
    in_features: int | None = None
    out_features: int | None = None
    scheme: Scheme | None = None  # what the config asks for (None: unquantized)
    scheme_note: str = ""  # why the config says so (ignore entry, target, ...)
    shard_conflict: str = ""  # shards of one vLLM layer quantized differently

    @property
    def short(self) -> str:
        return _short(self.name)


@dataclass
class Analysis:
    checkpoint: Checkpoint
    text_config: dict[str, Any]
    architecture: str
    multimodal: bool
    towers: list[str]
    quant_config: dict[str, Any] | None
    quant_method: str | None
    modules: list[Module]
    expert_layout: str  # fused-3d, per-expert, none
    extra_expert_tensors: dict[str, list[str]]  # suffix -> names (shape, g_idx, zero_point)
    dtype: str

    def of_kind(self, *kinds: str) -> list[Module]:
        return [m for m in self.modules if m.kind in kinds]


_QUANT_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "weight_global_scale",
    "input_global_scale",
    "input_scale",
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
    "weight",
    "bias",
)
_FUSED_EXPERT = re.compile(
    r"^(?P<module>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)"
    r"(?:_(?P<suffix>packed|scale|zero_point|shape|g_idx))?$"
)
_PER_EXPERT = re.compile(
    r"^(?P<module>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<suffix>\w+)$"
)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# (kind, pattern on the module name): first match wins.
_KINDS = (
    ("vision", re.compile(r"(^|\.)(vision_tower|embed_vision|multi_modal_projector)(\.|$)")),
    ("audio", re.compile(r"(^|\.)(audio_tower|embed_audio)(\.|$)")),
    ("experts", re.compile(r"\.experts$")),
    ("router", re.compile(r"\.router\.proj$")),
    ("attention", re.compile(r"\.self_attn\.[qkvo]_proj$")),
    ("dense_mlp", re.compile(r"\.mlp\.(gate|up|down)_proj$")),
    ("embedding", re.compile(r"embed_tokens(_per_layer)?$")),
    ("lm_head", re.compile(r"(^|\.)lm_head$")),
)
LINEAR_KINDS = ("attention", "dense_mlp", "router")
# Order of construction inside a decoder layer (a load stops at the first failure).
_KIND_ORDER = {"attention": 0, "dense_mlp": 1, "router": 2, "experts": 3}


def _short(name: str) -> str:
    """model.language_model.layers.3.mlp.down_proj -> layers.3.mlp.down_proj"""
    match = re.search(r"(?:^|\.)(layers\.\d+\..*)$", name)
    return match.group(1) if match else name


def _stored_format(suffixes: dict[str, TensorInfo]) -> str:
    """How one module's (or one expert's) weight is stored, from its tensor suffixes."""
    if "weight_packed" in suffixes:
        if suffixes["weight_packed"].dtype == "U8" or "weight_global_scale" in suffixes:
            return "nvfp4"
        return "int-packed"
    if "qweight" in suffixes:  # GPTQ, AWQ and AutoRound share the qweight family
        return "gptq"
    weight = suffixes.get("weight")
    if weight is None:
        return "unknown"
    if weight.dtype.startswith("F8"):
        return "fp8"
    if weight.dtype in ("I8", "U8"):
        return "int8"
    return "bf16"


def _group_modules(tensors: dict[str, TensorInfo]) -> tuple[list[Module], dict[str, list[str]]]:
    """Checkpoint tensors -> modules. Experts are one module per layer."""
    plain: dict[str, dict[str, TensorInfo]] = {}
    experts: dict[str, dict[str, Any]] = {}
    extra: dict[str, list[str]] = {}
    for name, info in tensors.items():
        fused = _FUSED_EXPERT.match(name)
        per_expert = _PER_EXPERT.match(name) if fused is None else None
        if fused is not None:
            entry = experts.setdefault(fused["module"], {"fused": True, "parts": {}, "names": []})
            suffix = fused["suffix"] or "weight"
            entry["parts"][(fused["proj"], suffix)] = info
            entry["names"].append(name)
            if suffix in ("shape", "g_idx", "zero_point"):
                extra.setdefault(suffix, []).append(name)
        elif per_expert is not None:
            entry = experts.setdefault(
                per_expert["module"], {"fused": False, "parts": {}, "names": []}
            )
            if per_expert["expert"] == "0":
                entry["parts"][(per_expert["proj"], per_expert["suffix"])] = info
            entry["names"].append(name)
            # GPTQ's qzeros belong to its format (symmetric too): not counted
            if per_expert["suffix"] in ("weight_zero_point", "weight_g_idx"):
                extra.setdefault(per_expert["suffix"][7:], []).append(name)
        else:
            module, _, suffix = name.rpartition(".")
            if suffix in _QUANT_SUFFIXES and module:
                plain.setdefault(module, {})[suffix] = info
    modules = []
    for name, suffixes in plain.items():
        kind = _kind(name)
        weight = suffixes.get("weight")
        if kind is None or (weight is not None and len(weight.shape) < 2 and len(suffixes) == 1):
            continue  # norms, scalars, router.scale: not quantization candidates
        tensor_names = [f"{name}.{suffix}" for suffix in sorted(suffixes)]
        module = Module(name, kind, _layer(name), _stored_format(suffixes), tensor_names)
        module.out_features, module.in_features = _linear_dims(suffixes)
        modules.append(module)
    for name, entry in experts.items():
        parts = entry["parts"]
        if entry["fused"]:
            suffixes = {
                ("weight_" + s if s in ("packed", "scale", "zero_point") else s): info
                for (_, s), info in parts.items()
            }
        else:
            suffixes = {s: info for (_, s), info in parts.items()}
        stored = _stored_format(suffixes)
        modules.append(
            Module(name, "experts", _layer(name), stored, entry["names"], entry["fused"])
        )
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.name))
    return modules, extra


def _kind(name: str) -> str | None:
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind
    return None


def _layer(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def _linear_dims(suffixes: dict[str, TensorInfo]) -> tuple[int | None, int | None]:
    """(out, in) of a 2D linear weight; packed widths are resolved once bits are known."""
    if "qweight" in suffixes:  # GPTQ: [in / pack, out]
        rows, cols = suffixes["qweight"].shape[:2]
        return cols, rows  # in is still packed: fixed in _resolve_dims
    for key in ("weight_packed", "weight"):
        info = suffixes.get(key)
        if info is not None and len(info.shape) == 2:
            return info.shape[0], info.shape[1]
    return None, None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def analyze(ckpt: Checkpoint) -> Analysis:
    config = ckpt.config
    text = _text_config(config)
    architectures = config.get("architectures") or [""]
    architecture = str(architectures[0])
    modules, extra = _group_modules(ckpt.tensors)
    towers = sorted(
        {m.kind for m in modules if m.kind in ("vision", "audio")}
        | {k.removesuffix("_config") for k in ("vision_config", "audio_config") if config.get(k)}
    )
    quant_config = config.get("quantization_config")
    if not isinstance(quant_config, dict):
        quant_config = None
    quant_method = _quant_method(quant_config)
    experts = [m for m in modules if m.kind == "experts"]
    layout = "none"
    if experts:
        layout = "fused-3d" if any(m.fused_experts for m in experts) else "per-expert"
    dtype = str(config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or "")
    analysis = Analysis(
        ckpt,
        text,
        architecture,
        "ConditionalGeneration" in architecture,
        towers,
        quant_config,
        quant_method,
        modules,
        layout,
        extra,
        dtype or "bfloat16",
    )
    for module in modules:
        _assign_scheme(module, analysis)
        _resolve_dims(module, analysis)
    return analysis


def _quant_method(quant_config: dict[str, Any] | None) -> str | None:
    if quant_config is None:
        return None
    method = str(quant_config.get("quant_method") or "").lower()
    if not method and "config_groups" in quant_config:
        method = "compressed-tensors"
    return method or "unknown"


def _resolve_dims(module: Module, analysis: Analysis) -> None:
    text = analysis.text_config
    if module.kind == "experts":
        module.out_features = text.get("moe_intermediate_size")
        module.in_features = text.get("hidden_size")
        return
    scheme = module.scheme
    bits = scheme.bits if scheme and scheme.bits else 4
    if module.in_features is not None and module.stored in ("int-packed", "gptq", "awq"):
        module.in_features *= 32 // bits


# --------------------------------------------------------------------- the config's schemes


def _vllm_name(name: str, analysis: Analysis) -> str:
    """The name vLLM gives a checkpoint module (regex targets and ignores see this one)."""
    if analysis.multimodal:
        return re.sub(r"^model\.language_model\.", "language_model.model.", name)
    return re.sub(r"^model\.language_model\.", "model.", name)


def _shard_names(module: Module, analysis: Analysis) -> list[str]:
    """The checkpoint names vLLM checks for one built layer (fused shards, experts)."""
    if module.kind == "experts":
        return [f"{module.name}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    parent, _, leaf = module.name.rpartition(".")
    names = {m.name for m in analysis.modules}
    if module.kind == "attention" and leaf in ("q_proj", "k_proj", "v_proj"):
        # vLLM packs q/k/v into one layer where the checkpoint has v_proj
        if f"{parent}.v_proj" in names:
            return [f"{parent}.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    if module.kind == "dense_mlp" and leaf in ("gate_proj", "up_proj"):
        return [f"{parent}.gate_proj", f"{parent}.up_proj"]
    return [module.name]


def _matches(name: str, vllm_name: str, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], vllm_name) is not None
    return pattern in (name, vllm_name)


# vLLM class names that compressed-tensors' class targets ("Linear") are matched against
# (a case-insensitive substring match).
_VLLM_CLASS = {
    "attention": "QKVParallelLinear",
    "dense_mlp": "MergedColumnParallelLinear",
    "router": "ReplicatedLinear",
    "experts": "RoutedExperts Linear",  # vLLM adds the Linear scheme for fused MoE
    "embedding": "VocabParallelEmbedding",
    "lm_head": "ParallelLMHead",
    "vision": "Linear",
    "audio": "Linear",
}


def _assign_scheme(module: Module, analysis: Analysis) -> None:
    qcfg = analysis.quant_config
    if qcfg is None:
        return
    method = analysis.quant_method
    if method == "compressed-tensors":
        _assign_ct_scheme(module, analysis, qcfg)
    elif method in ("auto-round", "gptq", "awq"):
        _assign_gptq_scheme(module, analysis, qcfg, method)
    elif method == "fp8":
        ignored = qcfg.get("ignored_layers") or qcfg.get("modules_to_not_convert") or []
        if module.kind in (*LINEAR_KINDS, "experts") and not any(
            _matches(module.name, _vllm_name(module.name, analysis), p) for p in ignored
        ):
            module.scheme = Scheme("fp8", "float", 8, None, True, "channel", None, "dynamic")
    else:
        if module.kind in (*LINEAR_KINDS, "experts"):
            module.scheme = Scheme(method or "unknown", "unknown", None, None, None)
            module.scheme_note = f"quant_method {method!r}: not modelled"


def _ct_args(args: dict[str, Any] | None) -> dict[str, Any] | None:
    return args if isinstance(args, dict) else None


def _ct_scheme(group: dict[str, Any], qcfg: dict[str, Any]) -> Scheme:
    weights = _ct_args(group.get("weights")) or {}
    inputs = _ct_args(group.get("input_activations"))
    weight_type = str(weights.get("type") or "int").lower()
    bits = weights.get("num_bits")
    group_size = weights.get("group_size")
    strategy = str(weights.get("strategy") or "").lower() or None
    fmt = group.get("format") or qcfg.get("format")
    if fmt in ("nvfp4-pack-quantized",) or (weight_type == "float" and bits == 4):
        weight_type = "nvfp4" if group_size == 16 else "mxfp4"
    activations = None
    if inputs:
        kind = "fp" if str(inputs.get("type")).lower() == "float" else "int"
        timing = "dynamic" if inputs.get("dynamic") else "static"
        activations = f"{kind}{inputs.get('num_bits')}-{timing}"
    return Scheme(
        "compressed-tensors",
        weight_type,
        int(bits) if bits else None,
        int(group_size) if group_size else (-1 if strategy == "channel" else None),
        bool(weights.get("symmetric", True)),
        strategy,
        str(weights["actorder"]).lower() if weights.get("actorder") else None,
        activations,
        fmt,
    )


def _assign_ct_scheme(module: Module, analysis: Analysis, qcfg: dict[str, Any]) -> None:
    ignore = [str(p) for p in qcfg.get("ignore") or []]
    shards = _shard_names(module, analysis)
    ignored = [
        next((p for p in ignore if _matches(s, _vllm_name(s, analysis), p)), None) for s in shards
    ]
    if any(ignored) and not all(ignored):
        covered = [_short(s) for s, i in zip(shards, ignored, strict=True) if i]
        left = [_short(s) for s, i in zip(shards, ignored, strict=True) if not i]
        module.shard_conflict = f"ignore list covers {', '.join(covered)} but not {', '.join(left)}"
    if all(ignored):
        module.scheme_note = f"ignored ({ignored[0]})"
        return
    groups = qcfg.get("config_groups") or {}
    own = module.name if module.kind != "experts" else shards[-1]
    vllm_own = _vllm_name(own, analysis)
    class_name = _VLLM_CLASS.get(module.kind, "")
    by_name = by_class = None
    for group in groups.values():
        if not isinstance(group, dict):
            continue
        for target in group.get("targets") or []:
            target = str(target)
            if by_name is None and _matches(own, vllm_own, target):
                by_name = (group, target)
            if (
                by_class is None
                and not target.startswith("re:")
                and "." not in target
                and target.lower() in class_name.lower()
            ):
                by_class = (group, target)
    found = by_name or by_class
    if found is None:
        module.scheme_note = "no config group targets it"
        return
    group, target = found
    if not _ct_args(group.get("weights")):
        return
    module.scheme = _ct_scheme(group, qcfg)
    module.scheme_note = f"target {target!r}"


def _assign_gptq_scheme(
    module: Module, analysis: Analysis, qcfg: dict[str, Any], method: str
) -> None:
    if module.kind not in (*LINEAR_KINDS, "experts"):
        return
    bits = qcfg.get("bits") or qcfg.get("w_bit")
    group_size = qcfg.get("group_size") or qcfg.get("q_group_size")
    sym = qcfg.get("sym", qcfg.get("symmetric", not qcfg.get("zero_point", False)))
    blocks = qcfg.get("block_name_to_quantize") or qcfg.get("to_quant_block_names")
    if isinstance(blocks, str):
        blocks = blocks.split(",")
    if blocks and not any(module.name.startswith(str(b)) for b in blocks):
        module.scheme_note = "outside block_name_to_quantize"
        return
    extra = qcfg.get("extra_config") or {}
    for key, override in extra.items():
        if isinstance(override, dict) and _matches(
            module.name, _vllm_name(module.name, analysis), key
        ):
            if override.get("bits", bits) and override.get("bits", bits) >= 16:
                module.scheme_note = f"extra_config {key!r}: bits >= 16"
                return
            bits = override.get("bits", bits)
            group_size = override.get("group_size", group_size)
            sym = override.get("sym", sym)
    actorder = "desc_act" if qcfg.get("desc_act") else None
    module.scheme = Scheme(
        method, "int", int(bits) if bits else None, group_size, bool(sym), "group", actorder
    )
    module.scheme_note = "quantized block" if blocks else "every linear"


# --------------------------------------------------------------------- vLLM and this machine


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

    def active_patches(self) -> frozenset[str]:
        if not self.plugin:
            return frozenset()
        return frozenset(
            name
            for name, (status, _) in self.patches.items()
            if status == "needed" and name not in self.disabled_patches
        )


_GENERATIONS = {
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
    from .patches import vllm_source

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

    Each entry is one fact a rule of :data:`RULES` depends on.
    """
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
        "cpu_fp8_kernels": {
            "w8a8": _kernel_list(kernels, "CPU", "_POSSIBLE_FP8_KERNELS"),
            "w8a16": _kernel_list(kernels, "CPU", "_POSSIBLE_WFP8A16_KERNELS"),
        },
        # Marlin linear zero-pads misaligned shapes (0.24+); before: N % 64, K % 128
        "marlin_pads": "Tile misalignment is fixed" in marlin,
        # AutoRound (INC) MoE on CPU is built unquantized
        "inc_cpu_moe_unquantized": _inc_cpu_moe_unquantized(inc_scheme, inc_old),
        # 0.19.0: every quantized AutoRound layer raises on CPU
        "inc_cpu_unsupported": "not supported during xpu kernel migration" in inc_old,
        # which x86 kernel library the CPU platform imports
        "cpu_kernel_libraries": "_C_AVX2" in cpu_platform,
        "router_passes_quant_config": None,  # filled from the router patch's detect()
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

    from . import envs

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
    from . import envs, vllm_version
    from .patches import expert_names, plan

    features = vllm_features()
    patches = {item.name: (item.detection.status.value, item.detection.reason) for item in plan()}
    router = patches.get("router", ("", ""))
    features["router_passes_quant_config"] = router[0] == "not needed"
    generation, why = expert_names._generation()
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
    )


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


# --------------------------------------------------------------------- rules


@dataclass
class Ctx:
    """One prediction: a checkpoint, a vLLM, a machine, and the patches applied."""

    analysis: Analysis
    env: Environment
    active: frozenset[str]  # patches of this project applied (empty: stock vLLM)

    def patched(self, name: str) -> bool:
        return name in self.active


@dataclass(frozen=True)
class Hit:
    """What one rule finds for one module."""

    outcome: Outcome
    message: str  # the same for every module the rule hits alike
    example: str = ""  # this module's specifics (the tensor, the error vLLM raises)
    patch: str = ""  # the patch that removes the problem (outcome PATCHED)
    stage: Stage | None = None  # when it is not the rule's own stage
    extra_bytes: int = 0  # memory the dequantizing fallback adds


@dataclass(frozen=True)
class Rule:
    name: str
    kinds: tuple[str, ...]  # module kinds it looks at
    stage: Stage
    check: Callable[[Module, Ctx], Hit | None]
    source: str  # where the rule comes from
    per_layer: bool = False  # speaks of vLLM's fused layers (qkv_proj), not checkpoint modules


def built_scheme(module: Module, ctx: Ctx) -> Scheme | None:
    """The quantization vLLM builds ``module`` with (None: unquantized), which is not
    always what the config asks for."""
    env = ctx.env
    if module.kind == "router" and module.scheme is not None:
        if env.features.get("router_passes_quant_config") or ctx.patched("router"):
            return module.scheme
        return None  # Gemma4Router builds GateLinear without quant_config (D4)
    if (
        module.kind == "experts"
        and module.scheme is not None
        and module.scheme.method == "auto-round"
        and env.platform == "cpu"
        and env.features.get("inc_cpu_moe_unquantized")
    ):
        return None  # "CPU does not support quantized MoE yet"
    return module.scheme


def _is_wna16(scheme: Scheme | None) -> bool:
    return scheme is not None and scheme.weight_type == "int" and scheme.activations is None


def _group(scheme: Scheme) -> int:
    return scheme.group_size if scheme.group_size and scheme.group_size > 0 else -1


def _vllm_layer(module: Module, ctx: Ctx) -> tuple[str, list[Module]]:
    """The vLLM layer ``module`` ends up in and the checkpoint modules fused into it."""
    shards = set(_shard_names(module, ctx.analysis))
    members = [m for m in ctx.analysis.modules if m.name in shards] or [module]
    parent = module.name.rpartition(".")[0]
    if len(members) > 1:
        fused = "qkv_proj" if module.kind == "attention" else "gate_up_proj"
        return f"{parent}.{fused}", members
    return module.name, members


def _is_representative(module: Module, ctx: Ctx) -> bool:
    """Kernel rules look at each vLLM layer once (q_proj stands for qkv_proj)."""
    _, members = _vllm_layer(module, ctx)
    return members[0] is module


def _partition_shape(module: Module, ctx: Ctx) -> tuple[int, int, int] | None:
    """(K per partition, N per partition, K) of the vLLM layer ``module`` belongs to."""
    _, members = _vllm_layer(module, ctx)
    if any(m.in_features is None or m.out_features is None for m in members):
        return None
    k = members[0].in_features or 0
    n = sum(m.out_features or 0 for m in members)
    tp = ctx.env.tensor_parallel
    leaf = module.name.rpartition(".")[2]
    if module.kind == "router":
        return k, n, k  # replicated
    if leaf in ("o_proj", "down_proj"):  # row parallel: K is split
        return k // tp, n, k
    return k, n // tp, k  # column parallel: N is split


def _mismatch_error(module: Module, ctx: Ctx, tensor: str, why: str) -> Hit:
    """What this vLLM's loader does with a checkpoint tensor that matches no parameter
    (or a parameter no tensor fills)."""
    env = ctx.env
    if env.generation is None:
        return Hit(Outcome.UNKNOWN, f"{why}; this vLLM's Gemma 4 loader is not one the rules know")
    if env.silent_skip:
        if ctx.patched("load_guard"):
            return Hit(
                Outcome.FAILS,
                f"{why}; the load guard stops the load (vLLM 0.24 - 0.30 would skip the "
                "tensor silently)",
                f"ValueError: Gemma 4 checkpoint left parameter(s) of {module.short} unloaded",
            )
        return Hit(
            Outcome.SILENTLY_WRONG,
            f"{why}; vLLM 0.24 - 0.30 skip the unmatched name without a word and the "
            "parameter keeps uninitialized memory",
            f"{tensor} is dropped",
        )
    if env.generation == "generic":
        error = "AttributeError" if module.kind == "experts" else "ValueError"
        return Hit(Outcome.FAILS, why, f"{error}: no parameter for {_vllm_param(tensor, ctx)!r}")
    return Hit(Outcome.FAILS, why, f"KeyError: {_vllm_param(tensor, ctx)!r}")


def _vllm_param(name: str, ctx: Ctx) -> str:
    """Gemma4Model.load_weights' view of a checkpoint name (its errors show this one):
    before the 0.31 loader, experts live under ``moe.experts``."""
    short = _short(name)
    if ctx.env.generation in ("substring", "dotted", "underscore"):
        short = short.replace(".experts.", ".moe.experts.")
    return short


def _first_tensor(module: Module, *suffixes: str) -> str:
    """The first of the module's checkpoint tensors vLLM meets with one of ``suffixes``."""
    return next((n for n in sorted(module.tensors) if n.endswith(suffixes)), module.name)


# -- load stage: checkpoint names vs parameters


def check_fused_expert_names(module: Module, ctx: Ctx) -> Hit | None:
    """D2: fused `experts.<proj>_packed` meets the dotted expert mapping (0.19.1 - 0.20.2)."""
    if not module.fused_experts or module.stored == "bf16":
        return None
    if ctx.env.generation != "dotted":
        return None
    names = sorted(n for n in module.tensors if re.search(r"_(packed|scale|zero_point)$", n))
    if not names:
        return None
    match = _FUSED_EXPERT.match(names[0])
    proj = "gate_proj" if match and match["proj"] == "gate_up_proj" else "down_proj"
    suffix = match["suffix"] if match else "packed"
    key = f"{_short(module.name).replace('.experts', '.moe.experts')}.0.{proj}_{suffix}"
    message = "fused `experts.<proj>_<suffix>` tensors meet the dotted expert mapping (D2)"
    if ctx.patched("expert_names"):
        return Hit(Outcome.PATCHED, message, "", "expert_names")
    return Hit(Outcome.FAILS, message, f"KeyError: {key!r}")


def check_fused_expert_metadata(module: Module, ctx: Ctx) -> Hit | None:
    """1-D/2-D fused `experts.<proj>_shape` / `_g_idx` skip the 3D split on every release."""
    if not module.fused_experts:
        return None
    names = sorted(n for n in module.tensors if n.endswith(("_shape", "_g_idx")))
    if not names:
        return None
    what = "`_shape`" if names[0].endswith("_shape") else "`_g_idx`"
    message = f"fused {what} expert tensors are never split per expert by vLLM"
    if ctx.patched("expert_names"):
        return Hit(Outcome.PATCHED, message, "", "expert_names")
    env = ctx.env
    if env.silent_skip and all(n.endswith("_shape") for n in names):
        return None  # dropped without a word, and no kernel reads weight_shape
    if env.silent_skip:
        # dropped without a word; the load guard treats g_idx as optional, so it stays quiet
        return Hit(
            Outcome.SILENTLY_WRONG,
            message,
            f"{names[0]} is dropped: experts lose their activation order",
        )
    if env.generation == "generic" and names[0].endswith("_shape"):
        return Hit(
            Outcome.FAILS,
            message,
            f"RuntimeError: The expanded size of the tensor (2) must match the existing "
            f"size (3), loading {names[0]!r}",
        )
    return _mismatch_error(module, ctx, names[0], message)


def check_quantized_router(module: Module, ctx: Ctx) -> Hit | None:
    """D4: a quantized router meets Gemma4Router's GateLinear built without quant_config."""
    if module.stored == "bf16" or module.scheme is None:
        return None  # unquantized, or the config disagrees (check_config_vs_checkpoint)
    if ctx.env.features.get("router_passes_quant_config"):
        return None
    message = "the router is quantized; Gemma4Router builds it without quant_config (D4)"
    if ctx.patched("router"):
        return Hit(Outcome.PATCHED, message, "", "router")
    tensor = _first_tensor(module, "qweight", "weight_packed", "weight_scale")
    return _mismatch_error(module, ctx, tensor, message)


def check_config_vs_checkpoint(module: Module, ctx: Ctx) -> Hit | None:
    """vLLM builds each layer from the config; the checkpoint must store it that way."""
    built = built_scheme(module, ctx)
    if module.kind == "router" and module.scheme is not None and built is None:
        return None  # the D4 rule speaks for the router
    if module.stored == "unknown":
        return None
    expected = built.storage if built is not None else "bf16"
    if built is not None and built.weight_type == "unknown":
        return None
    if expected == module.stored:
        return None
    if built is None and module.scheme is not None:
        why = (
            f"vLLM builds {module.kind} unquantized here (AutoRound MoE on CPU: 'CPU does "
            f"not support quantized MoE yet') but the checkpoint stores {module.stored}"
        )
        if (
            module.kind == "experts"
            and module.stored == "gptq"
            and module.scheme.bits in (2, 4, 8)
            and _gptq_packing(ctx)
            and ctx.patched("unquantized_experts")
        ):
            return Hit(
                Outcome.PATCHED,
                f"{why}; the plugin dequantizes them as they stream in",
                "",
                "unquantized_experts",
                extra_bytes=_extra_bytes(module, module.scheme, ctx),
            )
    elif built is None:
        why = (
            f"the config leaves {module.kind} unquantized ({module.scheme_note}) but the "
            f"checkpoint stores {module.stored}"
        )
    else:
        why = (
            f"the config quantizes {module.kind} ({built.describe()}, {module.scheme_note}) "
            f"but the checkpoint stores {module.stored}"
        )
    tensor = _first_tensor(module, "qweight", "_packed", "weight_packed", "weight")
    return _mismatch_error(module, ctx, tensor, why)


# -- build stage: quantization methods and kernels


def check_shard_schemes(module: Module, ctx: Ctx) -> Hit | None:
    if not module.shard_conflict or not _is_representative(module, ctx):
        return None
    layer, _ = _vllm_layer(module, ctx)
    if module.kind == "experts":
        error = "ValueError: All MoE projections need to have same quantization scheme"
    else:
        error = f"ValueError: Found different quantization schemes for the shards of {layer}"
    return Hit(
        Outcome.FAILS,
        "shards vLLM fuses into one layer are quantized differently",
        f"{module.shard_conflict}: {error}",
    )


def _gptq_packing(ctx: Ctx) -> bool:
    """An INC (AutoRound) config whose int weights are GPTQ-packed (vLLM's default)."""
    qcfg = ctx.analysis.quant_config or {}
    packing = f"{qcfg.get('packing_format') or 'auto_round:auto_gptq'} {qcfg.get('backend', '')}"
    return "gptq" in packing


def _fallback_refusal(scheme: Scheme, ctx: Ctx, linear: bool) -> str | None:
    """Why the plugin's dequantizing fallback will not serve a layer (None: it will)."""
    if not ctx.patched("dequant_fallback"):
        status = ctx.env.patches.get("dequant_fallback", ("missing", "not installed"))
        if not ctx.env.plugin:
            return "stock vLLM: no plugin, no fallback"
        return f"dequant_fallback {status[0]} here ({status[1]})"
    if ctx.env.fallback_mode == "off":
        return "GEMMA4_QUANT_FALLBACK=off"
    fallback = _fallback_module()
    if scheme.method == "auto-round" and linear:
        if not getattr(fallback, "_gptq_linear_recognized", lambda: False)():
            return "the fallback does not recognize this vLLM's AutoGPTQ linear code"
        if not _gptq_packing(ctx):
            return "the fallback covers GPTQ-packed AutoRound linears only"
        return None if scheme.bits == 4 and scheme.symmetric else "not symmetric int4"
    if scheme.method != "compressed-tensors":
        return "the fallback covers compressed-tensors layers and AutoRound linears only"
    if linear:
        recognized = getattr(fallback, "_linear_recognized", lambda: False)()
        if not recognized:
            return "the fallback does not recognize this vLLM's WNA16 linear code"
        return None if scheme.weight_type == "int" and scheme.bits == 4 else "not int4"
    unsupported = getattr(fallback, "unsupported_reason", None)
    if unsupported is None:
        return "the fallback patch has no unsupported_reason()"
    from types import SimpleNamespace

    weights = SimpleNamespace(
        type=scheme.weight_type,
        num_bits=scheme.bits,
        strategy=scheme.strategy or "group",
        actorder=scheme.actorder,
        symmetric=scheme.symmetric,
        group_size=scheme.group_size,
    )
    return unsupported(weights, None if scheme.activations is None else scheme.activations)


def _fallback_module() -> Any:
    from .patches import load_patch_modules

    return next((m for m in load_patch_modules() if m.NAME == "dequant_fallback"), None)


def _extra_bytes(module: Module, scheme: Scheme, ctx: Ctx) -> int:
    """What dequantizing ``module`` to the model dtype adds to its packed weights."""
    if module.kind == "experts":
        text = ctx.analysis.text_config
        experts = int(text.get("num_experts") or 0)
        numel = experts * 3 * int(module.out_features or 0) * int(module.in_features or 0)
    else:
        _, members = _vllm_layer(module, ctx)
        numel = sum((m.in_features or 0) * (m.out_features or 0) for m in members)
    itemsize = 4 if "float32" in ctx.analysis.dtype else 2
    return int(numel * (itemsize - (scheme.bits or 4) / 8))


def _served_by_fallback(
    module: Module, scheme: Scheme, ctx: Ctx, linear: bool, message: str, error: str
) -> Hit:
    refusal = _fallback_refusal(scheme, ctx, linear)
    if refusal is None:
        return Hit(
            Outcome.PATCHED,
            f"{message}; the plugin's fallback dequantizes it at load",
            "",
            "dequant_fallback",
            extra_bytes=_extra_bytes(module, scheme, ctx),
        )
    if not ctx.env.plugin:
        return Hit(Outcome.NO_KERNEL, message, error)
    return Hit(Outcome.NO_KERNEL, message, f"{error} (fallback: {refusal})")


def _forced(module: Module, scheme: Scheme, ctx: Ctx, linear: bool) -> Hit | None:
    """GEMMA4_QUANT_FALLBACK=force dequantizes even where vLLM has a kernel."""
    if ctx.env.fallback_mode != "force" or _fallback_refusal(scheme, ctx, linear) is not None:
        return None
    return Hit(
        Outcome.PATCHED,
        "GEMMA4_QUANT_FALLBACK=force: dequantized at load although vLLM has a kernel",
        "",
        "dequant_fallback",
        extra_bytes=_extra_bytes(module, scheme, ctx),
    )


def _marlin_moe_fits(scheme: Scheme, ctx: Ctx) -> bool:
    """check_moe_marlin_supports_layer: what makes pre-0.30 vLLM pick the Marlin MoE method
    (not gated by platform: it is picked on CPU too)."""
    text = ctx.analysis.text_config
    hidden = int(text.get("hidden_size") or 0)
    inter = int(text.get("moe_intermediate_size") or 0) // ctx.env.tensor_parallel
    group = _group(scheme)
    return hidden % 128 == 0 and inter % max(64, group) == 0 and group in (-1, 32, 64, 128)


def check_moe_symmetric_only(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    if not _is_wna16(scheme) or scheme.method != "compressed-tensors" or scheme.symmetric:
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
    return Hit(
        Outcome.NO_KERNEL,
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
    if _group(scheme) == 32:
        reasons.append("CPU int4 MoE: group size 32 is not supported")
    return reasons


def check_wna16_moe_cpu(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or not _is_wna16(scheme):
        return None
    selection = ctx.env.features.get("wna16_moe_selection")
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
        if selection == "hybrid":
            return Hit(
                Outcome.UNKNOWN,
                "this vLLM's compressed-tensors MoE selection on CPU (Marlin method with a "
                "backend oracle, else Triton; 0.23 - 0.29) is not modelled",
            )
        return _legacy_moe_on_cpu(scheme, ctx)
    refusals = cpu_int4_moe_refusals(scheme, ctx)
    if not refusals:
        return _forced(module, scheme, ctx, linear=False)
    message = "no WNA16 MoE backend on this CPU: " + "; ".join(refusals)
    error = "NotImplementedError: No WNA16 MoE backend supports the deployment configuration"
    return _served_by_fallback(module, scheme, ctx, False, message, error)


def _legacy_moe_on_cpu(scheme: Scheme, ctx: Ctx) -> Hit:
    """Before the backend oracle, compressed-tensors picks Marlin MoE when the shapes fit
    (check_moe_marlin_supports_layer, not gated by platform) and Triton otherwise; both
    are GPU kernels, so a CPU load passes construction and fails later."""
    if _marlin_moe_fits(scheme, ctx):
        return Hit(
            Outcome.NO_KERNEL,
            "this vLLM builds compressed-tensors int experts with Marlin even on CPU: "
            "construction and loading pass, repacking needs CUDA ops",
            "AttributeError: '_OpNamespace' '_C' object has no attribute 'gptq_marlin_repack'",
            stage=Stage.PROCESS,
        )
    return Hit(
        Outcome.NO_KERNEL,
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
    if scheme.method != "compressed-tensors" or not _is_representative(module, ctx):
        return None
    features = ctx.env.features
    route = features.get("cpu_fp8_route", "w8a8")
    if features.get("cpu_fp8_kernels", {}).get(route):
        return None
    kind = "ScaledMM" if route == "w8a16" else "FP8ScaledMM"
    return Hit(
        Outcome.NO_KERNEL,
        f"no CPU kernel for FP8 linears: this vLLM runs FP8 on CPU as {route.upper()}, and "
        f"its CPU {route.upper()} kernel list is empty",
        f"ValueError: Failed to find a kernel that can implement the {kind} linear layer",
    )


def check_fp8_moe_cpu(module: Module, ctx: Ctx) -> Hit | None:
    """vLLM's CPU FP8 MoE experts need AMX and SiLU; otherwise the oracle returns NONE and
    converting the weights fails (construction and loading pass)."""
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
        return None
    return Hit(
        Outcome.NO_KERNEL,
        f"no FP8 MoE backend on this CPU: {reason}",
        "ValueError: Unsupported FP8 MoE backend: NONE",
        stage=Stage.PROCESS,
    )


def cpu_wna16_linear_refusal(module: Module, scheme: Scheme, ctx: Ctx) -> str | None:
    """Why CPUWNA16LinearKernel (mixed_precision/cpu.py) cannot take this layer."""
    if scheme.method == "auto-round" and ctx.env.features.get("inc_cpu_unsupported"):
        return "INC on CPU: INC quantization is not supported during xpu kernel migration"
    if scheme.method == "auto-round" and (scheme.bits != 4 or not scheme.symmetric):
        return "INC on CPU: only 4-bit symmetric"
    if scheme.bits != 4:
        return f"Quant type ({scheme.bits}-bit) not supported by CPUWNA16 (4-bit only)"
    group = _group(scheme)
    if group != -1 and group % 2:
        return f"Group size ({group}) not supported by CPUWNA16"
    shape = _partition_shape(module, ctx)
    if shape is None:
        return None
    k, n, _ = shape
    if k % 32:
        return f"Input size ({k}) not supported by CPUWNA16, supported sizes are multiples of 32"
    if n % 32:
        return f"Output size ({n}) not supported by CPUWNA16, supported sizes are multiples of 32"
    return None


def check_wna16_linear_cpu(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    if ctx.env.platform != "cpu" or not _is_wna16(scheme) or not _is_representative(module, ctx):
        return None
    refusal = cpu_wna16_linear_refusal(module, scheme, ctx)
    if refusal is None:
        return _forced(module, scheme, ctx, linear=True)
    layer, _ = _vllm_layer(module, ctx)
    message = "no CPU kernel for the WNA16 linear layer"
    if refusal.startswith("INC"):
        error = f"NotImplementedError: {refusal}"
    else:
        error = (
            "ValueError: Failed to find a kernel that can implement the WNA16 linear layer: "
            f"CPUWNA16LinearKernel: {refusal}"
        )
    return _served_by_fallback(module, scheme, ctx, True, message, f"{_short(layer)}: {error}")


def check_cpu_int4_gemm_op(module: Module, ctx: Ctx) -> Hit | None:
    """vLLM picks CPUWNA16LinearKernel on x86 without AVX-512, whose extension lacks its op."""
    scheme = built_scheme(module, ctx)
    cpu = ctx.env.cpu
    if ctx.env.platform != "cpu" or cpu is None or not _is_wna16(scheme):
        return None
    if not _is_representative(module, ctx) or cpu_wna16_linear_refusal(module, scheme, ctx):
        return None
    if cpu.int4_gemm_op is not False or _forced(module, scheme, ctx, linear=True):
        return None
    message = (
        f"vLLM picks CPUWNA16LinearKernel, but torch.ops._C.cpu_gemm_wna16 is not in "
        f"{cpu.kernel_library} (the library this CPU loads: no AVX-512); the server starts "
        "and the first request fails"
    )
    fallback = _fallback_module()
    if fallback is not None and not getattr(fallback, "_KERNEL_OPS", None):
        return Hit(Outcome.NO_KERNEL, message, "fallback: this version does not check ops")
    return _served_by_fallback(module, scheme, ctx, True, message, "missing op cpu_gemm_wna16")


# CUDA mixed-precision linear kernels: (name, why it refuses a layer or None). Arguments:
# scheme, (K per partition, N per partition, K), capability, model dtype, vLLM features.
_CudaCheck = Callable[[Scheme, tuple[int, int, int], int, str, dict[str, Any]], str | None]


def _machete(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    k, n, _ = shape
    if cap != 90:
        return "Machete requires compute capability 9.0"
    if _group(s) not in (-1, 64, 128):
        return f"Machete: group size {_group(s)} not in [-1, 64, 128]"
    if k % 64 or n % 128:
        return f"Machete: K % 64 and N % 128 needed (K={k}, N={n})"
    return None


def _marlin(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    k, n, k_full = shape
    group = _group(s)
    if cap < 75:
        return "Marlin requires compute capability 7.5"
    if group not in (-1, 32, 64, 128):
        return f"Marlin: group size {group} not in [-1, 32, 64, 128]"
    if group != -1 and group < k_full and k % group:
        return f"Marlin: K per partition {k} not divisible by group size {group}"
    if not f.get("marlin_pads") and (n % 64 or k % 128):
        return f"Marlin needs N % 64 and K % 128 per partition (N={n}, K={k})"
    return None


def _triton_w4a16(
    s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any
) -> str | None:
    k, n, k_full = shape
    group = _group(s)
    if s.bits != 4:
        return "TritonW4A16: 4-bit only"
    if n % 8:
        return f"TritonW4A16: N ({n}) % 8"
    if group not in (-1, 32, 64, 128, 256) and group != k_full:
        return f"TritonW4A16: group size {group}"
    if k % (group if group != -1 else k):
        return f"TritonW4A16: K {k} not divisible by group size {group}"
    return None


def _exllama(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    return None if dtype in ("float16", "half") else "Exllama only supports float16 activations"


def _conch(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    return None if importlib.util.find_spec("conch") else "conch-triton-kernels is not installed"


def _allspark(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    # allspark_utils.py: Ampere only, per-channel uint8b128 (8-bit symmetric)
    if not 80 <= cap < 90:
        return "AllSpark runs on compute capability 8.x only"
    if _group(s) != -1 or s.bits != 8 or not s.symmetric:
        return "AllSpark: per-channel symmetric 8-bit only"
    return None


def _humming(s: Scheme, shape: tuple[int, int, int], cap: int, dtype: str, f: Any) -> str | None:
    return None if importlib.util.find_spec("humming") else "Humming is not installed"


_CUDA_LINEAR_KERNELS: dict[str, _CudaCheck] = {
    "MacheteLinearKernel": _machete,
    "AllSparkLinearKernel": _allspark,
    "MarlinLinearKernel": _marlin,
    "ConchLinearKernel": _conch,
    "ExllamaLinearKernel": _exllama,
    "TritonW4A16LinearKernel": _triton_w4a16,
    "HummingLinearKernel": _humming,
}


def check_wna16_linear_cuda(module: Module, ctx: Ctx) -> Hit | None:
    scheme = built_scheme(module, ctx)
    env = ctx.env
    if env.platform != "cuda" or not _is_wna16(scheme) or not _is_representative(module, ctx):
        return None
    shape = _partition_shape(module, ctx)
    if shape is None or env.capability is None:
        return None
    reasons = []
    for name in env.features.get("cuda_linear_kernels") or list(_CUDA_LINEAR_KERNELS):
        check = _CUDA_LINEAR_KERNELS.get(name)
        if check is None:
            continue  # W4A8 / not-installed kernels: not for bf16 weight-only layers
        refusal = check(scheme, shape, env.capability, ctx.analysis.dtype, env.features)
        if refusal is None:
            return _forced(module, scheme, ctx, linear=True)
        reasons.append(refusal)
    layer, _ = _vllm_layer(module, ctx)
    message = "no CUDA kernel for the WNA16 linear layer"
    error = (
        f"{_short(layer)} (K={shape[0]}, N={shape[1]}, group {_group(scheme)}): ValueError: "
        "Failed to find a kernel that can implement the WNA16 linear layer: " + "; ".join(reasons)
    )
    return _served_by_fallback(module, scheme, ctx, True, message, error)


def check_platform_known(module: Module, ctx: Ctx) -> Hit | None:
    """Kernel rules exist for CPU and CUDA, and for int weights; say so otherwise."""
    scheme = built_scheme(module, ctx)
    if scheme is None or not _is_representative(module, ctx):
        return None
    if ctx.env.platform not in ("cpu", "cuda"):
        return Hit(Outcome.UNKNOWN, f"kernels on platform {ctx.env.platform} are not modelled")
    if scheme.weight_type == "unknown":
        return Hit(Outcome.UNKNOWN, f"{module.scheme_note}")
    if not _is_wna16(scheme) and scheme.storage not in ("fp8",):
        return Hit(Outcome.UNKNOWN, f"kernels for {scheme.describe()} are not modelled")
    return None


# The rules, in the order vLLM meets them within a stage. Every rule comes from the facts
# files (docs/facts/: vllm-releases.md, cpu-vllm.md, checkpoint-layouts.md) or from the release code
# named in its source; each check reads the installed vLLM's features, never its version.
_LINEARS_AND_EXPERTS = (*LINEAR_KINDS, "experts")
# fmt: off
RULES: tuple[Rule, ...] = (
    # name                    kinds                  stage        check
    #   source                                                                      per layer
    # -- model construction: quantization methods and kernels are chosen
    Rule("shard-schemes",        ("attention", "dense_mlp", "experts"), Stage.BUILD,
         check_shard_schemes,
         "compressed_tensors/utils.py should_ignore_layer; get_moe_method",         True),
    Rule("moe-symmetric-only",   ("experts",),          Stage.BUILD, check_moe_symmetric_only,
         "compressed_tensors_moe_wna16{,_marlin}.py (<= 0.29); cpu-vllm.md"),
    Rule("wna16-moe-cpu",        ("experts",),          Stage.BUILD, check_wna16_moe_cpu,
         "fused_moe/oracle/int_wna16.py, experts/cpu_moe.py; cpu-vllm.md"),
    Rule("fp8-linear-cpu",       LINEAR_KINDS,          Stage.BUILD, check_fp8_linear_cpu,
         "compressed_tensors.py _check_scheme_supported; kernels/linear _POSSIBLE_*FP8*",  True),
    Rule("wna16-linear-cpu",     LINEAR_KINDS,          Stage.BUILD, check_wna16_linear_cpu,
         "kernels/linear/mixed_precision/cpu.py CPUWNA16LinearKernel",             True),
    Rule("wna16-linear-cuda",    LINEAR_KINDS,          Stage.BUILD, check_wna16_linear_cuda,
         "mixed_precision/{machete,marlin,triton_w4a16}.py; checkpoint-layouts.md", True),
    Rule("kernels-modelled",     _LINEARS_AND_EXPERTS,  Stage.BUILD, check_platform_known,
         "doctor models CPU and CUDA kernels of int and fp8 weights",              True),
    # -- weight loading: checkpoint names meet parameters
    Rule("fused-expert-names",   ("experts",),          Stage.LOAD,  check_fused_expert_names,
         "vllm-releases.md D2; gemma4.py expert_params_mapping"),
    Rule("fused-expert-metadata", ("experts",),         Stage.LOAD,  check_fused_expert_metadata,
         "vllm-releases.md D1, 'Other facts'; cpu-vllm.md (_shape on 0.32)"),
    Rule("quantized-router",     ("router",),           Stage.LOAD,  check_quantized_router,
         "vllm-releases.md D4"),
    Rule("config-vs-checkpoint", _LINEARS_AND_EXPERTS,  Stage.LOAD,  check_config_vs_checkpoint,
         "gemma4.py load_weights: KeyError, silent skip (0.24 - 0.30), ValueError"),
    # -- weight processing: weights are converted for the chosen kernel
    Rule("fp8-moe-cpu",          ("experts",),          Stage.PROCESS, check_fp8_moe_cpu,
         "fused_moe/oracle/fp8.py select_fp8_moe_backend, experts/cpu_moe.py"),
    # -- first forward pass
    Rule("cpu-int4-gemm-op",     LINEAR_KINDS,          Stage.RUN,   check_cpu_int4_gemm_op,
         "platforms/cpu.py import_kernels: _C_AVX2 has no cpu_gemm_wna16",         True),
)
# fmt: on


# --------------------------------------------------------------------- prediction


@dataclass
class Finding:
    """One rule's hits on modules that fare alike."""

    rule: str
    stage: Stage
    outcome: Outcome
    message: str
    example: str
    patch: str
    modules: list[str]
    order: tuple[int, str]  # (stage, position): the load stops at the first hard one
    extra_bytes: int = 0


@dataclass
class Prediction:
    variant: str  # "stock" (no plugin) or "plugin"
    outcome: Outcome
    stage: Stage | None  # where the load stops (hard failures only)
    load_outcome: Outcome  # up to weight loading: what a load without a forward shows
    findings: list[Finding]
    patches_used: list[str]
    summary: str


def _environment_findings(analysis: Analysis, env: Environment) -> list[Finding]:
    """Problems that make every module's prediction uncertain."""
    problems = []
    model_type = str(
        analysis.text_config.get("model_type") or analysis.checkpoint.config.get("model_type", "")
    )
    if not model_type.startswith("gemma4") and "Gemma4" not in analysis.architecture:
        problems.append(f"not a Gemma 4 checkpoint (model_type {model_type!r})")
    if env.vllm_version == "unknown":
        problems.append("vLLM is not installed in this Python environment")
    elif env.generation is None:
        problems.append(
            f"this vLLM's Gemma 4 loader is not one the rules know: {env.generation_reason}"
        )
    return [
        Finding("environment", Stage.BUILD, Outcome.UNKNOWN, text, "", "", [], (0, ""))
        for text in problems
    ]


def _position(module: Module, stage: Stage) -> str:
    """Where vLLM meets ``module`` within ``stage``: layers are built in order; weights
    stream in the (sorted) order of the checkpoint's names."""
    if stage is Stage.LOAD:
        return module.name
    layer = module.layer if module.layer is not None else -1
    return f"{layer + 1:06d}.{_KIND_ORDER.get(module.kind, 9)}"


def evaluate(analysis: Analysis, env: Environment, active: frozenset[str]) -> Prediction:
    ctx = Ctx(analysis, env, active)
    grouped: dict[tuple[str, Outcome, str, str], Finding] = {}
    for rule in RULES:
        for module in analysis.modules:
            if module.kind not in rule.kinds:
                continue
            hit = rule.check(module, ctx)
            if hit is None:
                continue
            stage = hit.stage or rule.stage
            order = (stage.value, _position(module, stage))
            key = (rule.name, hit.outcome, hit.message, hit.patch)
            where = _short(_vllm_layer(module, ctx)[0]) if rule.per_layer else module.short
            found = grouped.get(key)
            if found is None:
                grouped[key] = Finding(
                    rule.name,
                    stage,
                    hit.outcome,
                    hit.message,
                    hit.example,
                    hit.patch,
                    [where],
                    order,
                    hit.extra_bytes,
                )
            else:
                found.modules.append(where)
                found.extra_bytes += hit.extra_bytes
                if order < found.order:
                    found.order, found.example = order, hit.example
    findings = _environment_findings(analysis, env) + sorted(
        grouped.values(), key=lambda f: f.order
    )
    variant = "plugin" if active or env.plugin else "stock"
    outcome, stage = _overall(findings)
    load_outcome, _ = _overall([f for f in findings if f.stage <= Stage.LOAD])
    patches = sorted({f.patch for f in findings if f.outcome is Outcome.PATCHED})
    prediction = Prediction(variant, outcome, stage, load_outcome, findings, patches, "")
    prediction.summary = _summary(prediction, env)
    return prediction


def _overall(findings: list[Finding]) -> tuple[Outcome, Stage | None]:
    hard = [f for f in findings if f.outcome in (Outcome.FAILS, Outcome.NO_KERNEL)]
    if hard:
        first = min(hard, key=lambda f: f.order)
        return first.outcome, first.stage
    outcomes = {f.outcome for f in findings}
    for outcome in (Outcome.SILENTLY_WRONG, Outcome.UNKNOWN):
        if outcome in outcomes:
            return outcome, None
    if Outcome.PATCHED in outcomes:
        return Outcome.LOADS_WITH_PLUGIN, None
    return Outcome.LOADS, None


def _summary(prediction: Prediction, env: Environment) -> str:
    where = f"vLLM {env.vllm_version}" + (
        " with the plugin" if prediction.variant == "plugin" else " (stock)"
    )
    outcome = prediction.outcome
    if outcome is Outcome.LOADS:
        return f"{where} loads this checkpoint as is"
    if outcome is Outcome.LOADS_WITH_PLUGIN:
        return f"{where} loads this checkpoint thanks to: {', '.join(prediction.patches_used)}"
    if outcome is Outcome.UNKNOWN:
        first = next(f for f in prediction.findings if f.outcome is Outcome.UNKNOWN)
        return f"{where}: no prediction: {first.message}"
    if outcome is Outcome.SILENTLY_WRONG:
        first = next(f for f in prediction.findings if f.outcome is Outcome.SILENTLY_WRONG)
        return f"{where} loads it SILENTLY WRONG: {_modules(first.modules)}: {first.message}"
    first = min((f for f in prediction.findings if f.outcome is outcome), key=lambda f: f.order)
    verb = "fails" if outcome is Outcome.FAILS else "has no kernel"
    return (
        f"{where} {verb} during {first.stage.label}: {_modules(first.modules)}: "
        f"{first.example or first.message}"
    )


def _modules(names: list[str]) -> str:
    """layers.0.experts, layers.1.experts -> experts (layers 0-1)"""
    by_leaf: dict[str, list[int]] = {}
    other = []
    for name in names:
        match = re.match(r"layers\.(\d+)\.(.*)$", name)
        if match:
            by_leaf.setdefault(match.group(2), []).append(int(match.group(1)))
        else:
            other.append(name)
    parts = [f"{leaf} ({_ranges(layers)})" for leaf, layers in by_leaf.items()]
    return ", ".join(parts + other) or "checkpoint"


def _ranges(layers: list[int]) -> str:
    layers = sorted(set(layers))
    spans, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None], strict=True):
        if cur != (prev + 1 if prev is not None else None):
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(spans)


# --------------------------------------------------------------------- report


def describe_checkpoint(analysis: Analysis) -> dict[str, Any]:
    quantized: dict[str, set[str]] = {}
    layers: dict[str, set[int]] = {}
    unquantized: set[str] = set()
    for module in analysis.modules:
        if module.stored != "bf16":
            scheme = module.scheme.describe() if module.scheme else f"stored {module.stored}"
            quantized.setdefault(module.kind, set()).add(scheme)
            if module.layer is not None:
                layers.setdefault(module.kind, set()).add(module.layer)
        else:
            unquantized.add(module.kind)
    text = analysis.text_config
    schemes = sorted({m.scheme.describe() for m in analysis.modules if m.scheme})
    qcfg = analysis.quant_config or {}
    return {
        "source": analysis.checkpoint.source,
        "architecture": analysis.architecture,
        "towers": analysis.towers,
        "quantization": None
        if analysis.quant_config is None
        else {
            "method": analysis.quant_method,
            "format": qcfg.get("format") or qcfg.get("packing_format"),
            "schemes": schemes,
        },
        "experts": {
            "layout": analysis.expert_layout,
            "num_experts": text.get("num_experts"),
            "layers": len(analysis.of_kind("experts")),
        },
        "quantized": {kind: sorted(v) for kind, v in sorted(quantized.items())},
        # only where some layers of a kind are quantized and others not
        "quantized_layers": {
            kind: sorted(layers[kind]) for kind in sorted(layers) if kind in unquantized
        },
        "unquantized": sorted(unquantized),
        "router_quantized": any(m.stored != "bf16" for m in analysis.of_kind("router")),
        "extra_expert_tensors": {
            k: len(v) for k, v in sorted(analysis.extra_expert_tensors.items())
        },
        "tensors": len(analysis.checkpoint.tensors),
        "files": len(analysis.checkpoint.files),
    }


def describe_environment(env: Environment) -> dict[str, Any]:
    return {
        "vllm": env.vllm_version,
        "loader": _GENERATIONS.get(env.generation or "", env.generation_reason),
        "silent_skip": env.silent_skip,
        "plugin": env.plugin,
        "plugin_reason": env.plugin_reason,
        "patches": {name: status for name, (status, _) in env.patches.items()},
        "applied": sorted(env.active_patches()),
        "fallback_mode": env.fallback_mode,
        "platform": env.platform,
        "device": env.device,
        "compute_capability": env.capability,
        "tensor_parallel": env.tensor_parallel,
        "cpu_extensions": env.cpu.extensions if env.cpu else None,
        "cpu_int4_w4a8": env.cpu.int4_w4a8 if env.cpu else None,
    }


def _prediction_dict(prediction: Prediction) -> dict[str, Any]:
    return {
        "outcome": prediction.outcome.value,
        "exit_code": int(EXIT_CODES[prediction.outcome]),
        "stage": prediction.stage.label if prediction.stage else None,
        "load_outcome": prediction.load_outcome.value,
        "summary": prediction.summary,
        "patches_used": prediction.patches_used,
        "findings": [
            {
                "rule": f.rule,
                "stage": f.stage.label,
                "outcome": f.outcome.value,
                "modules": f.modules,
                "message": f.message,
                "detail": f.example,
                "patch": f.patch,
                "extra_gib": round(f.extra_bytes / 2**30, 3),
            }
            for f in prediction.findings
        ],
    }


def report_dict(
    analysis: Analysis, env: Environment, prediction: Prediction, stock: Prediction
) -> dict[str, Any]:
    return {
        "checkpoint": describe_checkpoint(analysis),
        "environment": describe_environment(env),
        "prediction": _prediction_dict(prediction),
        "stock": _prediction_dict(stock),
        "notes": notes(analysis, env, prediction),
    }


def notes(analysis: Analysis, env: Environment, prediction: Prediction) -> list[str]:
    """What else a user of this machine should know (never changes the verdict)."""
    found = []
    patched = [f for f in prediction.findings if f.outcome is Outcome.PATCHED]
    extra = sum(f.extra_bytes for f in patched if f.patch != "unquantized_experts")
    if extra:
        found.append(
            f"the dequantizing fallback adds {extra / 2**30:.1f} GiB of weights to the "
            "packed checkpoint (GEMMA4_QUANT_FALLBACK=off keeps vLLM's error instead)"
        )
    experts = sum(f.extra_bytes for f in patched if f.patch == "unquantized_experts")
    if experts:
        found.append(
            f"AutoRound experts load dequantized: {experts / 2**30:.1f} GiB more than the "
            "packed checkpoint (vLLM builds INC MoE experts unquantized on CPU)"
        )
    if (
        analysis.multimodal
        and env.platform == "cpu"
        and importlib.util.find_spec("torchvision") is None
    ):
        found.append(
            "transformers' Gemma4Processor needs torchvision, which is not installed here: "
            "serve text only with --hf-overrides "
            '\'{"architectures": ["Gemma4ForCausalLM"]}\''
        )
    if (
        env.cpu is not None
        and env.cpu.int4_w4a8
        and any(_is_wna16(m.scheme) for m in analysis.modules)
    ):
        found.append(
            "this AMX CPU runs the int4 linears vLLM keeps quantized as W4A8: activations are "
            "rounded to int8 per token, so outputs differ from the bf16 twin by more than bf16 "
            "rounding (VLLM_CPU_INT4_W4A8=0 keeps W4A16)"
        )
    quantized_towers = [m.short for m in analysis.of_kind("vision", "audio") if m.scheme]
    if quantized_towers:
        found.append(
            f"the config quantizes {len(quantized_towers)} vision/audio module(s) too "
            f"(e.g. {quantized_towers[0]}); their kernels are not modelled"
        )
    return found


def format_report(report: dict[str, Any]) -> str:
    ckpt, env = report["checkpoint"], report["environment"]
    lines = [f"gemma4-quant doctor: {ckpt['source']}", "", "checkpoint"]
    towers = f" + {', '.join(ckpt['towers'])} tower" if ckpt["towers"] else " (text only)"
    lines.append(f"  architecture   {ckpt['architecture']}{towers}")
    quant = ckpt["quantization"]
    if quant is None:
        lines.append("  quantization   none: a bf16 model (no quantization_config)")
    else:
        fmt = f" ({quant['format']})" if quant["format"] else ""
        lines.append(f"  quantization   {quant['method']}{fmt}: {'; '.join(quant['schemes'])}")
    experts = ckpt["experts"]
    layout = {"fused-3d": "fused 3D", "per-expert": "per expert (experts.{e}.{proj})"}.get(
        experts["layout"], "none"
    )
    lines.append(
        f"  experts        {layout}, {experts['num_experts']} experts x {experts['layers']} layers"
    )
    partial = {k: f"; {_ranges(v)}" for k, v in ckpt["quantized_layers"].items()}
    quantized = "; ".join(
        f"{k} ({', '.join(v)}{partial.get(k, '')})" for k, v in ckpt["quantized"].items()
    )
    lines.append(f"  quantized      {quantized or 'nothing'}")
    lines.append(f"  unquantized    {', '.join(ckpt['unquantized']) or 'nothing'}")
    lines.append(f"  router         {'quantized' if ckpt['router_quantized'] else 'bf16'}")
    extra = ", ".join(f"{k} x{n}" for k, n in ckpt["extra_expert_tensors"].items())
    lines.append(f"  expert extras  {extra or 'none'} (_shape / _g_idx / zero points)")
    lines.append(f"  read           {ckpt['tensors']} tensor headers from {ckpt['files']} file(s)")
    lines += ["", f"vLLM {env['vllm']}"]
    lines.append(f"  loader         {env['loader']}")
    lines.append(
        f"  plugin         {'active' if env['plugin'] else 'inactive'}: {env['plugin_reason']}"
    )
    needed = [n for n, s in env["patches"].items() if s == "needed"]
    lines.append(
        f"  needs patches  {', '.join(needed) or 'none'}"
        f" (GEMMA4_QUANT_FALLBACK={env['fallback_mode']})"
    )
    lines.append(
        f"  machine        {env['device']}"
        + (f", tensor parallel {env['tensor_parallel']}" if env["tensor_parallel"] > 1 else "")
    )
    prediction, stock = report["prediction"], report["stock"]
    lines += [
        "",
        f"verdict: {prediction['outcome'].upper()} (exit {prediction['exit_code']})",
        f"  {prediction['summary']}",
    ]
    lines += _format_findings(prediction["findings"])
    if stock is not prediction and stock["summary"] != prediction["summary"]:
        lines += ["", f"without the plugin: {stock['outcome'].upper()}", f"  {stock['summary']}"]
        lines += _format_findings([f for f in stock["findings"] if f["outcome"] != "patched"])
    if report["notes"]:
        lines += ["", "notes"] + [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)


def _format_findings(findings: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in findings:
        tag = f["outcome"] if f["outcome"] != "patched" else f"fixed by {f['patch']}"
        where = _modules(f["modules"]) if f["modules"] else "environment"
        cost = f" (+{f['extra_gib']:.2f} GiB of weights)" if f["extra_gib"] else ""
        lines.append(f"  - [{tag}] {f['stage']}: {where}: {f['message']}{cost}")
        if f["detail"]:
            lines.append(f"      {f['detail']}")
    return lines


# --------------------------------------------------------------------- command line


def doctor(
    source: str,
    *,
    revision: str | None = None,
    stock: bool = False,
    cuda_capability: str | None = None,
    tensor_parallel: int = 1,
) -> dict[str, Any]:
    """The whole report as a dict (what ``--json`` prints). Raises InputError."""
    ckpt = read_checkpoint(source, revision)
    try:
        analysis = analyze(ckpt)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            ExitCode.UNREADABLE, f"{source}: config.json has an unexpected shape ({exc!r})"
        ) from None
    env = probe_environment(
        stock=stock, cuda_capability=cuda_capability, tensor_parallel=tensor_parallel
    )
    prediction = evaluate(analysis, env, env.active_patches())
    stock_prediction = evaluate(analysis, dataclasses.replace(env, plugin=False), frozenset())
    return report_dict(analysis, env, prediction, stock_prediction)


def run(args: argparse.Namespace) -> int:
    try:
        report = doctor(
            args.checkpoint,
            revision=args.revision,
            stock=args.stock,
            cuda_capability=args.cuda_capability,
            tensor_parallel=args.tensor_parallel_size,
        )
    except InputError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "exit_code": int(exc.code)}, indent=2))
        else:
            print(f"gemma4-quant doctor: {exc}", file=sys.stderr)
        return int(exc.code)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return report["prediction"]["exit_code"]


_EPILOG = __doc__.split("Exit codes:", 1)[1]


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _capability(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d)?", value):
        raise argparse.ArgumentTypeError(f"expected a compute capability like 9.0, got {value!r}")
    return value


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``doctor`` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="predict whether this vLLM serves a checkpoint (reads headers only)",
        description=(
            "Predict whether the installed vLLM, on this machine, loads a quantized Gemma 4\n"
            "checkpoint: from config.json and the safetensors headers only, before any\n"
            "weight is downloaded."
        ),
        epilog="exit codes:" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="DIR_OR_REPO", help="local directory or hub repo id")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--stock", action="store_true", help="predict for stock vLLM (the plugin not loaded)"
    )
    parser.add_argument(
        "--cuda-capability",
        type=_capability,
        metavar="X.Y",
        help="predict for a CUDA GPU of this compute capability instead of this machine",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive,
        default=1,
        metavar="N",
        help="tensor parallel size (kernels see per-partition shapes)",
    )
    parser.set_defaults(func=run)
    # argparse exits 2 on bad arguments, which is this command's "silently wrong" code.
    parser.error = _usage_error(parser)  # type: ignore[method-assign]


def _usage_error(parser: argparse.ArgumentParser) -> Callable[[str], Any]:
    def error(message: str) -> None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(int(ExitCode.USAGE))

    return error


__all__ = [
    "RULES",
    "ExitCode",
    "InputError",
    "Outcome",
    "add_arguments",
    "analyze",
    "doctor",
    "read_checkpoint",
    "read_safetensors_header",
]

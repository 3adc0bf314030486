"""What a checkpoint holds: its modules, how each is stored, and how the config asks vLLM
to build each one (the quantization scheme, from ignore lists, targets and overrides)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from ..layout import (
    FUSED_EXPERT,
    PER_EXPERT,
    QUANT_SUFFIXES,
    TEXT_PREFIX,
    TOWER_PREFIXES,
    layer_index,
    module_kind,
)
from .checkpoint import Checkpoint, TensorInfo
from .core import LINEAR_KINDS, Module, Scheme, short_name


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

    def gptq_packed(self) -> bool:
        """An INC (AutoRound) config whose int weights are GPTQ-packed (vLLM's default)."""
        qcfg = self.quant_config or {}
        packing = (
            f"{qcfg.get('packing_format') or 'auto_round:auto_gptq'} {qcfg.get('backend', '')}"
        )
        return "gptq" in packing


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
    if weight.dtype == "U8" and "weight_scale_2" in suffixes:  # ModelOpt NVFP4
        return "nvfp4"
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
        fused = FUSED_EXPERT.match(name)
        per_expert = PER_EXPERT.match(name) if fused is None else None
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
            if suffix in QUANT_SUFFIXES and module:
                plain.setdefault(module, {})[suffix] = info
    modules = []
    for name, suffixes in plain.items():
        kind = module_kind(name)
        weight = suffixes.get("weight")
        if kind is None or (weight is not None and len(weight.shape) < 2 and len(suffixes) == 1):
            continue  # norms, scalars, router.scale: not quantization candidates
        tensor_names = [f"{name}.{suffix}" for suffix in sorted(suffixes)]
        module = Module(name, kind, layer_index(name), _stored_format(suffixes), tensor_names)
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
            Module(name, "experts", layer_index(name), stored, entry["names"], entry["fused"])
        )
    modules.sort(key=lambda m: (m.layer if m.layer is not None else -1, m.name))
    return modules, extra


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
    if name.startswith(TOWER_PREFIXES):
        return name.removeprefix("model.")
    if not name.startswith(TEXT_PREFIX):
        return name
    text = name.removeprefix(TEXT_PREFIX)
    return ("language_model.model." if analysis.multimodal else "model.") + text


def shard_names(module: Module, analysis: Analysis) -> list[str]:
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
    "per_layer": "ReplicatedLinear ColumnParallelLinear",
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
    elif method == "modelopt":
        _assign_modelopt_scheme(module, analysis, qcfg)
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
    shards = shard_names(module, analysis)
    ignored = [
        next((p for p in ignore if _matches(s, _vllm_name(s, analysis), p)), None) for s in shards
    ]
    if any(ignored) and not all(ignored):
        covered = [short_name(s) for s, i in zip(shards, ignored, strict=True) if i]
        left = [short_name(s) for s, i in zip(shards, ignored, strict=True) if not i]
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


def scheme_of_name(analysis: Analysis, name: str, like: Module) -> Scheme | None:
    """The scheme the config gives a module of ``name`` that the checkpoint does not
    store (a fused shard vLLM builds anyway), kind and layer as ``like``."""
    ghost = Module(name, like.kind, like.layer, "none")
    _assign_scheme(ghost, analysis)
    return ghost.scheme


def scheme_unmapped(module: Module, analysis: Analysis) -> Scheme | None:
    """The scheme the config gives ``module`` where vLLM matches the config's module lists
    (block names, ignore and exclude lists, extra_config keys, all in checkpoint names)
    against its own name alone: a vLLM that does not map the checkpoint's names for the
    quantization config."""
    ghost = Module(
        _vllm_name(module.name, analysis), module.kind, module.layer, module.stored,
        module.tensors, module.fused_experts, module.in_features, module.out_features,
    )  # fmt: skip
    _assign_scheme(ghost, analysis)
    return ghost.scheme


def _modelopt_excluded(name: str, vllm_name: str, patterns: list[str]) -> str | None:
    """The ModelOpt ``exclude_modules`` / ``ignore`` entry that excludes a module, as
    vLLM's ``is_layer_excluded`` matches them: exactly, as a substring, or as a
    wildcard; against the checkpoint name or vLLM's."""
    for pattern in patterns:
        for candidate in (name, vllm_name):
            if pattern == candidate or pattern in candidate or fnmatch(candidate, pattern):
                return pattern
    return None


def _assign_modelopt_scheme(module: Module, analysis: Analysis, qcfg: dict[str, Any]) -> None:
    """ModelOpt's config (config.json ``quantization_config`` or hf_quant_config.json's
    ``quantization``): ``quant_algo``, and the modules it left alone."""
    if module.kind not in (*LINEAR_KINDS, "experts"):
        return
    legacy = qcfg.get("quantization") if isinstance(qcfg.get("quantization"), dict) else {}
    algo = str(qcfg.get("quant_algo") or legacy.get("quant_algo") or "").upper()
    patterns = [str(p) for p in qcfg.get("ignore") or legacy.get("exclude_modules") or []]
    shards = shard_names(module, analysis)
    excluded = [_modelopt_excluded(s, _vllm_name(s, analysis), patterns) for s in shards]
    if any(excluded) and not all(excluded):
        covered = [short_name(s) for s, e in zip(shards, excluded, strict=True) if e]
        left = [short_name(s) for s, e in zip(shards, excluded, strict=True) if not e]
        module.shard_conflict = (
            f"exclude_modules covers {', '.join(covered)} but not {', '.join(left)}"
        )
    if all(excluded):
        module.scheme_note = f"excluded ({excluded[0]})"
        return
    group = qcfg.get("group_size") or legacy.get("group_size") or 16
    inputs = ((qcfg.get("config_groups") or {}).get("group_0") or {}).get("input_activations")
    if algo == "NVFP4":
        activations = "nvfp4" if inputs or not qcfg.get("config_groups") else None
        module.scheme = Scheme("modelopt", "nvfp4", 4, int(group), None, "group", None,
                               activations, "modelopt")  # fmt: skip
    elif algo.startswith("FP8"):
        module.scheme = Scheme("modelopt", "float", 8, None, True, "tensor", None, "fp8-static")
    else:
        module.scheme = Scheme("modelopt", "unknown", None, None, None)
        module.scheme_note = f"ModelOpt quant_algo {algo!r}: not modelled"
        return
    module.scheme_note = f"quant_algo {algo}"


def _assign_gptq_scheme(
    module: Module, analysis: Analysis, qcfg: dict[str, Any], method: str
) -> None:
    if module.kind not in (*LINEAR_KINDS, "experts"):
        return
    if (
        method == "gptq"
        and module.stored != "gptq"
        and not qcfg.get("modules_in_block_to_quantize")
    ):
        # vLLM's GPTQ config quantizes the modules the checkpoint stores packed
        # (AutoGPTQConfig.maybe_update_config reads the safetensors dtypes)
        module.scheme_note = "not packed in the checkpoint"
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

"""The Gemma 4 checkpoint layout in one place: tensor names, module kinds, quantization
suffixes and the layouts the project builds and checks.

Only the standard library: the command line, the doctor and the patches import this
without torch.
"""

from __future__ import annotations

import re
from typing import Any

# Where the public (multimodal) checkpoints keep the text model's tensors.
TEXT_PREFIX = "model.language_model."
DEFAULT_LAYOUT = "ct-fused-w4a16"

LAYOUTS: dict[str, str] = {
    "bf16": "base layout: fused 3D experts, everything bf16, no quantization_config",
    "ct-fused-w4a16": "cyankiwi AWQ-4bit: compressed-tensors pack-quantized int4 g32 sym; "
    "fused 3D experts (<param>_packed/_scale) + attention q/k/v/o quantized",
    "ct-fused-w4a16-asym": "as ct-fused-w4a16, asymmetric: plus packed zero points "
    "(experts.<param>_zero_point, <module>.weight_zero_point)",
    "ct-fused-w4a16-shape": "as ct-fused-w4a16, plus 3-element experts.<param>_shape "
    "tensors (what the compressor emits for a 3D weight)",
    "ct-per-expert-w4a16": "compressed-tensors int4 g32 sym with per-expert 2D names "
    "experts.{e}.{gate,up,down}_proj.weight_packed/_scale/_shape",
    "ct-fused-w4a16-router": "as ct-fused-w4a16, but router.proj quantized too "
    "(not in the ignore list)",
    "ct-fused-w4a16-dense": "as ct-fused-w4a16, with the dense MLP (mlp.gate/up/down_proj) "
    "quantized too, as one report has it for cyankiwi's layers 27-29",
    "autoround-int4": "Intel AutoRound (auto_round:auto_gptq) int4 g128 sym: per-expert "
    "qweight/qzeros/scales; attention, dense MLP and router.proj quantized",
    "fp8-router": "compressed-tensors FP8 (float-quantized, per-channel weight scale, "
    "dynamic per-token activations): per-expert experts, attention, dense MLP and "
    "router.proj quantized",
    "ct-fused-w8a16": "cyankiwi AWQ-8bit: as ct-fused-w4a16 with int8 g32 sym, four "
    "values to an int32 word (fused 3D experts <param>_packed/_scale, attention)",
    "ct-fp8-dynamic": "RedHatAI FP8-Dynamic (llm-compressor FP8_DYNAMIC): per-expert 2D "
    "experts.{e}.{proj}.weight + .weight_scale, attention and dense MLP quantized, "
    "router bf16, dynamic per-token activations",
    "ct-nvfp4": "RedHatAI NVFP4 (llm-compressor NVFP4, W4A4): per-expert experts, attention "
    "and dense MLP as weight_packed (uint8), weight_scale (FP8), weight_global_scale, "
    "input_global_scale; router bf16",
    "qat-unquantized": "Google QAT, unquantized (gemma-4-E2B-it-qat-q4_0-unquantized): "
    "the dense KV-shared E2B layout of qat-w4a16-ct in bf16, no quantization_config",
    "qat-w4a16-ct": "Google QAT W4A16 (gemma-4-E2B/E4B-it-qat-w4a16-ct): a dense Gemma 4 "
    "with per-layer inputs and KV-shared layers that store no k_proj/v_proj/k_norm; every "
    "decoder linear int4 g32 sym pack-quantized",
    "autoround-int4-mixed": "Intel AutoRound int4-mixed: as autoround-int4, with an "
    "extra_config raising every non-expert linear (attention, dense MLP, router) to int8 by "
    "exact module name; k_eq_v layers have no v_proj, so none is listed for them",
    "gptq-int4-g64": "GPTQ (quant_method gptq, GPTQModel export) int4 g64 sym, desc_act "
    "false: per-expert qweight/qzeros/scales, attention and dense MLP quantized, router bf16",
    "modelopt-nvfp4": "ModelOpt NVFP4 (nvidia's export): per-expert "
    "experts.{e}.{proj}.weight/weight_scale/weight_scale_2/input_scale; attention, dense "
    "MLP and router bf16; hf_quant_config.json + config.json quantization_config",
    "modelopt-nvfp4-moe": "ModelOpt NVFP4 (community export, bg-digitalservices): experts "
    "already under .moe.experts.{e}.{proj}, attention and dense MLP NVFP4 too, router bf16",
}

# Text-config overrides a layout implies (applied under the size preset and the caller's
# overrides): the QAT W4A16 layout is Google's dense E2B / E4B family, not the MoE.
# E2B (google/gemma-4-E2B-it): hidden 1536, 35 layers (4 sliding : 1 full), 8 heads,
# 1 KV head, head_dim 256 / global 512 without attention_k_eq_v, per-layer inputs of 256,
# the last 20 layers KV-shared with a double-wide MLP. Tiny here: 4 layers, the last 2
# KV-shared (one sliding, one full: each reads the cache of the last non-shared layer of
# its type).
_E2B_TINY: dict[str, Any] = {
    "enable_moe_block": False,
    "num_experts": None,
    "top_k_experts": None,
    "moe_intermediate_size": None,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention", "full_attention"] * 2,
    "num_key_value_heads": 1,
    "num_global_key_value_heads": None,
    "attention_k_eq_v": False,
    "num_kv_shared_layers": 2,
    "use_double_wide_mlp": True,
    "hidden_size_per_layer_input": 64,
}
LAYOUT_CONFIGS: dict[str, dict[str, Any]] = {
    "qat-unquantized": _E2B_TINY,
    "qat-w4a16-ct": _E2B_TINY,
}

# Architecture forms of the built checkpoints (the weights live under TEXT_PREFIX in
# every form, as in the public checkpoints).
DEFAULT_FORM = "causal-lm"
FORMS: dict[str, str] = {
    "causal-lm": "text-only Gemma4ForCausalLM (model_type gemma4_text)",
    "multimodal": "Gemma4ForConditionalGeneration as the public checkpoints ship it: "
    "text_config + vision_config, a tiny bf16 vision tower (model.vision_tower.*, "
    "model.embed_vision.*) that the quantization config ignores",
    "multimodal-no-vision": "Gemma4ForConditionalGeneration with vision_config null "
    "(transformers' Gemma4Config allows it; no tower tensors; vLLM's multimodal class "
    "refuses it, its text architecture loads it)",
    "multimodal-int4-embedder": "as multimodal, but the vision embedder's projection "
    "(model.embed_vision.embedding_projection) int4 like the text linears and out of the "
    "ignore list, as a QAT export shipped Google's 12B vision embedder by mistake "
    "(compressed-tensors int4 layouts only)",
}

# Size presets: text-config overrides (the layer pattern follows the depth: with 2 layers,
# 1 sliding + 1 full). "real" has the 26B-A4B's per-layer dimensions
# (hidden 2816, dense MLP 2112, experts 704, head dims 256 / 512 with attention_k_eq_v on
# the full layer) with few layers, few experts and a small vocabulary; "real-tp2" /
# "real-tp4" give the experts the intermediate size one rank holds at tensor parallel
# 2 / 4 (352 / 176).
DEFAULT_SIZE = "tiny"
REAL_DIMS: dict[str, Any] = {
    "hidden_size": 2816,
    "intermediate_size": 2112,
    "moe_intermediate_size": 704,
    "num_experts": 8,
    "top_k_experts": 2,
    "num_hidden_layers": 2,
    "sliding_window": 1024,
    "num_attention_heads": 16,
    "head_dim": 256,
    "num_key_value_heads": 8,
    "global_head_dim": 512,
    "num_global_key_value_heads": 2,
    "attention_k_eq_v": True,
}
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},
    "real": REAL_DIMS,
    "real-tp2": {**REAL_DIMS, "moe_intermediate_size": 352},
    "real-tp4": {**REAL_DIMS, "moe_intermediate_size": 176},
}

# --------------------------------------------------------------------------- modules

ATTENTION_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
# Fused 3D expert parameters ([E, 2I, H] and [E, H, I]) and the per-expert 2D modules
# they hold (gate_up_proj is gate_proj and up_proj stacked along the output dim).
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")
EXPERT_PROJS = MLP_PROJS
# Every decoder layer has the first four; the MoE block adds the other three.
LAYER_NORMS = (
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
    "pre_feedforward_layernorm_2",
    "post_feedforward_layernorm_1",
    "post_feedforward_layernorm_2",
)

# --------------------------------------------------------------------------- suffixes

# compressed-tensors, per 2D module: `<module>.<suffix>`.
CT_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
# Fused 3D experts drop the `weight` part: `<layer>.experts.<param>_<suffix>`.
FUSED_SUFFIXES = ("packed", "scale", "zero_point", "shape", "g_idx")
# GPTQ / AutoRound (auto_gptq packing), per 2D module: `<module>.<suffix>`.
GPTQ_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")
# Every per-module tensor suffix a quantized Gemma 4 checkpoint may carry.
QUANT_SUFFIXES = (
    *CT_SUFFIXES,
    "weight_g_idx",
    "weight_global_scale",
    "input_global_scale",
    "input_scale",
    "weight_scale_2",  # ModelOpt NVFP4's per-tensor scale
    *GPTQ_SUFFIXES,
    "weight",
    "bias",
)

# --------------------------------------------------------------------------- names

# `<layer>.experts.<param>` (bf16) or `<layer>.experts.<param>_<suffix>` (quantized).
FUSED_EXPERT = re.compile(
    r"^(?P<module>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)"
    r"(?:_(?P<suffix>packed|scale|zero_point|shape|g_idx))?$"
)
# `<layer>.experts.<e>.<proj>.<suffix>`.
PER_EXPERT = re.compile(
    r"^(?P<module>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)"
    r"\.(?P<suffix>\w+)$"
)
LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# (kind, pattern on the module name): first match wins.
MODULE_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("vision", re.compile(r"(^|\.)(vision_tower|embed_vision|multi_modal_projector)(\.|$)")),
    ("audio", re.compile(r"(^|\.)(audio_tower|embed_audio)(\.|$)")),
    ("experts", re.compile(r"\.experts$")),
    ("router", re.compile(r"\.router\.proj$")),
    ("attention", re.compile(r"\.self_attn\.[qkvo]_proj$")),
    ("dense_mlp", re.compile(r"\.mlp\.(gate|up|down)_proj$")),
    # per-layer inputs (E2B / E4B): the layers' gate and projection, the model's projection
    ("per_layer", re.compile(r"(\.per_layer_(input_gate|projection)|per_layer_model_projection)$")),
    ("embedding", re.compile(r"embed_tokens(_per_layer)?$")),
    ("lm_head", re.compile(r"(^|\.)lm_head$")),
)
# Order of construction inside a decoder layer (a load stops at the first failure).
KIND_ORDER = {"attention": 0, "dense_mlp": 1, "router": 2, "experts": 3, "per_layer": 4}


def module_kind(module: str) -> str | None:
    """The kind (a key of ``MODULE_KINDS``) of a module name, or None."""
    for kind, pattern in MODULE_KINDS:
        if pattern.search(module):
            return kind
    return None


def layer_index(name: str) -> int | None:
    """The decoder layer a tensor or module name belongs to, or None."""
    match = LAYER.search(name)
    return int(match.group(1)) if match else None


def number_spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5" (sorted, duplicates dropped)."""
    spans: list[list[int]] = []
    for n in sorted(set(numbers)):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


def layer_prefix(layer: int) -> str:
    """``model.language_model.layers.<layer>.``: where one decoder layer's tensors live."""
    return f"{TEXT_PREFIX}layers.{layer}."


# --------------------------------------------------------------------------- tensors


def attention_shape(cfg: dict[str, Any], layer: int) -> tuple[int, int, bool]:
    """(head_dim, kv_heads, has_v_proj) of one layer, as transformers builds it."""
    if cfg["layer_types"][layer] == "sliding_attention":
        return cfg["head_dim"], cfg["num_key_value_heads"], True
    if cfg["attention_k_eq_v"]:
        return cfg["global_head_dim"], cfg["num_global_key_value_heads"], False
    return cfg["global_head_dim"], cfg["num_key_value_heads"], True


def first_kv_shared_layer(cfg: dict[str, Any]) -> int:
    """The first of the last ``num_kv_shared_layers`` layers, which read an earlier
    layer's KV cache and have no K/V weights of their own (the layer count if none)."""
    return cfg["num_hidden_layers"] - (cfg.get("num_kv_shared_layers") or 0)


def has_moe(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("enable_moe_block", cfg.get("num_experts") is not None))


def per_layer_input_size(cfg: dict[str, Any]) -> int:
    return cfg.get("hidden_size_per_layer_input") or 0


def model_tensors(cfg: dict[str, Any]) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, role, shape) of the text model's tensors outside the decoder layers, names
    without ``TEXT_PREFIX``: per-layer inputs (E2B / E4B) where the config has them."""
    ple = per_layer_input_size(cfg)
    if not ple:
        return []
    total = cfg["num_hidden_layers"] * ple
    return [
        ("embed_tokens_per_layer.weight", "embedding", (cfg["vocab_size_per_layer_input"], total)),
        ("per_layer_model_projection.weight", "linear", (total, cfg["hidden_size"])),
        ("per_layer_projection_norm.weight", "norm", (ple,)),
    ]


def layer_tensors(cfg: dict[str, Any], layer: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, role, shape) of every tensor of one decoder layer in the bf16 base layout
    (fused 3D experts where the config has an MoE block), in checkpoint order; names
    without the layer prefix.

    Roles: ``linear`` (attention and dense MLP weights), ``router`` (router.proj),
    ``experts`` (fused 3D expert weights), ``norm`` (norm-like vectors, the router's
    scales included) and ``ones`` (layer_scalar).
    """
    h = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    head_dim, kv_heads, has_v = attention_shape(cfg, layer)
    # KV-shared layers: queries only (transformers builds no k_proj, v_proj or k_norm,
    # and saves none), and a double-wide MLP where the config asks for it
    kv_shared = layer >= first_kv_shared_layer(cfg)
    inter = cfg["intermediate_size"] * (2 if kv_shared and cfg.get("use_double_wide_mlp") else 1)
    out: list[tuple[str, str, tuple[int, ...]]] = [
        ("self_attn.q_proj.weight", "linear", (heads * head_dim, h))
    ]
    if not kv_shared:
        out.append(("self_attn.k_proj.weight", "linear", (kv_heads * head_dim, h)))
        if has_v:
            out.append(("self_attn.v_proj.weight", "linear", (kv_heads * head_dim, h)))
    out += [
        ("self_attn.o_proj.weight", "linear", (h, heads * head_dim)),
        ("self_attn.q_norm.weight", "norm", (head_dim,)),
    ]
    if not kv_shared:
        out.append(("self_attn.k_norm.weight", "norm", (head_dim,)))
    out += [
        ("mlp.gate_proj.weight", "linear", (inter, h)),
        ("mlp.up_proj.weight", "linear", (inter, h)),
        ("mlp.down_proj.weight", "linear", (h, inter)),
    ]
    norms = LAYER_NORMS[:4]
    if has_moe(cfg):
        e, moe_inter = cfg["num_experts"], cfg["moe_intermediate_size"]
        out += [
            ("router.proj.weight", "router", (e, h)),
            ("router.scale", "norm", (h,)),
            ("router.per_expert_scale", "norm", (e,)),
            ("experts.gate_up_proj", "experts", (e, 2 * moe_inter, h)),
            ("experts.down_proj", "experts", (e, h, moe_inter)),
        ]
        norms = LAYER_NORMS
    out += [(f"{n}.weight", "norm", (h,)) for n in norms]
    ple = per_layer_input_size(cfg)
    if ple:
        out += [
            ("per_layer_input_gate.weight", "linear", (ple, h)),
            ("per_layer_projection.weight", "linear", (h, ple)),
            ("post_per_layer_input_norm.weight", "norm", (h,)),
        ]
    out.append(("layer_scalar", "ones", (1,)))
    return out


# --------------------------------------------------------------------------- vision

VISION_PREFIX = "model.vision_tower."
EMBED_VISION_PREFIX = "model.embed_vision."
# Checkpoint prefixes of the towers and their projections into the text model; vLLM's
# multimodal class drops the leading "model." (its hf_to_vllm_mapper).
TOWER_PREFIXES = (VISION_PREFIX, EMBED_VISION_PREFIX, "model.audio_tower.", "model.embed_audio.")


def vision_tensors(
    vision: dict[str, Any], text_hidden: int
) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, role, shape) of the vision tower and its projection into the text model, full
    names, as transformers' ``Gemma4ForConditionalGeneration`` names them in its state dict
    (checked against transformers 5.7 and 5.19, ``use_clipped_linears`` off).

    Roles as in ``layer_tensors``, plus ``position`` (the learned 2D position table).
    The patch embedder sees 3 * patch_size**2 pixel values per patch.
    """
    h, inter = vision["hidden_size"], vision["intermediate_size"]
    head_dim = vision["head_dim"]
    q_out = vision["num_attention_heads"] * head_dim
    kv_out = vision["num_key_value_heads"] * head_dim
    patch = 3 * vision["patch_size"] ** 2
    out: list[tuple[str, str, tuple[int, ...]]] = [
        (
            f"{VISION_PREFIX}patch_embedder.position_embedding_table",
            "position",
            (2, vision["position_embedding_size"], h),
        ),
        (f"{VISION_PREFIX}patch_embedder.input_proj.weight", "linear", (h, patch)),
    ]
    linears = {
        "self_attn.q_proj": (q_out, h),
        "self_attn.k_proj": (kv_out, h),
        "self_attn.v_proj": (kv_out, h),
        "self_attn.o_proj": (h, q_out),
        "mlp.gate_proj": (inter, h),
        "mlp.up_proj": (inter, h),
        "mlp.down_proj": (h, inter),
    }
    norms = (
        "input_layernorm",
        "post_attention_layernorm",
        "pre_feedforward_layernorm",
        "post_feedforward_layernorm",
    )
    for i in range(vision["num_hidden_layers"]):
        p = f"{VISION_PREFIX}encoder.layers.{i}."
        # each linear is wrapped (Gemma4ClippableLinear): the weight is `<proj>.linear.weight`
        out += [(f"{p}{m}.linear.weight", "linear", shape) for m, shape in linears.items()]
        out += [(f"{p}self_attn.{n}.weight", "norm", (head_dim,)) for n in ("q_norm", "k_norm")]
        out += [(f"{p}{n}.weight", "norm", (h,)) for n in norms]
    out.append((f"{EMBED_VISION_PREFIX}embedding_projection.weight", "linear", (text_hidden, h)))
    return out

"""The layouts of ``LAYOUTS``: the bf16 base weights turned into each public layout's
tensors and quantization_config, and ``build_checkpoint``, which writes one.

Experts go into the quantizers stacked along the output dim, which gives exactly the
per-expert results. Every layout of one seed shares the same bf16 base weights
(``base_state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..layout import (
    DEFAULT_FORM,
    DEFAULT_LAYOUT,
    DEFAULT_SIZE,
    FORMS,
    FUSED_EXPERT,
    LAYOUT_CONFIGS,
    LAYOUTS,
    SIZES,
    TEXT_PREFIX,
    layer_prefix,
    module_kind,
    per_layer_input_size,
)
from .config import WEIGHT_STD, base_state_dict, make_text_config
from .files import save_tensors, write_json
from .multimodal import (
    EMBEDDER,
    PROCESSOR_CONFIG,
    PROCESSOR_FILE,
    VISION_IGNORE,
    multimodal_config,
    vision_state_dict,
)
from .quantizers import (
    AUTOROUND_GROUP_SIZE,
    CT_GROUP_SIZE,
    GPTQ_GROUP_SIZE,
    MODELOPT_VERSION,
    NVFP4_GROUP_SIZE,
    ct_compress_fp8,
    ct_compress_int,
    ct_compress_int_3d,
    ct_compress_nvfp4,
    ct_fp8_args,
    ct_int_args,
    ct_nvfp4_args,
    ct_quantization_config,
    gptq_compress,
    gptq_compress_int4,
    nvfp4_compress,
    nvfp4_global_scale,
    nvfp4_input_global_scale,
)
from .tokenizer import write_tokenizer


def _weight_of(name: str, *kinds: str) -> bool:
    """Whether ``name`` is the 2D ``.weight`` of a module of one of ``kinds``."""
    return name.endswith(".weight") and module_kind(name.removesuffix(".weight")) in kinds


def _is_attention(name: str) -> bool:
    return _weight_of(name, "attention")


def _is_router(name: str) -> bool:
    return _weight_of(name, "router")


def _is_dense_mlp(name: str) -> bool:
    return _weight_of(name, "dense_mlp")


def _is_any_linear(name: str) -> bool:
    return _weight_of(name, "attention", "dense_mlp", "router")


def _is_fused_expert(name: str) -> bool:
    """A bf16 fused 3D expert parameter (``experts.gate_up_proj`` / ``down_proj``)."""
    match = FUSED_EXPERT.match(name)
    return match is not None and match["suffix"] is None


def _ignore_list(cfg: dict[str, Any], *, router: bool, dense_mlp: bool) -> list[str]:
    """bf16 modules by checkpoint name, in module order, then lm_head."""
    names = []
    for p in map(layer_prefix, range(cfg["num_hidden_layers"])):
        if dense_mlp:
            names += [f"{p}mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
        if router:
            names.append(f"{p}router.proj")
    return names + ["lm_head"]


def _prefixed(module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{module}.{k}": v for k, v in tensors.items()}


Layout = tuple[dict[str, torch.Tensor], dict[str, Any] | None]


def _layout_bf16(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    return dict(base), None


# GPTQ stores [in, out]; every other format here stores [out, in].
_OUTPUT_DIM = {"qweight": 1, "qzeros": 1, "scales": 1}


def _quantize_experts(
    base: dict[str, torch.Tensor],
    layer: str,
    quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """One layer's fused experts as quantized per-expert modules
    ``experts.{e}.{gate,up,down}_proj``.

    Each projection is quantized for all experts in one call on the experts stacked
    along the output dim, then split: outputs are quantized and packed independently
    (zero points in words of 8 outputs, and every output dim is a multiple of 8), so
    this equals quantizing expert by expert, only faster.
    """
    gate_up = base[layer + "experts.gate_up_proj"]
    inter = gate_up.shape[1] // 2
    projections = {
        "gate_proj": gate_up[:, :inter],
        "up_proj": gate_up[:, inter:],
        "down_proj": base[layer + "experts.down_proj"],
    }
    out: dict[str, torch.Tensor] = {}
    for proj, w in projections.items():
        n, rows, cols = w.shape
        if rows % 8:
            raise ValueError(f"expert output dim {rows} is not a multiple of 8")
        if getattr(quantize, "per_tensor_scale", False):
            # one scale per whole tensor (NVFP4's weight_scale_2): expert by expert, one
            # for gate and up together (vLLM fuses them; ModelOpt exports one value)
            for e in range(n):
                shared = gate_up[e].abs().amax() if proj != "down_proj" else None
                for suffix, t in quantize(w[e], global_amax=shared).items():
                    out[f"{layer}experts.{e}.{proj}.{suffix}"] = t.contiguous().clone()
            continue
        for suffix, t in quantize(w.reshape(n * rows, cols)).items():
            if suffix == "weight_shape":
                parts = [torch.tensor([rows, cols], dtype=torch.int64) for _ in range(n)]
            else:
                parts = list(t.chunk(n, dim=_OUTPUT_DIM.get(suffix, 0)))
            for e, part in enumerate(parts):
                # a copy: views of one storage would be saved as shared tensors
                out[f"{layer}experts.{e}.{proj}.{suffix}"] = part.contiguous().clone()
    return out


def _quantize_modules(
    base: dict[str, torch.Tensor],
    quantize: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    select: Callable[[str], bool],
    *,
    unfuse_experts: bool,
) -> dict[str, torch.Tensor]:
    """Quantize the 2D weights ``select`` picks into ``<module>.<suffix>`` tensors.

    With ``unfuse_experts``, fused experts become quantized per-expert modules;
    otherwise they are copied unchanged.
    """
    out: dict[str, torch.Tensor] = {}
    for name, t in base.items():
        if _is_fused_expert(name) and unfuse_experts:
            if name.endswith(".gate_up_proj"):  # both fused tensors of the layer at once
                out.update(_quantize_experts(base, name[: -len("experts.gate_up_proj")], quantize))
        elif select(name):
            out.update(_prefixed(name.removesuffix(".weight"), quantize(t)))
        else:
            out[name] = t
    return out


def _layout_ct_int(
    base: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    *,
    bits: int = 4,
    symmetric: bool = True,
    fused: bool = True,
    shape_tensors: bool = False,
    router: bool = False,
    dense_mlp: bool = False,
) -> Layout:
    """cyankiwi's layouts (AWQ-4bit, and its variants here): pack-quantized int, group 32,
    attention and experts quantized, router and dense MLP in the ignore list.

    AWQ-8bit (``bits=8``): the same quantizer (llm-compressor, compressed-tensors
    ``pack-quantized``, which packs int8 four to an int32 word) on the same model. Its
    headers are not public here: the fused 3D ``<param>_packed`` spelling, group 32,
    symmetry and the ignore list are taken from the 4-bit sibling; correct them here if
    the real checkpoint differs.
    """
    out = _quantize_modules(
        base,
        lambda w: ct_compress_int(w, symmetric=symmetric, bits=bits),
        lambda n: (
            _is_attention(n) or (router and _is_router(n)) or (dense_mlp and _is_dense_mlp(n))
        ),
        unfuse_experts=not fused,
    )
    if fused:
        # `<param>_packed` etc.: the spelling of the fused 3D checkpoints.
        for name in [n for n in out if _is_fused_expert(n)]:
            q = ct_compress_int_3d(out.pop(name), symmetric=symmetric, bits=bits)
            if not shape_tensors:
                del q["weight_shape"]
            for key, t in q.items():  # weight_packed -> <param>_packed, ...
                out[f"{name}_{key.removeprefix('weight_')}"] = t
    qcfg = ct_quantization_config(
        {"weights": ct_int_args(symmetric, bits=bits)},
        "pack-quantized",
        _ignore_list(cfg, router=not router, dense_mlp=not dense_mlp),
    )
    return out, qcfg


# llm-compressor's Gemma 4 examples (examples/quantization_w8a8_fp8/gemma4_example.py,
# "Checkpoint available at RedHatAI/gemma-4-26B-A4B-it-FP8-Dynamic", and
# quantization_w4a4_fp4/gemma4_example.py for NVFP4): every Linear but these. Its MoE
# calibration unfuses the experts into per-expert Linears, which is what it saves.
LLM_COMPRESSOR_GEMMA4_IGNORE = ["lm_head", "re:.*embed.*", "re:.*router", "re:.*vision_tower.*"]


def _layout_fp8_dynamic(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    """RedHatAI/gemma-4-26B-A4B-it-FP8-Dynamic: FP8_DYNAMIC (per-channel FP8 weights,
    dynamic per-token FP8 activations) on attention, dense MLP and per-expert experts
    ``experts.{e}.{gate,up,down}_proj.weight`` + ``.weight_scale``; router bf16. Tensor
    names follow llm-compressor's per-expert output; the config is its example's."""
    out = _quantize_modules(
        base,
        ct_compress_fp8,
        lambda n: _weight_of(n, "attention", "dense_mlp"),
        unfuse_experts=True,
    )
    return out, _llm_compressor_config(ct_fp8_args(), "float-quantized")


def _llm_compressor_config(args: tuple[Any, Any], fmt: str) -> dict[str, Any]:
    weights, activations = args
    return ct_quantization_config(
        {"weights": weights, "input_activations": activations},
        fmt,
        list(LLM_COMPRESSOR_GEMMA4_IGNORE),
    )


# vLLM fuses these checkpoint modules into one layer, which takes one global scale:
# llm-compressor gives them a common one (nvfp4_global_scale).
_NVFP4_FUSED = {
    "q_proj": "qkv",
    "k_proj": "qkv",
    "v_proj": "qkv",
    "gate_proj": "gate_up",
    "up_proj": "gate_up",
}


def _nvfp4_modules(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVFP4 tensors of 2D ``<module>.weight``s, fused modules with one global scale.

    Modules of one input size go through the compressor in one call, stacked along the
    rows with each row's global scale (rows are quantized independently)."""
    groups: dict[str, list[str]] = {}
    for name in weights:
        parent, _, proj = name.removesuffix(".weight").rpartition(".")
        groups.setdefault(f"{parent}.{_NVFP4_FUSED.get(proj, proj)}", []).append(name)
    global_scales = {}
    for names in groups.values():
        shared = nvfp4_global_scale(*(weights[n] for n in names))
        global_scales.update(dict.fromkeys(names, shared))
    by_width: dict[int, list[str]] = {}
    for name, t in weights.items():
        by_width.setdefault(t.shape[1], []).append(name)
    input_scale = nvfp4_input_global_scale()
    out: dict[str, torch.Tensor] = {}
    for names in by_width.values():
        rows = [weights[n].shape[0] for n in names]
        per_row = torch.cat([global_scales[n].expand(r) for n, r in zip(names, rows, strict=True)])
        stacked = ct_compress_nvfp4(torch.cat([weights[n] for n in names]), per_row)
        split = {k: v.split(rows) for k, v in stacked.items()}
        for i, name in enumerate(names):
            module = name.removesuffix(".weight")
            out[f"{module}.weight_packed"] = split["weight_packed"][i].clone()
            out[f"{module}.weight_scale"] = split["weight_scale"][i].clone()
            # copies: a scale shared by fused modules would be saved as a shared tensor
            out[f"{module}.weight_global_scale"] = global_scales[name].clone().reshape(1)
            out[f"{module}.input_global_scale"] = input_scale.clone().reshape(1)
    return out


def _layout_nvfp4(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    """RedHatAI/gemma-4-26B-A4B-it-NVFP4: llm-compressor's NVFP4 scheme (W4A4) on
    attention, dense MLP and per-expert experts, each module ``weight_packed`` (uint8),
    ``weight_scale`` (FP8 E4M3, groups of 16), ``weight_global_scale`` and
    ``input_global_scale`` (float32 [1]); router bf16. Fused modules (q/k/v, gate/up,
    each expert's gate/up) share one global scale, as llm-compressor writes them."""
    linears = {n: t for n, t in base.items() if _weight_of(n, "attention", "dense_mlp")}
    experts: dict[str, torch.Tensor] = {}
    for name in [n for n in base if _is_fused_expert(n) and n.endswith(".gate_up_proj")]:
        layer = name.removesuffix("experts.gate_up_proj")
        gate_up, down = base[name], base[layer + "experts.down_proj"]
        inter = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            p = f"{layer}experts.{e}."
            experts[p + "gate_proj.weight"] = gate_up[e, :inter]
            experts[p + "up_proj.weight"] = gate_up[e, inter:]
            experts[p + "down_proj.weight"] = down[e]
    out = {n: t for n, t in base.items() if n not in linears and not _is_fused_expert(n)}
    out.update(_nvfp4_modules(linears))
    out.update(_nvfp4_modules(experts))
    return out, _llm_compressor_config(ct_nvfp4_args(), "nvfp4-pack-quantized")


def _layout_qat(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    """google/gemma-4-E2B-it-qat-w4a16-ct (and E4B): int4 group 32 symmetric,
    pack-quantized, on the decoder's linears; KV-shared layers carry no k_proj, v_proj
    or k_norm (the base layout of this config already leaves them out).

    Published: the scheme, and that vision tower / embedder, audio tower, router,
    embeddings and lm_head stay bf16 (vLLM recipes, Google/Gemma4.md). Not established
    here: whether the per-layer-input linears (``per_layer_input_gate``,
    ``per_layer_projection``, ``per_layer_model_projection``) are quantized (they are
    Linears, so they are here) and the exact ignore strings.
    """
    out = _quantize_modules(
        base,
        ct_compress_int,
        lambda n: _weight_of(n, "attention", "dense_mlp", "per_layer"),
        unfuse_experts=False,
    )
    qcfg = ct_quantization_config(
        {"weights": ct_int_args()}, "pack-quantized", ["lm_head", *QAT_TOWER_IGNORE]
    )
    return out, qcfg


QAT_TOWER_IGNORE = [
    "re:.*vision_tower.*",
    "re:.*embed_vision.*",
    "re:.*audio_tower.*",
    "re:.*embed_audio.*",
]


# As Intel's Gemma 4 AutoRound exports write it (quantization_config.json too).
AUTOROUND_CONFIG: dict[str, Any] = {
    "bits": 4,
    "data_type": "int",
    "group_size": AUTOROUND_GROUP_SIZE,
    "sym": True,
    "autoround_version": "0.13.0",
    "block_name_to_quantize": TEXT_PREFIX + "layers",
    "quant_method": "auto-round",
    "packing_format": "auto_round:auto_gptq",
}


def _layout_autoround(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    # Every linear of the decoder blocks, router included (the tiny dims divide 128).
    out = _quantize_modules(base, gptq_compress_int4, _is_any_linear, unfuse_experts=True)
    return out, dict(AUTOROUND_CONFIG)


# Which non-expert linears Intel's "int4-mixed" recipe keeps at 8 bits. Not certain: the
# model card's recipe ("non-expert layers fall back to 8 bits") is what this follows;
# vLLM's reports (#47473, #43227) establish only that q_proj/k_proj of the k_eq_v
# full-attention layers are listed at another width than the default, with no v_proj
# entry (transformers builds no v_proj module there, and AutoRound lists modules it
# quantized). Change this table to match the real extra_config.
MIXED_BITS = {"attention": 8, "dense_mlp": 8, "router": 8}


def _layout_autoround_mixed(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    """AutoRound int4 with per-module widths: int4 experts, ``MIXED_BITS`` for the rest,
    written as AutoRound writes per-layer overrides: ``extra_config`` keyed by the exact
    (checkpoint) module name, with bits, group size and symmetry."""
    out = _quantize_modules(base, gptq_compress_int4, lambda _: False, unfuse_experts=True)
    extra: dict[str, dict[str, Any]] = {}
    for kind, bits in MIXED_BITS.items():
        names = [n for n in out if _weight_of(n, kind)]
        out = _quantize_modules(
            out, lambda w, bits=bits: gptq_compress(w, bits), names.__contains__,
            unfuse_experts=False,
        )  # fmt: skip
        for name in names:
            module = name.removesuffix(".weight")
            extra[module] = {"bits": bits, "group_size": AUTOROUND_GROUP_SIZE, "sym": True}
    return out, {**AUTOROUND_CONFIG, "extra_config": dict(sorted(extra.items()))}


def _layout_gptq(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    """A GPTQModel export: every decoder linear but the router (GPTQModel's Gemma 4
    module tree quantizes attention, dense MLP and experts; not certain for every
    community export: some keep the dense MLP bf16), int4, group 64, symmetric, no
    activation order (``desc_act`` false: no ``g_idx`` permutation, though GPTQModel
    writes a trivial ``g_idx``; these tiny checkpoints leave it out, as vLLM derives the
    same order). The config is GPTQModel's; quantize_config.json repeats it."""
    select = lambda n: _weight_of(n, "attention", "dense_mlp")  # noqa: E731
    out = _quantize_modules(
        base, lambda w: gptq_compress(w, 4, GPTQ_GROUP_SIZE), select, unfuse_experts=True
    )
    qcfg = {
        "bits": 4,
        "group_size": GPTQ_GROUP_SIZE,
        "desc_act": False,
        "sym": True,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "true_sequential": True,
        "damp_percent": 0.05,
        "static_groups": False,
        "meta": {
            "quantizer": ["gptqmodel:4.2.5"],
            "uri": "https://github.com/modelcloud/gptqmodel",
        },
    }
    return out, qcfg


def _modelopt_config(ignore: list[str]) -> dict[str, Any]:
    """config.json's quantization_config as ModelOpt's ``export_hf_checkpoint`` writes
    it for NVFP4 (hf_quant_config.json carries the same in its legacy form, see
    ``_side_files``). Not certain in every key: ModelOpt versions differ in the
    ``config_groups`` they add; vLLM reads ``quant_method``, ``quant_algo``, ``ignore``
    (wildcards) and ``group_size``."""
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_GROUP_SIZE}
    return {
        "config_groups": {
            "group_0": {"input_activations": args, "weights": args, "targets": ["Linear"]}
        },
        "ignore": ignore,
        "quant_algo": "NVFP4",
        "kv_cache_scheme": None,
        "producer": {"name": "modelopt", "version": MODELOPT_VERSION},
        "quant_method": "modelopt",
    }


# Modules vLLM fuses into one layer, by their last name component.
_FUSED_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up",
                 "up_proj": "gate_up"}  # fmt: skip


def _fused_amax(base: dict[str, torch.Tensor], kinds: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The amax of every 2D weight of ``kinds``, taken over the modules vLLM fuses with it."""
    names = [n for n in base if _weight_of(n, *kinds)]
    groups: dict[str, list[str]] = {}
    for name in names:
        parent, leaf = name.removesuffix(".weight").rsplit(".", 1)
        groups.setdefault(f"{parent}.{_FUSED_GROUPS.get(leaf, leaf)}", []).append(name)
    return {
        name: torch.stack([base[n].float().abs().amax() for n in members]).amax()
        for members in groups.values()
        for name in members
    }


def _layout_modelopt_nvfp4(
    base: dict[str, torch.Tensor], cfg: dict[str, Any], *, linears: bool = False,
    moe_prefix: bool = False,
) -> Layout:  # fmt: skip
    """ModelOpt NVFP4, per-expert (ModelOpt quantizes ``nn.Linear`` modules only, so
    the fused 3D experts are unfused into ``experts.{e}.{gate,up,down}_proj`` first).

    nvidia/Gemma-4-26B-A4B-NVFP4 quantizes the experts only (its size, 20.07 GB against
    17.81 GB for an export that also quantizes attention and dense MLP, fits exactly
    attention and dense MLP in bf16); ``linears`` quantizes attention and dense MLP too,
    as bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4 does. ``moe_prefix`` writes the
    experts under ``layers.N.moe.experts`` (that checkpoint's spelling, per vLLM PR
    #41206). ModelOpt lists every linear it left alone in ``ignore`` /
    ``exclude_modules`` (the router, lm_head, and the rest here).
    """
    out = _quantize_modules(base, nvfp4_compress, lambda _: False, unfuse_experts=True)
    if linears:
        shared = _fused_amax(base, ("attention", "dense_mlp"))
        for name, amax in shared.items():
            module = name.removesuffix(".weight")
            out.update(_prefixed(module, nvfp4_compress(out.pop(name), global_amax=amax)))
    if moe_prefix:
        out = {n.replace(".experts.", ".moe.experts.", 1): t for n, t in out.items()}
    left = [
        n.removesuffix(".weight") for n in out if _is_any_linear(n) and out[n].is_floating_point()
    ]
    return out, _modelopt_config([*left, "lm_head"])


def _layout_fp8_router(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    out = _quantize_modules(base, ct_compress_fp8, _is_any_linear, unfuse_experts=True)
    w_args, a_args = ct_fp8_args()
    qcfg = ct_quantization_config(
        {"weights": w_args, "input_activations": a_args}, "float-quantized", ["lm_head"]
    )
    return out, qcfg


_LAYOUT_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor], dict[str, Any]], Layout]] = {
    "bf16": _layout_bf16,
    "ct-fused-w4a16": _layout_ct_int,
    "ct-fused-w4a16-asym": lambda b, c: _layout_ct_int(b, c, symmetric=False),
    "ct-fused-w4a16-shape": lambda b, c: _layout_ct_int(b, c, shape_tensors=True),
    "ct-per-expert-w4a16": lambda b, c: _layout_ct_int(b, c, fused=False),
    "ct-fused-w4a16-router": lambda b, c: _layout_ct_int(b, c, router=True),
    "ct-fused-w4a16-dense": lambda b, c: _layout_ct_int(b, c, dense_mlp=True),
    "autoround-int4": _layout_autoround,
    "fp8-router": _layout_fp8_router,
    "ct-fused-w8a16": lambda b, c: _layout_ct_int(b, c, bits=8),
    "ct-fp8-dynamic": _layout_fp8_dynamic,
    "ct-nvfp4": _layout_nvfp4,
    "qat-unquantized": _layout_bf16,
    "qat-w4a16-ct": _layout_qat,
    "autoround-int4-mixed": _layout_autoround_mixed,
    "gptq-int4-g64": _layout_gptq,
    "modelopt-nvfp4": _layout_modelopt_nvfp4,
    "modelopt-nvfp4-moe": lambda b, c: _layout_modelopt_nvfp4(b, c, linears=True, moe_prefix=True),
}

# The quantization group each quantized layout's dims must hold whole.
_GROUP_SIZES = {
    "autoround-int4": AUTOROUND_GROUP_SIZE,
    "autoround-int4-mixed": AUTOROUND_GROUP_SIZE,
    "gptq-int4-g64": GPTQ_GROUP_SIZE,
    "modelopt-nvfp4": NVFP4_GROUP_SIZE,
    "modelopt-nvfp4-moe": NVFP4_GROUP_SIZE,
    "ct-nvfp4": NVFP4_GROUP_SIZE,
}
# Layouts whose every decoder linear (router included) is GPTQ-quantized.
_GPTQ_EVERYWHERE = ("autoround-int4", "autoround-int4-mixed")


def _check_dims(cfg: dict[str, Any], layout: str) -> None:
    """Quantized layouts need whole groups and whole packed words."""
    if layout in ("bf16", "qat-unquantized", "ct-fp8-dynamic"):  # FP8: per channel
        return
    group = _GROUP_SIZES.get(layout, CT_GROUP_SIZE)
    dims = {
        "hidden_size": cfg["hidden_size"],
        "num_attention_heads*head_dim": cfg["num_attention_heads"] * cfg["head_dim"],
        "num_attention_heads*global_head_dim": cfg["num_attention_heads"] * cfg["global_head_dim"],
    }
    if cfg.get("moe_intermediate_size"):
        dims["moe_intermediate_size"] = cfg["moe_intermediate_size"]
    if layout in (*_GROUP_SIZES, "qat-w4a16-ct", "ct-fused-w4a16-dense"):  # the dense MLP too
        dims["intermediate_size"] = cfg["intermediate_size"]
    if per_layer_input_size(cfg):
        dims["hidden_size_per_layer_input"] = per_layer_input_size(cfg)
    if layout in _GPTQ_EVERYWHERE:
        # the router is quantized too; its qzeros pack 8 outputs (experts) to a word
        if cfg["num_experts"] % 8:
            raise ValueError(f"num_experts={cfg['num_experts']} is not a multiple of 8")
    for key, value in dims.items():
        if value % group:
            raise ValueError(f"{key}={value} is not a multiple of group size {group}")


def _check_per_rank(cfg: dict[str, Any], layout: str) -> None:
    """A per-rank expert size that splits a quantization group has no checkpoint of its own."""
    inter = cfg.get("moe_intermediate_size")
    if (
        _LAYOUT_BUILDERS[layout] is not _layout_bf16
        and inter == SIZES["real-tp4"]["moe_intermediate_size"]
    ):
        raise ValueError(
            f"moe_intermediate_size={inter} (one rank of 704 at tensor parallel 4) is not a "
            f"multiple of group size {CT_GROUP_SIZE}: at TP=4 a rank's down_proj columns end "
            "inside a scale group, so no group-32 checkpoint has this shape (vLLM >= 0.30 "
            "refuses TP=4 for such experts); build it with --layout bf16"
        )


def _quantize_embedder(
    tensors: dict[str, torch.Tensor], qcfg: dict[str, Any] | None, layout: str
) -> None:
    """The vision embedder's projection as the layout's int4 linears, and out of the
    ignore list (the config's class target "Linear" then covers it)."""
    if qcfg is None or not layout.startswith("ct-fused-w4a16"):
        raise ValueError(
            f"the int4 embedder form needs a compressed-tensors int4 layout, not {layout}"
        )
    symmetric = layout != "ct-fused-w4a16-asym"
    weight = tensors.pop(f"{EMBEDDER}.weight")
    tensors.update(_prefixed(EMBEDDER, ct_compress_int(weight, symmetric=symmetric)))
    qcfg["ignore"] = [p for p in qcfg["ignore"] if p != "re:.*embed_vision.*"]


def _side_files(qcfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The files besides config.json that each tool writes its quantization config to."""
    method = qcfg.get("quant_method")
    if method == "auto-round":
        return {"quantization_config.json": qcfg}
    if method == "gptq":
        return {"quantize_config.json": qcfg}
    if method == "modelopt":  # the legacy form, which older vLLM reads
        quantization = {
            "quant_algo": qcfg["quant_algo"],
            "kv_cache_quant_algo": None,
            "group_size": NVFP4_GROUP_SIZE,
            "exclude_modules": qcfg["ignore"],
        }
        return {
            "hf_quant_config.json": {"producer": qcfg["producer"], "quantization": quantization}
        }
    return {}


def _known(kind: str, name: str, known: dict[str, Any]) -> None:
    if name not in known:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def build_checkpoint(
    out_dir: str | Path,
    layout: str = DEFAULT_LAYOUT,
    *,
    seed: int = 0,
    form: str = DEFAULT_FORM,
    size: str = DEFAULT_SIZE,
    **config_overrides: Any,
) -> Path:
    """Write a random checkpoint in ``layout`` (see ``LAYOUTS``), architecture ``form``
    (``FORMS``) and ``size`` preset (``SIZES``; ``config_overrides`` apply on top) to
    ``out_dir``. One seed gives the same text weights in every form."""
    _known("layout", layout, LAYOUTS)
    _known("form", form, FORMS)
    _known("size", size, SIZES)
    cfg = make_text_config(**{**SIZES[size], **LAYOUT_CONFIGS.get(layout, {}), **config_overrides})
    _check_per_rank(cfg, layout)
    _check_dims(cfg, layout)
    tensors, qcfg = _LAYOUT_BUILDERS[layout](base_state_dict(cfg, seed), cfg)
    if form != "causal-lm":
        cfg = multimodal_config(cfg, vision=form != "multimodal-no-vision")
        tensors.update(vision_state_dict(cfg, seed, WEIGHT_STD))
        if cfg["vision_config"] and qcfg is not None and "ignore" in qcfg:
            qcfg["ignore"] = [*qcfg["ignore"], *VISION_IGNORE]
        if form == "multimodal-int4-embedder":
            _quantize_embedder(tensors, qcfg, layout)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
        for name, content in _side_files(qcfg).items():
            write_json(out / name, content)
    write_json(out / "config.json", cfg)
    if form != "causal-lm":
        write_json(out / PROCESSOR_FILE, PROCESSOR_CONFIG)
    write_tokenizer(out, cfg.get("text_config", cfg)["vocab_size"])
    save_tensors(tensors, out)
    return out

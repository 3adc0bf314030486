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
- The special-token ids of the top-level config (image, audio, video ...): those of the
  tiny tokenizer (``tokenizer.MULTIMODAL_TOKENS``), where the real ones (transformers'
  ``Gemma4Config`` defaults: image 258880 ...) lie outside the tiny vocabulary.
- The vision rope parameters are written in the form transformers 5.5 - 5.7 reads
  (``rope_type: default``); transformers >= 5.19 writes ``axial`` there.
"""

from __future__ import annotations

from typing import Any

import torch

from ..layout import vision_tensors
from .tokenizer import MULTIMODAL_TOKENS, VIDEO_TOKEN, token_id

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

# The config's token ids (transformers' Gemma4Config names), in the tiny vocabulary.
MULTIMODAL_TOKEN_IDS: dict[str, int] = {
    "boi_token_id": token_id(MULTIMODAL_TOKENS["boi_token"]),
    "eoi_token_id": token_id(MULTIMODAL_TOKENS["eoi_token"]),
    "image_token_id": token_id(MULTIMODAL_TOKENS["image_token"]),
    "video_token_id": token_id(VIDEO_TOKEN),
    "boa_token_id": token_id(MULTIMODAL_TOKENS["boa_token"]),
    "eoa_token_index": token_id(MULTIMODAL_TOKENS["eoa_token"]),
    "audio_token_id": token_id(MULTIMODAL_TOKENS["audio_token"]),
}

# processor_config.json as Google's Gemma 4 checkpoints ship it (google/gemma-4-31B-it
# and google/gemma-4-26B-A4B-it; the 26B-A4B has no audio tower but its processor, like
# every Gemma4Processor, has the audio feature extractor): one file with the image
# processor, the video processor and the audio feature extractor nested, no
# preprocessor_config.json. Values as published in those repositories' files (the image
# and video sections are also transformers' Gemma4ImageProcessor / Gemma4VideoProcessor
# defaults: 280 soft tokens per image, 70 per video frame, patch 16, pooling 3, no
# mean/std normalization). transformers' feature-extractor loader reads the nested
# "feature_extractor" section; vLLM 0.20.2 builds the processor when the server starts.
RESCALE = 1 / 255
PROCESSOR_CONFIG: dict[str, Any] = {
    "audio_ms_per_token": 40,
    "audio_seq_length": 750,
    "feature_extractor": {
        "dither": 0.0,
        "feature_extractor_type": "Gemma4AudioFeatureExtractor",
        "feature_size": 128,
        "fft_length": 512,
        "fft_overdrive": False,
        "frame_length": 320,
        "hop_length": 160,
        "input_scale_factor": 1.0,
        "max_frequency": 8000.0,
        "mel_floor": 0.001,
        "min_frequency": 0.0,
        "padding_side": "right",
        "padding_value": 0.0,
        "per_bin_mean": None,
        "per_bin_stddev": None,
        "preemphasis": 0.0,
        "preemphasis_htk_flavor": True,
        "return_attention_mask": True,
        "sampling_rate": 16000,
    },
    "image_processor": {
        "do_convert_rgb": True,
        "do_normalize": False,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_processor_type": "Gemma4ImageProcessor",
        "image_seq_length": 280,
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": 280,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "resample": 3,
        "rescale_factor": RESCALE,
    },
    "image_seq_length": 280,
    "processor_class": "Gemma4Processor",
    "video_processor": {
        "do_convert_rgb": True,
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "do_sample_frames": True,
        "image_mean": [0.0, 0.0, 0.0],
        "image_std": [1.0, 1.0, 1.0],
        "max_soft_tokens": 70,
        "num_frames": 32,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "resample": 3,
        "rescale_factor": RESCALE,
        "return_metadata": False,
        "video_processor_type": "Gemma4VideoProcessor",
    },
}
PROCESSOR_FILE = "processor_config.json"

VISION_IGNORE = ["re:.*vision_tower.*", "re:.*embed_vision.*"]
# The vision embedder's projection into the text model (what a QAT export may quantize).
EMBEDDER = "model.embed_vision.embedding_projection"


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

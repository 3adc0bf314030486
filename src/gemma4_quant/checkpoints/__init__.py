"""Tiny random Gemma 4 MoE checkpoints in the public (quantized) layouts.

``build_checkpoint`` writes a seeded, random, few-MB Gemma 4 26B-A4B look-alike in one of
the layouts of ``LAYOUTS``; ``write_twin`` turns any of them into its dequantized bf16
twin. By job: ``config`` (text config, base weights), ``quantizers`` (compressed-tensors
int4 / FP8 through the real library, GPTQ through ``gemma4_quant.int4``), ``tokenizer``
(the byte-level BPE), ``layouts`` (one builder per layout, ``build_checkpoint``),
``twin`` (``dequantize_tensors``, ``write_twin``) and ``files`` (reading and writing).
"""

from __future__ import annotations

from ..int4 import pack_int4_raw, unpack_gptq_int4, unpack_int4, unpack_int4_raw
from ..layout import DEFAULT_LAYOUT, LAYOUTS, TEXT_PREFIX, attention_shape
from .config import (
    DEFAULT_TEXT_CONFIG,
    NORM_STD,
    ROUTER_STD,
    WEIGHT_STD,
    base_state_dict,
    make_text_config,
)
from .files import WEIGHTS_FILE, load_tensors
from .layouts import build_checkpoint
from .quantizers import AUTOROUND_GROUP_SIZE, CT_GROUP_SIZE, gptq_compress_int4
from .tokenizer import (
    BOS_ID,
    CHAT_TEMPLATE,
    END_OF_TURN_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TOKENIZER_FILES,
    write_tokenizer,
)
from .twin import dequantize_tensors, write_twin

__all__ = [
    "AUTOROUND_GROUP_SIZE",
    "BOS_ID",
    "CHAT_TEMPLATE",
    "CT_GROUP_SIZE",
    "DEFAULT_LAYOUT",
    "DEFAULT_TEXT_CONFIG",
    "END_OF_TURN_ID",
    "EOS_ID",
    "LAYOUTS",
    "NORM_STD",
    "PAD_ID",
    "ROUTER_STD",
    "SPECIAL_TOKENS",
    "TEXT_PREFIX",
    "TOKENIZER_FILES",
    "WEIGHTS_FILE",
    "WEIGHT_STD",
    "attention_shape",
    "base_state_dict",
    "build_checkpoint",
    "dequantize_tensors",
    "gptq_compress_int4",
    "load_tensors",
    "make_text_config",
    "pack_int4_raw",
    "unpack_gptq_int4",
    "unpack_int4",
    "unpack_int4_raw",
    "write_tokenizer",
    "write_twin",
]

"""Gemma 4 checkpoints whose KV-shared layers store no K/V weights load.

Why:
    Gemma 4 E2B / E4B share the KV cache: the last ``num_kv_shared_layers`` decoder layers
    read the cache of the last earlier layer of their attention type and compute queries
    only. transformers builds no ``k_proj``, ``v_proj`` or ``k_norm`` for them, so every
    checkpoint saved through it stores none (Google's QAT exports
    ``google/gemma-4-E2B-it-qat-q4_0-unquantized``, ``-qat-w4a16-ct``, fine-tunes, merges).
    Older vLLM releases build ``qkv_proj`` and a learnable ``k_norm`` on every layer and
    only skip them in the forward pass of the shared ones. Nothing fills those
    ``k_norm`` weights, and for an unquantized checkpoint vLLM's check of unloaded
    weights stops the load: ``ValueError: Following weights were not initialized from
    checkpoint: {'...layers.15.self_attn.k_norm.weight', ...}`` (vllm-project/vllm#44788).
    Quantized checkpoints pass that check (it is off for them), and with the plugin's
    ``load_guard`` (0.24 - 0.30) the same parameters stop the load instead.

How:
    After vLLM's loader returns (``load_stream`` fill), every ``k_norm`` weight of a
    KV-shared ``Gemma4Attention`` that the checkpoint did not fill is set to 1 and
    reported as loaded. The forward pass of those layers never reads it (nor the K/V
    rows of their ``qkv_proj``, whose output the attention discards: their KV comes from
    the cache of the layer they share), so the model computes exactly what it computes
    with a checkpoint that still stores the unused tensors. Weights the checkpoint does
    hold keep their values.

Upstream PR:
    vllm-project/vllm#44797 and #40117 (closed) built no ``k_norm`` on KV-shared layers;
    upstream now builds only ``q_proj`` there (fixed between 0.26.0 and 0.30.0).

Releases:
    Where ``Gemma4Attention.__init__`` builds ``k_norm`` on every layer although its
    forward pass skips it on KV-shared ones (read: 0.20.2, 0.26.0); not needed where the
    assignment is conditional on ``is_kv_shared_layer`` (0.30.0, 0.32.0). Detected from
    the code.

Removal:
    When the oldest supported release builds no ``k_norm`` on KV-shared layers.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING, Any

from .. import vllm_code
from . import Detection, vllm_source

if TYPE_CHECKING:
    import torch

NAME = "kv_shared_layers"
SUMMARY = "KV-shared layers without k_proj/v_proj/k_norm in the checkpoint load (E2B/E4B)"

_MODEL_FILE = "model_executor/models/gemma4.py"
_FLAG = "is_kv_shared_layer"


def _assigns_k_norm(node: ast.AST) -> bool:
    return isinstance(node, ast.Assign) and any(
        isinstance(t, ast.Attribute) and t.attr == "k_norm" and vllm_code.is_name(t.value, "self")
        for t in node.targets
    )


def _mentions_flag(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Attribute) and n.attr == _FLAG for n in ast.walk(node))


def _guarded(function: ast.AST, target: ast.AST) -> bool:
    """Whether ``target`` sits under an ``if`` that tests ``is_kv_shared_layer``."""
    for node in ast.walk(function):
        if isinstance(node, ast.If) and _mentions_flag(node.test):
            if any(inner is target for inner in ast.walk(node)):
                return True
    return False


def detect() -> Detection:
    text = vllm_source(_MODEL_FILE)
    attention = vllm_code.find_class(text, "Gemma4Attention")
    init = vllm_code.find_function(text, "Gemma4Attention.__init__")
    forward = vllm_code.find_function(text, "Gemma4Attention.forward")
    if attention is None or init is None or forward is None:
        return Detection.unrecognized(f"no Gemma4Attention.__init__/forward in vllm/{_MODEL_FILE}")
    k_norms = [node for node in ast.walk(init) if _assigns_k_norm(node)]
    if not k_norms or not _mentions_flag(init):
        return Detection.unrecognized("Gemma4Attention builds no k_norm or knows no KV sharing")
    if all(_guarded(init, node) for node in k_norms):
        return Detection.not_needed("KV-shared layers build no k_norm")
    if not any(isinstance(n, ast.If) and _mentions_flag(n.test) for n in ast.walk(forward)):
        return Detection.unrecognized("Gemma4Attention.forward does not skip KV-shared layers")
    return Detection.needed(
        "every layer builds k_norm, KV-shared layers' checkpoints store none (vLLM #44788)"
    )


def apply(detection: Detection) -> None:
    from . import load_stream

    load_stream.add_fill(NAME, fill_unused_k_norms)


def fill_unused_k_norms(
    model: torch.nn.Module, loaded: set[str], _state: dict[str, Any]
) -> set[str]:
    """Set the KV-shared layers' unloaded ``k_norm`` weights to 1; their names."""
    filled: set[str] = set()
    for name, module in model.named_modules():
        if not getattr(module, _FLAG, False) or getattr(module, "k_norm", None) is None:
            continue
        for param_name, param in module.k_norm.named_parameters():
            full = f"{name}.k_norm.{param_name}"
            if full not in loaded:
                param.data.fill_(1.0)
                filled.add(full)
    return filled


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    return (Rule("kv-shared-layers", ("attention",), Stage.LOAD, _doctor_kv_shared),)


def _doctor_kv_shared(module: Module, ctx: Ctx) -> Hit | None:
    """A KV-shared layer without k_proj (and k_norm) in the checkpoint, on a vLLM that
    builds k_norm there: nothing fills it."""
    from ..doctor.core import Hit, Outcome
    from ..layout import first_kv_shared_layer

    text = ctx.analysis.text_config
    if not text.get("num_kv_shared_layers") or module.layer is None:
        return None
    if not module.name.endswith(".self_attn.q_proj") or not ctx.needed(NAME):
        return None
    if module.layer < first_kv_shared_layer(text):
        return None
    parent = module.name.removesuffix("q_proj")
    if any(m.name == parent + "k_proj" for m in ctx.analysis.modules):
        return None  # the checkpoint still stores the (unused) K/V weights
    message = (
        "KV-shared layers store no k_proj/v_proj/k_norm; this vLLM builds k_norm on every "
        "layer and nothing fills it on those"
    )
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    if ctx.analysis.quant_method is None:
        return Hit(
            Outcome.FAILS,
            message,
            f"ValueError: Following weights were not initialized from checkpoint: "
            f"{{'{module.short.removesuffix('q_proj')}k_norm.weight', ...}}",
        )
    if ctx.patched("load_guard"):
        return Hit(
            Outcome.FAILS,
            f"{message}; the load guard stops the load",
            f"ValueError: Gemma 4 checkpoint left parameter(s) of "
            f"{module.short.removesuffix('q_proj')}k_norm unloaded",
        )
    return None  # quantized: vLLM does not check, and the forward pass never reads k_norm

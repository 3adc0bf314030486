"""Checkpoints that quantize by module name build Gemma 4's k_eq_v attention layers.

Why:
    Gemma 4's full-attention layers with ``attention_k_eq_v`` have no ``v_proj``
    (transformers builds none; K is used as V). vLLM still builds them as one
    ``qkv_proj`` and loads K's tensors into both the K and the V shard. Quantization
    configs that decide per module name resolve a fused layer from its shards' names,
    from the model's ``packed_modules_mapping`` (``qkv_proj``: q_proj, k_proj, v_proj),
    and demand one answer for all three; ``v_proj`` is named nowhere in the checkpoint:

    - INC (AutoRound) ``extra_config``: q_proj / k_proj at the width it gives them
      (Intel's ``int4-mixed``: int8), v_proj at the default: ``ValueError: Fused module
      '...qkv_proj' requires consistent quant config`` (vLLM issues #47473, #43227);
    - GPTQ, which learns the quantized modules from the checkpoint's dtypes, and ModelOpt's
      ``exclude_modules`` (nvidia's NVFP4 export leaves attention bf16): q_proj and k_proj
      listed, v_proj not: ``ValueError: Detected some but not all shards of
      ...qkv_proj are quantized``;
    - compressed-tensors ignore lists naming q_proj and k_proj (#47473's reproduction).

How:
    ``Gemma4Attention.__init__`` is wrapped. While it builds a k_eq_v layer (Gemma 4
    config with ``attention_k_eq_v``, a ``full_attention`` layer), the quantization
    config's ``packed_modules_mapping`` says ``qkv_proj`` is made of ``q_proj`` and
    ``k_proj``: the V shard holds K's tensors, so it takes K's scheme. The model class's
    mapping is put back right after (every later lookup, and the loader, see vLLM's).
    Where q_proj and k_proj themselves differ, vLLM's own error stands.

Upstream PR:
    vllm-project/vllm#43227 (open) mirrors k_proj's INC config to v_proj; none for the
    other configs.

Releases:
    Every release that builds k_eq_v layers as a three-shard ``qkv_proj`` (0.19 - 0.33);
    detected from Gemma 4's code (``Gemma4Attention`` builds ``QKVParallelLinear`` with the
    quantization config, for ``attention_k_eq_v`` layers too) and the quantization
    configs' ``packed_modules_mapping``.

Removal:
    When vLLM resolves k_eq_v layers from their stored shards.
"""

from __future__ import annotations

import ast
import inspect
import logging
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import vllm_code
from . import Detection, vllm_source, when_imported, wrap_once

NAME = "k_eq_v_scheme"
SUMMARY = "k_eq_v attention layers: qkv_proj is resolved from q_proj and k_proj"

GEMMA4 = "vllm.model_executor.models.gemma4"
_MODEL_FILE = "model_executor/models/gemma4.py"
_BASE_CONFIG_FILE = "model_executor/layers/quantization/base_config.py"
_MARK = "__gemma4_quant_k_eq_v_scheme__"
K_EQ_V_SHARDS = ["q_proj", "k_proj"]

logger = logging.getLogger("vllm.gemma4_quant")


def detect() -> Detection:
    text = vllm_source(_MODEL_FILE)
    attention = vllm_code.find_class(text, "Gemma4Attention")
    if attention is None or vllm_code.find_function(text, "Gemma4Attention.__init__") is None:
        return Detection.unrecognized(f"no Gemma4Attention in vllm/{_MODEL_FILE}")
    builds = list(vllm_code.calls(attention, "QKVParallelLinear"))
    if not builds or not any("quant_config" in vllm_code.keywords(c) for c in builds):
        return Detection.unrecognized("Gemma4Attention builds no QKVParallelLinear")
    if not vllm_code.has_string(vllm_code.parse(text or ""), "attention_k_eq_v"):
        return Detection.unrecognized("Gemma 4 without attention_k_eq_v")
    base = vllm_code.find_class(vllm_source(_BASE_CONFIG_FILE), "QuantizationConfig")
    if base is None or not any(
        isinstance(node, ast.Attribute) and node.attr == "packed_modules_mapping"
        for node in ast.walk(base)
    ):
        return Detection.unrecognized("QuantizationConfig has no packed_modules_mapping")
    return Detection.needed(
        "k_eq_v layers are a three-shard qkv_proj; the checkpoint names no v_proj for them"
    )


def apply(detection: Detection) -> None:
    when_imported(GEMMA4, _patch)


def _patch(module: ModuleType) -> None:
    wrap_once(module.Gemma4Attention, "__init__", _MARK, _make_init)


def is_k_eq_v_layer(config: Any, layer: int) -> bool:
    """Whether a Gemma 4 (text) config makes ``layer`` a k_eq_v full-attention layer."""
    kinds = list(getattr(config, "layer_types", None) or [])
    return (
        bool(getattr(config, "attention_k_eq_v", False))
        and 0 <= layer < len(kinds)
        and kinds[layer] == "full_attention"
    )


def _make_init(original: Any) -> Any:
    signature = inspect.signature(original)

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
        try:
            bound = signature.bind(self, *args, **kwargs).arguments
        except TypeError:
            return original(self, *args, **kwargs)
        quant_config, prefix = bound.get("quant_config"), str(bound.get("prefix", ""))
        mapping = getattr(quant_config, "packed_modules_mapping", None)
        layer = _layer_index(prefix)
        if (
            not isinstance(mapping, dict)
            or "qkv_proj" not in mapping
            or layer is None
            or not is_k_eq_v_layer(bound.get("config"), layer)
        ):
            return original(self, *args, **kwargs)
        own = "packed_modules_mapping" in vars(quant_config)
        quant_config.packed_modules_mapping = {**mapping, "qkv_proj": K_EQ_V_SHARDS}
        try:
            return original(self, *args, **kwargs)
        finally:
            if own:
                quant_config.packed_modules_mapping = mapping
            else:
                del quant_config.packed_modules_mapping

    return __init__


def _layer_index(prefix: str) -> int | None:
    from ..layout import layer_index

    return layer_index(prefix + ".")


__all__ = ["NAME", "SUMMARY", "detect", "apply", "is_k_eq_v_layer"]


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # the fused-shard checks: INC get_layer_config / _resolve_raw, quant_utils
    # is_layer_skipped (GPTQ, ModelOpt), compressed_tensors/utils.py should_ignore_layer
    return (Rule("k-eq-v-scheme", ("attention",), Stage.BUILD, _doctor_k_eq_v, per_layer=True),)


# What each config's fused-shard check raises.
_ERRORS = {
    "auto-round": "ValueError: Fused module '{layer}' requires consistent quant config",
    "compressed-tensors": "ValueError: Found different quantization schemes for the shards of "
    "{layer}",
}
_SKIP_ERROR = "ValueError: Detected some but not all shards of {layer} are quantized"


def _doctor_k_eq_v(module: Module, ctx: Ctx) -> Hit | None:
    """q_proj and k_proj of a k_eq_v layer share a scheme that the config would not give
    a v_proj (which is not stored: vLLM loads k_proj into it)."""
    from ..doctor.analysis import scheme_of_name
    from ..doctor.core import Hit, Outcome
    from ..doctor.rules import config_scheme

    analysis = ctx.analysis
    if not module.name.endswith(".q_proj") or module.layer is None:
        return None
    if module.scheme is not None and config_scheme(module, ctx) is None:
        # this vLLM reads the config's lists in checkpoint names against its own (0.19.0's
        # text-only model): no shard of the layer is quantized, so none can differ
        return None
    if not is_k_eq_v_layer(_Config(analysis.text_config), module.layer):
        return None
    stem = module.name.removesuffix("q_proj")
    k = next((m for m in analysis.modules if m.name == stem + "k_proj"), None)
    if k is None or module.scheme != k.scheme or stem + "v_proj" in analysis.checkpoint.tensors:
        return None
    v = scheme_of_name(analysis, stem + "v_proj", module)
    if v == k.scheme:
        return None
    describe = lambda s: s.describe() if s is not None else "unquantized"  # noqa: E731
    why = (
        f"k_eq_v layer: the config resolves q_proj/k_proj to {describe(k.scheme)}, the "
        f"v_proj it does not name (vLLM loads k_proj into that shard) to {describe(v)}"
    )
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, f"{why}; the plugin gives it k_proj's", "", NAME)
    layer = f"{stem}qkv_proj"
    error = _ERRORS.get(analysis.quant_method or "", _SKIP_ERROR)
    return Hit(Outcome.FAILS, why, error.format(layer=_short(layer)))


def _short(name: str) -> str:
    from ..doctor.core import short_name

    return short_name(name)


class _Config:
    """Attribute access over a config.json dict (what is_k_eq_v_layer reads)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.layer_types = data.get("layer_types")
        self.attention_k_eq_v = data.get("attention_k_eq_v", False)

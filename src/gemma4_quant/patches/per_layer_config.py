"""Gemma 4 configs of transformers >= 5.15 load on releases that read flat attributes.

Why:
    transformers 5.15 made Gemma 4's text config heterogeneous: ``head_dim`` and
    ``num_key_value_heads`` live per layer (``config.per_layer_config[i]``), reading them
    on the whole config raises ``AmbiguousGlobalPerLayerAttributeError`` (a
    RuntimeError, which ``getattr(config, name, default)`` does not swallow), and the
    flat ``global_head_dim`` / ``num_global_key_value_heads`` are gone (folded into the
    full-attention layers' entries). Releases up to 0.27 read the flat attributes while
    building the model config: ``Gemma4ModelArchConfigConvertor.get_head_size``
    (``transformers_utils/model_arch_config_convertor.py``: ``getattr(hf_text_config,
    "head_dim", 0)``) raises first, then ``Gemma4Config.verify_and_update_config``
    (``model_executor/models/config.py``) and ``Gemma4DecoderLayer.__init__``
    (``getattr(config, "global_head_dim", config.head_dim)``,
    ``num_global_key_value_heads``). Every Gemma 4 checkpoint fails to load with any
    transformers >= 5.15 there (vLLM issue #51744).

How:
    vLLM's ``get_config`` (``vllm.transformers_utils.config``) is wrapped, in its own
    module and where modules imported it by name (``vllm.config.model``,
    ``vllm.tokenizers.registry``). Every Gemma 4 config it returns (and its
    ``text_config``) that carries ``per_layer_config`` gets back the flat view those
    releases read: ``allow_global_per_layer_attribute_access`` (transformers' own switch:
    ``head_dim`` / ``num_key_value_heads`` then read the config file's values, those of
    the sliding layers, as before 5.15), and ``global_head_dim`` /
    ``num_global_key_value_heads`` from the first full-attention layer's entry, where
    the config has none. The per-layer entries are left as they are. The config pickles
    with these attributes, so the engine's workers see the same.

Upstream PR:
    vllm-project/vllm#49797 (in 0.28.0): Gemma 4 reads ``per_layer_config`` through
    ``gemma4_layer_config``.

Releases:
    Needed where ``Gemma4DecoderLayer.__init__`` reads ``global_head_dim`` flat (0.19 -
    0.27) and the installed transformers writes per-layer Gemma 4 configs (>= 5.15);
    releases whose decoder layer reads ``per_layer_config`` (0.28+) do not need it.
    Detected from the code of both, never from versions.

Removal:
    When the oldest supported release reads ``per_layer_config`` (0.28+), or pins
    transformers below 5.15.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import logging
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from .. import vllm_code
from . import Detection, vllm_source, when_imported

NAME = "per_layer_config"
SUMMARY = "transformers >= 5.15's per-layer Gemma 4 config, read flat by vLLM <= 0.27"

_MODEL_FILE = "model_executor/models/gemma4.py"
_FLAT_READ = 'getattr(config, "global_head_dim", config.head_dim)'
_CONFIG_MODULE = "vllm.transformers_utils.config"
# Modules that bind get_config by name at import time (from ... import get_config).
_IMPORTERS = ("vllm.config.model", "vllm.tokenizers.registry")
_TRANSFORMERS_CONFIG = "models/gemma4/configuration_gemma4.py"
_SWITCH = "allow_global_per_layer_attribute_access"
_MARK = "__gemma4_quant_per_layer_config__"

logger = logging.getLogger("vllm.gemma4_quant")


# --------------------------------------------------------------------- detection


def vllm_reads_flat(text: str | None = None) -> bool | None:
    """Whether vLLM's Gemma 4 decoder layer reads ``global_head_dim`` from the whole
    config (True), from the per-layer configs (False), or neither (None)."""
    text = vllm_source(_MODEL_FILE) if text is None else text
    init = vllm_code.find_function(text, "Gemma4DecoderLayer.__init__")
    if init is None:
        return None
    if any(
        isinstance(node, ast.Attribute) and node.attr == "per_layer_config"
        for node in ast.walk(init)
    ) or any(vllm_code.calls(init, "gemma4_layer_config")):
        return False
    if vllm_code.has_code(init, _FLAT_READ):
        return True
    return None


def transformers_per_layer(text: str | None = None) -> tuple[bool | None, str]:
    """Whether the installed transformers builds Gemma 4 text configs with
    ``per_layer_config`` (read from its source, without importing it)."""
    if text is None:
        spec = importlib.util.find_spec("transformers")
        roots = list(spec.submodule_search_locations or []) if spec else []
        path = next((Path(r, _TRANSFORMERS_CONFIG) for r in roots), None)
        if path is None or not path.is_file():
            return None, "transformers without Gemma 4"
        text = path.read_text(encoding="utf-8")
    config = vllm_code.find_class(text, "Gemma4TextConfig")
    if config is None:
        return None, "transformers without Gemma4TextConfig"
    if vllm_code.has_string(config, "per_layer_config"):
        return True, "transformers builds per-layer Gemma 4 configs"
    return False, "transformers keeps Gemma 4's flat attributes"


def detect() -> Detection:
    flat = vllm_reads_flat()
    if flat is None:
        return Detection.unrecognized(f"unknown Gemma4DecoderLayer in vllm/{_MODEL_FILE}")
    if not flat:
        return Detection.not_needed("Gemma4DecoderLayer reads per_layer_config")
    per_layer, why = transformers_per_layer()
    if per_layer is None:
        return Detection.unrecognized(why)
    if not per_layer:
        return Detection.not_needed(why)
    return Detection.needed(f"{why}; Gemma4DecoderLayer reads global_head_dim flat")


def apply(detection: Detection) -> None:
    when_imported(_CONFIG_MODULE, _wrap_get_config)


def _wrap_get_config(config_module: ModuleType) -> None:
    original = config_module.get_config
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def get_config(*args: Any, **kwargs: Any) -> Any:
        config = original(*args, **kwargs)
        for part in (config, getattr(config, "text_config", None)):
            if part is not None:
                flatten(part)
        return config

    setattr(get_config, _MARK, True)
    config_module.get_config = get_config

    def rebind(module: ModuleType) -> None:
        if getattr(module, "get_config", None) is original:
            module.get_config = get_config

    for name in _IMPORTERS:
        when_imported(name, rebind)


def flatten(config: Any) -> bool:
    """Give a per-layer Gemma 4 config the flat attributes of the config file; whether
    anything was changed."""
    model_type = str(getattr(config, "model_type", ""))
    layer_types = config.__dict__.get("layer_types")
    if not getattr(config, "is_heterogeneous", False) or not model_type.startswith("gemma4"):
        return False
    per_layer = config.per_layer_config
    setattr(config, _SWITCH, True)
    kinds = list(layer_types or [])
    full = next((i for i, kind in enumerate(kinds) if kind == "full_attention"), None)
    restored = []
    if full is not None:
        entry = per_layer[full]
        for flat, per in (
            ("global_head_dim", "head_dim"),
            ("num_global_key_value_heads", "num_key_value_heads"),
        ):
            if flat not in config.__dict__:
                setattr(config, flat, getattr(entry, per))
                restored.append(f"{flat}={getattr(entry, per)}")
    logger.info(
        "gemma4_quant: %s: flat head_dim=%s, num_key_value_heads=%s%s for this vLLM's "
        "Gemma 4 code (transformers keeps them per layer)",
        type(config).__name__,
        config.head_dim,
        config.num_key_value_heads,
        "".join(f", {item}" for item in restored),
    )
    return True


__all__ = ["NAME", "SUMMARY", "detect", "apply", "flatten"]


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # model_arch_config_convertor.py get_head_size reads hf_text_config.head_dim
    return (Rule("per-layer-config", ("attention",), Stage.BUILD, _doctor_config),)


def _doctor_config(module: Module, ctx: Ctx) -> Hit | None:
    """Every Gemma 4 checkpoint, whatever its weights: the config itself fails."""
    from ..doctor.core import Hit, Outcome

    if not ctx.needed(NAME) or module.layer not in (0, None):
        return None
    why = (
        "this transformers keeps Gemma 4's head_dim per layer and this vLLM reads it "
        "from the whole config while building the model config"
    )
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, f"{why}; the plugin restores the flat view", "", NAME)
    return Hit(
        Outcome.FAILS,
        why,
        "AmbiguousGlobalPerLayerAttributeError: 'head_dim' is a per-layer attribute",
    )

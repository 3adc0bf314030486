"""The tied lm_head can take its weight from the embedding whatever quantization method
vLLM gave it.

Why:
    Gemma 4 ties its output projection to the token embedding (``tie_word_embeddings``):
    ``Gemma4ForCausalLM.__init__`` calls ``self.lm_head.tie_weights(embed_tokens)``. vLLM
    0.24.0 made ``ParallelLMHead.tie_weights`` ask the head's quantization method
    (``self.quant_method.tie_weights(self, embed_tokens)``) while the base
    ``QuantizeMethodBase.tie_weights`` still raised ``NotImplementedError``; 0.25.0 gave
    the base method its default (share the embedding's weight). A quantization config that
    hands the unquantized head a *linear* method, not the embedding one, therefore fails on
    0.24.0 at model construction with a bare ``NotImplementedError``: INC does so for every
    AutoRound checkpoint (``UnquantizedLinearMethod`` for a ``ParallelLMHead`` it does not
    quantize), so no AutoRound Gemma 4 checkpoint (Intel's int4 exports) builds there, on
    any platform.

How:
    Where the base ``tie_weights`` raises and ``ParallelLMHead.tie_weights`` delegates to
    it (read from the code), ``QuantizeMethodBase.tie_weights`` gets 0.25's default: the
    head's ``weight`` becomes the embedding's, and the head is returned. Methods that tie
    weights their own way override it and are not touched.

Upstream PR:
    Fixed upstream in 0.25.0 (the base method shares the weight); nothing to send.

Releases:
    0.24.0 only (detected from the code, never the version): before, ``ParallelLMHead``
    ties the weight itself; from 0.25.0 the base method does.

Removal:
    When 0.24.0 is no longer supported.
"""

from __future__ import annotations

import ast
from types import ModuleType
from typing import TYPE_CHECKING

from .. import vllm_code
from . import Detection, vllm_source, when_imported, wrap_once

NAME = "tied_lm_head"
SUMMARY = "0.24.0: a tied lm_head ties whatever its quantization method (AutoRound)"

BASE_CONFIG = "vllm.model_executor.layers.quantization.base_config"
_BASE_FILE = "model_executor/layers/quantization/base_config.py"
_HEAD_FILE = "model_executor/layers/vocab_parallel_embedding.py"
_MODEL_FILE = "model_executor/models/gemma4.py"
_MARK = "__gemma4_quant_tied_lm_head__"


def _raises_not_implemented(function: ast.AST) -> bool:
    return any(
        isinstance(node, ast.Raise)
        and (
            vllm_code.is_name(node.exc, "NotImplementedError")
            or isinstance(node.exc, ast.Call)
            and vllm_code.is_name(node.exc.func, "NotImplementedError")
        )
        for node in ast.walk(function)
    )


def detect() -> Detection:
    base = vllm_code.find_function(vllm_source(_BASE_FILE), "QuantizeMethodBase.tie_weights")
    head = vllm_code.find_function(vllm_source(_HEAD_FILE), "ParallelLMHead.tie_weights")
    if head is None:
        return Detection.unrecognized("no ParallelLMHead.tie_weights in vLLM")
    if not any(
        isinstance(call.func, ast.Attribute) and vllm_code.has_code(call.func, "self.quant_method")
        for call in vllm_code.calls(head, "tie_weights")
    ):
        return Detection.not_needed("ParallelLMHead ties the embedding's weight itself")
    if base is None:
        return Detection.unrecognized("ParallelLMHead asks its quantization method to tie: no base")
    if _raises_not_implemented(base):
        return Detection.needed(
            "ParallelLMHead asks its quantization method to tie, and the base method raises "
            "NotImplementedError: give it the shared-weight default"
        )
    return Detection.not_needed("QuantizeMethodBase.tie_weights shares the embedding's weight")


def apply(detection: Detection) -> None:
    when_imported(BASE_CONFIG, _patch)


def _patch(module: ModuleType) -> None:
    def make_wrapper(_original):
        def tie_weights(self, layer, embed_tokens, *args, **kwargs):
            layer.weight = embed_tokens.weight
            return layer

        return tie_weights

    wrap_once(module.QuantizeMethodBase, "tie_weights", _MARK, make_wrapper)


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # this module's docstring; ParallelLMHead.tie_weights, QuantizeMethodBase.tie_weights
    return (Rule("tied-lm-head", ("embedding",), Stage.BUILD, _doctor_tied_head),)


def _doctor_tied_head(module: Module, ctx: Ctx) -> Hit | None:
    """An AutoRound (INC) checkpoint with tied embeddings: INC gives the head
    ``UnquantizedLinearMethod``, whose inherited ``tie_weights`` raises here."""
    from ..doctor.core import AFTER_LAYERS, Hit, Outcome

    analysis = ctx.analysis
    if not ctx.needed(NAME) or analysis.quant_method != "auto-round":
        return None
    if not analysis.text_config.get("tie_word_embeddings", True):
        return None
    message = (
        "INC builds the tied lm_head with UnquantizedLinearMethod, and this vLLM's "
        "QuantizeMethodBase.tie_weights raises"
    )
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    # the head is tied once the decoder layers are built: a layer that vLLM refuses stops
    # construction first (0.24.0: INC's int8 linears on CPU)
    position = AFTER_LAYERS if _tied_after_layers() else None
    error = "NotImplementedError in ParallelLMHead.tie_weights"
    return Hit(Outcome.FAILS, message, error, position=position)


def _tied_after_layers() -> bool:
    """Whether ``Gemma4ForCausalLM.__init__`` ties the head after it builds the model
    (``self.model = ...`` before the ``tie_weights`` call)."""
    init = vllm_code.find_function(vllm_source(_MODEL_FILE), "Gemma4ForCausalLM.__init__")
    if init is None:
        return False
    builds = [
        node.lineno
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Attribute)
        and target.attr == "model"
        and vllm_code.is_name(target.value, "self")
    ]
    ties = [call.lineno for call in vllm_code.calls(init, "tie_weights")]
    return bool(builds and ties) and min(builds) < min(ties)

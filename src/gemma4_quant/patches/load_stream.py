"""The one wrapper around ``Gemma4ForCausalLM.load_weights`` that every patch working on
the checkpoint's tensor stream goes through.

Five patches change what Gemma 4's loader sees, and one checks what it did. Wrapping
``load_weights`` once per patch would make their order the order of registration; here
the order is written down once, in ``STAGES``, as the stream flows:

1. ``normalize`` (``moe_prefix``): experts stored under ``layers.N.moe.experts`` get
   transformers' ``layers.N.experts`` spelling, which the stages below and every
   release's mapping read;
2. ``dequantize`` (``unquantized_experts``, and ``dequant_fallback`` for GPTQ experts
   without a kernel): GPTQ experts that vLLM built unquantized become float tensors
   under the names vLLM's expert mapping reads;
3. ``record`` (``load_guard``): the names the loader is handed, for the check below;
4. ``rename`` (``expert_names``): fused expert names become what this release's
   mapping reads, and `_shape`/`_g_idx` are split per expert;
5. ``load_experts`` (``expert_loader``, 0.19.0 only): per-expert tensors, the checkpoint's
   and those split above, go straight into the experts' parameters, past a mapping
   that takes only 2-D weights.

After vLLM's loader returns the names of the parameters it filled, every ``fill`` runs
(``kv_shared_layers``: parameters the model builds that no checkpoint holds get a value
and count as loaded), then every ``check`` (``load_guard``: no parameter left unfilled).
What the wrapper returns is vLLM's set plus the filled names: vLLM's own check of
unloaded weights reads it.

A stage or check is a function of the model being loaded and a per-load ``dict`` that
lets a stage hand state to a check of the same patch. Registering the same stage again
replaces it, so a second registration of the plugin changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from . import when_imported, wrap_once

GEMMA4 = "vllm.model_executor.models.gemma4"
STAGES = ("normalize", "dequantize", "record", "rename", "load_experts")
_MARK = "__gemma4_quant_load_stream__"

Weights = Iterable[tuple[str, "torch.Tensor"]]
Stage = Callable[[Any, Weights, dict[str, Any]], Weights]
Check = Callable[[Any, set[str], dict[str, Any]], None]
Fill = Callable[[Any, set[str], dict[str, Any]], set[str]]

_stages: dict[str, Stage] = {}
_fills: dict[str, Fill] = {}
_checks: dict[str, Check] = {}


def add_stage(stage: str, transform: Stage) -> None:
    """Put ``transform(model, weights, state) -> weights`` at ``stage`` of the stream."""
    if stage not in STAGES:
        raise ValueError(f"unknown load-stream stage {stage!r} (known: {', '.join(STAGES)})")
    _stages[stage] = transform
    when_imported(GEMMA4, _wrap)


def add_fill(name: str, fill: Fill) -> None:
    """Run ``fill(model, loaded_names, state) -> filled_names`` once vLLM's loader has
    returned, before the checks; the filled names count as loaded."""
    _fills[name] = fill
    when_imported(GEMMA4, _wrap)


def add_check(name: str, check: Check) -> None:
    """Run ``check(model, loaded_names, state)`` once vLLM's loader has returned."""
    _checks[name] = check
    when_imported(GEMMA4, _wrap)


def transform(model: Any, weights: Weights, state: dict[str, Any]) -> Weights:
    """The checkpoint stream through every registered stage, in ``STAGES`` order."""
    for stage in STAGES:
        if stage in _stages:
            weights = _stages[stage](model, weights, state)
    return weights


def _wrap(module: ModuleType) -> None:
    def make_wrapper(original):
        def load_weights(self, weights: Weights):
            state: dict[str, Any] = {}
            loaded = original(self, transform(self, weights, state))
            if loaded is not None and (_fills or _checks):
                loaded = set(loaded)
                for fill in _fills.values():
                    loaded |= fill(self, set(loaded), state)
                for check in _checks.values():
                    check(self, set(loaded), state)
            return loaded

        return load_weights

    wrap_once(module.Gemma4ForCausalLM, "load_weights", _MARK, make_wrapper)

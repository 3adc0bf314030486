"""Experts exported under ``layers.N.moe.experts`` load on every release.

Why:
    transformers names Gemma 4's experts ``layers.N.experts`` and so do most exports;
    some ModelOpt NVFP4 exports (bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4) store
    them as ``layers.N.moe.experts.{e}.{proj}.*``, vLLM's own module path of 0.19 - 0.30.
    Gemma 4's loader does not take that spelling everywhere:

    - 0.19 - 0.29 prefix every per-expert name with ``.moe`` unconditionally
      (``re.sub(r"\\.experts\\.(\\d+)\\.", r".moe.experts.\\1.", name)``): ``KeyError:
      'layers.0.moe.moe.experts.0.down_proj.input_scale'`` (vLLM PR #41206, issue #41683);
    - 0.31+ have no ``moe`` module at all (experts are ``layers.N.experts``): ``ValueError:
      There is no module or parameter named 'layers.0.moe'``.

    0.30 accepts both (#41206's negative lookbehind).

How:
    A ``normalize`` stage at the head of the load stream (``load_stream``) renames
    ``layers.N.moe.experts.`` to ``layers.N.experts.``: the transformers spelling, which
    every release maps to its own experts. Nothing else is touched.

Upstream PR:
    vllm-project/vllm#41206 (merged for 0.30); the 0.31 loader rewrite (#55911) dropped
    the remap, and with it the spelling.

Releases:
    0.19 - 0.29 (the unconditional ``.moe`` prefix) and 0.31+ (no ``moe`` module);
    detected from Gemma 4's loader code, never from the version.

Removal:
    When every supported release maps ``.moe.experts`` checkpoint names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import vllm_code
from . import Detection, vllm_source

if TYPE_CHECKING:
    import torch

NAME = "moe_prefix"
SUMMARY = "experts stored under layers.N.moe.experts load as layers.N.experts"

_MODEL_FILE = "model_executor/models/gemma4.py"
_PREFIXED = re.compile(r"(\blayers\.\d+\.)moe\.experts\.")
# the 0.19 - 0.29 remap, and the 0.30 one that leaves `.moe.experts` alone
_UNCONDITIONAL = r"\.experts\.(\d+)\."
_LOOKBEHIND = r"(?<!\.moe)"

GENERATION_DOUBLE = "double-prefix"
GENERATION_NO_MOE = "no-moe-module"


def detect() -> Detection:
    text = vllm_source(_MODEL_FILE)
    tree = vllm_code.parse(text or "")
    init = vllm_code.find_function(text, "Gemma4DecoderLayer.__init__")
    if tree is None or init is None:
        return Detection.unrecognized(f"no Gemma4DecoderLayer in vllm/{_MODEL_FILE}")
    patterns = [s for s in vllm_code.strings(tree) if "experts" in s]
    if any(_LOOKBEHIND in s for s in patterns):
        return Detection.not_needed("the loader maps experts already under .moe.experts")
    if _UNCONDITIONAL in patterns and vllm_code.assigns_self(init, "moe"):
        return Detection.needed(
            "the loader prefixes every per-expert name with .moe (.moe.moe.experts)",
            GENERATION_DOUBLE,
        )
    if not vllm_code.assigns_self(init, "moe") and vllm_code.find_class(text, "Gemma4DecoderLayer"):
        return Detection.needed(
            "Gemma 4 layers have no .moe module: .moe.experts names match nothing",
            GENERATION_NO_MOE,
        )
    return Detection.unrecognized("unknown mapping of per-expert names")


def apply(detection: Detection) -> None:
    from . import load_stream

    load_stream.add_stage("normalize", normalize_stage)


def normalize_stage(_model: Any, weights: Iterable, _state: dict) -> Iterator:
    return normalize_names(weights)


def normalize_names(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``layers.N.moe.experts.*`` -> ``layers.N.experts.*``; everything else as it is."""
    for name, tensor in weights:
        yield _PREFIXED.sub(r"\1experts.", name), tensor


__all__ = ["NAME", "SUMMARY", "detect", "apply", "normalize_names"]


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # gemma4.py load_weights: the per-expert remap (<= 0.29), AutoWeightsLoader (0.31+)
    return (Rule("moe-prefix", ("experts",), Stage.LOAD, _doctor_prefix),)


def _doctor_prefix(module: Module, ctx: Ctx) -> Hit | None:
    from ..doctor.core import Hit, Outcome
    from ..doctor.rules import first_tensor

    if ".moe.experts" not in module.name or not ctx.needed(NAME):
        return None
    why = "experts stored under .moe.experts, a spelling this vLLM's loader does not map"
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, f"{why}; the plugin renames them to .experts", "", NAME)
    detection = ctx.env.patches.get(NAME, ("", ""))[1]
    tensor = first_tensor(module, "")
    short = tensor[tensor.index("layers.") :] if "layers." in tensor else tensor
    if "no .moe module" in detection:
        layer = short.split(".moe.", 1)[0]
        error = f"ValueError: There is no module or parameter named '{layer}.moe'"
    else:
        error = f"KeyError: '{short.replace('.moe.experts.', '.moe.moe.experts.')}'"
    return Hit(Outcome.FAILS, why, error)

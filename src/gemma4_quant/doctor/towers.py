"""The multimodal architecture: what vLLM's ``Gemma4ForConditionalGeneration`` does with
the vision (and audio) tower of a checkpoint.

- The class builds its vision tower from ``vision_config`` unconditionally: with
  ``vision_config: null`` (which transformers' ``Gemma4Config`` allows) construction fails
  (``AutoModel.from_config(None)``); the text architecture loads such a checkpoint.
- vLLM imports transformers' ``Gemma4Processor`` when it inspects the architecture; where
  that import fails (transformers 5.16 - 5.19 without torchvision) the architecture
  "failed to be inspected" before anything is built.
- Tower linears: before 0.26 plain unquantized linears whatever the config says (the
  projection into the text model a ``ReplicatedLinear`` without quantization config); since,
  built with the quantization config (``recursive_replace_linear``): for the methods the
  class lists (compressed-tensors among them) every tower linear the config does not
  ignore is quantized, for the others only where the tower's dims divide 64. A tower
  module stored otherwise than vLLM builds it fails at weight loading: the multimodal
  class's ``AutoWeightsLoader`` finds no parameter for the checkpoint's tensor. That is
  what a checkpoint whose export quantized the vision embedder by mistake (Google's 12B
  QAT) meets where vLLM builds the tower unquantized.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .core import Ctx, Hit, Module, Outcome, Scheme, short_name
from .environment import gemma4_processor_imports

if TYPE_CHECKING:
    from .analysis import Analysis
    from .environment import Environment

MULTIMODAL_ARCHITECTURE = "Gemma4ForConditionalGeneration"
TEXT_ARCHITECTURE = '--hf-overrides \'{"architectures": ["Gemma4ForCausalLM"]}\''
TOWER_KINDS = ("vision", "audio")


def tower_scheme(module: Module, ctx: Ctx) -> Scheme | None:
    """The quantization vLLM builds a tower module with (None: unquantized)."""
    features = ctx.env.features
    scheme = module.scheme
    if scheme is None or not features.get("towers_take_quant_config"):
        return None
    if scheme.method in features.get("tower_quant_methods", []):
        return scheme
    tower = ctx.analysis.checkpoint.config.get(f"{module.kind}_config") or {}
    dims = (tower.get("hidden_size") or 0, tower.get("intermediate_size") or 0)
    return scheme if all(d and d % 64 == 0 for d in dims) else None


def check_tower(module: Module, ctx: Ctx) -> Hit | None:
    """A tower module must be stored the way vLLM builds it (the multimodal class builds
    towers; the text architecture leaves their tensors out)."""
    if module.stored == "unknown" or ctx.analysis.architecture != MULTIMODAL_ARCHITECTURE:
        return None
    built = tower_scheme(module, ctx)
    expected = built.storage if built is not None else "bf16"
    if module.stored == expected:
        return None
    name = short_name(module.name)
    if built is None:
        if not ctx.env.features.get("towers_take_quant_config"):
            why = "this vLLM builds the towers unquantized whatever the config says"
        elif module.scheme is None:
            why = f"the config leaves it unquantized ({module.scheme_note})"
        else:
            why = (
                f"this vLLM quantizes {module.scheme.method} towers only where their dims divide 64"
            )
        message = f"the checkpoint stores a {module.kind} tower module {module.stored}: {why}"
        suffix = next(
            (t.rpartition(".")[2] for t in sorted(module.tensors) if not t.endswith(".weight")),
            "weight_packed",
        )
        tensor = f"{name}.{suffix}"
    else:
        message = (
            f"this vLLM builds {module.kind} tower modules the config quantizes quantized "
            f"({built.describe()}, {module.scheme_note}), the checkpoint stores it "
            f"{module.stored}"
        )
        tensor = f"{name}.weight"
    return Hit(
        Outcome.FAILS,
        message,
        f"ValueError: There is no module or parameter named '{tensor}' in "
        f"{ctx.analysis.architecture}",
    )


def architecture_problems(analysis: Analysis, env: Environment) -> list[tuple[str, str]]:
    """(message, error) of what stops vLLM's multimodal class before any layer: both
    predictions (stock and plugin) share them."""
    if analysis.architecture != MULTIMODAL_ARCHITECTURE or env.vllm_version == "unknown":
        return []
    problems = []
    if not env.given_platform and not gemma4_processor_imports():
        problems.append(
            (
                "vLLM imports transformers' Gemma4Processor to inspect the multimodal "
                "architecture, and it does not import here (transformers 5.16 - 5.19 need "
                f"torchvision for it); serve the text model: {TEXT_ARCHITECTURE}",
                "ValidationError: Model architectures ['Gemma4ForConditionalGeneration'] "
                "failed to be inspected",
            )
        )
    if not analysis.checkpoint.config.get("vision_config") and env.features.get(
        "mm_tower_unconditional"
    ):
        problems.append(
            (
                "vision_config is null, and this vLLM's Gemma4ForConditionalGeneration "
                f"builds a vision tower all the same; serve the text model: {TEXT_ARCHITECTURE}",
                "ValueError: Unrecognized configuration class <class 'NoneType'> for this "
                "kind of AutoModel",
            )
        )
    return problems


def describe(analysis: Analysis, ctx: Ctx | None) -> dict[str, Any] | None:
    """The checkpoint's towers as vLLM will build them (None: a text-only architecture)."""
    if not analysis.multimodal:
        return None
    towers = analysis.of_kind(*TOWER_KINDS)
    stored = sorted({m.stored for m in towers})
    quantized_by_config = [short_name(m.name) for m in towers if m.scheme is not None]
    built = [short_name(m.name) for m in towers if ctx and tower_scheme(m, ctx) is not None]
    notes = sorted({m.scheme_note for m in towers if m.scheme is None and m.scheme_note})
    return {
        "vision_config": bool(analysis.checkpoint.config.get("vision_config")),
        "modules": len(towers),
        "stored": stored,
        "stored_quantized": [short_name(m.name) for m in towers if m.stored != "bf16"],
        "config_quantizes": quantized_by_config,
        "vllm_quantizes": built,
        "config_leaves_unquantized": notes,
    }

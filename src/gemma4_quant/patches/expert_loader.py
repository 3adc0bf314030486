"""Per-expert Gemma 4 expert tensors load where vLLM's expert mapping takes only 2-D weights.

Why:
    vLLM 0.19.0's ``Gemma4Model.load_weights`` maps experts by the substring
    ``experts.{e}.{proj}`` and hands every match to the experts' weight loader as a 2-D
    ``<proj>.weight`` (``assert loaded_weight.dim() == 2``, ``weight_name + ".weight"``),
    and its ``_weight_iterator`` has no ``.experts.{e}.`` -> ``.moe.experts.{e}.``
    rename. Checkpoints that store the experts one by one
    (``experts.{e}.{gate,up,down}_proj.<suffix>``: compressed-tensors W4A16, FP8-Dynamic
    and NVFP4, GPTQ, ModelOpt NVFP4) therefore die with
    ``KeyError: 'layers.0.experts.0.down_proj.weight_packed'``; with the rename, global
    scales and ``weight_shape`` (1-D) would trip the assertion, and every scale would be
    loaded as if it were the weight. The fused layout's ``_shape`` tensors, split per
    expert by ``expert_names``, meet the same assertion.

How:
    A load-stream stage (``load_experts``, after ``rename``) takes every per-expert tensor
    out of the stream and loads it itself, as 0.19.1's mapping does: the experts'
    ``weight_loader`` gets the parameter ``<layer>.moe.experts.{w13,w2}_<suffix>``, that
    parameter's name (so scales, global scales, ``weight_shape`` and ``g_idx`` take their
    own path), the shard id (w1 gate, w3 up, w2 down) and the expert id. The parameters
    it filled are added to the names ``load_weights`` returns, so vLLM's own check of
    unloaded weights still holds. A tensor whose parameter does not exist, an expert id
    past the layer's experts, or a tensor the loader rejects raises ValueError naming
    the tensor and what was expected. The fused 3-D experts that vLLM explodes itself
    are left to it.

Upstream PR:
    vllm-project/vllm#39045 (0.19.1): the prefix mapping ``experts.{e}.{proj}.`` ->
    ``experts.w13_``, the mapped name passed to the weight loader, and the
    ``.moe.experts.{e}.`` rename.

Releases:
    0.19.0 only (the substring mapping that passes ``weight_name + ".weight"``); every
    later release maps per-expert names itself. Detected from the code.

Removal:
    When 0.19.0 is no longer supported.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .. import vllm_code
from ..layout import PER_EXPERT
from . import Detection, vllm_source

NAME = "expert_loader"
SUMMARY = "per-expert `experts.{e}.<proj>.<suffix>` tensors load on 0.19.0's 2-D expert mapping"

_MODEL_FILE = "model_executor/models/gemma4.py"
# 0.19.0: `weight_loader(param, loaded_weight, weight_name + ".weight", ...)`
_WEIGHT_NAME_ARG = 'weight_name + ".weight"'
_SHARDS = {"gate_proj": ("w13", "w1"), "up_proj": ("w13", "w3"), "down_proj": ("w2", "w2")}


def detect() -> Detection:
    from . import expert_names

    text = vllm_source(_MODEL_FILE)
    generation, why = expert_names.generation(text)
    if generation is None:
        return Detection.unrecognized(why)
    if generation == "generic":
        return Detection.not_needed(f"{why}: per-expert names are mapped by vLLM")
    load_weights = vllm_code.find_function(text, "Gemma4Model.load_weights")
    if load_weights is None:
        return Detection.unrecognized(f"no Gemma4Model.load_weights in vllm/{_MODEL_FILE}")
    if expert_names.mapping_template(generation) not in set(
        vllm_code.fstring_templates(load_weights)
    ):
        return Detection.unrecognized("unknown expert mapping in Gemma4Model.load_weights")
    if generation != "substring":
        return Detection.not_needed(f"{why}: per-expert names are mapped by vLLM")
    if not any(
        vllm_code.is_code(arg, _WEIGHT_NAME_ARG)
        for call in vllm_code.calls(load_weights, "weight_loader")
        for arg in call.args
    ):
        return Detection.unrecognized("unknown expert weight_loader call in Gemma4Model")
    return Detection.needed(
        f"{why}, every match loaded as a 2-D `.weight`: load per-expert tensors directly"
    )


def apply(detection: Detection) -> None:
    from . import load_stream

    def stage(model: torch.nn.Module, weights: Iterable, state: dict[str, Any]) -> Iterable:
        return load_per_expert(model, weights, state.setdefault(NAME, set()))

    def fill(_model: torch.nn.Module, _loaded: set[str], state: dict[str, Any]) -> set[str]:
        return set(state.get(NAME, ()))

    load_stream.add_stage("load_experts", stage)
    load_stream.add_fill(NAME, fill)


def model_param_name(expert_module: str, proj: str, suffix: str) -> str:
    """The parameter of ``Gemma4ForCausalLM`` a per-expert checkpoint tensor fills:
    ``model.language_model.layers.0.experts`` + ``gate_proj`` + ``weight_scale`` ->
    ``model.layers.0.moe.experts.w13_weight_scale``."""
    module = expert_module.replace("language_model.", "")
    if not module.endswith(".moe.experts"):
        module = module.removesuffix(".experts") + ".moe.experts"
    return f"{module}.{_SHARDS[proj][0]}_{suffix}"


def load_per_expert(
    model: torch.nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    loaded: set[str],
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` without its per-expert tensors, which go straight into the experts'
    parameters (their names are added to ``loaded``)."""
    params: dict[str, torch.nn.Parameter] | None = None
    for name, tensor in weights:
        match = PER_EXPERT.match(name)
        if match is None:
            yield name, tensor
            continue
        if params is None:
            params = dict(model.named_parameters())
        proj, suffix, expert = match["proj"], match["suffix"], int(match["expert"])
        target = model_param_name(match["module"], proj, suffix)
        param = params.get(target)
        if param is None and _pp_missing(target, model):
            continue  # a layer of another pipeline stage
        if param is None:
            known = sorted(
                n.rsplit(".", 1)[1] for n in params if n.startswith(target.rsplit(".", 1)[0] + ".")
            )
            raise ValueError(
                f"Checkpoint tensor {name!r} (expert {expert}, {proj}, {suffix}) has no "
                f"parameter {target!r} to load into; the experts have "
                f"{', '.join(known) or 'no parameters'}"
            )
        owner = model.get_submodule(target.rsplit(".", 1)[0])
        # expert ids are global; the layer maps them to its local experts
        experts = int(getattr(owner, "global_num_experts", 0) or param.shape[0])
        if not 0 <= expert < experts:
            raise ValueError(
                f"Checkpoint tensor {name!r}: expert {expert}, but {target!r} has "
                f"{experts} experts (shape {tuple(param.shape)})"
            )
        shard = _SHARDS[proj][1]
        try:
            param.weight_loader(param, tensor, target, shard_id=shard, expert_id=expert)
        except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
            raise ValueError(
                f"Checkpoint tensor {name!r} {tuple(tensor.shape)} {tensor.dtype} does not "
                f"load into {target!r} {tuple(param.shape)} {param.dtype} as expert "
                f"{expert} shard {shard}: {exc}"
            ) from exc
        loaded.add(target)


def _pp_missing(name: str, model: torch.nn.Module) -> bool:
    from vllm.model_executor.models.utils import is_pp_missing_parameter

    return is_pp_missing_parameter(name, model)


__all__ = ["NAME", "SUMMARY", "detect", "apply", "load_per_expert", "model_param_name"]


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)
# The rule types come from gemma4_quant.doctor.core, imported inside the functions:
# every vLLM process imports this module, doctor only runs in `gemma4-quant doctor`.

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # gemma4.py 0.19.0: Gemma4Model.load_weights' substring expert mapping
    return (Rule("per-expert-names-0190", ("experts",), Stage.LOAD, _doctor_per_expert),)


def _doctor_per_expert(module: Module, ctx: Ctx) -> Hit | None:
    """Per-expert tensors meet 0.19.0's substring expert mapping: no `.moe.` rename."""
    from ..doctor.core import Hit, Outcome

    if module.fused_experts or ctx.env.generation != "substring":
        return None
    names = sorted(n for n in module.tensors if PER_EXPERT.match(n))
    if not names:
        return None
    message = "per-expert expert tensors meet 0.19.0's expert mapping (no `.moe.` rename)"
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    key = names[0].replace("language_model.", "").removeprefix("model.")
    return Hit(Outcome.FAILS, message, f"KeyError: {key!r}")

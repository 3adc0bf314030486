"""The text-only Gemma 4 model maps the checkpoint's module names for its quantization
config.

Why:
    The public checkpoints keep the text stack under ``model.language_model.``, and every
    quantization config names modules that way: compressed-tensors' ``ignore`` list
    (cyankiwi: the dense MLP and the router of every layer, ``lm_head``), ModelOpt's
    ``exclude_modules``, AutoRound's ``extra_config``. vLLM builds the text-only
    ``Gemma4ForCausalLM`` (what ``--hf-overrides '{"architectures":
    ["Gemma4ForCausalLM"]}'`` serves, e.g. on CPU builds without torchvision) under
    ``model.``. 0.19.0's ``Gemma4ForCausalLM`` renames the weights in its own
    ``load_weights`` but has no ``hf_to_vllm_mapper``, which is what vLLM hands the
    quantization config to rename its module lists (``configure_quant_config``). So no
    ignore entry matches: the dense MLP and the router are built quantized, and the first
    bf16 weight of the checkpoint fails the load: ``KeyError:
    'layers.0.mlp.down_proj.weight'``, for every compressed-tensors Gemma 4 checkpoint.

How:
    Where ``Gemma4ForCausalLM`` defines no ``hf_to_vllm_mapper`` and renames
    ``language_model.`` in its ``load_weights`` (read from the code), the class gets the
    mapper 0.19.1 added: ``model.language_model.`` -> ``model.``. vLLM applies it to the
    quantization config's module lists before the model is built; the weights still go
    through the model's own renaming.

Upstream PR:
    Fixed upstream in 0.19.1 (``Gemma4ForCausalLM.hf_to_vllm_mapper``); nothing to send.

Releases:
    0.19.0 only (detected from the code, never the version).

Removal:
    When 0.19.0 is no longer supported.
"""

from __future__ import annotations

import ast
from types import ModuleType
from typing import TYPE_CHECKING

from .. import vllm_code
from . import Detection, vllm_source, when_imported

NAME = "text_mapper"
SUMMARY = "0.19.0: the text-only model maps model.language_model. names for quant configs"

GEMMA4_MODULE = "vllm.model_executor.models.gemma4"
_GEMMA4_FILE = "model_executor/models/gemma4.py"
_LOADER_UTILS_FILE = "model_executor/model_loader/utils.py"
CHECKPOINT_PREFIX = "model.language_model."
MODEL_PREFIX = "model."


def _class_attribute(cls: ast.ClassDef, name: str) -> bool:
    return any(
        isinstance(node, (ast.Assign, ast.AnnAssign))
        and any(
            vllm_code.is_name(target, name)
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
        for node in cls.body
    )


def detect() -> Detection:
    text = vllm_source(_GEMMA4_FILE)
    cls = vllm_code.find_class(text, "Gemma4ForCausalLM")
    if cls is None:
        return Detection.unrecognized("no Gemma4ForCausalLM in vLLM")
    if _class_attribute(cls, "hf_to_vllm_mapper"):
        return Detection.not_needed("Gemma4ForCausalLM maps checkpoint names (hf_to_vllm_mapper)")
    load = vllm_code.find_function(text, "Gemma4ForCausalLM.load_weights")
    if not vllm_code.has_string(load, "language_model."):
        return Detection.unrecognized("Gemma4ForCausalLM.load_weights renames no language_model.")
    loader = vllm_code.source(_LOADER_UTILS_FILE)
    if "apply_vllm_mapper(" not in (loader or "") or "hf_to_vllm_mapper" not in (loader or ""):
        return Detection.unrecognized("vLLM does not hand hf_to_vllm_mapper to quant configs")
    return Detection.needed(
        "Gemma4ForCausalLM has no hf_to_vllm_mapper: quantization configs keep "
        "model.language_model. names and their ignore lists match no layer"
    )


def apply(detection: Detection) -> None:
    when_imported(GEMMA4_MODULE, _patch)


def _patch(module: ModuleType) -> None:
    cls = module.Gemma4ForCausalLM
    if getattr(cls, "hf_to_vllm_mapper", None) is not None:
        return
    from vllm.model_executor.models.utils import WeightsMapper

    cls.hf_to_vllm_mapper = WeightsMapper(orig_to_new_prefix={CHECKPOINT_PREFIX: MODEL_PREFIX})


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # this module's docstring; gemma4.py Gemma4ForCausalLM, model_loader/utils.py
    return (Rule("text-mapper", ("dense_mlp", "router", "attention"), Stage.LOAD, _doctor),)


def lists_unmapped(ctx: Ctx) -> bool:
    """vLLM matches the config's module lists (kept in checkpoint names) against its own
    names: the text-only model of a vLLM that needs this patch, without it."""
    return ctx.needed(NAME) and not ctx.patched(NAME) and not ctx.analysis.multimodal


def _doctor(module: Module, ctx: Ctx) -> Hit | None:
    """A module the config ignores by its checkpoint name, on the text-only model of a
    vLLM that does not map that name: built quantized, and its bf16 weight has no place."""
    from ..doctor.core import Hit, Outcome

    note = module.scheme_note or ""
    if not ctx.needed(NAME) or ctx.analysis.multimodal:
        return None
    if not note.startswith(f"ignored ({CHECKPOINT_PREFIX}"):
        return None
    message = (
        "the text-only Gemma4ForCausalLM does not map the quantization config's "
        f"{CHECKPOINT_PREFIX} names: ignored modules are built quantized"
    )
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    short = module.name.removeprefix(CHECKPOINT_PREFIX)
    return Hit(Outcome.FAILS, message, f"KeyError: '{short}.weight'")

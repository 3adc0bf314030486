"""Fused 3D quantized Gemma 4 experts reach vLLM's expert mapping under names it knows.

Why:
    compressed-tensors checkpoints of Gemma 4 MoE (``cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit``)
    store the experts fused and 3D with *underscore* suffixes:
    ``experts.down_proj_packed`` [E, H, I/8], ``experts.down_proj_scale`` [E, H, I/32].
    On vLLM 0.19.1 - 0.20.2 Gemma 4's ``load_weights`` builds its expert mapping from
    dotted names (``experts.{e}.down_proj.``), so the exploded ``experts.0.down_proj_packed``
    matches nothing and loading dies with ``KeyError: 'layers.0.moe.experts.0.down_proj_packed'``
    (defect D2; the PR blamed the weight iterator, which keeps the suffix). On every release
    the 1-D/2-D suffixed expert tensors (``experts.<proj>_shape`` with 3 elements, as
    compressed-tensors' compressor emits for a 3D weight, and ``experts.<proj>_g_idx``) skip
    the 3D explosion and are never mapped: KeyError before 0.24, silently dropped 0.24 - 0.30,
    ``RuntimeError: The expanded size of the tensor (2) must match the existing size (3)`` on
    0.31+.

How:
    ``Gemma4ForCausalLM.load_weights`` (the multimodal wrapper delegates to it) gets its
    weight stream wrapped by a generator that renames lazily, never copying a weight:
    - dotted-mapping releases only:
      ``experts.<proj>_<suffix>`` -> ``experts.<proj>.weight_<suffix>``
      (the spelling the per-expert checkpoints use, which that mapping understands);
    - every release: ``experts.<proj>_shape`` / ``_g_idx`` become per-expert tensors
      (``experts.<e>.gate_proj.weight_shape`` = [I, H], ...), the spelling every mapping reads;
    - every release: fused expert tensors are checked against the config (expert count,
      packed width against bits and group size, a ``_scale`` for every ``_packed``), so a
      malformed checkpoint fails with the tensor's name and the expected shape.
    Per-expert and bf16 checkpoints pass through untouched.

Upstream PR:
    vllm-project/vllm#39582 (open) proposed the suffix handling; #40708 (0.21.0) fixed the
    KeyError upstream; the ``_shape`` fix is in this project's ``upstream/`` series.

Releases:
    0.19.0 (substring mapping), 0.19.1 - 0.20.2 (dotted: rename), 0.21.0 - 0.30.0
    (underscore mapping), 0.31.0+ (generic RoutedExperts loader); detected from the code.

Removal:
    When the oldest supported release has per-expert splitting of 1-D/2-D fused expert
    tensors and 0.20.2 is no longer supported.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .. import vllm_code
from ..layout import FUSED_EXPERT
from . import Detection, vllm_source

NAME = "expert_names"
SUMMARY = "fused 3D `experts.<proj>_<suffix>` tensors load (D2 KeyError, `_shape`, `_g_idx`)"

_SPLIT_SUFFIXES = ("shape", "g_idx")


_MODEL_FILE = "model_executor/models/gemma4.py"


# The expert mapping's checkpoint-name templates (f-strings in Gemma4Model), newest first.
_MAPPINGS = (
    ("underscore", "{weight_name.rstrip('.')}_", "expert mapping knows `_<suffix>` names"),
    (
        "dotted",
        "experts.{expert_id}.{proj_name}.",
        "expert mapping needs `experts.{e}.{proj}.` (D2)",
    ),
    (
        "substring",
        "experts.{expert_id}.{proj_name}",
        "expert mapping matches `experts.{e}.{proj}` by substring",
    ),
)


def _generation(text: str | None = None) -> tuple[str | None, str]:
    """Which Gemma 4 expert loader the installed vLLM has (or ``text``, its model file),
    and how we know."""
    text = vllm_source(_MODEL_FILE) if text is None else text
    load_weights = vllm_code.find_function(text, "Gemma4ForCausalLM.load_weights")
    if load_weights is None:
        return None, f"no Gemma4ForCausalLM.load_weights in vllm/{_MODEL_FILE}"
    if not vllm_code.defines(load_weights, "_weight_iterator"):
        if any(vllm_code.calls(load_weights, "AutoWeightsLoader")):
            return "generic", "AutoWeightsLoader maps fused expert names"
        return None, "unknown Gemma4ForCausalLM.load_weights"
    templates = set(vllm_code.fstring_templates(vllm_code.find_class(text, "Gemma4Model")))
    for generation, template, why in _MAPPINGS:
        if template in templates:
            return generation, why
    return None, "unknown expert mapping in Gemma4Model"


def detect() -> Detection:
    generation, why = _generation()
    if generation is None:
        return Detection.unrecognized(why)
    if generation == "dotted":
        return Detection.needed(f"{why}: rename fused names, split `_shape`/`_g_idx`", generation)
    return Detection.needed(f"{why}: split fused `_shape`/`_g_idx`, check shapes", generation)


def apply(detection: Detection) -> None:
    from . import load_stream

    generation = detection.findings

    def rename(model: torch.nn.Module, weights, _state) -> Iterable:
        return rewrite(weights, generation, FusedExpertChecker.from_model(model))

    load_stream.add_stage("rename", rename)


def per_expert_name(prefix: str, expert: int, proj: str, suffix: str) -> str:
    # the per-expert checkpoints' spelling: every release's mapping reads it (0.19.0
    # through expert_loader, since its own mapping takes 2-D weights only)
    return f"{prefix}.{expert}.{proj}.weight_{suffix}"


def rewrite(
    weights: Iterable[tuple[str, torch.Tensor]],
    generation: str | None,
    checker: FusedExpertChecker | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Rename fused expert tensors for ``generation``; everything else passes as is."""
    for name, tensor in weights:
        match = FUSED_EXPERT.match(name)
        if match is None or match["suffix"] is None:  # not fused, or a bf16 expert weight
            yield name, tensor
            continue
        pre, proj, suffix = match["module"], match["proj"], match["suffix"]
        if checker is not None:
            checker.check(name, proj, suffix, tensor)
        if suffix in _SPLIT_SUFFIXES:
            yield from _split_per_expert(pre, proj, suffix, tensor)
        elif generation == "dotted":
            yield f"{pre}.{proj}.weight_{suffix}", tensor
        else:
            yield name, tensor
    if checker is not None:
        checker.finish()


def _split_per_expert(
    pre: str, proj: str, suffix: str, tensor: torch.Tensor
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    if suffix == "shape":
        # [E, rows, cols] of the fused weight -> [rows, cols] of each expert's 2D weight
        num_experts, rows, cols = (int(v) for v in tensor.tolist())
        if proj == "gate_up_proj":
            shards = {"gate_proj": [rows // 2, cols], "up_proj": [rows // 2, cols]}
        else:
            shards = {"down_proj": [rows, cols]}
        for expert in range(num_experts):
            for shard, shape in shards.items():
                value = torch.tensor(shape, dtype=tensor.dtype, device=tensor.device)
                yield per_expert_name(pre, expert, shard, suffix), value
        return
    # g_idx [E, in_features]: gate and up read the same input columns
    shards_names = ("gate_proj", "up_proj") if proj == "gate_up_proj" else ("down_proj",)
    for expert in range(tensor.shape[0]):
        for shard in shards_names:
            yield per_expert_name(pre, expert, shard, suffix), tensor[expert]


class FusedExpertChecker:
    """Checks fused expert tensors against the model config as they stream past."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        intermediate: int,
        weight_args: tuple[int, int | None] | None,
    ) -> None:
        self.num_experts = num_experts
        self.in_out = {
            "gate_up_proj": (2 * intermediate, hidden),
            "down_proj": (hidden, intermediate),
        }
        self.weight_args = weight_args
        self.packed: set[str] = set()
        self.scaled: set[str] = set()

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> FusedExpertChecker | None:
        config = getattr(model, "config", None)
        num_experts = getattr(config, "num_experts", None)
        intermediate = getattr(config, "moe_intermediate_size", None)
        hidden = getattr(config, "hidden_size", None)
        if not (num_experts and intermediate and hidden):
            return None
        quant_config = getattr(model, "quant_config", None)
        return cls(num_experts, hidden, intermediate, weight_args(quant_config))

    def expected(self, proj: str, suffix: str) -> tuple[int, ...] | None:
        rows, cols = self.in_out[proj]
        if suffix == "shape":
            return (3,)
        if suffix == "g_idx":
            return (self.num_experts, cols)
        if self.weight_args is None:
            return None
        bits, group = self.weight_args
        pack = 32 // bits
        group = group if group and group > 0 else cols
        if suffix == "packed":
            return (self.num_experts, rows, cols // pack)
        if suffix == "scale":
            return (self.num_experts, rows, cols // group)
        if suffix == "zero_point":
            return (self.num_experts, rows // pack, cols // group)
        return None

    def check(self, name: str, proj: str, suffix: str, tensor: torch.Tensor) -> None:
        key = name[: -len(suffix) - 1]
        if suffix == "packed":
            self.packed.add(key)
        elif suffix == "scale":
            self.scaled.add(key)
        if tensor.dim() >= 1 and suffix not in ("shape",):
            if tensor.shape[0] != self.num_experts:
                raise ValueError(
                    f"Checkpoint tensor {name!r} has shape {tuple(tensor.shape)}: its "
                    f"first dim must be the expert count num_experts="
                    f"{self.num_experts} from config.json"
                )
        expected = self.expected(proj, suffix)
        if expected is not None and tuple(tensor.shape) != expected:
            raise ValueError(
                f"Checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
                f"{expected} ({self._explain()})"
            )
        if suffix == "shape":
            rows, cols = self.in_out[proj]
            want = [self.num_experts, rows, cols]
            if tensor.tolist() != want:
                raise ValueError(
                    f"Checkpoint tensor {name!r} holds {tensor.tolist()}, expected "
                    f"{want} ({self._explain()})"
                )

    def finish(self) -> None:
        missing = sorted(self.packed - self.scaled)
        if missing:
            key = missing[0]
            proj = key.rsplit(".", 1)[1]
            raise ValueError(
                f"Checkpoint has {key}_packed but no {key}_scale; expected a tensor of "
                f"shape {self.expected(proj, 'scale')} ({self._explain()})"
            )

    def _explain(self) -> str:
        gate_up, down = self.in_out["gate_up_proj"], self.in_out["down_proj"]
        text = (
            f"num_experts={self.num_experts}, gate_up_proj [E, {gate_up[0]}, "
            f"{gate_up[1]}], down_proj [E, {down[0]}, {down[1]}] from config.json"
        )
        if self.weight_args is not None:
            bits, group = self.weight_args
            text += f", {bits}-bit packed 32 // {bits} per int32, group_size={group}"
        return text


def weight_args(quant_config: object) -> tuple[int, int | None] | None:
    """(num_bits, group_size) of a compressed-tensors int-packed weight scheme."""
    scheme_map = getattr(quant_config, "target_scheme_map", None)
    if not isinstance(scheme_map, dict):
        return None
    for scheme in scheme_map.values():
        args = scheme.get("weights") if isinstance(scheme, dict) else None
        bits = getattr(args, "num_bits", None)
        kind = str(getattr(args, "type", ""))
        if bits in (4, 8) and "int" in kind:
            return bits, getattr(args, "group_size", None)
    return None


__all__ = ["NAME", "SUMMARY", "detect", "apply", "rewrite"]


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)
# The rule types come from gemma4_quant.doctor.core, imported inside the functions:
# every vLLM process imports this module, doctor only runs in `gemma4-quant doctor`.

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def generation(text: str | None = None) -> tuple[str | None, str]:
    """Which Gemma 4 expert loader the installed vLLM has (substring, dotted, underscore,
    generic; None: one this patch does not know), and how we know. ``text``: the model
    file to read instead of the installed one."""
    return _generation(text)


def mapping_template(generation: str) -> str | None:
    """The checkpoint-name f-string of ``generation``'s expert mapping (None: generic)."""
    return next((template for gen, template, _ in _MAPPINGS if gen == generation), None)


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    return (
        # vllm-releases.md D2; gemma4.py expert_params_mapping
        Rule("fused-expert-names", ("experts",), Stage.LOAD, _doctor_fused_names),
        # vllm-releases.md D1, 'Other facts'; cpu-vllm.md (_shape on 0.32)
        Rule("fused-expert-metadata", ("experts",), Stage.LOAD, _doctor_fused_metadata),
    )


def _doctor_fused_names(module: Module, ctx: Ctx) -> Hit | None:
    """D2: fused `experts.<proj>_packed` meets the dotted expert mapping (0.19.1 - 0.20.2)."""
    from ..doctor.core import Hit, Outcome

    if not module.fused_experts or module.stored == "bf16":
        return None
    if ctx.env.generation != "dotted":
        return None
    names = sorted(n for n in module.tensors if re.search(r"_(packed|scale|zero_point)$", n))
    if not names:
        return None
    match = FUSED_EXPERT.match(names[0])
    proj = "gate_proj" if match and match["proj"] == "gate_up_proj" else "down_proj"
    suffix = match["suffix"] if match and match["suffix"] else "packed"
    key = f"{module.short.replace('.experts', '.moe.experts')}.0.{proj}_{suffix}"
    message = "fused `experts.<proj>_<suffix>` tensors meet the dotted expert mapping (D2)"
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    return Hit(Outcome.FAILS, message, f"KeyError: {key!r}")


def _doctor_fused_metadata(module: Module, ctx: Ctx) -> Hit | None:
    """1-D/2-D fused `experts.<proj>_shape` / `_g_idx` skip the 3D split on every release."""
    from ..doctor.core import Hit, Outcome
    from ..doctor.rules import mismatch_error

    if not module.fused_experts:
        return None
    names = sorted(n for n in module.tensors if n.endswith(("_shape", "_g_idx")))
    if not names:
        return None
    what = "`_shape`" if names[0].endswith("_shape") else "`_g_idx`"
    message = f"fused {what} expert tensors are never split per expert by vLLM"
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    env = ctx.env
    if env.silent_skip and all(n.endswith("_shape") for n in names):
        return None  # dropped without a word, and no kernel reads weight_shape
    if env.silent_skip:
        # dropped without a word; the load guard treats g_idx as optional, so it stays quiet
        return Hit(
            Outcome.SILENTLY_WRONG,
            message,
            f"{names[0]} is dropped: experts lose their activation order",
        )
    if env.generation == "generic" and names[0].endswith("_shape"):
        return Hit(
            Outcome.FAILS,
            message,
            f"RuntimeError: The expanded size of the tensor (2) must match the existing "
            f"size (3), loading {names[0]!r}",
        )
    return mismatch_error(module, ctx, names[0], message)

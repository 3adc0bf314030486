"""What a doctor rule is made of: outcomes, stages, the modules it looks at, its hits.

Patch modules define the rules for the failures they fix (their ``doctor_rules()``), and
the plugin imports every patch module in every vLLM process: this module therefore
imports nothing but the standard library, and patch modules import it lazily, inside the
function that builds their rules.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..layout import TOWER_PREFIXES

if TYPE_CHECKING:
    from .analysis import Analysis
    from .environment import Environment


class ExitCode(enum.IntEnum):
    LOADS = 0
    FAILS = 1
    SILENTLY_WRONG = 2
    NO_KERNEL = 3
    UNKNOWN = 4
    NOT_FOUND = 10
    UNREADABLE = 11
    HUB_UNREACHABLE = 12
    HUB_NOT_FOUND = 13
    NO_HUB_CLIENT = 14
    USAGE = 15


class Outcome(str, enum.Enum):
    """What a load ends with. PATCHED marks a problem that one of the patches removes."""

    LOADS = "loads"
    LOADS_WITH_PLUGIN = "loads with the plugin"
    PATCHED = "patched"
    SILENTLY_WRONG = "silently wrong"
    FAILS = "fails"
    NO_KERNEL = "no kernel"
    UNKNOWN = "unknown"


EXIT_CODES = {
    Outcome.LOADS: ExitCode.LOADS,
    Outcome.LOADS_WITH_PLUGIN: ExitCode.LOADS,
    Outcome.SILENTLY_WRONG: ExitCode.SILENTLY_WRONG,
    Outcome.FAILS: ExitCode.FAILS,
    Outcome.NO_KERNEL: ExitCode.NO_KERNEL,
    Outcome.UNKNOWN: ExitCode.UNKNOWN,
}


class Stage(enum.IntEnum):
    """When vLLM meets a problem; a load stops at the first hard one."""

    BUILD = 1  # model construction: quantization methods and kernels are chosen
    LOAD = 2  # weight loading: checkpoint names meet parameters
    PROCESS = 3  # process_weights_after_loading: repacking for the kernel
    RUN = 4  # first forward pass

    @property
    def label(self) -> str:
        return _STAGE_LABELS[self]


_STAGE_LABELS = {
    Stage.BUILD: "model construction",
    Stage.LOAD: "weight loading",
    Stage.PROCESS: "weight processing",
    Stage.RUN: "first forward pass",
}

# Module kinds vLLM builds as linear layers (experts are the other quantized kind).
LINEAR_KINDS = ("attention", "dense_mlp", "router", "per_layer")


def short_name(name: str) -> str:
    """model.language_model.layers.3.mlp.down_proj -> layers.3.mlp.down_proj;
    model.vision_tower.encoder.layers.0.mlp.up_proj.linear -> vision_tower.encoder...
    (vLLM's names)"""
    if name.startswith(TOWER_PREFIXES):
        return name.removeprefix("model.")
    match = re.search(r"(?:^|\.)(layers\.\d+\..*)$", name)
    return match.group(1) if match else name


@dataclass(frozen=True)
class Scheme:
    """A weight quantization scheme, as the config asks vLLM to build a module."""

    method: str  # compressed-tensors, auto-round, gptq, awq, fp8, modelopt, ...
    weight_type: str  # int, float, nvfp4, mxfp4, unknown
    bits: int | None
    group_size: int | None  # -1: per channel
    symmetric: bool | None
    strategy: str | None = None
    actorder: str | None = None
    activations: str | None = None  # None: weight-only
    format: str | None = None

    @property
    def storage(self) -> str:
        """The tensors a module built with this scheme expects (see Module.stored)."""
        if self.method in ("auto-round", "gptq", "awq"):
            return "gptq"
        if self.weight_type == "int" and self.format in (None, "pack-quantized"):
            return "int-packed"
        if self.weight_type == "int":
            return "int8"
        if self.weight_type == "float" and self.bits == 8:
            return "fp8"
        return self.weight_type

    def describe(self) -> str:
        if self.weight_type == "float" and self.bits == 8:
            text = "fp8"
        elif self.weight_type in ("nvfp4", "mxfp4"):
            text = self.weight_type
        else:
            text = f"{self.weight_type}{self.bits or '?'}"
        if self.group_size and self.group_size > 0:
            text += f" g{self.group_size}"
        elif self.strategy:
            text += f" per-{self.strategy}"
        if self.symmetric is not None and self.weight_type == "int":
            text += " sym" if self.symmetric else " asym"
        if self.actorder:
            text += f" actorder={self.actorder}"
        text += f" a:{self.activations}" if self.activations else " weight-only"
        return text


@dataclass
class Module:
    """One weight-bearing module of the checkpoint (experts: one per layer)."""

    name: str  # checkpoint name, e.g. model.language_model.layers.0.self_attn.q_proj
    kind: str  # attention, dense_mlp, router, experts, embedding, lm_head, vision, audio
    layer: int | None
    stored: str  # bf16 (unquantized), int-packed, gptq, awq, fp8, nvfp4, unknown
    tensors: list[str] = field(default_factory=list)
    fused_experts: bool = False  # fused 3D [E, ...] tensors (vs experts.{e}.{proj})
    in_features: int | None = None
    out_features: int | None = None
    scheme: Scheme | None = None  # what the config asks for (None: unquantized)
    scheme_note: str = ""  # why the config says so (ignore entry, target, ...)
    shard_conflict: str = ""  # shards of one vLLM layer quantized differently

    @property
    def short(self) -> str:
        return short_name(self.name)


@dataclass
class Ctx:
    """One prediction: a checkpoint, a vLLM, a machine, and the patches applied."""

    analysis: Analysis
    env: Environment
    active: frozenset[str]  # patches of this project applied (empty: stock vLLM)

    def patched(self, name: str) -> bool:
        return name in self.active

    def needed(self, patch: str) -> bool:
        """Whether ``patch``'s detect() finds the code it fixes in this vLLM."""
        return self.env.patches.get(patch, ("missing", ""))[0] == "needed"


@dataclass(frozen=True)
class Hit:
    """What one rule finds for one module."""

    outcome: Outcome
    message: str  # the same for every module the rule hits alike
    example: str = ""  # this module's specifics (the tensor, the error vLLM raises)
    patch: str = ""  # the patch that removes the problem (outcome PATCHED)
    stage: Stage | None = None  # when it is not the rule's own stage
    extra_bytes: int = 0  # memory the dequantizing fallback adds
    # where vLLM meets it within the stage, when not at the module's own place
    # (AFTER_LAYERS: once every decoder layer is built)
    position: str | None = None


# a position past every decoder layer's (predict._position: zero-padded layer numbers)
AFTER_LAYERS = "999999"


@dataclass(frozen=True)
class Rule:
    name: str
    kinds: tuple[str, ...]  # module kinds it looks at
    stage: Stage
    check: Callable[[Module, Ctx], Hit | None]
    per_layer: bool = False  # speaks of vLLM's fused layers (qkv_proj), not checkpoint modules

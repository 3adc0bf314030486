"""Gemma 4's MoE router projection is built with the model's quantization config.

Why:
    ``Gemma4Router`` builds ``self.proj = GateLinear(...)`` without ``quant_config`` on
    every release, so a checkpoint whose router is quantized (Intel AutoRound int4:
    ``router.proj.qweight/qzeros/scales``; compressed-tensors exports that do not ignore
    ``router.proj``; FP8 with ``router.proj.weight_scale``) has nowhere to load it:
    KeyError on 0.19 - 0.23, *silently skipped* on 0.24 - 0.30 (the router keeps
    uninitialized memory and the model talks garbage), ValueError on 0.31+ (defect D4).
    The PR's one-line fix (pass ``quant_config`` to GateLinear) raises TypeError on
    0.19 - 0.30, where GateLinear has no such parameter.

How:
    ``Gemma4Router.__init__`` is wrapped. After vLLM builds the stock router, the
    projection is built again with the model's quantization config; only if the config
    really quantizes it (its linear method is not ``UnquantizedLinearMethod``) does it
    replace the stock GateLinear, so an unquantized router keeps GateLinear and its fast
    GEMM paths. Where GateLinear takes ``quant_config`` (0.31+) the replacement is a
    GateLinear with it (the upstream fix); before, a ``ReplicatedLinear`` whose output is
    cast to float32, as GateLinear gives it.

Upstream PR:
    vllm-project/vllm#39582 (open) part 3; #43227 (AutoRound quantized router, open);
    this project's ``upstream/`` series, patch "Gemma 4 router: pass quant_config".

Releases:
    Every release with Gemma 4 (0.19.0 - 0.33.0); detected from the code: the patch
    steps aside where ``Gemma4Router`` already passes ``quant_config``.

Removal:
    When the oldest supported release builds ``Gemma4Router.proj`` with ``quant_config``.
"""

from __future__ import annotations

import ast
import functools
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .. import vllm_code
from . import Detection, vllm_source, when_imported, wrap_once

NAME = "router"
SUMMARY = "quantized Gemma 4 router (`router.proj.*` qweight/packed/fp8) loads and routes (D4)"

GEMMA4 = "vllm.model_executor.models.gemma4"
_MARK = "__gemma4_quant_router__"
_MODEL_FILE = "model_executor/models/gemma4.py"
_GATE_LINEAR_FILES = (
    "model_executor/layers/fused_moe/router/gate_linear.py",
    "model_executor/layers/linear.py",
)


def _gate_linear_takes_quant_config() -> bool | None:
    """Whether ``GateLinear.__init__`` has a ``quant_config`` parameter (None: no
    GateLinear found)."""
    for relpath in _GATE_LINEAR_FILES:
        init = vllm_code.find_function(vllm_source(relpath), "GateLinear.__init__")
        if init is not None:
            args = init.args
            names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
            return "quant_config" in names
    return None


def _router_gate_call() -> ast.Call | None:
    """The ``GateLinear(...)`` call that ``Gemma4Router.__init__`` assigns to ``self.proj``."""
    init = vllm_code.find_function(vllm_source(_MODEL_FILE), "Gemma4Router.__init__")
    for node in ast.walk(init) if init is not None else ():
        if (
            isinstance(node, ast.Assign)
            and any(_is_self_proj(target) for target in node.targets)
            and isinstance(node.value, ast.Call)
            and vllm_code.call_name(node.value) == "GateLinear"
        ):
            return node.value
    return None


def _is_self_proj(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Attribute)
        and node.attr == "proj"
        and vllm_code.is_name(node.value, "self")
    )


def detect() -> Detection:
    call = _router_gate_call()
    if call is None:
        return Detection.unrecognized("Gemma4Router.__init__ builds no self.proj = GateLinear(...)")
    if "quant_config" in vllm_code.keywords(call) or any(
        vllm_code.is_name(arg, "quant_config") for arg in call.args
    ):
        return Detection.not_needed("Gemma4Router passes quant_config to GateLinear")
    takes = _gate_linear_takes_quant_config()
    if takes is None:
        return Detection.unrecognized("GateLinear not found")
    if takes:
        return Detection.needed("router built without quant_config; GateLinear takes it", takes)
    return Detection.needed("router built without quant_config; GateLinear cannot take it", takes)


def apply(detection: Detection) -> None:
    when_imported(GEMMA4, functools.partial(_patch, takes=bool(detection.findings)))


def _patch(module: ModuleType, takes: bool) -> None:
    def make_wrapper(original):
        def __init__(self, config, quant_config=None, prefix: str = "", *args, **kwargs):
            original(self, config, quant_config, prefix, *args, **kwargs)
            if quant_config is not None:
                quantized = _quantized_proj(self.proj, quant_config, f"{prefix}.proj", takes)
                if quantized is not None:
                    self.proj = quantized

        return __init__

    wrap_once(module.Gemma4Router, "__init__", _MARK, make_wrapper)


def _quantized_proj(
    stock: torch.nn.Module, quant_config, prefix: str, takes: bool
) -> torch.nn.Module | None:
    """The router projection built with ``quant_config``, or None if it stays unquantized."""
    import torch
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    input_size, output_size = stock.input_size, stock.output_size
    if takes:
        proj = type(stock)(
            input_size,
            output_size,
            bias=False,
            out_dtype=torch.float32,
            quant_config=quant_config,
            prefix=prefix,
        )
    else:
        proj = _float32_replicated_linear()(
            input_size, output_size, bias=False, quant_config=quant_config, prefix=prefix
        )
    if proj.quant_method is None or isinstance(proj.quant_method, UnquantizedLinearMethod):
        return None
    return proj


@functools.cache
def _float32_replicated_linear() -> type:
    from vllm.model_executor.layers.linear import ReplicatedLinear

    class Float32OutReplicatedLinear(ReplicatedLinear):
        """A quantized router projection: logits in float32, as GateLinear gives them."""

        def forward(self, x: torch.Tensor):  # type: ignore[override]
            output, bias = super().forward(x)
            return output.float(), bias

    return Float32OutReplicatedLinear


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)
# The rule types come from gemma4_quant.doctor.core, imported inside the functions:
# every vLLM process imports this module, doctor only runs in `gemma4-quant doctor`.

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # vllm-releases.md D4
    return (Rule("quantized-router", ("router",), Stage.LOAD, _doctor_quantized_router),)


def _doctor_quantized_router(module: Module, ctx: Ctx) -> Hit | None:
    """D4: a quantized router meets Gemma4Router's GateLinear built without quant_config:
    its quantized tensors match no parameter (KeyError, or a silent skip on 0.24 - 0.30)."""
    from ..doctor.core import Hit, Outcome
    from ..doctor.rules import first_tensor, mismatch_error

    if module.stored == "bf16" or module.scheme is None:
        return None  # unquantized, or the config disagrees (rule config-vs-checkpoint)
    if ctx.env.features.get("router_passes_quant_config"):
        return None
    message = "the router is quantized; Gemma4Router builds it without quant_config (D4)"
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    tensor = first_tensor(module, "qweight", "weight_packed", "weight_scale")
    return mismatch_error(module, ctx, tensor, message)

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

import functools
import re
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from . import Detection, vllm_source, when_imported, wrap_once

NAME = "router"
SUMMARY = "quantized Gemma 4 router (`router.proj.*` qweight/packed/fp8) loads and routes (D4)"

GEMMA4 = "vllm.model_executor.models.gemma4"
_MARK = "__gemma4_quant_router__"
_GATE_LINEAR_FILES = (
    "model_executor/layers/fused_moe/router/gate_linear.py",
    "model_executor/layers/linear.py",
)


def _gate_linear_takes_quant_config() -> bool | None:
    for relpath in _GATE_LINEAR_FILES:
        text = vllm_source(relpath)
        if text is None or "class GateLinear" not in text:
            continue
        init = text.split("class GateLinear", 1)[1].split("def forward", 1)[0]
        return re.search(r"\bquant_config\s*:", init) is not None
    return None


def detect() -> Detection:
    text = vllm_source("model_executor/models/gemma4.py")
    if text is None or "class Gemma4Router" not in text:
        return Detection.unrecognized("no Gemma4Router in vllm/model_executor/models/gemma4.py")
    router = text.split("class Gemma4Router", 1)[1].split("\nclass ", 1)[0]
    match = re.search(r"self\.proj = GateLinear\((.*?)\n        \)", router, re.S)
    if match is None:
        return Detection.unrecognized("Gemma4Router.proj is not built with GateLinear(...)")
    if "quant_config" in match.group(1):
        return Detection.not_needed("Gemma4Router passes quant_config to GateLinear")
    takes = _gate_linear_takes_quant_config()
    if takes is None:
        return Detection.unrecognized("GateLinear not found")
    if takes:
        return Detection.needed("router built without quant_config; GateLinear takes it")
    return Detection.needed("router built without quant_config; GateLinear cannot take it")


def apply() -> None:
    when_imported(GEMMA4, functools.partial(_patch, takes=bool(_gate_linear_takes_quant_config())))


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

"""What both fallbacks share: parameter handling and the one warning per model."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...layout import number_spans
from .. import wrap_once

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("vllm.gemma4_quant")

# --------------------------------------------------------------------- dequantization


def _data(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.data


def _drop_params(layer: torch.nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        if name in layer._parameters:
            del layer._parameters[name]


def install_unquantized(
    layer: torch.nn.Module, weight: torch.Tensor, drop: tuple[str, ...], unquantized: Any
) -> None:
    """``weight`` replaces the linear layer's quantized parameters ``drop``; vLLM's
    unquantized linear method (``unquantized``) processes and serves it from here on."""
    import torch

    _drop_params(layer, drop)
    layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
    unquantized.process_weights_after_loading(layer)


def install_unquantized_experts(
    layer: torch.nn.Module, weights: dict[str, torch.Tensor], drop: tuple[str, ...]
) -> None:
    """``weights`` (``w13``, ``w2``: [E, N, K]) replace the experts' quantized parameters
    ``drop`` as the ``w13_weight`` / ``w2_weight`` vLLM's unquantized MoE method reads."""
    import torch

    _drop_params(layer, drop)
    for stem, weight in weights.items():
        layer.register_parameter(f"{stem}_weight", torch.nn.Parameter(weight, requires_grad=False))


def route_to_kernel(
    method: type,
    apply: str,
    mark: str,
    kernel_of: Callable[[Any], Any],
    process: Callable[[Any, torch.nn.Module], None] | None = None,
) -> None:
    """A linear method (or scheme) class whose instances may hold a fallback kernel
    (``kernel_of(instance)``, None where they do not): its weight processing and its
    ``apply`` go to that kernel (``process(kernel, layer)``, else the kernel's own
    ``process_weights_after_loading``), vLLM's code stays everywhere else."""

    def make_process(original: Callable) -> Callable:
        def process_weights_after_loading(self: Any, layer: torch.nn.Module) -> None:
            kernel = kernel_of(self)
            if kernel is None:
                return original(self, layer)
            if process is not None:
                return process(kernel, layer)
            return kernel.process_weights_after_loading(layer)

        return process_weights_after_loading

    def make_apply(original: Callable) -> Callable:
        def run(self: Any, layer: torch.nn.Module, x: torch.Tensor, bias: Any = None) -> Any:
            kernel = kernel_of(self)
            if kernel is None:
                return original(self, layer, x, bias)
            return kernel.apply_weights(layer, x, bias)

        return run

    wrap_once(method, "process_weights_after_loading", mark, make_process)
    wrap_once(method, apply, mark, make_apply)


def keep_checkpoint_sizes(
    method: object, hidden_size: int, intermediate_size_per_partition: int, *args: object
) -> tuple[int, int]:
    """``maybe_roundup_sizes`` of a MoE fallback: its packed buffers take the
    checkpoint's sizes, as the quantized method's would; an unquantized backend's padding
    would not match them."""
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase

    return FusedMoEMethodBase.maybe_roundup_sizes(
        method, hidden_size, intermediate_size_per_partition, *args
    )


# --------------------------------------------------------------------- the one warning


class _CostReport:
    """Collects the fallback layers of one model, so that one warning covers them.

    Layers are built (``add``) before any is processed (``flush``), so the first
    processed layer reports the whole model.
    """

    def __init__(self) -> None:
        self.pending: dict[str, list[tuple[int, int]]] = {}
        self.reasons: set[str] = set()
        self.names: list[str] = []

    def add(
        self, kind: str, packed_bytes: int, dequantized_bytes: int, reason: str, name: str = ""
    ) -> None:
        self.pending.setdefault(kind, []).append((packed_bytes, dequantized_bytes))
        # vLLM's refusals can span lines (one per backend it tried); the warning stays one
        # line, so that a grep of the log finds it whole
        self.reasons.add(" ".join(reason.split()).rstrip("."))
        if name:
            self.names.append(name)

    def flush(self, dtype: torch.dtype) -> None:
        if not self.pending:
            return
        sizes = [s for layers in self.pending.values() for s in layers]
        packed = sum(p for p, _ in sizes)
        dequantized = sum(d for _, d in sizes)
        what = " and ".join(f"{len(v)} {kind}" for kind, v in sorted(self.pending.items()))
        if self.names:
            what += f" ({layer_names(self.names)})"
        logger.warning(
            "gemma4_quant: %s. Dequantizing %s to %s at load time: %.4f GiB of weights "
            "instead of %.4f GiB packed (+%.4f GiB). GEMMA4_QUANT_FALLBACK=off keeps "
            "vLLM's error instead.",
            "; ".join(sorted(self.reasons)),
            what,
            str(dtype).removeprefix("torch."),
            dequantized / 2**30,
            packed / 2**30,
            (dequantized - packed) / 2**30,
        )
        self.pending.clear()
        self.reasons.clear()
        self.names.clear()


def layer_names(names: list[str]) -> str:
    """model.layers.0.moe.experts, model.layers.1.moe.experts -> model.layers.{0-1}.moe.experts"""
    by_pattern: dict[tuple[str, str], list[int]] = {}
    for name in names:
        match = re.match(r"^(.*\blayers\.)(\d+)(\..*)?$", name)
        if match is None:
            by_pattern.setdefault((name, ""), [])
        else:
            by_pattern.setdefault((match[1], match[3] or ""), []).append(int(match[2]))
    return ", ".join(
        f"{head}{{{number_spans(layers)}}}{tail}" if layers else head
        for (head, tail), layers in by_pattern.items()
    )


COST_REPORT = _CostReport()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()

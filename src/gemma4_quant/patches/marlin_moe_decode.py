"""Single-stream decode: Gemma 4's routing and int4 experts in two Triton kernels for one
token, on the weights Marlin's MoE already holds.

Why:
    At one token vLLM runs Gemma 4's MoE as eight kernels per layer: its routing kernel,
    Marlin's block alignment and helpers, the W13 GEMM, the activation, the W2 GEMM and the
    weighted sum. On an H100 (26B-A4B, docs/gpu-results.md section 3d) the two GEMMs take
    24.4 us and the rest 10.8 us of a ~125 us layer, for 26.8 MB of weights (8.0 us at the
    bound). ``gemma4_quant.kernels.marlin_moe`` does all of it in two kernels on Marlin's
    own repacked layout (no second copy of the experts).

Measured (vLLM 0.26.0; docs/gpu-results.md 3f, 3g, 3i, 3k):
    the kernels alone 28.2 us on an H100 (routing included, experts cycled past L2,
    bench/int4_loop_ab.py), where vLLM's routing + ``fused_marlin_moe`` took 37.8 (3g);
    error 0.31% against the exact product (vLLM 0.45%). Inside vLLM every layer takes them,
    the one-token experts match the bf16 twin within 0.57%, and a layer runs 8 - 9 kernels
    fewer. End to end on an H100 with the other one-token patches: decode 1.16x of stock
    at batch 1, 1.00x at 4, 16 and 64 (64 in two rounds), so ``auto`` takes 26B-A4B's experts on
    compute capability 9.0 (``TILES``). Batch 64 runs vLLM's kernels on both sides; of the
    nine plugin runs there with this path (3f - 3k), five landed 2.3 - 3.0% under stock's
    usual level, a level stock's own runs also reach.

How:
    Switched with fast_decode (``GEMMA4_QUANT_FAST_DECODE``: ``auto``, ``off``, ``force``);
    ``auto`` takes only shapes in ``TILES`` (measured faster end to end on that GPU).
    The Gemma 4 module that builds the experts (``Gemma4MoE``, or the decoder layer where
    vLLM moved them) is wrapped: after its quant method's ``process_weights_after_loading``,
    the experts take the path only if: a CUDA GPU; compressed-tensors 4-bit symmetric
    grouped experts on Marlin (``CompressedTensorsWNA16MarlinMoEMethod`` with ``uint4b8``,
    Marlin backend, 16-bit activations, no act-order); one GPU (no tensor, data or expert
    parallelism); GELU(tanh); Marlin's tensors of the expected shapes; and one random token
    through the kernels agrees within 2% with vLLM's own path on this layer's experts
    (vLLM's torch routing for Gemma 4, then ``fused_marlin_moe``). Anything else keeps
    vLLM's path, with one warning where the check itself fails. The experts module's
    ``forward`` (its instance attribute) then calls one custom op,
    ``gemma4_quant::marlin_moe``, which torch.compile keeps whole: one token takes the
    kernels, more tokens the module's own ``forward``; vLLM captures a CUDA graph per batch
    size, so each holds one of the two.

Upstream PR:
    None. A one-token path in vLLM's Marlin MoE (routing and glue fused) would remove it.

Releases:
    Every release whose Gemma 4 model builds ``self.experts`` in ``Gemma4MoE`` or the
    decoder layer, holds ``per_expert_scale`` there or in ``Gemma4Router``, and defines
    ``gemma4_routing_function_torch`` (0.20 - 0.34), with a CUDA build of vLLM; detected
    from the code, never the version. 0.19 (no such routing function) keeps vLLM's path.

Removal:
    When vLLM's one-token MoE is as fast (bench/marlin_moe.py measures both).
"""

from __future__ import annotations

import ast
import inspect
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

NAME = "marlin_moe_decode"
SUMMARY = (
    "one-token decode: Gemma 4's routing and int4 experts in two Triton kernels on "
    "Marlin's MoE layout (measured GPUs only)"
)

_MODEL = "model_executor/models/gemma4.py"
MODEL_MODULE = "vllm.model_executor.models.gemma4"
# where vLLM builds Gemma 4's experts: Gemma4MoE (0.19 - 0.30), the decoder layer (0.32+)
OWNERS = ("Gemma4MoE", "Gemma4DecoderLayer")
_MARK = "__gemma4_quant_marlin_moe_decode__"
_OWNER = "_gemma4_quant_moe_owner"
FLAG = "_gemma4_quant_marlin_moe"  # on a taken experts module: its key (tests/gpu/probe.py)
OP = "marlin_moe"

# vLLM's Marlin MoE rounds dequantized weights times scales to bf16 and each expert's
# output before the sum; the kernels do neither (~0.3 - 0.5% apart, bench/marlin_moe.py);
# a wrong expert, row or group is off by tens of percent
CHECK_TOLERANCE = 2e-2
# (hidden, intermediate) -> tiles of the shapes ``auto`` takes, by compute capability:
# 26B-A4B's experts on 9.0, measured faster end to end with them (``force`` takes them at
# any shape and GPU)
TILES: dict[tuple[int, int], dict[tuple[int, int], dict[str, int]]] = {
    (9, 0): {(2816, 704): kernel_tiles.MARLIN_MOE},
}


def owner_of_experts(text: str | None) -> str | None:
    """The class of ``OWNERS`` whose ``__init__`` builds ``self.experts`` and whose
    ``forward`` calls it, where ``per_expert_scale`` lives in it or in Gemma4Router."""
    router = vllm_code.find_function(text, "Gemma4Router.__init__")
    for name in OWNERS:
        init = vllm_code.find_function(text, f"{name}.__init__")
        forward = vllm_code.find_function(text, f"{name}.forward")
        if init is None or forward is None or not vllm_code.assigns_self(init, "experts"):
            continue
        calls = any(
            ast.unparse(call.func) == "self.experts" for call in vllm_code.calls(forward, "experts")
        )
        scale = vllm_code.assigns_self(init, "per_expert_scale") or (
            router is not None and vllm_code.assigns_self(router, "per_expert_scale")
        )
        if calls and scale:
            return name
    return None


def detect() -> Detection:
    text = vllm_source(_MODEL)
    owner = owner_of_experts(text)
    if owner is None or vllm_code.find_function(text, "gemma4_routing_function_torch") is None:
        return Detection.unrecognized(
            "Gemma 4's experts are not built as self.experts of Gemma4MoE or the decoder "
            "layer with a per_expert_scale, or there is no gemma4_routing_function_torch"
        )
    off = switched_off("vLLM's MoE", "the kernels are", measured=bool(TILES))
    if off is not None:
        return off
    return Detection.needed(
        f"{owner} builds Gemma 4's experts: one token takes two Triton kernels on Marlin's "
        "MoE layout where measured (decided per layer at load)"
    )


def apply(detection: Detection) -> None:
    when_imported(MODEL_MODULE, patch_model)


def patch_model(module: ModuleType) -> None:
    owner = owner_of_experts(vllm_source(_MODEL))
    if owner is None:
        return

    def make_init(original: Any) -> Any:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            original(self, *args, **kwargs)
            watch(self)

        return __init__

    wrap_once(getattr(module, owner), "__init__", _MARK, make_init)


def _scale_holder(owner: Any) -> Any:
    if hasattr(owner, "per_expert_scale"):
        return owner
    return getattr(owner, "router", None)


def watch(owner: Any) -> None:
    """Decide for ``owner``'s experts once their quant method has processed the weights:
    that method's ``process_weights_after_loading`` is wrapped on the instance."""
    runner = getattr(owner, "experts", None)
    holder = _scale_holder(owner)
    if runner is None or getattr(holder, "per_expert_scale", None) is None:
        return
    routed = getattr(runner, "routed_experts", runner)  # 0.26+: the runner holds them
    method = getattr(routed, "quant_method", None)
    if method is None or getattr(method, _MARK, False):
        return
    setattr(routed, _OWNER, (weakref.ref(holder), weakref.ref(runner)))
    original = method.process_weights_after_loading

    def process_weights_after_loading(layer: Any) -> None:
        original(layer)
        found = getattr(layer, _OWNER, None)
        if found is not None and getattr(found[1](), FLAG, None) is None:
            take(layer, found[0](), found[1](), method)

    method.process_weights_after_loading = process_weights_after_loading
    setattr(method, _MARK, True)


def take(routed: Any, holder: Any, runner: Any, method: Any) -> bool:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return False
    import torch

    mode = envs.fast_decode_mode()
    shape = marlin_experts(routed, method)
    if shape is None:
        return False
    hidden, inter = shape
    tiles = tiles_for(mode, torch.cuda.get_device_capability(), hidden, inter)
    if tiles is None:
        return False
    return decide(routed, holder, runner, tiles, _vllm_reference(routed, method))


def marlin_experts(routed: Any, method: Any) -> tuple[int, int] | None:
    """(hidden, intermediate) of experts held by vLLM's compressed-tensors Marlin MoE as
    4-bit symmetric grouped weights, on one GPU, GELU(tanh); None otherwise."""
    if type(method).__name__ != "CompressedTensorsWNA16MarlinMoEMethod":
        return None
    # uint4b8: 4-bit symmetric (asymmetric experts are uint4, with zero points)
    if str(getattr(method, "quant_type", None)) != "uint4b8":
        return None
    if getattr(method, "actorder", None) in ("group", "dynamic"):
        return None
    if getattr(method, "marlin_input_dtype", None) is not None:  # int8 / fp8 activations
        return None
    # the backend it picked: wna16_backend (0.24+) or kernel_backend (0.20 - 0.23)
    for attr in ("wna16_backend", "kernel_backend"):
        backend = getattr(method, attr, None)
        if backend is not None and str(getattr(backend, "value", backend)).lower() != "marlin":
            return None
    if not _one_gpu(routed) or getattr(routed, "apply_router_weight_on_input", False):
        return None
    if _activation(routed) != "gelu_tanh":
        return None
    tensors = _tensors(routed)
    if tensors is None:
        return None
    from ..kernels.marlin_moe import check_shapes

    w13, s13, w2, s2 = tensors
    hidden = w2.shape[2] // 2
    try:
        inter, _ = check_shapes(hidden, w13.shape[0], w13, s13, w2, s2)
    except ValueError:
        return None
    if s13.element_size() != 2 or getattr(routed, "top_k", 0) < 1:
        return None
    return hidden, inter


def _one_gpu(routed: Any) -> bool:
    config = getattr(routed, "moe_parallel_config", None)
    if config is None:
        config = getattr(getattr(routed, "moe_config", None), "moe_parallel_config", None)
    sizes = [getattr(config, f"{kind}_size", None) for kind in ("tp", "dp", "ep")]
    return config is not None and sizes == [1, 1, 1] and getattr(routed, "expert_map", None) is None


def _activation(routed: Any) -> str:
    act = getattr(routed, "activation", "")
    return str(getattr(act, "value", act)).lower()


def _tensors(routed: Any) -> tuple[torch.Tensor, ...] | None:
    names = ("w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale")
    tensors = tuple(getattr(routed, name, None) for name in names)
    return None if any(t is None for t in tensors) else tensors


def tiles_for(
    mode: str, capability: tuple[int, int], hidden: int, inter: int
) -> dict[str, int] | None:
    tiles = TILES.get(capability, {}).get((hidden, inter))
    if tiles is None and mode == "force":
        tiles = dict(kernel_tiles.MARLIN_MOE)
    maxnreg = envs.int4_maxnreg()
    if tiles is not None and maxnreg:
        tiles = {**tiles, "maxnreg13": maxnreg, "maxnreg2": maxnreg}
    return tiles


# key -> (tiles, experts module holding the weights, scale holder, runner), all weakly
_layers: dict[int, tuple[dict[str, int], Any, Any, Any]] = {}


def decide(routed: Any, holder: Any, runner: Any, tiles: dict[str, int], reference: Any) -> bool:
    """Whether ``runner`` takes the one-token kernels: one random token through them agrees
    with ``reference(x, topk_weights, topk_ids)``, vLLM's own path on these experts."""
    key = len(_layers)
    _layers[key] = (tiles, weakref.ref(routed), weakref.ref(holder), weakref.ref(runner))
    if not agrees(key, reference):
        del _layers[key]
        return False
    register_op()
    install(runner, key)
    import torch

    info_once(
        NAME,
        "gemma4_quant: marlin_moe_decode: Gemma 4's routing and int4 experts take two Triton "
        "kernels for one token on %s; more tokens keep vLLM's MoE",
        cuda_device() if torch.cuda.is_available() else "the CPU (Triton's interpreter)",
    )
    return True


def install(runner: Any, key: int) -> None:
    """``runner``'s own ``forward`` becomes the op (an instance attribute: vLLM's class, and
    every other MoE module, stay as they are)."""
    import torch

    op = getattr(torch.ops.gemma4_quant, OP)
    own = type(runner).forward

    def forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, *args, **kwargs):
        if args or kwargs:
            return own(runner, hidden_states, router_logits, *args, **kwargs)
        return op(hidden_states, router_logits, key)

    runner.forward = forward
    setattr(runner, FLAG, key)


def _kernels(key: int, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
    from ..kernels.marlin_moe import marlin_moe

    tiles, routed_ref, holder_ref, _ = _layers[key]
    routed = routed_ref()
    w13, s13, w2, s2 = _tensors(routed)
    out = marlin_moe(
        x.reshape(1, -1),
        router_logits.reshape(1, -1),
        holder_ref().per_expert_scale,
        w13,
        s13,
        w2,
        s2,
        top_k=routed.top_k,
        activation="gelu_tanh",
        **tiles,
    )
    return out.reshape(x.shape)


def agrees(key: int, reference: Any) -> bool:
    """One random token through the kernels against ``reference`` with vLLM's torch routing
    of the same logits (this also makes the kernels' workspace before CUDA graphs are
    captured)."""
    import torch

    _, routed_ref, holder_ref, _ = _layers[key]

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from vllm.model_executor.models.gemma4 import gemma4_routing_function_torch

        routed, holder = routed_ref(), holder_ref()
        w13, s13, w2, _ = _tensors(routed)
        hidden, n_experts, dtype = w2.shape[2] // 2, w13.shape[0], s13.dtype
        # explicit CPU generator: vLLM builds the model under a default device of its own
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(1, hidden, generator=gen, device="cpu").to(dtype=dtype, device=w13.device)
        logits = (torch.randn(1, n_experts, generator=gen, device="cpu") * 2).to(w13.device)
        with torch.no_grad():
            weights, ids = gemma4_routing_function_torch(
                logits, routed.top_k, holder.per_expert_scale
            )
            return _kernels(key, x, logits), reference(x, weights, ids)

    return one_token_agrees(
        NAME,
        compute,
        CHECK_TOLERANCE,
        "vLLM's Marlin MoE",
        "Gemma 4's experts keep vLLM's MoE",
    )


def _vllm_reference(routed: Any, method: Any) -> Any:
    """vLLM's ``fused_marlin_moe`` on ``routed``'s own tensors, as its Marlin method calls it
    (keyword arguments by the name this release's signature gives them)."""

    def reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        try:
            from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe
        except ImportError:
            from vllm.model_executor.layers.fused_moe.fused_marlin_moe import fused_marlin_moe
        from vllm.model_executor.layers.quantization.utils.marlin_utils import (
            marlin_make_workspace_new,
        )
        from vllm.scalar_type import scalar_types

        w13, s13, w2, s2 = _tensors(routed)
        workspace = getattr(routed, "workspace", None)
        if workspace is None:
            workspace = marlin_make_workspace_new(x.device, 4)
        quant_type = getattr(method, "quant_type", scalar_types.uint4b8)
        arguments = {
            "hidden_states": x,
            "w1": w13,
            "w2": w2,
            "bias1": None,
            "bias2": None,
            "w1_scale": s13,
            "w2_scale": s2,
            "gating_output": None,
            "topk_weights": weights,
            "topk_ids": ids,
            "quant_type_id": quant_type.id,
            "global_num_experts": w13.shape[0],
            "activation": routed.activation,
            "g_idx1": getattr(routed, "w13_weight_g_idx", None),
            "g_idx2": getattr(routed, "w2_weight_g_idx", None),
            "sort_indices1": getattr(routed, "w13_g_idx_sort_indices", None),
            "sort_indices2": getattr(routed, "w2_g_idx_sort_indices", None),
            "workspace": workspace,
            "is_k_full": True,
        }
        names = inspect.signature(fused_marlin_moe).parameters
        return fused_marlin_moe(**{k: v for k, v in arguments.items() if k in names})

    return reference


def register_op() -> None:
    """``torch.ops.gemma4_quant.marlin_moe(x, router_logits, key)``."""
    import torch

    def marlin_moe(x: torch.Tensor, router_logits: torch.Tensor, key: int) -> torch.Tensor:
        if x.numel() == x.shape[-1]:
            return _kernels(key, x, router_logits)
        runner = _layers[key][3]()
        return type(runner).forward(runner, x, router_logits)

    def fake(x: torch.Tensor, router_logits: torch.Tensor, key: int) -> torch.Tensor:
        return torch.empty_like(x)

    define_op(OP, "(Tensor x, Tensor router_logits, int key) -> Tensor", marlin_moe, fake)


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows that decides whether it loads: the path changes speed.
    return ()

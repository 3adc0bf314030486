"""Decode: the norms between Gemma 4's attention and its feed-forward blocks in one kernel,
and those at the end of a decoder layer in another.

Why:
    Between attention's o projection and the dense MLP, the router and the experts, a
    Gemma 4 MoE decoder layer computes ``h = post_attention_layernorm(o) + residual`` and
    three norms of ``h`` (the dense MLP's input, the experts' input and the router's,
    whose scalings sit in ``Gemma4Router.forward``). torch.compile fuses them into one
    looped reduction (the hidden size, 2816, is past its persistent limit of 1024), which
    waits on memory once per step of each dependent pass: inside vLLM 0.26.0 on an H100
    6.6 - 10.5 us a layer at batch 1, the largest kernel outside the projections.
    ``gemma4_quant.kernels.norm_blocks`` does it in one pass after one wait: with L2
    flushed before each call, 3.23 us against Inductor's 3.95 at batch 1, 3.73 against
    4.28 at batch 64 (docs/gpu-results.md 3n). At the end of the layer the two
    post-feed-forward norms, their sum, the last norm, the residual add and the layer
    scalar are another looped reduction (4.6 us a layer on an H200, 3o).

How:
    ``Gemma4DecoderLayer.__init__`` is wrapped: a layer takes the path where the model
    is built on a CUDA GPU, the layer has its MoE block and no per-layer input (26B-A4B),
    its seven weighted norms and the router's share one epsilon, its layer scalar is one
    bf16 value, and the kernels compile and match vLLM's norms on one token on this GPU
    (checked once per process; a failure leaves vLLM's forward with one warning). Its
    ``forward`` then runs the layer's statements as vLLM's does, except that the norms
    after attention are one custom op, ``gemma4_quant::post_attention_norms``, the
    router's projection takes the op's router input, and the statements after the
    feed-forward blocks are a second op, ``gemma4_quant::end_of_layer_norms``. Every
    other layer keeps vLLM's forward. Where ``router_decode`` took the router's
    projection (one token through its kernel), the first op is
    ``gemma4_quant::post_attention_router`` instead: for one token the same kernel also
    computes the router's logits (one kernel, and one kernel boundary, fewer a layer;
    checked once per process against torch and the float32 product); more tokens run
    the norms' kernel and that patch's op.

    Across layers: where ``Gemma4Model.forward`` hands a layer's second output (the
    residual, None in Gemma 4) only to the next layer's call and to the final norm (the
    lines this module knows), ``Gemma4Model.__init__`` is wrapped too and links each
    layer that takes the ops to the next one in this process's share of the model that
    takes them: its end-of-layer op, given that layer's input norm's weight, also computes
    that layer's input norm and hands it on as the residual, and that layer skips its own
    input norm. The last layer hands on None. While EAGLE-3 keeps hidden states
    (``aux_hidden_state_layers``, which adds the residual to them), no layer hands one on.

    ``auto`` takes it on no GPU yet: the kernels alone are faster, the end-to-end decode
    is not measured (``GEMMA4_QUANT_FAST_DECODE=force`` takes it on any CUDA GPU).

Upstream PR:
    None. Inductor's persistent-reduction limit (or a fused-norm pass in vLLM's compile
    passes for rows this wide) would remove it.

Releases:
    Every release whose ``Gemma4DecoderLayer.forward`` and ``Gemma4Router.forward`` are
    statement for statement the ones this module knows (read: 0.26.0, whose experts are
    ``self.moe``, and 0.32.0 - 0.34.0, ``self.experts``); the links where
    ``Gemma4Model.forward``'s residual lines are the known ones too (the same releases);
    detected from the code, never the version.

Removal:
    When torch.compile's kernel for these norms is as fast (bench/norm_block.py
    ``--cold`` measures both).
"""

from __future__ import annotations

import ast
import copy
import re
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

from .. import envs, vllm_code
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

NAME = "norm_blocks"
SUMMARY = (
    "decode: the norms after attention, and those at the end of a layer, in one Triton "
    "kernel each (forced only, until measured end to end)"
)

_MODEL = "model_executor/models/gemma4.py"
MODEL_MODULE = "vllm.model_executor.models.gemma4"
_MARK = "__gemma4_quant_norm_blocks__"
_FLAG = "_gemma4_quant_norm_blocks"
# set by ffn_streams on the layers whose dense MLP and experts it makes one op: their key
STREAMS_FLAG = "_gemma4_quant_ffn_streams"
OP = "post_attention_norms"
ROUTER_OP = "post_attention_router"
END_OP = "end_of_layer_norms"
# on a layer that takes the ops: where ``router_decode`` took its router's projection, that
# projection's key, and one token's router logits come from the post-attention kernel
ROUTER_FLAG = "_gemma4_quant_norm_blocks_router"
# on a layer whose next layer (in this process's share of the model) takes the ops too: that
# layer's input norm, which this layer's end-of-layer op computes (see ``link_layers``)
_NEXT = "_gemma4_quant_norm_blocks_next"
# GPUs (compute capability) where ``auto`` takes it: measured faster end to end; none yet
MEASURED: frozenset[tuple[int, int]] = frozenset()
# rounded the same way as vLLM's eager norms; only the order of a float32 sum differs
CHECK_TOLERANCE = 1e-2

# Gemma4DecoderLayer.forward, asserts left out; {experts}: the MoE block's attribute
_LAYER_FORWARD = """\
residual = hidden_states
hidden_states = self.input_layernorm(residual)
hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states, **kwargs)
hidden_states = self.post_attention_layernorm(hidden_states)
hidden_states = hidden_states + residual
residual = hidden_states
hidden_states = self.pre_feedforward_layernorm(hidden_states)
hidden_states = self.mlp(hidden_states)
if self.enable_moe_block:
    hidden_states_1 = self.post_feedforward_layernorm_1(hidden_states)
    hidden_states_2 = self.pre_feedforward_layernorm_2(residual)
    router_logits = self.router(residual)
    hidden_states_2 = self.{experts}(hidden_states_2, router_logits)
    hidden_states_2 = self.post_feedforward_layernorm_2(hidden_states_2)
    hidden_states = hidden_states_1 + hidden_states_2
hidden_states = self.post_feedforward_layernorm(hidden_states)
hidden_states = hidden_states + residual
if per_layer_input is not None and self.per_layer_input_gate is not None:
    gate = self.per_layer_input_gate(hidden_states)
    gate = torch.nn.functional.gelu(gate, approximate='tanh')
    gated_per_layer = gate * per_layer_input
    per_layer_contribution = self.per_layer_projection(gated_per_layer)
    per_layer_contribution = self.post_per_layer_input_norm(per_layer_contribution)
    hidden_states = hidden_states + per_layer_contribution
hidden_states = hidden_states * self.layer_scalar
return (hidden_states, None)"""
_ROUTER_FORWARD = """\
x = self.norm(x)
x = x * self.root_size.to(x.dtype)
x = x * self.scale.to(x.dtype)
router_logits, _ = self.proj(x)
return router_logits"""


# Gemma4Model.forward's lines that touch the residual between layers: a layer's second output
# goes to the next layer's call only, or, after the last layer, to the final norm (and to
# EAGLE-3's hidden states, which ``_forward`` leaves alone)
_MODEL_RESIDUAL = (
    "residual = None",
    "aux_hidden_states = self._maybe_add_hidden_state([], 0, hidden_states, residual)",
    "hidden_states, residual = layer(positions, hidden_states, residual, "
    "per_layer_input=layer_per_input, **kwargs)",
    "self._maybe_add_hidden_state(aux_hidden_states, layer_idx + 1, hidden_states, residual)",
    "if residual is None:",
    "hidden_states, _ = self.norm(hidden_states, residual)",
)


def _body(function: ast.FunctionDef) -> str:
    """The function's statements, docstring and asserts left out, as ``ast.unparse``
    writes them."""

    class NoAsserts(ast.NodeTransformer):
        def visit_Assert(self, node: ast.Assert) -> None:  # noqa: N802
            return None

    statements = copy.deepcopy(function.body)  # the parsed tree is cached and shared
    if statements and isinstance(statements[0], ast.Expr):
        if isinstance(statements[0].value, ast.Constant):
            statements = statements[1:]
    kept = [NoAsserts().visit(s) for s in statements]
    return "\n".join(ast.unparse(s) for s in kept if s is not None)


def experts_attribute(text: str | None) -> str | None:
    """The MoE block's attribute (``moe`` or ``experts``) where both forwards are the
    ones this patch knows; None otherwise."""
    layer = vllm_code.find_function(text, "Gemma4DecoderLayer.forward")
    router = vllm_code.find_function(text, "Gemma4Router.forward")
    if layer is None or router is None or _body(router) != _ROUTER_FORWARD:
        return None
    body = _body(layer)
    return next((a for a in ("moe", "experts") if body == _LAYER_FORWARD.format(experts=a)), None)


# _run_decoder_layers (the KV-sharing fast prefill's loop over a share of the layers): the
# same hand-on, and the last layer's second output dropped
_SLICE_RESIDUAL = (
    "residual = None",
    "hidden_states, residual = layer(positions, hidden_states, residual, "
    "per_layer_input=layer_per_input, **kwargs)",
)


def _residual_lines(function: ast.FunctionDef) -> tuple[str, ...]:
    lines = [line.strip() for line in _body(function).splitlines()]
    return tuple(line for line in lines if re.search(r"\bresidual\b", line))


def chains_layers(text: str | None) -> bool:
    """Whether ``Gemma4Model.forward`` (and the fast prefill's loop, where there is one)
    passes a layer's second output to the next layer and nowhere else that a normed row
    would change (the lines this patch knows)."""
    model = vllm_code.find_function(text, "Gemma4Model.forward")
    if model is None or _residual_lines(model) != _MODEL_RESIDUAL:
        return False
    loop = vllm_code.find_function(text, "_run_decoder_layers")
    return loop is None or _residual_lines(loop) == _SLICE_RESIDUAL


def detect() -> Detection:
    experts = experts_attribute(vllm_source(_MODEL))
    if experts is None:
        return Detection.unrecognized(
            "Gemma4DecoderLayer.forward or Gemma4Router.forward is not the one this patch knows"
        )
    off = switched_off("vLLM's forward", "the kernel is", bool(MEASURED), what="GPU")
    if off is not None:
        return off
    return Detection.needed(
        "Gemma4DecoderLayer.forward recognized: the norms after attention and those at the "
        "end of the layer take one Triton kernel each (decided per layer when the model is "
        "built)",
        findings=experts,
    )


def apply(detection: Detection) -> None:
    experts = detection.findings
    chain = chains_layers(vllm_source(_MODEL))
    when_imported(MODEL_MODULE, lambda module: patch_model(module, experts, chain))


def decide_at_init(module: ModuleType, mark: str, flag: str, decide: Any) -> None:
    """``Gemma4DecoderLayer.__init__`` wrapped once more (``mark``): after it, the layer's
    ``flag`` holds ``decide(layer, mode)`` on CUDA builds, None elsewhere."""

    def make_init(original: Any) -> Any:
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
            original(self, *args, **kwargs)
            from vllm.platforms import current_platform

            value = None
            if current_platform.is_cuda():
                value = decide(self, envs.fast_decode_mode())
            setattr(self, flag, value)

        return __init__

    wrap_once(module.Gemma4DecoderLayer, "__init__", mark, make_init)


def patch_model(module: ModuleType, experts: str, chain: bool = False) -> None:
    decide_at_init(module, _MARK, _FLAG, lambda layer, mode: decide(layer, mode, "cuda"))
    if chain:

        def make_model_init(original: Any) -> Any:
            def __init__(self, *args: Any, **kwargs: Any) -> None:  # noqa: N807
                original(self, *args, **kwargs)
                link_layers(self)

            return __init__

        wrap_once(module.Gemma4Model, "__init__", _MARK, make_model_init)

    def make_forward(original: Any) -> Any:
        def forward(
            self,
            positions: torch.Tensor,
            hidden_states: torch.Tensor,
            residual: torch.Tensor | None,
            per_layer_input: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> tuple[torch.Tensor, None]:
            root = getattr(self, _FLAG, None)
            if root is None or per_layer_input is not None:
                return original(self, positions, hidden_states, residual, per_layer_input,
                                **kwargs)  # fmt: skip
            # residual: None, or this layer's normed input from the layer before (linked)
            return _forward(self, experts, root, positions, hidden_states, residual, **kwargs)

        return forward

    wrap_once(module.Gemma4DecoderLayer, "forward", _MARK, make_forward)


class _Next:
    """The next layer's input norm, and the model, whose EAGLE-3 layers (set after it is
    built) read every layer's second output. A plain object, so that neither registers as
    a submodule of the layer."""

    def __init__(self, model: Any, norm: Any) -> None:
        self.model = model
        self.norm = norm


def link_layers(model: Any) -> None:
    """Each layer the ops take whose next layer in this process's share of the model
    (pipeline parallel: ``start_layer`` to ``end_layer``) takes them too computes that
    layer's input norm in its end-of-layer op and hands it on as its second output (the
    residual vLLM's loop passes on); the last layer hands on None, for the final norm."""
    layers = list(getattr(model, "layers", ()))
    share = layers[getattr(model, "start_layer", 0) : getattr(model, "end_layer", len(layers))]
    links = 0
    for layer, following in zip(share, share[1:], strict=False):
        if getattr(layer, _FLAG, None) is not None and getattr(following, _FLAG, None) is not None:
            setattr(layer, _NEXT, _Next(model, following.input_layernorm))
            links += 1
    if links:
        info_once(
            f"{NAME}-links",
            "gemma4_quant: norm_blocks: %d of Gemma 4's layers compute the next layer's input "
            "norm in their end-of-layer kernel",
            links,
        )


def _forward(
    layer: Any,
    experts: str,
    root: float,
    positions: Any,
    hidden_states: Any,
    normed: Any = None,
    **kwargs: Any,
) -> Any:
    """vLLM's forward of a layer with its MoE block and no per-layer input, the norms
    after attention one op and those at the end another; ``root``: the router's
    ``root_size`` in the activations' dtype, read when the layer was built (a tensor's
    value read here would break the graph); ``normed``: the layer's input norm, computed
    by the layer before."""
    import torch

    residual = hidden_states
    if normed is None:
        hidden_states = layer.input_layernorm(residual)
    else:
        hidden_states = normed
    hidden_states = layer.self_attn(positions=positions, hidden_states=hidden_states, **kwargs)
    router = layer.router
    norms = (
        hidden_states,
        residual,
        layer.post_attention_layernorm.weight,
        layer.pre_feedforward_layernorm.weight,
        layer.pre_feedforward_layernorm_2.weight,
        router.scale,
    )
    eps = layer.post_attention_layernorm.variance_epsilon
    # the router's input, or (ROUTER_FLAG) its logits
    fused = getattr(layer, ROUTER_FLAG, None)
    if fused is None:
        residual, dense_in, experts_in, routing = getattr(torch.ops.gemma4_quant, OP)(
            *norms, root, eps
        )
    else:
        residual, dense_in, experts_in, routing = getattr(torch.ops.gemma4_quant, ROUTER_OP)(
            *norms, router.proj.weight, root, eps, fused
        )
    key = getattr(layer, STREAMS_FLAG, None)
    if key is None:
        dense_out = layer.mlp(dense_in)
        experts_out = getattr(layer, experts)(experts_in, router_logits(layer, routing))
    else:  # ffn_streams: the same modules in one op, the dense MLP on a second stream
        dense_out, experts_out = torch.ops.gemma4_quant.ffn_pair(dense_in, experts_in, routing, key)
    end = (
        dense_out,
        experts_out,
        residual,
        layer.post_feedforward_layernorm_1.weight,
        layer.post_feedforward_layernorm_2.weight,
        layer.post_feedforward_layernorm.weight,
        layer.layer_scalar,
    )
    following = getattr(layer, _NEXT, None)
    if following is not None and getattr(following.model, "aux_hidden_state_layers", ()):
        following = None  # EAGLE-3 adds the second output to the hidden states it keeps
    w_next = None if following is None else following.norm.weight
    hidden_states, normed = getattr(torch.ops.gemma4_quant, END_OP)(*end, w_next, eps)
    return hidden_states, None if following is None else normed


def router_logits(layer: Any, routing: Any) -> Any:
    """The router's logits from what the post-attention op gave for it: the logits
    themselves where its kernel computes them (``ROUTER_FLAG``), else the router's input,
    through the router's projection."""
    if getattr(layer, ROUTER_FLAG, None) is not None:
        return routing
    return layer.router.proj(routing)[0]


# the layer's weighted norms the ops compute: after attention, at the end, and (from the
# layer before, when linked) its input norm
NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
         "pre_feedforward_layernorm_2", "post_feedforward_layernorm_1",
         "post_feedforward_layernorm_2", "post_feedforward_layernorm")  # fmt: skip


def eligible(layer: Any) -> bool:
    """A layer with its MoE block and router, no per-layer input, bf16 weighted norms
    sharing one epsilon, the router's weightless norm with that epsilon, and a bf16 layer
    scalar of one value."""
    import torch

    if not getattr(layer, "enable_moe_block", False):
        return False
    if getattr(layer, "per_layer_input_gate", None) is not None:
        return False
    router = getattr(layer, "router", None)
    norms = [getattr(layer, n, None) for n in NORMS]
    scalar = getattr(layer, "layer_scalar", None)
    if router is None or any(n is None for n in norms):
        return False
    eps = {getattr(n, "variance_epsilon", None) for n in [*norms, getattr(router, "norm", None)]}
    hidden = layer.hidden_size
    vectors = [n.weight for n in norms] + [getattr(router, "scale", None)]
    return (
        isinstance(scalar, torch.Tensor)
        and scalar.shape == (1,)
        and scalar.dtype == torch.bfloat16
        and len(eps) == 1
        and None not in eps
        and all(getattr(n, "has_weight", True) for n in norms)
        and all(getattr(n, "variance_size_override", None) is None for n in norms)
        and all(
            isinstance(v, torch.Tensor) and v.shape == (hidden,) and v.dtype == torch.bfloat16
            for v in vectors
        )
    )


def decide(layer: Any, mode: str, device: str) -> float | None:
    """The router's ``root_size`` in bf16 where ``layer`` takes the op (registered then);
    None where it keeps vLLM's forward."""
    import torch

    if mode == "off" or not eligible(layer):
        return None
    if mode != "force" and torch.cuda.get_device_capability() not in MEASURED:
        return None
    try:
        root = float(layer.router.root_size.detach().to("cpu", torch.bfloat16).item())
    except (AttributeError, RuntimeError, NotImplementedError):  # no buffer, or no data
        return None
    eps = layer.post_attention_layernorm.variance_epsilon
    if not kernel_works(layer.hidden_size, eps, device):
        return None
    register_op()
    where = cuda_device() if device == "cuda" else "the CPU (Triton's interpreter)"
    info_once(
        NAME,
        "gemma4_quant: norm_blocks: Gemma 4's norms after attention and at the end of a layer "
        "take one Triton kernel each on %s",
        where,
    )
    fused = fused_router(layer, eps, device)
    setattr(layer, ROUTER_FLAG, fused)
    if fused is not None:
        info_once(
            f"{NAME}-router",
            "gemma4_quant: norm_blocks: for one token the kernel after attention also "
            "computes Gemma 4's router logits on %s",
            where,
        )
    return root


def fused_router(layer: Any, eps: float, device: str) -> int | None:
    """``router_decode``'s key of the layer's router projection where that patch took it
    (an unquantized bf16 [E, H] weight, float32 logits, not split) and the post-attention
    kernel computes its logits right here; None otherwise (the projection stays a kernel
    of its own)."""
    from .router_decode import FLAG as ROUTER_DECODE_FLAG

    proj = getattr(getattr(layer, "router", None), "proj", None)
    key = getattr(proj, ROUTER_DECODE_FLAG, None)
    if key is None:
        return None
    experts, hidden = proj.weight.shape
    return key if router_kernel_works(hidden, experts, eps, device) else None


_checked: dict[tuple, bool] = {}


def kernel_works(hidden: int, eps: float, device: str) -> bool:
    """One token through the kernel at this width, once per process, against the same
    norms in torch: a Triton that cannot compile it, or a GPU where it computes wrong,
    leaves vLLM's forward, with one warning."""
    key = (hidden, eps, device)
    if key not in _checked:
        _checked[key] = _check(hidden, eps, device)
    return _checked[key]


def router_kernel_works(hidden: int, experts: int, eps: float, device: str) -> bool:
    """The post-attention kernel with the router's projection, checked as ``kernel_works``
    checks the others: against the same norms in torch and the float32 product."""
    key = ("router", hidden, experts, eps, device)
    if key not in _checked:
        _checked[key] = _check_router(hidden, experts, eps, device)
    return _checked[key]


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    import torch

    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference(o, residual, w_post, w_ff, w_ff2, scale, root: float, eps: float):  # noqa: ANN001, ANN201
    """The post-attention op's four outputs in torch, with vLLM's eager roundings."""
    import torch

    h = _rms(o, eps) * w_post + residual
    hn = _rms(h, eps)
    router = hn * torch.tensor(root, dtype=h.dtype, device=h.device) * scale
    return h, hn * w_ff, hn * w_ff2, router


def end_reference(dense, experts, residual, w1, w2, w, scalar, eps: float):  # noqa: ANN001, ANN201
    """The end-of-layer op's output in torch, with vLLM's eager roundings."""
    both = _rms(dense, eps) * w1 + _rms(experts, eps) * w2
    return (_rms(both, eps) * w + residual) * scalar


class _Random:
    """The checks' random bf16 inputs, CPU tensors: vLLM builds the model (and so runs the
    checks) under a default device of its own."""

    def __init__(self, hidden: int, seed: int) -> None:
        import torch

        self.hidden = hidden
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        # the router's root_size as vLLM holds it
        self.root = torch.tensor(hidden**-0.5, device="cpu").bfloat16().item()

    def rows(self, scale: float, count: int, height: int = 1) -> list[torch.Tensor]:
        import torch

        return [(torch.randn(height, self.hidden, generator=self.gen, device="cpu") * scale)
                .bfloat16() for _ in range(count)]  # fmt: skip

    def vectors(self, count: int) -> list[torch.Tensor]:
        import torch

        return [(1 + 0.3 * torch.randn(self.hidden, generator=self.gen, device="cpu")).bfloat16()
                for _ in range(count)]  # fmt: skip


def _check(hidden: int, eps: float, device: str) -> bool:
    import torch

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from ..kernels import norm_blocks as kernels

        rand = _Random(hidden, 0)
        o, residual = rand.rows(4, 1) + rand.rows(20, 1)
        post = rand.vectors(4)
        root = rand.root
        dense, experts = rand.rows(3, 2)
        end = rand.vectors(3) + [torch.tensor([1.5], device="cpu").bfloat16()]
        (w_next,) = rand.vectors(1)
        y = end_reference(dense, experts, residual, *end, eps)
        want = [*reference(o, residual, *post, root, eps), y, y, _rms(y, eps) * w_next]

        def on(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.to(device) for t in tensors]

        got = [*kernels.post_attention_norms(*on([o, residual, *post]), root, eps),
               kernels.end_of_layer_norms(*on([dense, experts, residual, *end]), eps)[0],
               *kernels.end_of_layer_norms(*on([dense, experts, residual, *end]), eps,
                                           w_next.to(device))]  # fmt: skip
        return torch.cat([g.cpu() for g in got]), torch.cat(want)

    return one_token_agrees(
        NAME, compute, CHECK_TOLERANCE, f"torch's norms at hidden {hidden}",
        "Gemma 4's decoder layers keep vLLM's forward",
    )  # fmt: skip


def _check_router(hidden: int, experts: int, eps: float, device: str) -> bool:
    import torch

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        from ..kernels.norm_blocks import post_attention_router

        rand = _Random(hidden, 1)
        o, residual = rand.rows(4, 1) + rand.rows(20, 1)
        vectors = rand.vectors(4)
        (weight,) = rand.rows(hidden**-0.5, 1, height=experts)
        root = rand.root
        *rows, router_in = reference(o, residual, *vectors, root, eps)
        want = [*rows, router_in.float() @ weight.float().T]
        got = post_attention_router(*(t.to(device) for t in (o, residual, *vectors, weight)),
                                    root, eps)  # fmt: skip

        # each output to its reference's scale: the logits count as much as the rows
        def scaled(tensors: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat([t.cpu().float().flatten() / w.float().norm()
                              for t, w in zip(tensors, want, strict=True)])  # fmt: skip

        return scaled(list(got)), scaled(want)

    return one_token_agrees(
        NAME, compute, CHECK_TOLERANCE,
        f"torch's norms and the float32 router product at hidden {hidden}, {experts} experts",
        "Gemma 4's router keeps its own projection kernel",
    )  # fmt: skip


def register_op() -> None:
    """``torch.ops.gemma4_quant.post_attention_norms``, ``post_attention_router`` and
    ``end_of_layer_norms``."""
    import torch

    def post_attention_norms(
        o: torch.Tensor,
        residual: torch.Tensor,
        w_post: torch.Tensor,
        w_ff: torch.Tensor,
        w_ff2: torch.Tensor,
        scale: torch.Tensor,
        root: float,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..kernels.norm_blocks import post_attention_norms as kernel

        return kernel(o.contiguous(), residual.contiguous(), w_post, w_ff, w_ff2, scale, root,
                      eps)  # fmt: skip

    def fake(o, residual, w_post, w_ff, w_ff2, scale, root, eps):  # noqa: ANN001, ANN202
        return tuple(torch.empty_like(o) for _ in range(4))

    define_op(
        OP,
        "(Tensor o, Tensor residual, Tensor w_post, Tensor w_ff, Tensor w_ff2, Tensor scale, "
        "float root, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
        post_attention_norms,
        fake,
    )

    def post_attention_router(
        o: torch.Tensor,
        residual: torch.Tensor,
        w_post: torch.Tensor,
        w_ff: torch.Tensor,
        w_ff2: torch.Tensor,
        scale: torch.Tensor,
        router_w: torch.Tensor,
        root: float,
        eps: float,
        key: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        from ..kernels import norm_blocks as kernels

        o, residual = o.contiguous(), residual.contiguous()
        if o.shape[0] == 1:
            return kernels.post_attention_router(o, residual, w_post, w_ff, w_ff2, scale,
                                                 router_w, root, eps)  # fmt: skip
        # more tokens: the norms' kernel, then the projection as router_decode runs it (its
        # op gives them vLLM's)
        *rows, router_in = kernels.post_attention_norms(o, residual, w_post, w_ff, w_ff2,
                                                        scale, root, eps)  # fmt: skip
        return (*rows, torch.ops.gemma4_quant.router_proj(router_in, router_w, key))

    def router_fake(o, residual, w_post, w_ff, w_ff2, scale, router_w, root, eps, key):  # noqa: ANN001, ANN202
        logits = o.new_empty((o.shape[0], router_w.shape[0]), dtype=torch.float32)
        return (*(torch.empty_like(o) for _ in range(3)), logits)

    define_op(
        ROUTER_OP,
        "(Tensor o, Tensor residual, Tensor w_post, Tensor w_ff, Tensor w_ff2, Tensor scale, "
        "Tensor router_w, float root, float eps, int key) -> (Tensor, Tensor, Tensor, Tensor)",
        post_attention_router,
        router_fake,
    )

    def end_of_layer_norms(
        dense: torch.Tensor,
        experts: torch.Tensor,
        residual: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        w: torch.Tensor,
        scalar: torch.Tensor,
        w_next: torch.Tensor | None,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ..kernels.norm_blocks import end_of_layer_norms as kernel

        y, normed = kernel(dense.contiguous(), experts.contiguous(), residual.contiguous(), w1,
                           w2, w, scalar, eps, w_next)  # fmt: skip
        return y, normed if normed is not None else y.new_empty(0)  # no next layer's input

    def end_fake(dense, experts, residual, w1, w2, w, scalar, w_next, eps):  # noqa: ANN001, ANN202
        return torch.empty_like(dense), (
            torch.empty_like(dense) if w_next is not None else dense.new_empty(0)
        )

    define_op(
        END_OP,
        "(Tensor dense, Tensor experts, Tensor residual, Tensor w1, Tensor w2, Tensor w, "
        "Tensor scalar, Tensor? w_next, float eps) -> (Tensor, Tensor)",
        end_of_layer_norms,
        end_fake,
    )


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows that decides whether it loads: the path changes speed.
    return ()

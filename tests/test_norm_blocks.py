"""The post-attention norms in one kernel (``gemma4_quant.kernels.norm_blocks``) against
vLLM's own modules run eagerly: ``RMSNorm.forward_native`` for the post-attention norm and
both pre-feed-forward norms, and ``Gemma4Router.forward``'s weightless norm and scalings;
the end of a layer (both post-feed-forward norms, their sum, the last norm, the residual
and the layer scalar) in another, the same way.

Runs Triton's interpreter on CPU (``TRITON_INTERPRET=1``); speed is
``bench/norm_block.py``'s, on a GPU. Skips where Triton is not installed.
"""

from __future__ import annotations

import pytest
from triton_env import DEVICE, need_triton

torch = need_triton()

from gemma4_quant.kernels.norm_blocks import (  # noqa: E402
    end_of_layer_norms,
    post_attention_norms,
    post_attention_router,
)

EPS = 1e-6


def _vectors(hidden: int, gen) -> list:
    return [(1 + 0.3 * torch.randn(hidden, generator=gen)).to(torch.bfloat16) for _ in range(4)]


def vllm_eager(o, residual, w_post, w_ff, w_ff2, scale):
    """The decoder layer's statements between attention and the feed-forward blocks, with
    vLLM's RMSNorm modules (eager) and the router's scalings as ``Gemma4Router.forward``."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    hidden = o.shape[-1]
    with set_current_vllm_config(VllmConfig()):
        norms = [RMSNorm(hidden, eps=EPS) for _ in range(3)]
        router_norm = RMSNorm(hidden, eps=EPS, has_weight=False)
    for norm, w in zip(norms, (w_post, w_ff, w_ff2), strict=True):
        norm.weight.data = w.clone()
    h = norms[0].forward_native(o) + residual
    root = torch.tensor(hidden**-0.5)
    router = router_norm.forward_native(h) * root.to(h.dtype) * scale.to(h.dtype)
    return h, norms[1].forward_native(h), norms[2].forward_native(h), router


@pytest.mark.parametrize(
    ("tokens", "hidden"),
    [(1, 2816), (3, 2816), (2, 200), (0, 2816)],  # 26B-A4B; a width no power of two divides
)
def test_matches_vllms_modules(tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(tokens * 7 + hidden)
    o = (torch.randn(tokens, hidden, generator=gen) * 4).to(torch.bfloat16)
    residual = (torch.randn(tokens, hidden, generator=gen) * 20).to(torch.bfloat16)
    vectors = _vectors(hidden, gen)
    want = vllm_eager(o, residual, *vectors)
    root = torch.tensor(hidden**-0.5).to(torch.bfloat16).item()
    got = post_attention_norms(
        o.to(DEVICE), residual.to(DEVICE), *(v.to(DEVICE) for v in vectors), root, EPS
    )
    for name, g, w in zip(("h", "dense input", "experts' input", "router input"), got, want,
                          strict=True):  # fmt: skip
        g = g.cpu()
        assert g.dtype == torch.bfloat16 and g.shape == w.shape, name
        if not tokens:
            continue
        # only the float32 sum of squares is ordered differently: a few values one bf16
        # step apart, never more
        step = w.float().abs().clamp_min(1e-30) * 2.0**-7
        assert ((g.float() - w.float()).abs() <= step).all(), name
        assert (g != w).float().mean().item() < 0.01, name


@pytest.mark.parametrize(
    ("tokens", "hidden", "experts"),
    [(1, 2816, 128), (2, 200, 7), (0, 2816, 128)],  # 26B-A4B; odd widths and expert counts
)
def test_post_attention_router_matches(tokens: int, hidden: int, experts: int) -> None:
    """The kernel with the router's projection: the rows of ``post_attention_norms`` bit for
    bit, and logits equal to the float32 product of vLLM's router input and the weight up
    to the order of the sum."""
    gen = torch.Generator().manual_seed(tokens * 3 + hidden + experts)
    o = (torch.randn(tokens, hidden, generator=gen) * 4).to(torch.bfloat16)
    residual = (torch.randn(tokens, hidden, generator=gen) * 20).to(torch.bfloat16)
    vectors = _vectors(hidden, gen)
    weight = (torch.randn(experts, hidden, generator=gen) / hidden**0.5).to(torch.bfloat16)
    root = torch.tensor(hidden**-0.5).to(torch.bfloat16).item()
    on = [t.to(DEVICE) for t in (o, residual, *vectors)]
    *rows, logits = post_attention_router(*on, weight.to(DEVICE), root, EPS)
    for got, want in zip(rows, post_attention_norms(*on, root, EPS)[:3], strict=True):
        assert torch.equal(got, want)
    assert logits.dtype == torch.float32 and tuple(logits.shape) == (tokens, experts)
    if not tokens:
        return
    want = vllm_eager(o, residual, *vectors)[3].float() @ weight.float().T
    logits = logits.cpu()
    assert ((logits - want).norm() / want.norm()).item() < 1e-5
    # the rows of another expert: the test bites
    shifted = want.roll(1, dims=-1)
    assert ((logits - shifted).norm() / want.norm()).item() > 0.5


def vllm_eager_end(dense, experts, residual, w1, w2, w, scalar):
    """The decoder layer's statements after its feed-forward blocks, with vLLM's RMSNorm
    modules (eager)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    hidden = dense.shape[-1]
    with set_current_vllm_config(VllmConfig()):
        norms = [RMSNorm(hidden, eps=EPS) for _ in range(3)]
    for norm, weight in zip(norms, (w1, w2, w), strict=True):
        norm.weight.data = weight.clone()
    both = norms[0].forward_native(dense) + norms[1].forward_native(experts)
    return (norms[2].forward_native(both) + residual) * scalar


@pytest.mark.parametrize(("tokens", "hidden"), [(1, 2816), (3, 2816), (2, 200), (0, 2816)])
def test_end_of_layer_matches_vllms_modules(tokens: int, hidden: int) -> None:
    gen = torch.Generator().manual_seed(tokens * 5 + hidden)
    dense, experts = (torch.randn(2, tokens, hidden, generator=gen) * 3).to(torch.bfloat16)
    residual = (torch.randn(tokens, hidden, generator=gen) * 20).to(torch.bfloat16)
    vectors = _vectors(hidden, gen)[:3]
    scalar = torch.tensor([0.7]).to(torch.bfloat16)
    want = vllm_eager_end(dense, experts, residual, *vectors, scalar)
    got, no_next = end_of_layer_norms(
        *(t.to(DEVICE) for t in (dense, experts, residual, *vectors, scalar)), EPS
    )
    got = got.cpu()
    assert no_next is None
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    if not tokens:
        return
    step = want.float().abs().clamp_min(1e-30) * 2.0**-7
    assert ((got.float() - want.float()).abs() <= step).all()
    assert (got != want).float().mean().item() < 0.01
    # the two blocks' norms swapped: the test bites
    swapped = vllm_eager_end(dense, experts, residual, vectors[1], vectors[0], vectors[2], scalar)
    assert (got != swapped).float().mean().item() > 0.5
    # with the next layer's input norm: the same output, and that norm of it
    w_next = _vectors(hidden, gen)[0]
    chained, normed = end_of_layer_norms(
        *(t.to(DEVICE) for t in (dense, experts, residual, *vectors, scalar)),
        EPS,
        w_next.to(DEVICE),
    )
    assert torch.equal(chained.cpu(), got)
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(hidden, eps=EPS)
    norm.weight.data = w_next.clone()
    want_next = norm.forward_native(got)
    assert (
        (normed.cpu().float() - want_next.float()).abs() <= want_next.float().abs() * 2.0**-7
    ).all()
    assert (normed.cpu() != want_next).float().mean().item() < 0.01


def test_rejects_mismatched_shapes() -> None:
    o = torch.zeros(1, 64, dtype=torch.bfloat16, device=DEVICE)
    v = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    with pytest.raises(ValueError, match="w_ff2 \\(32,\\) must be a contiguous \\[64\\]"):
        post_attention_norms(o, o, v, v, v[:32], v, 0.125, EPS)
    with pytest.raises(ValueError, match="residual must be bf16 like o"):
        post_attention_norms(o, o.float(), v, v, v, v, 0.125, EPS)
    with pytest.raises(ValueError, match="scalar \\(64,\\) must be a contiguous \\[1\\]"):
        end_of_layer_norms(o, o, o, v, v, v, v, EPS)
    with pytest.raises(ValueError, match="experts \\(2, 64\\) must be a contiguous \\[1, 64\\]"):
        end_of_layer_norms(o, torch.cat([o, o]), o, v, v, v, v[:1], EPS)


# ------------------------------------------------------------ the norm_blocks patch


def test_the_forwards_are_recognized_and_edits_are_not() -> None:
    from gemma4_quant.patches import norm_blocks, vllm_source

    text = vllm_source(norm_blocks._MODEL)
    assert norm_blocks.experts_attribute(text) in ("moe", "experts")
    for old, new in [
        ("hidden_states = hidden_states + residual", "hidden_states = residual + hidden_states"),
        ("x = x * self.scale.to(x.dtype)", "x = x * self.scale"),
        ("hidden_states = self.post_attention_layernorm(hidden_states)", "pass"),
    ]:
        edited = text.replace(old, new, 1)
        assert edited != text and norm_blocks.experts_attribute(edited) is None, old


@pytest.mark.parametrize("name", ["norm_blocks", "ffn_streams"])
def test_detection(monkeypatch, name: str) -> None:
    """Nothing to do on vLLM's CPU build; on a CUDA build ``auto`` takes no GPU yet (faster
    alone, not measured end to end), ``force`` takes it. ``ffn_streams`` reads the forwards
    ``norm_blocks`` reads."""
    import importlib

    from gemma4_quant.patches import Status, fast_decode

    patch = importlib.import_module(f"gemma4_quant.patches.{name}")
    monkeypatch.delenv("GEMMA4_QUANT_FAST_DECODE", raising=False)
    assert "CPU build" in patch.detect().reason
    monkeypatch.setattr(fast_decode, "_cpu_build", lambda: False)
    assert patch.MEASURED == frozenset()
    assert patch.detect().status is Status.NOT_NEEDED
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "force")
    detection = patch.detect()
    assert detection.status is Status.NEEDED and detection.findings in ("moe", "experts")


class AttentionOutput(torch.nn.Module):
    """In place of the layer's attention, which needs vLLM's forward context: a fixed
    function of its input, so that both forwards see the same attention output."""

    def forward(self, positions, hidden_states, **kwargs):  # noqa: ANN001, ANN201
        return hidden_states * 3 - 1


def stand_in_attention_and_move_norms(layer, monkeypatch, gen) -> None:  # noqa: ANN001
    """The layer's attention replaced by ``AttentionOutput``; its norms' weights, the
    router's scale and the layer scalar made far from one, so that a norm or a scaling
    applied wrongly shows."""
    from gemma4_quant.patches import norm_blocks

    # through the module dict: monkeypatch's undo of a submodule set as an attribute
    # deletes it, and the model is the whole module's
    monkeypatch.setitem(layer._modules, "self_attn", AttentionOutput())
    with torch.no_grad():
        for norm in norm_blocks.NORMS:
            weight = getattr(layer, norm).weight
            weight.copy_(1 + 0.5 * torch.randn(weight.shape, generator=gen))
        layer.router.scale.copy_(torch.rand(layer.router.scale.shape, generator=gen) + 0.5)
        layer.layer_scalar.fill_(0.3 + layer.layer_idx * 0.5)


def keep_router_weight(proj, monkeypatch, gen) -> None:  # noqa: ANN001
    """A random bf16 weight for the router's projection, dispatched to vLLM's CPU GEMM with
    the weight kept: vLLM's CPU build drops it after loading, and the kernels read it."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    experts, hidden = proj.output_size, proj.input_size
    weight = (torch.randn(experts, hidden, generator=gen) / hidden**0.5).bfloat16()
    monkeypatch.setitem(proj._parameters, "weight", torch.nn.Parameter(weight, False))
    monkeypatch.setattr(proj, "cpu_linear", proj.cpu_linear, raising=False)
    dispatch_cpu_unquantized_gemm(proj, remove_weight=False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """vLLM's own Gemma 4 MoE model (a tiny bf16 checkpoint, loaded by vLLM's loader),
    built as vLLM builds it on CPU."""
    from conftest import CheckpointFactory
    from load_model import vllm_model
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    checkpoint = CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))("bf16")
    with vllm_model(str(checkpoint)) as (model, loader, model_config):
        loader.load_weights(model, model_config)
        process_weights_after_loading(model, model_config, torch.device("cpu"))
        yield model, get_current_vllm_config()


@pytest.mark.parametrize(
    ("pair", "router"),
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["norm_blocks", "with-ffn_streams", "with-router", "with-both"],
)
def test_a_layer_gives_vllms_outputs(tiny_model, monkeypatch, pair: bool, router: bool) -> None:
    """Each MoE layer's forward with the op against vLLM's forward of the same layer, the
    norms' weights and the router's scale made far from one: the same residual stream.
    ``with-ffn_streams``: the dense MLP, the router and the experts as ``ffn_streams``' op
    too (one stream here: on CPU, as for more than one token on a GPU). ``with-router``:
    ``router_decode`` takes the router's projection, so one token's logits come from the
    kernel after attention (more tokens: that patch's op, vLLM's projection), against the
    same layer with the projection's own kernel."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from gemma4_quant.patches import (
        fast_decode,
        ffn_streams,
        norm_blocks,
        router_decode,
        vllm_source,
    )

    model, vllm_config = tiny_model
    monkeypatch.setattr(norm_blocks, "_checked", {})
    monkeypatch.setattr(ffn_streams, "_layers", {})
    monkeypatch.setattr(router_decode, "_layers", {})
    monkeypatch.setattr(router_decode, "_checked", {})
    experts = norm_blocks.experts_attribute(vllm_source(norm_blocks._MODEL))
    layers = [m for m in model.modules() if type(m).__name__ == "Gemma4DecoderLayer"]
    assert layers and all(norm_blocks.eligible(layer) for layer in layers)
    gen = torch.Generator().manual_seed(5)
    for layer in layers:
        stand_in_attention_and_move_norms(layer, monkeypatch, gen)
        keep_router_weight(layer.router.proj, monkeypatch, gen)
        hidden = layer.hidden_size
        inputs = [(torch.randn(tokens, hidden, generator=gen) * 2).bfloat16() for tokens in (1, 3)]
        with set_current_vllm_config(vllm_config), set_forward_context(None, vllm_config):
            wants = [type(layer).forward(layer, torch.arange(len(x)), x, None) for x in inputs]
        proj = layer.router.proj
        monkeypatch.setattr(proj, "forward", proj.forward, raising=False)
        monkeypatch.setattr(proj, router_decode.FLAG, None, raising=False)
        if router:  # as router_decode takes the projection when the router is built
            assert router_decode.decide(proj, "force", (9, 0), DEVICE)
        monkeypatch.setattr(layer, norm_blocks.ROUTER_FLAG, None, raising=False)
        root = norm_blocks.decide(layer, "force", DEVICE)
        assert root == torch.tensor(layer.hidden_size**-0.5).bfloat16().item()
        fused = getattr(layer, norm_blocks.ROUTER_FLAG)
        assert (fused is not None) == router
        if router:
            # against the same forward with the router's projection its own kernel
            # (router_decode's float32 logits, checked against vLLM's in its tests): vLLM's
            # CPU GEMM rounds the logits its own way on each CPU kind, which could pick
            # another expert where two logits nearly tie
            monkeypatch.setattr(layer, norm_blocks.ROUTER_FLAG, None)
            with set_current_vllm_config(vllm_config), set_forward_context(None, vllm_config):
                wants = [norm_blocks._forward(layer, experts, root, torch.arange(len(x)), x)
                         for x in inputs]  # fmt: skip
            monkeypatch.setattr(layer, norm_blocks.ROUTER_FLAG, fused)
        monkeypatch.setattr(layer, norm_blocks._FLAG, root, raising=False)
        # as fast_decode marks a dense MLP it takes (vLLM's own forward here on CPU)
        tiles = fast_decode.TILES[(9, 0)]
        monkeypatch.setattr(layer.mlp, fast_decode._FLAG, tiles, raising=False)
        key = ffn_streams.decide(layer, experts, "force", DEVICE) if pair else None
        assert (key is not None) == pair
        monkeypatch.setattr(layer, norm_blocks.STREAMS_FLAG, key, raising=False)
        for x, (want, none) in zip(inputs, wants, strict=True):
            tokens = len(x)
            with set_current_vllm_config(vllm_config), set_forward_context(None, vllm_config):
                got, also_none = norm_blocks._forward(layer, experts, root, torch.arange(tokens), x)
            assert none is None and also_none is None
            assert got.dtype == want.dtype and got.shape == want.shape
            error = ((got.float() - want.float()).norm() / want.float().norm()).item()
            # bit for bit here; a CPU that orders torch's float32 sum of squares
            # otherwise may move a few values one bf16 step
            assert error < 1e-2, (layer.layer_idx, tokens, error)


def test_the_model_loop_is_recognized_and_edits_are_not() -> None:
    from gemma4_quant.patches import norm_blocks, vllm_source

    text = vllm_source(norm_blocks._MODEL)
    assert norm_blocks.chains_layers(text)
    for old, new in [
        ("        residual = None\n        aux", "        residual = hidden_states\n        aux"),
        ("hidden_states, _ = self.norm(hidden_states, residual)",
         "hidden_states = self.norm(hidden_states + residual)"),
        ("layer_idx + 1, hidden_states, residual", "layer_idx + 1, hidden_states + residual, None"),
        ("    residual = None\n    for idx, layer",
         "    residual = hidden_states\n    for idx, layer"),  # the fast prefill's loop
    ]:  # fmt: skip
        edited = text.replace(old, new, 1)
        assert edited != text and not norm_blocks.chains_layers(edited), old
        assert norm_blocks.experts_attribute(edited), "the layer's forward is still known"


def test_linked_layers_give_vllms_model_output(tiny_model, monkeypatch) -> None:
    """vLLM's own ``Gemma4Model.forward`` over every layer, each with the ops and linked
    (a layer's end-of-layer op computes the next one's input norm and hands it on as the
    residual vLLM's loop passes), against the same model with vLLM's layer forward: the
    same output, and with EAGLE-3's hidden states on, the same hidden states too."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from gemma4_quant.patches import norm_blocks, vllm_source

    model, vllm_config = tiny_model
    monkeypatch.setattr(norm_blocks, "_checked", {})
    experts = norm_blocks.experts_attribute(vllm_source(norm_blocks._MODEL))
    inner = next(m for m in model.modules() if type(m).__name__ == "Gemma4Model")
    layers = list(inner.layers)
    assert len(layers) > 2
    gen = torch.Generator().manual_seed(9)
    roots = {}
    for layer in layers:
        stand_in_attention_and_move_norms(layer, monkeypatch, gen)
        roots[layer] = norm_blocks.decide(layer, "force", DEVICE)
    ids = torch.tensor([3, 17, 5, 9])
    positions = torch.arange(len(ids))

    def run() -> torch.Tensor:
        with (
            torch.no_grad(),
            set_current_vllm_config(vllm_config),
            set_forward_context(None, vllm_config),
        ):
            return inner(ids, positions, None)

    want = run()
    monkeypatch.setattr(inner, "aux_hidden_state_layers", (1, 2))
    want_aux = run()
    monkeypatch.setattr(inner, "aux_hidden_state_layers", ())

    def forward(self, positions, hidden_states, residual, per_layer_input=None, **kwargs):  # noqa: ANN001, ANN202
        return norm_blocks._forward(self, experts, roots[self], positions, hidden_states,
                                    residual, **kwargs)  # fmt: skip

    for layer in layers:
        monkeypatch.setattr(layer, norm_blocks._FLAG, roots[layer], raising=False)
        monkeypatch.setattr(layer, norm_blocks._NEXT, None, raising=False)
    monkeypatch.setattr(type(layers[0]), "forward", forward)
    assert torch.equal(run(), want), "unlinked"
    norm_blocks.link_layers(inner)
    linked = [getattr(layer, norm_blocks._NEXT) is not None for layer in layers]
    assert linked == [True] * (len(layers) - 1) + [False]
    got = run()
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    assert error < 1e-2, error  # bit for bit here, as for one layer
    monkeypatch.setattr(inner, "aux_hidden_state_layers", (1, 2))
    got_hidden, got_aux = run()
    assert torch.equal(got_hidden, got) and len(got_aux) == len(want_aux[1]) == 2
    for g, w in zip(got_aux, want_aux[1], strict=True):
        assert ((g.float() - w.float()).norm() / w.float().norm()).item() < 1e-2
    monkeypatch.setattr(inner, "aux_hidden_state_layers", ())
    # the test bites: a link to the wrong norm changes the output
    wrong = norm_blocks._Next(inner, layers[0].post_feedforward_layernorm)
    monkeypatch.setattr(layers[0], norm_blocks._NEXT, wrong)
    error = ((run().float() - want.float()).norm() / want.float().norm()).item()
    assert error > 0.05, error


def test_links_skip_layers_without_the_ops(tiny_model, monkeypatch) -> None:
    from gemma4_quant.patches import norm_blocks

    inner = next(m for m in tiny_model[0].modules() if type(m).__name__ == "Gemma4Model")
    layers = list(inner.layers)
    for index, layer in enumerate(layers):
        monkeypatch.setattr(layer, norm_blocks._FLAG, None if index == 1 else 0.0625,
                            raising=False)  # fmt: skip
        monkeypatch.setattr(layer, norm_blocks._NEXT, None, raising=False)
    norm_blocks.link_layers(inner)
    linked = [getattr(layer, norm_blocks._NEXT) is not None for layer in layers]
    assert linked == [False, False] + [True] * (len(layers) - 3) + [False]
    # pipeline parallel: only this process's share
    for layer in layers:
        monkeypatch.setattr(layer, norm_blocks._FLAG, 0.0625)
        monkeypatch.setattr(layer, norm_blocks._NEXT, None)
    monkeypatch.setattr(inner, "end_layer", 2)
    norm_blocks.link_layers(inner)
    assert [getattr(layer, norm_blocks._NEXT) is not None for layer in layers[:3]] == [
        True, False, False]  # fmt: skip


def test_layers_the_op_does_not_fit_keep_vllms_forward(tiny_model, monkeypatch) -> None:
    from gemma4_quant.patches import norm_blocks

    layer = next(m for m in tiny_model[0].modules() if type(m).__name__ == "Gemma4DecoderLayer")
    assert norm_blocks.decide(layer, "off", DEVICE) is None
    monkeypatch.setattr(layer, "enable_moe_block", False)
    assert not norm_blocks.eligible(layer)
    monkeypatch.setattr(layer, "enable_moe_block", True)
    monkeypatch.setattr(layer.pre_feedforward_layernorm_2, "variance_epsilon", 1e-5)
    assert not norm_blocks.eligible(layer), "the norms must share one epsilon"
    monkeypatch.setattr(layer.pre_feedforward_layernorm_2, "variance_epsilon",
                        layer.post_feedforward_layernorm.variance_epsilon)  # fmt: skip
    assert norm_blocks.eligible(layer)
    monkeypatch.setitem(layer._buffers, "layer_scalar", layer.layer_scalar.float())
    assert not norm_blocks.eligible(layer), "the layer scalar must be bf16"


def test_layers_ffn_streams_does_not_fit_keep_the_order(tiny_model, monkeypatch) -> None:
    """Only a layer ``norm_blocks`` took, with its dense MLP ``fast_decode``'s and whole on
    this GPU (a split one would all-reduce on the second stream), takes the pair; ``off``
    takes none."""
    from gemma4_quant.patches import fast_decode, ffn_streams, norm_blocks, vllm_source

    monkeypatch.setattr(ffn_streams, "_layers", {})
    experts = norm_blocks.experts_attribute(vllm_source(norm_blocks._MODEL))
    layer = next(m for m in tiny_model[0].modules() if type(m).__name__ == "Gemma4DecoderLayer")
    tiles = fast_decode.TILES[(9, 0)]
    monkeypatch.setattr(layer, norm_blocks._FLAG, None, raising=False)
    monkeypatch.setattr(layer.mlp, fast_decode._FLAG, tiles, raising=False)
    assert ffn_streams.decide(layer, experts, "force", DEVICE) is None
    monkeypatch.setattr(layer, norm_blocks._FLAG, 0.0625)
    assert ffn_streams.decide(layer, experts, "off", DEVICE) is None
    monkeypatch.setattr(layer.mlp, fast_decode._FLAG, None)
    assert ffn_streams.decide(layer, experts, "force", DEVICE) is None, "vLLM's own MLP"
    monkeypatch.setattr(layer.mlp, fast_decode._FLAG, tiles)
    monkeypatch.setattr(layer.mlp.down_proj, "tp_size", 2)
    assert ffn_streams.decide(layer, experts, "force", DEVICE) is None
    monkeypatch.setattr(layer.mlp.down_proj, "tp_size", 1)
    assert ffn_streams.decide(layer, experts, "force", DEVICE) == 0


def test_ffn_pair_traces_whole(tiny_model, monkeypatch) -> None:
    """torch.compile sees ``ffn_pair`` as one node and gives its eager values."""
    from vllm.config import set_current_vllm_config
    from vllm.forward_context import set_forward_context

    from gemma4_quant.patches import fast_decode, ffn_streams, norm_blocks, vllm_source

    model, vllm_config = tiny_model
    monkeypatch.setattr(ffn_streams, "_layers", {})
    experts = norm_blocks.experts_attribute(vllm_source(norm_blocks._MODEL))
    layer = next(m for m in model.modules() if type(m).__name__ == "Gemma4DecoderLayer")
    monkeypatch.setattr(layer, norm_blocks._FLAG, 0.0625, raising=False)
    monkeypatch.setattr(layer.mlp, fast_decode._FLAG, fast_decode.TILES[(9, 0)], raising=False)
    key = ffn_streams.decide(layer, experts, "force", DEVICE)
    op = torch.ops.gemma4_quant.ffn_pair
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, layer.hidden_size, generator=gen).bfloat16().to(DEVICE)

    def block(x: torch.Tensor) -> torch.Tensor:
        dense, routed = op(x, x * 2, x * 3, key)
        return dense + routed

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    with set_current_vllm_config(vllm_config), set_forward_context(None, vllm_config):
        assert torch.equal(compiled(x), block(x))


def test_a_kernel_that_computes_wrong_keeps_vllms_forward(monkeypatch, caplog) -> None:
    from gemma4_quant.patches import norm_blocks

    monkeypatch.setattr(norm_blocks, "_checked", {})
    right = norm_blocks.reference
    monkeypatch.setattr(norm_blocks, "reference", lambda *a: [t * 0 for t in right(*a)])
    with caplog.at_level("WARNING", logger="vllm.gemma4_quant"):
        assert not norm_blocks.kernel_works(256, EPS, DEVICE)
    assert "against torch's norms at hidden 256" in caplog.text
    assert "keep vLLM's forward" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="vllm.gemma4_quant"):
        assert not norm_blocks.router_kernel_works(256, 8, EPS, DEVICE)
    assert "router product at hidden 256, 8 experts" in caplog.text
    assert "keeps its own projection kernel" in caplog.text


def test_the_check_holds_under_vllms_default_device(monkeypatch) -> None:
    """vLLM builds the model, and so runs this check, with its target device as torch's
    default (``with torch.device("cuda")``); a tensor the check makes without naming its
    device lands there and meets the CPU ones. "meta" stands in for the GPU here."""
    from gemma4_quant.patches import norm_blocks

    monkeypatch.setattr(norm_blocks, "_checked", {})
    with torch.device("meta"):
        assert norm_blocks.kernel_works(256, EPS, DEVICE)
        assert norm_blocks.router_kernel_works(256, 8, EPS, DEVICE)


def test_the_ops_trace_whole() -> None:
    from gemma4_quant.patches import norm_blocks

    norm_blocks.register_op()
    op = torch.ops.gemma4_quant.post_attention_norms
    end = torch.ops.gemma4_quant.end_of_layer_norms
    gen = torch.Generator().manual_seed(2)
    o = torch.randn(2, 256, generator=gen).bfloat16().to(DEVICE)
    v = (torch.rand(256, generator=gen) + 0.5).bfloat16().to(DEVICE)
    scalar = torch.tensor([0.5]).bfloat16().to(DEVICE)

    def block(o: torch.Tensor) -> torch.Tensor:
        h, a, b, r = op(o, o * 2, v, v, v, v, 0.0625, EPS)
        y, normed = end(a, b, h, v, v, v, scalar, v, EPS)
        return end(y, normed + r, h, v, v, v, scalar, None, EPS)[0]

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(o), block(o))
    # one token through the kernel with the router's projection (more tokens take
    # router_decode's op, whose keys its own tests trace)
    router = torch.ops.gemma4_quant.post_attention_router
    weight = torch.randn(8, 256, generator=gen).bfloat16().to(DEVICE)

    def routed(o: torch.Tensor) -> torch.Tensor:
        h, a, b, logits = router(o, o * 2, v, v, v, v, weight, 0.0625, EPS, 0)
        return logits.sum(-1) + (h + a + b).float().sum(-1)

    one = o[:1]
    compiled = torch.compile(routed, backend="aot_eager", fullgraph=True, dynamic=True)
    assert torch.equal(compiled(one), routed(one))

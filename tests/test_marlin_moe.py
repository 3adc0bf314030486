"""Gemma 4's routed experts for one token on Marlin's MoE layout
(``gemma4_quant.kernels.marlin_moe``) against Gemma 4's routing and the exact float32
product of the weights they were packed from.

The experts go into Marlin's layout one by one through vLLM's reference packer
(``marlin_utils_test.marlin_weights``; ``gptq_marlin_moe_repack`` runs
``gptq_marlin_repack`` per expert, and ``bench/marlin_gemv.py`` holds the CUDA repack
equal to the reference packer) and ``marlin_permute_scales``. The routing reference is
vLLM's own ``gemma4_routing_function_torch`` where this vLLM has it. Runs Triton's
interpreter on CPU; the comparison against vLLM's Marlin MoE, and the speed, are
``bench/moe_decode.py --marlin``'s, on a GPU.
"""

from __future__ import annotations

import math

import pytest
from triton_env import DEVICE, marlin_matrix, marlin_reference, need_triton

torch = need_triton()
marlin_reference()  # skips this module where this vLLM has no packer

from gemma4_quant.kernels.marlin_moe import marlin_moe  # noqa: E402


def to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 -> float32 as the kernels round: to nearest on a GPU; Triton's
    interpreter (numpy has no bf16) truncates the low 16 bits instead."""
    if DEVICE == "cpu":
        return (x.float().view(torch.int32) & ~0xFFFF).view(torch.float32)
    return x.to(torch.bfloat16).float()


def experts(e: int, hidden: int, inter: int, group: int, seed: int, live: int | None = None):
    """``e`` experts as Marlin's MoE holds them, and their float32 W13 [E, H, 2I] and W2
    [E, I, H]; with ``live``, intermediate rows from ``live`` on are padding."""
    gen = torch.Generator().manual_seed(seed)
    w13, s13, f13, w2, s2, f2 = [], [], [], [], [], []
    for _ in range(e):
        words, scales, w = marlin_matrix(hidden, 2 * inter, group, gen, live)
        w13.append(words), s13.append(scales), f13.append(w)
        words, scales, w = marlin_matrix(inter, hidden, group, gen, live, rows=True)
        w2.append(words), s2.append(scales), f2.append(w)
    stack = torch.stack
    return (stack(w13), stack(s13), stack(w2), stack(s2)), (stack(f13), stack(f2))


def gemma4_routing(logits: torch.Tensor, top_k: int, scale: torch.Tensor):
    """vLLM's torch routing for Gemma 4 where it exists, else the same steps here."""
    try:
        from vllm.model_executor.models.gemma4 import gemma4_routing_function_torch
    except ImportError:
        gemma4_routing_function_torch = None
    if gemma4_routing_function_torch is not None:
        return gemma4_routing_function_torch(logits, top_k, scale)
    _, ids = torch.topk(logits, k=top_k, dim=-1)
    probs = torch.softmax(logits, dim=-1).gather(1, ids)
    weights = probs / probs.sum(dim=-1, keepdim=True) * scale[ids].float()
    return weights.float(), ids.int()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference(x, logits, scale, f13, f2, top_k: int) -> torch.Tensor:
    weights, ids = gemma4_routing(logits, top_k, scale)
    inter = f2.shape[1]
    out = torch.zeros(x.shape[-1])
    for j in range(top_k):
        e = int(ids[0, j])
        h = to_bf16(x[0].float() @ f13[e])
        a = to_bf16(_gelu_tanh(h[:inter]) * h[inter:])
        out += weights[0, j].float() * (a @ f2[e])
    return out


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu().reshape(-1) - want).norm() / want.norm()).item()


def _inputs(hidden: int, n_experts: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, hidden, generator=gen).bfloat16()
    logits = torch.randn(1, n_experts, generator=gen) * 2
    scale = (torch.rand(n_experts, generator=gen) + 0.5).bfloat16()
    return x, logits, scale


def _run(x, logits, scale, tensors, top_k: int, **tiles):
    w13, s13, w2, s2 = (t.to(DEVICE) for t in tensors)
    return marlin_moe(
        x.to(DEVICE), logits.to(DEVICE), scale.to(DEVICE), w13, s13, w2, s2, top_k=top_k, **tiles
    )


@pytest.mark.parametrize(
    ("n_experts", "top_k", "hidden", "inter", "group", "tiles"),
    [
        (16, 8, 512, 128, 32, {}),
        # 26B-A4B's hidden 2816 (44 tiles of 64) and intermediate 704 (11), splits that
        # leave the last share short (top 2 of 4 here: the interpreter's time is per program)
        (4, 2, 2816, 704, 32, {"split13": 3, "block_kt13": 8, "split2": 2}),
        (12, 4, 256, 192, 64, {"split13": 1, "split2": 1, "block_kt2": 1}),
        (6, 3, 256, 128, 32, {"split13": 2, "prefetch13": 2, "prefetch2": 1, "pdl": 1}),
        (6, 3, 256, 128, 32, {"split13": 2, "maxnreg13": 96, "maxnreg2": 128}),
        (6, 3, 512, 256, 128, {"split13": 2}),
    ],
)
def test_matches_gemma4_routing_and_the_float32_product(
    n_experts, top_k, hidden, inter, group, tiles
):
    tensors, (f13, f2) = experts(n_experts, hidden, inter, group, seed=hidden + inter)
    x, logits, scale = _inputs(hidden, n_experts, seed=n_experts)
    got = _run(x, logits, scale, tensors, top_k, **tiles)
    assert got.shape == (1, hidden) and got.dtype == torch.bfloat16
    # gate/up and the activation rounded to bf16 as vLLM's path; the kernel's float32
    # sums in another order than the reference's, then one bf16 rounding (2**-8)
    assert _error(got, reference(x, logits, scale, f13, f2, top_k)) < 5e-3


def test_nan_logits_route_to_an_expert_in_range():
    """All-NaN logits match no expert in the top-k search; the routing then takes the last
    expert (its weight NaN, as the softmax's), never one past it. The experts here sit in a
    larger tensor whose experts past the 12 routed have NaN scales, so a read past the last
    shows up in the activations W13 writes (on the GPU it would be an illegal address)."""
    from gemma4_quant.kernels import marlin_moe as kernels

    n, top_k, hidden, inter, group = 12, 4, 256, 128, 32
    (w13, s13, _, _), _ = experts(17, hidden, inter, group, seed=7)  # 16: the block of 12
    s13[n:] = float("nan")
    x, _, scale = _inputs(hidden, n, seed=7)
    logits = torch.full((1, n), float("nan"))
    act = torch.empty(top_k, inter, dtype=torch.bfloat16)
    part, count, _, _ = kernels.workspace(top_k, 2 * inter, hidden, 1, 1, torch.device(DEVICE))
    kernels._w13_kernel[(inter // 64, top_k, 1)](
        x, logits, scale, w13, s13, part, count, act, n, 2 * inter, hidden // 16, hidden // 16,
        TOPK=top_k, BLOCK_E=16, GROUP=group, SPLIT=1, BLOCK_KT=4, ACT=2, PREFETCH=0, PDL=0,
    )  # fmt: skip
    assert torch.isfinite(act.float()).all()
    got = _run(x, logits, scale, (w13[:n], s13[:n], *experts(n, hidden, inter, group, 7)[0][2:]),
               top_k)  # fmt: skip
    assert got.shape == (1, hidden) and torch.isnan(got.float()).all()


def test_padded_intermediate_adds_nothing():
    """Marlin pads an intermediate size that is not a multiple of 64 (a TP=2 rank of 26B-A4B:
    352 -> 384) with zero scales; the padded rows must add nothing."""
    tensors, (f13, f2) = experts(8, 256, 128, 32, seed=5, live=96)
    x, logits, scale = _inputs(256, 8, seed=6)
    want = reference(x, logits, scale, f13, f2, 4)
    assert _error(_run(x, logits, scale, tensors, 4), want) < 5e-3


def test_counters_are_left_at_zero_for_the_next_call():
    tensors, (f13, f2) = experts(8, 256, 64, 32, seed=7)
    for seed in range(3):
        x, logits, scale = _inputs(256, 8, seed=seed)
        got = _run(x, logits, scale, tensors, 2, split13=4, split2=2)
        assert _error(got, reference(x, logits, scale, f13, f2, 2)) < 5e-3


def test_mis_shaped_experts_are_refused_by_name():
    tensors, _ = experts(4, 256, 64, 32, seed=8)
    x, logits, scale = _inputs(256, 4, seed=9)
    w13, s13, w2, s2 = tensors
    with pytest.raises(ValueError, match=r"w2 scales \(4, 1, 256\), expected \(4, 2, 256\)"):
        _run(x, logits, scale, (w13, s13, w2, s2[:, :1]), 2)
    with pytest.raises(ValueError, match="one token expected"):
        _run(torch.cat([x, x]), logits, scale, tensors, 2)


# --------------------------------------------------------- the marlin_moe_decode patch


class ExactExperts(torch.nn.Module):
    """Where vLLM's MoE module stands on a GPU: called with (hidden states, router logits),
    it returns the routed experts' weighted sum. Marlin's MoE does not run on a CPU, so
    its ``forward`` here is the exact product with vLLM's torch routing (the one the
    plugin's build-time check also routes with)."""

    def __init__(self, f13, f2, scale, top_k: int):
        super().__init__()
        self.f13, self.f2, self.scale, self.top_k = f13, f2, scale, top_k

    def forward(self, hidden_states, router_logits):
        rows = [
            reference(x[None], lg[None], self.scale, self.f13, self.f2, self.top_k)
            for x, lg in zip(hidden_states, router_logits, strict=True)
        ]
        return torch.stack(rows).to(hidden_states.dtype)


def _patch_case(seed: int):
    """(experts holding Marlin's tensors, scale holder, vLLM's module, reference(x, w, ids))"""
    tensors, (f13, f2) = experts(8, 256, 64, 32, seed=seed)
    _, _, scale = _inputs(256, 8, seed=seed)
    routed = torch.nn.Module()
    names = ("w13_weight_packed", "w13_weight_scale", "w2_weight_packed", "w2_weight_scale")
    for name, t in zip(names, tensors, strict=True):
        setattr(routed, name, torch.nn.Parameter(t.to(DEVICE), requires_grad=False))
    routed.top_k = 2
    holder = torch.nn.Module()
    holder.per_expert_scale = torch.nn.Parameter(scale.to(DEVICE), requires_grad=False)
    runner = ExactExperts(f13, f2, scale, 2)

    def vllm_path(x, weights, ids):
        out = torch.zeros(x.shape[-1])
        for j in range(ids.shape[1]):
            e = int(ids[0, j])
            h = to_bf16(x[0].float().cpu() @ f13[e])
            a = to_bf16(_gelu_tanh(h[:64]) * h[64:])
            out += weights[0, j].float().cpu() * (a @ f2[e])
        return out[None].to(x.device)

    return routed, holder, runner, vllm_path


@pytest.fixture
def patch_module(monkeypatch):
    from gemma4_quant.patches import marlin_moe_decode

    monkeypatch.setattr(marlin_moe_decode, "_layers", {})
    return marlin_moe_decode


def test_auto_takes_only_the_measured_shape(patch_module) -> None:
    """26B-A4B's experts on 9.0 were measured faster end to end with the kernel's default
    tiles (bench/results/h100-2026-12-07); ``auto`` takes nothing else, ``force`` all."""
    from gemma4_quant.kernels.marlin_moe import DEFAULT_TILES

    assert patch_module.TILES == {(9, 0): {(2816, 704): DEFAULT_TILES}}
    assert patch_module.tiles_for("auto", (9, 0), 2816, 704) == DEFAULT_TILES
    assert patch_module.tiles_for("auto", (9, 0), 2816, 352) is None  # TP=2's half
    assert patch_module.tiles_for("auto", (10, 0), 2816, 704) is None
    assert patch_module.tiles_for("force", (8, 0), 256, 64) == DEFAULT_TILES


def test_a_register_limit_from_the_environment_reaches_both_kernels(patch_module, monkeypatch):
    """``GEMMA4_QUANT_INT4_MAXNREG`` (for measuring) adds ``ptxas``' register limit to both
    kernels' tiles wherever the patch takes the experts; a value out of range leaves them."""
    from gemma4_quant.kernels.marlin_moe import DEFAULT_TILES

    monkeypatch.setenv("GEMMA4_QUANT_INT4_MAXNREG", "96")
    limited = {**DEFAULT_TILES, "maxnreg13": 96, "maxnreg2": 96}
    assert patch_module.tiles_for("auto", (9, 0), 2816, 704) == limited
    assert patch_module.tiles_for("force", (8, 0), 256, 64) == limited
    assert patch_module.tiles_for("auto", (10, 0), 2816, 704) is None
    for wrong in ("lots", "1000", "-1"):
        monkeypatch.setenv("GEMMA4_QUANT_INT4_MAXNREG", wrong)
        assert patch_module.tiles_for("auto", (9, 0), 2816, 704) == DEFAULT_TILES


def test_experts_that_agree_with_vllm_take_the_op(patch_module) -> None:
    """The check passes; the module's forward then gives one token the kernels' result and
    more tokens its own, and torch.compile traces the call whole."""
    routed, holder, runner, vllm_path = _patch_case(seed=11)
    tiles = {"split13": 2, "split2": 2}
    assert patch_module.decide(routed, holder, runner, tiles, vllm_path)
    assert getattr(runner, patch_module.FLAG) == 0
    x, logits, _ = _inputs(256, 8, seed=12)
    x, logits = x.to(DEVICE), logits.to(DEVICE)
    w13, s13, w2, s2 = patch_module._tensors(routed)
    direct = marlin_moe(x, logits, holder.per_expert_scale, w13, s13, w2, s2, top_k=2, **tiles)
    assert torch.equal(runner(x, logits), direct)
    x3 = torch.randn(3, 256).bfloat16().to(DEVICE)
    logits3 = torch.randn(3, 8).to(DEVICE)
    assert torch.equal(runner(x3, logits3), ExactExperts.forward(runner, x3, logits3))

    def layer(h: torch.Tensor, lg: torch.Tensor) -> torch.Tensor:
        return runner(h, lg) * 2

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for h, lg in ((x, logits), (x3, logits3)):
        assert torch.equal(compiled(h, lg), layer(h, lg))


def test_experts_that_disagree_with_vllm_keep_it(patch_module, caplog) -> None:
    """Experts the kernels would read otherwise than vLLM (here: vLLM computes with another
    layer's weights) keep vLLM's module as it is, with a warning that says by how much."""
    routed, holder, runner, _ = _patch_case(seed=13)
    _, _, _, other = _patch_case(seed=14)
    with caplog.at_level("WARNING", logger="vllm.gemma4_quant"):
        assert not patch_module.decide(routed, holder, runner, {}, other)
    assert "forward" not in vars(runner) and not hasattr(runner, patch_module.FLAG)
    assert not patch_module._layers
    assert "err" in caplog.text and "keep vLLM's MoE" in caplog.text

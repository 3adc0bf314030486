"""Gemma 4's router in one kernel (``gemma4_quant.kernels.router_decode``) against the exact
float32 router and against vLLM's own norm with ``Gemma4Router.forward``'s roundings; its
projection alone against the float32 product; and the ``router_decode`` patch, which puts
that projection on one token of a real ``GateLinear``.

Runs Triton's interpreter on CPU (``TRITON_INTERPRET=1``); speed is
``bench/router_decode.py``'s, on a GPU. Skips where Triton is not installed.
"""

from __future__ import annotations

import pytest
from triton_env import DEVICE, need_triton

torch = need_triton()

from gemma4_quant.kernels.router_decode import router_decode, router_proj  # noqa: E402

EPS = 1e-6


def _inputs(m: int, hidden: int, experts: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, hidden, generator=gen) * 3).to(torch.bfloat16)
    scale = (torch.rand(hidden, generator=gen) + 0.5).to(torch.bfloat16)
    weight = (torch.randn(experts, hidden, generator=gen) * 0.05).to(torch.bfloat16)
    root = torch.tensor(hidden**-0.5).to(torch.bfloat16).item()  # vLLM's root_size.to(x.dtype)
    return x, scale, weight, root


def exact(x, scale, weight, root: float) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (normed * root * scale.float()) @ weight.float().T


def vllm_path(x, scale, weight, root: float) -> torch.Tensor:
    """``Gemma4Router.forward``: vLLM's RMSNorm without weight, both scalings in the
    activation dtype, then a bf16 projection with float32 output."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm

    with set_current_vllm_config(VllmConfig()):
        norm = RMSNorm(x.shape[-1], eps=EPS, has_weight=False)
    h = norm.forward_native(x)
    h = h * torch.tensor(root, dtype=x.dtype)
    h = h * scale
    return (h.float() @ weight.float().T).float()


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).norm() / want.norm()).item()


@pytest.mark.parametrize(
    ("m", "hidden", "experts", "tiles"),
    [
        (1, 2816, 128, {}),  # 26B-A4B's router
        (2, 2816, 128, {"block_n": 16, "block_k": 256}),
        (3, 200, 72, {"block_n": 16, "block_k": 64, "pdl": 1}),  # nothing divides any tile
    ],
)
def test_matches_the_exact_router(m: int, hidden: int, experts: int, tiles: dict) -> None:
    x, scale, weight, root = _inputs(m, hidden, experts, seed=m + hidden + experts)
    got = router_decode(*(t.to(DEVICE) for t in (x, scale, weight)), eps=EPS, root=root, **tiles)
    assert got.dtype == torch.float32 and tuple(got.shape) == (m, experts)
    want = exact(x, scale, weight, root)
    # float32 from exact bf16 inputs: only the summation order differs from the reference
    assert _error(got, want) < 1e-5
    # vLLM's own path rounds the normed activations to bf16 twice: the kernel is closer to
    # the exact router than vLLM is, and agrees with vLLM to that rounding
    theirs = vllm_path(x, scale, weight, root)
    assert 1e-4 < _error(theirs, want) < 1e-2
    assert _error(got, theirs) < 1e-2
    # the experts a token picks (top 8 of vLLM's logits) are the kernel's where the eighth
    # and ninth are apart by more than the rounding
    top = theirs.topk(min(9, experts), dim=-1)
    for row, (values, ids) in enumerate(zip(top.values, top.indices, strict=True)):
        if values[7] - values[8] > 1e-2 * values.abs().max():
            assert set(got[row].cpu().topk(8).indices.tolist()) == set(ids[:8].tolist())


def test_rejects_mismatched_shapes() -> None:
    x, scale, weight, root = _inputs(1, 128, 16, seed=0)
    with pytest.raises(ValueError, match=r"weight \(16, 64\) must be a contiguous \[16, 128\]"):
        router_decode(x, scale, weight[:, :64].contiguous(), eps=EPS, root=root)
    with pytest.raises(ValueError, match=r"scale \(64,\) must be a contiguous \[128\]"):
        router_decode(x, scale[:64].contiguous(), weight, eps=EPS, root=root)


@pytest.mark.parametrize(
    ("m", "hidden", "experts", "tiles"),
    [
        (1, 2816, 128, {}),  # 26B-A4B's router
        (2, 2816, 128, {"block_n": 1, "block_k": 1024}),
        (3, 200, 72, {"block_n": 16, "block_k": 64}),  # nothing divides any tile
    ],
)
def test_the_projection_alone_matches_the_float32_product(
    m: int, hidden: int, experts: int, tiles: dict
) -> None:
    x, _, weight, _ = _inputs(m, hidden, experts, seed=m * hidden + experts)
    got = router_proj(x.to(DEVICE), weight.to(DEVICE), **tiles)
    assert got.dtype == torch.float32 and tuple(got.shape) == (m, experts)
    assert _error(got, x.float() @ weight.float().T) < 1e-5


# ------------------------------------------------------------ the router_decode patch


@pytest.fixture
def fresh(monkeypatch, one_rank):
    from gemma4_quant.patches import router_decode as patch

    monkeypatch.setattr(patch, "_layers", {})
    monkeypatch.setattr(patch, "_checked", {})
    return patch


@pytest.fixture(scope="module")
def one_rank():
    """vLLM's distributed state for this process, one rank (a ``GateLinear`` asks its
    tensor-parallel rank when it is built)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.utils.network_utils import get_open_port

    if not model_parallel_is_initialized():
        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(1, 0, f"tcp://127.0.0.1:{get_open_port()}", 0, "gloo")
            initialize_model_parallel(1, 1)


def _gate(hidden: int = 2816, experts: int = 128, **kwargs):
    """vLLM's own ``GateLinear``, as ``Gemma4Router`` builds it (bf16, float32 logits)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear

    args = {"bias": False, "out_dtype": torch.float32, "params_dtype": torch.bfloat16, **kwargs}
    with set_current_vllm_config(VllmConfig()):
        proj = GateLinear(hidden, experts, prefix="model.layers.0.router.proj", **args)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(proj.weight.shape, generator=gen) * 0.05)
    if DEVICE == "cpu":
        # vLLM's CPU GEMM dispatch, keeping the weight the kernel reads (after loading,
        # vLLM's CPU build drops it; the patch is for CUDA builds only)
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(proj, remove_weight=False)
    return proj.to(DEVICE)


def test_a_projection_takes_the_op(fresh) -> None:
    """One token gets the kernel's logits, more tokens vLLM's own ``GateLinear.forward``;
    torch.compile traces the projection whole."""
    proj = _gate()
    vllm_forward = type(proj).forward
    assert fresh.decide(proj, "force", (9, 0), DEVICE)
    assert getattr(proj, fresh.FLAG) == 0
    gen = torch.Generator().manual_seed(3)
    one = torch.randn(1, 2816, generator=gen).bfloat16().to(DEVICE)
    three = torch.randn(3, 2816, generator=gen).bfloat16().to(DEVICE)
    logits, bias = proj(one)
    assert bias is None
    assert torch.equal(logits, router_proj(one, proj.weight))
    assert torch.equal(proj(three)[0], vllm_forward(proj, three)[0])
    # vLLM's CPU GEMM may round the logits to bf16 (a GPU's cuBLAS sums in float32)
    assert _error(logits, vllm_forward(proj, one)[0].float().cpu()) < 1e-2

    def route(x: torch.Tensor) -> torch.Tensor:
        return proj(x)[0] * 2

    compiled = torch.compile(route, backend="aot_eager", fullgraph=True, dynamic=True)
    for x in (one, three):
        assert torch.equal(compiled(x), route(x))


@pytest.mark.parametrize(
    "kwargs",
    [{"bias": True}, {"out_dtype": None}, {"params_dtype": torch.float32}],
    ids=["bias", "bf16-logits", "float32-weight"],
)
def test_projections_the_kernel_does_not_fit_keep_vllms(fresh, kwargs) -> None:
    proj = _gate(256, 16, **kwargs)
    assert not fresh.decide(proj, "force", (9, 0), DEVICE)
    assert not hasattr(proj, fresh.FLAG) and "forward" not in vars(proj)


def test_a_kernel_that_computes_wrong_keeps_vllms(fresh, monkeypatch, caplog) -> None:
    def wrong(x: torch.Tensor, weight: torch.Tensor, **tiles: int) -> torch.Tensor:
        return 0 * router_proj(x, weight, **tiles)

    monkeypatch.setattr(fresh, "_kernel", lambda: wrong)
    proj = _gate(256, 16)
    with caplog.at_level("WARNING", logger="vllm.gemma4_quant"):
        assert not fresh.decide(proj, "force", (9, 0), DEVICE)
    assert "err 1.0000 against the float32 product at 16 experts, hidden 256" in caplog.text
    assert "keeps vLLM's projection" in caplog.text
    assert not hasattr(proj, fresh.FLAG)


def test_the_check_holds_under_vllms_default_device(fresh) -> None:
    """vLLM builds the model, and so runs this check, with its target device as torch's
    default (CUDA on a GPU); "meta" stands in for it here."""
    with torch.device("meta"):
        assert fresh.kernel_works(fresh.TILES[(9, 0)], 16, 256, DEVICE)


def test_auto_takes_only_measured_gpus(fresh, monkeypatch) -> None:
    from gemma4_quant.kernels.router_decode import DEFAULT_TILES

    assert fresh.TILES == {(9, 0): DEFAULT_TILES}, "measured faster end to end: 9.0 only"
    assert fresh.tiles_for("auto", (9, 0)) == DEFAULT_TILES
    assert fresh.tiles_for("auto", (8, 0)) is None
    assert not fresh.decide(_gate(256, 16), "auto", (8, 0), DEVICE)
    assert fresh.tiles_for("force", (8, 0)) == DEFAULT_TILES
    monkeypatch.setattr(fresh, "TILES", {})
    assert fresh.tiles_for("auto", (9, 0)) is None
    assert not fresh.decide(_gate(256, 16), "auto", (9, 0), DEVICE)
    assert not fresh.decide(_gate(256, 16), "off", (9, 0), DEVICE)


def test_detection(fresh, monkeypatch) -> None:
    """Recognized on this vLLM; nothing to do on its CPU build; on a CUDA build ``auto``
    takes it where ``TILES`` names a GPU (9.0), ``force`` takes it, ``off`` does not."""
    from gemma4_quant.patches import Status, vllm_source

    text = vllm_source(fresh._MODEL)
    assert fresh.forward_recognized(text)
    edited = text.replace("router_logits, _ = self.proj(x)", "router_logits = self.proj(x)[0]")
    assert edited != text and not fresh.forward_recognized(edited)
    monkeypatch.delenv("GEMMA4_QUANT_FAST_DECODE", raising=False)
    assert "CPU build" in fresh.detect().reason
    from gemma4_quant.patches import fast_decode

    monkeypatch.setattr(fast_decode, "_cpu_build", lambda: False)
    assert fresh.detect().status is Status.NEEDED
    monkeypatch.setattr(fresh, "TILES", {})
    detection = fresh.detect()
    assert detection.status is Status.NOT_NEEDED
    assert "no GPU measured faster end to end" in detection.reason
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "force")
    assert fresh.detect().status is Status.NEEDED
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "off")
    assert fresh.detect().reason.startswith("GEMMA4_QUANT_FAST_DECODE=off")

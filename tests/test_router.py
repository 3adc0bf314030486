"""A quantized Gemma 4 router loads and routes like its dequantized twin (defect D4).

The int4 checkpoint is the cyankiwi layout with ``router.proj`` quantized too (int4, group
32); the FP8 one quantizes every linear, router included (per-channel weights, dynamic
per-token activations). Both have 32 experts: vLLM's CPU int4 linear kernel needs an
output size that is a multiple of 32, and the router's output size is the expert count
(the real model has 128).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_vllm_load
from test_expert_names import read_checkpoint
from unpack import ct_int4

from gemma4_quant import doctor
from gemma4_quant.checkpoints import CT_GROUP_SIZE, load_tensors
from gemma4_quant.layout import TEXT_PREFIX
from gemma4_quant.patches import Status, expert_names, load_guard
from gemma4_quant.patches.dequant_fallback import fp8_linear

LAYOUT, EXPERTS = "ct-fused-w4a16-router", 32
GENERATION, _ = expert_names._generation()
SILENT_SKIP = load_guard.detect().status is Status.NEEDED
# The 0.20.2 environment's CPU ops lack the int4 GEMM (`_C.cpu_gemm_wna16`), so there
# the router is checked by its loaded parameters only.
CAN_RUN_INT4 = GENERATION != "dotted"


def router_logits(load) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load.tensors.items() if k.startswith("probe.")}


def assert_logits_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys() and len(got) == 4
    for name, logits in want.items():
        assert got[name].dtype == torch.float32, "router logits stay float32"
        # The twin's router weight is the dequantized int4 weight, exactly (float32
        # product rounded once to bf16), so the only difference allowed is the order of
        # bf16/float32 accumulation: well inside 1% of the largest logit.
        bound = 1e-2 * logits.abs().max().item()
        assert (got[name] - logits).abs().max().item() <= bound, name
        # and the experts each token is routed to are the same
        assert torch.equal(got[name].topk(2).indices, logits.topk(2).indices), name


@pytest.fixture(scope="module")
def twin_logits(checkpoints, vllm_load):
    if not CAN_RUN_INT4:
        return None
    twin = checkpoints.twin(LAYOUT, num_experts=EXPERTS)
    # the quantized model loads in the same vLLM process (the next test reads it)
    load = vllm_load(twin, batch=[checkpoints(LAYOUT, num_experts=EXPERTS)], probe_router=True)
    assert load.ok, load.log[-3000:]
    return router_logits(load)


def test_quantized_router_matches_twin(checkpoints, vllm_load, twin_logits):
    path = checkpoints(LAYOUT, num_experts=EXPERTS)
    load = vllm_load(path, probe_router=CAN_RUN_INT4)
    assert load.ok, load.log[-3000:]
    assert "router applied" in load.log
    method = load.quant_methods["model.layers.0.router.proj"]
    assert method == "CompressedTensorsLinearMethod", method
    ckpt = read_checkpoint(path)
    for layer in range(4):
        for suffix in ("weight_packed", "weight_scale"):
            want = ckpt[f"{TEXT_PREFIX}layers.{layer}.router.proj.{suffix}"]
            got = load.tensors[f"model.layers.{layer}.router.proj.{suffix}"]
            if CAN_RUN_INT4:
                continue  # the kernel repacked it; the logits below are the check
            assert torch.equal(got.view(want.dtype), want), (layer, suffix)
    if CAN_RUN_INT4:
        assert_logits_match(router_logits(load), twin_logits)


def int8_act_error(x: torch.Tensor) -> torch.Tensor:
    """Per element, how far vLLM's W4A8 kernel (``int4_scaled_mm_cpu``) may move an
    activation: it rounds each token's row to the nearest multiple of s = amax / 127
    (``quantize_row_int8``: uint8 around a fixed zero point 128, so no clamping), at most
    s / 2 away; the slack covers s and x / s being computed in float32."""
    scale = x.float().abs().amax(-1, keepdim=True) / 127
    return (scale / 2 * (1 + 2**-16)).expand(x.shape)


def test_w4a8_router_within_int8_rounding_of_twin(checkpoints, tmp_path, twin_logits):
    """vLLM's default on CPUs with AMX tiles: int4 linears run as W4A8. The router's logits
    then lie within the rigorous bound of per-token int8 activation rounding from the twin's
    (the weights are used exactly, so nothing else differs)."""
    if not CAN_RUN_INT4:
        pytest.skip("this vLLM's CPU ops lack the int4 GEMM")
    path = checkpoints(LAYOUT, num_experts=EXPERTS)
    load = run_vllm_load(path, tmp_path, probe_router=True, env={"VLLM_CPU_INT4_W4A8": "1"})
    assert load.ok, load.log[-3000:]
    w4a8 = {name: on for name, on in load.use_w4a8.items() if name.endswith("router.proj")}
    if not w4a8:
        pytest.skip("no router runs on vLLM's CPU int4 kernel here (the fallback dequantizes it)")
    if not any(w4a8.values()):
        pytest.skip("vLLM runs this CPU's int4 router as W4A16 (no AMX tiles): nothing to bound")
    assert len(w4a8) == 4 and all(w4a8.values()), w4a8
    ckpt = read_checkpoint(path)
    got = router_logits(load)
    for layer in range(4):
        name = f"probe.model.layers.{layer}.router"
        x = load.tensors[f"probe_input.model.layers.{layer}.router"]
        stem = f"{TEXT_PREFIX}layers.{layer}.router.proj."
        packed, scale = ckpt[stem + "weight_packed"], ckpt[stem + "weight_scale"]
        weight = ct_int4(packed, scale, CT_GROUP_SIZE)
        bound = activation_twin_bound(x, weight, int8_act_error(x), twin_logits[name])
        delta = (got[name] - twin_logits[name]).abs()
        assert (delta <= bound).all(), (name, (delta - bound).max().item())
        # activation rounding shows: these are not the twin's bf16 GEMM
        assert delta.max().item() > 0, name


def test_unquantized_router_keeps_gate_linear(checkpoints, vllm_load):
    """Where the config excludes the router, the plugin leaves stock GateLinear in place."""
    load = vllm_load(checkpoints("ct-fused-w4a16"))
    assert load.ok, load.log[-3000:]
    assert load.module_classes["model.layers.0.router.proj"] == "GateLinear"
    assert load.quant_methods["model.layers.0.router.proj"] == "UnquantizedLinearMethod"


def test_stock_router_fails_as_matrix_says(checkpoints, tmp_path, twin_logits):
    """Without the router patch the quantized router never loads; the test bites."""
    path = checkpoints(LAYOUT, num_experts=EXPERTS)
    env = {"GEMMA4_QUANT_DISABLE_PATCHES": "router"}
    if SILENT_SKIP:
        # 0.24 - 0.30: stock drops `router.proj.weight_packed` without a word ...
        silent = run_vllm_load(
            path,
            tmp_path / "silent",
            env={**env, "GEMMA4_QUANT_DISABLE_PATCHES": "router,load_guard"},
            probe_router=True,
        )
        assert silent.ok, silent.log[-3000:]
        got = router_logits(silent)
        assert any(
            not torch.allclose(got[name], want, atol=1e-2 * want.abs().max().item())
            for name, want in twin_logits.items()
        ), "an unloaded router should not route like the checkpoint's"
        # ... and the load guard turns that into an error naming the router
        load = run_vllm_load(path, tmp_path / "guard", env=env)
        assert not load.ok
        assert re.search(r"unloaded: model\.layers\.0\.router\.proj\.weight", load.log)
        assert "layers.0.router.proj.weight_packed" in load.log
        return
    load = run_vllm_load(path, tmp_path, env=env)
    assert not load.ok
    if GENERATION == "generic":  # 0.31+: vLLM's loader rejects the unmatched name
        assert re.search(r"router\.proj\.weight_packed", load.log), load.log[-3000:]
    else:  # 0.19 - 0.23: the plain mapping KeyError
        assert re.search(r"KeyError: '.*router\.proj\.weight_(packed|scale|shape)'", load.log)


# --------------------------------------------------------------------- FP8 router

FP8_LAYOUT = "fp8-router"
_FEATURES = doctor.vllm_features()
CPU_FP8_KERNELS = _FEATURES["cpu_fp8_kernels"].get(_FEATURES["cpu_fp8_route"])
# no CPU kernel for the weight-only FP8 scheme (0.20 - 0.23): the plugin dequantizes
DEQUANTIZED_FP8 = (
    not CPU_FP8_KERNELS
    and _FEATURES["cpu_fp8_route"] == "w8a16"
    and fp8_linear.ct_fp8_linear_generation() is not None
)
needs_cpu_fp8 = pytest.mark.skipif(
    not CPU_FP8_KERNELS and not DEQUANTIZED_FP8,
    reason="this vLLM has no CPU ScaledMM FP8 linear kernel, and no fallback for it",
)
# Kernels whose activation quantization fp8_router_emulation reproduces: dynamic per-token
# e4m3 with scale amax / 448, float32 GEMM on the dequantized values, per-channel weight
# scale, output in the model dtype.
EMULATED_KERNELS = {"ChannelWiseTorchFP8ScaledMMLinearKernel"}
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def fp8_router_emulation(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """Router logits of an FP8 W8A8 projection as vLLM's CPU torch kernel computes them:
    ``x`` [T, H] quantized per token to float8_e4m3fn, ``weight`` [E, H] fp8 with
    ``weight_scale`` [E, 1], output rounded to bf16 and given as float32."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    xq = (x * scale.reciprocal()).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()
    out = (xq @ weight.float().t()) * scale * weight_scale.float().view(1, -1)
    return out.to(torch.bfloat16).float()


def activation_twin_bound(
    x: torch.Tensor, weight: torch.Tensor, act_error: torch.Tensor, twin: torch.Tensor
) -> torch.Tensor:
    """How far router logits computed from rounded activations may lie from the bf16
    twin's, per logit, rigorously. ``act_error`` [T, H] bounds, per element, how far the
    kernel's rounded activation lies from ``x``.

    W = ``weight`` is the checkpoint's router (exact in float32); the twin holds
    W_deq = bf16(W), so |W| <= (1 + 2^-8) |W_deq| =: w. Before the outputs are rounded:
    - activation rounding: act_error @ w^T;
    - the twin's weights are W rounded to bf16 (relative 2^-9): 2^-9 |x| @ w^T;
    - float32 accumulation over H terms, on both sides: < 4 H 2^-24 |x| @ w^T.
    Both outputs are then rounded to bf16 (relative 2^-9 each), which adds 2^-9 of that
    sum and 2^-8 (1 + 2^-8) |twin|.
    """
    x = x.float()
    w = weight.float().to(torch.bfloat16).float().abs() * (1 + 2**-8)
    magnitude = x.abs() @ w.t()
    before_rounding = (
        act_error.float() @ w.t() + 2**-9 * magnitude + 4 * x.shape[-1] * 2**-24 * magnitude
    )
    return before_rounding * (1 + 2**-9) + 2**-8 * (1 + 2**-8) * twin.abs()


def fp8_twin_bound(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, twin: torch.Tensor
) -> torch.Tensor:
    """:func:`activation_twin_bound` for e4m3 activations scaled by s = amax / 448:
    relative error at most 2^-4 (3 mantissa bits, round to nearest) in the normal range,
    absolute at most 2^-10 * s below it (subnormal spacing 2^-9)."""
    x = x.float()
    scale = x.abs().amax(-1, keepdim=True) / E4M3_MAX
    act_error = 2**-4 * x.abs() + 2**-10 * scale
    return activation_twin_bound(
        x, weight.float() * weight_scale.float().view(-1, 1), act_error, twin
    )


def fp8_router_weights(checkpoint, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    stem = f"{TEXT_PREFIX}layers.{layer}.router.proj."
    return checkpoint[stem + "weight"], checkpoint[stem + "weight_scale"]


@pytest.fixture(scope="module")
def fp8_twin(checkpoints, vllm_load):
    twin = checkpoints.twin(FP8_LAYOUT, num_experts=EXPERTS)
    # the quantized model loads in the same vLLM process (fp8_probe reads it)
    load = vllm_load(twin, batch=[checkpoints(FP8_LAYOUT, num_experts=EXPERTS)], probe_router=True)
    assert load.ok, load.log[-3000:]
    return load


def fp8_probe(checkpoints, vllm_load, **kwargs):
    # No --process: vLLM has no CPU MoE backend for the FP8 experts; load_model.py puts
    # only the routers into kernel format before probing them.
    path = checkpoints(FP8_LAYOUT, num_experts=EXPERTS)
    return path, vllm_load(path, probe_router=True, **kwargs)


@needs_cpu_fp8
def test_fp8_router_logits(checkpoints, vllm_load, fp8_twin):
    """The FP8 router routes with its checkpoint weights and scales: its logits are what
    the CPU kernel's activation quantization implies (emulated), and they lie within the
    rigorous bound of e4m3 activation rounding from the bf16 twin's (top experts may
    differ where two logits are that close). Where vLLM has no CPU kernel for the
    weight-only FP8 scheme (0.20 - 0.23) the plugin dequantizes the router: its logits
    are then the twin's, exactly."""
    path, load = fp8_probe(checkpoints, vllm_load)
    assert load.ok, load.log[-3000:]
    assert "router applied" in load.log
    assert load.quant_methods["model.layers.0.router.proj"] == "CompressedTensorsLinearMethod"
    ckpt = load_tensors(path)
    got, twin = router_logits(load), router_logits(fp8_twin)
    assert got.keys() == twin.keys() and len(got) == 4
    if DEQUANTIZED_FP8:
        # weight-only: the router holds weight * scale, as the twin does, and routes alike
        assert "FP8 linears: weights dequantized" in load.log, load.log[-3000:]
        for name, want in twin.items():
            assert torch.equal(got[name], want), (name, (got[name] - want).abs().max())
        return
    emulated = {}
    for layer in range(4):
        name = f"probe.model.layers.{layer}.router"
        x = load.tensors[f"probe_input.model.layers.{layer}.router"]
        assert torch.equal(x, fp8_twin.tensors[f"probe_input.model.layers.{layer}.router"])
        weight, weight_scale = fp8_router_weights(ckpt, layer)
        bound = fp8_twin_bound(x, weight, weight_scale, twin[name])
        delta = (got[name] - twin[name]).abs()
        assert (delta <= bound).all(), (name, (delta - bound).max().item())
        # activation quantization shows: the logits are not the twin's bf16 GEMM
        assert delta.max().item() > 0, name
        emulated[name] = fp8_router_emulation(x, weight, weight_scale)
    kernel = re.search(r"Selected (\w+) for CompressedTensorsW8A8Fp8", load.log)
    if kernel is None or kernel.group(1) not in EMULATED_KERNELS:
        pytest.skip(
            f"FP8 kernel {kernel and kernel.group(1)}: its activation quantization is not emulated"
        )
    for name, want in emulated.items():
        # Same fp8 operands: only the float32 accumulation order may differ (H = 256 terms,
        # relative < 2e-5 of the sum), which can move the final bf16 rounding by one step
        # (2^-7 relative to the logit).
        tolerance = 2**-7 * want.abs() + 1e-5 * want.abs().max()
        assert ((got[name] - want).abs() <= tolerance).all(), (name, (got[name] - want).abs().max())


@needs_cpu_fp8
def test_stock_fp8_router_fails_as_matrix_says(checkpoints, vllm_load):
    """Without the router patch the FP8 router's weight_scale has nowhere to go."""
    env = {"GEMMA4_QUANT_DISABLE_PATCHES": "router"}
    path, load = fp8_probe(checkpoints, vllm_load, env=env)
    if SILENT_SKIP:
        # 0.24 - 0.30: the fp8 weight lands in the bf16 GateLinear and weight_scale is
        # dropped without a word (the load guard sees every parameter filled)
        assert load.ok, load.log[-3000:]
        ckpt = load_tensors(path)
        got = router_logits(load)
        for layer in range(4):
            name = f"probe.model.layers.{layer}.router"
            x = load.tensors[f"probe_input.model.layers.{layer}.router"]
            want = fp8_router_emulation(x, *fp8_router_weights(ckpt, layer))
            delta = (got[name] - want).abs().nan_to_num(nan=float("inf"))
            assert delta.max().item() > 0.5 * want.abs().max().item(), name
        return
    assert not load.ok
    if GENERATION == "generic":  # 0.31+: vLLM's loader rejects the unmatched name
        assert re.search(r"ValueError: .*router\.proj\.weight_scale", load.log), load.log[-3000:]
    else:  # 0.19 - 0.23: the plain mapping KeyError
        assert re.search(r"KeyError: '.*router\.proj\.weight_scale'", load.log), load.log[-3000:]

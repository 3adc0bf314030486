"""A quantized Gemma 4 router loads and routes like its dequantized twin (defect D4).

The checkpoint is the cyankiwi layout with ``router.proj`` quantized too (int4, group 32).
It has 32 experts: vLLM's CPU int4 linear kernel needs an output size that is a multiple
of 32, and the router's output size is the expert count (the real model has 128).
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_vllm_load
from test_expert_names import read_checkpoint

from gemma4_quant.patches import Status, expert_names, load_guard

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
def twin_logits(checkpoints, tmp_path_factory):
    if not CAN_RUN_INT4:
        return None
    twin = checkpoints.twin(LAYOUT, num_experts=EXPERTS)
    load = run_vllm_load(twin, tmp_path_factory.mktemp("twin"), probe_router=True)
    assert load.ok, load.log[-3000:]
    return router_logits(load)


def test_quantized_router_matches_twin(checkpoints, tmp_path, twin_logits):
    path = checkpoints(LAYOUT, num_experts=EXPERTS)
    load = run_vllm_load(path, tmp_path, probe_router=CAN_RUN_INT4)
    assert load.ok, load.log[-3000:]
    assert "router applied" in load.log
    method = load.quant_methods["model.layers.0.router.proj"]
    assert method == "CompressedTensorsLinearMethod", method
    ckpt = read_checkpoint(path)
    for layer in range(4):
        for suffix in ("weight_packed", "weight_scale"):
            want = ckpt[f"model.language_model.layers.{layer}.router.proj.{suffix}"]
            got = load.tensors[f"model.layers.{layer}.router.proj.{suffix}"]
            if CAN_RUN_INT4:
                continue  # the kernel repacked it; the logits below are the check
            assert torch.equal(got.view(want.dtype), want), (layer, suffix)
    if CAN_RUN_INT4:
        assert_logits_match(router_logits(load), twin_logits)


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

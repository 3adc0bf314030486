"""On CPU, Gemma 4's bf16 router computes its checkpoint's logits (patch cpu_gate_dtype).

vLLM <= 0.31 replaces a packed CPU linear's weight by a float32 placeholder; GateLinear
then casts the bf16 router input to float32 for the bf16 kernel, and the logits are
garbage (or, where the packed kernel checks its input's dtype, the forward pass fails).
The reference here is independent of vLLM: the router projection's input, as vLLM
computed it, times the checkpoint's router weight, in float64.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_vllm_load

from gemma4_quant.checkpoints import load_tensors
from gemma4_quant.patches import Status, cpu_gate_dtype

LAYOUT = "bf16"
DETECTION = cpu_gate_dtype.detect()


def router_errors(path, load) -> dict[str, tuple[float, float]]:
    """Per layer: (max |logit - reference|, max |reference|)."""
    ckpt = load_tensors(path)
    out = {}
    for layer in range(4):
        name = f"model.layers.{layer}.router"
        x = load.tensors[f"probe_input.{name}"].double()
        weight = ckpt[f"model.language_model.layers.{layer}.router.proj.weight"].double()
        want = x @ weight.T
        got = load.tensors[f"probe.{name}"].double()
        delta = (got - want).abs().nan_to_num(nan=float("inf")).max().item()
        out[name] = (delta, want.abs().max().item())
    return out


def test_router_logits_are_the_checkpoints(checkpoints, vllm_load):
    path = checkpoints(LAYOUT)
    load = vllm_load(path, plugin=True, probe_router=True)  # test_doctor's load too
    assert load.ok, load.log[-3000:]
    assert load.quant_methods["model.layers.0.router.proj"] == "UnquantizedLinearMethod"
    for name, (delta, scale) in router_errors(path, load).items():
        # bf16 output of a bf16 x bf16 GEMM accumulated in float32: one bf16 rounding
        # (2^-8 relative) of each logit, well inside 1% of the largest.
        assert delta <= 1e-2 * scale, (name, delta, scale)
        assert load.tensors[f"probe.{name}"].dtype == torch.float32


@pytest.mark.skipif(DETECTION.status is not Status.NEEDED, reason=DETECTION.reason)
def test_without_the_patch_the_router_is_garbage(checkpoints, tmp_path):
    path = checkpoints(LAYOUT)
    env = {"GEMMA4_QUANT_DISABLE_PATCHES": cpu_gate_dtype.NAME}
    load = run_vllm_load(path, tmp_path, probe_router=True, env=env)
    if not load.ok:
        # Where the CPU's packed bf16 kernel checks its input's dtype (seen on AMX), the
        # float32 input the placeholder makes GateLinear pass is refused outright.
        assert re.search(r"NotImplementedError: .* not implemented for 'Float'", load.log), (
            load.log[-3000:]
        )
        return
    errors = router_errors(path, load)
    if all(delta <= 1e-2 * scale for delta, scale in errors.values()):
        pytest.skip("this CPU's GEMM dispatch keeps the router weight (no packed kernel)")
    for name, (delta, scale) in errors.items():
        assert delta > 0.5 * scale, (name, delta, scale)

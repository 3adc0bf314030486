"""The compatibility matrix: every builder layout, stock vLLM and with the plugin, on CPU.

Each row is recorded for the README's table (``scripts/compat_table.py``). The assertions
pin what the plugin must achieve; vLLM's own CPU limits (no FP8 kernels on some releases,
symmetric-only int4 MoE on old ones) are named as such.
"""

from __future__ import annotations

import re

import pytest

# 32 experts where the router is quantized: vLLM's CPU int4 linear kernel needs the
# router's output size (the expert count) to be a multiple of 32.
LAYOUTS = {
    "bf16": {},
    "ct-fused-w4a16": {},
    "ct-fused-w4a16-asym": {},
    "ct-fused-w4a16-shape": {},
    "ct-per-expert-w4a16": {},
    "ct-fused-w4a16-router": {"num_experts": 32},
    "autoround-int4": {"num_experts": 32},
    "fp8-router": {"num_experts": 32},
    "autoround-int4-mixed": {"num_experts": 32},
    "gptq-int4-g64": {},
    "modelopt-nvfp4": {},
    "modelopt-nvfp4-moe": {},
}


def matrix_paths(checkpoints) -> list:
    """Every row's checkpoint: each release loads them all in one vLLM process per mode
    (stock, plugin), shared with test_doctor's verdicts (``vllm_load(..., batch=...)``)."""
    return [checkpoints(layout, **LAYOUTS[layout]) for layout in sorted(LAYOUTS)]


_OUTCOMES = (
    (r"KeyError: '([^']+)'", "KeyError `{0}`"),
    (r"No WNA16 MoE backend supports", "no CPU int4 MoE kernel"),
    (r"Failed to find a kernel that can implement the (\w+) linear", "no CPU {0} linear kernel"),
    (r"Only symmetric quantization is supported for MoE", "MoE method is symmetric-only"),
    (r"No NvFp4 MoE backend supports", "no CPU NVFP4 MoE kernel"),
    (r"INC on CPU", "INC on CPU: int4 only"),
    (
        r"requires consistent quant config|Detected some but not all shards",
        "k_eq_v qkv_proj: mixed schemes",
    ),
    (r"no module or parameter named '([^']+)'", "no parameter `{0}`"),
    (r"has no parameter '(\w+)'", "no expert parameter `{0}`"),
    (r"Gemma 4 checkpoint left \d+ parameter", "load guard: unfilled parameters"),
    (r"expanded size of the tensor", "RuntimeError: expanded size"),
    (r"(\w+Error): ([^\n]{0,60})", "{0}: {1}"),
)


def outcome(load) -> str:
    if load.ok:
        return "loads"
    for pattern, text in _OUTCOMES:
        match = re.search(pattern, load.log)
        if match:
            return text.format(*match.groups())
    return "fails"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matrix_row(checkpoints, vllm_load, compat_record, layout):
    path, batch = checkpoints(layout, **LAYOUTS[layout]), matrix_paths(checkpoints)
    stock, plugin = vllm_load(path, plugin=False, batch=batch), vllm_load(path, batch=batch)
    compat_record(layout, outcome(stock), outcome(plugin))
    if layout == "bf16" or plugin.ok:
        assert plugin.ok, plugin.log[-3000:]
        return
    # what the plugin cannot change: vLLM's own kernels and quantization methods
    allowed = (
        "MoE method is symmetric-only",
        "no CPU FP8ScaledMM linear kernel",
        "no CPU ScaledMM linear kernel",
    )
    assert outcome(plugin) in allowed, plugin.log[-3000:]

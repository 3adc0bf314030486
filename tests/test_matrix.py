"""The compatibility matrix: every builder layout, stock vLLM and with the plugin, on CPU.

Each row is recorded for the README's table (``scripts/compat_table.py``). The assertions
pin what the plugin must achieve; vLLM's own CPU limits (no FP8 kernels on some releases,
no NVFP4 kernel on any, symmetric-only int4 MoE on old ones) are named as such.
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
    "ct-fused-w8a16": {},
    "ct-fp8-dynamic": {},
    "ct-nvfp4": {},
    "qat-unquantized": {},
    "qat-w4a16-ct": {},
}

_OUTCOMES = (
    (r"KeyError: '([^']+)'", "KeyError `{0}`"),
    (r"No WNA16 MoE backend supports", "no CPU int4 MoE kernel"),
    (r"Failed to find a kernel that can implement the (\w+) linear", "no CPU {0} linear kernel"),
    (r"Only symmetric quantization is supported for MoE", "MoE method is symmetric-only"),
    (r"has no parameter '(\w+)'", "no expert parameter `{0}`"),
    (r"Gemma 4 checkpoint left \d+ parameter", "load guard: unfilled parameters"),
    (r"expanded size of the tensor", "RuntimeError: expanded size"),
    # vLLM's own check of unloaded weights (a set: the first name is not stable)
    (
        r"Following weights were not initialized from checkpoint: \{'[^']*?\.(\w+\.weight)'",
        "weights not initialized (`{0}`)",
    ),
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
    path = checkpoints(layout, **LAYOUTS[layout])
    stock, plugin = vllm_load(path, plugin=False), vllm_load(path)
    compat_record(layout, outcome(stock), outcome(plugin))
    if layout == "bf16" or plugin.ok:
        assert plugin.ok, plugin.log[-3000:]
        return
    # what the plugin cannot change: vLLM's own kernels and quantization methods
    allowed = (
        "MoE method is symmetric-only",
        "no CPU FP8ScaledMM linear kernel",
        "no CPU ScaledMM linear kernel",
        "no CPU NVFP4 linear kernel",
    )
    assert outcome(plugin) in allowed, plugin.log[-3000:]

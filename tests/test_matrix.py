"""The compatibility matrix: every builder layout, stock vLLM and with the plugin, on CPU.

Each layout is built, vLLM constructs the model and loads the checkpoint with its own
loader (every layout in one vLLM process, stock; then one with the plugin), and what it
loaded is compared, module by module, with the checkpoint unpacked independently: a load
that "succeeds" with a module left unfilled (0.24 - 0.30 skip names they do not know) is
recorded as wrong values, not as "loads". Each row is recorded for the README's table
(``scripts/compat_table.py``; ``scripts/matrix.sh`` runs this on every release). The
assertions pin what the plugin must achieve; vLLM's own CPU limits (no FP8 kernels on some
releases, symmetric-only int4 MoE on old ones) are named as such.
"""

from __future__ import annotations

import re
from pathlib import Path

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
    "autoround-int4-mixed": {"num_experts": 32},
    "gptq-int4-g64": {},
    "modelopt-nvfp4": {},
    "modelopt-nvfp4-moe": {},
}


def matrix_paths(checkpoints) -> list:
    """Every row's checkpoint (``vllm_load(..., batch=...)`` loads them in one process)."""
    return [checkpoints(layout, **LAYOUTS[layout]) for layout in sorted(LAYOUTS)]


# a bare NotImplementedError raised by tie_weights (vLLM prefixes a worker's lines)
TIE_ERROR = r"in tie_weights\s+(?:\[rank\d+\]:\s+)?raise NotImplementedError"
_OUTCOMES = (
    (r"KeyError: '([^']+)'", "KeyError `{0}`"),
    (r"No WNA16 MoE backend supports", "no CPU int4 MoE kernel"),
    (r"Failed to find a kernel that can implement the (\w+) linear", "no CPU {0} linear kernel"),
    (r"Only symmetric quantization is supported for MoE", "MoE method is symmetric-only"),
    (r"No NvFp4 MoE backend supports", "no CPU NVFP4 MoE kernel"),
    (r"No NVFP4 GEMM backend selected", "no CPU NVFP4 linear kernel"),  # 0.19
    (r"INC on CPU", "INC on CPU: int4 only"),
    (
        r"requires consistent quant config|Detected some but not all shards",
        "k_eq_v qkv_proj: mixed schemes",
    ),
    (r"no module or parameter named '([^']+)'", "no parameter `{0}`"),
    (r"has no parameter '(\w+)'", "no expert parameter `{0}`"),
    (r"Gemma 4 checkpoint left \d+ parameter", "load guard: unfilled parameters"),
    (r"expanded size of the tensor", "RuntimeError: expanded size"),
    (
        r"INC quantization is not supported during xpu kernel migration",
        "INC refuses quantized layers on CPU",
    ),
    (TIE_ERROR, "NotImplementedError in tie_weights"),
    # vLLM's own check of unloaded weights (a set: the first name is not stable)
    (
        r"Following weights were not initialized from checkpoint: \{'[^']*?\.(\w+\.weight)'",
        "weights not initialized (`{0}`)",
    ),
    (r"(\w+Error): ([^\n]{0,60})", "{0}: {1}"),
)

# What the plugin cannot change: vLLM's own kernels and quantization methods.
VLLM_LIMITS = (
    "MoE method is symmetric-only",
    "no CPU FP8ScaledMM linear kernel",
)


# Formats the plugin does not serve on a release yet, each with vLLM's reason. The rows
# are recorded as they are; a plugin load that succeeds there fails the test, so that the
# entry goes once it is fixed.
PLUGIN_GAPS: dict[tuple[str, str], str] = {}


def plugin_gap(layout: str) -> str | None:
    """Why the plugin does not serve ``layout`` on the installed release, if it does not."""
    from gemma4_quant import vllm_version

    release = vllm_version()
    for (prefix, gap), why in PLUGIN_GAPS.items():
        if gap == layout and release.startswith(prefix):
            return why
    return None


def outcome(load) -> str:
    if load.ok:
        return "loads"
    for pattern, text in _OUTCOMES:
        match = re.search(pattern, load.log)
        if match:
            return text.format(*match.groups())
    return "fails"


def checked_outcome(path: Path, load, layout: str, checkpoints) -> str:
    """``outcome``, and for a load that succeeded whether its values are the checkpoint's:
    "loads", "loads wrong values (`module`, ...)", or "loads (values not compared: why)"
    for a format the comparison does not read."""
    if not load.ok:
        return outcome(load)
    from test_ct_formats import LAYOUTS as CT_FORMATS
    from test_formats import FORMATS

    if layout in FORMATS:  # AutoRound mixed, GPTQ, ModelOpt: as stored, experts decoded
        from test_formats import assert_loaded_tensors

        try:
            assert_loaded_tensors(load, path, checkpoints.twin(layout, **LAYOUTS[layout]))
        except (AssertionError, KeyError) as exc:
            return f"loads wrong values ({(str(exc) or type(exc).__name__).splitlines()[0][:80]})"
        return "loads"

    if layout in CT_FORMATS:  # int8, FP8, NVFP4, QAT: compared as the checkpoint stores them
        from test_ct_formats import assert_loaded_equals_checkpoint

        try:
            assert_loaded_equals_checkpoint(load, path, None)
        except AssertionError as exc:
            return f"loads wrong values ({(str(exc) or type(exc).__name__).splitlines()[0][:80]})"
        return "loads"
    from test_tensor_parallel import differing_shards

    try:
        differing, _ = differing_shards(path, load, rank=0, ranks=1)
    except (KeyError, AssertionError) as exc:
        return f"loads (values not compared: {type(exc).__name__} {exc})"
    if not differing:
        return "loads"
    more = f", {len(differing) - 1} more" if len(differing) > 1 else ""
    return f"loads wrong values (`{differing[0]}`{more})"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matrix_row(matrix_loads, checkpoints, compat_record, layout):
    path, stock, plugin = matrix_loads[layout]
    got_stock, got_plugin = (
        checked_outcome(path, stock, layout, checkpoints),
        checked_outcome(path, plugin, layout, checkpoints),
    )
    compat_record(layout, got_stock, got_plugin)
    gap = plugin_gap(layout)
    if gap is not None:
        assert not plugin.ok, f"{layout} loads with the plugin now: drop it from PLUGIN_GAPS"
        pytest.xfail(gap)
    if layout == "bf16" or plugin.ok:
        assert got_plugin == "loads", plugin.log[-3000:] if not plugin.ok else got_plugin
        return
    assert got_plugin in VLLM_LIMITS, plugin.log[-3000:]

"""Which patches each tested vLLM release needs: the table that says when a shim can go.

The plugin decides by reading vLLM's code, never its version. This test pins what that
detection says on every release the suite runs on, so a new release that no longer needs
a patch (or that the patch no longer recognizes) shows up here first. A patch that is
"not needed" on the oldest supported release can be deleted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gemma4_quant import vllm_version
from gemma4_quant.patches import load_patch_modules

# release -> patch -> detection status on that release's code
EXPECTED = {
    "0.19.0": {
        "expert_names": "needed",
        # the substring mapping that loads every match as a 2-D `.weight`
        "expert_loader": "needed",
        "router": "needed",
        "load_guard": "not needed",
        "kv_spec_merge": "not needed",
        "unquantized_experts": "needed",
        "tied_lm_head": "not needed",
        "text_mapper": "needed",
        "cpu_gate_dtype": "needed",
    },
    "0.19.1": {
        "expert_names": "needed",
        "expert_loader": "not needed",
        "router": "needed",
        "load_guard": "not needed",
        "kv_spec_merge": "not needed",
        # INC refuses every quantized layer on CPU; dequant_fallback leaves experts unquantized
        "unquantized_experts": "needed",
        "tied_lm_head": "not needed",
        "text_mapper": "not needed",
        "cpu_gate_dtype": "needed",
        # no gemma4_routing_function_torch to hold the kernels' routing against
        "marlin_moe_decode": "unrecognized",
        # recognized, and nothing to do on vLLM's CPU build
        "router_decode": "not needed",
    },
    "0.20.2": {
        "expert_names": "needed",
        "expert_loader": "not needed",
        "kv_shared_layers": "needed",
        "router": "needed",
        "load_guard": "not needed",
        "kv_spec_merge": "not needed",
        "unquantized_experts": "needed",
        "tied_lm_head": "not needed",
        "text_mapper": "not needed",
        "cpu_gate_dtype": "needed",
        "marlin_moe_decode": "not needed",
        "router_decode": "not needed",
    },
    "0.23.0": {
        "expert_names": "needed",
        "expert_loader": "not needed",
        "router": "needed",
        "load_guard": "not needed",
        "kv_spec_merge": "not needed",
        "unquantized_experts": "needed",
        "tied_lm_head": "not needed",
        "text_mapper": "not needed",
        "cpu_gate_dtype": "needed",
        "marlin_moe_decode": "not needed",
        "router_decode": "not needed",
    },
    "0.30.0": {
        "expert_names": "needed",
        "expert_loader": "not needed",
        "kv_shared_layers": "not needed",
        "router": "needed",
        "load_guard": "needed",
        "kv_spec_merge": "not needed",
        "unquantized_experts": "needed",
        "tied_lm_head": "not needed",
        "text_mapper": "not needed",
        "cpu_gate_dtype": "needed",
        "marlin_moe_decode": "not needed",
        "router_decode": "not needed",
    },
    "0.32.0": {
        "expert_names": "needed",
        "expert_loader": "not needed",
        "kv_shared_layers": "not needed",
        "router": "needed",
        "load_guard": "not needed",
        "kv_spec_merge": "not needed",
        "unquantized_experts": "needed",
        "tied_lm_head": "not needed",
        "text_mapper": "not needed",
        "cpu_gate_dtype": "not needed",
        "marlin_moe_decode": "not needed",
        "router_decode": "not needed",
        # recognized (0.26.0 - 0.34.0); the CPU build has no GPU, and no GPU is measured
        "norm_blocks": "not needed",
        "ffn_streams": "not needed",
    },
}
# No CPU build of these two: their code is read, never run (scripts/vllm_sources.py). They
# need what 0.32.0 needs, but INC builds AutoRound experts quantized on CPU there
# (INCWNA16MoEScheme); the patches 0.32.0's row leaves out are pinned too. Their sources
# are a CUDA build's, so the one-token paths apply (``auto`` takes capability 9.0; which
# layers take them is decided per layer, on a GPU).
EXPECTED |= dict.fromkeys(
    ("0.33.0", "0.34.0"),
    {
        **EXPECTED["0.32.0"],
        "marlin_moe_decode": "needed",
        "router_decode": "needed",
        "unquantized_experts": "not needed",
        "moe_prefix": "needed",
        "k_eq_v_scheme": "needed",
        "dequant_fallback": "needed",
        "per_layer_config": "not needed",
    },
)


def test_detection_matches_release_table():
    release = vllm_version()
    if release not in EXPECTED:
        pytest.fail(f"vLLM {release} is not in the table: add what each patch detects there")
    got = {
        module.NAME: module.detect().status.value
        for module in load_patch_modules()
        if module.NAME in EXPECTED[release]
    }
    assert got == EXPECTED[release]


def test_register_is_idempotent_and_cheap():
    """Registering twice applies nothing twice, importing the plugin imports no model, and
    Gemma 4's load_weights is wrapped once."""
    import subprocess
    import sys

    code = (
        "import sys, time, vllm, gemma4_quant as g\n"
        # CPU seconds of this process: what registration costs, whatever else the
        # machine runs meanwhile
        "t = time.process_time(); g.register(); g.register()\n"
        "assert time.process_time() - t < 2.0, time.process_time() - t\n"
        "assert 'vllm.model_executor.models.gemma4' not in sys.modules\n"
        "from vllm.model_executor.models import gemma4\n"
        "chain, w = [], gemma4.Gemma4ForCausalLM.load_weights\n"
        "while w is not None:\n"
        "    chain.append(w.__code__.co_filename)\n"
        "    w = getattr(w, '__wrapped__', None)\n"
        # one wrapper (load_stream's) around vLLM's own load_weights, however many
        # patches work on the stream and however often the plugin registers
        "assert len(chain) == 2 and chain[0].endswith('load_stream.py'), chain\n"
        "print('OK', g.applied_patches())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout


# Releases without a CPU build: scripts/test.sh lays out their sources in this folder
SOURCES = os.environ.get("GEMMA4_QUANT_VLLM_SOURCES")
READ_ONLY = ("0.33.0", "0.34.0")


@pytest.mark.parametrize("release", READ_ONLY)
def test_detection_of_releases_read_not_run(release: str) -> None:
    """What every patch decides on a release the suite cannot run (GPU wheels only),
    from that release's own sources: the table above, and no patch that meets code it
    does not recognize."""
    root = Path(SOURCES or "", release)
    if not SOURCES or not (root / "vllm" / "__init__.py").is_file():
        pytest.skip(f"no vLLM {release} sources (scripts/vllm_sources.py lays them out)")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(src)])}
    proc = subprocess.run(
        [sys.executable, "-m", "gemma4_quant", "patches", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["vllm"] == release, "the sources' own dist-info names the release"
    statuses = {row["patch"]: row["status"] for row in report["patches"]}
    unrecognized = {row["patch"]: row["reason"] for row in report["patches"]
                    if row["status"] == "unrecognized"}  # fmt: skip
    assert not unrecognized
    assert {name: statuses[name] for name in EXPECTED[release]} == EXPECTED[release]

"""On a CUDA GPU: every tiny layout, with the plugin, matches its dequantized twin layer by
layer (``tests/gpu/probe.py``), at TP=1 and, with two GPUs, at TP=2.

Skipped where there is no CUDA GPU (CI is CPU-only). Runs the installed vLLM (with this
plugin installed); every vLLM run is its own process, several at a time. Set
``GEMMA4_QUANT_GPU_RESULTS=DIR`` to keep the runs (``probe.py report DIR`` tabulates them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import correctness  # noqa: E402  (tests/gpu is on sys.path for this file)
import probe  # noqa: E402

TWO_GPUS = torch.cuda.device_count() >= 2
# vLLM's own limits, not this plugin's: (error text, why)
VLLM_LIMITS = {
    "Only symmetric quantization is supported for MoE": "this vLLM has no asymmetric "
    "int4 MoE kernel",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict[tuple[str, str], dict]:
    keep = os.environ.get("GEMMA4_QUANT_GPU_RESULTS")
    root = Path(keep) if keep else tmp_path_factory.mktemp("gpu")
    ckpts, results = root / "ckpts", root / "results"
    if not (ckpts / ".built").exists():
        assert correctness.main(["build", str(ckpts), "--jobs", "4"]) == 0
        (ckpts / ".built").touch()
    variants = "plugin,tp2" if TWO_GPUS else "plugin"
    gpus = ",".join(str(i) for i in range(torch.cuda.device_count()))
    import vllm

    argv = ["run", str(ckpts), str(results), "--release", vllm.__version__, "--variants", variants]
    assert probe.main([*argv, "--gpus", gpus, "--jobs", "8"]) == 0
    assert probe.main(["report", str(results)]) == 0
    rows = json.loads((results / "probe-results.json").read_text())
    return {
        (row["layout"], row["variant"]): row for row in rows if row["release"] == vllm.__version__
    }


def _check(row: dict | None) -> None:
    assert row is not None, "no run"
    for text, why in VLLM_LIMITS.items():
        if text in (row.get("error") or ""):
            pytest.skip(why)
    assert "error" not in row, row["error"]
    assert row["ok"], f"a layer differs from the twin's: {row['max_rel']} (tolerance {row['tol']})"


@pytest.mark.parametrize("layout", list(correctness.CASES))
def test_layers_match_twin(report, layout):
    _check(report.get((layout, "plugin")))


@pytest.mark.skipif(not TWO_GPUS, reason="needs two GPUs")
@pytest.mark.parametrize("layout", list(correctness.CASES))
def test_tp2_layers_match_twin(report, layout):
    row = report.get((layout, "tp2"))
    _check(row)
    assert row.get("max_rel_vs_tp1", 0.0) <= row["tol"], row

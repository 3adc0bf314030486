"""On a CUDA GPU: each tiny layout, with the plugin, matches its dequantized twin.

Skipped where there is no CUDA GPU (CI is CPU-only). Runs the installed vLLM (with this
plugin installed) through ``tests/gpu/generate.py``, one process per run, eager mode;
``tests/gpu/correctness.py`` runs the same comparison as a matrix over releases.
TP=2 runs need two GPUs.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import correctness  # noqa: E402  (tests/gpu is on sys.path for this file)

TP_LAYOUTS = ["ct-fused-w4a16", "ct-fused-w4a16-router"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-ckpts")
    assert correctness.main(["build", str(root), "--jobs", "4"]) == 0
    return root


def _run(ckpts, tmp_path, layout, variant):
    args = correctness.argparse.Namespace(
        ckpts=ckpts,
        results=tmp_path,
        release=["installed"],
        variants=variant,
        layouts=layout,
        gpus="0",
    )
    (job,) = correctness.make_jobs(args)
    return correctness.run_job(job, timeout=600)


@pytest.fixture(scope="module")
def twins(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("twins")
    return {layout: _run(ckpts, out, layout, "twin") for layout in correctness.CASES}


# fp8-router quantizes activations (dynamic FP8 per token), which its bf16 twin does not:
# the twin is no exact reference there, so only "loads and routes" (not garbage) is checked.
NOT_EXACT = {"fp8-router"}
# vLLM's own limits, not this plugin's: (error text, why)
VLLM_LIMITS = {
    "Only symmetric quantization is supported for MoE": "this vLLM has no asymmetric "
    "int4 MoE kernel",
}


def _skip_vllm_limit(run):
    for text, why in VLLM_LIMITS.items():
        if text in (run.get("root_cause") or ""):
            pytest.skip(why)


@pytest.mark.parametrize("layout", list(correctness.CASES))
def test_layout_matches_twin(ckpts, twins, tmp_path, layout):
    run = _run(ckpts, tmp_path, layout, "plugin")
    if not run["ok"]:
        _skip_vllm_limit(run)
    assert run["ok"], run.get("root_cause") or run.get("error")
    assert twins[layout]["ok"], twins[layout].get("root_cause")
    cmp = correctness.compare(run, twins[layout])
    floor = correctness.FALLBACK_FLOOR["twin"]
    if layout in NOT_EXACT:
        floor = correctness.GARBAGE
    assert correctness.verdict(True, cmp, floor) == "within noise", cmp


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("layout", TP_LAYOUTS)
def test_tp2_matches_tp1(ckpts, tmp_path, layout):
    tp1 = _run(ckpts, tmp_path / "tp1", layout, "plugin")
    tp2 = _run(ckpts, tmp_path / "tp2", layout, "tp2")
    assert tp1["ok"] and tp2["ok"], (tp1.get("root_cause"), tp2.get("root_cause"))
    cmp = correctness.compare(tp2, tp1)
    floor = correctness.FALLBACK_FLOOR["tp1"]
    assert correctness.verdict(True, cmp, floor) == "within noise", cmp

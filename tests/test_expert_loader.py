"""Per-expert tensors on 0.19.0's expert mapping (patch ``expert_loader``).

That the public per-expert layouts load, with the values the checkpoints hold, and that
stock vLLM does not, is ``test_matrix.py``'s job (its 0.19.0 rows). Here: a per-expert
tensor that fits no expert parameter stops the load with its own name.
"""

from __future__ import annotations

import re

import pytest
from conftest import run_vllm_load
from test_expert_names import _copy_with

from gemma4_quant.patches import Status, expert_loader

NEEDED = expert_loader.detect().status is Status.NEEDED


def test_param_names() -> None:
    """Checkpoint spellings (multimodal prefix, ``moe.experts``) -> the experts' parameter."""
    name = expert_loader.model_param_name
    assert (
        name("model.language_model.layers.3.experts", "up_proj", "weight_global_scale")
        == "model.layers.3.moe.experts.w13_weight_global_scale"
    )
    assert (
        name("model.layers.0.moe.experts", "down_proj", "weight_shape")
        == "model.layers.0.moe.experts.w2_weight_shape"
    )
    assert name("model.layers.1.experts", "gate_proj", "qweight") == (
        "model.layers.1.moe.experts.w13_qweight"
    )


PREFIX = "model.language_model.layers.0.experts"
BAD = {
    # a suffix no expert parameter has
    "unknown-suffix": (
        f"{PREFIX}.0.gate_proj.weight_bogus",
        lambda t: t[f"{PREFIX}.0.gate_proj.weight_scale"].clone(),
        r"Checkpoint tensor '[\w.]*layers\.0\.experts\.0\.gate_proj\.weight_bogus' .*has no "
        r"parameter '[\w.]*moe\.experts\.w13_weight_bogus'.*w13_weight_packed",
    ),
    # an expert the layer does not have
    "expert-id": (
        f"{PREFIX}.99.down_proj.weight_packed",
        lambda t: t[f"{PREFIX}.0.down_proj.weight_packed"].clone(),
        r"Checkpoint tensor '[\w.]*experts\.99\.down_proj\.weight_packed': expert 99, but "
        r"'[\w.]*w2_weight_packed' has \d+ experts",
    ),
}


@pytest.mark.skipif(not NEEDED, reason="vLLM maps per-expert names itself on this release")
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_per_expert_tensor_is_named(checkpoints, tmp_path, case: str) -> None:
    name, make, message = BAD[case]

    def edit(tensors):
        tensors[name] = make(tensors)

    path = _copy_with(checkpoints("ct-per-expert-w4a16"), tmp_path / "ckpt", edit)
    load = run_vllm_load(path, tmp_path / "out")
    assert not load.ok
    assert re.search(message, load.log), load.log[-3000:]

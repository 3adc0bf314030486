"""An AutoRound checkpoint with tied embeddings builds where vLLM's base quantization
method refuses to tie (0.24.0): patch ``tied_lm_head``.

The load is the compatibility matrix's (``autoround-int4``, shared in a session); the
patch alone is switched off for the load that must fail. Where the release ties the head
itself or shares the weight in the base method, the detection says so and the tests
skip.
"""

from __future__ import annotations

import re

import pytest
import torch
from conftest import run_vllm_load
from test_matrix import LAYOUTS, TIE_ERROR

from gemma4_quant.patches import Status, tied_lm_head

LAYOUT = "autoround-int4"
NEEDED = tied_lm_head.detect().status is Status.NEEDED


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    if not NEEDED:
        pytest.skip(f"not needed on this release: {tied_lm_head.detect().reason}")
    return checkpoints(LAYOUT, **LAYOUTS[LAYOUT])


def test_stock_and_unpatched_fail_to_tie(checkpoint, vllm_load, tmp_path) -> None:
    stock = vllm_load(checkpoint, plugin=False)
    unpatched = run_vllm_load(
        checkpoint, tmp_path, env={"GEMMA4_QUANT_DISABLE_PATCHES": "tied_lm_head"}
    )
    for load in (stock, unpatched):
        assert not load.ok
        assert re.search(TIE_ERROR, load.log), load.log[-3000:]


def test_head_is_the_embedding(checkpoint, vllm_load) -> None:
    """With the patch the model builds and loads; the head computes with the embedding's
    weight, which is the checkpoint's (the loaded values themselves: test_matrix)."""
    from safetensors.torch import load_file

    load = vllm_load(checkpoint)
    assert load.ok, load.log[-3000:]
    assert "tied_lm_head applied" in load.log
    assert load.module_classes["lm_head"] == "ParallelLMHead"
    (embed,) = [t for n, t in load.tensors.items() if n.endswith("embed_tokens.weight")]
    (want,) = [
        t
        for file in checkpoint.glob("*.safetensors")
        for n, t in load_file(str(file)).items()
        if n.endswith("embed_tokens.weight")
    ]
    assert torch.equal(embed, want)
    # tied: one parameter, so the dump holds no second copy under lm_head
    assert not [n for n in load.tensors if n.startswith("lm_head.")]

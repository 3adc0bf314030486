"""text_mapper: the text-only model's quantization config sees vLLM's module names.

0.19.0 is the one release that needs the patch (``tests/test_compat.py`` pins "not
needed" on the tested ones); the compatibility matrix shows its effect there (stock:
``KeyError: 'layers.0.mlp.down_proj.weight'`` for every compressed-tensors layout, with
the plugin: loads). Here the patch's change runs on the installed release's own classes:
a class without the mapper gets one, and the real compressed-tensors config of a built
checkpoint, mapped by it, ignores exactly the modules vLLM builds under ``model.``.
"""

from __future__ import annotations

import json

import pytest

from gemma4_quant.patches import text_mapper

gemma4 = pytest.importorskip("vllm.model_executor.models.gemma4")


def test_a_class_without_the_mapper_gets_it(monkeypatch) -> None:
    monkeypatch.setattr(gemma4.Gemma4ForCausalLM, "hf_to_vllm_mapper", None, raising=False)
    text_mapper._patch(gemma4)
    mapper = gemma4.Gemma4ForCausalLM.hf_to_vllm_mapper
    assert mapper._map_name("model.language_model.layers.0.mlp.down_proj") == (
        "model.layers.0.mlp.down_proj"
    )
    assert mapper._map_name("lm_head") == "lm_head"


def test_mapped_ignore_list_names_vllms_modules(checkpoints, monkeypatch) -> None:
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    monkeypatch.setattr(gemma4.Gemma4ForCausalLM, "hf_to_vllm_mapper", None, raising=False)
    text_mapper._patch(gemma4)
    path = checkpoints("ct-fused-w4a16")
    qcfg = json.loads((path / "config.json").read_text())["quantization_config"]
    config = CompressedTensorsConfig.from_config(qcfg)
    assert "model.layers.0.mlp.down_proj" not in config.ignore
    config.apply_vllm_mapper(gemma4.Gemma4ForCausalLM.hf_to_vllm_mapper)
    layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    want = {
        f"model.layers.{i}.{m}"
        for i in range(layers)
        for m in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "router.proj")
    }
    assert want | {"lm_head"} == set(config.ignore)


def test_patch_keeps_an_existing_mapper(monkeypatch) -> None:
    existing = gemma4.Gemma4ForCausalLM.__dict__.get("hf_to_vllm_mapper")
    if existing is None:
        pytest.skip("this vLLM's Gemma4ForCausalLM has no mapper of its own")
    text_mapper._patch(gemma4)
    assert gemma4.Gemma4ForCausalLM.hf_to_vllm_mapper is existing

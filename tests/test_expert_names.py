"""Fused 3D quantized experts load into vLLM's expert parameters, bit for bit (D2 et al.).

Each test loads a tiny checkpoint with vLLM's own loader in a subprocess
(``tests/load_model.py``) and compares what vLLM's weight loaders wrote with the
checkpoint's own tensors, unpacked independently (``tests/unpack.py``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import Load
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from unpack import ct_int4

from gemma4_quant.patches import Status, expert_names, load_guard

GENERATION, _ = expert_names._generation()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def config_of(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config", config)


def expert_params(tensors: dict[str, torch.Tensor], layer: int, param: str) -> torch.Tensor:
    pattern = re.compile(rf"layers\.{layer}\..*experts\.{param}$")
    (name,) = [n for n in tensors if pattern.search(n)]
    return tensors[name]


def as_checkpoint_layout(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """vLLM keeps some expert tensors transposed ([E, in, out]); compare in [E, out, in]."""
    if param.shape == like.shape:
        return param
    assert param.transpose(1, 2).shape == like.shape, (param.shape, like.shape)
    return param.transpose(1, 2)


def assert_experts_equal(load, ckpt: dict[str, torch.Tensor], config: dict) -> None:
    group = 32
    compared = 0
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.language_model.layers.{layer}.experts."
        for fused, param in (("gate_up_proj", "w13"), ("down_proj", "w2")):
            packed = ckpt[f"{prefix}{fused}_packed"]
            scale = ckpt[f"{prefix}{fused}_scale"]
            zero = ckpt.get(f"{prefix}{fused}_zero_point")
            got_packed = as_checkpoint_layout(
                expert_params(load.tensors, layer, f"{param}_weight_packed"), packed
            )
            got_scale = as_checkpoint_layout(
                expert_params(load.tensors, layer, f"{param}_weight_scale"), scale
            )
            # bit for bit: the packed words and the scales vLLM holds are the checkpoint's
            assert torch.equal(got_packed.contiguous().view(torch.int32), packed), (layer, fused)
            assert torch.equal(got_scale.to(scale.dtype), scale), (layer, fused)
            # and the values they stand for, unpacked independently of vLLM and of
            # compressed-tensors: gate rows first, then up
            want = ct_int4(packed, scale, group, zero_point=zero)
            got = ct_int4(got_packed.contiguous(), got_scale.to(scale.dtype), group, zero)
            assert torch.equal(got, want)
            compared += 1
    assert compared == 2 * config["num_hidden_layers"]


def test_stock_d2_keyerror(checkpoints, vllm_load):
    """Stock vLLM fails as the release matrix says: the mapping KeyError on 0.19.1-0.20.2."""
    if GENERATION != "dotted":
        pytest.skip(f"D2 lives on the dotted-mapping releases; this one is {GENERATION}")
    load = vllm_load(checkpoints("ct-fused-w4a16"), plugin=False)
    assert not load.ok
    assert re.search(
        r"KeyError: 'layers\.0\.moe\.experts\.0\.(gate|up|down)_proj_packed'", load.log
    )


@pytest.mark.parametrize("layout", ["ct-fused-w4a16", "ct-fused-w4a16-shape"])
def test_fused_experts_bit_exact(checkpoints, vllm_load, layout):
    path = checkpoints(layout)
    load = vllm_load(path)
    assert load.ok, load.log[-3000:]
    assert "expert_names applied" in load.log
    assert_experts_equal(load, read_checkpoint(path), config_of(path))


def test_fused_shape_tensors_are_per_expert(checkpoints, vllm_load):
    """3-element `experts.<proj>_shape` ends up as each expert's [rows, cols]."""
    path = checkpoints("ct-fused-w4a16-shape")
    load = vllm_load(path)
    assert load.ok, load.log[-3000:]
    config = config_of(path)
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    w13 = expert_params(load.tensors, 0, "w13_weight_shape")
    w2 = expert_params(load.tensors, 0, "w2_weight_shape")
    assert w13.tolist() == [[inter, hidden]] * config["num_experts"]
    assert w2.tolist() == [[hidden, inter]] * config["num_experts"]


def test_shape_tensors_break_without_patch(checkpoints, vllm_load):
    """The test above bites: without the patch the `_shape` tensors never arrive."""
    path = checkpoints("ct-fused-w4a16-shape")
    load = vllm_load(path, env={"GEMMA4_QUANT_DISABLE_PATCHES": "expert_names"})
    if load_guard.detect().status is Status.NEEDED:
        # 0.24 - 0.30 drop the unmatched `_shape` tensors silently: the load succeeds and
        # the experts' weight_shape stays unfilled (no kernel reads it, so no harm)
        assert load.ok, load.log[-3000:]
        inter = config_of(path)["moe_intermediate_size"]
        hidden = config_of(path)["hidden_size"]
        w13 = expert_params(load.tensors, 0, "w13_weight_shape")
        assert w13.tolist() != [[inter, hidden]] * config_of(path)["num_experts"]
        return
    assert not load.ok
    # 0.19.1 - 0.20.2: the D2 KeyError comes first; 0.31+: vLLM's own expanded-size error
    assert re.search(r"KeyError: .*_(packed|shape)'|weight_shape|expanded size", load.log), (
        load.log[-3000:]
    )


def test_asymmetric(checkpoints, vllm_load):
    path = checkpoints("ct-fused-w4a16-asym")
    load = vllm_load(path)
    if GENERATION in ("dotted", "substring", "underscore") and not load.ok:
        # vLLM's compressed-tensors WNA16 MoE method is symmetric-only there
        assert "Only symmetric quantization is supported for MoE" in load.log
        return
    assert load.ok, load.log[-3000:]
    assert_experts_equal(load, read_checkpoint(path), config_of(path))


def test_per_expert_checkpoint_untouched(checkpoints, vllm_load):
    """Per-expert names pass through the rewrite unchanged and load as stock loads them."""
    path = checkpoints("ct-per-expert-w4a16")
    names = list(read_checkpoint(path))
    fake = ((name, torch.zeros(1)) for name in names)
    assert [name for name, _ in expert_names.rewrite(fake, GENERATION)] == names
    with_plugin = vllm_load(path)
    assert with_plugin.ok, with_plugin.log[-3000:]


def test_bf16_checkpoint_unchanged(checkpoints, vllm_load):
    """Where no patch is needed the loaded model is unchanged, bit for bit."""
    path = checkpoints("bf16")
    stock = vllm_load(path, plugin=False)
    patched = vllm_load(path)
    assert stock.ok, stock.log[-3000:]
    assert patched.ok, patched.log[-3000:]
    assert stock.tensors.keys() == patched.tensors.keys()
    for name, tensor in stock.tensors.items():
        assert torch.equal(tensor, patched.tensors[name]), name


def _copy_with(src: Path, dst: Path, edit_tensors=None, edit_config=None) -> Path:
    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.suffix == ".safetensors":
            tensors = load_file(str(file))
            if edit_tensors:
                edit_tensors(tensors)
            save_file(tensors, str(dst / file.name), metadata={"format": "pt"})
        elif file.name == "config.json":
            config = json.loads(file.read_text())
            if edit_config:
                edit_config(config)
            (dst / file.name).write_text(json.dumps(config, indent=2))
        else:
            (dst / file.name).write_bytes(file.read_bytes())
    return dst


def _text(config: dict) -> dict:
    return config.get("text_config", config)


MALFORMED = {
    "missing-scale": (
        lambda t: t.pop("model.language_model.layers.1.experts.down_proj_scale"),
        None,
        r"layers\.1\.experts\.down_proj_packed but no .*layers\.1\.experts\.down_proj_scale; "
        r"expected a tensor of shape \(8, 256, 8\)",
    ),
    "expert-count": (
        None,
        lambda c: _text(c).update(num_experts=4),
        r"experts\.(gate_up|down)_proj_packed' has shape \(8, .*num_experts=4",
    ),
    "group-size": (
        None,
        lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
            group_size=64
        ),
        r"experts\.(gate_up|down)_proj_scale' has shape \(8, \d+, 8\), expected \(8, \d+, 4\)"
        r".*group_size=64",
    ),
}


@pytest.fixture(scope="module")
def malformed_loads(checkpoints, vllm_load, tmp_path_factory) -> dict[str, Load]:
    """Every malformed copy of the fused checkpoint, loaded in one vLLM process."""
    src, root = checkpoints("ct-fused-w4a16"), tmp_path_factory.mktemp("malformed")
    paths = {case: _copy_with(src, root / case, *MALFORMED[case][:2]) for case in MALFORMED}
    return dict(zip(paths, vllm_load.many(list(paths.values())), strict=True))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_clear_error(malformed_loads, case):
    load = malformed_loads[case]
    assert not load.ok
    assert re.search(MALFORMED[case][2], load.log), load.log[-3000:]

"""The public formats past the reference checkpoint: Intel's AutoRound int4-mixed, GPTQ
g64 exports, ModelOpt NVFP4 (nvidia's, experts only; bg-digitalservices', everything and
the experts under ``.moe.experts``).

No release builds any of them on CPU stock (the compatibility matrix records how each
fails). With the plugin each is built and loaded, and:

- what vLLM loaded is the checkpoint: quantized tensors as stored (fused where vLLM fuses,
  the k_eq_v layers' V shard holding K's), GPTQ experts dequantized as they stream in
  equal to this directory's unpacker (``tests/unpack.py``), NVFP4 experts decoded by it
  equal to the dequantized twin, bit for bit in bf16;
- the patches each fix bites alone: with ``k_eq_v_scheme`` or ``moe_prefix`` left out,
  the plugin's load fails with vLLM's own error;
- the NVFP4 model, every fallback path at once (experts, linears, the name fix), serves
  the twin's prompt logprobs: its weights are the twin's and run through the same
  unquantized kernels, so the numbers agree to float rounding of identical operations
  (tolerance 1e-4; measured 0).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_logprobs, run_vllm_loads
from test_fallback import bits, same_bytes
from test_matrix import LAYOUTS as MATRIX
from test_matrix import matrix_paths
from test_router import assert_logits_match, router_logits
from test_unquantized_experts import bf16_exact_scales
from unpack import gptq, nvfp4

from gemma4_quant.checkpoints import load_tensors, write_twin
from gemma4_quant.layout import TEXT_PREFIX
from gemma4_quant.patches import Status, dequant_fallback, moe_prefix

FORMATS = ("autoround-int4-mixed", "gptq-int4-g64", "modelopt-nvfp4", "modelopt-nvfp4-moe")
FALLBACK = dequant_fallback.detect()
FOUND = FALLBACK.findings
# the one k_eq_v (full-attention) layer of the tiny config, and its stacked experts
K_EQ_V_LAYER = 3
PROMPT_TOLERANCE = 1e-4


def path_of(checkpoints, layout: str) -> Path:
    return checkpoints(layout, **MATRIX[layout])


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def vllm_tensor(load, name: str) -> torch.Tensor:
    """A loaded parameter by its name below ``layers.N`` (vLLM nests experts per release:
    ``experts``, ``moe.experts``, ``experts.routed_experts``)."""
    layer, rest = re.match(r"layers\.(\d+)\.(.*)$", name).groups()
    if rest.startswith("experts."):
        leaf = rest.removeprefix("experts.")
        pattern = rf"layers\.{layer}\.(?:.*\.)?(?:routed_)?experts\.{re.escape(leaf)}$"
    else:
        pattern = rf"layers\.{layer}\.{re.escape(rest)}$"
    found = [t for n, t in load.tensors.items() if re.search(pattern, n)]
    assert len(found) == 1, (name, [n for n in load.tensors if f"layers.{layer}." in n][:40])
    return found[0]


def ckpt_tensor(ckpt: dict, layer: int, rest: str) -> torch.Tensor:
    """A checkpoint tensor below ``layers.N``, experts under either spelling."""
    for name in (f"{TEXT_PREFIX}layers.{layer}.{rest}", f"{TEXT_PREFIX}layers.{layer}.moe.{rest}"):
        if name in ckpt:
            return ckpt[name]
    raise KeyError(rest)


# --------------------------------------------------------------------- stock vs plugin


@pytest.mark.parametrize("layout", FORMATS)
def test_plugin_builds_and_loads(checkpoints, vllm_load, layout: str) -> None:
    path, batch = path_of(checkpoints, layout), matrix_paths(checkpoints)
    stock = vllm_load(path, plugin=False, batch=batch)
    assert not stock.ok, f"stock vLLM built {layout} on CPU: the matrix row is out of date"
    plugin = vllm_load(path, batch=batch)
    assert plugin.ok, plugin.log[-3000:]


# The fix each of these patches makes, shown by leaving it out: vLLM's own error.
_LEFT_OUT = "k_eq_v_scheme,moe_prefix"
_BITES = {
    "autoround-int4-mixed": "requires consistent quant config",
    "gptq-int4-g64": "Detected some but not all shards of model.layers.3.self_attn.qkv_proj",
    "modelopt-nvfp4": "Detected some but not all shards of model.layers.3.self_attn.qkv_proj",
    # attention is quantized everywhere here: the experts' names fail
    "modelopt-nvfp4-moe": "moe",
}


@pytest.mark.parametrize("layout", FORMATS)
def test_each_fix_bites(checkpoints, vllm_load, layout: str) -> None:
    """The plugin without k_eq_v_scheme and moe_prefix fails where they apply."""
    path = path_of(checkpoints, layout)
    batch = [path_of(checkpoints, f) for f in FORMATS]
    if layout == "modelopt-nvfp4-moe" and moe_prefix.detect().status is not Status.NEEDED:
        pytest.skip(f"moe_prefix is not needed here: {moe_prefix.detect().reason}")
    load = vllm_load(path, batch=batch, env={"GEMMA4_QUANT_DISABLE_PATCHES": _LEFT_OUT})
    assert not load.ok, f"{layout} loaded without {_LEFT_OUT}"
    assert _BITES[layout] in load.log, load.log[-3000:]
    if layout == "modelopt-nvfp4-moe":
        assert re.search(r"moe\.moe\.experts|named 'layers\.0\.moe'", load.log), load.log[-3000:]


# --------------------------------------------------------------------- loaded tensors


def _gptq_parts(ckpt: dict, stem: str, model_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        "qweight": ckpt[stem + "qweight"],
        "qzeros": ckpt[stem + "qzeros"],
        "scales": ckpt[stem + "scales"].to(model_dtype),  # vLLM keeps scales in the model dtype
    }


def check_k_eq_v_qkv(load, ckpt: dict) -> None:
    """The k_eq_v layer's qkv_proj: q_proj's and k_proj's tensors, and k_proj's again."""
    stem = f"{TEXT_PREFIX}layers.{K_EQ_V_LAYER}.self_attn."
    assert stem + "v_proj.weight" not in ckpt and stem + "v_proj.qweight" not in ckpt
    shards = ("q_proj", "k_proj", "k_proj")
    if stem + "q_proj.qweight" in ckpt:  # GPTQ: [in / pack, out], fused along out
        for suffix in ("qweight", "qzeros", "scales"):
            got = vllm_tensor(load, f"layers.{K_EQ_V_LAYER}.self_attn.qkv_proj.{suffix}")
            parts = [_gptq_parts(ckpt, f"{stem}{s}.", got.dtype)[suffix] for s in shards]
            assert same_bytes(got, torch.cat(parts, dim=1)), suffix
        return
    weight = ckpt[stem + "q_proj.weight"]
    if weight.dtype == torch.uint8:  # NVFP4: fused along out, per-tensor scales per shard
        for suffix in ("weight", "weight_scale"):
            got = vllm_tensor(load, f"layers.{K_EQ_V_LAYER}.self_attn.qkv_proj.{suffix}")
            want = torch.cat([ckpt[f"{stem}{s}.{suffix}"] for s in shards])
            assert same_bytes(got, want), suffix
        for suffix in ("weight_scale_2", "input_scale"):
            got = vllm_tensor(load, f"layers.{K_EQ_V_LAYER}.self_attn.qkv_proj.{suffix}")
            want = torch.stack([ckpt[f"{stem}{s}.{suffix}"] for s in shards])
            assert torch.equal(got.reshape(-1), want), suffix
        return
    got = vllm_tensor(load, f"layers.{K_EQ_V_LAYER}.self_attn.qkv_proj.weight")
    assert torch.equal(got, torch.cat([ckpt[f"{stem}{s}.weight"] for s in shards]))


def check_experts(load, ckpt: dict, twin: dict, layers: int) -> None:
    """GPTQ experts arrive dequantized (unpack.gptq, rounded once to bf16); NVFP4 experts
    as stored, and their independent decoding is the twin's."""
    for layer in range(layers):
        gate_up = twin[f"{TEXT_PREFIX}layers.{layer}.experts.gate_up_proj"]
        down = twin[f"{TEXT_PREFIX}layers.{layer}.experts.down_proj"]
        w13 = vllm_tensor(load, f"layers.{layer}.experts.w13_weight")
        w2 = vllm_tensor(load, f"layers.{layer}.experts.w2_weight")
        experts = gate_up.shape[0]
        if w13.dtype == torch.bfloat16:  # GPTQ, dequantized by the plugin as it streamed
            for e in range(experts):
                for proj, got in (
                    ("gate_proj", w13[e, : w13.shape[1] // 2]),
                    ("up_proj", w13[e, w13.shape[1] // 2 :]),
                    ("down_proj", w2[e]),
                ):
                    stem = f"experts.{e}.{proj}."
                    parts = [ckpt_tensor(ckpt, layer, stem + s) for s in ("qweight", "qzeros")]
                    scales = ckpt_tensor(ckpt, layer, stem + "scales")
                    bits_ = 32 * parts[1].shape[1] // scales.shape[1]
                    want = gptq(*parts, scales, bits_).to(torch.bfloat16)
                    assert torch.equal(bits(got), bits(want)), (layer, e, proj)
            continue
        assert w13.dtype == torch.uint8, w13.dtype
        scale_2 = vllm_tensor(load, f"layers.{layer}.experts.w13_weight_scale_2")
        w13_scale = vllm_tensor(load, f"layers.{layer}.experts.w13_weight_scale")
        for e in range(experts):
            for i, proj in enumerate(("gate_proj", "up_proj")):
                rows = slice(i * w13.shape[1] // 2, (i + 1) * w13.shape[1] // 2)
                stem = f"experts.{e}.{proj}."
                assert same_bytes(w13[e, rows], ckpt_tensor(ckpt, layer, stem + "weight"))
                scale = ckpt_tensor(ckpt, layer, stem + "weight_scale")
                assert same_bytes(w13_scale[e, rows], scale)
                assert scale_2[e, i] == ckpt_tensor(ckpt, layer, stem + "weight_scale_2")
        half = w13.shape[1] // 2
        decoded = torch.cat(
            [
                nvfp4(w13[:, :half], w13_scale[:, :half], scale_2[:, 0]),
                nvfp4(w13[:, half:], w13_scale[:, half:], scale_2[:, 1]),
            ],
            dim=1,
        ).to(torch.bfloat16)
        assert torch.equal(bits(decoded), bits(gate_up)), ("w13", layer)
        w2_decoded = nvfp4(
            w2,
            vllm_tensor(load, f"layers.{layer}.experts.w2_weight_scale"),
            vllm_tensor(load, f"layers.{layer}.experts.w2_weight_scale_2"),
        ).to(torch.bfloat16)
        assert torch.equal(bits(w2_decoded), bits(down)), ("w2", layer)


def check_router(load, ckpt: dict, layers: int) -> None:
    for layer in range(layers):
        stem = f"{TEXT_PREFIX}layers.{layer}.router.proj."
        if stem + "qweight" in ckpt:  # int8 in the mixed recipe
            for suffix in ("qweight", "qzeros"):
                got = vllm_tensor(load, f"layers.{layer}.router.proj.{suffix}")
                assert same_bytes(got, ckpt[stem + suffix]), (layer, suffix)
        else:
            got = vllm_tensor(load, f"layers.{layer}.router.proj.weight")
            assert torch.equal(bits(got), bits(ckpt[stem + "weight"])), layer


@pytest.mark.parametrize("layout", FORMATS)
def test_loaded_tensors_are_the_checkpoints(checkpoints, vllm_load, layout: str) -> None:
    path = path_of(checkpoints, layout)
    load = vllm_load(path, batch=matrix_paths(checkpoints))
    assert load.ok, load.log[-3000:]
    assert_loaded_tensors(load, path, checkpoints.twin(layout, **MATRIX[layout]))


def assert_loaded_tensors(load, path: Path, twin_path: Path) -> None:
    """The k_eq_v layer's fused attention, every layer's experts and router are the
    checkpoint's (test_matrix's value check for these formats too)."""
    ckpt, twin = load_tensors(path), load_tensors(twin_path)
    layers = config_of(path)["num_hidden_layers"]
    check_k_eq_v_qkv(load, ckpt)
    check_experts(load, ckpt, twin, layers)
    check_router(load, ckpt, layers)


# --------------------------------------------------------------------- served


@pytest.mark.skipif(
    FOUND is None or not FOUND.nvfp4_moe, reason=f"no NVFP4 fallback here: {FALLBACK.reason}"
)
def test_nvfp4_serves_as_its_twin(checkpoints, tmp_path: Path) -> None:
    layout = "modelopt-nvfp4-moe"
    quantized = path_of(checkpoints, layout)
    twin = checkpoints.twin(layout, **MATRIX[layout])
    result = run_logprobs([quantized, twin], tmp_path)
    assert result.returncode == 0, result.log[-3000:]
    got, want = result.tokens[str(quantized)], result.tokens[str(twin)]
    assert "error" not in got, got
    assert got["tokens"] == want["tokens"]
    for a, b in zip(got["prompt_logprobs"], want["prompt_logprobs"], strict=True):
        delta = max(abs(x - y) for x, y in zip(a, b, strict=True))
        assert delta <= PROMPT_TOLERANCE, delta
    assert "NVFP4" in result.log, result.log[-3000:]


@pytest.mark.skipif(
    FOUND is None or not FOUND.gptq_linear or not FOUND.inc_cpu,
    reason=f"the fallback builds no INC linears here: {FALLBACK.reason}",
)
def test_autoround_mixed_router_matches_twin(checkpoints, tmp_path: Path) -> None:
    """Intel's int4-mixed on CPU: INC refuses its int8 linears (every quantized layer on
    0.19) or builds them with exllama's CUDA-only method (0.20 - 0.21, whose weight
    processing stops at ``gptq_shuffle``); with the plugin every linear gets vLLM's GPTQ
    linear method, its weights are processed for a kernel this CPU runs, and the int8
    router computes its dequantized twin's logits (scales made bf16-exact, so that both
    compute with the same weights)."""
    quantized = bf16_exact_scales(
        path_of(checkpoints, "autoround-int4-mixed"), tmp_path / "autoround-mixed"
    )
    twin = write_twin(quantized, tmp_path / "twin")
    loads = run_vllm_loads([quantized, twin], tmp_path / "loads", process=True, probe_router=True)
    load, reference = loads[quantized], loads[twin]
    assert load.ok, load.log[-4000:]
    assert reference.ok, reference.log[-4000:]
    assert_logits_match(router_logits(load), router_logits(reference))

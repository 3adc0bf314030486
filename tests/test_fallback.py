"""Quantized Gemma 4 MoE that vLLM has no kernel for loads dequantized, with exactly the
checkpoint's values, and generates as its dequantized bf16 twin does.

vLLM runs in subprocesses: ``tests/load_model.py`` (vLLM's own loader, parameters dumped)
and ``tests/greedy.py`` (``vllm.LLM``, greedy tokens). Checkpoints come from the
project's builder; the twin is ``write_twin`` of the same checkpoint, and the reference
values are ``tests/unpack.py``'s (written from the format spec, independent of vLLM, of
the fallback and of the plugin's codec). Stock vLLM (``GEMMA4_QUANT_DISABLE=1``) fails
every vLLM test here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_greedy, run_vllm_load
from greedy import MAX_TOKENS, PROMPTS
from unpack import ct_int4

from gemma4_quant import int4
from gemma4_quant.checkpoints import load_tensors
from gemma4_quant.layout import TEXT_PREFIX
from gemma4_quant.patches import Status, dequant_fallback, expert_names

DETECTION = dequant_fallback.detect()

pytestmark = pytest.mark.skipif(
    DETECTION.status is not Status.NEEDED,
    reason=f"dequant_fallback does not apply to this vLLM: {DETECTION.reason}",
)

SYM = "ct-fused-w4a16"  # the cyankiwi layout: int4, group 32, symmetric
ASYM = "ct-fused-w4a16-asym"  # the same with packed zero points
GROUP = 32
TEXT = TEXT_PREFIX
NO_KERNEL = "NotImplementedError: " + dequant_fallback.NO_MOE_KERNEL


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a 16-bit tensor, so that equality means bit for bit."""
    return t.contiguous().view(torch.int16)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of any two tensors of one dtype (0-d included)."""
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def num_layers(checkpoint: Path) -> int:
    return json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]


def expert_param(tensors: dict[str, torch.Tensor], layer: int, name: str) -> torch.Tensor | None:
    """A routed-experts parameter of one layer, wherever the release nests the experts
    (``layers.0.experts.routed_experts.*``, ``layers.0.moe.experts.routed_experts.*``,
    ``layers.0.moe.experts.*``)."""
    pattern = re.compile(rf"layers\.{layer}\.(?:.*\.)?(?:routed_)?experts\.{name}$")
    found = [t for n, t in tensors.items() if pattern.search(n)]
    assert len(found) <= 1, (layer, name)
    return found[0] if found else None


# vLLM's FusedMoE module of a layer and its weights, wherever the release nests it.
EXPERTS_MODULE = re.compile(r"layers\.\d+\.(?:.*\.)?(?:routed_)?experts$")
EXPERT_WEIGHT = re.compile(r"layers\.\d+\.(?:.*\.)?(?:routed_)?experts\.w(13|2)_weight$")


def reference_experts(ckpt: dict[str, torch.Tensor], layer: int, fused: str) -> torch.Tensor:
    """One layer's fused experts, unpacked independently, rounded once to bf16."""
    stem = f"{TEXT}layers.{layer}.experts.{fused}"
    zero_point = ckpt.get(f"{stem}_zero_point")
    return ct_int4(ckpt[f"{stem}_packed"], ckpt[f"{stem}_scale"], GROUP, zero_point).to(
        torch.bfloat16
    )


# --------------------------------------------------------------------- no vLLM


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [32, -1], ids=["group32", "channel"])
@pytest.mark.parametrize(
    ("scale_dtype", "dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.float32),
    ],
    ids=["bf16", "fp16", "bf16-scale-fp32"],
)
def test_dequantize_matches_unpack_int4(
    symmetric: bool, group: int, scale_dtype: torch.dtype, dtype: torch.dtype
) -> None:
    """The fallback's unpacking is the independent unpacker's, rounded once, bit for bit
    (a scale spanning several magnitudes exercises the rounding)."""
    gen = torch.Generator().manual_seed(0)
    experts, rows, cols = 3, 64, 256
    groups = 1 if group == -1 else cols // group
    words = torch.randint(-(2**31), 2**31, (experts, rows, cols // 8), generator=gen)
    packed = words.to(torch.int32)
    scale = torch.rand(experts, rows, groups, generator=gen) * 10.0 ** torch.randint(
        -6, 1, (experts, rows, groups), generator=gen
    )
    scale = scale.to(scale_dtype)
    zero = None
    if not symmetric:
        zero = torch.randint(-(2**31), 2**31, (experts, rows // 8, groups), generator=gen)
        zero = zero.to(torch.int32)
    got = int4.dequantize_packed(packed, scale, zero, num_bits=4, dtype=dtype)
    want = ct_int4(packed, scale, cols // groups, zero).to(dtype)
    assert got.dtype == dtype and same_bytes(got, want)
    one = int4.dequantize_packed(
        packed[1], scale[1], None if zero is None else zero[1], num_bits=4, dtype=dtype
    )
    assert same_bytes(one, want[1])


# --------------------------------------------------------------------- vLLM loads


@pytest.mark.parametrize("layout", [SYM, ASYM])
def test_vllm_placed_buffers_dequantize_to_checkpoint_values(
    checkpoints, tmp_path: Path, layout: str
) -> None:
    """vLLM's own weight loaders fill the fallback's packed buffers; what the fallback
    makes of them is the checkpoint's values, bit for bit."""
    checkpoint = checkpoints(layout)
    load = run_vllm_load(checkpoint, tmp_path)  # stops before process_weights_after_loading
    assert load.ok, load.log[-4000:]
    experts = {k: v for k, v in load.quant_methods.items() if EXPERTS_MODULE.search(k)}
    assert experts and set(experts.values()) == {"DequantizedWNA16MoEMethod"}, experts
    ckpt = load_tensors(checkpoint)
    for layer in range(num_layers(checkpoint)):
        for fused, param in (("gate_up_proj", "w13"), ("down_proj", "w2")):
            zero_point = expert_param(load.tensors, layer, f"{param}_weight_zero_point")
            assert (zero_point is None) == (layout == SYM)
            got = int4.dequantize_packed(
                expert_param(load.tensors, layer, f"{param}_weight_packed"),
                expert_param(load.tensors, layer, f"{param}_weight_scale"),
                zero_point,
                num_bits=4,
                dtype=torch.bfloat16,
            )
            want = reference_experts(ckpt, layer, fused)
            assert torch.equal(bits(got), bits(want)), (layout, layer, fused)


def test_processed_parameters_equal_the_twin(checkpoints, tmp_path: Path) -> None:
    """After process_weights_after_loading the model holds bf16 experts (and, where vLLM
    had no linear kernel, bf16 linears) equal to the twin's bit for bit, and the packed
    tensors are gone.

    vLLM's CPU MoE path prepacks ``w13_weight``/``w2_weight`` into its own tile layout,
    so they are compared with the twin's after the same prepacking; the twin's tensors
    themselves are the independent unpacking of the quantized checkpoint, checked first.
    """
    quantized, twin = checkpoints(SYM), checkpoints.twin(SYM)
    ckpt, twin_ckpt = load_tensors(quantized), load_tensors(twin)
    for layer in range(num_layers(quantized)):
        for fused in ("gate_up_proj", "down_proj"):
            name = f"{TEXT}layers.{layer}.experts.{fused}"
            assert torch.equal(bits(twin_ckpt[name]), bits(reference_experts(ckpt, layer, fused)))

    load = run_vllm_load(quantized, tmp_path / "quantized", process=True)
    assert load.ok, load.log[-4000:]
    reference = run_vllm_load(twin, tmp_path / "twin", process=True)
    assert reference.ok, reference.log[-4000:]

    assert not [n for n in load.tensors if re.search(r"experts\..*(_packed|_scale)", n)]
    expert_params = [n for n in reference.tensors if EXPERT_WEIGHT.search(n)]
    assert len(expert_params) == 2 * num_layers(quantized)
    # all but the attention's KV-cache scale buffers (``attn._k_scale`` ...), which the
    # quantization config shapes, not the weights
    compared = [n for n in reference.tensors if n in load.tensors and ".attn._" not in n]
    assert set(expert_params) <= set(compared)
    for name in compared:
        got, want = load.tensors[name], reference.tensors[name]
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert same_bytes(got, want), name
    # every parameter the quantized model holds beyond the twin's is a quantized
    # linear that vLLM has a kernel for on this machine
    extra = {n for n in set(load.tensors) - set(reference.tensors) if "weight" in n}
    assert all(".self_attn." in n for n in extra), sorted(extra)

    # one warning for the whole model, with what the fallback costs
    warnings = [line for line in load.log.splitlines() if "Dequantizing" in line]
    assert len(warnings) == 1, warnings
    # the whole warning on one line: scripts/demo.sh greps it with this pattern
    assert re.search(r"gemma4_quant: .*Dequantizing", warnings[0]), warnings
    assert re.search(r"\d+ MoE layers .*GiB of weights instead of [\d.]+ GiB packed", warnings[0])


@pytest.mark.parametrize(
    ("plugin", "env"),
    [(True, {"GEMMA4_QUANT_FALLBACK": "off"}), (False, {})],
    ids=["fallback-off", "stock-vllm"],
)
def test_without_fallback_vllm_has_no_kernel(
    checkpoints, tmp_path: Path, plugin: bool, env: dict[str, str]
) -> None:
    """The fallback is what makes these loads work: without it (switched off, or stock
    vLLM with no plugin loaded) vLLM's own error stands: no WNA16 MoE backend (0.23+),
    or Marlin MoE built on CPU and its CUDA repacking op missing (0.19 - 0.22). Stock
    0.19.1 - 0.20.2 stops before that, at the D2 KeyError (tests/test_expert_names.py)."""
    load = run_vllm_load(checkpoints(SYM), tmp_path, plugin=plugin, env=env, process=True)
    assert not load.ok
    errors = [re.escape(NO_KERNEL), r"has no attribute 'gptq_marlin_repack'"]
    if not plugin and expert_names.detect().findings == "dotted":
        errors.append(re.escape("KeyError: 'layers.0.moe.experts.0.down_proj_packed'"))
    assert re.search("|".join(errors), load.log), load.log[-4000:]
    assert "Dequantizing" not in load.log


# --------------------------------------------------------------------- generation


def test_greedy_tokens_equal_the_twin(checkpoints, tmp_path: Path) -> None:
    pairs = [(checkpoints(layout), checkpoints.twin(layout)) for layout in (SYM, ASYM)]
    # Every quantized layer dequantized, also where vLLM keeps a kernel of its own (its CPU
    # int4 linear on AVX-512): the model then computes exactly what the twin computes, so
    # its greedy tokens must be identical, not merely close. Auto mode, with a tolerance,
    # is what tests/test_server.py serves.
    run = run_greedy(
        [path for pair in pairs for path in pair],
        tmp_path,
        env={"GEMMA4_QUANT_FALLBACK": "force"},
    )
    assert run.returncode == 0, run.log[-4000:]
    assert run.log.count("Dequantizing") == 2, "one warning per quantized model"
    assert_same_tokens(run.tokens, pairs)


def assert_same_tokens(tokens: dict[str, list[list[int]]], pairs: list[tuple[Path, Path]]) -> None:
    """Each quantized model's greedy tokens are its twin's, for every prompt."""
    for quantized, twin in pairs:
        assert len(tokens[str(quantized)]) == len(PROMPTS)
        assert all(len(t) == MAX_TOKENS for t in tokens[str(quantized)])
        assert tokens[str(quantized)] == tokens[str(twin)], quantized.name

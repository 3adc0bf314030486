"""The tiny-checkpoint builder against the public layouts and compressed-tensors itself.

Expected names and shapes are written out from the layout spec for the default tiny
dimensions, not derived from the builder's code. The codec (``gemma4_quant.int4``) is
checked against the spec and compressed-tensors' decompressor; the twin against the
tests' own unpacker (``tests/unpack.py``). No vLLM engine is started.
"""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
import unpack
from safetensors.torch import load_file
from unpack import ct_int4, gptq, nvfp4

from gemma4_quant import checkpoints as ck
from gemma4_quant import int4
from gemma4_quant.layout import LAYER_NORMS, TEXT_PREFIX

P = TEXT_PREFIX
E, H, I_MOE, I_DENSE, V, HEADS, LAYERS = 8, 256, 256, 256, 512, 4, 4
BF16, I32, I64, F16 = torch.bfloat16, torch.int32, torch.int64, torch.float16
U8, F8, F32 = torch.uint8, torch.float8_e4m3fn, torch.float32
CT_INT4 = [
    "ct-fused-w4a16",
    "ct-fused-w4a16-asym",
    "ct-fused-w4a16-shape",
    "ct-per-expert-w4a16",
    "ct-fused-w4a16-router",
    "ct-fused-w4a16-dense",
]
# Google's QAT layouts: the dense E2B-like config (layout.LAYOUT_CONFIGS)
E2B = ("qat-unquantized", "qat-w4a16-ct")
QUANTIZED = [name for name in ck.LAYOUTS if name not in ("bf16", "qat-unquantized")]
GPTQ = ["autoround-int4", "autoround-int4-mixed", "gptq-int4-g64"]
MODELOPT = ["modelopt-nvfp4", "modelopt-nvfp4-moe"]

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


# --------------------------------------------------------------------------- the spec


def _attention(layer: int) -> dict[str, tuple[int, int]]:
    """Layers 0-2 sliding (2 KV heads x 64), layer 3 full (1 KV head x 128, K = V)."""
    hd, kv = (128, 1) if layer == 3 else (64, 2)
    mods = {"q_proj": (HEADS * hd, H), "k_proj": (kv * hd, H), "o_proj": (H, HEADS * hd)}
    if layer != 3:
        mods["v_proj"] = (kv * hd, H)
    return mods


def bf16_spec() -> Spec:
    spec: Spec = {P + "embed_tokens.weight": ((V, H), BF16), P + "norm.weight": ((H,), BF16)}
    for i in range(LAYERS):
        p = f"{P}layers.{i}."
        hd = 128 if i == 3 else 64
        for m, shape in _attention(i).items():
            spec[f"{p}self_attn.{m}.weight"] = (shape, BF16)
        spec[p + "self_attn.q_norm.weight"] = ((hd,), BF16)
        spec[p + "self_attn.k_norm.weight"] = ((hd,), BF16)
        spec[p + "mlp.gate_proj.weight"] = ((I_DENSE, H), BF16)
        spec[p + "mlp.up_proj.weight"] = ((I_DENSE, H), BF16)
        spec[p + "mlp.down_proj.weight"] = ((H, I_DENSE), BF16)
        spec[p + "router.proj.weight"] = ((E, H), BF16)
        spec[p + "router.scale"] = ((H,), BF16)
        spec[p + "router.per_expert_scale"] = ((E,), BF16)
        spec[p + "experts.gate_up_proj"] = ((E, 2 * I_MOE, H), BF16)
        spec[p + "experts.down_proj"] = ((E, H, I_MOE), BF16)
        for n in LAYER_NORMS:
            spec[f"{p}{n}.weight"] = ((H,), BF16)
        spec[p + "layer_scalar"] = ((1,), BF16)
    return spec


def e2b_spec() -> Spec:
    """The QAT layouts' bf16 tensors: 4 dense layers (sliding, full, sliding, full), 4
    heads of 64 / 128 with one KV head, per-layer inputs of 64; layers 2 and 3 are
    KV-shared (no k_proj, v_proj, k_norm) with a double-wide MLP (512)."""
    spec: Spec = {
        P + "embed_tokens.weight": ((V, H), BF16),
        P + "embed_tokens_per_layer.weight": ((V, LAYERS * 64), BF16),
        P + "per_layer_model_projection.weight": ((LAYERS * 64, H), BF16),
        P + "per_layer_projection_norm.weight": ((64,), BF16),
        P + "norm.weight": ((H,), BF16),
    }
    for i in range(LAYERS):
        p = f"{P}layers.{i}."
        hd = 128 if i % 2 else 64
        shared = i >= 2
        inter = 2 * I_DENSE if shared else I_DENSE
        spec[p + "self_attn.q_proj.weight"] = ((HEADS * hd, H), BF16)
        if not shared:
            spec[p + "self_attn.k_proj.weight"] = ((hd, H), BF16)
            spec[p + "self_attn.v_proj.weight"] = ((hd, H), BF16)
            spec[p + "self_attn.k_norm.weight"] = ((hd,), BF16)
        spec[p + "self_attn.o_proj.weight"] = ((H, HEADS * hd), BF16)
        spec[p + "self_attn.q_norm.weight"] = ((hd,), BF16)
        spec[p + "mlp.gate_proj.weight"] = ((inter, H), BF16)
        spec[p + "mlp.up_proj.weight"] = ((inter, H), BF16)
        spec[p + "mlp.down_proj.weight"] = ((H, inter), BF16)
        spec[p + "per_layer_input_gate.weight"] = ((64, H), BF16)
        spec[p + "per_layer_projection.weight"] = ((H, 64), BF16)
        spec[p + "post_per_layer_input_norm.weight"] = ((H,), BF16)
        for n in LAYER_NORMS[:4]:
            spec[f"{p}{n}.weight"] = ((H,), BF16)
        spec[p + "layer_scalar"] = ((1,), BF16)
    return spec


def _ct_nvfp4_module(out: int, inp: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {
        "weight_packed": ((out, inp // 2), torch.uint8),
        "weight_scale": ((out, inp // 16), torch.float8_e4m3fn),
        "weight_global_scale": ((1,), torch.float32),
        "input_global_scale": ((1,), torch.float32),
    }


def _ct_module(
    out: int, inp: int, asym: bool, bits: int = 4
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    spec = {
        "weight_packed": ((out, inp * bits // 32), I32),
        "weight_scale": ((out, inp // 32), BF16),
        "weight_shape": ((2,), I64),
    }
    if asym:
        spec["weight_zero_point"] = ((out // 8, inp // 32), I32)
    return spec


def _gptq_module(
    out: int, inp: int, bits: int = 4, group: int = 128
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    pack = 32 // bits
    return {
        "qweight": ((inp // pack, out), I32),
        "qzeros": ((inp // group, out // pack), I32),
        "scales": ((inp // group, out), F16),
    }


def _nvfp4_module(out: int, inp: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """ModelOpt NVFP4: two E2M1 codes a byte, an E4M3 scale per 16 columns, float32
    scalars for the tensor and its input."""
    return {
        "weight": ((out, inp // 2), U8),
        "weight_scale": ((out, inp // 16), F8),
        "weight_scale_2": ((), F32),
        "input_scale": ((), F32),
    }


def _fp8_module(out: int, inp: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {"weight": ((out, inp), torch.float8_e4m3fn), "weight_scale": ((out, 1), BF16)}


def _expert_modules(layer: str) -> dict[str, tuple[int, int]]:
    mods = {}
    for e in range(E):
        mods[f"{layer}experts.{e}.gate_proj"] = (I_MOE, H)
        mods[f"{layer}experts.{e}.up_proj"] = (I_MOE, H)
        mods[f"{layer}experts.{e}.down_proj"] = (H, I_MOE)
    return mods


def layout_spec(layout: str) -> Spec:
    """Every tensor (name -> shape, dtype) of ``layout`` at the tiny default dims."""
    if layout in E2B:
        spec = e2b_spec()
        if layout == "qat-unquantized":
            return spec
        for name in [n for n in spec if re.search(r"(_proj|_projection|_input_gate)\.weight$", n)]:
            out, inp = spec.pop(name)[0]
            parts = _ct_module(out, inp, asym=False)
            spec.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in parts.items()})
        return spec
    spec = bf16_spec()
    if layout == "bf16":
        return spec
    modules: dict[str, tuple[int, int]] = {}  # 2D modules quantized in this layout
    fused = layout in (*CT_INT4, "ct-fused-w8a16") and layout != "ct-per-expert-w4a16"
    bits = 8 if layout == "ct-fused-w8a16" else 4
    widths: dict[str, int] = {}  # autoround-int4-mixed: modules at 8 bits
    for i in range(LAYERS):
        p = f"{P}layers.{i}."
        if layout != "modelopt-nvfp4":  # nvidia's NVFP4 leaves attention bf16
            modules.update({f"{p}self_attn.{m}": s for m, s in _attention(i).items()})
        if layout in ("ct-fused-w4a16-router", "autoround-int4", "fp8-router", *GPTQ[1:2]):
            modules[p + "router.proj"] = (E, H)
        if layout in (
            "autoround-int4",
            "fp8-router",
            "ct-fused-w4a16-dense",
            "ct-fp8-dynamic",
            "ct-nvfp4",
            *GPTQ[1:],
            "modelopt-nvfp4-moe",
        ):
            modules[p + "mlp.gate_proj"] = (I_DENSE, H)
            modules[p + "mlp.up_proj"] = (I_DENSE, H)
            modules[p + "mlp.down_proj"] = (H, I_DENSE)
        if layout == "autoround-int4-mixed":
            widths.update({m: 8 for m in modules if m.startswith(p)})
        gate_up, down = spec.pop(p + "experts.gate_up_proj"), spec.pop(p + "experts.down_proj")
        if not fused:
            moe = p + "moe." if layout == "modelopt-nvfp4-moe" else p
            modules.update(_expert_modules(moe))
            continue
        asym = layout == "ct-fused-w4a16-asym"
        for name, ((e, out, inp), _) in (("gate_up_proj", gate_up), ("down_proj", down)):
            spec[f"{p}experts.{name}_packed"] = ((e, out, inp * bits // 32), I32)
            spec[f"{p}experts.{name}_scale"] = ((e, out, inp // 32), BF16)
            if asym:
                spec[f"{p}experts.{name}_zero_point"] = ((e, out // 8, inp // 32), I32)
            if layout == "ct-fused-w4a16-shape":
                spec[f"{p}experts.{name}_shape"] = ((3,), I64)
    for module, (out, inp) in modules.items():
        spec.pop(module + ".weight", None)  # per-expert modules replace the fused 3D ones
        if layout in GPTQ:
            group = 64 if layout == "gptq-int4-g64" else 128
            parts = _gptq_module(out, inp, widths.get(module, 4), group)
        elif layout in MODELOPT:
            parts = _nvfp4_module(out, inp)
        elif layout in ("fp8-router", "ct-fp8-dynamic"):
            parts = _fp8_module(out, inp)
        elif layout == "ct-nvfp4":
            parts = _ct_nvfp4_module(out, inp)
        else:
            parts = _ct_module(out, inp, asym=layout == "ct-fused-w4a16-asym", bits=bits)
        spec.update({f"{module}.{k}": v for k, v in parts.items()})
    return spec


def _tensors(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


@pytest.fixture(scope="module")
def base() -> dict[str, torch.Tensor]:
    """The bf16 weights every layout of seed 0 is made from."""
    return ck.base_state_dict(ck.make_text_config(), seed=0)


@pytest.fixture(scope="module")
def e2b_base() -> dict[str, torch.Tensor]:
    """The bf16 weights of the QAT layouts (seed 0)."""
    from gemma4_quant.layout import LAYOUT_CONFIGS

    return ck.base_state_dict(ck.make_text_config(**LAYOUT_CONFIGS["qat-w4a16-ct"]), seed=0)


# --------------------------------------------------------------------------- layouts


def test_layout_names_are_fixed():
    assert list(ck.LAYOUTS) == [
        "bf16",
        *CT_INT4,
        "autoround-int4",
        "fp8-router",
        "ct-fused-w8a16",
        "ct-fp8-dynamic",
        "ct-nvfp4",
        "qat-unquantized",
        "qat-w4a16-ct",
        *GPTQ[1:],
        *MODELOPT,
    ]


def test_qat_layouts_are_transformers_own(checkpoints) -> None:
    """The dense KV-shared layout is exactly what transformers' Gemma4ForCausalLM holds for
    its config: no k_proj, v_proj or k_norm on the KV-shared layers (transformers builds
    none), the per-layer inputs, the double-wide MLP there."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = checkpoints("qat-unquantized")
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    want = {n: tuple(t.shape) for n, t in model.state_dict().items() if n != "lm_head.weight"}
    # the public checkpoints keep the text model under model.language_model
    got = {n.replace(P, "model.", 1): tuple(t.shape) for n, t in _tensors(path).items()}
    assert got == want, sorted(set(got) ^ set(want))[:10]


@pytest.mark.parametrize("layout", list(ck.LAYOUTS))
def test_tensor_names_shapes_dtypes(checkpoints, layout):
    tensors = _tensors(checkpoints(layout))
    got = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
    assert got == layout_spec(layout)


def test_bf16_layout_is_the_base(checkpoints, base):
    tensors = _tensors(checkpoints("bf16"))
    assert tensors.keys() == base.keys()
    assert all(torch.equal(tensors[k], base[k]) for k in base)
    assert "quantization_config" not in _config(checkpoints("bf16"))


def test_seed_decides_the_weights(tmp_path, base):
    again = _tensors(ck.build_checkpoint(tmp_path / "a", "bf16", seed=0))
    other = _tensors(ck.build_checkpoint(tmp_path / "b", "bf16", seed=1))
    key = P + "layers.0.experts.down_proj"
    assert torch.equal(again[key], base[key])
    assert not torch.equal(other[key], base[key])


def test_weights_are_sane(base):
    for name, t in base.items():
        assert torch.isfinite(t.float()).all(), name
    router = base[P + "layers.0.router.proj.weight"].float()
    assert router.std() > 10 * base[P + "layers.0.self_attn.q_proj.weight"].float().std()


def test_config_overrides(tmp_path):
    out = ck.build_checkpoint(
        tmp_path / "o",
        "ct-fused-w4a16",
        num_experts=4,
        moe_intermediate_size=128,
        num_hidden_layers=2,
    )
    cfg, tensors = _config(out), _tensors(out)
    assert cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert tensors[P + "layers.1.experts.gate_up_proj_packed"].shape == (4, 256, 32)
    assert tensors[P + "layers.1.experts.down_proj_scale"].shape == (4, 256, 4)
    assert not any(".layers.2." in k for k in tensors)


def test_bad_dims_are_refused(tmp_path):
    with pytest.raises(ValueError, match="group size"):
        ck.build_checkpoint(tmp_path / "bad", "ct-fused-w4a16", moe_intermediate_size=48)
    with pytest.raises(ValueError, match="unknown layout"):
        ck.build_checkpoint(tmp_path / "bad", "awq")


# --------------------------------------------------------------------------- configs


@pytest.mark.parametrize("layout", list(ck.LAYOUTS))
def test_quantization_config(checkpoints, layout):
    import compressed_tensors

    q = _config(checkpoints(layout)).get("quantization_config")
    if layout in ("bf16", "qat-unquantized"):
        assert q is None
        return
    if layout.startswith("autoround-int4"):
        assert q["quant_method"] == "auto-round"
        assert (q["bits"], q["group_size"], q["sym"]) == (4, 128, True)
        assert q["packing_format"] == "auto_round:auto_gptq"
        assert q["block_name_to_quantize"] == P + "layers"
        saved = json.loads((checkpoints(layout) / "quantization_config.json").read_text())
        assert saved == q
        if layout == "autoround-int4-mixed":
            # exact module names, none for the k_eq_v layer's (absent) v_proj
            eight = {"bits": 8, "group_size": 128, "sym": True}
            names = [
                f"{P}layers.{i}.{m}"
                for i in range(LAYERS)
                for m in (
                    *(f"self_attn.{a}" for a in _attention(i)),
                    "mlp.gate_proj",
                    "mlp.up_proj",
                    "mlp.down_proj",
                    "router.proj",
                )
            ]
            assert q["extra_config"] == {name: eight for name in sorted(names)}
            assert f"{P}layers.3.self_attn.v_proj" not in q["extra_config"]
        else:
            assert "extra_config" not in q
        return
    if layout == "gptq-int4-g64":
        assert q["quant_method"] == "gptq"
        assert (q["bits"], q["group_size"], q["sym"], q["desc_act"]) == (4, 64, True, False)
        assert q["checkpoint_format"] == "gptq"
        saved = json.loads((checkpoints(layout) / "quantize_config.json").read_text())
        assert saved == q
        return
    if layout in MODELOPT:
        assert (q["quant_method"], q["quant_algo"]) == ("modelopt", "NVFP4")
        assert q["producer"]["name"] == "modelopt"
        routers = [f"{P}layers.{i}.router.proj" for i in range(LAYERS)]
        left = set(routers) | {"lm_head"}
        if layout == "modelopt-nvfp4":
            for i in range(LAYERS):
                left |= {f"{P}layers.{i}.self_attn.{a}" for a in _attention(i)}
                left |= {f"{P}layers.{i}.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")}
        assert set(q["ignore"]) == left
        legacy = json.loads((checkpoints(layout) / "hf_quant_config.json").read_text())
        quantization = legacy["quantization"]
        assert (quantization["quant_algo"], quantization["group_size"]) == ("NVFP4", 16)
        assert quantization["exclude_modules"] == q["ignore"]
        assert quantization["kv_cache_quant_algo"] is None
        return
    assert q["quant_method"] == "compressed-tensors"
    assert q["version"] == compressed_tensors.__version__
    assert q["quantization_status"] == "compressed"
    group = q["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"]
    if layout == "fp8-router":
        assert q["format"] == "float-quantized"
        assert q["ignore"] == ["lm_head"]
        w, a = group["weights"], group["input_activations"]
        assert (w["num_bits"], w["type"], w["strategy"], w["dynamic"]) == (
            8,
            "float",
            "channel",
            False,
        )
        assert (a["num_bits"], a["type"], a["strategy"], a["dynamic"]) == (
            8,
            "float",
            "token",
            True,
        )
        return
    # llm-compressor's Gemma 4 examples (RedHatAI FP8-Dynamic, NVFP4)
    llm_compressor_ignore = ["lm_head", "re:.*embed.*", "re:.*router", "re:.*vision_tower.*"]
    if layout == "ct-fp8-dynamic":
        assert q["format"] == "float-quantized"
        assert q["ignore"] == llm_compressor_ignore
        w, a = group["weights"], group["input_activations"]
        assert (w["num_bits"], w["type"], w["strategy"]) == (8, "float", "channel")
        assert (a["num_bits"], a["type"], a["strategy"], a["dynamic"]) == (
            8,
            "float",
            "token",
            True,
        )
        return
    if layout == "ct-nvfp4":
        assert q["format"] == group["format"] == "nvfp4-pack-quantized"
        assert q["ignore"] == llm_compressor_ignore
        for args in (group["weights"], group["input_activations"]):
            assert (args["num_bits"], args["type"], args["strategy"], args["group_size"]) == (
                4,
                "float",
                "tensor_group",
                16,
            )
        assert group["input_activations"]["dynamic"] == "local"
        return
    assert q["format"] == "pack-quantized"
    assert group["input_activations"] is None
    w = group["weights"]
    bits = 8 if layout == "ct-fused-w8a16" else 4
    assert (w["num_bits"], w["type"], w["strategy"], w["group_size"]) == (bits, "int", "group", 32)
    assert w["dynamic"] is False
    assert w["symmetric"] is (layout != "ct-fused-w4a16-asym")
    if layout == "qat-w4a16-ct":
        towers = ["vision_tower", "embed_vision", "audio_tower", "embed_audio"]
        assert q["ignore"] == ["lm_head", *(f"re:.*{t}.*" for t in towers)]
        return
    expected_ignore = []
    for i in range(LAYERS):
        if layout != "ct-fused-w4a16-dense":
            dense = ("gate_proj", "up_proj", "down_proj")
            expected_ignore += [f"{P}layers.{i}.mlp.{m}" for m in dense]
        if layout != "ct-fused-w4a16-router":
            expected_ignore.append(f"{P}layers.{i}.router.proj")
    assert q["ignore"] == expected_ignore + ["lm_head"]


@pytest.mark.parametrize("layout", ["bf16", "ct-fused-w4a16", "autoround-int4", "fp8-router"])
def test_transformers_reads_config_and_tokenizer(checkpoints, layout):
    from transformers import AutoConfig, AutoTokenizer

    path = checkpoints(layout)
    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "gemma4_text"
    assert cfg.architectures == ["Gemma4ForCausalLM"]
    assert (cfg.hidden_size, cfg.num_experts, cfg.top_k_experts) == (H, E, 2)
    assert cfg.layer_types == ["sliding_attention"] * 3 + ["full_attention"]
    assert cfg.attention_k_eq_v is True
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == cfg.vocab_size == V
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        cfg.bos_token_id,
        cfg.eos_token_id[0],
        cfg.pad_token_id,
    )
    text = "hello world, the quick brown fox!"
    ids = tok(text).input_ids
    assert ids[0] == cfg.bos_token_id and tok.decode(ids[1:]) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg.eos_token_id
    assert tok.convert_ids_to_tokens(cfg.eos_token_id) == ["<eos>", "<end_of_turn>"]


# --------------------------------------------------------------------------- packing


def _pack_by_hand(nibbles: torch.Tensor) -> torch.Tensor:
    """The spec, literally: nibble k of word w is column 8w+k, in bits [4k, 4k+4)."""
    rows, cols = nibbles.shape
    words = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for col in range(cols):
        words[:, col // 8] += nibbles[:, col].to(torch.int64) << (4 * (col % 8))
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def test_unpack_int4_follows_the_spec():
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    gen = torch.Generator().manual_seed(1)
    nib = torch.randint(0, 16, (3, 16, 64), generator=gen)
    scale = torch.rand(3, 16, 2, generator=gen).to(BF16)
    packed = torch.stack([_pack_by_hand(n) for n in nib])
    # the library packs signed q = nibble - 8 the same way
    assert torch.equal(pack_to_int32((nib[0] - 8).to(torch.int8), 4), packed[0])
    assert torch.equal(int4.unpack_int4_raw(packed), nib.to(torch.int32))
    expected = torch.empty(3, 16, 64)
    for c in range(64):
        expected[..., c] = (nib[..., c] - 8).float() * scale[..., c // 32].float()
    assert torch.equal(int4.unpack_int4(packed, scale, 32), expected)  # 3D
    assert torch.equal(int4.unpack_int4(packed[1], scale[1], 32), expected[1])  # 2D


def test_unpack_int4_asymmetric():
    gen = torch.Generator().manual_seed(2)
    nib = torch.randint(0, 16, (16, 64), generator=gen)
    zp = torch.randint(0, 16, (16, 2), generator=gen)
    scale = torch.rand(16, 2, generator=gen).to(BF16)
    zp_packed = _pack_by_hand(zp.t().contiguous()).t()  # zero points packed along rows
    assert zp_packed.shape == (2, 2)
    got = int4.unpack_int4(_pack_by_hand(nib), scale, 32, zp_packed)
    for r in range(16):
        for c in range(0, 64, 7):
            assert got[r, c] == (nib[r, c] - zp[r, c // 32]).float() * scale[r, c // 32].float()


def _ct_modules(
    tensors: dict[str, torch.Tensor], layers: tuple[int, ...] = (0, 3)
) -> dict[str, dict[str, torch.Tensor]]:
    """Per 2D module of ``layers`` (a sliding and the full one by default): its
    compressed-tensors tensors; fused experts split per expert."""
    mods: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer is None or int(layer[1]) not in layers:
            continue
        m = re.match(r"(.*)\.(weight_(?:packed|scale|zero_point|shape))$", name)
        if m:
            mods.setdefault(m[1], {})[m[2]] = t
            continue
        m = re.match(r"(.*\.experts\.(?:gate_up|down)_proj)_(packed|scale|zero_point)$", name)
        if m:
            for e in range(t.shape[0]):
                mods.setdefault(f"{m[1]}[{e}]", {})["weight_" + m[2]] = t[e]
    return mods


def _original_weight(base: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    m = re.match(r"(.*)\[(\d+)\]$", module)
    if m:  # fused expert slice
        return base[m[1]][int(m[2])]
    m = re.match(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj$", module)
    if m:
        e, proj = int(m[2]), m[3]
        if proj == "down":
            return base[m[1] + ".down_proj"][e]
        gate_up = base[m[1] + ".gate_up_proj"][e]
        return gate_up[:I_MOE] if proj == "gate" else gate_up[I_MOE:]
    return base[module + ".weight"]


@pytest.mark.parametrize("layout", CT_INT4)
def test_packed_bytes_equal_compressed_tensors(checkpoints, base, layout):
    """Each module's tensors are what compressed-tensors' own compressor writes for the
    original bf16 weight, with the min/max scale its calculate_qparams gives."""
    from compressed_tensors.compressors.pack_quantized import (
        PackedQuantizationCompressor,
        unpack_from_int32,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    asym = layout == "ct-fused-w4a16-asym"
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=not asym, strategy="group", group_size=32
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    mods = _ct_modules(_tensors(checkpoints(layout)))
    per_layer = 3 * E if layout == "ct-per-expert-w4a16" else 2 * E  # modules or slices
    assert sum("experts" in m for m in mods) == 2 * per_layer
    for module, saved in mods.items():
        w = _original_weight(base, module)
        groups = w.reshape(w.shape[0], -1, 32)
        scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        assert torch.equal(saved["weight_scale"], scale), module
        state = {"weight": w, "weight_scale": saved["weight_scale"]}
        if asym:
            state["weight_zero_point"] = unpack_from_int32(
                saved["weight_zero_point"], 4, torch.Size(scale.shape), packed_dim=0
            )
            assert torch.equal(state["weight_zero_point"], zp), module
        ref = PackedQuantizationCompressor.compress(state, scheme)
        assert torch.equal(saved["weight_packed"], ref["weight_packed"]), module
        if asym:
            assert torch.equal(saved["weight_zero_point"], ref["weight_zero_point"]), module
        if "weight_shape" in saved:
            assert saved["weight_shape"].tolist() == list(w.shape)


@pytest.mark.parametrize("layout", ["ct-fused-w4a16", "ct-fused-w4a16-asym"])
def test_unpack_int4_agrees_with_decompressor(checkpoints, layout):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    asym = layout.endswith("asym")
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=not asym, strategy="group", group_size=32
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = _tensors(checkpoints(layout))
    for module, saved in _ct_modules(tensors).items():
        saved.setdefault(
            "weight_shape",
            torch.tensor([saved["weight_packed"].shape[0], saved["weight_packed"].shape[1] * 8]),
        )
        ref = PackedQuantizationCompressor.decompress(dict(saved), scheme)["weight"]
        mine = int4.unpack_int4(
            saved["weight_packed"], saved["weight_scale"], 32, saved.get("weight_zero_point")
        )
        assert mine.dtype == torch.float32
        assert torch.equal(mine.to(BF16), ref), module
    # 3D in one call equals the per-expert results
    p = P + "layers.3.experts.down_proj"
    whole = int4.unpack_int4(
        tensors[p + "_packed"], tensors[p + "_scale"], 32, tensors.get(p + "_zero_point")
    )
    mods = _ct_modules(tensors)
    one = mods[p + "[5]"]
    assert torch.equal(
        whole[5],
        int4.unpack_int4(
            one["weight_packed"], one["weight_scale"], 32, one.get("weight_zero_point")
        ),
    )


def test_autoround_is_gptq_format(checkpoints, base):
    tensors = _tensors(checkpoints("autoround-int4"))
    m = P + "layers.0.router.proj"
    qweight, qzeros, scales = (tensors[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales"))
    # symmetric: every zero point is 8, stored as 8 - 1 in each nibble
    assert (qzeros == 0x77777777).all()
    value = torch.empty(E, H)
    for i in range(H):  # qweight [in/8, out]: nibble i % 8 of row i // 8
        nib = (qweight[i // 8] >> (4 * (i % 8))) & 0xF
        value[:, i] = (nib - 8).float() * scales[i // 128].float()
    assert torch.equal(int4.unpack_gptq_int4(qweight, qzeros, scales), value)
    # round to nearest with scale = absmax / 7.5 (rounded to fp16, hence the margin):
    # within half a step of the original
    w = base[m + ".weight"].float()
    step = scales.float().repeat_interleave(128, 0).t()
    assert ((value - w).abs() <= 0.51 * step).all()


def test_gptq_zero_points_are_v1_and_g_idx_picks_groups():
    """qzeros hold zero - 1 (GPTQ v1: what AutoRound's auto_gptq export writes and vLLM's
    GPTQ kernels read back as stored + 1); g_idx is the group of every input row."""
    gen = torch.Generator().manual_seed(3)
    inp, out, group = 256, 16, 128
    q = torch.randint(0, 16, (inp, out), generator=gen)
    zeros = torch.randint(1, 16, (inp // group, out), generator=gen)
    scales = torch.rand(inp // group, out, generator=gen).to(F16)
    packed = int4.pack_gptq(q, zeros, scales)
    for g in range(inp // group):
        for n in range(out):  # nibble n % 8 of word n // 8
            assert (packed["qzeros"][g, n // 8] >> (4 * (n % 8))) & 0xF == zeros[g, n] - 1
    g_idx = (torch.arange(inp) // group)[torch.randperm(inp, generator=gen)].to(torch.int32)
    got = int4.unpack_gptq_int4(packed["qweight"], packed["qzeros"], scales, g_idx)
    assert got.shape == (out, inp)
    for i in range(0, inp, 5):
        g = int(g_idx[i])
        assert torch.equal(got[:, i], (q[i] - zeros[g]).float() * scales[g].float()), i
    with pytest.raises(ValueError, match="zero point of 0"):
        int4.pack_gptq(q, torch.zeros_like(zeros), scales)


def test_fp8_matches_compressor(checkpoints, base):
    from compressed_tensors.compressors.naive_quantized import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    w_args = QuantizationArgs(num_bits=8, type="float", strategy="channel", symmetric=True)
    scheme = QuantizationScheme(targets=["Linear"], weights=w_args)
    tensors = _tensors(checkpoints("fp8-router"))
    for module in (
        P + "layers.0.router.proj",
        P + "layers.3.experts.7.up_proj",
        P + "layers.2.self_attn.v_proj",
        P + "layers.1.mlp.down_proj",
    ):
        w = _original_weight(base, module)
        scale = tensors[module + ".weight_scale"]
        assert torch.equal(scale, (w.float().abs().amax(1, keepdim=True) / 448).to(BF16))
        ref = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale}, scheme)
        assert torch.equal(
            tensors[module + ".weight"].view(torch.uint8), ref["weight"].view(torch.uint8)
        )


def test_nvfp4_matches_compressor(checkpoints, base):
    """NVFP4 modules are what compressed-tensors' compressor writes for the module alone
    with its global scale; modules vLLM fuses share one (the smallest of theirs); the
    library's decompressor and the plugin's codec agree."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

    from gemma4_quant.checkpoints.quantizers import ct_nvfp4_args

    w_args, a_args = ct_nvfp4_args()
    scheme = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    tensors = _tensors(checkpoints("ct-nvfp4"))
    fused = {
        P + "layers.0.self_attn.": ("q_proj", "k_proj", "v_proj"),
        P + "layers.2.mlp.": ("gate_proj", "up_proj"),
        P + "layers.3.experts.5.": ("gate_proj", "up_proj"),
    }
    for prefix, projs in fused.items():
        weights = [_original_weight(base, prefix + proj).float() for proj in projs]
        want = min(generate_gparam(w.amin(), w.amax()) for w in weights)
        for proj, w in zip(projs, weights, strict=True):
            module = prefix + proj
            saved = {
                k.rpartition(".")[2]: t for k, t in tensors.items() if k.startswith(module + ".")
            }
            assert torch.equal(saved["weight_global_scale"], want.reshape(1)), module
            groups = w.reshape(w.shape[0], -1, 16)
            scale, _ = calculate_qparams(
                groups.amin(-1), groups.amax(-1), w_args, global_scale=want
            )
            ref = NVFP4PackedCompressor.compress(
                {"weight": w, "weight_scale": scale, "weight_global_scale": want}, scheme
            )
            assert torch.equal(saved["weight_packed"], ref["weight_packed"]), module
            assert torch.equal(
                saved["weight_scale"].view(torch.uint8), ref["weight_scale"].view(torch.uint8)
            ), module
            lib = NVFP4PackedCompressor.decompress(dict(saved), scheme)["weight"]
            mine = int4.dequantize_nvfp4(
                saved["weight_packed"], saved["weight_scale"], saved["weight_global_scale"]
            )
            assert torch.equal(mine.to(BF16), lib.to(BF16)), module


def test_int8_matches_compressor(checkpoints, base):
    """int8 pack-quantized (four values to an int32 word) is compressed-tensors' own, and
    its decompressor agrees with the plugin's codec."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    tensors = _tensors(checkpoints("ct-fused-w8a16"))
    for module, saved in _ct_modules(tensors).items():
        w = _original_weight(base, module)
        ref = PackedQuantizationCompressor.compress(
            {"weight": w, "weight_scale": saved["weight_scale"]}, scheme
        )
        assert torch.equal(saved["weight_packed"], ref["weight_packed"]), module
        saved.setdefault("weight_shape", torch.tensor(list(w.shape)))
        lib = PackedQuantizationCompressor.decompress(dict(saved), scheme)["weight"]
        mine = int4.dequantize_packed(saved["weight_packed"], saved["weight_scale"], num_bits=8)
        assert torch.equal(mine.to(BF16), lib), module


# --------------------------------------------------------------------------- twin


def _expected_twin(
    tensors: dict[str, torch.Tensor], name: str, bits: int = 4
) -> torch.Tensor | None:
    """The dequantized value of base tensor ``name``, read directly from the checkpoint."""

    def deq(stem: str) -> torch.Tensor:
        packed = tensors.get(stem + "_packed")
        if packed is not None and packed.dtype == torch.uint8:  # NVFP4
            return unpack.ct_nvfp4(
                packed, tensors[stem + "_scale"], tensors[stem + "_global_scale"]
            )
        if packed is not None and bits == 8:
            return unpack.ct_int8(packed, tensors[stem + "_scale"], 32)
        if packed is not None:  # compressed-tensors int4
            return ct_int4(
                tensors[stem + "_packed"],
                tensors[stem + "_scale"],
                32,
                tensors.get(stem + "_zero_point"),
            )
        base = stem.removesuffix("weight")
        if base + "qweight" in tensors:
            parts = [tensors[base + k] for k in ("qweight", "qzeros", "scales")]
            return gptq(*parts, 32 * parts[1].shape[1] // parts[2].shape[1])
        if stem in tensors and tensors[stem].dtype == torch.uint8:
            return nvfp4(tensors[stem], tensors[stem + "_scale"], tensors[stem + "_scale_2"])
        if stem in tensors and tensors[stem].dtype == torch.float8_e4m3fn:
            return tensors[stem].float() * tensors[stem + "_scale"].float()
        return None

    m = re.match(r"(.*\.experts)\.(gate_up|down)_proj$", name)
    if m and name not in tensors and name + "_packed" not in tensors:  # per-expert layout
        moe = m[1].replace(".experts", ".moe.experts")
        if f"{moe}.0.down_proj.weight" in tensors:  # experts exported under `.moe`
            m = re.match(r"(.*)\.(gate_up|down)_proj$", f"{moe}.{m[2]}_proj")
        parts = []
        for e in range(E):
            if m[2] == "down":
                parts.append(deq(f"{m[1]}.{e}.down_proj.weight"))
            else:
                parts.append(
                    torch.cat(
                        [deq(f"{m[1]}.{e}.gate_proj.weight"), deq(f"{m[1]}.{e}.up_proj.weight")]
                    )
                )
        return torch.stack(parts)
    return deq(name)


@pytest.mark.parametrize("layout", list(ck.LAYOUTS))
def test_twin(checkpoints, base, e2b_base, layout):
    src, twin = checkpoints(layout), checkpoints.twin(layout)
    spec = e2b_spec() if layout in E2B else bf16_spec()
    base = e2b_base if layout in E2B else base
    bits = 8 if layout == "ct-fused-w8a16" else 4
    # the largest quantization error against the weight's absolute maximum: half an int4
    # step (max / 7.5, hence 0.1), half an FP4 step between its two largest values 4 and 6
    # (1 / 6 of the maximum, and the FP8 group scale's own rounding)
    bound = 0.2 if layout in ("ct-nvfp4", *MODELOPT) else 0.1
    cfg, twin_cfg = _config(src), _config(twin)
    assert "quantization_config" not in twin_cfg
    cfg.pop("quantization_config", None)
    assert twin_cfg == cfg
    assert not (twin / "quantization_config.json").exists()
    assert (twin / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    tensors, twin_tensors = _tensors(src), _tensors(twin)
    assert {k: (tuple(v.shape), v.dtype) for k, v in twin_tensors.items()} == spec
    n_dequantized = 0
    for name, t in twin_tensors.items():
        expected = _expected_twin(tensors, name, bits)
        if expected is None:  # never quantized: carried over bit for bit
            assert torch.equal(t, base[name]), name
            continue
        n_dequantized += 1
        assert torch.equal(t, expected.to(BF16)), name
        # and it is the original up to quantization error (an int4 step is max / 7.5; the
        # E2M1 step below 6 is 2, so NVFP4 rounds by up to a block's max / 6)
        err = (t.float() - base[name].float()).abs().max()
        assert err <= bound * base[name].float().abs().max(), name
    assert n_dequantized > 0 or layout in ("bf16", "qat-unquantized")


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from gemma4_quant.cli import build_parser

    return build_parser()


def test_cli_lists_layouts(capsys):
    args = _parser().parse_args(["build", "--list-layouts"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ck.LAYOUTS)


def test_cli_build_and_twin(tmp_path, checkpoints):
    parser = _parser()
    args = parser.parse_args(["build", str(tmp_path / "b"), "--layout", "bf16", "--seed", "0"])
    assert args.func(args) == 0
    ref = _tensors(checkpoints("bf16"))
    got = _tensors(tmp_path / "b")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    args = parser.parse_args(["twin", str(checkpoints("ct-fused-w4a16")), str(tmp_path / "t")])
    assert args.func(args) == 0
    assert "quantization_config" not in _config(tmp_path / "t")
    overrides = ["--set", "num_experts=4", "--set", "num_hidden_layers=2"]
    args = parser.parse_args(["build", str(tmp_path / "s"), "--layout", "bf16", *overrides])
    assert args.func(args) == 0
    assert _config(tmp_path / "s")["num_experts"] == 4
    args = parser.parse_args(["build"])
    assert args.func(args) == 2
    with pytest.raises(SystemExit):
        parser.parse_args(["build", str(tmp_path / "x"), "--layout", "nope"])

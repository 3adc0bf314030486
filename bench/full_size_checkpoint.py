"""A synthetic checkpoint in the full cyankiwi/gemma-4-26B-A4B-it-AWQ-4bit layout (~16 GB).

Same tensor names, shapes, dtypes and quantization_config as the real checkpoint
(text weights only, under ``model.language_model.*``; see the layout facts): 30 layers
(5 sliding + 1 full, repeated), hidden 2816, 128 experts top-8 with intermediate 704 in
fused 3D int4 (``experts.gate_up_proj_packed`` [128, 1408, 352] ...), compressed-tensors
pack-quantized int4 group 32 symmetric for the experts and attention q/k/v/o, bf16 dense
MLP (2112), router, norms and tied embeddings (vocab 262144). The config is the
builder's text-only one (``Gemma4ForCausalLM``), so any vLLM release loads it as it
loads the public checkpoint's text model.

Values are random (int32 words drawn uniformly: every nibble uniform in 0..15; scales and
bf16 weights scaled to keep activations finite): fine for load time and throughput, not
for text. With ``--device cuda`` the random words are drawn on the GPU (seconds);
writing ~16 GB of safetensors dominates.

    python bench/full_size_checkpoint.py OUT_DIR [--device cuda] [--shards 8]
    python bench/full_size_checkpoint.py OUT_DIR --meta-only      # config + tokenizer only
    python bench/full_size_checkpoint.py OUT_DIR --weights-only   # the safetensors only
    python bench/full_size_checkpoint.py OUT_DIR --set num_hidden_layers=2  # smaller, for tests
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import sys
import time
from pathlib import Path

from gemma4_quant.layout import REAL_DIMS, TEXT_PREFIX, layer_prefix, layer_tensors, module_kind

GROUP = 32

# google/gemma-4-26B-A4B-it text model, as in the layout facts.
FULL_DIMS = {
    **REAL_DIMS,
    "vocab_size": 262144,
    "vocab_size_per_layer_input": 262144,
    "num_experts": 128,
    "top_k_experts": 8,
    "num_hidden_layers": 30,
    "max_position_embeddings": 262144,
    "final_logit_softcapping": 30.0,
    "tie_word_embeddings": True,
}
BF16_STD = 0.02
INT4_STD = 4.6  # std of a uniform nibble - 8
ROUTER_STD = 0.02


def full_config(**overrides) -> dict:
    from gemma4_quant.checkpoints import make_text_config

    dims = {**FULL_DIMS, **overrides}
    n = dims["num_hidden_layers"]
    if "layer_types" not in overrides:
        # 5 sliding + 1 full, repeated: layers 5, 11, 17, 23, 29 are full attention
        dims["layer_types"] = [
            "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)
        ]
    if "vocab_size_per_layer_input" not in overrides:
        dims["vocab_size_per_layer_input"] = dims["vocab_size"]
    cfg = make_text_config(**dims)
    cfg["quantization_config"] = quantization_config(n)
    return cfg


def quantization_config(num_layers: int) -> dict:
    """compressed-tensors' own ``quantization_config`` for int4 g32 sym pack-quantized,
    with the dense MLP and the router of every layer ignored (bf16), as cyankiwi's."""
    ignore = []
    for i in range(num_layers):
        p = layer_prefix(i)
        ignore += [p + "mlp.gate_proj", p + "mlp.up_proj", p + "mlp.down_proj", p + "router.proj"]
    weights = {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": GROUP,
        "num_bits": 4,
        "observer": "memoryless_minmax",
        "observer_kwargs": {},
        "scale_dtype": None,
        "strategy": "group",
        "symmetric": True,
        "type": "int",
        "zp_dtype": None,
    }
    return {
        "config_groups": {
            "group_0": {
                "format": "pack-quantized",
                "input_activations": None,
                "output_activations": None,
                "targets": ["Linear"],
                "weights": weights,
            }
        },
        "format": "pack-quantized",
        "global_compression_ratio": None,
        "ignore": ignore + ["lm_head"],
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.17.0",
    }


def write_meta(out: Path, cfg: dict) -> None:
    """config.json and a tokenizer with the full vocabulary (the builder's byte-level BPE,
    padded with ``<unused_N>`` tokens up to vocab_size)."""
    from gemma4_quant.checkpoints import write_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    write_tokenizer(out, 512)
    tok = json.loads((out / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    for i in range(len(vocab), cfg["vocab_size"]):
        vocab[f"<unused_{i}>"] = i
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))


def layer_specs(cfg: dict, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, kind, shape) of one decoder layer's tensors; kind in packed / scale /
    shape / bf16 / norm / ones / router."""
    p = layer_prefix(i)
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    for name, role, shape in layer_tensors(cfg, i):
        module = p + name.removesuffix(".weight")
        if role == "linear" and module_kind(module) == "attention":  # int4, 2D names
            out_f, in_f = shape
            specs.append((f"{module}.weight_packed", "packed", (out_f, in_f // 8)))
            specs.append((f"{module}.weight_scale", "scale", (out_f, in_f // GROUP)))
            specs.append((f"{module}.weight_shape", f"shape:{out_f},{in_f}", (2,)))
        elif role == "experts":  # int4, fused 3D names
            e, out_f, in_f = shape
            specs.append((f"{module}_packed", "packed", (e, out_f, in_f // 8)))
            specs.append((f"{module}_scale", "scale", (e, out_f, in_f // GROUP)))
        else:  # the dense MLP stays bf16; router, norm and ones are kinds of their own
            specs.append((p + name, "bf16" if role == "linear" else role, shape))
    return specs


def make_tensor(kind: str, shape: tuple[int, ...], gen, device: str):
    import torch

    bf16 = torch.bfloat16
    if kind == "packed":
        t = torch.randint(
            -(2**31), 2**31 - 1, shape, dtype=torch.int32, device=device, generator=gen
        )
    elif kind == "scale":  # weights of std ~BF16_STD, scales varying by +-25%
        u = torch.rand(shape, device=device, generator=gen)
        t = ((0.75 + 0.5 * u) * (BF16_STD / INT4_STD)).to(bf16)
    elif kind.startswith("shape:"):
        t = torch.tensor([int(v) for v in kind[6:].split(",")], dtype=torch.int64)
    elif kind in ("bf16", "router"):
        std = ROUTER_STD if kind == "router" else BF16_STD
        t = (torch.randn(shape, device=device, generator=gen) * std).to(bf16)
    elif kind == "norm":
        t = (1.0 + 0.05 * torch.randn(shape, device=device, generator=gen)).to(bf16)
    elif kind == "ones":
        t = torch.ones(shape, dtype=bf16)
    elif kind == "embed":  # Gemma scales embeddings by sqrt(hidden) on the way in
        t = (torch.randn(shape, device=device, generator=gen) * BF16_STD).to(bf16)
    else:
        raise ValueError(kind)
    return t.cpu().contiguous()


def write_weights(out: Path, cfg: dict, device: str, shards: int, seed: int) -> dict:
    import torch
    from safetensors.torch import save_file

    n = cfg["num_hidden_layers"]
    groups: list[list] = [[] for _ in range(shards)]
    groups[0].append(
        (f"{TEXT_PREFIX}embed_tokens.weight", "embed", (cfg["vocab_size"], cfg["hidden_size"]))
    )
    for i in range(n):
        groups[min(shards - 1, i * shards // n)].extend(layer_specs(cfg, i))
    groups[-1].append((f"{TEXT_PREFIX}norm.weight", "norm", (cfg["hidden_size"],)))
    groups = [g for g in groups if g]
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    t0 = time.perf_counter()

    def save(tensors: dict, path: Path) -> None:
        save_file(tensors, str(path), metadata={"format": "pt"})

    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        futures = []
        for k, group in enumerate(groups):
            name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {tn: make_tensor(kind, shape, gen, device) for tn, kind, shape in group}
            for tn, t in tensors.items():
                weight_map[tn] = name
                total += t.numel() * t.element_size()
            futures.append(pool.submit(save, tensors, out / name))
            del tensors
            print(f"generated {name}: {len(group)} tensors", flush=True)
            if len(futures) >= 4:  # bound host memory: at most 4 shards in flight
                futures.pop(0).result()
        for fut in futures:
            fut.result()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    secs = time.perf_counter() - t0
    print(f"wrote {total / 2**30:.2f} GiB in {len(groups)} shards in {secs:.1f} s", flush=True)
    return {"bytes": total, "shards": len(groups), "seconds": round(secs, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--meta-only", action="store_true", help="config + tokenizer only")
    parser.add_argument("--weights-only", action="store_true", help="weights (config present)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    out = args.out_dir
    if args.weights_only:
        cfg = json.loads((out / "config.json").read_text())
    else:
        cfg = full_config(**overrides)
        write_meta(out, cfg)
        print(f"wrote config and tokenizer to {out}", flush=True)
    if args.meta_only:
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    info = write_weights(out, cfg, device, args.shards, args.seed)
    (out / "synthetic.json").write_text(json.dumps({"device": device, **info}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

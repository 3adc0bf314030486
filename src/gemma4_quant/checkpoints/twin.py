"""The dequantized bf16 twin of a checkpoint: any layout this package writes, turned back
into the bf16 base layout with the codec of ``gemma4_quant.int4``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import int4
from ..layout import PER_EXPERT
from .files import load_tensors, save_tensors, write_json
from .multimodal import PROCESSOR_FILE
from .tokenizer import TOKENIZER_FILES


def _fuse_per_expert(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """experts.{e}.{gate,up,down}_proj.weight -> fused experts.gate_up_proj/down_proj."""
    found: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    out = {}
    for name, t in weights.items():
        m = PER_EXPERT.match(name)
        if m and m["suffix"] == "weight":
            found.setdefault(m["module"], {})[(int(m["expert"]), m["proj"])] = t
        else:
            out[name] = t
    for prefix, parts in found.items():
        n = 1 + max(e for e, _ in parts)
        out[prefix + ".gate_up_proj"] = torch.stack(
            [torch.cat([parts[(e, "gate_proj")], parts[(e, "up_proj")]]) for e in range(n)]
        )
        out[prefix + ".down_proj"] = torch.stack([parts[(e, "down_proj")] for e in range(n)])
    return out


def dequantize_tensors(
    tensors: dict[str, torch.Tensor], num_bits: int = 4
) -> dict[str, torch.Tensor]:
    """Any layout this package writes -> the bf16 base layout.

    Layouts are recognised from tensor names and dtypes; ``num_bits`` is the width of
    pack-quantized integers (the config's, which the int32 words do not show).
    Dequantization is exact in float32 (int * scale), then cast to bf16 once.
    """
    used: set[str] = set()

    def take(name: str) -> torch.Tensor | None:
        if name in tensors:
            used.add(name)
            return tensors[name]
        return None

    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("_packed") and t.dtype == torch.uint8:  # NVFP4
            stem = name[: -len("_packed")]
            w = int4.dequantize_nvfp4(t, take(stem + "_scale"), take(stem + "_global_scale"))
            take(name.removesuffix("weight_packed") + "input_global_scale")
        elif name.endswith("_packed"):
            # compressed-tensors: `<module>.weight_packed` or fused `<param>_packed`;
            # either way the companions are `<stem>_scale` etc. and the result `<stem>`.
            stem = name[: -len("_packed")]
            w = int4.dequantize_packed(
                t, take(stem + "_scale"), take(stem + "_zero_point"), num_bits=num_bits
            )
            take(stem + "_shape")
        elif name.endswith(".qweight"):  # GPTQ / AutoRound, 4 or 8 bits
            base = name[: -len("qweight")]
            stem = base + "weight"
            qzeros, scales = take(base + "qzeros"), take(base + "scales")
            bits = 32 * qzeros.shape[-1] // scales.shape[-1]  # qzeros pack 32 / bits outputs
            w = int4.dequantize_gptq(t, qzeros, scales, take(base + "g_idx"), bits)
        elif t.dtype == torch.uint8 and name[: -len("weight")] + "weight_scale_2" in tensors:
            stem = name  # ModelOpt NVFP4
            w = int4.dequantize_modelopt_nvfp4(t, take(name + "_scale"), take(name + "_scale_2"))
            take(name[: -len("weight")] + "input_scale")
        elif t.dtype == torch.float8_e4m3fn and name + "_scale" in tensors:  # ct FP8
            stem = name
            w = int4.dequantize_fp8(t, take(name + "_scale"))
        else:
            continue
        used.add(name)
        out[stem] = w.to(torch.bfloat16)
    for name, t in tensors.items():
        if name not in used:
            out[name] = t
    # experts exported under the MoE block's name (`layers.N.moe.experts`) are the
    # base layout's `layers.N.experts`
    out = {n.replace(".moe.experts.", ".experts.", 1): t for n, t in out.items()}
    return _fuse_per_expert(out)


def write_twin(src_dir: str | Path, out_dir: str | Path) -> Path:
    """The dequantized bf16 twin of a checkpoint: same config minus
    quantization_config, tensors in the bf16 base layout."""
    src, out = Path(src_dir), Path(out_dir)
    cfg = json.loads((src / "config.json").read_text())
    qcfg = cfg.pop("quantization_config", None) or {}
    bits = {
        (group.get("weights") or {}).get("num_bits")
        for group in (qcfg.get("config_groups") or {}).values()
    } - {None}
    if len(bits) > 1:
        raise ValueError(f"config groups of several weight widths {sorted(bits)}")
    tensors = dequantize_tensors(load_tensors(src), num_bits=bits.pop() if bits else 4)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", cfg)
    # the processor config too: vLLM builds the multimodal form's processor from it
    for name in (*TOKENIZER_FILES, PROCESSOR_FILE):
        if (src / name).exists():
            shutil.copyfile(src / name, out / name)
    save_tensors(dict(sorted(tensors.items())), out)
    return out

"""Quantizers of the tiny checkpoints' layouts.

compressed-tensors int4 / int8, FP8 and NVFP4 tensors are made by compressed-tensors
itself (its ``calculate_qparams`` / ``generate_gparam`` and its pack-quantized,
float-quantized and nvfp4-pack-quantized compressors on 2D weights), and the
``quantization_config`` is written by its ``ModelCompressor``. The AutoRound and GPTQ
layouts have no library here: round-to-nearest int4 / int8, packed by ``gemma4_quant.int4``
in the GPTQ (``auto_gptq``) format; nor has ModelOpt's NVFP4 (the same two-level scaling
as ModelOpt, packed by ``gemma4_quant.int4``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import int4

CT_GROUP_SIZE = 32
AUTOROUND_GROUP_SIZE = 128
GPTQ_GROUP_SIZE = 64
NVFP4_GROUP_SIZE = int4.NVFP4_GROUP
MODELOPT_VERSION = "0.37.0"


def ct_int_args(symmetric: bool = True, group_size: int = CT_GROUP_SIZE, bits: int = 4) -> Any:
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(
        num_bits=bits,
        type="int",
        symmetric=symmetric,
        strategy="group",
        group_size=group_size,
        dynamic=False,
    )


def ct_compress_int(
    weight: torch.Tensor,
    *,
    symmetric: bool = True,
    group_size: int = CT_GROUP_SIZE,
    bits: int = 4,
) -> dict[str, torch.Tensor]:
    """One 2D weight through compressed-tensors: min/max qparams, pack-quantized
    (``32 // bits`` values to an int32 word).

    Returns the compressor's own ``weight_packed``, ``weight_scale``, ``weight_shape``
    (and ``weight_zero_point`` when asymmetric).
    """
    from compressed_tensors.compressors.pack_quantized import (
        PackedQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = ct_int_args(symmetric, group_size, bits)
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // group_size, group_size)
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    state = {"weight": weight, "weight_scale": scale}
    if not symmetric:
        state["weight_zero_point"] = zero_point
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    out = PackedQuantizationCompressor.compress(state, scheme)
    return {k: v.contiguous() for k, v in out.items()}


def ct_compress_int_3d(
    weight: torch.Tensor, *, symmetric: bool = True, bits: int = 4
) -> dict[str, torch.Tensor]:
    """A fused [E, out, in] weight: the experts' 2D results, stacked.

    compressed-tensors' 0.17 decompressor rejects 3D input, so 2D is the common ground
    of all versions. Rows are quantized and packed independently (zero points in words
    of ``32 // bits`` rows, and out is a multiple of 8), so one call on the [E * out, in]
    matrix gives exactly the per-expert results, only faster.
    """
    e, rows, cols = weight.shape
    if rows % 8:
        raise ValueError(f"expert output dim {rows} is not a multiple of 8")
    flat = ct_compress_int(weight.reshape(e * rows, cols), symmetric=symmetric, bits=bits)
    out = {k: v.reshape(e, -1, v.shape[-1]) for k, v in flat.items() if k != "weight_shape"}
    out["weight_shape"] = torch.tensor([e, rows, cols], dtype=torch.int64)
    return out


def ct_fp8_args() -> tuple[Any, Any]:
    """(weights, input_activations) args of an FP8-Dynamic export."""
    from compressed_tensors.quantization import QuantizationArgs

    weights = QuantizationArgs(
        num_bits=8, type="float", strategy="channel", symmetric=True, dynamic=False
    )
    acts = QuantizationArgs(
        num_bits=8, type="float", strategy="token", symmetric=True, dynamic=True
    )
    return weights, acts


def ct_compress_fp8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """One 2D weight through compressed-tensors' float-quantized compressor."""
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w_args, a_args = ct_fp8_args()
    scale, _ = calculate_qparams(weight.amin(1, keepdim=True), weight.amax(1, keepdim=True), w_args)
    scheme = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    out = FloatQuantizationCompressor.compress({"weight": weight, "weight_scale": scale}, scheme)
    return {k: v.contiguous() for k, v in out.items()}


# What the NVFP4 exports calibrate their activations to: the input global scale maps this
# absolute maximum to FP8's and FP4's largest values (448 * 6), as llm-compressor's
# observer does for the largest activation it sees. The tiny models' activations stay
# well inside it.
NVFP4_ACTIVATION_AMAX = 16.0


def ct_nvfp4_args() -> tuple[Any, Any]:
    """(weights, input_activations) args of compressed-tensors' NVFP4 preset (W4A4:
    FP4 E2M1 values in groups of 16 with FP8 E4M3 scales, one float32 global scale per
    tensor; activations quantized the same way at run time)."""
    from compressed_tensors.quantization.quant_scheme import NVFP4

    return NVFP4["weights"], NVFP4["input_activations"]


def nvfp4_global_scale(*weights: torch.Tensor) -> torch.Tensor:
    """One global scale for weights that vLLM fuses into one layer (q/k/v, gate/up):
    llm-compressor gives each of them the smallest of their own global scales, so that
    every group scale stays within FP8's range."""
    from compressed_tensors.quantization.utils import generate_gparam

    scales = [generate_gparam(w.amin().float(), w.amax().float()) for w in weights]
    return torch.stack(scales).amin(0)


def nvfp4_input_global_scale() -> torch.Tensor:
    from compressed_tensors.quantization.utils import generate_gparam

    amax = torch.tensor(NVFP4_ACTIVATION_AMAX)
    return generate_gparam(-amax, amax)


def ct_compress_nvfp4(weight: torch.Tensor, global_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """2D weights through compressed-tensors' nvfp4-pack-quantized compressor:
    ``weight_packed`` uint8 [out, in / 2] (two E2M1 codes a byte, low nibble first) and
    ``weight_scale`` float8_e4m3fn [out, in / 16]. ``global_scale`` is each row's
    (float32 [out]): several modules stacked along the rows go through in one call, each
    with its own global scale, and come out as they would one by one (rows are quantized
    independently)."""
    from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    w_args, a_args = ct_nvfp4_args()
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // NVFP4_GROUP_SIZE, NVFP4_GROUP_SIZE)
    row_scale = global_scale.float().reshape(rows, 1)
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), w_args, global_scale=row_scale)
    scheme = QuantizationScheme(targets=["Linear"], weights=w_args, input_activations=a_args)
    state = {
        "weight": weight.float(),
        "weight_scale": scale,
        # [out, 1, 1]: against the quantizer's [out, groups, 16] view of the weight
        "weight_global_scale": row_scale.unsqueeze(-1),
    }
    out = NVFP4PackedCompressor.compress(state, scheme)
    return {k: out[k].contiguous() for k in ("weight_packed", "weight_scale")}


def gptq_compress(
    weight: torch.Tensor, bits: int = 4, group_size: int = AUTOROUND_GROUP_SIZE
) -> dict[str, torch.Tensor]:
    """Symmetric RTN in the GPTQ (auto_gptq) format AutoRound and GPTQ exports write.

    qweight int32 [in / pack, out] (packed along the input dim), qzeros int32
    [in / group, out / pack] (packed along the output dim, stored as zero - 1), scales
    fp16 [in / group, out]; pack = 32 / bits. Symmetric: every zero point is
    2**(bits - 1), the storage offset.
    """
    half = 1 << (bits - 1)
    w = weight.float().t()  # [in, out]
    cols, rows = w.shape
    groups = w.reshape(cols // group_size, group_size, rows)
    scales = (groups.abs().amax(1) / (half - 0.5)).clamp_min(1e-8).to(torch.float16)
    q = torch.round(groups / scales.float().unsqueeze(1)).clamp(-half, half - 1) + half
    zeros = torch.full_like(scales, half, dtype=torch.int64)  # symmetric: the offset
    return int4.pack_gptq(q.reshape(cols, rows), zeros, scales, bits)


def gptq_compress_int4(
    weight: torch.Tensor, group_size: int = AUTOROUND_GROUP_SIZE
) -> dict[str, torch.Tensor]:
    """``gptq_compress`` with 4 bits."""
    return gptq_compress(weight, 4, group_size)


def nvfp4_compress(
    weight: torch.Tensor, input_amax: float = 4.0, global_amax: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """One 2D weight in ModelOpt's NVFP4 export format (``NVFP4_DEFAULT_CFG``).

    Two-level scaling, as ModelOpt computes it: ``weight_scale_2`` (float32 scalar) =
    amax(W) / (6 * 448), so that the per-block scales fit E4M3; ``weight_scale``
    (float8_e4m3fn [out, in / 16]) = amax(block) / 6 / weight_scale_2; the values are
    rounded to the nearest E2M1 number and packed two to a byte (``weight`` uint8
    [out, in / 2], see ``gemma4_quant.int4``). ``input_scale`` (float32 scalar) =
    activation amax / (6 * 448): a random model has no calibration, so ``input_amax``
    stands for it (it plays no part in a weight-only dequantization). ``global_amax``:
    the amax the global scale is taken from, where modules that vLLM fuses (q/k/v,
    gate/up) share one, as ModelOpt's export makes them (default: this weight's).
    """
    w = weight.float()
    rows, cols = w.shape
    if cols % int4.NVFP4_GROUP:
        raise ValueError(f"in features {cols} are not a multiple of {int4.NVFP4_GROUP}")
    amax = w.abs().amax() if global_amax is None else global_amax.float()
    global_scale = (amax / (6.0 * 448.0)).clamp_min(1e-12)
    blocks = w.reshape(rows, cols // int4.NVFP4_GROUP, int4.NVFP4_GROUP)
    block_scale = (blocks.abs().amax(-1) / 6.0 / global_scale).to(torch.float8_e4m3fn)
    divisor = (block_scale.float() * global_scale).unsqueeze(-1)
    scaled = torch.where(divisor > 0, blocks / divisor, torch.zeros_like(blocks))
    return {
        "weight": int4.pack_e2m1(scaled.reshape(rows, cols)),
        "weight_scale": block_scale,
        "weight_scale_2": global_scale.reshape(()).to(torch.float32),
        "input_scale": torch.tensor(input_amax / (6.0 * 448.0), dtype=torch.float32),
    }


# Its scales depend on the whole tensor: experts are quantized one by one.
nvfp4_compress.per_tensor_scale = True  # type: ignore[attr-defined]


def ct_quantization_config(
    scheme_args: dict[str, Any], fmt: str, ignore: list[str]
) -> dict[str, Any]:
    """The quantization_config exactly as compressed-tensors' ModelCompressor writes it."""
    import tempfile

    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], format=fmt, **scheme_args)
    qconfig = QuantizationConfig(
        config_groups={"group_0": scheme},
        format=fmt,
        ignore=ignore,
        quantization_status="compressed",
    )
    with tempfile.TemporaryDirectory() as tmp:
        ModelCompressor(quantization_config=qconfig).update_config(tmp)
        return json.loads((Path(tmp) / "config.json").read_text())["quantization_config"]

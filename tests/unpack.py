"""An int4 unpacker for the tests, written from the format specs alone and sharing no code
with the plugin's codec (``gemma4_quant.int4``): what vLLM loaded, the fallback
dequantized or the twin holds is checked against it.

It reads the bytes of the little-endian int32 words (byte j holds values 2j, low nibble,
and 2j + 1, high nibble) instead of shifting whole words.

- compressed-tensors pack-quantized: ``weight_packed`` int32 [..., N, K / 8], value k
  of word w is column 8w + k, stored as q + 8; ``weight_scale`` [..., N, K / group];
  ``weight_zero_point`` int32 [..., N / 8, K / group] packed along N (asymmetric).
- compressed-tensors pack-quantized int8: ``weight_packed`` int32 [..., N, K / 4], byte
  k of word w (little-endian) is column 4w + k, stored as q + 128.
- compressed-tensors float-quantized FP8: value = ``weight`` (E4M3) * ``weight_scale``.
- compressed-tensors nvfp4-pack-quantized: ``weight_packed`` uint8 [N, K / 2], column 2j
  in the low nibble of byte j; an E2M1 code: bit 3 the sign, bits 2-1 the exponent e,
  bit 0 the mantissa m: 0.5 * m if e == 0, else 2**(e - 1) * (1 + m / 2);
  value = code * (``weight_scale`` (E4M3, per 16 columns) / ``weight_global_scale``).
- GPTQ (auto_gptq v1, as AutoRound exports it): ``qweight`` int32 [K / 8, N] packed
  along K, ``qzeros`` int32 [K / group, N / 8] packed along N and stored as zero - 1,
  ``scales`` [K / group, N], ``g_idx`` the group of every input row; at 8 bits four
  values (the bytes of the word) instead of eight.
- ModelOpt NVFP4: ``weight`` uint8 [N, K / 2], two E2M1 codes per byte (column 2j in the
  low nibble), a code being sign (bit 3) and exponent/mantissa (bits 0-2: 2 exponent
  bits, 1 mantissa bit, bias 1, subnormal at exponent 0); ``weight_scale`` float8_e4m3fn
  [N, K / 16]; ``weight_scale_2`` float32 per tensor; value = code * block scale, then
  times the tensor scale, in float32.
"""

from __future__ import annotations

import torch


def nibbles(words: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The 4-bit values (int64, 0..15) of int32 words packed eight to a word along ``dim``."""
    assert words.dtype == torch.int32, words.dtype
    moved = words.movedim(dim, -1).contiguous()
    data = moved.view(torch.uint8).to(torch.int64)  # [..., 4 * words], little-endian
    low, high = data % 16, data // 16
    values = torch.stack([low, high], dim=-1).flatten(-2)  # [..., 8 * words]
    return values.movedim(-1, dim)


def int8s(words: torch.Tensor) -> torch.Tensor:
    """The bytes (int64, 0..255) of int32 words along the last dim, low byte first."""
    assert words.dtype == torch.int32, words.dtype
    return words.contiguous().view(torch.uint8).to(torch.int64)


def ct_int8(packed: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """compressed-tensors pack-quantized symmetric int8 (2D or fused 3D) -> float32."""
    q = int8s(packed)
    assert q.shape[-1] == scale.shape[-1] * group_size, (packed.shape, scale.shape)
    column_group = torch.arange(q.shape[-1]) // group_size
    return (q - 128).to(torch.float32) * scale.float()[..., column_group]


def fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors FP8 (per channel or per tensor scale) -> float32."""
    assert weight.dtype == torch.float8_e4m3fn, weight.dtype
    return weight.to(torch.float32) * scale.to(torch.float32)


def e2m1_code(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    magnitude = 0.5 * mantissa if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def ct_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors NVFP4 [N, K / 2] uint8 -> float32 [N, K]."""
    assert packed.dtype == torch.uint8, packed.dtype
    table = torch.tensor([e2m1_code(code) for code in range(16)], dtype=torch.float32)
    data = packed.to(torch.int64)
    codes = torch.stack([data % 16, data // 16], dim=-1).flatten(-2)  # [N, K]
    group_scale = scale.to(torch.float32) / global_scale.to(torch.float32)  # [N, K / 16]
    return table[codes] * group_scale.repeat_interleave(16, dim=-1)


def ct_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """compressed-tensors pack-quantized int4 (2D or fused 3D) -> float32 [..., N, K]."""
    q = nibbles(packed, -1)
    assert q.shape[-1] == scale.shape[-1] * group_size, (packed.shape, scale.shape)
    zero = torch.full(scale.shape, 8) if zero_point is None else nibbles(zero_point, -2)
    column_group = torch.arange(q.shape[-1]) // group_size
    return (q - zero[..., column_group]).to(torch.float32) * scale.float()[..., column_group]


def gptq_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ v1 int4 -> float32 [N, K] (the layout of a linear's weight)."""
    q = nibbles(qweight, 0)  # [K, N]
    zero = nibbles(qzeros, 1) + 1  # [G, N]
    rows = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(rows) // (rows // scales.shape[0])
    group = g_idx.to(torch.int64)
    return ((q - zero[group]).to(torch.float32) * scales.float()[group]).t().contiguous()


def byte_values(words: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The 8-bit values (int64, 0..255) of int32 words packed four to a word along ``dim``."""
    assert words.dtype == torch.int32, words.dtype
    moved = words.movedim(dim, -1).contiguous()
    return moved.view(torch.uint8).to(torch.int64).movedim(-1, dim)


def gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """GPTQ v1 at 4 or 8 bits -> float32 [N, K]."""
    if bits == 4:
        return gptq_int4(qweight, qzeros, scales, g_idx)
    assert bits == 8, bits
    q = byte_values(qweight, 0)  # [K, N]
    zero = byte_values(qzeros, 1) + 1  # [G, N]
    rows = q.shape[0]
    group = (torch.arange(rows) // (rows // scales.shape[0]) if g_idx is None else g_idx).long()
    return ((q - zero[group]).to(torch.float32) * scales.float()[group]).t().contiguous()


def e2m1(code: torch.Tensor) -> torch.Tensor:
    """Float32 values of 4-bit E2M1 codes (sign, 2 exponent bits, 1 mantissa bit)."""
    exponent, mantissa = (code >> 1) & 3, (code & 1).to(torch.float32)
    normal = (1 + mantissa / 2) * torch.pow(2.0, (exponent - 1).to(torch.float32))
    value = torch.where(exponent == 0, mantissa / 2, normal)
    return torch.where(code >= 8, -value, value)


def nvfp4(
    weight: torch.Tensor, weight_scale: torch.Tensor, weight_scale_2: torch.Tensor
) -> torch.Tensor:
    """ModelOpt NVFP4 [..., N, K / 2] (one tensor scale, or one per leading index) ->
    float32 [..., N, K]."""
    assert weight.dtype == torch.uint8 and weight_scale.dtype == torch.float8_e4m3fn
    data = weight.to(torch.int64)
    codes = torch.stack([data % 16, data // 16], dim=-1).flatten(-2)
    block = torch.arange(codes.shape[-1]) // 16
    values = e2m1(codes) * weight_scale.float()[..., block]
    tensor_scale = weight_scale_2.float()
    if tensor_scale.numel() > 1:
        tensor_scale = tensor_scale.reshape(*tensor_scale.shape, 1, 1)
    return values * tensor_scale

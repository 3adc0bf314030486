"""The plugin's one codec for quantized weights: compressed-tensors pack-quantized (int4
and int8), GPTQ (``auto_gptq`` packing, as AutoRound's ``auto_round:auto_gptq`` exports
it), compressed-tensors' float formats (FP8 per-channel, NVFP4) and ModelOpt's NVFP4.

Both formats pack ``32 // bits`` values to an int32 word, value k of a word in bits
``[bits * k, bits * (k + 1))``, and mean ``value = (q - zero) * scale``:

- compressed-tensors ``pack-quantized``: ``weight_packed`` int32 [..., N, K / pack]
  (packed along the input dim K), ``weight_scale`` [..., N, G] (group = K / G),
  ``weight_zero_point`` int32 [..., N / pack, G] packed along the output dim N, or none
  when symmetric, where the storage offset ``2**(bits - 1)`` is the zero point. 2D
  modules and fused 3D experts ([E, N, K / pack]) alike.
- GPTQ: ``qweight`` int32 [K / pack, N] packed along K, ``qzeros`` int32 [G, N / pack]
  packed along N, ``scales`` [G, N], optional ``g_idx`` int32 [K] (the group of every
  input row; activation order), default ``row // (K / G)``.

- compressed-tensors float-quantized FP8: ``weight`` float8_e4m3fn [..., N, K] and
  ``weight_scale`` [..., N, 1] (per channel) or [1]: value = ``weight * scale``.
- compressed-tensors ``nvfp4-pack-quantized``: ``weight_packed`` uint8 [N, K / 2], two
  FP4 E2M1 codes a byte (column 2j in the low nibble; bit 3 the sign, bits 0-2 index
  0, 0.5, 1, 1.5, 2, 3, 4, 6), ``weight_scale`` float8_e4m3fn [N, K / 16],
  ``weight_global_scale`` float32 [1]: value = code * (scale / global_scale), the
  quotient in float32 (as compressed-tensors' ``dequantize`` and vLLM's NVFP4 emulation
  compute it).

GPTQ zero points are stored as ``zero - 1`` ("GPTQ v1"), and read back as
``stored + 1`` without wrapping. Sources: AutoRound's ``auto_gptq`` exporter packs
``zeros -= 1`` (``auto_round/export/export_to_autogptq/qlinear_triton.py``,
``QuantLinear.pack``, both for per-group zero tensors and the symmetric constant); vLLM's
GPTQ kernels read v1: ``ExllamaLinearKernel.apply_weights`` calls ``gptq_gemm`` with
``use_v2_format = False`` ("hardcode GPTQv1 format"), and the int WNA16 MoE oracle
writes symmetric qzeros as ``bias - 1 = 7`` because "the kernel adds 1 to the stored
zeros" (``_synthesize_rdna3_qzeros``, vLLM 0.32). A symmetric int4 checkpoint therefore
stores 7 in every nibble (``0x77777777``), whose zero 8 is also the storage offset, so a
decoder that ignores symmetric qzeros agrees. A zero point of 0 has no v1 encoding
(``-1`` wraps to 15, read back as 16): ``pack_gptq`` refuses it.

ModelOpt NVFP4: ``weight`` uint8 [N, K / 2] holds two E2M1 (FP4) codes per byte, column
2j in the low nibble and 2j + 1 in the high one; a code is a sign bit (8) and an index
into the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6. ``weight_scale`` float8_e4m3fn [N, K / 16]
scales each block of 16 columns, ``weight_scale_2`` (float32, one per tensor) all of them:
``value = (e2m1 * weight_scale) * weight_scale_2``. The first product is exact in float32
(2 + 4 significant bits), so the value is the exact product rounded once to float32.

Dequantization is exact: ``q - zero`` is a small integer, its product with a 16-bit float
scale is exact in float32, so the result rounded once to the target dtype is the
checkpoint's value bit for bit (where the target is the scale's own 16-bit type, the
product is computed in it directly: IEEE multiplication rounds the exact product once).
"""

from __future__ import annotations

import torch

WORD_BITS = 32


def _pack_factor(bits: int) -> int:
    if WORD_BITS % bits:
        raise ValueError(f"{bits}-bit values do not fill an int32 word")
    return WORD_BITS // bits


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32 bits -> int32 with the same bit pattern."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# --------------------------------------------------------------------------- bits


def pack_bits(values: torch.Tensor, bits: int = 4, dim: int = -1) -> torch.Tensor:
    """Pack unsigned ``bits``-bit values into int32 words along ``dim`` (value k of a
    word in bits [bits * k, bits * (k + 1)))."""
    pack = _pack_factor(bits)
    x = (values.to(torch.int64) & ((1 << bits) - 1)).movedim(dim, -1)
    if x.shape[-1] % pack:
        raise ValueError(f"{x.shape[-1]} values do not fill words of {pack}")
    x = x.reshape(*x.shape[:-1], x.shape[-1] // pack, pack)
    shifts = torch.arange(pack, dtype=torch.int64, device=x.device) * bits
    return _to_int32((x << shifts).sum(-1)).movedim(-1, dim).contiguous()


def unpack_bits(packed: torch.Tensor, bits: int = 4, dim: int = -1) -> torch.Tensor:
    """The unsigned values (int32) of int32 words packed along ``dim``."""
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {packed.dtype}")
    pack = _pack_factor(bits)
    shifts = torch.arange(pack, dtype=torch.int32, device=packed.device) * bits
    values = (packed.movedim(dim, -1).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2).movedim(-1, dim).contiguous()


def pack_int4_raw(nibbles: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Pack values 0..15 eight to an int32 along ``dim``; nibble k in bits [4k, 4k+4)."""
    return pack_bits(nibbles, 4, dim)


def unpack_int4_raw(packed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Nibbles (0..15, int32) of int32 words packed eight to a word along ``dim``."""
    return unpack_bits(packed, 4, dim)


# --------------------------------------------------------------------------- compressed-tensors


def dequantize_packed(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    num_bits: int = 4,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """compressed-tensors pack-quantized weights [N, K / pack] or fused experts
    [E, N, K / pack] -> ``(q - zp) * scale`` [..., N, K] in ``dtype``, exactly; written
    into ``out`` if given.

    Fused experts are dequantized one expert at a time, so the temporaries stay the size
    of one expert's matrix (this runs over every expert weight of a model at load time).
    """
    pack = _pack_factor(num_bits)
    if out is None:
        shape = (*packed.shape[:-1], packed.shape[-1] * pack)
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    if packed.dim() == 3:
        for e in range(packed.shape[0]):
            zp = None if zero_point is None else zero_point[e]
            dequantize_packed(packed[e], scale[e], zp, num_bits=num_bits, dtype=dtype, out=out[e])
        return out
    if packed.dtype != torch.int32:
        raise TypeError(f"expected int32 words, got {packed.dtype}")
    mask = (1 << num_bits) - 1
    rows, groups = packed.shape[0], scale.shape[-1]
    shifts = torch.arange(pack, dtype=torch.int32, device=packed.device) * num_bits
    # In place where possible, and scales broadcast over their group instead of being
    # repeated.
    q = packed.unsqueeze(-1) >> shifts  # [N, K / pack, pack]
    q &= mask
    q = q.view(rows, groups, -1)  # [N, G, group]
    if zero_point is None:
        q -= 1 << (num_bits - 1)  # the storage offset is the zero point
    else:
        zp = (zero_point.unsqueeze(-2) >> shifts.view(-1, 1)) & mask  # [N / pack, pack, G]
        q -= zp.flatten(-3, -2).unsqueeze(-1)
    compute = dtype if scale.dtype == dtype else torch.float32
    torch.mul(q.to(compute), scale.to(compute).unsqueeze(-1), out=out.view(rows, groups, -1))
    return out


def dequantize_packed_columns(
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    *,
    group_size: int,
    offset: int,
    num_bits: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``dequantize_packed`` for a block of columns that does not start and end on group
    boundaries: ``packed`` [..., N, K / pack] holds K columns that start ``offset``
    columns into the first of the groups ``scale`` [..., N, G] (and ``zero_point``)
    covers. What one tensor-parallel rank holds when its share of the input dim splits a
    group. ``offset`` and the columns left over in the last group must fill whole words.
    """
    pack = _pack_factor(num_bits)
    columns = packed.shape[-1] * pack
    after = scale.shape[-1] * group_size - offset - columns
    if offset < 0 or after < 0 or offset % pack or after % pack or after >= group_size:
        raise ValueError(
            f"{columns} columns at offset {offset} do not fit {scale.shape[-1]} groups of "
            f"{group_size} in whole words of {pack}"
        )
    if offset == 0 and after == 0:
        return dequantize_packed(packed, scale, zero_point, num_bits=num_bits, dtype=dtype)
    # Zero words stand in for the group's columns another rank holds; they are cut off
    # again, one expert at a time (temporaries of one matrix).
    padded = torch.nn.functional.pad(packed, (offset // pack, after // pack))
    out = torch.empty((*packed.shape[:-1], columns), dtype=dtype, device=packed.device)
    experts = [()] if packed.dim() == 2 else [(e,) for e in range(packed.shape[0])]
    for e in experts:
        zp = None if zero_point is None else zero_point[e]
        full = dequantize_packed(padded[e], scale[e], zp, num_bits=num_bits, dtype=dtype)
        out[e] = full[..., offset : offset + columns]
    return out


def unpack_int4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    zero_point: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize compressed-tensors pack-quantized int4 (2D or fused 3D) to float32."""
    if packed.shape[-1] * 8 != scale.shape[-1] * group_size:
        raise ValueError(f"packed {tuple(packed.shape)} vs scale {tuple(scale.shape)}")
    return dequantize_packed(packed, scale, zero_point, num_bits=4, dtype=torch.float32)


# --------------------------------------------------------------------------- float formats

# --------------------------------------------------------------------------- float formats


def dequantize_fp8(
    weight: torch.Tensor, scale: torch.Tensor, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """compressed-tensors FP8 weights (per channel [..., N, 1] or per tensor [1] scales)
    -> ``weight * scale`` in ``dtype``; the product of two floats of 8 and 16 bits is exact
    in float32, so the result is rounded once."""
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"expected float8_e4m3fn weights, got {weight.dtype}")
    return (weight.float() * scale.float()).to(dtype)


def dequantize_nvfp4(
    packed: torch.Tensor,
    scale: torch.Tensor,
    global_scale: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """compressed-tensors NVFP4 weights [..., N, K / 2] uint8 -> [..., N, K] in ``dtype``
    (see the module docstring); ``global_scale`` is one per matrix ([1], or [..., 1] for
    stacked experts)."""
    values = unpack_e2m1(packed)
    rows, cols = values.shape[-2:]
    if scale.shape[-1] * NVFP4_GROUP != cols:
        raise ValueError(f"packed {tuple(packed.shape)} vs scale {tuple(scale.shape)}")
    group_scale = scale.float() / global_scale.float().reshape(*scale.shape[:-2], 1, 1)
    grouped = values.view(*values.shape[:-1], cols // NVFP4_GROUP, NVFP4_GROUP)
    return (grouped * group_scale.unsqueeze(-1)).view(values.shape).to(dtype)


# --------------------------------------------------------------------------- GPTQ


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A GPTQ (v1) linear -> its weight [N, K] in ``dtype``, exactly (see the module
    docstring for the layout and the ``zero - 1`` rule)."""
    q = unpack_bits(qweight, bits, 0)  # [K, N]
    zeros = unpack_bits(qzeros, bits, 1) + 1  # [G, N]; v1 stores zero - 1
    inp = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(inp, device=q.device) // (inp // scales.shape[0])
    g_idx = g_idx.long()
    weight = (q - zeros[g_idx]).float() * scales.float()[g_idx]  # [K, N]
    return weight.t().to(dtype).contiguous()


def unpack_gptq_int4(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dequantize a GPTQ (v1) int4 linear to float32 [out, in]."""
    return dequantize_gptq(qweight, qzeros, scales, g_idx, 4, torch.float32)


def pack_gptq(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, bits: int = 4
) -> dict[str, torch.Tensor]:
    """GPTQ (v1) tensors of unsigned values ``q`` [K, N], zero points ``zeros`` [G, N]
    and ``scales`` [G, N]: ``qweight``, ``qzeros`` (stored as zero - 1) and ``scales``."""
    if (zeros < 1).any():
        raise ValueError("GPTQ v1 cannot store a zero point of 0 (zero - 1 would wrap)")
    return {
        "qweight": pack_bits(q, bits, 0),
        "qzeros": pack_bits(zeros - 1, bits, 1),
        "scales": scales.contiguous(),
    }


# --------------------------------------------------------------------------- NVFP4

NVFP4_GROUP = 16
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def pack_e2m1(values: torch.Tensor) -> torch.Tensor:
    """Round ``values`` [..., K] to the nearest E2M1 number (ties to the smaller
    magnitude) and pack two codes per byte: uint8 [..., K / 2], column 2j low nibble."""
    if values.shape[-1] % 2:
        raise ValueError(f"{values.shape[-1]} values do not fill bytes of two")
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=values.device)
    v = values.float()
    index = (v.abs().unsqueeze(-1) - table).abs().argmin(-1)
    codes = index | torch.where(v < 0, 8, 0)
    pairs = codes.reshape(*codes.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """The E2M1 values (float32) of bytes holding two codes each: [..., K / 2] -> [..., K]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"expected uint8 bytes, got {packed.dtype}")
    table = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=packed.device)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    magnitude = table[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def dequantize_modelopt_nvfp4(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_scale_2: torch.Tensor,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ModelOpt NVFP4 ``weight`` [..., N, K / 2], ``weight_scale`` [..., N, K / 16] and
    ``weight_scale_2`` (a scalar, or one per leading index) -> [..., N, K] in ``dtype``."""
    values = unpack_e2m1(weight)
    *lead, rows, cols = values.shape
    if weight_scale.shape[-1] * NVFP4_GROUP != cols or weight_scale.shape[-2] != rows:
        raise ValueError(
            f"weight {tuple(weight.shape)} (K = {cols}) vs weight_scale "
            f"{tuple(weight_scale.shape)}: expected [..., {rows}, {cols // NVFP4_GROUP}]"
        )
    blocks = values.reshape(*lead, rows, -1, NVFP4_GROUP) * weight_scale.float().unsqueeze(-1)
    global_scale = weight_scale_2.float()
    global_scale = global_scale.reshape(()) if global_scale.numel() == 1 else global_scale
    if global_scale.dim():  # one per leading index (experts)
        global_scale = global_scale.reshape(*lead, 1, 1, 1)
    return (blocks * global_scale).reshape(*lead, rows, cols).to(dtype)

"""The one-token int4 GEMV on Marlin's layout (``gemma4_quant.kernels.marlin_gemv``) against
the exact float32 product of the weights it was packed from.

The weights go into Marlin's layout through vLLM's own reference packer
(``marlin_utils_test.marlin_weights``, which vLLM's tests hold equal to the CUDA
``gptq_marlin_repack``) and ``marlin_permute_scales``, the function vLLM's Marlin kernel
loads scales with. Runs Triton's interpreter on CPU (``TRITON_INTERPRET=1``); the
comparison against Marlin's own GEMM, and the speed, are ``bench/marlin_gemv.py``'s, on a
GPU. Skips where Triton is not installed.
"""

from __future__ import annotations

import pytest
from triton_env import DEVICE, marlin_matrix, marlin_reference, need_triton

torch = need_triton()
marlin_reference()  # skips this module where this vLLM has no packer

from gemma4_quant.kernels.marlin_gemv import aligned_pairs, marlin_gemv  # noqa: E402


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).norm() / want.norm()).item()


# Gemma 4 26B-A4B's attention projections: o of a sliding layer (K 4096, N 2816), q/k/v of a
# global one (N 9216), and a K that the splits do not divide evenly (176 row tiles in 16
# splits leaves the last split empty)
# (the L2 prefetches and the PDL wait are no-ops in the interpreter: their addresses are
# computed all the same)
@pytest.mark.parametrize(
    ("k", "n", "group", "split", "block_kt", "prefetch", "pdl"),
    [
        (4096, 2816, 32, 8, 4, 2, 1),
        (2816, 9216, 32, 1, 8, 0, 0),
        (2816, 1024, 32, 16, 4, 1, 1),
        (2816, 1024, 128, 4, 2, 0, 0),
        (256, 128, 32, 2, 1, 3, 1),
    ],
)
def test_matches_the_float32_product(
    k: int, n: int, group: int, split: int, block_kt: int, prefetch: int, pdl: int
) -> None:
    gen = torch.Generator().manual_seed(k + n + group)
    words, scales, w = marlin_matrix(k, n, group, gen)
    x = torch.randn(1, k, generator=gen).bfloat16()
    want = x.float() @ w
    got = marlin_gemv(
        x.to(DEVICE), words.to(DEVICE), scales.to(DEVICE), group, split=split,
        block_kt=block_kt, prefetch=prefetch, pdl=pdl,
    )  # fmt: skip
    assert got.shape == (1, n) and got.dtype == torch.bfloat16
    # float32 sums rounded once to bf16: 2**-8 relative per element at most
    assert _error(got, want) < 5e-3


def test_float16_activations_and_scales():
    # the scales and activations come in as 32-bit pairs, split by their dtype's bits
    gen = torch.Generator().manual_seed(3)
    words, scales, w = marlin_matrix(512, 256, 32, gen)
    x = torch.randn(1, 512, generator=gen).half()
    got = marlin_gemv(x.to(DEVICE), words.to(DEVICE), scales.half().to(DEVICE), 32, split=2)
    assert got.dtype == torch.float16
    assert _error(got, x.float() @ w) < 2e-3


def test_activations_starting_off_a_4_byte_boundary_are_read_from_an_aligned_copy():
    # the kernel reads activations as 32-bit pairs: a GPU faults on a misaligned one
    gen = torch.Generator().manual_seed(4)
    words, scales, w = marlin_matrix(256, 128, 32, gen)
    x = torch.randn(1, 257, generator=gen).bfloat16()[:, 1:]
    assert x.data_ptr() % 4 == 2
    assert aligned_pairs(x).data_ptr() % 4 == 0 and torch.equal(aligned_pairs(x), x)
    got = marlin_gemv(x.to(DEVICE), words.to(DEVICE), scales.to(DEVICE), 32)
    assert _error(got, x.float() @ w) < 5e-3


def test_split_counters_are_left_at_zero_for_the_next_call():
    gen = torch.Generator().manual_seed(1)
    words, scales, w = marlin_matrix(512, 256, 32, gen)
    for _ in range(3):
        x = torch.randn(1, 512, generator=gen).bfloat16()
        got = marlin_gemv(x.to(DEVICE), words.to(DEVICE), scales.to(DEVICE), 32, split=4)
        assert _error(got, x.float() @ w) < 5e-3


def test_pdl_launches_only_where_a_gpu_can_take_it(monkeypatch) -> None:
    """Programmatic dependent launch needs compute capability 9.0 and a Triton that launches
    it: anywhere else a tile's ``pdl`` turns into a plain launch, so ``force`` on an older GPU
    or a CPU tensor never compiles ``griddepcontrol``; the interpreter keeps it (its wait is a
    no-op, the prefetch addresses are computed, as the product tests above check)."""
    from gemma4_quant.kernels import common

    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "INTERPRETED", False)
    assert common.pdl_for(1, cpu) == 0 and common.pdl_for(0, cpu) == 0
    assert common.launch_options(1) == {"launch_pdl": True} and common.launch_options(0) == {}
    monkeypatch.setattr(common, "INTERPRETED", True)
    assert common.pdl_for(1, cpu) == 1 and common.launch_options(1) == {}


def test_a_register_limit_is_passed_where_triton_takes_it(monkeypatch) -> None:
    """A tile's ``maxnreg`` reaches the launch as Triton's register limit for ``ptxas``
    (a Triton without the option launches without it) and leaves the arithmetic alone."""
    from gemma4_quant.kernels import common

    assert common.launch_options(0, 0) == {} and common.launch_options(0) == {}
    monkeypatch.setattr(common, "_triton_takes_maxnreg", lambda: True)
    assert common.launch_options(0, 96) == {"maxnreg": 96}
    monkeypatch.setattr(common, "_triton_takes_maxnreg", lambda: False)
    assert common.launch_options(0, 96) == {}
    monkeypatch.undo()
    gen = torch.Generator().manual_seed(6)
    words, scales, _ = marlin_matrix(512, 256, 32, gen)
    x = torch.randn(1, 512, generator=gen).bfloat16().to(DEVICE)
    words, scales = words.to(DEVICE), scales.to(DEVICE)
    plain = marlin_gemv(x, words, scales, 32, split=2)
    assert torch.equal(marlin_gemv(x, words, scales, 32, split=2, maxnreg=96), plain)


def test_a_mis_shaped_weight_is_refused_by_name():
    gen = torch.Generator().manual_seed(2)
    words, scales, _ = marlin_matrix(256, 128, 32, gen)
    x = torch.randn(1, 256).bfloat16()
    with pytest.raises(ValueError, match=r"w_q \(16, 256\).*expected \(8, 256\)"):
        marlin_gemv(x[:, :128].to(DEVICE), words.to(DEVICE), scales[:4].to(DEVICE), 32)


# ------------------------------------------------------------- the marlin_decode patch


def _kernel_and_layer(k: int, n: int, group: int, **config):
    """vLLM's MarlinLinearKernel for a [K, N] int4 layer, and a module holding the tensors
    its ``process_weights_after_loading`` leaves (Marlin words and scales), with the
    float32 weights they hold."""
    import dataclasses

    from vllm.model_executor.kernels.linear.mixed_precision.marlin import MarlinLinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )
    from vllm.scalar_type import scalar_types

    fields = {f.name for f in dataclasses.fields(MPLinearLayerConfig)}
    values = {
        "full_weight_shape": (k, n),
        "partition_weight_shape": (k, n),
        "weight_type": scalar_types.uint4b8,
        "act_type": torch.bfloat16,
        "group_size": group,
        "zero_points": False,
        "has_g_idx": False,
        **config,
    }
    c = MPLinearLayerConfig(**{f: v for f, v in values.items() if f in fields})
    kernel = MarlinLinearKernel(c, "weight_packed", "weight_scale", "weight_zero_point")
    words, scales, w = marlin_matrix(k, n, group, torch.Generator().manual_seed(k + n))
    layer = torch.nn.Module()
    layer.weight_packed = torch.nn.Parameter(words.to(DEVICE), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(scales.to(DEVICE), requires_grad=False)
    layer.bias = None
    return kernel, layer, w


def _exact_apply(w: torch.Tensor):
    """Marlin's ``apply_weights`` where Marlin cannot run (no CUDA): the exact product."""

    def apply(kernel, layer, x, bias=None):
        return (x.float().cpu() @ w).to(x.dtype).to(x.device)

    return apply


@pytest.fixture
def fresh(monkeypatch):
    from gemma4_quant.patches import marlin_decode

    monkeypatch.setattr(marlin_decode, "_layers", {})
    return marlin_decode


def test_a_layer_that_agrees_with_marlin_takes_the_op(fresh) -> None:
    """The layer passes the check against Marlin; the op then gives one token the kernel's
    result and more tokens Marlin's, and torch.compile traces it whole (the kernel at the
    real shapes: test_matches_the_float32_product)."""
    from gemma4_quant.kernels.marlin_gemv import marlin_gemv

    kernel, layer, w = _kernel_and_layer(1024, 512, 32)
    assert fresh.decide(kernel, layer, _exact_apply(w), "force", (9, 0))
    key, group, n = getattr(layer, fresh._FLAG)
    op = torch.ops.gemma4_quant.marlin_linear
    one = torch.randn(1, 1024).bfloat16().to(DEVICE)
    assert torch.equal(
        op(one, layer.weight_packed, layer.weight_scale, group, key, n),
        marlin_gemv(one, layer.weight_packed, layer.weight_scale, 32, **fresh._FORCED_TILES),
    )
    three = torch.randn(3, 1024).bfloat16().to(DEVICE)
    assert torch.equal(
        op(three, layer.weight_packed, layer.weight_scale, group, key, n),
        _exact_apply(w)(kernel, layer, three),
    )

    def linear(x: torch.Tensor) -> torch.Tensor:
        return op(x, layer.weight_packed, layer.weight_scale, group, key, n) * 2

    compiled = torch.compile(linear, backend="aot_eager", fullgraph=True, dynamic=True)
    for x in (one, three):
        assert torch.equal(compiled(x), linear(x))


def test_a_layer_that_disagrees_with_marlin_keeps_it(fresh, caplog) -> None:
    """Weights Marlin would read otherwise than the kernel (here: another layer's) keep
    Marlin, with a warning that says by how much."""
    kernel, layer, _ = _kernel_and_layer(512, 256, 32)
    _, _, other = _kernel_and_layer(512, 256, 32, full_weight_shape=(512, 256))
    other = torch.roll(other, 1, dims=1)
    with caplog.at_level("WARNING", logger="vllm.gemma4_quant"):
        assert not fresh.decide(kernel, layer, _exact_apply(other), "force", (9, 0))
    assert not hasattr(layer, fresh._FLAG) and not fresh._layers
    assert "kernels err" in caplog.text and "keep Marlin" in caplog.text


def _act_order_case() -> list[dict]:
    """The act-order flag, where this vLLM's config has one (0.32 dropped it)."""
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import (
        MPLinearLayerConfig,
    )

    return [{"has_g_idx": True}] if "has_g_idx" in MPLinearLayerConfig.__dataclass_fields__ else []


@pytest.mark.parametrize(
    "config",
    [
        {"zero_points": True},
        *_act_order_case(),
        {"act_type": torch.float8_e4m3fn},
        {"partition_weight_shape": (512, 192)},  # Marlin would have padded N
    ],
)
def test_layers_marlin_holds_otherwise_keep_marlin(fresh, config) -> None:
    kernel, layer, w = _kernel_and_layer(512, 256, 32, **config)
    assert not fresh.decide(kernel, layer, _exact_apply(w), "force", (9, 0))
    assert not hasattr(layer, fresh._FLAG)


def test_auto_takes_only_measured_shapes(fresh, monkeypatch) -> None:
    kernel, layer, w = _kernel_and_layer(512, 256, 32)
    monkeypatch.setattr(fresh, "TILES", {(9, 0): {(4096, 2816): fresh._FORCED_TILES}})
    assert not fresh.decide(kernel, layer, _exact_apply(w), "auto", (9, 0))
    assert fresh.tiles_for("auto", (9, 0), 4096, 2816) == fresh._FORCED_TILES
    assert fresh.tiles_for("auto", (8, 0), 4096, 2816) is None
    assert fresh.tiles_for("force", (8, 0), 512, 256) == fresh._FORCED_TILES
    monkeypatch.setenv("GEMMA4_QUANT_INT4_MAXNREG", "96")  # for measuring: every tile
    assert fresh.tiles_for("auto", (9, 0), 4096, 2816) == {**fresh._FORCED_TILES, "maxnreg": 96}
    assert fresh.tiles_for("auto", (8, 0), 4096, 2816) is None

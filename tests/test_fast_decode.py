"""The fast_decode patch's decision, read from vLLM's code and the installed build.

The op it installs is checked against vLLM's kernels in ``tests/test_dense_decode.py``
(Triton's interpreter), and its speed and end-to-end numbers on a GPU by
``bench/gpu_throughput.py`` (docs/gpu-results.md).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
import torch

from gemma4_quant import envs
from gemma4_quant.patches import Status, fast_decode, vllm_source

FORWARD_TEXT = vllm_source(fast_decode._MODEL)


def test_the_forward_is_recognized() -> None:
    assert fast_decode._forward_recognized(FORWARD_TEXT)


def test_other_forward_code_is_not_recognized() -> None:
    """A Gemma4MLP forward that does anything else: the patch changes nothing."""
    edited = FORWARD_TEXT.replace(
        "        x = self.act_fn(gate_up)\n",
        "        x = self.act_fn(gate_up) * self.scale\n",
        1,
    )
    assert edited != FORWARD_TEXT
    assert not fast_decode._forward_recognized(edited)


def test_on_by_default_and_not_on_the_cpu_build(monkeypatch) -> None:
    """On unless turned off (measured end to end inside vLLM, docs/gpu-results.md 3d);
    it has nothing to do on vLLM's CPU build, which the suite runs; ``off`` says so."""
    monkeypatch.delenv("GEMMA4_QUANT_FAST_DECODE", raising=False)
    assert envs.fast_decode_mode() == "auto"
    detection = fast_decode.detect()
    assert detection.status is Status.NOT_NEEDED, detection.reason
    assert "CPU build" in detection.reason
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "off")
    detection = fast_decode.detect()
    assert detection.status is Status.NOT_NEEDED
    assert detection.reason.startswith("GEMMA4_QUANT_FAST_DECODE=off")


def test_only_the_measured_shape_unless_forced() -> None:
    """26B-A4B's dense MLP was measured; the 31B's (hidden 5376, intermediate 21504) and
    the small models' were not, so ``auto`` leaves them to vLLM."""
    assert fast_decode.measured_shape("auto", 2816, 2112)
    assert not fast_decode.measured_shape("auto", 5376, 21504)
    assert not fast_decode.measured_shape("auto", 1536, 6144)
    assert fast_decode.measured_shape("force", 5376, 21504)


@pytest.fixture
def warnings(monkeypatch) -> Iterator[Callable[[], str]]:
    """The plugin's log so far, as text, and a fresh once-per-process check."""
    monkeypatch.setattr(fast_decode, "_checked", {})
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.gemma4_quant")
    logger.addHandler(handler)
    try:
        yield lambda: "\n".join(r.getMessage() for r in records)
    finally:
        logger.removeHandler(handler)


def _exact(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, **_: int) -> torch.Tensor:
    inter = down.shape[1]
    h = x.float() @ gate_up.float().T
    out = (
        torch.nn.functional.gelu(h[:, :inter], approximate="tanh") * h[:, inter:]
    ) @ down.float().T
    return out.to(x.dtype)


def test_kernels_that_fail_or_compute_wrong_keep_vllms_forward(monkeypatch, warnings) -> None:
    """The build-time check of one token: a kernel that raises (a Triton that cannot
    compile it) or that is off (a GPU where it computes wrong) leaves vLLM's forward, with
    one warning naming the cause; one that computes the product passes, once per shape."""
    tiles = fast_decode.TILES[(9, 0)]

    def broken(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(fast_decode, "_kernel", lambda: broken)
    assert not fast_decode.kernels_work(tiles, 256, 192, device="cpu")
    assert "RuntimeError: PassManager::run failed" in warnings()
    assert "keeps vLLM's kernels" in warnings()

    monkeypatch.setattr(fast_decode, "_kernel", lambda: lambda x, gate_up, down, **kw: 0 * x)
    assert not fast_decode.kernels_work(tiles, 256, 256, device="cpu")
    assert "err 1.0000 against the float32 product at hidden 256" in warnings()

    calls = []

    def exact(*args: torch.Tensor, **kwargs: int) -> torch.Tensor:
        calls.append(args[0].shape)
        return _exact(*args, **kwargs)

    monkeypatch.setattr(fast_decode, "_kernel", lambda: exact)
    assert fast_decode.kernels_work(tiles, 2816, 2112, device="cpu")
    assert fast_decode.kernels_work(tiles, 2816, 2112, device="cpu")
    assert calls == [torch.Size([1, 2816])], "checked once per process and shape"


def test_the_check_makes_its_inputs_on_the_cpu_whatever_the_default_device(
    monkeypatch, warnings
) -> None:
    """vLLM builds the model under a default device of its own (CUDA on a GPU). The check's
    random inputs must not follow it: a CPU generator asked for CUDA tensors raised in the
    engine core and stopped vLLM (seen on an H100). Here the default device is ``meta``."""
    monkeypatch.setattr(fast_decode, "_kernel", lambda: _exact)
    with torch.device("meta"):
        assert fast_decode.kernels_work(fast_decode.TILES[(9, 0)], 256, 192, device="cpu")
    assert not warnings()


def test_marlin_decode_takes_only_measured_shapes_in_auto(monkeypatch) -> None:
    """``marlin_decode`` shares the switch: on a CUDA build (here the CPU-build test is
    turned off) ``auto`` applies it where ``TILES`` names a shape measured faster end to
    end (26B-A4B's four projections on 9.0: bench/results/h100-2026-12-07), and not
    without one; ``force`` applies it, ``off`` does not. The kernel, the per-layer decision
    and the op: tests/test_marlin_gemv.py."""
    from gemma4_quant.patches import marlin_decode

    monkeypatch.setattr(fast_decode, "_cpu_build", lambda: False)
    monkeypatch.delenv("GEMMA4_QUANT_FAST_DECODE", raising=False)
    assert set(marlin_decode.TILES) == {(9, 0)}
    assert set(marlin_decode.TILES[(9, 0)]) == {(2816, 8192), (4096, 2816), (2816, 10240),
                                                (8192, 2816)}  # fmt: skip
    assert marlin_decode.detect().status is Status.NEEDED
    monkeypatch.setattr(marlin_decode, "TILES", {})
    detection = marlin_decode.detect()
    assert detection.status is Status.NOT_NEEDED
    assert "no shape measured faster end to end" in detection.reason
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "force")
    assert marlin_decode.detect().status is Status.NEEDED
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "off")
    assert marlin_decode.detect().reason.startswith("GEMMA4_QUANT_FAST_DECODE=off")

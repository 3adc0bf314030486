"""The fast_decode patch's decision, read from vLLM's code and the installed build.

The op it installs is checked against vLLM's kernels in ``tests/test_dense_decode.py``
(Triton's interpreter), and its speed and end-to-end numbers on a GPU by
``bench/gpu_throughput.py`` (docs/gpu-results.md).
"""

from __future__ import annotations

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


def test_off_by_default_and_not_on_the_cpu_build(monkeypatch) -> None:
    """Off unless asked for (until measured end to end inside vLLM); asked for, it has
    nothing to do on vLLM's CPU build, which the suite runs."""
    monkeypatch.delenv("GEMMA4_QUANT_FAST_DECODE", raising=False)
    detection = fast_decode.detect()
    assert detection.status is Status.NOT_NEEDED
    assert detection.reason.startswith("GEMMA4_QUANT_FAST_DECODE=off (the default")
    monkeypatch.setenv("GEMMA4_QUANT_FAST_DECODE", "auto")
    detection = fast_decode.detect()
    assert detection.status is Status.NOT_NEEDED, detection.reason
    assert "CPU build" in detection.reason

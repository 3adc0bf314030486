"""Prompt logprobs and greedy tokens of models served by ``vllm.LLM`` at a tensor-parallel
size, one model after another in one process.

Runs as a subprocess of the tests (``conftest.run_logprobs``):

    python tests/logprobs.py OUT.json --tensor-parallel N [--expert-parallel] MODEL...

``OUT.json`` maps each model to ``{"prompt_logprobs": [[float per prompt token after the
first] per prompt], "tokens": [[int] per prompt]}`` or, where vLLM refuses the model,
``{"error": "..."}``. With N > 1 vLLM's multiprocessing executor spawns one worker per
rank, which is why this module's main code is guarded.
"""

from __future__ import annotations

import argparse
import gc
import json
import traceback
from pathlib import Path
from typing import Any

from greedy import MAX_TOKENS, PROMPTS, make_llm


def serve(model: str, tensor_parallel: int, expert_parallel: bool) -> dict[str, Any]:
    from vllm import SamplingParams

    llm = make_llm(
        model,
        tensor_parallel_size=tensor_parallel,
        enable_expert_parallel=expert_parallel,
        # one engine process, and worker processes only where there are several ranks
        distributed_executor_backend="mp" if tensor_parallel > 1 else "uni",
    )
    params = SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=0
    )
    outputs = llm.generate(list(PROMPTS), params, use_tqdm=False)
    result = {
        # the logprob of each prompt token given the ones before it: teacher-forced, so
        # every model is scored on the same tokens whatever it would generate
        "prompt_logprobs": [
            [
                entry[token].logprob
                for token, entry in zip(
                    out.prompt_token_ids[1:], out.prompt_logprobs[1:], strict=True
                )
            ]
            for out in outputs
        ],
        "tokens": [list(out.outputs[0].token_ids) for out in outputs],
    }
    del llm, outputs
    return result


def main() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--tensor-parallel", type=int, default=1)
    parser.add_argument("--expert-parallel", action="store_true")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for model in args.models:
        try:
            results[model] = serve(model, args.tensor_parallel, args.expert_parallel)
        except Exception as exc:  # vLLM's refusal is the result for this model
            traceback.print_exc()
            results[model] = {"error": f"{type(exc).__name__}: {exc}"}
        gc.collect()
        cleanup_dist_env_and_memory()
    Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()

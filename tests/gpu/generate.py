"""One vLLM run on a GPU: load a checkpoint, greedy-decode fixed prompts, dump JSON.

    python tests/gpu/generate.py CKPT OUT.json [--tp 2] [--ep] [--max-tokens 16]
        [--logprobs 5] [--attention-backend TRITON_ATTN] [--gpu-memory-utilization 0.04]
        [--kv-cache-bytes 268435456]

Runs in its own process (vLLM's distributed state is per process). The plugin is on or
off the way a user has it: ``VLLM_PLUGINS=none`` (set by the driver) loads no plugin,
which is stock vLLM. ``enforce_eager=True``: correctness runs compare numbers, and eager
mode is the same code path on every release.

The prompts are token ids (no tokenizer involved), drawn from a fixed seed over the
checkpoint's vocabulary, so every release and layout sees the same inputs.
The JSON holds: ``ok``, ``error`` (the last lines of the traceback), the vLLM version,
the plugin's report, and per prompt the greedy token ids and, per step, the top
``--logprobs`` token logprobs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

NUM_PROMPTS = 4
PROMPT_LENGTHS = (7, 12, 19, 26)
FIRST_TOKEN_ID = 6  # after the builder's special tokens


def make_prompts(vocab_size: int, seed: int = 1234) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(PROMPT_LENGTHS[i])]
        for i in range(NUM_PROMPTS)
    ]


def _step_logprobs(step) -> dict[str, float]:
    """{token id: logprob} of one decoding step (dict or FlatLogprobs entry)."""
    items = step.items() if hasattr(step, "items") else step
    return {str(int(tok)): float(getattr(lp, "logprob", lp)) for tok, lp in items}


def _plugin_report() -> dict:
    mod = sys.modules.get("gemma4_quant")
    if mod is None:
        return {"loaded": False}
    report = getattr(mod, "_report", None) or []
    return {
        "loaded": True,
        "applied": [name for name, outcome, _ in report if outcome == "applied"],
        "report": [list(r) for r in report],
    }


def engine_kwargs(args: argparse.Namespace, **sizes) -> dict:
    """``LLM(...)`` arguments of a correctness run: eager, seeded, ``args.tp``/``ep``."""
    kwargs = dict(
        model=args.model, tensor_parallel_size=args.tp, enforce_eager=True, seed=0, **sizes
    )
    if args.ep:
        kwargs["enable_expert_parallel"] = True
    if args.attention_backend and args.attention_backend != "auto":
        kwargs["attention_backend"] = args.attention_backend
    return kwargs


def vocab_size(model: str) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    return config.get("text_config", config)["vocab_size"]


def recorded_run(
    args: argparse.Namespace, out: Path, body: Callable[[dict], None], result: dict
) -> None:
    """``body(result)`` fills ``result``; a failed load is a result too. ``result`` (with
    ``ok``, the vLLM version, the error and traceback of a failure, the wall time) goes to
    ``out`` as JSON, one ``RESULT`` line to stdout, and the process leaves hard after 60 s
    so that a shutdown that hangs cannot hold the GPU."""
    result.update(model=args.model, tp=args.tp, ep=args.ep, ok=False)
    t0 = time.perf_counter()
    try:
        import vllm

        result["vllm"] = vllm.__version__
        body(result)
        result["ok"] = True
    except BaseException as exc:  # noqa: BLE001 - a failed load is a result too
        result["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["traceback"] = "".join(traceback.format_exception(exc))[-6000:]
    result["wall_s"] = round(time.perf_counter() - t0, 2)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("RESULT", "ok" if result["ok"] else "FAILED " + result.get("error", "")[:300])
    sys.stdout.flush()
    timer = threading.Timer(60, os._exit, args=(0,))
    timer.daemon = True
    timer.start()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", action="store_true", help="enable_expert_parallel")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--logprobs", type=int, default=5)
    parser.add_argument("--attention-backend", default="TRITON_ATTN")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.04)
    parser.add_argument("--kv-cache-bytes", type=int, default=256 << 20)
    parser.add_argument("--max-model-len", type=int, default=512)
    args = parser.parse_args()

    t0 = time.perf_counter()  # ready_s counts vLLM's import, as it always did

    def body(result: dict) -> None:
        from vllm import LLM, SamplingParams

        llm = LLM(
            **engine_kwargs(
                args,
                max_model_len=args.max_model_len,
                max_num_seqs=NUM_PROMPTS,
                gpu_memory_utilization=args.gpu_memory_utilization,
                kv_cache_memory_bytes=args.kv_cache_bytes,
            )
        )
        result["ready_s"] = round(time.perf_counter() - t0, 2)
        result["plugin"] = _plugin_report()
        params = SamplingParams(
            temperature=0.0, max_tokens=args.max_tokens, logprobs=args.logprobs, ignore_eos=True
        )
        prompts = make_prompts(vocab_size(args.model))
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        result["prompts"] = prompts
        result["outputs"] = [
            {
                "token_ids": list(out.outputs[0].token_ids),
                "logprobs": [_step_logprobs(step) for step in out.outputs[0].logprobs],
            }
            for out in outputs
        ]

    result = {
        "plugins_env": os.environ.get("VLLM_PLUGINS"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    recorded_run(args, Path(args.out), body, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

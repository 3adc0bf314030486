"""CPU benchmark: a quantized Gemma 4 MoE checkpoint served through the dequantize-on-load
fallback, against its dequantized bf16 twin.

    python bench/cpu_fallback.py [--preset tiny|small] [--workdir DIR] [--batch N]
                                 [--max-tokens N] [--runs N] [--repeat N]

Builds the checkpoint (``ct-fused-w4a16``, the cyankiwi layout) and its twin with the
project's builder (kept in ``--workdir`` and reused), then runs each model in its own
subprocess with ``vllm.LLM`` and the same settings (bf16, eager, the engine and the
worker in that one process, so that its peak RSS is the whole footprint). Measures:

- load: wall and CPU time of ``LLM(...)`` (engine start, weight loading, the
  fallback's dequantization, KV-cache set-up, warm-up), imports excluded;
- peak RSS: ``ru_maxrss`` of the subprocess (the high-water mark, load included);
- decode: generated tokens per second (wall) and per CPU-second of the process over
  ``--batch`` greedy requests of ``--max-tokens`` tokens each (after one warm-up
  request), best of ``--runs``. On a shared machine the CPU-time figures are the
  steadier ones: other load stretches wall time, much less the CPU time spent.

Each model runs ``--repeat`` times, alternating with the other (and the order); the table
shows the best of them (fastest load, lowest peak, fastest decode), as other load on the
machine only ever makes a figure worse.

Prints a table and the quantized/twin ratios, and whether the greedy tokens agree.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUT = "ct-fused-w4a16"
# Text-config overrides for the builder. "tiny" is the test model (weights of a few MB,
# so load time is mostly vLLM's start-up); "small" has ~0.4 GiB of bf16 weights, enough
# for the dequantization and the memory it costs to show.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {
        "hidden_size": 1024,
        "intermediate_size": 1024,
        "moe_intermediate_size": 512,
        "num_experts": 32,
        "top_k_experts": 4,
        "num_hidden_layers": 6,
        "num_attention_heads": 8,
        "head_dim": 128,
        "num_key_value_heads": 4,
        "global_head_dim": 256,
        "num_global_key_value_heads": 2,
    },
}
PROMPT = "Mixture of experts models route each token to a few experts, so that"


# --------------------------------------------------------------------- child


def child(model: str, batch: int, max_tokens: int, runs: int) -> dict:
    """One model in this process: load, warm up, decode; return the measurements."""
    from vllm import LLM, SamplingParams

    started, started_cpu = time.perf_counter(), time.process_time()
    llm = LLM(
        model=model,
        dtype="bfloat16",
        enforce_eager=True,
        max_model_len=512,
        seed=0,
        distributed_executor_backend="uni",
    )
    load_s = time.perf_counter() - started
    load_cpu_s = time.process_time() - started_cpu

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([PROMPT], params, use_tqdm=False)  # warm-up
    prompts = [f"{PROMPT} ({i})" for i in range(batch)]
    best, best_cpu = float("inf"), float("inf")
    tokens: list[list[int]] = []
    for _ in range(runs):
        started, started_cpu = time.perf_counter(), time.process_time()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        best = min(best, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - started_cpu)
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
    generated = sum(len(t) for t in tokens)
    return {
        "load_s": load_s,
        "load_cpu_s": load_cpu_s,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "decode_tok_s": generated / best,
        "decode_tok_cpu_s": generated / best_cpu,
        "generated": generated,
        "tokens": tokens,
    }


# --------------------------------------------------------------------- parent


def build(workdir: Path, preset: str) -> tuple[Path, Path]:
    from gemma4_quant.checkpoints import build_checkpoint, write_twin

    quantized = workdir / f"{preset}-{LAYOUT}"
    twin = workdir / f"{preset}-{LAYOUT}-twin"
    if not (quantized / "config.json").exists():
        build_checkpoint(quantized, LAYOUT, **PRESETS[preset])
    if not (twin / "config.json").exists():
        write_twin(quantized, twin)
    return quantized, twin


def run_child(model: Path, args: argparse.Namespace, workdir: Path) -> dict:
    out = workdir / f"{model.name}.result.json"
    log = workdir / f"{model.name}.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # engine core in this process: ru_maxrss then covers everything
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(model),
        "--out",
        str(out),
        "--batch",
        str(args.batch),
        "--max-tokens",
        str(args.max_tokens),
        "--runs",
        str(args.runs),
    ]
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{model.name} failed ({proc.returncode}):\n{tail}")
    result = json.loads(out.read_text())
    result["fallback_warning"] = next(
        (
            ln.split("gemma4_quant: ", 1)[1]
            for ln in log.read_text().splitlines()
            if "Dequantizing" in ln
        ),
        None,
    )
    return result


def best(runs: list[dict]) -> dict:
    """The least disturbed of repeated runs: fastest load, lowest peak, fastest decode."""
    result = dict(runs[0])
    for key in ("load_s", "load_cpu_s", "peak_rss_gib"):
        result[key] = min(r[key] for r in runs)
    for key in ("decode_tok_s", "decode_tok_cpu_s"):
        result[key] = max(r[key] for r in runs)
    return result


def checkpoint_gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30


def report(quantized: Path, twin: Path, q: dict, t: dict) -> str:
    rows = [
        ("checkpoint on disk (GiB)", checkpoint_gib(quantized), checkpoint_gib(twin), "{:.4f}"),
        ("load: LLM() wall time (s)", q["load_s"], t["load_s"], "{:.1f}"),
        ("load: LLM() CPU time (s)", q["load_cpu_s"], t["load_cpu_s"], "{:.1f}"),
        ("peak RSS (GiB)", q["peak_rss_gib"], t["peak_rss_gib"], "{:.3f}"),
        ("decode (tokens/s, wall)", q["decode_tok_s"], t["decode_tok_s"], "{:.1f}"),
        ("decode (tokens/CPU-s)", q["decode_tok_cpu_s"], t["decode_tok_cpu_s"], "{:.1f}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'':{width}}  {'quantized+fallback':>18}  {'bf16 twin':>10}  {'ratio':>6}"]
    for label, qv, tv, fmt in rows:
        ratio = qv / tv if tv else float("nan")
        lines.append(f"{label:{width}}  {fmt.format(qv):>18}  {fmt.format(tv):>10}  {ratio:>6.2f}")
    same = q["tokens"] == t["tokens"]
    lines.append(f"greedy tokens identical: {'yes' if same else 'NO'} ({q['generated']} tokens)")
    lines.append(f"fallback: {q['fallback_warning'] or 'not used (vLLM had kernels)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="timed decode rounds per load")
    parser.add_argument(
        "--repeat", type=int, default=2, help="subprocesses per model (alternating); best kept"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        result = child(args.child, args.batch, args.max_tokens, args.runs)
        args.out.write_text(json.dumps(result))
        return 0

    workdir = args.workdir or Path(tempfile.gettempdir()) / "gemma4-quant-bench"
    workdir.mkdir(parents=True, exist_ok=True)
    quantized, twin = build(workdir, args.preset)
    print(f"preset {args.preset}: {quantized}", flush=True)
    results: dict[Path, list[dict]] = {quantized: [], twin: []}
    for i in range(args.repeat):  # alternate the order, so that load drifts hit both alike
        for model in (quantized, twin) if i % 2 == 0 else (twin, quantized):
            results[model].append(run_child(model, args, workdir))
    print(report(quantized, twin, best(results[quantized]), best(results[twin])))
    return 0


if __name__ == "__main__":
    sys.exit(main())

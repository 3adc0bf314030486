"""Kernels and GPU time per decode step and per decoder layer, from the GPU's own trace.

    python bench/gpu_throughput.py run MODEL OUT.json ... --profile-steps 32
    python bench/decode_profile.py compare A.json B.json [--top 25]

``gpu_throughput.py run --profile-steps N`` calls :func:`profile` in its vLLM process
after the timed runs, at each batch size. The torch profiler (CUDA activity only) runs
inside vLLM's worker, where the kernels are launched, through ``LLM.apply_model``, so the
measured configuration is the benchmark's own (engine core in its own process, CUDA
graphs, torch.compile). Each batch decodes greedy, ``ignore_eos``, twice under the
profiler: ``1 + SHORT`` and ``1 + SHORT + N`` tokens from the same prompts. Both traces
hold the same prefill and first token, so their difference is N decode steps: kernels
(and memory copies and sets) per step and their GPU time, by kernel name. Kernels inside
CUDA graph replays are in the trace one by one.

The longer trace also gives the GPU's timeline over its last N steps, which the once-a-step
kernel that takes longest (the logits GEMM) delimits: the time per step (``span``, the
GPU-side time per token), the part no kernel ran (``idle``), and that idle time split into
gaps shorter than ``SHORT_GAP_US`` (between kernels of one graph) and longer ones (the GPU
waiting for the host).

Per layer is per step over the decoder layers (``num_hidden_layers``); what runs once a
step (embedding, final norm, logits, sampling) is inside that share, and the table shows
it by name. ``compare`` prints a (before) against b (after): per batch size the kernels and
GPU microseconds per step and per layer, and the kernel names whose calls or time differ
most.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

SHORT = 4
SHORT_GAP_US = 20.0
TRACE_KINDS = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_KINDS = ("cpu_op",)  # a machine without a GPU: operators, for a dry run of the script

# --------------------------------------------------------------------------- in the worker

_profiler = None


def start(model: object = None) -> bool:
    """Start a CUDA-only profiler in this (worker) process; ``apply_model`` calls it."""
    global _profiler
    import torch

    activity = torch.profiler.ProfilerActivity
    gpu = torch.cuda.is_available()
    _profiler = torch.profiler.profile(activities=[activity.CUDA if gpu else activity.CPU])
    _profiler.start()
    return True


def stop(model: object = None) -> dict:
    """Stop it; ``{"kernels": {kernel name: [calls, GPU microseconds]}, "events": [(name,
    start, duration), ...]}`` of everything it saw, in microseconds."""
    global _profiler
    import torch

    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.synchronize()
    prof, _profiler = _profiler, None
    prof.stop()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.loads(Path(path).read_text()).get("traceEvents", [])
    kinds = TRACE_KINDS if gpu else CPU_KINDS
    timed = [
        (e.get("name", "?"), float(e["ts"]), float(e.get("dur", 0.0)))
        for e in events
        if e.get("ph") == "X" and e.get("cat") in kinds and "ts" in e
    ]
    return {"kernels": count_events(events, kinds), "events": timed}


def timeline(
    events: list[tuple[str, float, float]], kernels: dict[str, dict[str, float]], steps: int
) -> dict[str, float]:
    """Per step, over the trace's last ``steps`` steps: microseconds from one start of the
    once-a-step kernel that takes longest (``kernels``: per step, :func:`per_step`) to
    the next, and the idle time inside, in gaps shorter and longer than ``SHORT_GAP_US``."""
    once = [name for name, k in kernels.items() if k["calls"] == 1]
    if not once:
        return {}
    marker = max(once, key=lambda name: kernels[name]["us"])
    events = sorted(events, key=lambda e: e[1])
    starts = [ts for name, ts, _ in events if name == marker]
    if len(starts) <= steps:
        return {}
    first, last = starts[-steps - 1], starts[-1]
    out = {"span_us": (last - first) / steps, "idle_short_us": 0.0, "idle_long_us": 0.0}
    end = first
    for _, ts, dur in [*(e for e in events if first <= e[1] < last), (marker, last, 0.0)]:
        if ts > end:
            gap = ts - end
            out["idle_short_us" if gap < SHORT_GAP_US else "idle_long_us"] += gap / steps
        end = max(end, ts + dur)
    out["marker"] = marker[:60]
    return {k: round(v, 1) if isinstance(v, float) else v for k, v in out.items()}


def count_events(events: list[dict], kinds: tuple[str, ...]) -> dict[str, list[float]]:
    stats: dict[str, list[float]] = {}
    for event in events:
        if event.get("ph") != "X" or event.get("cat") not in kinds:
            continue
        entry = stats.setdefault(event.get("name", "?"), [0, 0.0])
        entry[0] += 1
        entry[1] += float(event.get("dur", 0.0))
    return stats


# --------------------------------------------------------------------------- in the driver


def per_step(
    short: dict[str, list[float]], long: dict[str, list[float]], steps: int
) -> dict[str, dict[str, float]]:
    """Per kernel name, calls and GPU microseconds per decode step (long minus short)."""
    zero = [0, 0.0]
    out = {}
    for name in set(short) | set(long):
        (calls_l, us_l), (calls_s, us_s) = long.get(name, zero), short.get(name, zero)
        calls, us = (calls_l - calls_s) / steps, (us_l - us_s) / steps
        if calls or us:
            out[name] = {"calls": round(calls, 3), "us": round(us, 3)}
    return out


def summarize(kernels: dict[str, dict[str, float]], layers: int) -> dict[str, float]:
    calls = sum(k["calls"] for k in kernels.values())
    us = sum(k["us"] for k in kernels.values())
    return {
        "kernels_per_step": round(calls, 1),
        "gpu_us_per_step": round(us, 1),
        "kernels_per_layer": round(calls / layers, 2),
        "gpu_us_per_layer": round(us / layers, 2),
    }


def num_layers(model: str) -> int:
    config = json.loads((Path(model) / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers"])


def profile(
    llm: object,
    model: str,
    batch: int,
    steps: int,
    prompts: list[dict],
    generate: Callable[[list[dict], int], None],
) -> dict:
    """Per-step and per-layer kernels of ``steps`` decode steps at this batch size."""
    traces = []
    for tokens in (1 + SHORT, 1 + SHORT + steps):
        llm.apply_model(start)
        try:
            generate(prompts, tokens)
        finally:
            (trace,) = llm.apply_model(stop)  # one worker: TP=1
        traces.append(trace)
    kernels = per_step(*(t["kernels"] for t in traces), steps)
    layers = num_layers(model)
    result = {"batch": batch, "steps": steps, "layers": layers, **summarize(kernels, layers)}
    result["timeline_per_step"] = timeline(traces[1]["events"], kernels, steps)
    result["kernels"] = dict(sorted(kernels.items(), key=lambda kv: -kv[1]["us"]))
    if not kernels:
        result["note"] = "no GPU activity in the trace"
    return result


def enable_in_workers() -> None:
    """Before ``LLM()``: the worker must be able to import this module by name (the
    functions go to it pickled by reference), and ``apply_model`` pickles them."""
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if here not in sys.path:
        sys.path.insert(0, here)


# --------------------------------------------------------------------------- compare


def _short(name: str, width: int = 70) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def cmd_compare(args: argparse.Namespace) -> int:
    a = json.loads(Path(args.a).read_text()).get("profile", {})
    b = json.loads(Path(args.b).read_text()).get("profile", {})
    report = {}
    for batch in sorted(set(a) & set(b), key=int):
        pa, pb = a[batch], b[batch]
        keys = ("kernels_per_step", "gpu_us_per_step", "kernels_per_layer", "gpu_us_per_layer")
        print(f"\nbatch {batch} ({pa['steps']} decode steps, {pa['layers']} layers)")
        print("| figure | a | b | b - a |\n|---|---|---|---|")
        for key in keys:
            print(f"| {key} | {pa[key]} | {pb[key]} | {round(pb[key] - pa[key], 2)} |")
        ta, tb = pa.get("timeline_per_step", {}), pb.get("timeline_per_step", {})
        for key in ("span_us", "idle_short_us", "idle_long_us"):
            if key in ta and key in tb:
                print(f"| {key} per step | {ta[key]} | {tb[key]} | {round(tb[key] - ta[key], 1)} |")
        zero = {"calls": 0.0, "us": 0.0}
        names = set(pa["kernels"]) | set(pb["kernels"])
        rows = {n: (pa["kernels"].get(n, zero), pb["kernels"].get(n, zero)) for n in names}
        by_time = sorted(names, key=lambda n: -max(rows[n][0]["us"], rows[n][1]["us"]))
        gap = {n: abs(kb["us"] - ka["us"]) for n, (ka, kb) in rows.items()}
        # other calls, or 0.05 us or more apart (smaller is run-to-run noise)
        by_diff = [
            n
            for n in sorted(names, key=gap.__getitem__, reverse=True)
            if rows[n][0]["calls"] != rows[n][1]["calls"] or gap[n] >= 0.05
        ]
        for title, chosen in (("most GPU time", by_time), ("largest difference", by_diff)):
            print(f"\n{title}\n| kernel | calls a | calls b | us a | us b |\n|---|---|---|---|---|")
            for name in chosen[: args.top]:
                (ka, kb), label = rows[name], _short(name)
                print(f"| {label} | {ka['calls']} | {kb['calls']} | {ka['us']} | {kb['us']} |")
        report[batch] = {
            "a": {k: pa[k] for k in keys} | pa.get("timeline_per_step", {}),
            "b": {k: pb[k] for k in keys} | pb.get("timeline_per_step", {}),
        }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compare", help="a (before) against b (after), two `run` results")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--top", type=int, default=25)
    c.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return cmd_compare(args)


if __name__ == "__main__":
    sys.exit(main())

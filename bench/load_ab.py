"""Weight-load time, stock vLLM against vLLM with the plugin, without run-to-run noise.

    python bench/load_ab.py MODEL [--device cuda] [--repeat 10] [--out OUT.json]
    python bench/load_ab.py MODEL --processes 4 [--repeat 3] [--device cuda] [--out OUT.json]

Separate processes load a 15 GB checkpoint in 10 - 17 s on the same GPU from run to run
(first touch of host memory, page cache, placement), which hides any 1% difference. So:

In-process mode (default): one process builds the model once (``tests/load_model.py``'s
``vllm_model``, the plugin loaded as vLLM loads it), loads its weights ``--warmup`` times
untimed, then ``2 x --repeat`` times into the same parameters, in ABBA order (a linear
drift cancels): (a) ``Gemma4ForCausalLM.load_weights`` as vLLM ships it (the function
under the plugin's wrappers, through ``__wrapped__``) and (b) the plugin's wrapped one.
Every load-path change the plugin makes is such a wrapper, so a - b is the plugin's cost.

Process mode (``--processes N``): N child processes in ABBA order, a with vLLM's plugins
off (``VLLM_PLUGINS=none``: stock vLLM, nothing of the plugin imported) and b with them
on; each child builds the model, loads once untimed, then ``--repeat`` timed loads.

``--preload`` (either mode): the checkpoint's tensors are read once into ``--device`` memory
and each timed load is ``model.load_weights`` over them: the code the plugin wraps, without
the file reads, whose time varied by +-20% from load to load on the H200 measured.

Both modes check that a and b load the same values (a fingerprint of every parameter
after the last load of each side) and print every run's seconds, the medians, b/a as a
speed (a's seconds over b's; >= 1 means the plugin is not slower) and, in-process, the
ratio of each adjacent a, b pair, and b/a of the process's CPU time (time.process_time)
in-process, which a machine's wall-clock jitter may spare.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

ORDER = "abba"


def unwrapped(function):
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def fingerprint(model) -> list[float]:
    """Per-parameter sums (float64) over the model: equal iff a and b load alike (for
    all practical purposes), cheap on the GPU."""
    import torch

    with torch.no_grad():
        return [float(p.detach().double().sum()) for _, p in sorted(model.named_parameters())]


def timed_loads(args: argparse.Namespace, sides: str) -> tuple[dict, dict]:
    """Build the model once, warm up, then one timed load per letter of ``sides``."""
    import torch
    from load_model import vllm_model

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    runs: dict[str, list[float]] = {"a": [], "b": [], "a_cpu": [], "b_cpu": []}
    prints: dict[str, list[float]] = {}
    with vllm_model(args.model, args.dtype, device=args.device) as (model, loader, config):
        cls = type(model)
        wrapped = cls.load_weights
        stock = unwrapped(wrapped)
        if "a" in sides and "b" in sides and stock is wrapped:
            print("note: load_weights is not wrapped (plugin not loaded): a and b are the same")
        if args.preload:
            weights = [
                (name, tensor.to(args.device, copy=True))  # on CPU too: off the mmap
                for name, tensor in loader.get_all_weights(config, model)
            ]
            sync()

            def load() -> None:
                model.load_weights(iter(weights))

        else:

            def load() -> None:
                loader.load_weights(model, config)

        try:
            for i, side in enumerate("w" * args.warmup + sides):
                cls.load_weights = stock if side == "a" else wrapped
                gc.collect()  # the previous run's garbage is not this run's cost
                sync()
                t, cpu = time.perf_counter(), time.process_time()
                load()
                sync()
                seconds = round(time.perf_counter() - t, 4)
                cpu = round(time.process_time() - cpu, 4)
                if side == "w":
                    print(f"warm-up {i + 1}: {seconds:.3f} s", flush=True)
                    continue
                runs[side].append(seconds)
                runs[f"{side}_cpu"].append(cpu)
                print(f"{side}: {seconds:.3f} s (CPU {cpu:.3f} s)", flush=True)
                if side not in sides[i - args.warmup + 1 :]:  # this side's last load
                    prints[side] = fingerprint(model)
        finally:
            cls.load_weights = wrapped
    return runs, prints


def in_process(args: argparse.Namespace) -> dict:
    sides = "".join(ORDER[i % 4] for i in range(2 * args.repeat))
    runs, prints = timed_loads(args, sides)
    pairs = [runs["a"][i] / runs["b"][i] for i in range(args.repeat)]
    return {
        "mode": "in-process",
        "order": sides,
        "runs": runs,
        "same_values": prints["a"] == prints["b"],
        "cpu_speed_b_over_a": round(
            statistics.median(runs["a_cpu"]) / statistics.median(runs["b_cpu"]), 4
        ),
        "pair_speed_b_over_a": {
            "median": round(statistics.median(pairs), 4),
            "min": round(min(pairs), 4),
            "max": round(max(pairs), 4),
        },
    }


def across_processes(args: argparse.Namespace) -> dict:
    runs: dict[str, list[float]] = {"a": [], "b": []}
    per_process = []
    prints: dict[str, list[float]] = {}
    for i in range(args.processes):
        side = ORDER[i % 4]
        env = dict(os.environ)
        if side == "a":
            env["VLLM_PLUGINS"] = "none"
        else:
            env.pop("VLLM_PLUGINS", None)
        out = Path(args.child_dir or ".", f"load_ab-child-{i}.json")
        cmd = [sys.executable, __file__, args.model, "--child", side, "--out", str(out)]
        cmd += ["--device", args.device, "--dtype", args.dtype, "--repeat", str(args.repeat)]
        cmd += ["--warmup", str(args.warmup)] + ["--preload"] * args.preload
        print(f"process {i + 1} ({side}, plugins {'off' if side == 'a' else 'on'})", flush=True)
        subprocess.run(cmd, env=env, check=True)
        child = json.loads(out.read_text())
        runs[side] += child["runs"][side]
        per_process.append({"side": side, "median_s": statistics.median(child["runs"][side])})
        prints.setdefault(side, child["fingerprint"])
        if child["fingerprint"] != prints[side]:
            raise SystemExit(f"process {i + 1}: loaded values differ from an earlier {side}")
    return {
        "mode": "processes",
        "runs": runs,
        "per_process": per_process,
        "same_values": prints["a"] == prints["b"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=5, help="timed loads per side")
    parser.add_argument("--warmup", type=int, default=1, help="untimed loads first")
    parser.add_argument("--preload", action="store_true", help="time load_weights only")
    parser.add_argument("--processes", type=int, default=0, help="process mode: N children")
    parser.add_argument("--child-dir", default=None, help="process mode: children's JSON")
    parser.add_argument("--child", choices=("a", "b"), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    if args.child:
        runs, prints = timed_loads(args, args.child * args.repeat)
        Path(args.out).write_text(
            json.dumps({"runs": runs, "fingerprint": prints[args.child]}) + "\n"
        )
        return 0
    result = across_processes(args) if args.processes else in_process(args)
    a, b = statistics.median(result["runs"]["a"]), statistics.median(result["runs"]["b"])
    result = {
        "model": args.model,
        "device": args.device,
        "warmup": args.warmup,
        "preload": args.preload,
        **result,
        "median_a_s": a,
        "median_b_s": b,
        "speed_b_over_a": round(a / b, 4),
        "mean_speed_b_over_a": round(
            statistics.mean(result["runs"]["a"]) / statistics.mean(result["runs"]["b"]), 4
        ),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if not result["same_values"]:
        print("error: a and b loaded different values", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

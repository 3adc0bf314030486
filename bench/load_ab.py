"""Weight-load time with and without the plugin's wrappers, in one process, alternating.

    python bench/load_ab.py MODEL [--device cuda] [--repeat 5] [--out OUT.json]

Separate processes load a 15 GB checkpoint in 10 - 17 s on the same GPU from run to run
(placement, page cache), which hides any 1% difference. Here one process builds the model
once (``tests/load_model.py``'s ``vllm_model``, the plugin loaded as vLLM loads it) and
then loads its weights ``2 x --repeat`` times into the same parameters, alternating:
(a) ``Gemma4ForCausalLM.load_weights`` as vLLM ships it (the function under the plugin's
wrappers, through ``__wrapped__``) and (b) the plugin's wrapped one. Printed: every run's
seconds, the medians and b/a as a speed (a's seconds over b's).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from load_model import vllm_model  # noqa: E402


def unwrapped(function):
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import torch

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    with vllm_model(args.model, args.dtype, device=args.device) as (model, loader, config):
        cls = type(model)
        wrapped = cls.load_weights
        stock = unwrapped(wrapped)
        if stock is wrapped:
            print("note: load_weights is not wrapped (plugin not loaded): a and b are the same")
        runs: dict[str, list[float]] = {"a": [], "b": []}
        for i in range(2 * args.repeat):
            side = "ab"[i % 2]
            cls.load_weights = stock if side == "a" else wrapped
            gc.collect()  # the previous run's garbage is not this run's cost
            sync()
            t = time.perf_counter()
            loader.load_weights(model, config)
            sync()
            runs[side].append(round(time.perf_counter() - t, 4))
            print(f"{side}: {runs[side][-1]:.3f} s", flush=True)
        cls.load_weights = wrapped
    a, b = statistics.median(runs["a"]), statistics.median(runs["b"])
    result = {
        "model": args.model,
        "device": args.device,
        "runs": runs,
        "median_a_s": a,
        "median_b_s": b,
        "speed_b_over_a": round(a / b, 4),
        "mean_speed_b_over_a": round(statistics.mean(runs["a"]) / statistics.mean(runs["b"]), 4),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the plugin adds to weight loading: its wrappers over a full-size tensor stream.

    python bench/plugin_overhead.py [--repeat 20]

The tensors of the synthetic full-size 26B-A4B checkpoint (``full_size_checkpoint.py``'s
names and shapes, as meta tensors: no data is read) stream through the plugin's
load-path wrappers as vLLM's ``Gemma4ForCausalLM.load_weights`` sees them on 0.24 -
0.30: ``load_guard``'s name recorder, then ``expert_names``' rewrite with its shape
checker, for each expert-mapping generation. Printed: the time per tensor and in all,
against the bare iteration, and as a fraction of a 10 s weight load (the H200 figure).
No GPU and no vLLM needed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from full_size_checkpoint import full_config, layer_specs  # noqa: E402

from gemma4_quant.layout import TEXT_PREFIX  # noqa: E402
from gemma4_quant.patches import expert_names, load_guard  # noqa: E402

DTYPES = {"packed": torch.int32, "norm": torch.bfloat16}
WEIGHT_LOAD_S = 10.0


def stream(cfg: dict) -> list[tuple[str, torch.Tensor]]:
    items = [
        (f"{TEXT_PREFIX}embed_tokens.weight", (cfg["vocab_size"], cfg["hidden_size"]), "bf16"),
        (f"{TEXT_PREFIX}norm.weight", (cfg["hidden_size"],), "norm"),
    ]
    for i in range(cfg["num_hidden_layers"]):
        items += [(name, shape, kind) for name, kind, shape in layer_specs(cfg, i)]
    out = []
    for name, shape, kind in items:
        dtype = torch.int64 if kind.startswith("shape:") else DTYPES.get(kind, torch.bfloat16)
        out.append((name, torch.empty(shape, dtype=dtype, device="meta")))
    return out


def timed(fn, repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    cfg = full_config()
    tensors = stream(cfg)

    def bare() -> None:
        for _ in iter(tensors):
            pass

    base = timed(bare, args.repeat)
    print(f"{len(tensors)} tensors; bare iteration {base * 1e3:.3f} ms")
    for generation in ("dotted", "underscore", "generic"):

        def wrapped(generation: str = generation) -> None:
            checker = expert_names.FusedExpertChecker(
                cfg["num_experts"], cfg["hidden_size"], cfg["moe_intermediate_size"], (4, 32)
            )
            seen: list[str] = []
            for _ in expert_names.rewrite(load_guard._record(tensors, seen), generation, checker):
                pass

        t = timed(wrapped, args.repeat)
        extra = t - base
        print(
            f"{generation:>10}: {t * 1e3:.3f} ms, +{extra * 1e6 / len(tensors):.2f} us per "
            f"tensor, {extra / WEIGHT_LOAD_S:.2e} of a {WEIGHT_LOAD_S:.0f} s weight load "
            f"(ratio {WEIGHT_LOAD_S / (WEIGHT_LOAD_S + extra):.6f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The one-token kernels of a Gemma 4 26B-A4B decoder layer in the order vLLM runs them, in
one CUDA graph, with and without programmatic dependent launch (PDL); one GPU, no vLLM.

A layer here: a stand-in kernel (the input norm), q/k/v (``marlin_gemv``), a stand-in
(attention), o (``marlin_gemv``), a stand-in (the norms after attention), the dense MLP
(``dense_decode``, two kernels), the router projection (``router_decode``), the experts
(``marlin_moe``, two kernels, top 8 of 128) and a stand-in (the norms at the end). The
stand-ins are one torch kernel each, launched without PDL, as torch.compile's kernels are
in vLLM, so a PDL kernel after one of them gains only its launch; the dense MLP, the
router and the experts run back to back as in vLLM. Weights: ``--layers`` distinct
layers (past L2), the experts one pool of 128 that each layer's router picks from.

PDL lets a kernel start while the one ahead finishes (``pdl_wait``). Each variant turns it
on for some kernels; ``--prefetch`` sets the int4 loops' L2 prefetch distance too. The
``side`` variants run the dense MLP and the router with the experts on two streams (forked
after the norms' stand-in, joined before the sum: two branches of the graph) with the
patch's own ``ffn_streams.two_streams`` and stream: ``side`` puts the dense MLP on the
second stream, ``side-moe`` the router and the experts (``side-all`` and ``side-moe-all``
with PDL on every kernel too). The ``norms`` variants put the plugin's ``norm_blocks``
kernels in place of the stand-ins for the norms: after o, its kernel with the router's
logits (``post_attention_router``, in place of a stand-in and ``router_decode``'s kernel);
after the feed-forward blocks, its end-of-layer kernel with the next layer's input norm
(in place of the sum and the next layer's stand-in); ``side-norms`` on two streams. The
outputs must equal the first variant's bit for bit (same kernels, same order of sums),
the ``norms`` ones the first ``norms`` one's. Prints us per layer and the ratio to the
first.

    python bench/pdl_chain.py [--layers 4] [--repeats 8] [--variants none,side,side-moe]
        [--maxnreg 0,96] [--out F.json]

``--maxnreg``: each variant again with that register limit for the int4 kernels' ``ptxas``
(0: none; bench/int4_sass.py shows what it does to their loops).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from int4_loop_ab import (  # noqa: E402  (bench/int4_loop_ab.py)
    DENSE_INTER,
    EXPERTS,
    GROUP,
    HIDDEN,
    TOP_K,
    random_experts,
    random_marlin,
)
from moe_decode import graph_time_us  # noqa: E402  (bench/moe_decode.py)

from gemma4_quant.kernels import dense_decode, marlin_gemv, marlin_moe, router_decode  # noqa: E402
from gemma4_quant.kernels import tiles as kernel_tiles  # noqa: E402
from gemma4_quant.patches.ffn_streams import side_stream, two_streams  # noqa: E402

Q_OUT, O_IN = 8192, 4096  # a sliding layer's q/k/v and o
KERNELS = ("gemv", "dense", "router", "moe")
VARIANTS = {
    "none": (),
    "all": KERNELS,
    "gemv": ("gemv",),
    "dense": ("dense",),
    "router+moe": ("router", "moe"),
    "dense+router+moe": ("dense", "router", "moe"),
    "side": ("side",),
    "side-moe": ("side-moe",),
    "side-all": ("side", *KERNELS),
    "side-moe-all": ("side-moe", *KERNELS),
    "norms": ("norms",),
    "side-norms": ("side", "norms"),
}
EPS = 1e-6


def bf16(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, device="cuda") / shape[-1] ** 0.5).bfloat16()


def make_layers(gen: torch.Generator, count: int) -> list[dict]:
    return [
        {
            "qkv": random_marlin(gen, HIDDEN, Q_OUT),
            "o": random_marlin(gen, O_IN, HIDDEN),
            "gate_up": bf16(gen, 2 * DENSE_INTER, HIDDEN),
            "down": bf16(gen, HIDDEN, DENSE_INTER),
            "router": bf16(gen, EXPERTS, HIDDEN),
            # norm_blocks' weights: post-attention, both pre-feed-forward norms, the router's
            # scale; both post-feed-forward norms, the last norm, the next layer's input norm
            "norms": [
                (1 + 0.1 * torch.randn(HIDDEN, generator=gen, device="cuda")).bfloat16()
                for _ in range(8)
            ],
            "scalar": torch.tensor([0.5], device="cuda").bfloat16(),
        }
        for _ in range(count)
    ]


def make_experts(gen: torch.Generator) -> dict:
    w13, s13, w2, s2, scale = random_experts(gen)
    return {"w13": w13, "s13": s13, "w2": w2, "s2": s2, "scale": scale}


def stand_in(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Torch's RMS norm in place of the norms and attention, launched without PDL (it keeps
    the activations from growing layer over layer into infinities)."""
    return torch.nn.functional.rms_norm(t * factor, (t.shape[-1],), eps=1e-6)


def attention(h: torch.Tensor, w: dict, gemv: dict) -> torch.Tensor:
    """o of a layer whose input norm is ``h``: q/k/v, a stand-in for attention, o."""
    qkv = marlin_gemv.marlin_gemv(h, *w["qkv"], GROUP, **kernel_tiles.GEMV_K2816, **gemv)
    a = stand_in(qkv[:, :O_IN], 0.25)
    return marlin_gemv.marlin_gemv(a, *w["o"], GROUP, **kernel_tiles.GEMV_K4096_UP, **gemv)


def layer(
    x: torch.Tensor, w: dict, experts: dict, variant: tuple[str, ...], prefetch: int,
    maxnreg: int = 0,
):  # fmt: skip
    on = {name: int(name in variant) for name in KERNELS}
    gemv = {"pdl": on["gemv"], "prefetch": prefetch, "maxnreg": maxnreg}
    h2 = stand_in(attention(stand_in(x, 0.5), w, gemv), 0.1)

    def dense() -> torch.Tensor:
        return dense_decode.dense_decode(h2, w["gate_up"], w["down"], activation="gelu_tanh",
                                         **kernel_tiles.DENSE_MLP, pdl=on["dense"])  # fmt: skip

    def moe() -> tuple[torch.Tensor, torch.Tensor]:
        logits = router_decode.router_proj(h2, w["router"], **kernel_tiles.ROUTER,
                                           pdl=on["router"])  # fmt: skip
        return marlin_moe.marlin_moe(
            h2, logits, experts["scale"], experts["w13"], experts["s13"], experts["w2"],
            experts["s2"], top_k=TOP_K, **kernel_tiles.MARLIN_MOE, pdl=on["moe"],
            prefetch13=prefetch, prefetch2=prefetch, maxnreg13=maxnreg, maxnreg2=maxnreg,
        ), logits  # fmt: skip

    if "side" in variant:
        d, (m, logits) = two_streams(dense, moe, side_stream())
    elif "side-moe" in variant:
        (m, logits), d = two_streams(moe, dense, side_stream())
    else:
        d, (m, logits) = dense(), moe()
    return torch.add(d, m, alpha=0.5), logits


def norms_layer(
    x: torch.Tensor, normed, w: dict, experts: dict, variant: tuple[str, ...], maxnreg: int
):  # fmt: skip
    """A layer with ``norm_blocks``' kernels for its norms: ((its output, the next layer's
    input norm), the router's logits); ``normed``: this layer's input norm, from the layer
    before (the first layer: a stand-in)."""
    from gemma4_quant.kernels.norm_blocks import end_of_layer_norms, post_attention_router

    o = attention(stand_in(x, 0.5) if normed is None else normed, w, {"maxnreg": maxnreg})
    v = w["norms"]
    root = torch.tensor(HIDDEN**-0.5).bfloat16().item()
    residual, dense_in, experts_in, logits = post_attention_router(
        o, x, v[0], v[1], v[2], v[3], w["router"], root, EPS
    )

    def dense() -> torch.Tensor:
        tiles = kernel_tiles.DENSE_MLP
        return dense_decode.dense_decode(
            dense_in, w["gate_up"], w["down"], activation="gelu_tanh", **tiles
        )

    def moe() -> torch.Tensor:
        return marlin_moe.marlin_moe(
            experts_in, logits, experts["scale"], experts["w13"], experts["s13"],
            experts["w2"], experts["s2"], top_k=TOP_K, **kernel_tiles.MARLIN_MOE,
            maxnreg13=maxnreg, maxnreg2=maxnreg,
        )  # fmt: skip

    d, m = two_streams(dense, moe, side_stream()) if "side" in variant else (dense(), moe())
    return end_of_layer_norms(d, m, residual, v[4], v[5], v[6], w["scalar"], EPS, v[7]), logits


def chain(x: torch.Tensor, layers: list[dict], experts: dict, variant, prefetch: int,
          repeats: int, maxnreg: int = 0):  # fmt: skip
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        h, logits, normed = x, None, None
        for _ in range(repeats):
            for w in layers:
                if "norms" in variant:
                    (h, normed), logits = norms_layer(h, normed, w, experts, variant, maxnreg)
                else:
                    h, logits = layer(h, w, experts, variant, prefetch, maxnreg)
        return h, logits

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="distinct layers' weights")
    parser.add_argument("--repeats", type=int, default=8, help="passes over them a graph")
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--prefetch", default="0", help="in-loop L2 prefetch distances, 0,2")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--maxnreg", default="0", help="int4 kernels' register limits, 0,96")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    layers, experts = make_layers(gen, args.layers), make_experts(gen)
    x = torch.randn(1, HIDDEN, generator=gen, device="cuda").bfloat16()
    per_graph = args.layers * args.repeats
    rows, references = [], {}
    settings = [(int(d), int(r)) for r in args.maxnreg.split(",") for d in args.prefetch.split(",")]
    for prefetch, maxnreg in settings:
        for name in args.variants.split(","):
            run = chain(x, layers, experts, VARIANTS[name], prefetch, args.repeats, maxnreg)
            out, logits = run()
            us = graph_time_us(run, 1, args.replays) / per_graph
            reference = references.setdefault("norms" in VARIANTS[name],
                                              (out.clone(), logits.clone()))  # fmt: skip
            same = bool(torch.equal(out, reference[0]) and torch.equal(logits, reference[1]))
            row = {"variant": name, "prefetch": prefetch, "maxnreg": maxnreg,
                   "us_per_layer": round(us, 2), "same_output": same}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    base = rows[0]["us_per_layer"]
    print(f"\n{torch.cuda.get_device_name()}, {args.layers} layers x {args.repeats} a graph")
    print("| variant | in-loop prefetch | maxnreg | us / layer | none / this | outputs equal |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['prefetch']} | {r['maxnreg']} | {r['us_per_layer']} | "
              f"{base / r['us_per_layer']:.3f} | {r['same_output']} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                       indent=1))  # fmt: skip
    return 0 if all(r["same_output"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Module probes: every quantized layer, fed the twin's exact inputs, against the twin.

Greedy tokens of the random tiny models are chaotic (a routing near-tie flips an expert,
and the rest of the sequence follows), so end-to-end comparisons need wide noise floors.
This check has none of that: each layer gets the *same* input in both runs.

1. ``capture``: the dequantized bf16 twin runs one prompt (TP=1); forward hooks store
   the inputs and the output of every probed module of the prefill pass.
2. ``replay``: the quantized checkpoint runs the same prompt (any TP/EP, plugin on or
   off); a hook on each probed module calls the module once more, inside the same
   forward pass, on the twin's stored inputs, and stores what it returns.
3. ``report``: per module, relative error ``|got - twin| / |twin|`` (Frobenius).

Probed modules, per decoder layer: ``self_attn.qkv_proj``, ``self_attn.o_proj``,
``mlp.gate_up_proj``, ``mlp.down_proj``, ``router.proj`` (the router's logits) and the
routed experts (``FusedMoE``: hidden states and the twin's router logits in, the
weighted expert sum out). At TP=2 a row-parallel layer gets this rank's slice of the
twin's input and returns the all-reduced output; a column-parallel layer returns this
rank's columns, compared with the same columns of the twin's output.

Tolerances, per module (relative error):
- int4 and bf16 weights: ``INT4_TOL`` = 1%. The Marlin kernels multiply the same
  dequantized bf16 weights as the twin (the twin rounds ``(q - z) * scale`` once to bf16;
  Marlin computes it in bf16 from bf16 scales: equal for bf16 scales; AutoRound's fp16
  scales are rounded to bf16 first, one more rounding of <= 2^-9 per weight). What is
  left is accumulation order and bf16 rounding of outputs and intermediates, a few
  2^-9 ~ 0.2%. A wrong mapping (wrong expert, shard, group or zero point, unloaded
  router) is off by tens of percent or more.
- FP8 (W8A8, dynamic per-token activations): ``FP8_TOL`` = 2^-4 = 6.25%. The kernel
  rounds every activation to e4m3 (3 mantissa bits: relative error <= 2^-4 each), the
  twin does not; the error of a product of such sums stays below that bound on average
  (~2-3% measured on CPU, where the FP8 router equals an exact emulation bit for bit,
  tests/test_router.py).
- int8 weights (Marlin int8) and NVFP4 weights on Hopper (vLLM runs NVFP4 weight-only
  there, through Marlin FP4: no FP4 tensor cores): ``INT4_TOL``, for the same reason as
  int4. An FP4 value times its FP8 group scale has at most 6 significant bits, exact in
  bf16; what differs from the twin is where the global scale is applied and rounded.

    python tests/gpu/probe.py run CKPTS RESULTS --release 0.26.0=DIR [--release ...]
        [--layouts a,b] [--variants plugin,stock,tp2] [--gpus 0,1] [--jobs 8]
    python tests/gpu/probe.py report RESULTS
    python tests/gpu/probe.py one CKPT OUTDIR (--capture | --replay TWIN_OUTDIR) [--tp 2]

``CKPTS`` comes from ``tests/gpu/correctness.py build``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import correctness  # noqa: E402
import generate  # noqa: E402

PROBED = re.compile(
    r"layers\.\d+\.(self_attn\.qkv_proj|self_attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj"
    r"|mlp|router\.proj|moe\.experts|experts)$"
)
PROMPT_LEN = 24
INT4_TOL = 1e-2
FP8_TOL = 2.0**-4
FP8_LAYOUTS = {"fp8-router", "ct-fp8-dynamic"}
VARIANTS = ("plugin", "fast", "stock", "tp2", "tp2-ep", "stock-tp2")
# ``fast``: the plugin with GEMMA4_QUANT_FAST_DECODE=auto (its one-token paths: the dense
# MLP, and the int4 attention projections where measured)
FAST_ENV = {"GEMMA4_QUANT_FAST_DECODE": "auto"}


# --------------------------------------------------------------------------- in the worker


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _column_index(module, rank: int):
    """Which of the twin's output columns this rank's column-parallel output holds."""
    import torch

    tp = getattr(module, "tp_size", 1)
    per_rank = getattr(module, "output_size_per_partition", None)
    if tp == 1 or per_rank is None or per_rank == getattr(module, "output_size", per_rank):
        return None  # not column-parallel: row-parallel (all-reduced) or replicated
    if hasattr(module, "total_num_heads"):  # QKVParallelLinear
        hs = module.head_size
        vhs = getattr(module, "v_head_size", hs)
        q_full = module.total_num_heads * hs
        kv_full = module.total_num_kv_heads * hs
        kv_rank = rank // getattr(module, "num_kv_head_replicas", 1)
        parts = [
            rank * module.num_heads * hs + torch.arange(module.num_heads * hs),
            q_full + kv_rank * module.num_kv_heads * hs + torch.arange(module.num_kv_heads * hs),
        ]
        if sum(module.output_partition_sizes) > (module.num_heads + module.num_kv_heads) * hs:
            parts.append(
                q_full
                + kv_full
                + kv_rank * module.num_kv_heads * vhs
                + torch.arange(module.num_kv_heads * vhs)
            )
        return torch.cat(parts)
    sizes = getattr(module, "output_sizes", None) or [module.output_size]
    parts, offset = [], 0
    for full in sizes:
        part = full // tp
        parts.append(offset + rank * part + torch.arange(part))
        offset += full
    return torch.cat(parts)


def install_hooks(model, mode: str, ref_dir: str | None):
    """Forward hooks on every probed module (runs inside each vLLM worker)."""
    import torch
    from safetensors.torch import load_file

    rank = _rank()
    ref = load_file(os.path.join(ref_dir, "rank0.safetensors")) if ref_dir else {}
    store: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    model._g4_probe = store

    def make_hook(name: str):
        def hook(module, args, output):
            if getattr(module, "_g4_busy", False) or name in done:
                return None
            done.add(name)
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
            if mode == "capture":
                for i, t in enumerate(inputs):
                    store[f"{name}|in{i}"] = t.detach().cpu().clone()
                store[f"{name}|out"] = _first(output).detach().float().cpu().clone()
                return None
            want = [ref.get(f"{name}|in{i}") for i in range(len(inputs))]
            if any(w is None for w in want):
                return None
            feed = [w.to(device=t.device, dtype=t.dtype) for w, t in zip(want, inputs, strict=True)]
            if getattr(module, "input_is_parallel", False) and getattr(module, "tp_size", 1) > 1:
                k = module.input_size_per_partition
                feed[0] = feed[0][..., rank * k : (rank + 1) * k].contiguous()
            module._g4_busy = True
            try:
                with torch.no_grad():
                    if name.endswith(".mlp"):
                        got = _mlp_one_token(name, module, feed[0], ref)
                    elif any(
                        getattr(module, flag, None) is not None
                        for flag in ("_gemma4_quant_marlin_decode", "_gemma4_quant_router_decode")
                    ):
                        got = _one_token_at_a_time(module, feed[0])
                    elif getattr(module, "_gemma4_quant_marlin_moe", None) is not None:
                        got = _one_token_at_a_time(module, *feed)
                    else:
                        got = _first(module(*feed))
            finally:
                module._g4_busy = False
            store[f"{name}|out"] = got.detach().float().cpu().clone()
            cols = _column_index(module, rank)
            if cols is not None:
                store[f"{name}|cols"] = cols
            return None

        return hook

    count = 0
    for name, module in model.named_modules():
        if PROBED.search(name):
            module.register_forward_hook(make_hook(name))
            count += 1
    return count


def _one_token_at_a_time(module, x, *more):
    """``module`` on the twin's prefill input rows one at a time (``more``: further inputs
    with the same rows, the router logits of the experts): the decode path, which
    ``fast_decode`` (dense MLP), ``marlin_decode`` (int4 attention projections),
    ``marlin_moe_decode`` (routed experts) and ``router_decode`` (the router's projection)
    replace."""
    import torch

    rows = [t.reshape(-1, t.shape[-1]) for t in (x, *more)]
    got = torch.cat([_first(module(*(r[i][None] for r in rows))) for i in range(len(rows[0]))])
    return got.reshape(*x.shape[:-1], -1)


def _mlp_one_token(name: str, module, x, ref: dict):
    """The dense MLP one token at a time. Where that path skips the MLP's linears, they
    are called here on the twin's inputs, so that their own probes still run."""
    got = _one_token_at_a_time(module, x)
    if getattr(module, "_gemma4_quant_fast_decode", None) is not None:
        for part in ("gate_up_proj", "down_proj"):
            want = ref.get(f"{name}.{part}|in0")
            if want is not None:
                getattr(module, part)(want.to(device=x.device, dtype=x.dtype))
    return got


def dump(model, out_dir: str) -> dict:
    from safetensors.torch import save_file

    store = model._g4_probe
    save_file(store, os.path.join(out_dir, f"rank{_rank()}.safetensors"))
    classes = {name: type(m).__name__ for name, m in model.named_modules() if PROBED.search(name)}
    methods = {
        name: type(getattr(m, "quant_method", None)).__name__
        for name, m in model.named_modules()
        if PROBED.search(name)
    }
    return {"rank": _rank(), "tensors": len(store), "classes": classes, "methods": methods}


def cmd_one(args: argparse.Namespace) -> int:
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model pickles
    # The functions sent to the workers are pickled by reference (``probe.install_hooks``):
    # every vLLM process must be able to import this file as ``probe``.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p
    )
    import functools

    import probe

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def body(result: dict) -> None:
        from vllm import LLM, SamplingParams

        llm = LLM(
            **generate.engine_kwargs(
                args,
                max_model_len=256,
                max_num_seqs=1,
                gpu_memory_utilization=0.04,
                kv_cache_memory_bytes=128 << 20,
            )
        )
        mode = "capture" if args.capture else "replay"
        ref = None if args.capture else str(Path(args.replay).resolve())
        result["hooks"] = llm.apply_model(
            functools.partial(probe.install_hooks, mode=mode, ref_dir=ref)
        )
        rng = random.Random(4321)
        vocab = generate.vocab_size(args.model)
        prompt = [rng.randrange(generate.FIRST_TOKEN_ID, vocab) for _ in range(PROMPT_LEN)]
        llm.generate(
            [{"prompt_token_ids": prompt}],
            SamplingParams(temperature=0.0, max_tokens=1),
            use_tqdm=False,
        )
        target = str(out.resolve())
        result["workers"] = llm.apply_model(functools.partial(probe.dump, out_dir=target))
        result["plugin"] = sys.modules.get("gemma4_quant") is not None

    generate.recorded_run(args, out / "result.json", body, {})
    return 0


# --------------------------------------------------------------------------- driver


def make_jobs(args: argparse.Namespace) -> list[dict]:
    gpus = args.gpus.split(",")
    layouts = args.layouts.split(",") if args.layouts else list(correctness.CASES)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    jobs = []
    for spec in args.release:
        label, path = correctness.parse_release(spec)
        root = args.results / label
        for layout in layouts:
            # the bf16 layout is its own twin: its runs measure the TP noise alone
            twin = args.ckpts / layout
            if layout != "bf16":
                twin = correctness.twin_dir(args.ckpts, layout)
            ref = str(root / layout / "twin")
            runs = [("twin", 0, str(twin), ["--capture"], 1)]
            for variant in variants:
                tp = 2 if "tp2" in variant else 1
                flags = ["--replay", ref]
                if tp > 1:
                    flags += ["--tp", "2"] + (["--ep"] if variant.endswith("-ep") else [])
                runs.append((variant, 1, str(args.ckpts / layout), flags, tp))
            for variant, stage, model, flags, tp in runs:
                if tp > 1:
                    devices = ",".join(gpus[:2]) if len(gpus) >= 2 else "0,1"
                else:
                    devices = gpus[len(jobs) % len(gpus)]
                plugin = not variant.startswith(("stock", "twin")) or (
                    variant == "twin" and layout in correctness.TWIN_NEEDS_PLUGIN
                )
                env = correctness.job_env(path, plugin, devices)
                if variant == "fast":
                    env.update(FAST_ENV)
                jobs.append(
                    {
                        "stage": stage,
                        "release": label,
                        "layout": layout,
                        "variant": variant,
                        "model": model,
                        "out": str(root / layout / variant),
                        "flags": flags,
                        "tp": tp,
                        "env": env,
                    }
                )
    return jobs


def run_job(job: dict, timeout: int) -> dict:
    out = Path(job["out"])
    done = out / "result.json"
    earlier = json.loads(done.read_text()) if done.exists() else {}
    if earlier.get("ok"):  # e.g. a twin capture another invocation already made
        return {**earlier, **{k: job[k] for k in ("release", "layout", "variant")}, "job_s": 0.0}
    out.mkdir(parents=True, exist_ok=True)
    job = {
        **job,
        "cmd": [sys.executable, __file__, "one", job["model"], str(out), *job["flags"]],
        "out": str(done),
    }
    return correctness.run_job(job, timeout)


def cmd_run(args: argparse.Namespace) -> int:
    jobs = make_jobs(args)
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    for stage in (0, 1):  # the twins' captures first: every replay reads one
        batch = [j for j in jobs if j["stage"] == stage]
        correctness.run_all(batch, args.jobs, args.timeout, runner=run_job)
    return 0


# --------------------------------------------------------------------------- report


def _load(run_dir: Path) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file

    result = json.loads((run_dir / "result.json").read_text())
    ranks = [load_file(str(f)) for f in sorted(run_dir.glob("rank*.safetensors"))]
    return result, ranks


def compare_run(twin: list[dict], ranks: list[dict]) -> dict[str, dict]:
    """Relative error per probed module of one replay run against the twin capture."""
    import torch

    ref = twin[0]
    out = {}
    names = sorted({k.split("|")[0] for k in ref if k.endswith("|out")})
    for name in names:
        want = ref[f"{name}|out"]
        got = [r.get(f"{name}|out") for r in ranks]
        if any(g is None for g in got):
            out[name] = {"error": "not probed"}
            continue
        if f"{name}|cols" in ranks[0] and got[0].shape[-1] != want.shape[-1]:
            pieces = [(g, want[..., r[f"{name}|cols"]]) for g, r in zip(got, ranks, strict=True)]
        elif len(got) > 1 and not torch.equal(got[0], got[1]) and got[0].shape == want.shape:
            # a partial sum per rank (not all-reduced inside the module)
            pieces = [(sum(got), want)]
        else:
            pieces = [(got[0], want)]
        err = [
            ((g - w).norm() / w.norm().clamp_min(1e-30)).item() if g.shape == w.shape else None
            for g, w in pieces
        ]
        if any(e is None for e in err):
            out[name] = {"error": f"shape {tuple(pieces[0][0].shape)} vs {tuple(want.shape)}"}
            continue
        out[name] = {
            "rel": max(err),
            "max_abs": max((g - w).abs().max().item() for g, w in pieces),
        }
    return out


def cmd_report(args: argparse.Namespace) -> int:
    rows = []
    for twin_dir in sorted(args.results.glob("*/*/twin")):
        release, layout = twin_dir.parent.parent.name, twin_dir.parent.name
        if not (twin_dir / "result.json").exists():
            continue  # still running
        twin_result, twin = _load(twin_dir)
        for run_dir in sorted(twin_dir.parent.iterdir()):
            if run_dir.name == "twin" or not (run_dir / "result.json").exists():
                continue
            result, ranks = _load(run_dir)
            row = {"release": release, "layout": layout, "variant": run_dir.name}
            if not (result["ok"] and twin_result["ok"]):
                row["error"] = result.get("error") or twin_result.get("error")
                rows.append(row)
                continue
            per = compare_run(twin, ranks)
            tp1 = twin_dir.parent / "plugin"
            if "tp2" in run_dir.name and (tp1 / "rank0.safetensors").exists():
                vs_tp1 = compare_run(_load(tp1)[1], ranks)
                row["max_rel_vs_tp1"] = max(c.get("rel", float("inf")) for c in vs_tp1.values())
            tol = FP8_TOL if layout in FP8_LAYOUTS else INT4_TOL
            by_kind: dict[str, float] = {}
            for name, c in per.items():
                k = re.sub(r"^.*layers\.\d+\.", "", name)
                by_kind[k] = max(by_kind.get(k, 0.0), c.get("rel", float("inf")))
            row.update(
                tol=tol,
                max_rel=by_kind,
                worst=max(by_kind.values()) if by_kind else None,
                modules=len(per),
                ok=bool(by_kind) and max(by_kind.values()) <= tol,
            )
            rows.append(row)
    (args.results / "probe-results.json").write_text(json.dumps(rows, indent=1) + "\n")
    kinds = ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    kinds += ["mlp", "router.proj", "moe.experts"]
    head = "| vLLM | layout | run | " + " | ".join(kinds) + " | vs TP=1 | tolerance | verdict |"
    lines = [head, "|---" * (len(kinds) + 6) + "|"]
    for row in rows:
        if "error" in row:
            cells = ["-"] * (len(kinds) + 2) + [f"fails: {row['error'][:120]}"]
        else:
            m = dict(row["max_rel"])
            m.setdefault("moe.experts", m.get("experts"))
            cells = [f"{m[k]:.4f}" if m.get(k) is not None else "-" for k in kinds]
            tp1 = row.get("max_rel_vs_tp1")
            cells += [f"{tp1:.4f}" if tp1 is not None else "-", f"{row['tol']:.4f}"]
            cells.append("matches" if row["ok"] else "**differs**")
        cells = [row["release"], row["layout"], row["variant"], *cells]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    (args.results / "probe-table.md").write_text(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("one")
    o.add_argument("model")
    o.add_argument("out")
    mode = o.add_mutually_exclusive_group(required=True)
    mode.add_argument("--capture", action="store_true")
    mode.add_argument("--replay", metavar="TWIN_OUTDIR")
    o.add_argument("--tp", type=int, default=1)
    o.add_argument("--ep", action="store_true")
    o.add_argument("--attention-backend", default="TRITON_ATTN")
    r = sub.add_parser("run")
    r.add_argument("ckpts", type=Path)
    r.add_argument("results", type=Path)
    r.add_argument("--release", action="append", required=True)
    r.add_argument("--layouts", default=None)
    r.add_argument("--variants", default="plugin,tp2")
    r.add_argument("--gpus", default="0")
    r.add_argument("--jobs", type=int, default=8)
    r.add_argument("--timeout", type=int, default=600)
    p = sub.add_parser("report")
    p.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    return {"one": cmd_one, "run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())

"""Load time, time to ready, peak host RSS and decode throughput of one vLLM configuration.

    python bench/gpu_throughput.py run MODEL OUT.json [--label NAME] [--batches 1,16,64]
        [--decode-tokens 512] [--attention-backend TRITON_ATTN] [--repeats 5]
    python bench/gpu_throughput.py bound MODEL [--bandwidth B] [--measure-bandwidth]
    python bench/gpu_throughput.py table OUT.json ... [--bound BOUND.json]

``run`` starts the measured vLLM process as a child (so that its whole output is logged
and its process tree is sampled from outside): the child builds ``vllm.LLM`` with CUDA
graphs on (captured for batch sizes 1-64) and torch.compile as configured by default,
then decodes greedy, ``ignore_eos``, N tokens from random 64-token prompts at each batch
size, through the engine's own step loop with every output timed as it arrives: decode
tokens/s = tokens produced after every request has its first token / time from then to
the last token (prefill and first-token scheduling out of the window); the median of
``--repeats`` runs (best also kept). ``--profile-steps N`` then profiles N decode steps at
each batch size: kernels and GPU time per step and per layer (bench/decode_profile.py).
The plugin is on or off as the
environment says (``VLLM_PLUGINS=none``: stock vLLM).

Reported: weight-load time and model-load time (vLLM's own log lines), time to ready
(``LLM()`` constructed, and from process start), torch.compile and CUDA-graph capture
times (log), peak host RSS of the process tree (sum over processes, sampled every
0.2 s), decode tokens/s per batch size.

``bound`` computes the bytes one decoded token reads at batch 1 from the checkpoint's
safetensors headers: every non-expert weight once (attention, dense MLP, router, norms),
``top_k / num_experts`` of every expert tensor, one embedding row, and the whole
embedding matrix again for the logits (tied lm_head); plus the KV cache read at the
benchmark's mean context. Single-stream bound = bandwidth / bytes per token.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

# memory bandwidth by device name (vendor datasheets, bytes/s): the bound's denominator
SPEC_BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 NVL": 3.9e12}
PROMPT_LEN = 64
CAPTURE_SIZES = [1, 2, 4, 8, 16, 32, 64]


# --------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> int:
    t_start = time.time()
    start_wall = float(os.environ.get("BENCH_T0", t_start))
    if args.profile_steps:
        import decode_profile

        decode_profile.enable_in_workers()
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind

    t_import = time.time()
    kwargs = dict(
        model=args.model,
        max_model_len=args.max_model_len,
        max_num_seqs=max(args.batches),
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=False,
        compilation_config={
            "cudagraph_capture_sizes": CAPTURE_SIZES,
            **({"compile_sizes": args.compile_sizes} if args.compile_sizes else {}),
        },
        enforce_eager=args.enforce_eager,
        seed=0,
    )
    if args.attention_backend and args.attention_backend != "auto":
        kwargs["attention_backend"] = args.attention_backend
    llm = LLM(**kwargs)
    t_ready = time.time()
    vocab = llm.llm_engine.model_config.get_vocab_size()
    rng = random.Random(0)

    def prompts(batch: int) -> list[dict]:
        return [
            {"prompt_token_ids": [rng.randrange(10, vocab) for _ in range(PROMPT_LEN)]}
            for _ in range(batch)
        ]

    counter = iter(range(1 << 30))

    # Greedy tokens and their logprobs of one request (decode at batch 1), before any
    # timing: `ratio` compares two configurations' (a fused one-token path against vLLM's)
    check_rng = random.Random(1)
    check_prompt = {"prompt_token_ids": [check_rng.randrange(10, vocab) for _ in range(PROMPT_LEN)]}
    check_params = SamplingParams(temperature=0.0, max_tokens=args.check_tokens, logprobs=0)
    (check,) = llm.generate([check_prompt], check_params, use_tqdm=False)
    seq = check.outputs[0]
    greedy = {
        "tokens": list(seq.token_ids),
        "logprobs": [
            round(step[token].logprob, 5)
            for step, token in zip(seq.logprobs or [], seq.token_ids, strict=False)
        ],
    }

    def decode_run(batch_prompts: list[dict], tokens: int) -> dict:
        """One batch through the engine's own loop, every output timed as it arrives.

        Decode rate = tokens produced after every request has its first token, over the
        time from that moment to the last token: prefill and scheduling of the first
        token are out of the window, and one run measures it (no difference of two
        separately timed runs, whose jitter swamped the batch-64 figure before).
        """
        engine = llm.llm_engine
        params = SamplingParams(
            temperature=0.0,
            max_tokens=tokens,
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        counts: dict[str, int] = {}
        t0 = time.perf_counter()
        for prompt in batch_prompts:
            engine.add_request(f"bench-{next(counter)}", prompt, params)
        t_first = n_first = None
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                counts[out.request_id] = counts.get(out.request_id, 0) + len(
                    out.outputs[0].token_ids
                )
            if t_first is None and len(counts) == len(batch_prompts) and all(counts.values()):
                t_first, n_first = now, sum(counts.values())
        t_end = time.perf_counter()
        total = sum(counts.values())
        assert total == len(batch_prompts) * tokens, (total, len(batch_prompts), tokens)
        return {
            "first_tokens_s": round(t_first - t0, 4),
            "total_s": round(t_end - t0, 4),
            "decode_tok_s": round((total - n_first) / (t_end - t_first), 1),
        }

    decode = {}
    for batch in args.batches:
        p = prompts(batch)
        decode_run(p, 16)  # warm-up at this batch size
        runs = [decode_run(p, args.decode_tokens) for _ in range(args.repeats)]
        rates = sorted(r["decode_tok_s"] for r in runs)
        decode[str(batch)] = {
            "decode_tok_s": rates[len(rates) // 2],  # median of the repeats
            "best_tok_s": rates[-1],
            "e2e_tok_s": round(batch * args.decode_tokens / min(r["total_s"] for r in runs), 1),
            "runs": runs,
        }
        print(f"BENCH batch {batch}: {rates[len(rates) // 2]:.1f} decode tok/s", flush=True)
    profiles = {}
    for batch in args.batches if args.profile_steps else ():
        profiles[str(batch)] = decode_profile.profile(
            llm, args.model, batch, args.profile_steps, prompts(batch), decode_run
        )
        print(f"PROFILE batch {batch}: {json.dumps(profiles[str(batch)])[:300]}", flush=True)
    import vllm

    result = {
        "vllm": vllm.__version__,
        "import_s": round(t_import - t_start, 2),
        "llm_init_s": round(t_ready - t_import, 2),
        "ready_from_start_s": round(t_ready - start_wall, 2),
        "decode_tokens": args.decode_tokens,
        "prompt_len": PROMPT_LEN,
        "decode": decode,
        "greedy_batch1": greedy,
        **({"profile": profiles} if profiles else {}),
        "plugin_loaded": "gemma4_quant" in sys.modules,
    }
    mod = sys.modules.get("gemma4_quant")
    if mod is not None:
        result["plugin_applied"] = mod.applied_patches()
    Path(args.child_out).write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.flush()
    timer = threading.Timer(60, os._exit, args=(0,))
    timer.daemon = True
    timer.start()
    return 0


# --------------------------------------------------------------------------- parent


def _tree_rss(pid: int) -> tuple[int, int]:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, 0
    total = biggest = 0
    for proc in procs:
        try:
            rss = proc.memory_info().rss
        except psutil.Error:
            continue
        total += rss
        biggest = max(biggest, rss)
    return total, biggest


_LOG_PATTERNS = {
    "weight_load_s": r"Loading weights took ([\d.]+) sec",
    "model_load_s": r"Model loading took [\d.]+ ?GiB(?: memory)? and ([\d.]+) sec",
    "model_load_gib": r"Model loading took ([\d.]+) ?GiB",
    "torch_compile_s": r"torch\.compile (?:takes|took) ([\d.]+) s in total",
    "graph_capture_s": r"Graph capturing finished in ([\d.]+) sec",
    "engine_init_s": r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) s",
    "kv_cache_gib": r"Available KV cache memory: ([\d.]+) GiB",
}


def parse_log(text: str) -> dict:
    found = {}
    for key, pattern in _LOG_PATTERNS.items():
        values = [float(v) for v in re.findall(pattern, text)]
        if values:
            found[key] = values[-1] if key != "weight_load_s" else sum(values)
    attn = re.findall(r"Using (?:AttentionBackendEnum\.)?(\w+) (?:attention )?backend", text)
    if attn:
        found["attention_backend"] = attn[-1]
    moe = re.findall(r"Using (\w*(?:Marlin|marlin)\w*)", text)
    if moe:
        found["marlin"] = sorted(set(moe))
    return found


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    log_path = out.with_suffix(".log")
    child_out = out.with_suffix(".child.json")
    child_out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        __file__,
        "_child",
        args.model,
        "--child-out",
        str(child_out),
        "--batches",
        ",".join(map(str, args.batches)),
        "--decode-tokens",
        str(args.decode_tokens),
        "--repeats",
        str(args.repeats),
        "--attention-backend",
        args.attention_backend,
        "--max-model-len",
        str(args.max_model_len),
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
        "--check-tokens",
        str(args.check_tokens),
        "--profile-steps",
        str(args.profile_steps),
        *(["--enforce-eager"] if args.enforce_eager else []),
    ]
    if args.compile_sizes:
        cmd += ["--compile-sizes", ",".join(map(str, args.compile_sizes))]
    env = {**os.environ, "BENCH_T0": repr(time.time())}
    peak_total = peak_single = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + args.timeout
        while proc.poll() is None:
            total, single = _tree_rss(proc.pid)
            peak_total, peak_single = max(peak_total, total), max(peak_single, single)
            if time.time() > deadline:
                proc.kill()
                break
            time.sleep(0.2)
        proc.wait()
    text = log_path.read_text(errors="replace")
    result = {
        "label": args.label,
        "model": args.model,
        "ok": child_out.exists(),
        "returncode": proc.returncode,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "plugins_env": os.environ.get("VLLM_PLUGINS"),
        "peak_rss_tree_gib": round(peak_total / 2**30, 2),
        "peak_rss_process_gib": round(peak_single / 2**30, 2),
        **parse_log(text),
    }
    if child_out.exists():
        result.update(json.loads(child_out.read_text()))
    else:
        result["log_tail"] = text[-4000:]
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log_tail"}, indent=1))
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- bound


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def bytes_per_token(model: str, context: int = PROMPT_LEN + 64) -> dict:
    """Bytes read from GPU memory per decoded token at batch 1, from the checkpoint."""
    mdir = Path(model)
    cfg = json.loads((mdir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    top_k, experts = cfg["top_k_experts"], cfg["num_experts"]
    sizes = {"attention": 0, "dense_mlp": 0, "router": 0, "experts_all": 0, "other": 0}
    embed = 0
    for f in sorted(mdir.glob("*.safetensors")):
        for name, info in read_header(f).items():
            nbytes = info["data_offsets"][1] - info["data_offsets"][0]
            if name.endswith("_shape") or name.endswith("weight_shape"):
                continue  # metadata, never read by a kernel
            if "embed_tokens" in name:
                embed += nbytes
            elif ".experts." in name:
                sizes["experts_all"] += nbytes
            elif ".self_attn." in name:
                sizes["attention"] += nbytes
            elif ".mlp." in name:
                sizes["dense_mlp"] += nbytes
            elif ".router." in name:
                sizes["router"] += nbytes
            else:
                sizes["other"] += nbytes
    vocab = cfg["vocab_size"]
    row = embed // vocab
    active_experts = sizes["experts_all"] * top_k / experts
    lm_head = embed if cfg.get("tie_word_embeddings", True) else 0
    kv = 0
    for kind in cfg["layer_types"]:
        if kind == "sliding_attention":
            heads, dim, span = (
                cfg["num_key_value_heads"],
                cfg["head_dim"],
                min(context, cfg["sliding_window"]),
            )
        else:
            heads, dim, span = cfg["num_global_key_value_heads"], cfg["global_head_dim"], context
        kv += 2 * heads * dim * 2 * span  # K and V, bf16
    parts = {
        "attention": sizes["attention"],
        "dense_mlp": sizes["dense_mlp"],
        "router": sizes["router"],
        "norms_other": sizes["other"],
        f"experts_active_{top_k}_of_{experts}": int(active_experts),
        "embedding_row": row,
        "lm_head_tied_embedding": lm_head,
        f"kv_cache_at_context_{context}": kv,
    }
    return {
        "bytes_per_token": int(sum(parts.values())),
        "parts": parts,
        "checkpoint_bytes": int(sum(sizes.values()) + embed),
    }


def measure_bandwidth(gib: float = 4.0) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), best of 10."""
    import torch

    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    best = 0.0
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if i >= 3:
            best = max(best, 2 * a.numel() * 2 / (start.elapsed_time(end) / 1e3))
    return best


def spec_bandwidth() -> float:
    """The datasheet bandwidth of the GPU this runs on (H200's where it is not listed)."""
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((bw for key, bw in SPEC_BANDWIDTH.items() if key in name), SPEC_BANDWIDTH["H200"])


def cmd_bound(args: argparse.Namespace) -> int:
    info = bytes_per_token(args.model)
    bandwidth = args.bandwidth or spec_bandwidth()
    info["bandwidth_spec"] = bandwidth
    info["bound_tok_s_spec"] = round(bandwidth / info["bytes_per_token"], 1)
    if args.measure_bandwidth:
        bw = measure_bandwidth()
        info["bandwidth_copy_measured"] = round(bw)
        info["bound_tok_s_measured"] = round(bw / info["bytes_per_token"], 1)
    text = json.dumps(info, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def result_files(files: list[str]) -> list[str]:
    """The `run` results among files: the children's own (*.child.json), which a glob
    also takes, are left out."""
    return [f for f in files if ".child." not in f]


def cmd_table(args: argparse.Namespace) -> int:
    rows = [json.loads(Path(f).read_text()) for f in result_files(args.results)]
    bound = json.loads(Path(args.bound).read_text()) if args.bound else None
    print(
        "| run | vLLM | GPU | weights load s | model load s | ready s (LLM()) | ready s (process) "
        "| compile s | graphs s | peak RSS GiB (tree) | tok/s b=1 | b=16 | b=64 | b=1 / bound |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        d = r.get("decode", {})
        b1 = d.get("1", {}).get("decode_tok_s")
        frac = f"{b1 / bound['bound_tok_s_spec']:.1%}" if (bound and b1) else "-"
        cells = [
            r.get("label"),
            r.get("vllm"),
            r.get("cuda_visible_devices"),
            r.get("weight_load_s"),
            r.get("model_load_s"),
            r.get("llm_init_s"),
            r.get("ready_from_start_s"),
            r.get("torch_compile_s"),
            r.get("graph_capture_s"),
            r.get("peak_rss_tree_gib"),
            b1,
            d.get("16", {}).get("decode_tok_s"),
            d.get("64", {}).get("decode_tok_s"),
            frac,
        ]
        print("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return 0


def _repeats(rows: list[dict], batch: str) -> list[float]:
    """Every timed repeat at one batch size (results of the older two-run method could
    hold a negative figure when the 1-token run stalled: left out)."""
    return [
        run["decode_tok_s"]
        for r in rows
        for run in r.get("decode", {}).get(batch, {}).get("runs", [])
        if run["decode_tok_s"] > 0
    ]


def cmd_ratio(args: argparse.Namespace) -> int:
    """b/a: decode tokens/s (mean of the runs' figures, median of all repeats) and
    weight-load and model-load speed (a's seconds over b's), from each side's runs."""
    import statistics as st

    files = {"a": result_files(args.a), "b": result_files(args.b)}
    sides = {s: [json.loads(Path(f).read_text()) for f in fs] for s, fs in files.items()}
    out = dict(files)
    for key in ("weight_load_s", "model_load_s"):
        a = st.mean(r[key] for r in sides["a"])
        b = st.mean(r[key] for r in sides["b"])
        out[key] = {"a_mean": round(a, 2), "b_mean": round(b, 2), "speed_b_over_a": round(a / b, 3)}
    batches = set.intersection(*(set(r["decode"]) for rows in sides.values() for r in rows))
    for batch in sorted(batches, key=int):
        per_run = {
            s: [r["decode"][batch]["decode_tok_s"] for r in rows] for s, rows in sides.items()
        }
        reps = {s: _repeats(rows, batch) for s, rows in sides.items()}
        out[f"decode_b{batch}"] = {
            "a_runs": per_run["a"],
            "b_runs": per_run["b"],
            "ratio_mean_of_runs": round(st.mean(per_run["b"]) / st.mean(per_run["a"]), 3),
            "ratio_median_of_repeats": round(st.median(reps["b"]) / st.median(reps["a"]), 3),
            "a_repeats_min_max": [min(reps["a"]), max(reps["a"])],
            "b_repeats_min_max": [min(reps["b"]), max(reps["b"])],
        }
    checks = [r["greedy_batch1"] for rows in sides.values() for r in rows if "greedy_batch1" in r]
    if len(checks) == sum(len(rows) for rows in sides.values()) and checks:
        out["greedy_batch1"] = _agreement(checks[0], checks[len(sides["a"])])
    print(json.dumps(out, indent=1))
    return 0


def _agreement(a: dict, b: dict) -> dict:
    """Where two greedy runs of one request part (tokens), and how far their logprobs of
    the tokens they share, up to there, differ."""
    same = 0
    while same < min(len(a["tokens"]), len(b["tokens"])) and a["tokens"][same] == b["tokens"][same]:
        same += 1
    deltas = [abs(x - y) for x, y in zip(a["logprobs"][:same], b["logprobs"][:same], strict=True)]
    return {
        "tokens": len(a["tokens"]),
        "identical_prefix": same,
        "max_abs_dlogprob_on_prefix": round(max(deltas), 5) if deltas else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("run", "_child"):
        p = sub.add_parser(name)
        p.add_argument("model")
        if name == "run":
            p.add_argument("out")
            p.add_argument("--label", default=None)
            p.add_argument("--timeout", type=int, default=900)
        else:
            p.add_argument("--child-out", required=True)
        p.add_argument(
            "--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64]
        )
        p.add_argument("--decode-tokens", type=int, default=512)
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--attention-backend", default="TRITON_ATTN")
        p.add_argument("--max-model-len", type=int, default=4096)
        p.add_argument(
            "--enforce-eager",
            action="store_true",
            help="no torch.compile / CUDA graphs (a quick load-time run; decode is slower)",
        )
        p.add_argument(
            "--compile-sizes",
            type=lambda s: [int(x) for x in s.split(",")],
            default=None,
            help="vLLM's compile_sizes: batch sizes torch.compile also builds a graph for with "
            "the batch fixed (default: none, the batch symbolic only)",
        )
        p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
        p.add_argument("--check-tokens", type=int, default=32)
        p.add_argument(
            "--profile-steps",
            type=int,
            default=0,
            help="after the timed runs, kernels per decode step from a profile of this many "
            "steps at each batch size (bench/decode_profile.py)",
        )
        p.set_defaults(func=run if name == "run" else child)
    b = sub.add_parser("bound")
    b.add_argument("model")
    b.add_argument("--bandwidth", type=float, default=None, help="default: the GPU's datasheet")
    b.add_argument("--measure-bandwidth", action="store_true")
    b.add_argument("--out", default=None)
    b.set_defaults(func=cmd_bound)
    t = sub.add_parser("table")
    t.add_argument("results", nargs="+")
    t.add_argument("--bound", default=None, help="JSON written by `bound --out`")
    t.set_defaults(func=cmd_table)
    c = sub.add_parser("ratio", help="b/a ratios of two sets of `run` results")
    c.add_argument("--a", nargs="+", required=True)
    c.add_argument("--b", nargs="+", required=True)
    c.set_defaults(func=cmd_ratio)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

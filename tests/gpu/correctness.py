"""GPU correctness matrix: every tiny layout, per vLLM release, plugin on / off, vs its twin.

Needs a CUDA GPU (two for ``--tp 2``) and one or more vLLM releases. Each release is
named ``LABEL`` (the vLLM importable from this Python) or ``LABEL=DIR`` (a directory
put first on ``PYTHONPATH``, e.g. a ``pip install --target DIR`` of that release).
This project must be installed (``pip install -e .``) so vLLM finds its entry point.

    # 1. tiny checkpoints of every layout and their dequantized bf16 twins
    python tests/gpu/correctness.py build CKPTS
    # 2. the matrix: per release, each layout with the plugin and without, and the twin
    python tests/gpu/correctness.py run CKPTS RESULTS --release 0.26.0 \\
        --variants plugin,stock,twin --gpus 0,1 --jobs 12
    # 3. tensor parallel: TP=2 (and TP=2 with expert parallel) against TP=1
    python tests/gpu/correctness.py run CKPTS RESULTS --release 0.20.2=/opt/v0202 \\
        --variants tp2,tp2-ep --jobs 4
    # 4. the comparison table (markdown) and results.json
    python tests/gpu/correctness.py report RESULTS

Every vLLM run is ``tests/gpu/generate.py`` in its own process (greedy, eager mode,
TRITON_ATTN, token-id prompts, top-5 logprobs per step); ``report`` compares each run
with its reference: a quantized layout with its dequantized twin (same release), a TP=2
run with the TP=1 plugin run of the same release and layout.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GENERATE = HERE / "generate.py"

# Router layouts: vLLM's Marlin kernels need N % 64 == 0 on the router projection,
# whose N is the expert count; 64 experts (the real model has 128).
ROUTER_EXPERTS = 64
CASES: dict[str, dict] = {
    "ct-fused-w4a16": {},
    "ct-fused-w4a16-asym": {},
    "ct-fused-w4a16-shape": {},
    "ct-per-expert-w4a16": {},
    "ct-fused-w4a16-router": {"num_experts": ROUTER_EXPERTS},
    # moe_intermediate_size 512: at TP=2 each rank then holds 256 of it, not exactly one
    # group of 128, where vLLM's Marlin MoE conversion picks the wrong W13 scale layout
    # (vllm-project/vllm#50196, open; stock vLLM, not this plugin; the real model's 704
    # never meets it). Measured: docs/gpu-results.md.
    "autoround-int4": {"num_experts": ROUTER_EXPERTS, "moe_intermediate_size": 512},
    "fp8-router": {"num_experts": ROUTER_EXPERTS},
    "bf16": {},
}
# Layers vLLM has no GPU kernel for (the dequant_fallback serves them) and the real
# per-layer dimensions. A case names its builder layout when it is not the case's name.
FALLBACK_CASES: dict[str, dict] = {
    # Marlin needs the router's N (the expert count) % 64 == 0
    "ct-fused-w4a16-router-32": {"layout": "ct-fused-w4a16-router", "num_experts": 32},
    # hidden 2816, dense 2112, experts 704, heads 256 / 512, 2 layers, 8 experts
    "ct-fused-w4a16-real": {"layout": "ct-fused-w4a16", "size": "real"},
    # one TP=2 rank's expert size (352) on one GPU
    "ct-fused-w4a16-real-tp2": {"layout": "ct-fused-w4a16", "size": "real-tp2"},
    # dense down_proj K = 2112: Marlin needs K % 128 == 0, Machete rejects group 32
    "ct-fused-w4a16-dense-real": {"layout": "ct-fused-w4a16-dense", "size": "real"},
    "ct-fused-w4a16-asym-real": {"layout": "ct-fused-w4a16-asym", "size": "real"},
    # the architecture the public checkpoints ship (vision tower, ConditionalGeneration)
    "ct-fused-w4a16-multimodal": {"layout": "ct-fused-w4a16", "form": "multimodal"},
}
CASES.update(FALLBACK_CASES)
# The public formats past cyankiwi's AWQ-4bit (int8, FP8-Dynamic, NVFP4 of both exporters,
# Google's dense QAT, AutoRound int4-mixed, GPTQ g64): the layouts of tests/test_matrix.py.
FORMAT_CASES: dict[str, dict] = {
    "ct-fused-w8a16": {},
    "ct-fp8-dynamic": {},
    "ct-nvfp4": {},
    "qat-w4a16-ct": {},
    # int8 router: Marlin needs N (the expert count) % 64 == 0
    "autoround-int4-mixed": {"num_experts": ROUTER_EXPERTS},
    "gptq-int4-g64": {},
    "modelopt-nvfp4": {},
    "modelopt-nvfp4-moe": {},
}
CASES.update(FORMAT_CASES)
# Google's E2B / E4B form stores no K/V weights on KV-shared layers, so stock vLLM before
# the fix of vLLM #44788 cannot load even the bf16 twin ("weights not initialized"). The
# twin of such a case runs with the plugin: on bf16 weights its only effect is to leave
# those parameters alone (tests/test_ct_formats.py checks it against transformers' own).
TWIN_NEEDS_PLUGIN = {"qat-w4a16-ct"}
VARIANTS = ("plugin", "stock", "twin", "tp2", "tp2-ep")
FIRST_STEPS = 8
# Verdicts. These tiny random models are numerically touchy: two correct runs of the
# *same* bf16 weights differ by up to ~0.45 in logprob over the first steps when only the
# kernels differ (the twin on vLLM 0.20.2 vs the twin on 0.26.0, H200), and by ~0.9
# between TP=2 and TP=1 of the bf16 checkpoint. ``report`` therefore measures these noise
# floors from the runs it has and calls a run "within noise" when its largest difference
# over the first steps is no larger than the floor of its kind; where a floor cannot be
# measured (one release only, no bf16 TP run), the fallbacks below apply. A run whose
# top-k logprobs share no token with the reference's at step 0, or differ there by more
# than GARBAGE, is "garbage" (an unloaded router looks like this).
FALLBACK_FLOOR = {"twin": 0.5, "tp1": 1.0}
GARBAGE = 2.0


def twin_dir(ckpts: Path, layout: str) -> Path:
    return ckpts / f"{layout}-twin"


# --------------------------------------------------------------------------- build


def _build_one(ckpts: str, layout: str) -> str:
    import torch

    torch.set_num_threads(2)
    from gemma4_quant.checkpoints import build_checkpoint, write_twin

    out = Path(ckpts) / layout
    t = time.perf_counter()
    spec = dict(CASES[layout])
    build_checkpoint(out, spec.pop("layout", layout), **spec)
    write_twin(out, twin_dir(Path(ckpts), layout))
    return f"{layout}: {time.perf_counter() - t:.1f} s"


def cmd_build(args: argparse.Namespace) -> int:
    layouts = args.layouts.split(",") if args.layouts else list(CASES)
    args.ckpts.mkdir(parents=True, exist_ok=True)
    with cf.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(_build_one, str(args.ckpts), lay) for lay in layouts]
        for fut in cf.as_completed(futures):
            print("built", fut.result(), flush=True)
    return 0


# --------------------------------------------------------------------------- run


def parse_release(spec: str) -> tuple[str, str | None]:
    label, sep, path = spec.partition("=")
    return label, (path if sep else None)


def job_env(pythonpath: str | None, plugin: bool, gpus: str) -> dict[str, str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    if plugin:
        env.pop("VLLM_PLUGINS", None)
    else:
        env["VLLM_PLUGINS"] = "none"  # names no installed plugin: stock vLLM
    env["CUDA_VISIBLE_DEVICES"] = gpus
    env.setdefault("OMP_NUM_THREADS", "2")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # NVLink multicast stays off (shared hosts); harmless where there is none.
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    return env


def generate_cmd(job: dict) -> list[str]:
    cmd = [sys.executable, str(GENERATE), job["model"], job["out"]]
    if job["tp"] > 1:
        cmd += ["--tp", str(job["tp"])]
    if job["ep"]:
        cmd.append("--ep")
    return cmd


def run_job(job: dict, timeout: int) -> dict:
    """Run one job (``job["cmd"]``, default generate.py) in its own process group; return
    the JSON it wrote to ``job["out"]``."""
    out_json = Path(job["out"])
    log = out_json.with_suffix(".log")
    cmd = job.get("cmd") or generate_cmd(job)
    t = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            cmd, env=job["env"], stdout=logf, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # whatever the run left behind (engine core, workers) goes with its group
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if out_json.exists():
        result = json.loads(out_json.read_text())
    else:
        result = {"ok": False, "error": f"no result (exit {proc.returncode}, timeout {timeout} s)"}
    result.update({k: job[k] for k in ("release", "layout", "variant")})
    result["job_s"] = round(time.perf_counter() - t, 1)
    if not result["ok"]:
        result["root_cause"] = root_cause(log.read_text(errors="replace"))
        out_json.write_text(json.dumps(result, indent=1) + "\n")
    return result


_ERROR_LINE = re.compile(
    r"(?:^|\s)((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)): (.+)$", re.MULTILINE
)
_GENERIC = ("Engine core initialization failed", "Worker failed", "WorkerProc initialization")


def root_cause(log: str) -> str:
    """The first specific exception line of a failed vLLM start (engine core, worker)."""
    found = []
    for match in _ERROR_LINE.finditer(log):
        line = f"{match[1]}: {match[2].strip()}"
        if any(g in line for g in _GENERIC) or line in found:
            continue
        found.append(line)
    return found[0][:400] if found else "(no exception line in the log)"


def make_jobs(args: argparse.Namespace) -> list[dict]:
    gpus = args.gpus.split(",")
    layouts = args.layouts.split(",") if args.layouts else list(CASES)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    jobs, i = [], 0
    for spec in args.release:
        label, path = parse_release(spec)
        outdir = args.results / label
        outdir.mkdir(parents=True, exist_ok=True)
        for variant in variants:
            for layout in layouts:
                model = twin_dir(args.ckpts, layout) if variant == "twin" else args.ckpts / layout
                tp = 2 if variant.startswith("tp2") else 1
                if tp > 1:
                    devices = (
                        ",".join(gpus[:tp]) if len(gpus) >= tp else ",".join(map(str, range(tp)))
                    )
                else:
                    devices = gpus[i % len(gpus)]
                    i += 1
                jobs.append(
                    {
                        "release": label,
                        "layout": layout,
                        "variant": variant,
                        "model": str(model),
                        "tp": tp,
                        "ep": variant.endswith("-ep"),
                        "out": str(outdir / f"{layout}__{variant}.json"),
                        "env": job_env(path, variant not in ("stock", "twin"), devices),
                    }
                )
    return jobs


def run_all(jobs: list[dict], jobs_at_once: int, timeout: int, runner=None) -> None:
    """Run ``jobs`` (``runner(job, timeout)``, default ``run_job``), several at a time,
    printing one line per finished run."""
    runner = runner or run_job
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(max_workers=jobs_at_once) as pool:
        futures = [pool.submit(runner, job, timeout) for job in jobs]
        for fut in cf.as_completed(futures):
            r = fut.result()
            status = "ok" if r["ok"] else "FAILED " + r.get("root_cause", r.get("error", ""))
            print(
                f"[{time.perf_counter() - t:6.0f} s] {r['release']} {r['layout']} "
                f"{r['variant']}: {status} ({r['job_s']} s)",
                flush=True,
            )


def cmd_run(args: argparse.Namespace) -> int:
    jobs = make_jobs(args)
    print(f"{len(jobs)} runs, {args.jobs} at a time", flush=True)
    run_all(jobs, args.jobs, args.timeout)
    return 0


# --------------------------------------------------------------------------- compare


def compare(run: dict, ref: dict, first_steps: int = FIRST_STEPS) -> dict:
    """Greedy agreement and logprob differences of ``run`` against ``ref``.

    Per prompt, the two greedy sequences share their context up to and including the
    first step where they pick different tokens; logprobs are compared on those steps
    only, over the tokens in both top-k lists.
    """
    agree = total = 0
    d_first = d_steps = d_all = 0.0
    divergences = []
    for a, b in zip(run["outputs"], ref["outputs"], strict=True):
        ta, tb = a["token_ids"], b["token_ids"]
        n = min(len(ta), len(tb))
        d = next((k for k in range(n) if ta[k] != tb[k]), n)
        agree += d
        total += n
        for step in range(min(d + 1, n)):
            la, lb = a["logprobs"][step], b["logprobs"][step]
            common = la.keys() & lb.keys()
            if not common:
                diff = float("inf")
            else:
                diff = max(abs(la[t] - lb[t]) for t in common)
            d_all = max(d_all, diff)
            if step < first_steps:
                d_steps = max(d_steps, diff)
            if step == 0:
                d_first = max(d_first, diff)
        if d < n:
            # how close the reference's choice was to the run's: a near tie flips
            lb = b["logprobs"][d]
            margin = lb.get(str(tb[d]), float("nan")) - lb.get(str(ta[d]), float("-inf"))
            divergences.append({"step": d, "ref_margin": round(margin, 4)})
    return {
        "greedy_agree": agree,
        "greedy_total": total,
        "identical": agree == total,
        "max_dlogprob_step0": round(d_first, 5),
        f"max_dlogprob_first{first_steps}": round(d_steps, 5),
        "max_dlogprob_shared": round(d_all, 5),
        "divergences": divergences,
    }


def load_results(results: Path) -> dict[tuple[str, str, str], dict]:
    found = {}
    for f in sorted(results.glob("*/*__*.json")):
        r = json.loads(f.read_text())
        layout, _, variant = f.stem.partition("__")
        if variant in VARIANTS and "ok" in r:
            r.update(release=f.parent.name, layout=layout, variant=variant)
            found[(f.parent.name, layout, variant)] = r
    return found


def noise_floors(found: dict[tuple[str, str, str], dict]) -> dict[str, float]:
    """Differences between correct runs of identical bf16 weights, measured here:
    ``twin``: a layout's twin on one release vs on another (kernels differ);
    ``tp1``: the bf16 checkpoint at TP=2 (or TP=2 + EP) vs TP=1, same release."""
    key = f"max_dlogprob_first{FIRST_STEPS}"
    labels = sorted({label for label, _, _ in found})
    twin, tp = [], []
    for i, first in enumerate(labels):
        for second in labels[i + 1 :]:
            for layout in CASES:
                a, b = found.get((first, layout, "twin")), found.get((second, layout, "twin"))
                if a and b and a["ok"] and b["ok"]:
                    twin.append(compare(a, b)[key])
        ref = found.get((first, "bf16", "plugin"))
        for variant in ("tp2", "tp2-ep"):
            run = found.get((first, "bf16", variant))
            if run and ref and run["ok"] and ref["ok"]:
                tp.append(compare(run, ref)[key])
    return {
        "twin": max(twin) if twin else FALLBACK_FLOOR["twin"],
        "tp1": max(tp) if tp else FALLBACK_FLOOR["tp1"],
        "twin_measured": bool(twin),
        "tp1_measured": bool(tp),
    }


def verdict(loads: bool, cmp: dict | None, floor: float) -> str:
    if not loads:
        return "fails to load"
    if not cmp or "error" in cmp:
        return "no reference"
    if cmp["max_dlogprob_step0"] > GARBAGE:  # inf: no top-k token in common
        return "garbage"
    if cmp[f"max_dlogprob_first{FIRST_STEPS}"] <= floor:
        return "within noise"
    return "above noise"


def evaluate(found: dict[tuple[str, str, str], dict]) -> tuple[list[dict], dict]:
    floors = noise_floors(found)
    rows = []
    for (release, layout, variant), r in sorted(found.items()):
        if variant == "twin":
            continue
        row = {
            "release": r.get("vllm", release),
            "label": release,
            "layout": layout,
            "variant": variant,
            "loads": r["ok"],
            "error": None if r["ok"] else r.get("root_cause") or r.get("error"),
            "patches": (r.get("plugin") or {}).get("applied"),
        }
        refs = {"twin": found.get((release, layout, "twin"))}
        if variant.startswith("tp2"):
            refs["tp1"] = found.get((release, layout, "plugin"))
        for name, ref in refs.items():
            if r["ok"] and ref is not None and ref.get("ok"):
                row[f"vs_{name}"] = compare(r, ref)
            elif ref is not None and not ref.get("ok"):
                row[f"vs_{name}"] = {"error": f"reference failed: {ref.get('root_cause')}"}
        ref = "tp1" if variant.startswith("tp2") else "twin"
        row["reference"] = ref
        row["noise_floor"] = floors[ref]
        row["verdict"] = verdict(r["ok"], row.get(f"vs_{ref}"), floors[ref])
        rows.append(row)
    return rows, floors


def _fmt_cmp(c: dict | None) -> tuple[str, str, str]:
    if not c:
        return "-", "-", "-"
    if "error" in c:
        return "ref failed", "-", "-"
    agree = f"{c['greedy_agree']}/{c['greedy_total']}"
    if c["divergences"]:
        margins = ", ".join(f"{d['ref_margin']:.3g}" for d in c["divergences"])
        agree += f" (tie margins {margins})"
    return (
        f"{c['max_dlogprob_step0']:.4f}",
        f"{c[f'max_dlogprob_first{FIRST_STEPS}']:.4f}",
        agree,
    )


def markdown(rows: list[dict], floors: dict) -> str:
    head = (
        "| vLLM | layout | run | loads | max abs dlogprob, step 0 | "
        f"max abs dlogprob, first {FIRST_STEPS} steps | greedy tokens = ref | ref | verdict |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for row in rows:
        if row["loads"]:
            loads = "yes"
        else:
            loads = "**no**: `" + (row["error"] or "?").replace("|", "\\|")[:160] + "`"
        ref = row["reference"]
        d0, d8, agree = _fmt_cmp(row.get(f"vs_{ref}"))
        good = row["verdict"] == "within noise"
        verdict_text = row["verdict"] if good else f"**{row['verdict']}**"
        lines.append(
            f"| {row['release']} | {row['layout']} | {row['variant']} | {loads} | {d0} | {d8} "
            f"| {agree} | {ref} | {verdict_text} |"
        )
    notes = (
        f"\nNoise floors (max abs dlogprob over the first {FIRST_STEPS} steps between correct "
        f"runs of identical bf16 weights): twin vs twin across releases "
        f"{floors['twin']:.4f}{'' if floors['twin_measured'] else ' (fallback)'}; "
        f"bf16 TP=2 vs TP=1 {floors['tp1']:.4f}{'' if floors['tp1_measured'] else ' (fallback)'}."
        "\n"
    )
    return head + "\n".join(lines) + "\n" + notes


def cmd_report(args: argparse.Namespace) -> int:
    found = {}
    for results in args.results:
        found.update(load_results(results))
    rows, floors = evaluate(found)
    out = args.out or args.results[0]
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "results.json").write_text(
        json.dumps({"noise_floors": floors, "rows": rows}, indent=1) + "\n"
    )
    table = markdown(rows, floors)
    (Path(out) / "table.md").write_text(table)
    print(table)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="tiny checkpoints of every layout + bf16 twins")
    b.add_argument("ckpts", type=Path)
    b.add_argument("--layouts", default=None, help="comma list (default: all)")
    b.add_argument("--jobs", type=int, default=8)
    b.set_defaults(func=cmd_build)
    r = sub.add_parser("run", help="run the matrix; one JSON (+ log) per vLLM run")
    r.add_argument("ckpts", type=Path)
    r.add_argument("results", type=Path)
    r.add_argument("--release", action="append", required=True, help="LABEL or LABEL=DIR")
    r.add_argument("--variants", default="plugin,stock,twin", help=", ".join(VARIANTS))
    r.add_argument("--layouts", default=None, help="comma list (default: all)")
    r.add_argument("--gpus", default="0", help="GPU ids for one-GPU runs, used in turn")
    r.add_argument("--jobs", type=int, default=4, help="vLLM runs at a time")
    r.add_argument("--timeout", type=int, default=420, help="seconds per vLLM run")
    r.set_defaults(func=cmd_run)
    p = sub.add_parser("report", help="compare runs with references; markdown table")
    p.add_argument("results", type=Path, nargs="+")
    p.add_argument("--out", type=Path, default=None)
    p.set_defaults(func=cmd_report)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

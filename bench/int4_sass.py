"""The one-token int4 kernels' inner loops as an H100 runs them, without a GPU.

Compiles ``marlin_gemv`` and ``marlin_moe``'s two kernels for CUDA capability 9.0 with
Triton's own ``ptxas`` (the ``triton`` wheel ships it and ``cuobjdump``; no driver, no
GPU), specialized as a launch specializes them (pointers and multiples of 16 aligned),
and prints per loop: instructions, weights per thread and step, instructions per weight,
barriers and shared-memory operations (data moving between lanes), the load lead (the
fewest instructions from a global load to the first use of what it loaded), and registers.

    python bench/int4_sass.py [--tiles 4x4,8x4,16x4] [--keep DIR] [--prefetch N] [--pdl 1]
        [--maxnreg 96] [--dense] [--norms]

Tiles are ``BLOCK_KT x warps``. An instruction count is not a time: a loop can wait on its
loads however few instructions it issues (bench/marlin_gemv.py times them on a GPU).
``--maxnreg`` compiles with that register limit (the kernels' ``maxnreg`` tiles): without
one, ``ptxas`` keeps the loops in 56 - 80 registers by issuing the next step's loads late
in a step (load lead 28 - 43); at 96 it issues them at the top (119 - 127). ``--dense``
also compiles ``dense_decode``'s two bf16 kernels (the tiles' 4 rows x 512 columns, 4
warps) with and without ``AHEAD`` (each step loading the next one's columns first);
``--norms`` ``norm_blocks``' three kernels at hidden 2816 (registers and spills only: they
have no loop).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gemma4_quant.kernels import dense_decode, marlin_gemv, marlin_moe, norm_blocks  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
_INSTR = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BACK = re.compile(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)")
_LDG = re.compile(r"LDG\.E(?:\.(128|64))?\S*\s+R(\d+),")

GEMV = {
    "x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "part_ptr": "*fp32",
    "count_ptr": "*i32", "out_ptr": "*bf16", "n": "i32", "k_tiles": "i32",
    "tiles_per_split": "i32",
}  # fmt: skip
MOE = {
    "x_ptr": "*bf16", "logits_ptr": "*fp32", "scale_ptr": "*bf16", "w_ptr": "*i32",
    "s_ptr": "*bf16", "part_ptr": "*fp32", "count_ptr": "*i32", "out_ptr": "*bf16",
    "n_experts": "i32", "n": "i32", "k_tiles": "i32", "tiles_per_split": "i32",
}  # fmt: skip

W2 = {("h_ptr" if name == "x_ptr" else name): kind for name, kind in MOE.items()}


def _tool(name: str) -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def compile_sass(
    fn, signature: dict, consts: dict, warps: int, aligned: tuple, out: Path, maxnreg: int = 0
):
    """SASS lines and the resource line of ``fn`` compiled for ``TARGET``."""
    sig = {**signature, **{name: "constexpr" for name in consts}}
    names = list(sig)
    attrs = {
        (names.index(a),): [["tt.divisibility", 16]]
        for a in names
        if sig[a].startswith("*") or a in aligned
    }
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=TARGET,
        options={"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})},
    )
    cubin = out / f"{fn.__name__}-{consts.get('BLOCK_KT')}-{warps}.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    res = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    regs = re.search(r"REG:(\d+)", res)
    return sass.splitlines(), int(regs.group(1)) if regs else -1


def loops(lines: list[str]) -> list[tuple[collections.Counter, int]]:
    """Per backward branch (a loop; W13 runs two, its gate tile's and its up tile's), the
    opcodes from its target to it, and the load lead: the fewest instructions from a
    global load to the first instruction that reads what it loaded, going round the loop."""
    instrs = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTR.match, lines) if m]
    found = []
    for addr, text in instrs:
        back = _BACK.search(text)
        if back and int(back.group(1), 16) < addr:
            start = int(back.group(1), 16)
            body = [t for a, t in instrs if start <= a <= addr]
            ops = (re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            found.append((collections.Counter(ops), load_lead(body)))
    return found


def load_lead(body: list[str]) -> int:
    """The fewest instructions between a global load of ``body`` and its first reader (a
    load issued that close to its use waits for memory unless other warps fill the gap)."""
    leads = []
    for i, text in enumerate(body):
        load = _LDG.search(text)
        if load is None:
            continue
        width = {"128": 4, "64": 2}.get(load.group(1) or "", 1)
        loaded = {f"R{int(load.group(2)) + k}" for k in range(width)}
        for d in range(1, len(body) + 1):
            sources = body[(i + d) % len(body)].partition(",")[2]
            if loaded & set(re.findall(r"\bR\d+\b", sources)):
                leads.append(d)
                break
    return min(leads, default=-1)


def row(
    name: str, fn, signature: dict, consts: dict, warps: int, aligned: tuple, out: Path,
    maxnreg: int = 0,
):  # fmt: skip
    lines, regs = compile_sass(fn, signature, consts, warps, aligned, out, maxnreg)
    # a step: BLOCK_KT row tiles of 128 words, 8 weights each, over the program's threads
    weights = consts["BLOCK_KT"] * 128 * 8 // (32 * warps)
    for i, (ops, lead) in enumerate(loops(lines)):
        total = sum(ops.values())
        between = ops["BAR"] + ops["LDS"] + ops["STS"] + ops["STSM"] + ops["SHFL"]
        print(
            f"| {name}, loop {i + 1} | {consts['BLOCK_KT']} x {warps} | {total} | {weights} | "
            f"{total / max(weights, 1):.2f} | {between} | {lead} | {regs} |"
        )


DENSE = {"x_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "inter": "i32", "hidden": "i32"}
DOWN = {"a_ptr": "*bf16", "w_ptr": "*bf16", "out_ptr": "*bf16", "inter": "i32", "hidden": "i32"}


def dense_rows(out: Path, maxnreg: int) -> None:
    """``dense_decode``'s kernels, each with and without ``AHEAD``: loop instructions, load
    lead and registers."""
    print("\n| kernel | AHEAD | loop instructions | load lead | registers |\n|---|---|---|---|---|")
    kernels = (("dense gate_up", dense_decode._gate_up_act_kernel, DENSE, {"ACT": 2}),
               ("dense down", dense_decode._down_kernel, DOWN, {}))  # fmt: skip
    for name, fn, signature, consts in kernels:
        for ahead in (0, 1):
            consts = {**consts, "BLOCK_N": 4, "BLOCK_K": 512, "PDL": 0, "AHEAD": ahead}
            lines, regs = compile_sass(fn, signature, consts, 4, ("inter", "hidden"), out, maxnreg)
            for ops, lead in loops(lines):
                print(f"| {name} | {ahead} | {sum(ops.values())} | {lead} | {regs} |")


def norm_rows(out: Path) -> None:
    """``norm_blocks``' kernels as the plugin launches them at hidden 2816 (8 warps, the
    router's kernel with 2 rows of 128 experts a program): registers and spill stores."""
    bf16 = "*bf16"
    rows = {name: bf16 for name in ("o", "residual", "w_post", "w_ff", "w_ff2", "scale")}
    outs = {name: bf16 for name in ("h_out", "ff_out", "ff2_out")}
    kernels = (
        ("post_attention_norms", norm_blocks._post_attention_kernel,
         {**rows, **outs, "router_out": bf16, "root": "fp32", "eps": "fp32"}, {}),
        ("post_attention_router", norm_blocks._post_attention_router_kernel,
         {**rows, "router_w": bf16, **outs, "logits_out": "*fp32", "root": "fp32",
          "eps": "fp32", "n_experts": "i32"}, {"BLOCK_E": 2}),
        ("end_of_layer_norms", norm_blocks._end_of_layer_kernel,
         {**{n: bf16 for n in ("dense", "experts", "residual", "w1", "w2", "w", "scalar",
                                "w_next", "out", "next_out")}, "eps": "fp32"}, {"NEXT": 1}),
    )  # fmt: skip
    print("\n| kernel | registers | spill stores |\n|---|---|---|")
    for name, fn, signature, consts in kernels:
        consts = {"N": 2816, "BLOCK": 4096, **consts}
        lines, regs = compile_sass(fn, signature, consts, 8, (), out)
        spills = sum("STL" in line for line in lines)
        print(f"| {name} | {regs} | {spills} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", default="4x4,8x4,16x4", help="BLOCK_KT x warps, comma-separated")
    parser.add_argument("--keep", type=Path, help="keep the cubins here")
    parser.add_argument("--prefetch", type=int, default=0, help="the loops' PREFETCH (steps)")
    parser.add_argument("--pdl", type=int, default=0, help="the kernels' PDL (0 or 1)")
    parser.add_argument("--maxnreg", type=int, default=0, help="ptxas' register limit (0: none)")
    parser.add_argument("--dense", action="store_true", help="dense_decode's kernels too")
    parser.add_argument("--norms", action="store_true", help="norm_blocks' kernels too")
    args = parser.parse_args()
    out = args.keep or Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    moe = {"TOPK": 8, "BLOCK_E": 128, "GROUP": 32}
    print("| kernel | BLOCK_KT x warps | loop instructions | weights a thread | per weight | "
          "barriers + shared + shuffles | load lead | registers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    kernels = (  # name, kernel, signature, constants, specialized integers
        ("marlin_gemv", marlin_gemv._marlin_gemv_kernel, GEMV,
         {"GROUP": 32, "SPLIT": 4}, ("n", "k_tiles")),
        ("marlin_moe W13", marlin_moe._w13_kernel, MOE, {**moe, "SPLIT": 8, "ACT": 2},
         ("n", "k_tiles")),
        ("marlin_moe W2", marlin_moe._w2_kernel, W2, {**moe, "SPLIT": 2}, ("n",)),
    )  # fmt: skip
    for tiles in args.tiles.split(","):
        block_kt, warps = map(int, tiles.split("x"))
        for name, fn, signature, consts, aligned in kernels:
            consts = {**consts, "BLOCK_KT": block_kt, "PREFETCH": args.prefetch, "PDL": args.pdl}
            row(name, fn, signature, consts, warps, aligned, out, args.maxnreg)
    if args.dense:
        dense_rows(out, args.maxnreg)
    if args.norms:
        norm_rows(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

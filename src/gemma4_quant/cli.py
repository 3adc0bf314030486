"""``gemma4-quant`` (and ``python -m gemma4_quant``): patches, checkpoints, doctor."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from . import __version__, vllm_version
from .layout import DEFAULT_FORM, DEFAULT_LAYOUT, DEFAULT_SIZE, FORMS, LAYOUTS, SIZES


def _patches(args: argparse.Namespace) -> int:
    """Print the installed vLLM release and, for every patch, whether it applies there."""
    from .patches import plan

    rows = []
    for item in plan():
        status = item.detection.status.value
        if item.disabled_by is not None:
            status = f"disabled ({status})"
        rows.append(
            {
                "patch": item.name,
                "status": status,
                "reason": item.detection.reason,
                "summary": item.module.SUMMARY,
            }
        )
    if args.json:
        print(
            json.dumps({"vllm": vllm_version(), "plugin": __version__, "patches": rows}, indent=2)
        )
        return 0
    print(f"vllm-gemma4-quant {__version__} on vLLM {vllm_version()}")
    width = max(len(row["patch"]) for row in rows) if rows else 0
    for row in rows:
        print(f"  {row['patch']:<{width}}  {row['status']:<12}  {row['reason']}")
    return 0


def _parse_overrides(items: list[str]) -> dict[str, Any]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def _cmd_build(args: argparse.Namespace) -> int:
    if args.list_layouts:
        for title, names in (("layouts", LAYOUTS), ("forms (--form)", FORMS)):
            print(f"{title}:")
            width = max(map(len, names))
            for name, desc in names.items():
                print(f"  {name:<{width}}  {desc}")
        print("sizes (--size):")
        for name, preset in SIZES.items():
            values = ", ".join(f"{k}={v}" for k, v in preset.items())
            print(f"  {name}: {values or 'the tiny config'}")
        return 0
    if args.out_dir is None:
        print("build: OUT_DIR is required (or --list-layouts)")
        return 2
    from .checkpoints import build_checkpoint  # torch: only for building

    try:
        overrides = _parse_overrides(args.set)
        out = build_checkpoint(
            args.out_dir,
            args.layout,
            seed=args.seed,
            form=args.form,
            size=args.size,
            **overrides,
        )
    except ValueError as exc:
        print(f"build: {exc}")
        return 2
    size = sum(f.stat().st_size for f in out.iterdir())
    print(
        f"wrote {args.layout} checkpoint ({args.form}, size {args.size}) to {out} "
        f"({size / 2**20:.1f} MiB)"
    )
    return 0


def _cmd_twin(args: argparse.Namespace) -> int:
    from .checkpoints import write_twin

    out = write_twin(args.src_dir, args.out_dir)
    print(f"wrote bf16 twin of {args.src_dir} to {out}")
    return 0


def _add_checkpoint_commands(subparsers: argparse._SubParsersAction) -> None:
    build = subparsers.add_parser("build", help="write a tiny random Gemma 4 MoE checkpoint")
    build.add_argument("out_dir", nargs="?", type=Path, metavar="OUT_DIR")
    build.add_argument("--layout", default=DEFAULT_LAYOUT, choices=list(LAYOUTS), metavar="NAME")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument(
        "--form",
        default=DEFAULT_FORM,
        choices=list(FORMS),
        help="architecture form: text-only Gemma4ForCausalLM, or the multimodal "
        "Gemma4ForConditionalGeneration the public checkpoints use",
    )
    build.add_argument(
        "--size",
        default=DEFAULT_SIZE,
        choices=list(SIZES),
        help="dimensions: tiny, or the real model's per-layer dimensions with few layers "
        "and experts (real-tp2 / real-tp4: the expert size one rank holds at TP 2 / 4)",
    )
    build.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a text-config key (VALUE parsed as JSON), e.g. num_experts=16",
    )
    build.add_argument("--list-layouts", action="store_true", help="print the layouts and exit")
    build.set_defaults(func=_cmd_build)

    twin = subparsers.add_parser("twin", help="write the dequantized bf16 twin of a checkpoint")
    twin.add_argument("src_dir", type=Path, metavar="SRC_DIR")
    twin.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    twin.set_defaults(func=_cmd_twin)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; building it imports neither torch nor vLLM."""
    from . import doctor

    parser = argparse.ArgumentParser(
        prog="gemma4-quant",
        description="Quantized Gemma 4 MoE checkpoints on stock vLLM.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    patches = sub.add_parser("patches", help="which patches apply to the installed vLLM")
    patches.add_argument("--json", action="store_true")
    patches.set_defaults(func=_patches)
    _add_checkpoint_commands(sub)
    doctor.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

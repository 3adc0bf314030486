"""``gemma4-quant`` (and ``python -m gemma4_quant``): patches, checkpoints, doctor."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from . import __version__, vllm_version


def _patches(args: argparse.Namespace) -> int:
    """Print the installed vLLM release and, for every patch, whether it applies there."""
    from . import envs
    from .patches import load_patch_modules

    skip = envs.disabled_patches()
    rows = []
    for module in load_patch_modules():
        detection = module.detect()
        status = detection.status.value
        if envs.disabled() or module.NAME in skip:
            status = f"disabled ({status})"
        rows.append(
            {
                "patch": module.NAME,
                "status": status,
                "reason": detection.reason,
                "summary": module.SUMMARY,
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


# Subcommand modules register themselves with add_arguments(subparsers).
_SUBCOMMAND_MODULES = ("checkpoints", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma4-quant",
        description="Quantized Gemma 4 MoE checkpoints on stock vLLM.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    patches = sub.add_parser("patches", help="which patches apply to the installed vLLM")
    patches.add_argument("--json", action="store_true")
    patches.set_defaults(func=_patches)
    for name in _SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__package__}.{name}":
                raise
            continue
        module.add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

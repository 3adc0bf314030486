"""What this machine's CPU offers vLLM's CPU kernels, read from /proc/cpuinfo (no torch).

``python -m gemma4_quant.cpu`` prints one line: the CPU model and its vector extensions.
"""

from __future__ import annotations

import os
from functools import cache

# The extensions that decide which of vLLM's CPU kernels run: AVX2 only, AVX-512 (with or
# without BF16), or AMX tiles (W4A8 int4 linears by default, AMX attention).
_EXTENSIONS = (
    ("AVX2", ("avx2",)),
    ("AVX-512", ("avx512f",)),
    ("AVX-512 BF16", ("avx512_bf16",)),
    ("AMX", ("amx_tile", "amx_bf16", "amx_int8")),
)


def _cpuinfo_field(name: str) -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.split(":", 1)[0].strip() == name:
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (empty where /proc/cpuinfo has none)."""
    return frozenset(_cpuinfo_field("flags").split())


def vector_extensions(flags: frozenset[str] | None = None) -> list[str]:
    """The extensions of ``_EXTENSIONS`` whose flags this CPU has, e.g. ["AVX2", "AMX"]."""
    flags = cpu_flags() if flags is None else flags
    return [name for name, needs in _EXTENSIONS if all(f in flags for f in needs)]


def kind(flags: frozenset[str] | None = None) -> str:
    """The CPU kind a test outcome depends on: "AMX", "AVX-512, no AMX" or "AVX2 only"."""
    found = vector_extensions(flags)
    if "AMX" in found:
        return "AMX"
    if "AVX-512" in found:
        return "AVX-512, no AMX"
    return "AVX2 only" if "AVX2" in found else "no AVX2"


def describe() -> str:
    model = _cpuinfo_field("model name") or "unknown CPU"
    return (
        f"{model}, {os.cpu_count()} cores: {kind()}"
        f" ({', '.join(vector_extensions()) or 'no vector extensions listed'})"
    )


if __name__ == "__main__":
    print(describe())

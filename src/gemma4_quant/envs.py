"""Every switch the plugin reads, in one place (as vLLM's own ``envs.py``).

Names do not start with ``VLLM_``: vLLM warns about ``VLLM_*`` variables it does not know.
"""

import logging
import os
from functools import cache

__all__ = ["disabled", "disabled_patches", "fallback_mode", "fast_decode_mode", "int4_maxnreg"]

FALLBACK_MODES = ("auto", "off", "force")
# auto first: the default (end to end, docs/gpu-results.md 3d: 1.017 at batch 1, 1.001 - 1.005
# at 4 - 64)
FAST_DECODE_MODES = ("auto", "off", "force")


def disabled() -> bool:
    """``GEMMA4_QUANT_DISABLE=1``: the plugin registers and changes nothing."""
    return os.environ.get("GEMMA4_QUANT_DISABLE", "0").strip().lower() in (
        "1",
        "true",
        "yes",
    )


def disabled_patches() -> set[str]:
    """``GEMMA4_QUANT_DISABLE_PATCHES=a,b``: patches to leave out, by name."""
    raw = os.environ.get("GEMMA4_QUANT_DISABLE_PATCHES", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def fallback_mode() -> str:
    """``GEMMA4_QUANT_FALLBACK``: ``auto`` (default: dequantize int4 MoE experts and WNA16
    linears where vLLM has no kernel, or picks one whose op is missing), ``off`` (vLLM's own
    error stands) or ``force`` (dequantize every int4 expert and linear)."""
    return _mode("GEMMA4_QUANT_FALLBACK", FALLBACK_MODES)


def fast_decode_mode() -> str:
    """``GEMMA4_QUANT_FAST_DECODE``: ``auto`` (default: the one-token paths of
    ``fast_decode``, ``marlin_decode``, ``marlin_moe_decode`` and ``router_decode`` run on
    GPUs and shapes where they were measured faster end to end; ``norm_blocks`` and
    ``ffn_streams`` nowhere yet), ``off`` (vLLM's kernels everywhere) or ``force`` (any
    CUDA GPU and shape)."""
    return _mode("GEMMA4_QUANT_FAST_DECODE", FAST_DECODE_MODES)


def int4_maxnreg() -> int:
    """``GEMMA4_QUANT_INT4_MAXNREG=N``: the one-token int4 kernels (``marlin_decode``,
    ``marlin_moe_decode``) compiled with a register limit of ``N`` for ``ptxas`` in place of
    their tiles' own, for measuring it (bench/int4_sass.py shows what it changes); unset or
    0: the tiles' (kernels/tiles.py)."""
    raw = os.environ.get("GEMMA4_QUANT_INT4_MAXNREG", "0").strip()
    if raw.isdigit() and (int(raw) == 0 or 24 <= int(raw) <= 255):
        return int(raw)
    _warn_bad_value("GEMMA4_QUANT_INT4_MAXNREG", raw, ("0", "24 - 255"), "0")
    return 0


def _mode(name: str, modes: tuple[str, ...]) -> str:
    """One of ``modes`` from the variable ``name``; the first (with a warning) otherwise."""
    raw = os.environ.get(name, modes[0])
    mode = raw.strip().lower()
    if mode in modes:
        return mode
    _warn_bad_value(name, raw, modes, modes[0])
    return modes[0]


@cache
def _warn_bad_value(name: str, value: str, accepted: tuple[str, ...], used: str) -> None:
    logging.getLogger("vllm.gemma4_quant").warning(
        "gemma4_quant: %s=%r is not one of %s; using %s",
        name,
        value,
        "|".join(accepted),
        used,
    )

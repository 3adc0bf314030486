"""On x86 Linux with AMX, every vLLM process may use AMX tiles before it executes one.

Why:
    Linux lets a process execute AMX tile instructions only after it has asked for the
    XTILEDATA state component (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``);
    before that, the first tile instruction raises SIGILL. vLLM's CPU attention
    (``cpu_attention_with_kv_cache``, ISA ``"amx"`` for bf16 wherever the CPU has AMX
    tiles) executes them without asking. A process survives only if oneDNN happened to
    ask first (it does before its own first AMX matmul), so whether a vLLM server or
    worker dies with "Illegal instruction" depends on the model's shapes: seen with tiny
    Gemma 4 models (head_dim 32, hidden 128; head_dim 64, hidden 256) and with an int4
    checkpoint whose worker died under ``distributed_executor_backend="mp"``.

How:
    The plugin asks once, when it is registered, in every vLLM process (API server,
    engine core, every worker): one ``arch_prctl`` system call, made through libc.
    Asking again is harmless, so registering twice is too. A refusal by the kernel is
    reported as a failed patch and changes nothing else.

Upstream PR:
    None yet. The fix upstream is the same call (``torch.cpu._init_amx()`` does it) before
    vLLM selects the ``"amx"`` attention ISA.

Releases:
    Every release whose CPU attention selects the ``"amx"`` ISA (seen 0.20.2, 0.30.0,
    0.32.0), on a CPU whose /proc/cpuinfo lists ``amx_tile``. Not needed anywhere else:
    other CPUs, other operating systems and GPUs never take this path.

Removal:
    When vLLM's CPU worker requests the permission itself (detected: a call of
    ``_init_amx`` or ``ARCH_REQ_XCOMP_PERM`` in its CPU code).
"""

from __future__ import annotations

import ast
import ctypes
import os
import platform
import sys

from .. import vllm_code
from ..cpu import cpu_flags
from . import Detection, vllm_source

NAME = "amx_permission"
SUMMARY = "x86 AMX CPUs: ask Linux for the AMX tile state vLLM's CPU attention uses (SIGILL)"

ATTENTION = "v1/attention/backends/cpu_attn.py"
# where vLLM would request the permission itself, if it ever does
_CPU_CODE = (ATTENTION, "platforms/cpu.py", "v1/worker/cpu_worker.py")

SYS_ARCH_PRCTL = 158  # x86-64
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18


def _x86_linux() -> bool:
    return sys.platform.startswith("linux") and platform.machine().lower() in (
        "x86_64",
        "amd64",
    )


def detect() -> Detection:
    if not _x86_linux():
        return Detection.not_needed("not x86-64 Linux")
    if "amx_tile" not in cpu_flags():
        return Detection.not_needed("this CPU has no AMX tiles")
    attention = vllm_code.parse(vllm_source(ATTENTION) or "")
    if attention is None or not any(
        isinstance(node, ast.Constant) and node.value == "amx" for node in ast.walk(attention)
    ):
        return Detection.unrecognized(f"no AMX ISA selection in vllm/{ATTENTION}")
    for relpath in _CPU_CODE:
        if _requests_permission(vllm_code.parse(vllm_source(relpath) or "")):
            return Detection.not_needed(f"vLLM requests the AMX permission itself (vllm/{relpath})")
    return Detection.needed("vLLM's CPU attention runs AMX tiles without asking Linux (SIGILL)")


def _requests_permission(tree: ast.Module | None) -> bool:
    """A call of ``_init_amx`` or a use of ``ARCH_REQ_XCOMP_PERM`` anywhere in ``tree``."""
    if tree is None:
        return False
    return any(vllm_code.calls(tree, "_init_amx")) or any(
        vllm_code.is_name(node, "ARCH_REQ_XCOMP_PERM") for node in ast.walk(tree)
    )


def apply(detection: Detection) -> None:
    request_xtiledata()


def _arch_prctl(code: int, arg: int | ctypes.c_uint64) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    argument = ctypes.byref(arg) if isinstance(arg, ctypes.c_uint64) else ctypes.c_ulong(arg)
    if libc.syscall(ctypes.c_long(SYS_ARCH_PRCTL), ctypes.c_int(code), argument) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"arch_prctl({code:#x}): {os.strerror(errno)}")


def request_xtiledata() -> None:
    """Ask Linux for the AMX tile data state, for the whole process (idempotent)."""
    _arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)


def xtiledata_permitted() -> bool:
    """Whether this process may execute AMX tile instructions now."""
    mask = ctypes.c_uint64(0)
    try:
        _arch_prctl(ARCH_GET_XCOMP_PERM, mask)
    except OSError:
        return False
    return bool(mask.value >> XFEATURE_XTILEDATA & 1)


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows: whether a process dies with SIGILL depends on whether
    # oneDNN asked for the tile state before vLLM's CPU attention ran, not on any header.
    return ()

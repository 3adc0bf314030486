"""Shared fixtures: tiny checkpoints built once per session, vLLM loads in subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from server_utils import ENGINE_ENV, TIMEOUT_SCALE

HERE = Path(__file__).parent

# vLLM's CPU int4 linear kernel rounds activations to int8 (W4A8) by default where the CPU
# has AMX tiles, and runs W4A16 elsewhere. The twin comparisons are exact only for W4A16,
# so every vLLM process the tests start runs W4A16 on every CPU kind; the W4A8 path has
# its own tests with a bound of its own (test_router.py), which set this to 1.
os.environ["VLLM_CPU_INT4_W4A8"] = "0"
LOAD_MODEL = HERE / "load_model.py"
GREEDY = HERE / "greedy.py"


def run_scaled(cmd: list[str], env: dict[str, str], timeout: float, cwd: Path):
    """A vLLM process of the tests, its output captured, its timeout scaled by
    ``TIMEOUT_SCALE``."""
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout * TIMEOUT_SCALE, cwd=cwd
    )


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
    capture: bool = False,
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
    run_env = _load_env(plugin, env)
    cmd = [sys.executable, str(LOAD_MODEL), str(checkpoint), str(out)]
    if process:
        cmd.append("--process")
    if capture:
        cmd.append("--capture")
    if probe_router:
        cmd.append("--probe-router")
    if hf_overrides:
        cmd += ["--hf-overrides", json.dumps(hf_overrides)]
    proc = run_scaled(cmd, run_env, timeout, out_dir)
    return _read_load(proc.returncode, proc.stdout + proc.stderr, out)


_REPORT = re.compile(r"^.*gemma4_quant \S+ on vLLM .*$", re.M)


def _load_env(plugin: bool, env: dict[str, str] | None) -> dict[str, str]:
    run_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **(env or {})}
    if not plugin:
        run_env["VLLM_PLUGINS"] = "none"
    else:
        run_env.pop("VLLM_PLUGINS", None)
    return run_env


def run_vllm_loads(
    checkpoints: list[Path],
    out_dir: Path,
    *,
    plugin: bool = True,
    process: bool = False,
    capture: bool = False,
    env: dict[str, str] | None = None,
    probe_router: bool = False,
    timeout: int = 900,
) -> dict[Path, Load]:
    """``run_vllm_load`` for several checkpoints, one after the other in one process:
    importing vLLM is most of a load's time. Each load's log is the process's start
    (vLLM's plugins registering) and that checkpoint's own part. Checkpoints after one
    that killed the process are left out of the result."""
    from load_model import JOB_MARK

    out_dir.mkdir(parents=True, exist_ok=True)
    outs = [out_dir / f"{i}.safetensors" for i in range(len(checkpoints))]
    cmd = [sys.executable, str(LOAD_MODEL), str(checkpoints[0]), str(outs[0])]
    for checkpoint, out in zip(checkpoints[1:], outs[1:], strict=True):
        cmd += ["--more", str(checkpoint), str(out)]
    if process:
        cmd.append("--process")
    if capture:
        cmd.append("--capture")
    if probe_router:
        cmd.append("--probe-router")
    # one log in the order it was written: vLLM logs to stdout, tracebacks go to stderr
    run_env = {**_load_env(plugin, env), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        cmd,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout * TIMEOUT_SCALE,
        cwd=out_dir,
    )
    start, *parts = proc.stdout.split(JOB_MARK)
    # the plugin's one report line per process goes with every load, wherever it was
    # logged (once vLLM's logging is set up: in the first load on some releases)
    report = "".join(f"{line}\n" for line in _REPORT.findall(proc.stdout))
    loads = {}
    for checkpoint, out, part in zip(checkpoints, outs, parts, strict=False):
        log = start + part if report in start + part else report + start + part
        if out.exists() and not Path(f"{out}.error").exists():
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
    options: dict[Path, dict] | None = None,
    timeout: int = 900,
) -> dict[Path, list[Load]]:
    """``run_vllm_load`` for a tensor-parallel group (with the plugin): one process per
    rank, each on its own core, each loading every checkpoint in turn (vLLM's import is
    most of a load's time). Returns each checkpoint's loads, one per rank; a checkpoint
    vLLM refuses has failed loads whose log is the refusal's traceback. ``options``: one
    checkpoint's own (``load_model.py --job-options``: its environment, processing)."""
    from load_model import free_port

    out_dir.mkdir(parents=True, exist_ok=True)
    init_method = f"tcp://127.0.0.1:{free_port()}"
    # vLLM's CPU communicator names its shared memory after this and never unlinks it:
    # named after the port alone, a segment left by an earlier group on that port makes
    # this group's creation fail (errno 17)
    ident = f"g4qtest-{uuid.uuid4().hex[:12]}"
    cores = sorted(os.sched_getaffinity(0))
    procs = []
    for rank in range(world_size):
        outs = [out_dir / f"{i}.rank{rank}.safetensors" for i in range(len(checkpoints))]
        cmd = [sys.executable, str(LOAD_MODEL), str(checkpoints[0]), str(outs[0])]
        for checkpoint, out in zip(checkpoints[1:], outs[1:], strict=True):
            cmd += ["--more", str(checkpoint), str(out)]
        for checkpoint, out in zip(checkpoints, outs, strict=True):
            if options and checkpoint in options:
                cmd += ["--job-options", str(out), json.dumps(options[checkpoint])]
        cmd += ["--rank", str(rank), "--world-size", str(world_size), "--init-method", init_method]
        if expert_parallel:
            cmd.append("--expert-parallel")
        run_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
        run_env.update(env or {})
        run_env.pop("VLLM_PLUGINS", None)
        run_env["VLLM_DIST_IDENT"] = ident
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
    try:
        for proc, _, _ in procs:
            proc.wait(timeout=timeout * TIMEOUT_SCALE)
    finally:
        for segment in Path("/dev/shm").glob(f"{ident}-*"):
            segment.unlink(missing_ok=True)
    loads: dict[Path, list[Load]] = {checkpoint: [] for checkpoint in checkpoints}
    for _, outs, log in procs:
        whole = log.read_text()
        for checkpoint, out in zip(checkpoints, outs, strict=True):
            text = _job_log(whole, out)
            error = Path(f"{out}.error")
            if error.exists():
                loads[checkpoint].append(Load(1, error.read_text() + text))
            elif out.exists():
                loads[checkpoint].append(_read_load(0, text, out))
            else:  # the process died before this checkpoint
                loads[checkpoint].append(Load(1, whole))
    return loads


def _job_log(log: str, out: Path) -> str:
    """One job's part of a process's log (all of it where the job left no mark): from its
    ``load_model.py`` mark to the next job's."""
    from load_model import JOB_MARK

    start = log.find(f"{JOB_MARK}{out}\n")
    if start < 0:
        return log
    end = log.find(JOB_MARK, start + len(JOB_MARK))
    return log[start : end if end >= 0 else len(log)]


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
    run_env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env or {})}
    proc = run_scaled(
        [sys.executable, str(GREEDY), str(out), *map(str, models)], run_env, timeout, out_dir
    )
    result = Greedy(proc.returncode, proc.stdout + proc.stderr)
    if result.returncode == 0:
        result.tokens = json.loads(out.read_text())
        result.first_logprobs = json.loads(out.with_suffix(".logprobs.json").read_text())
    return result


class CheckpointFactory:
    """Builds each layout once per session, with the project's builder; in a directory
    shared by sessions (``$GEMMA4_QUANT_TEST_CHECKPOINTS``), once for all of them."""

    DONE = ".complete"  # written once a checkpoint is whole

    def __init__(self, root: Path, shared: bool = False) -> None:
        self.root = root
        self.shared = shared
        self._built: dict[str, Path] = {}

    def __call__(self, layout: str, **overrides) -> Path:
        from gemma4_quant.checkpoints import build_checkpoint

        key = layout + "".join(f"-{k}={v}" for k, v in sorted(overrides.items()))
        return self._once(key, lambda path: build_checkpoint(path, layout, **overrides))

    def _once(self, key: str, write) -> Path:
        if key not in self._built:
            path = self.root / key
            if not self.shared:
                write(path)
            else:
                # sessions running side by side (one per release) build each once
                import fcntl

                self.root.mkdir(parents=True, exist_ok=True)
                with open(self.root / f"{key}.lock", "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    if not (path / self.DONE).exists():
                        shutil.rmtree(path, ignore_errors=True)  # a build that died
                        write(path)
                        (path / self.DONE).touch()
            self._built[key] = path
        return self._built[key]

    def twin(self, layout: str, **overrides) -> Path:
        """The dequantized bf16 twin of ``layout`` (same seed, same overrides)."""
        from gemma4_quant.checkpoints import write_twin

        source = self(layout, **overrides)
        return self._once(f"{source.name}-twin", lambda path: write_twin(source, path))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """The test checkpoints. ``GEMMA4_QUANT_TEST_CHECKPOINTS=DIR`` keeps them in DIR for
    later sessions, other releases' too (``scripts/matrix.sh``): a checkpoint is data
    that does not depend on the vLLM that serves it. ``GEMMA4_QUANT_SHARED_CHECKPOINTS=DIR``
    shares them between sessions that build with the same compressed-tensors and
    tokenizers (the test runner's releases, side by side)."""
    shared = os.environ.get("GEMMA4_QUANT_TEST_CHECKPOINTS")
    if shared:
        return CheckpointFactory(Path(shared), shared=True)
    by_builder = os.environ.get("GEMMA4_QUANT_SHARED_CHECKPOINTS")
    if by_builder:  # shared by sessions whose builder libraries are the same versions
        import compressed_tensors
        import tokenizers

        tools = f"ct-{compressed_tensors.__version__}-tokenizers-{tokenizers.__version__}"
        return CheckpointFactory(Path(by_builder) / tools, shared=True)
    return CheckpointFactory(tmp_path_factory.mktemp("checkpoints"))


class LoadCache:
    """``run_vllm_load`` with the outcome cached per session: tests that look at the same
    load (same checkpoint, same switches) share one vLLM start."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.tmp_path_factory = tmp_path_factory
        self.cache: dict[tuple[str, str], Load] = {}

    @staticmethod
    def _key(checkpoint: Path, kwargs: dict) -> tuple[str, str]:
        return str(checkpoint), json.dumps(kwargs, sort_keys=True, default=str)

    def __call__(self, checkpoint: Path, batch: list[Path] | None = None, **kwargs) -> Load:
        """``batch``: checkpoints to load in the same vLLM process, with the same
        switches, where this one is not cached yet (``many``)."""
        key = self._key(checkpoint, kwargs)
        if key not in self.cache and batch:
            self.many([checkpoint, *(p for p in dict.fromkeys(batch) if p != checkpoint)], **kwargs)
        if key not in self.cache:
            out_dir = self.tmp_path_factory.mktemp("load")
            self.cache[key] = run_vllm_load(checkpoint, out_dir, **kwargs)
        return self.cache[key]

    def many(self, checkpoints: list[Path], **kwargs) -> list[Load]:
        """The loads of ``checkpoints`` (``run_vllm_loads`` keywords), those not yet
        cached in one vLLM process."""
        todo = [c for c in checkpoints if self._key(c, kwargs) not in self.cache]
        if len(todo) > 1:
            out_dir = self.tmp_path_factory.mktemp("loads")
            for checkpoint, load in run_vllm_loads(todo, out_dir, **kwargs).items():
                self.cache[self._key(checkpoint, kwargs)] = load
        # one by one: a single checkpoint, and any that a crash left out
        return [self(checkpoint, **kwargs) for checkpoint in checkpoints]


@pytest.fixture(scope="session")
def matrix_loads(request, checkpoints, vllm_load) -> dict[str, tuple[Path, Load, Load]]:
    """The layouts of the compatibility matrix (``test_matrix.LAYOUTS``) that the selected
    tests ask for (a ``layout`` parameter; all of them for a test without one), loaded by
    stock vLLM and with the plugin, two vLLM processes in all: layout -> (checkpoint,
    stock load, plugin load). ``vllm_load`` returns the same loads afterwards."""
    from test_matrix import LAYOUTS

    asked = {
        getattr(item, "callspec", None) and item.callspec.params.get("layout")
        for item in request.session.items
        if "matrix_loads" in getattr(item, "fixturenames", ())
    }
    layouts = [layout for layout in LAYOUTS if layout in asked or None in asked]
    paths = [checkpoints(layout, **LAYOUTS[layout]) for layout in layouts]
    stock = vllm_load.many(paths, plugin=False)
    plugin = vllm_load.many(paths)
    return dict(zip(layouts, zip(paths, stock, plugin, strict=True), strict=True))


@pytest.fixture(scope="session")
def vllm_load(tmp_path_factory: pytest.TempPathFactory) -> LoadCache:
    return LoadCache(tmp_path_factory)


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
    run_env = {**os.environ, **ENGINE_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if tensor_parallel > 1:
        # one core per worker: vLLM's CPU workers refuse to share (see cpu-vllm.md)
        cores = sorted(os.sched_getaffinity(0))[:tensor_parallel]
        run_env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(map(str, cores))
    run_env.update(env or {})
    proc = run_scaled(cmd, run_env, timeout, out_dir)
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

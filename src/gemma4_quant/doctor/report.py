"""The report: what doctor found, as a dict (``--json``) and as text.

Describes the checkpoint and the environment, gives both predictions (as vLLM runs here,
and stock), and adds notes that never change the verdict.
"""

from __future__ import annotations

from typing import Any

from . import towers
from .analysis import Analysis
from .core import EXIT_CODES, Ctx, Outcome
from .environment import GENERATIONS, Environment, torchvision_works
from .predict import Prediction, layer_ranges, module_list
from .rules import is_wna16


def describe_checkpoint(analysis: Analysis) -> dict[str, Any]:
    quantized: dict[str, set[str]] = {}
    layers: dict[str, set[int]] = {}
    unquantized: set[str] = set()
    for module in analysis.modules:
        if module.stored != "bf16":
            scheme = module.scheme.describe() if module.scheme else f"stored {module.stored}"
            quantized.setdefault(module.kind, set()).add(scheme)
            if module.layer is not None:
                layers.setdefault(module.kind, set()).add(module.layer)
        else:
            unquantized.add(module.kind)
    text = analysis.text_config
    schemes = sorted({m.scheme.describe() for m in analysis.modules if m.scheme})
    qcfg = analysis.quant_config or {}
    return {
        "source": analysis.checkpoint.source,
        "architecture": analysis.architecture,
        "towers": analysis.towers,
        "quantization": None
        if analysis.quant_config is None
        else {
            "method": analysis.quant_method,
            "format": qcfg.get("format") or qcfg.get("packing_format"),
            "schemes": schemes,
        },
        "experts": {
            "layout": analysis.expert_layout,
            "num_experts": text.get("num_experts"),
            "layers": len(analysis.of_kind("experts")),
        },
        "quantized": {kind: sorted(v) for kind, v in sorted(quantized.items())},
        # only where some layers of a kind are quantized and others not
        "quantized_layers": {
            kind: sorted(layers[kind]) for kind in sorted(layers) if kind in unquantized
        },
        "unquantized": sorted(unquantized),
        "router_quantized": any(m.stored != "bf16" for m in analysis.of_kind("router")),
        "kv_shared": _kv_shared(analysis),
        "extra_expert_tensors": {
            k: len(v) for k, v in sorted(analysis.extra_expert_tensors.items())
        },
        "tensors": len(analysis.checkpoint.tensors),
        "files": len(analysis.checkpoint.files),
    }


def _kv_shared(analysis: Analysis) -> dict[str, Any] | None:
    """KV-shared layers (E2B / E4B): how many, and whether the checkpoint still stores
    their (unused) K/V weights, which transformers' own exports leave out."""
    text = analysis.text_config
    shared = int(text.get("num_kv_shared_layers") or 0)
    if not shared:
        return None
    first = int(text.get("num_hidden_layers") or 0) - shared
    stored = any(
        m.layer is not None and m.layer >= first and m.name.endswith(".self_attn.k_proj")
        for m in analysis.modules
    )
    return {"layers": shared, "first": first, "kv_weights_stored": stored}


def describe_environment(env: Environment) -> dict[str, Any]:
    return {
        "vllm": env.vllm_version,
        "loader": GENERATIONS.get(env.generation or "", env.generation_reason),
        "silent_skip": env.silent_skip,
        "plugin": env.plugin,
        "plugin_reason": env.plugin_reason,
        "patches": {name: status for name, (status, _) in env.patches.items()},
        "applied": sorted(env.active_patches()),
        "fallback_mode": env.fallback_mode,
        "platform": env.platform,
        "device": env.device,
        "compute_capability": env.capability,
        "tensor_parallel": env.tensor_parallel,
        "cpu_extensions": env.cpu.extensions if env.cpu else None,
        "cpu_int4_w4a8": env.cpu.int4_w4a8 if env.cpu else None,
    }


def _prediction_dict(prediction: Prediction) -> dict[str, Any]:
    return {
        "outcome": prediction.outcome.value,
        "exit_code": int(EXIT_CODES[prediction.outcome]),
        "stage": prediction.stage.label if prediction.stage else None,
        "load_outcome": prediction.load_outcome.value,
        "summary": prediction.summary,
        "patches_used": prediction.patches_used,
        "findings": [
            {
                "rule": f.rule,
                "stage": f.stage.label,
                "outcome": f.outcome.value,
                "modules": f.modules,
                "message": f.message,
                "detail": f.example,
                "patch": f.patch,
                "extra_gib": round(f.extra_bytes / 2**30, 3),
            }
            for f in prediction.findings
        ],
    }


def report_dict(
    analysis: Analysis, env: Environment, prediction: Prediction, stock: Prediction
) -> dict[str, Any]:
    ctx = Ctx(analysis, env, env.active_patches())
    return {
        "checkpoint": describe_checkpoint(analysis),
        "multimodal": towers.describe(analysis, ctx),
        "environment": describe_environment(env),
        "prediction": _prediction_dict(prediction),
        "stock": _prediction_dict(stock),
        "notes": notes(analysis, env, prediction),
    }


def notes(analysis: Analysis, env: Environment, prediction: Prediction) -> list[str]:
    """What else a user of this machine should know (never changes the verdict)."""
    found = []
    patched = [f for f in prediction.findings if f.outcome is Outcome.PATCHED]
    extra = sum(f.extra_bytes for f in patched if f.patch != "unquantized_experts")
    if extra:
        found.append(
            f"the dequantizing fallback adds {extra / 2**30:.1f} GiB of weights to the "
            "packed checkpoint (GEMMA4_QUANT_FALLBACK=off keeps vLLM's error instead)"
        )
    experts = sum(f.extra_bytes for f in patched if f.patch == "unquantized_experts")
    if experts:
        found.append(
            f"AutoRound experts load dequantized: {experts / 2**30:.1f} GiB more than the "
            "packed checkpoint (vLLM builds INC MoE experts unquantized on CPU)"
        )
    if analysis.multimodal and not env.given_platform and not torchvision_works():
        found.append(
            "images need torchvision (transformers' Gemma4VideoProcessor, part of "
            "Gemma4Processor, requires it), which does not import here: vLLM builds the "
            "processor for every image request (0.20.2 also when the server "
            'starts); --limit-mm-per-prompt \'{"image": 0, "video": 0}\' serves text '
            "without it"
        )
    if (
        env.cpu is not None
        and env.cpu.int4_w4a8
        and any(is_wna16(m.scheme) for m in analysis.modules)
    ):
        found.append(
            "this AMX CPU runs the int4 linears vLLM keeps quantized as W4A8: activations are "
            "rounded to int8 per token, so outputs differ from the bf16 twin by more than bf16 "
            "rounding (VLLM_CPU_INT4_W4A8=0 keeps W4A16)"
        )
    ctx = Ctx(analysis, env, env.active_patches())
    built = [m.short for m in analysis.of_kind(*towers.TOWER_KINDS) if towers.tower_scheme(m, ctx)]
    if built:
        found.append(
            f"vLLM builds {len(built)} vision/audio module(s) quantized as the config asks "
            f"(e.g. {built[0]}); their kernels are not modelled"
        )
    return found


def format_report(report: dict[str, Any]) -> str:
    ckpt, env = report["checkpoint"], report["environment"]
    lines = [f"gemma4-quant doctor: {ckpt['source']}", "", "checkpoint"]
    towers = f" + {', '.join(ckpt['towers'])} tower" if ckpt["towers"] else " (text only)"
    lines.append(f"  architecture   {ckpt['architecture']}{towers}")
    quant = ckpt["quantization"]
    if quant is None:
        lines.append("  quantization   none: a bf16 model (no quantization_config)")
    else:
        fmt = f" ({quant['format']})" if quant["format"] else ""
        lines.append(f"  quantization   {quant['method']}{fmt}: {'; '.join(quant['schemes'])}")
    experts = ckpt["experts"]
    layout = {"fused-3d": "fused 3D", "per-expert": "per expert (experts.{e}.{proj})"}.get(
        experts["layout"], "none"
    )
    if experts["layout"] == "none":
        lines.append("  experts        none (a dense model)")
    else:
        lines.append(
            f"  experts        {layout}, {experts['num_experts']} experts x "
            f"{experts['layers']} layers"
        )
    shared = ckpt["kv_shared"]
    if shared:
        stores = "stored (unused)" if shared["kv_weights_stored"] else "not stored"
        lines.append(
            f"  kv sharing     layers {shared['first']}+ ({shared['layers']}) read an earlier "
            f"layer's KV cache; their k_proj/v_proj/k_norm: {stores}"
        )
    partial = {k: f"; {layer_ranges(v)}" for k, v in ckpt["quantized_layers"].items()}
    quantized = "; ".join(
        f"{k} ({', '.join(v)}{partial.get(k, '')})" for k, v in ckpt["quantized"].items()
    )
    lines.append(f"  quantized      {quantized or 'nothing'}")
    lines.append(f"  unquantized    {', '.join(ckpt['unquantized']) or 'nothing'}")
    router = "quantized" if ckpt["router_quantized"] else "bf16"
    lines.append(f"  router         {router if experts['layout'] != 'none' else 'none'}")
    if report["multimodal"] is not None:
        lines.append(f"  vision tower   {_tower_line(report['multimodal'])}")
    extra = ", ".join(f"{k} x{n}" for k, n in ckpt["extra_expert_tensors"].items())
    lines.append(f"  expert extras  {extra or 'none'} (_shape / _g_idx / zero points)")
    lines.append(f"  read           {ckpt['tensors']} tensor headers from {ckpt['files']} file(s)")
    lines += ["", f"vLLM {env['vllm']}"]
    lines.append(f"  loader         {env['loader']}")
    lines.append(
        f"  plugin         {'active' if env['plugin'] else 'inactive'}: {env['plugin_reason']}"
    )
    needed = [n for n, s in env["patches"].items() if s == "needed"]
    lines.append(
        f"  needs patches  {', '.join(needed) or 'none'}"
        f" (GEMMA4_QUANT_FALLBACK={env['fallback_mode']})"
    )
    lines.append(
        f"  machine        {env['device']}"
        + (f", tensor parallel {env['tensor_parallel']}" if env["tensor_parallel"] > 1 else "")
    )
    prediction, stock = report["prediction"], report["stock"]
    lines += [
        "",
        f"verdict: {prediction['outcome'].upper()} (exit {prediction['exit_code']})",
        f"  {prediction['summary']}",
    ]
    lines += _format_findings(prediction["findings"])
    if stock is not prediction and stock["summary"] != prediction["summary"]:
        lines += ["", f"without the plugin: {stock['outcome'].upper()}", f"  {stock['summary']}"]
        lines += _format_findings([f for f in stock["findings"] if f["outcome"] != "patched"])
    if report["notes"]:
        lines += ["", "notes"] + [f"  - {note}" for note in report["notes"]]
    return "\n".join(lines)


def _tower_line(tower: dict[str, Any]) -> str:
    if not tower["vision_config"]:
        return "none (vision_config null)"
    stored = "/".join(tower["stored"]) or "no tensors"
    if tower["stored_quantized"]:
        stored += (
            f" ({len(tower['stored_quantized'])} quantized: {tower['stored_quantized'][0]} ...)"
        )
    if tower["vllm_quantizes"]:
        built = f"vLLM builds {len(tower['vllm_quantizes'])} of them quantized"
    elif tower["config_quantizes"]:
        built = "the config quantizes some, vLLM builds the tower unquantized"
    else:
        why = "; ".join(tower["config_leaves_unquantized"])
        built = "unquantized by the config" + (f" ({why})" if why else "")
    return f"{tower['modules']} modules stored {stored}; {built}"


def _format_findings(findings: list[dict[str, Any]]) -> list[str]:
    lines = []
    for f in findings:
        tag = f["outcome"] if f["outcome"] != "patched" else f"fixed by {f['patch']}"
        where = module_list(f["modules"]) if f["modules"] else "environment"
        cost = f" (+{f['extra_gib']:.2f} GiB of weights)" if f["extra_gib"] else ""
        lines.append(f"  - [{tag}] {f['stage']}: {where}: {f['message']}{cost}")
        if f["detail"]:
            lines.append(f"      {f['detail']}")
    return lines

"""AutoRound (GPTQ-format) MoE experts load where vLLM builds the experts unquantized.

Why:
    vLLM's INC quantization config (``quant_method: auto-round``) builds MoE experts
    *unquantized* on CPU: 0.24 - 0.32 ``INCWna16Scheme.get_moe_method`` returns
    ``UnquantizedFusedMoEMethod`` ("CPU does not support quantized MoE yet"), and 0.20.2's
    ``INCConfig.apply_cpu_w4a16_quant_layer`` returns None for every non-linear layer, which
    ``FusedMoE`` turns into ``UnquantizedFusedMoEMethod``. 0.19 refuses every quantized
    layer on CPU; ``dequant_fallback`` (its ``inc.py``) gives the experts None there too.
    The experts then hold float ``w13_weight`` / ``w2_weight``, while the checkpoint
    streams per-expert GPTQ tensors (``experts.{e}.{gate,up,down}_proj.qweight/qzeros/
    scales``, maybe ``g_idx``) that match no parameter:
    ``KeyError: 'layers.0.moe.experts.0.down_proj.qweight'`` (0.20.2), skipped without a
    word (0.24 - 0.30: the experts keep uninitialized memory; the load guard turns that
    into an error), ``AttributeError: ... has no parameter 'w2_qweight'`` (0.31+).
    No AutoRound MoE checkpoint (Intel's Gemma 4 int4 exports) loads on CPU.

How:
    ``Gemma4ForCausalLM.load_weights`` is wrapped. Only where a layer's experts were built
    with 16/32-bit float ``w13_weight`` / ``w2_weight`` and the model's quantization config
    is INC with GPTQ packing does a generator sit on the weight stream: it buffers each
    (layer, expert, projection)'s ``qweight`` / ``qzeros`` / ``scales`` (and ``g_idx``)
    until the three are there, checks their shapes against the expert parameters,
    dequantizes them with plain torch and yields ``experts.{e}.<proj>.weight`` [out, in]
    instead: the per-expert name every release's unquantized expert loader reads. Every
    other tensor passes through untouched, in order; only projections still missing a
    tensor are held (in a checkpoint's usual sorted order, one at a time). GPTQ v1:
    qweight int32 [in / pack, out] packed along in, qzeros int32 [in / group, out / pack]
    packed along out and stored as zero - 1, scales [in / group, out], g_idx the group of
    each input row; value = (q - zero) * scale in float32, rounded once to the
    parameter's dtype (exact: the checkpoint's values). A shape that does not fit,
    a projection left without one of its tensors, or an expert the checkpoint never
    streams raises ValueError naming the tensor and the expected shape. One warning per
    process says what it costs (16-bit experts instead of int4). On a GPU INC builds
    quantized experts, so the stream is never touched there.

Upstream PR:
    None. vLLM 0.33.0 builds INC MoE experts quantized on CPU (``INCWNA16MoEScheme``),
    so there the patch is not needed.

Releases:
    0.19.x (INC raises NotImplementedError for every quantized layer on CPU;
    ``dequant_fallback`` builds the linears and leaves the experts unquantized),
    0.20 - 0.23 (``apply_cpu_w4a16_quant_layer`` returns None for MoE layers; the experts
    load, its CPU linears cannot run GPTQ weights afterwards) and 0.24.0 - 0.32.0 (the
    ``is_cpu()`` branch of ``get_moe_method``, ``is_xpu() or is_cpu()`` up to 0.26);
    detected from the code, never the version.

Removal:
    When every supported release builds INC MoE experts quantized on CPU (0.33.0+).
"""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .. import vllm_code
from . import Detection, vllm_source
from .dequant_fallback.inc import cpu_refuses_every_layer

NAME = "unquantized_experts"
SUMMARY = "AutoRound (GPTQ) experts load where vLLM builds them unquantized (INC on CPU)"

_MODEL_FILE = "model_executor/models/gemma4.py"
_INC_SCHEME_FILE = "model_executor/layers/quantization/inc/schemes/inc_wna16_scheme.py"
_INC_OLD_FILE = "model_executor/layers/quantization/inc.py"
_FUSED_MOE_FILES = (
    "model_executor/layers/fused_moe/layer.py",
    "model_executor/layers/fused_moe/routed_experts.py",
)
_GPTQ = re.compile(
    r"^(?P<pre>.*\blayers\.(?P<layer>\d+)\.(?:.*\.)?experts)\.(?P<expert>\d+)"
    r"\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<suffix>qweight|qzeros|scales|g_idx)$"
)
_REQUIRED = ("qweight", "qzeros", "scales")
_FLOAT_DTYPES = ("torch.bfloat16", "torch.float16", "torch.float32")

logger = logging.getLogger("vllm.gemma4_quant")
_warned = False


# --------------------------------------------------------------------- detection


_CPU_BRANCH = "current_platform.is_cpu()"
_CPU_GPTQ_DISPATCH = (
    "if current_platform.is_cpu() and is_gptq:\n"
    "    return self.apply_cpu_w4a16_quant_layer(layer, prefix)"
)
_LINEAR_ONLY = "isinstance(layer, (LinearBase, ParallelLMHead))"
_MOE_UNQUANTIZED_DEFAULT = (
    "if quant_method is None:\n    quant_method = UnquantizedFusedMoEMethod(self.moe_config)"
)


def inc_cpu_experts_unquantized(
    scheme_text: str | None = None, old_text: str | None = None
) -> tuple[bool | None, str]:
    """Whether vLLM's INC config builds MoE experts unquantized on CPU, read from its code.

    True: one of the known forms (0.19: every quantized layer refused on CPU, where the
    fallback gives the experts no method); False: the 0.33 form (experts quantized
    through ``INCWNA16MoEScheme``); None: code the rules do not know.
    """
    if scheme_text is None and old_text is None:
        scheme_text = vllm_source(_INC_SCHEME_FILE)
        old_text = vllm_source(_INC_OLD_FILE)
    if scheme_text:
        method = vllm_code.find_function(scheme_text, "INCWna16Scheme.get_moe_method")
        if method is None:
            return None, "INCWna16Scheme has no get_moe_method"
        if any(_returns_unquantized_moe(node) for node in ast.walk(method)):
            return True, "INC get_moe_method builds experts unquantized on CPU"
        if not any(vllm_code.calls(method, "is_cpu")) and any(
            vllm_code.calls(method, "INCWNA16MoEScheme")
        ):
            return False, "INC builds MoE experts quantized on CPU too"
        return None, "unknown INCWna16Scheme.get_moe_method"
    config = vllm_code.find_class(old_text, "INCConfig")
    method = vllm_code.find_function(old_text, "INCConfig.apply_cpu_w4a16_quant_layer")
    if method is not None:
        moe = any(
            vllm_code.has_code(vllm_code.parse(text), _MOE_UNQUANTIZED_DEFAULT)
            for text in map(vllm_source, _FUSED_MOE_FILES)
            if text
        )
        if _linear_only(method) and vllm_code.has_code(config, _CPU_GPTQ_DISPATCH) and moe:
            return True, "INC's CPU path quantizes linear layers only; FusedMoE falls back"
        return None, "unknown INCConfig.apply_cpu_w4a16_quant_layer"
    if cpu_refuses_every_layer(old_text):
        return True, (
            "INC refuses every quantized layer on CPU; with dequant_fallback's INC methods "
            "FusedMoE falls back"
        )
    return None, "no INC quantization config found"


def _returns_unquantized_moe(node: ast.AST) -> bool:
    """``if current_platform.is_cpu(): ... return UnquantizedFusedMoEMethod(...)`` (0.24 -
    0.26: ``if current_platform.is_xpu() or current_platform.is_cpu():``)."""
    return (
        isinstance(node, ast.If)
        and _is_cpu_test(node.test)
        and any(
            isinstance(statement, ast.Return)
            and isinstance(statement.value, ast.Call)
            and vllm_code.call_name(statement.value) == "UnquantizedFusedMoEMethod"
            for statement in node.body
        )
    )


def _is_cpu_test(test: ast.AST) -> bool:
    """``current_platform.is_cpu()``, alone or as one alternative of an ``or``."""
    if vllm_code.is_code(test, _CPU_BRANCH):
        return True
    return (
        isinstance(test, ast.BoolOp)
        and isinstance(test.op, ast.Or)
        and any(vllm_code.is_code(value, _CPU_BRANCH) for value in test.values)
    )


def _linear_only(method: ast.AST) -> bool:
    """The method ends ``if isinstance(layer, (LinearBase, ParallelLMHead)): return ...``
    then ``return None``: every other layer, MoE experts included, gets no method."""
    body = getattr(method, "body", [])
    if len(body) < 2:
        return False
    last, branch = body[-1], body[-2]
    return (
        vllm_code.is_code(last, "return None")
        and isinstance(branch, ast.If)
        and not branch.orelse
        and vllm_code.is_code(branch.test, _LINEAR_ONLY)
    )


def detect() -> Detection:
    if vllm_code.find_class(vllm_source(_MODEL_FILE), "Gemma4ForCausalLM") is None:
        return Detection.unrecognized(f"no Gemma4ForCausalLM in vllm/{_MODEL_FILE}")
    unquantized, why = inc_cpu_experts_unquantized()
    if unquantized is None:
        return Detection.unrecognized(why)
    if not unquantized:
        return Detection.not_needed(why)
    return Detection.needed(f"{why}: dequantize streamed GPTQ experts there")


def apply(detection: Detection) -> None:
    add_stream_stage(("inc",))


# The quantization configs (by vLLM's name) whose unquantized experts the stage
# dequantizes: INC's (this patch), GPTQ's (dequant_fallback, which builds them unquantized
# where no MoE kernel takes them). Each patch adds its own, so that leaving one patch out
# leaves its configs alone.
_CONFIGS: set[str] = set()


def add_stream_stage(configs: Iterable[str]) -> None:
    """Dequantize streamed GPTQ experts wherever the model being loaded, quantized with
    one of ``configs``, built them unquantized."""
    from . import load_stream

    _CONFIGS.update(configs)
    load_stream.add_stage("dequantize", stream_stage)


def stream_stage(model: torch.nn.Module, weights: Iterable, _state: dict) -> Iterable:
    plan = ExpertPlan.from_model(model)
    if plan is None or plan.config not in _CONFIGS:
        return weights
    return dequantize_stream(weights, plan)


# --------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class FloatExperts:
    """One layer's experts as vLLM built them: float, unquantized."""

    module: str
    num_experts: int
    hidden: int
    intermediate: int  # the whole projection (before tensor parallel sharding)
    dtype: torch.dtype

    def out_in(self, proj: str) -> tuple[int, int]:
        if proj == "down_proj":
            return self.hidden, self.intermediate
        return self.intermediate, self.hidden


@dataclass
class ExpertPlan:
    """Which layers' experts take dequantized GPTQ tensors, and how they are packed."""

    layers: dict[int, FloatExperts]
    bits: int
    packed_bytes: int = 0
    dequantized_bytes: int = 0
    config: str = "inc"  # the quantization config's name (why the experts are float)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> ExpertPlan | None:
        quant_config = getattr(model, "quant_config", None)
        bits = gptq_bits(quant_config)
        if bits is None:
            return None
        layers: dict[int, FloatExperts] = {}
        for name, module in model.named_modules():
            experts = _float_experts(name, module)
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
            if experts is not None and match is not None:
                layers[int(match.group(1))] = experts
        if not layers:
            return None
        plan = cls(layers, bits, config=quant_config.get_name())
        for experts in layers.values():
            numel = 3 * experts.num_experts * experts.hidden * experts.intermediate
            plan.dequantized_bytes += numel * experts.dtype.itemsize
            plan.packed_bytes += numel * bits // 8
        return plan


# vLLM's GPTQ configs (GPTQ-packed by definition)
GPTQ_CONFIGS = ("gptq", "gptq_marlin", "auto_gptq")


def gptq_bits(quant_config: object) -> int | None:
    """Bits of a GPTQ config, or of an INC (AutoRound) config with GPTQ packing; None for
    any other config."""
    if quant_config is None:
        return None
    try:
        name = quant_config.get_name()  # type: ignore[attr-defined]
    except Exception:
        return None
    bits = getattr(quant_config, "weight_bits", None)
    if name in GPTQ_CONFIGS:
        return int(bits) if bits in (2, 4, 8) else None
    if name != "inc":
        return None
    formats = (
        f"{getattr(quant_config, 'packing_format', '')} {getattr(quant_config, 'backend', '')}"
    )
    if "gptq" not in formats or getattr(quant_config, "data_type", "int") != "int":
        return None
    if bits not in (2, 4, 8):
        logger.warning(
            "gemma4_quant: %s-bit AutoRound experts are not dequantized (2, 4 and 8 bits are)",
            bits,
        )
        return None
    return int(bits)


def _float_experts(name: str, module: torch.nn.Module) -> FloatExperts | None:
    """The experts of ``module`` if vLLM built them unquantized (float w13/w2 weights)."""
    params = module._parameters
    w13, w2 = params.get("w13_weight"), params.get("w2_weight")
    if w13 is None or w2 is None or w13.dim() != 3 or w2.dim() != 3:
        return None
    if str(w13.dtype) not in _FLOAT_DTYPES or w2.dtype != w13.dtype:
        return None  # fp8 experts, or another method's buffers
    moe_config = getattr(module, "moe_config", None)
    tp_size = int(getattr(moe_config, "tp_size", 1) or 1)
    hidden, part = int(w2.shape[1]), int(w2.shape[2])
    if w13.shape[2] != hidden or w13.shape[1] != 2 * part:
        logger.info(
            "gemma4_quant: experts %s have w13_weight %s and w2_weight %s, a layout the "
            "GPTQ dequantization does not know; left as vLLM loads them",
            name,
            tuple(w13.shape),
            tuple(w2.shape),
        )
        return None
    num_experts = int(getattr(module, "global_num_experts", 0) or w13.shape[0])
    return FloatExperts(name, num_experts, hidden, part * tp_size, w13.dtype)


# --------------------------------------------------------------------- the stream


@dataclass
class _Pending:
    tensors: dict[str, tuple[str, torch.Tensor]] = field(default_factory=dict)


def dequantize_stream(
    weights: Iterable[tuple[str, torch.Tensor]], plan: ExpertPlan
) -> Iterator[tuple[str, torch.Tensor]]:
    """``weights`` with the GPTQ expert tensors of ``plan``'s layers replaced by their
    dequantized ``.weight``; everything else passes through in order."""
    pending: dict[tuple[int, int, str], _Pending] = {}
    done: dict[tuple[int, int, str], str] = {}  # -> the emitted name (g_idx may follow)
    prefixes: dict[int, str] = {}
    for name, tensor in weights:
        match = _GPTQ.match(name)
        experts = plan.layers.get(int(match["layer"])) if match else None
        if match is None or experts is None:
            yield name, tensor
            continue
        layer, expert, proj, suffix = (
            int(match["layer"]),
            int(match["expert"]),
            match["proj"],
            match["suffix"],
        )
        prefixes.setdefault(layer, match["pre"])
        key = (layer, expert, proj)
        if expert >= experts.num_experts:
            raise ValueError(
                f"Checkpoint tensor {name!r}: expert {expert}, but {experts.module} has "
                f"{experts.num_experts} experts"
            )
        if key in done:
            _check_late(name, suffix, tensor, key, done[key], experts, plan.bits)
            continue
        entry = pending.setdefault(key, _Pending())
        if suffix in entry.tensors:
            raise ValueError(f"Checkpoint tensor {name!r} appears twice")
        _check_shape(name, suffix, tensor, experts.out_in(proj), plan.bits, entry)
        entry.tensors[suffix] = (name, tensor)
        if not all(s in entry.tensors for s in _REQUIRED):
            continue
        del pending[key]
        weight = _dequantize_entry(entry, experts, proj, plan.bits)
        _warn_once(plan)
        out_name = f"{match['pre']}.{expert}.{proj}.weight"
        done[key] = out_name
        yield out_name, weight
    _check_complete(pending, done, plan, prefixes)


def _expected(
    suffix: str, out_in: tuple[int, int], bits: int, groups: int | None
) -> tuple[int, ...] | None:
    out, inp = out_in
    pack = 32 // bits
    if suffix == "qweight":
        return (inp // pack, out)
    if suffix == "g_idx":
        return (inp,)
    if groups is None:
        return None
    if suffix == "scales":
        return (groups, out)
    return (groups, out // pack)  # qzeros


def _groups(entry: _Pending) -> int | None:
    """The group count the projection's scales or qzeros already fixed."""
    for suffix in ("scales", "qzeros"):
        if suffix in entry.tensors:
            return int(entry.tensors[suffix][1].shape[0])
    return None


def _check_shape(
    name: str,
    suffix: str,
    tensor: torch.Tensor,
    out_in: tuple[int, int],
    bits: int,
    entry: _Pending,
) -> None:
    import torch

    out, inp = out_in
    pack = 32 // bits
    groups = _groups(entry)
    if groups is None and suffix in ("scales", "qzeros") and tensor.dim() == 2:
        groups = int(tensor.shape[0])
    expected = _expected(suffix, out_in, bits, groups)
    layout = (
        f"GPTQ {bits}-bit [in/{pack}, out] for an expert weight [out, in] = [{out}, {inp}] "
        "of the expert parameters"
    )
    if groups is not None and (groups < 1 or inp % groups):
        raise ValueError(
            f"Checkpoint tensor {name!r} has shape {tuple(tensor.shape)}: {groups} groups "
            f"do not divide the input size {inp} ({layout})"
        )
    if out % pack:
        raise ValueError(f"{name!r}: output size {out} is not a multiple of {pack} ({layout})")
    if expected is not None and tuple(tensor.shape) != expected:
        raise ValueError(
            f"Checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected "
            f"{expected} ({layout})"
        )
    if suffix in ("qweight", "qzeros", "g_idx") and tensor.dtype != torch.int32:
        raise ValueError(f"Checkpoint tensor {name!r} is {tensor.dtype}, expected torch.int32")


def _check_late(
    name: str,
    suffix: str,
    tensor: torch.Tensor,
    key: tuple[int, int, str],
    emitted: str,
    experts: FloatExperts,
    bits: int,
) -> None:
    """A tensor of a projection already dequantized: only a trivial g_idx may come late."""
    import torch

    if suffix != "g_idx":
        raise ValueError(f"Checkpoint tensor {name!r} appears twice")
    _check_shape(name, suffix, tensor, experts.out_in(key[2]), bits, _Pending())
    inp = tensor.shape[0]
    # the trivial order is the only one the already dequantized weight can have used
    groups = int(tensor.max().item()) + 1 if inp else 1
    if torch.equal(tensor, torch.arange(inp, dtype=tensor.dtype) // (inp // groups)):
        return
    raise ValueError(
        f"Checkpoint tensor {name!r} (activation order) comes after the qweight, qzeros "
        f"and scales it reorders, which were already dequantized into {emitted!r}; this "
        "tensor order is not supported"
    )


def _dequantize_entry(entry: _Pending, experts: FloatExperts, proj: str, bits: int) -> torch.Tensor:
    tensors = {suffix: tensor for suffix, (_, tensor) in entry.tensors.items()}
    from .. import int4

    return int4.dequantize_gptq(
        tensors["qweight"],
        tensors["qzeros"],
        tensors["scales"],
        tensors.get("g_idx"),
        bits,
        experts.dtype,
    )


def _check_complete(
    pending: dict[tuple[int, int, str], _Pending],
    done: dict[tuple[int, int, str], str],
    plan: ExpertPlan,
    prefixes: dict[int, str],
) -> None:
    """Every expert of every layer that streamed GPTQ experts, complete."""
    for (layer, expert, proj), entry in sorted(pending.items()):
        have = sorted(entry.tensors)
        missing = [s for s in _REQUIRED if s not in entry.tensors]
        experts = plan.layers[layer]
        name = f"{prefixes[layer]}.{expert}.{proj}.{missing[0]}"
        expected = _expected(missing[0], experts.out_in(proj), plan.bits, _groups(entry))
        raise ValueError(
            f"Checkpoint has {', '.join(have)} of {prefixes[layer]}.{expert}.{proj} but no "
            f"{name!r} (expected shape {expected if expected else 'unknown'}); the expert "
            "cannot be dequantized"
        )
    for layer in sorted({key[0] for key in done}):
        experts = plan.layers[layer]
        for expert in range(experts.num_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                if (layer, expert, proj) not in done:
                    out, inp = experts.out_in(proj)
                    raise ValueError(
                        f"Checkpoint has no {prefixes[layer]}.{expert}.{proj}.qweight "
                        f"(expected shape {(inp // (32 // plan.bits), out)}): "
                        f"{experts.module} has {experts.num_experts} experts"
                    )


def _warn_once(plan: ExpertPlan) -> None:
    global _warned
    if _warned:
        return
    _warned = True
    dtype = next(iter(plan.layers.values())).dtype
    why = (
        "vLLM has no quantized MoE method for AutoRound (INC) experts on this platform "
        "('CPU does not support quantized MoE yet'); they are built unquantized"
        if plan.config == "inc"
        else "vLLM has no WNA16 MoE kernel for these GPTQ experts here; they are built unquantized"
    )
    logger.warning(
        "gemma4_quant: %s. Dequantizing the checkpoint's GPTQ %d-bit experts of %d layers "
        "to %s at load time: %.4f GiB of expert weights instead of %.4f GiB packed "
        "(+%.4f GiB).",
        why,
        plan.bits,
        len(plan.layers),
        str(dtype).removeprefix("torch."),
        plan.dequantized_bytes / 2**30,
        plan.packed_bytes / 2**30,
        (plan.dequantized_bytes - plan.packed_bytes) / 2**30,
    )


__all__ = ["NAME", "SUMMARY", "detect", "apply", "add_stream_stage", "dequantize_stream"]


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)
# The rule types come from gemma4_quant.doctor.core, imported inside the functions:
# every vLLM process imports this module, doctor only runs in `gemma4-quant doctor`.

if TYPE_CHECKING:
    from ..doctor.core import Ctx, Hit, Module, Rule


def doctor_rules() -> tuple[Rule, ...]:
    from ..doctor.core import Rule, Stage

    # inc_wna16_scheme.py get_moe_method / inc.py apply_cpu_w4a16_quant_layer; gemma4.py
    # load_weights: the unquantized experts have no parameter for qweight
    return (Rule("experts-built-unquantized", ("experts",), Stage.LOAD, _doctor_experts),)


def _doctor_experts(module: Module, ctx: Ctx) -> Hit | None:
    """AutoRound experts that vLLM builds unquantized on CPU: the checkpoint's GPTQ
    tensors match none of the float parameters."""
    from ..doctor.core import Hit, Outcome
    from ..doctor.rules import built_scheme, extra_bytes, first_tensor, mismatch_error

    scheme = module.scheme
    if scheme is None or built_scheme(module, ctx) is not None:
        return None
    if module.stored in ("bf16", "unknown"):
        return None
    why = (
        f"vLLM builds {module.kind} unquantized here (AutoRound MoE on CPU: 'CPU does "
        f"not support quantized MoE yet') but the checkpoint stores {module.stored}"
    )
    if (
        module.stored == "gptq"
        and scheme.bits in (2, 4, 8)
        and ctx.analysis.gptq_packed()
        and ctx.patched(NAME)
    ):
        return Hit(
            Outcome.PATCHED,
            f"{why}; the plugin dequantizes them as they stream in",
            "",
            NAME,
            extra_bytes=extra_bytes(module, scheme, ctx),
        )
    tensor = first_tensor(module, "qweight", "_packed", "weight_packed", "weight")
    return mismatch_error(module, ctx, tensor, why)

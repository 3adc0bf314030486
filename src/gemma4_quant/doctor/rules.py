"""Rules every vLLM release needs, whichever patches it takes, and their helpers.

The helpers answer what the rules (doctor's and the patches') keep asking: how vLLM
builds a module, which fused vLLM layer a checkpoint module ends up in, what this vLLM's
loader does with a tensor that matches no parameter, whether the plugin's dequantizing
fallback serves a layer vLLM has no kernel for.
"""

from __future__ import annotations

from .analysis import scheme_unmapped, shard_names
from .core import Ctx, Hit, Module, Outcome, Scheme, Stage, short_name


def config_scheme(module: Module, ctx: Ctx) -> Scheme | None:
    """What the config asks for ``module``, as this vLLM reads the config: 0.19.0's
    text-only model leaves its module lists in checkpoint names (patch text_mapper)."""
    from ..patches import text_mapper

    if text_mapper.lists_unmapped(ctx):
        return scheme_unmapped(module, ctx.analysis)
    return module.scheme


def built_scheme(module: Module, ctx: Ctx) -> Scheme | None:
    """The quantization vLLM builds ``module`` with (None: unquantized), which is not
    always what the config asks for."""
    env = ctx.env
    scheme = config_scheme(module, ctx)
    if module.kind == "router" and scheme is not None:
        if env.features.get("router_passes_quant_config") or ctx.patched("router"):
            return scheme
        return None  # Gemma4Router builds GateLinear without quant_config (D4)
    if (
        module.kind == "experts"
        and scheme is not None
        and scheme.method == "auto-round"
        and env.platform == "cpu"
        and (env.features.get("inc_cpu_moe_unquantized") or _inc_experts_routed(ctx))
    ):
        return None  # "CPU does not support quantized MoE yet"
    return scheme


def _inc_experts_routed(ctx: Ctx) -> bool:
    """0.19 with the plugin: INC refuses every quantized layer on CPU, and the fallback
    gives the experts no method, as 0.20+ do (dequant_fallback/inc.py)."""
    from ..patches import dequant_fallback
    from ..patches.dequant_fallback import inc

    found = dequant_fallback.detect().findings
    return (
        found is not None
        and found.inc_cpu == inc.GENERATION_REFUSES
        and ctx.patched(dequant_fallback.NAME)
        and ctx.env.fallback_mode != "off"
    )


def is_wna16(scheme: Scheme | None) -> bool:
    return scheme is not None and scheme.weight_type == "int" and scheme.activations is None


def group_size(scheme: Scheme) -> int:
    return scheme.group_size if scheme.group_size and scheme.group_size > 0 else -1


def vllm_layer(module: Module, ctx: Ctx) -> tuple[str, list[Module]]:
    """The vLLM layer ``module`` ends up in and the checkpoint modules fused into it."""
    shards = set(shard_names(module, ctx.analysis))
    members = [m for m in ctx.analysis.modules if m.name in shards] or [module]
    parent = module.name.rpartition(".")[0]
    if len(members) > 1:
        fused = "qkv_proj" if module.kind == "attention" else "gate_up_proj"
        return f"{parent}.{fused}", members
    return module.name, members


def is_representative(module: Module, ctx: Ctx) -> bool:
    """Kernel rules look at each vLLM layer once (q_proj stands for qkv_proj)."""
    _, members = vllm_layer(module, ctx)
    return members[0] is module


def partition_shape(module: Module, ctx: Ctx) -> tuple[int, int, int] | None:
    """(K per partition, N per partition, K) of the vLLM layer ``module`` belongs to."""
    _, members = vllm_layer(module, ctx)
    if any(m.in_features is None or m.out_features is None for m in members):
        return None
    k = members[0].in_features or 0
    n = sum(m.out_features or 0 for m in members)
    tp = ctx.env.tensor_parallel
    leaf = module.name.rpartition(".")[2]
    if module.kind == "router" or leaf.startswith("per_layer_"):
        return k, n, k  # replicated (the layers' per-layer gate and projection)
    if leaf in ("o_proj", "down_proj"):  # row parallel: K is split
        return k // tp, n, k
    if module.kind == "attention" and len(members) > 1:
        # QKVParallelLinear: key/value heads fewer than ranks are replicated, one per rank
        heads = int(ctx.analysis.text_config.get("num_attention_heads") or 1)
        q_rows = members[0].out_features or 0
        head_dim = q_rows // heads
        kv = [max((m.out_features or 0) // tp, head_dim) for m in members[1:]]
        return k, q_rows // tp + sum(kv), k
    return k, n // tp, k  # column parallel: N is split


def mismatch_error(module: Module, ctx: Ctx, tensor: str, why: str) -> Hit:
    """What this vLLM's loader does with a checkpoint tensor that matches no parameter
    (or a parameter no tensor fills)."""
    env = ctx.env
    if env.generation is None:
        return Hit(Outcome.UNKNOWN, f"{why}; this vLLM's Gemma 4 loader is not one the rules know")
    if env.silent_skip:
        if ctx.patched("load_guard"):
            return Hit(
                Outcome.FAILS,
                f"{why}; the load guard stops the load (vLLM 0.24 - 0.30 would skip the "
                "tensor silently)",
                f"ValueError: Gemma 4 checkpoint left parameter(s) of {module.short} unloaded",
            )
        return Hit(
            Outcome.SILENTLY_WRONG,
            f"{why}; vLLM 0.24 - 0.30 skip the unmatched name without a word and the "
            "parameter keeps uninitialized memory",
            f"{tensor} is dropped",
        )
    if env.generation == "generic":
        error = "AttributeError" if module.kind == "experts" else "ValueError"
        return Hit(Outcome.FAILS, why, f"{error}: no parameter for {_vllm_param(tensor, ctx)!r}")
    return Hit(Outcome.FAILS, why, f"KeyError: {_vllm_param(tensor, ctx)!r}")


def _vllm_param(name: str, ctx: Ctx) -> str:
    """Gemma4Model.load_weights' view of a checkpoint name (its errors show this one):
    before the 0.31 loader, experts live under ``moe.experts``."""
    short = short_name(name)
    if ctx.env.generation in ("dotted", "underscore"):  # 0.19.0's has no such rename
        short = short.replace(".experts.", ".moe.experts.")
    return short


def first_tensor(module: Module, *suffixes: str) -> str:
    """The first of the module's checkpoint tensors vLLM meets with one of ``suffixes``."""
    return next((n for n in sorted(module.tensors) if n.endswith(suffixes)), module.name)


# -- load stage: checkpoint names vs parameters


# -- weight loading: checkpoint names vs parameters


def check_config_vs_checkpoint(module: Module, ctx: Ctx) -> Hit | None:
    """vLLM builds each layer from the config; the checkpoint must store it that way."""
    built = built_scheme(module, ctx)
    if built is None and config_scheme(module, ctx) is not None:
        # the config quantizes it, vLLM does not: the router rule (patch router) and the
        # unquantized-experts rule (patch unquantized_experts) speak for these
        return None
    if module.stored == "unknown":
        return None
    expected = built.storage if built is not None else "bf16"
    if built is not None and built.weight_type == "unknown":
        return None
    if expected == module.stored:
        return None
    if built is None:
        why = (
            f"the config leaves {module.kind} unquantized ({module.scheme_note}) but the "
            f"checkpoint stores {module.stored}"
        )
    else:
        why = (
            f"the config quantizes {module.kind} ({built.describe()}, {module.scheme_note}) "
            f"but the checkpoint stores {module.stored}"
        )
    tensor = first_tensor(module, "qweight", "_packed", "weight_packed", "weight")
    return mismatch_error(module, ctx, tensor, why)


# -- model construction: quantization methods and kernels


def check_shard_schemes(module: Module, ctx: Ctx) -> Hit | None:
    if not module.shard_conflict or not is_representative(module, ctx):
        return None
    layer, _ = vllm_layer(module, ctx)
    if module.kind == "experts":
        error = "ValueError: All MoE projections need to have same quantization scheme"
    else:
        error = f"ValueError: Found different quantization schemes for the shards of {layer}"
    return Hit(
        Outcome.FAILS,
        "shards vLLM fuses into one layer are quantized differently",
        f"{module.shard_conflict}: {error}",
    )


def check_tp_groups(module: Module, ctx: Ctx) -> Hit | None:
    """Tensor parallel cuts every rank's share of a row-parallel weight (o_proj,
    down_proj, the experts' down_proj) out of the input dim; quantization groups run
    along it, so the share must hold whole groups (and an asymmetric expert's gate/up rows
    whole packed zero-point words). vLLM meets this when it creates the weights, after
    it has chosen the layer's kernel (the kernel rules come first)."""
    tp = ctx.env.tensor_parallel
    scheme = built_scheme(module, ctx)
    if tp == 1 or not is_wna16(scheme) or not is_representative(module, ctx):
        return None
    group = group_size(scheme)
    if module.kind == "experts":
        return _tp_split_experts(module, scheme, ctx)
    shape = partition_shape(module, ctx)
    leaf = module.name.rpartition(".")[2]
    if shape is None or group == -1 or leaf not in ("o_proj", "down_proj"):
        return None
    k, _, k_full = shape
    if k % group == 0:
        return None
    layer, _ = vllm_layer(module, ctx)
    error = (
        "ValueError: Weight input_size_per_partition ... is not divisible by group_size"
        if ctx.env.features.get("linear_tp_group_error")
        else "AssertionError (input_size_per_partition % group_size)"
    )
    return Hit(
        Outcome.FAILS,
        "a row-parallel linear does not shard into whole groups (vLLM refuses it; the "
        "plugin's fallback does not cover linears split this way)",
        f"{short_name(layer)}: K {k_full} / TP {tp} = {k} per rank = {k / group:g} groups "
        f"of {group}: {error}",
    )


def _tp_split_experts(module: Module, scheme: Scheme, ctx: Ctx) -> Hit | None:
    """The experts' intermediate dim per rank against the group size: vLLM 0.30+ refuses
    a split group, earlier releases load the wrong scale groups; the plugin's fallback
    loads each rank's groups whole and dequantizes its columns."""
    tp, group = ctx.env.tensor_parallel, group_size(scheme)
    inter = int(ctx.analysis.text_config.get("moe_intermediate_size") or 0)
    per_rank = inter // tp
    if group == -1 or per_rank % group == 0:
        return None
    where = (
        f"expert intermediate {inter} / TP {tp} = {per_rank} per rank = "
        f"{per_rank / group:g} groups of {group}"
    )
    from ..patches.dequant_fallback.moe import GroupWindow

    refusal = fallback_refusal(scheme, ctx, linear=False) or GroupWindow.refusal(
        per_rank, scheme.bits or 4
    )
    if refusal is None:
        return Hit(
            Outcome.PATCHED,
            "experts do not shard into whole groups: the plugin's fallback dequantizes "
            "them at load, each rank from the whole scale groups its columns lie in "
            "(with expert parallel, --enable-expert-parallel, each rank holds whole experts "
            "and they stay quantized)",
            where,
            "dequant_fallback",
            extra_bytes=extra_bytes(module, scheme, ctx),
        )
    fix = "needs expert parallel (--enable-expert-parallel: each rank holds whole experts)"
    if ctx.env.plugin:
        fix += f"; fallback: {refusal}"
    if ctx.env.features.get("moe_tp_group_check"):
        return Hit(
            Outcome.FAILS,
            f"experts do not shard into whole groups: {fix}",
            f"{where}: ValueError: CompressedTensors WNA16 MoE with static group scales "
            "requires the MoE intermediate size per tensor-parallel partition to be "
            "divisible by group_size",
        )
    return Hit(
        Outcome.SILENTLY_WRONG,
        f"experts do not shard into whole groups and this vLLM does not check: every "
        f"rank loads {per_rank // group} scale group(s) from group rank * "
        f"{per_rank // group}, the wrong ones for its columns; {fix}",
        where,
    )


def check_platform_known(module: Module, ctx: Ctx) -> Hit | None:
    """Kernel rules exist for CPU and CUDA, and for int weights; say so otherwise."""
    scheme = built_scheme(module, ctx)
    if scheme is None or not is_representative(module, ctx):
        return None
    if ctx.env.platform not in ("cpu", "cuda"):
        return Hit(Outcome.UNKNOWN, f"kernels on platform {ctx.env.platform} are not modelled")
    if scheme.weight_type == "unknown":
        return Hit(Outcome.UNKNOWN, f"{module.scheme_note}")
    if ctx.env.platform == "cpu" and scheme.method == "modelopt" and scheme.storage == "nvfp4":
        return None  # kernels_cpu.check_modelopt_nvfp4_cpu
    modelled = ("fp8", "nvfp4") if ctx.env.platform == "cpu" else ("fp8",)
    if not is_wna16(scheme) and scheme.storage not in modelled:
        return Hit(Outcome.UNKNOWN, f"kernels for {scheme.describe()} are not modelled")
    return None


# The rules, in the order vLLM meets them within a stage. Every rule comes from the facts
# files (docs/facts/: vllm-releases.md, cpu-vllm.md, checkpoint-layouts.md) or from the release code


# -- the plugin's dequantizing fallback (patch dequant_fallback)


def extra_bytes(module: Module, scheme: Scheme, ctx: Ctx) -> int:
    """What dequantizing ``module`` to the model dtype adds to its packed weights."""
    if module.kind == "experts":
        text = ctx.analysis.text_config
        experts = int(text.get("num_experts") or 0)
        numel = experts * 3 * int(module.out_features or 0) * int(module.in_features or 0)
    else:
        _, members = vllm_layer(module, ctx)
        numel = sum((m.in_features or 0) * (m.out_features or 0) for m in members)
    itemsize = 4 if "float32" in ctx.analysis.dtype else 2
    return int(numel * (itemsize - (scheme.bits or 4) / 8))


def served_by_fallback(
    module: Module,
    scheme: Scheme,
    ctx: Ctx,
    linear: bool,
    message: str,
    error: str,
    stage: Stage | None = None,
) -> Hit:
    """The plugin's fallback dequantizes the layer, or vLLM's own failure (``error``, at
    ``stage`` if not the rule's) stands, with why the fallback does not serve it."""
    refusal = fallback_refusal(scheme, ctx, linear)
    if refusal is None:
        return Hit(
            Outcome.PATCHED,
            f"{message}; the plugin's fallback dequantizes it at load",
            "",
            "dequant_fallback",
            extra_bytes=extra_bytes(module, scheme, ctx),
        )
    if ctx.env.plugin:
        error = f"{error} (fallback: {refusal})"
    return Hit(Outcome.NO_KERNEL, message, error, stage=stage)


def forced(module: Module, scheme: Scheme, ctx: Ctx, linear: bool) -> Hit | None:
    """GEMMA4_QUANT_FALLBACK=force dequantizes even where vLLM has a kernel."""
    if ctx.env.fallback_mode != "force" or fallback_refusal(scheme, ctx, linear) is not None:
        return None
    return Hit(
        Outcome.PATCHED,
        "GEMMA4_QUANT_FALLBACK=force: dequantized at load although vLLM has a kernel",
        "",
        "dequant_fallback",
        extra_bytes=extra_bytes(module, scheme, ctx),
    )


def fallback_refusal(scheme: Scheme, ctx: Ctx, linear: bool) -> str | None:
    """Why the plugin's dequantizing fallback will not serve a layer (None: it will): the
    patch itself says what it covers."""
    from ..patches import dequant_fallback

    return dequant_fallback.fallback_refusal(scheme, ctx, linear)

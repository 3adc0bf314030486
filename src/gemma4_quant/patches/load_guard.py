"""Loading a Gemma 4 checkpoint never ends with a parameter that no tensor filled.

Why:
    On vLLM 0.24 - 0.30 ``Gemma4Model.load_weights`` skips every checkpoint tensor whose
    name matches no parameter (``if name not in params_dict: continue``), and vLLM's own
    "weights not initialized" check is off for quantized models (unless
    ``--model-loader-extra-config '{"enable_weights_track": true}'``). A quantized router
    (``router.proj.qweight``) is then dropped without a word, the router keeps
    uninitialized memory, and the model serves garbage (defect D4's silent case).

How:
    ``Gemma4ForCausalLM.load_weights`` is wrapped: the checkpoint names are recorded as
    they stream past (names only, no tensors), and once vLLM's loader returns the set of
    parameters it filled, every parameter left unfilled raises a ValueError that names
    the parameters and the checkpoint tensors of the same modules that matched nothing.
    Parameters that quantization methods create as optional (``g_idx``, sort indices,
    input and KV-cache scales, ``weight_shape`` metadata) are not required. The cost is
    one set difference after loading.

Upstream PR:
    None yet: vLLM 0.31 rewrote the loader (#55911) and raises on unmatched names.

Releases:
    0.24.0 - 0.30.0: detected by the silent ``continue`` in ``Gemma4Model.load_weights``.

Removal:
    When 0.30 is no longer supported.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .. import vllm_code
from . import Detection, vllm_source

NAME = "load_guard"
SUMMARY = "fail loudly where vLLM 0.24 - 0.30 silently skips unmatched Gemma 4 tensors"

_MODEL_FILE = "model_executor/models/gemma4.py"
# Parameters that quantization methods create whether or not a checkpoint has them:
# activation-order indices, activation and KV-cache scales/zero points, and the
# compressed-tensors `weight_shape` metadata (fused checkpoints carry none; no kernel reads it).
_OPTIONAL = re.compile(
    r"(g_idx|g_idx_sort_indices|input_scale|input_global_scale|[kqv]_scale|[kqv]_zero_point"
    r"|prob_scale|weight_shape|_bias)$"
)


def detect() -> Detection:
    text = vllm_source(_MODEL_FILE)
    if vllm_code.find_class(text, "Gemma4Model") is None:
        return Detection.unrecognized(f"no Gemma4Model in vllm/{_MODEL_FILE}")
    load_weights = vllm_code.find_function(text, "Gemma4Model.load_weights")
    if load_weights is None:
        return Detection.unrecognized("Gemma4Model has no load_weights")
    if any(_is_silent_skip(node) for node in ast.walk(load_weights)):
        return Detection.needed("Gemma4Model.load_weights skips unmatched names silently")
    if any(vllm_code.calls(load_weights, "AutoWeightsLoader")):
        return Detection.not_needed("AutoWeightsLoader rejects unmatched names")
    if any(_indexes_params_by_name(node) for node in ast.walk(load_weights)):
        return Detection.not_needed("unmatched names are not skipped silently")
    return Detection.unrecognized("Gemma4Model.load_weights neither skips nor rejects names")


def _is_silent_skip(node: ast.AST) -> bool:
    """``if name not in params_dict: continue``, however it is written."""
    if not isinstance(node, ast.If) or node.orelse:
        return False
    test = node.test
    return (
        isinstance(test, ast.Compare)
        and vllm_code.is_name(test.left, "name")
        and len(test.ops) == 1
        and isinstance(test.ops[0], ast.NotIn)
        and vllm_code.is_name(test.comparators[0], "params_dict")
        and len(node.body) == 1
        and isinstance(node.body[0], ast.Continue)
    )


def _indexes_params_by_name(node: ast.AST) -> bool:
    """``params_dict[name]``: an unmatched name raises KeyError."""
    return (
        isinstance(node, ast.Subscript)
        and vllm_code.is_name(node.value, "params_dict")
        and vllm_code.is_name(node.slice, "name")
    )


def apply(detection: Detection) -> None:
    from . import load_stream

    def record(_model, weights, state: dict) -> Iterable:
        return _record(weights, state.setdefault(NAME, []))

    def check(model: torch.nn.Module, loaded: set[str], state: dict) -> None:
        check_all_loaded(model, loaded, state.get(NAME, []))

    load_stream.add_stage("record", record)
    load_stream.add_check(NAME, check)


def _record(
    weights: Iterable[tuple[str, torch.Tensor]], seen: list[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        seen.append(name)
        yield name, tensor


def check_all_loaded(model: torch.nn.Module, loaded: set[str], seen: list[str]) -> None:
    missing = sorted(
        name
        for name, _ in model.named_parameters()
        if name not in loaded and not _OPTIONAL.search(name)
    )
    if not missing:
        return
    modules = {name.rsplit(".", 1)[0] for name in missing}
    unmatched = sorted(
        name for name in seen if any(_same_module(name, module) for module in modules)
    )
    raise ValueError(
        f"Gemma 4 checkpoint left {len(missing)} parameter(s) unloaded: "
        f"{_head(missing)}. Checkpoint tensors of those modules that matched no "
        f"parameter: {_head(unmatched) or 'none'}. vLLM would have run with "
        "uninitialized weights; the checkpoint's layout is not one this vLLM loads."
    )


def _same_module(checkpoint_name: str, module: str) -> bool:
    # model.layers.0.router.proj vs model.language_model.layers.0.router.proj.qweight
    tail = module.split("layers.", 1)[-1]
    return f"layers.{tail}." in checkpoint_name


def _head(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)


def doctor_rules() -> tuple[()]:
    # Stock 0.24 - 0.30 skip a tensor that matches no parameter: every doctor rule that
    # finds such a tensor says so through doctor.rules.mismatch_error(), which predicts
    # this patch's ValueError where it is applied; no failure is this patch's alone.
    return ()

"""Keep every field when vLLM merges the KV cache specs of a layer group.

Why
---
vLLM groups attention layers for the KV cache manager and merges the specs of a
group with ``FullAttentionSpec.merge`` (and ``SinkFullAttentionSpec.merge``). Both
build the merged spec field by field, so a field they do not list falls back to
its default. Upstream PR #39582 moves ``cache_dtype_str`` (the ``--kv-cache-dtype``
string) from ``MLAAttentionSpec`` up to ``AttentionSpec``; on a build with that
field and these merges, the merged spec says ``cache_dtype_str=None`` and the
merge's own field check then fails (``None != 'fp8'``), so a hybrid
sliding/full-attention model such as Gemma 4 with an fp8 KV cache cannot start
(defect D3). On the stock releases only the MLA specs have the field, which they
merge themselves: nothing is dropped, and this patch stays off.

How
---
``detect()`` reads ``vllm/v1/kv_cache_interface.py`` first: where ``FullAttentionSpec``
(and the bases beside it) declare no ``cache_dtype_str``, nothing can be dropped, and it
says so without importing the module. Otherwise (or once the module is imported) it
looks at the imported ``vllm.v1.kv_cache_interface``: it needs
``FullAttentionSpec.merge`` (and ``SinkFullAttentionSpec.merge`` where that class
exists); when ``FullAttentionSpec`` has a ``cache_dtype_str`` field it merges two
small specs carrying it and reports NEEDED if the field is lost or the merge
fails. ``apply()`` replaces the ``merge`` classmethods of those two classes
(class attributes are looked up at call time, so the modules that imported the
classes by name see the change) with one that builds the merged spec from
``specs[0]`` with every field kept, merges the window sizes and causality as
vLLM does, and names the field when specs disagree. Idempotent.

Upstream PR
-----------
vLLM #39582 (open) adds the field with the field-by-field merges. The patch
series in ``upstream/v0.33.0`` of this project (``0002``) adds it together with
merges built by ``dataclasses.replace(specs[0], ...)``.

Releases
--------
Not needed on any stock release 0.19.0 - 0.33.0 (``cache_dtype_str`` only on
the MLA specs). Needed on builds that carry #39582 as proposed.

Removal
-------
Drop this module once upstream merges a ``replace``-based merge (``detect()``
then reports NOT_NEEDED by itself) or drops the field-by-field merge proposal.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import sys
from types import ModuleType
from typing import Any

from . import Detection, vllm_source

NAME = "kv_spec_merge"
SUMMARY = (
    "FullAttentionSpec/SinkFullAttentionSpec.merge keep every field "
    "(cache_dtype_str) on builds that add it to AttentionSpec"
)

logger = logging.getLogger("vllm.gemma4_quant")

FIELD = "cache_dtype_str"
_INTERFACE = "vllm.v1.kv_cache_interface"
_INTERFACE_FILE = "v1/kv_cache_interface.py"
_MARK = "_gemma4_quant_keeps_fields"
# Fields that merge combines over the group instead of taking from specs[0].
_MERGED_FIELDS = ("sliding_window", "attention_chunk_size", "non_causal")
# Values for the required fields of a probe spec.
_PROBE_VALUES: dict[str, Any] = {"block_size": 16, "num_kv_heads": 1, "head_size": 8}


def _interface() -> ModuleType | None:
    try:
        from vllm.v1 import kv_cache_interface
    except ImportError:
        return None
    return kv_cache_interface


def _merge_of(cls: type) -> Any:
    """The ``merge`` attribute ``cls`` resolves to, as stored in its class body."""
    for klass in cls.__mro__:
        if "merge" in vars(klass):
            return vars(klass)["merge"]
    return None


def _targets(kvi: ModuleType) -> list[type]:
    """The spec classes whose merge this patch replaces: FullAttentionSpec, and
    SinkFullAttentionSpec where it has a merge of its own."""
    full = kvi.FullAttentionSpec
    targets = [full]
    sink = getattr(kvi, "SinkFullAttentionSpec", None)
    if isinstance(sink, type) and _merge_of(sink) is not _merge_of(full):
        targets.append(sink)
    return targets


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _probe_spec(cls: type, **values: Any) -> Any:
    import torch

    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in values:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if f.name == "dtype":
                kwargs[f.name] = torch.float16
            elif f.name in _PROBE_VALUES:
                kwargs[f.name] = _PROBE_VALUES[f.name]
            else:
                raise TypeError(f"{cls.__name__} requires unknown field {f.name!r}")
    return cls(**kwargs, **values)


def _drops_field(cls: type) -> str | None:
    """Why ``cls.merge`` loses ``cache_dtype_str``, or None if it keeps it."""
    specs = [_probe_spec(cls, **{FIELD: "fp8"}) for _ in range(2)]
    try:
        merged = cls.merge(specs)
    except AssertionError as exc:
        return f"{cls.__name__}.merge fails on {FIELD}={'fp8'!r}: {exc}"
    value = getattr(merged, FIELD, None)
    if value != "fp8":
        return f"{cls.__name__}.merge turns {FIELD}='fp8' into {value!r}"
    return None


def _source_has_no_field() -> bool:
    """Whether the installed ``kv_cache_interface.py`` gives ``FullAttentionSpec`` (its
    class and the bases defined beside it) no ``cache_dtype_str`` field, read without
    importing it: importing it pulls in vLLM's config on some releases (0.19: seconds of
    every process's start), and on the stock releases the answer is already known."""
    from .. import vllm_code

    tree = vllm_code.parse(vllm_source(_INTERFACE_FILE) or "")
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)} if tree else {}
    chain, seen = ["FullAttentionSpec"], set()
    while chain:
        name = chain.pop()
        node = classes.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        for statement in node.body:
            target = getattr(statement, "target", None)
            if isinstance(statement, ast.AnnAssign) and vllm_code.is_name(target, FIELD):
                return False
        chain += [base.id for base in node.bases if isinstance(base, ast.Name)]
    return "FullAttentionSpec" in seen and vllm_code.defines(classes["FullAttentionSpec"], "merge")


def detect() -> Detection:
    if _INTERFACE not in sys.modules and _source_has_no_field():
        return Detection.not_needed(
            f"FullAttentionSpec has no {FIELD} (only MLA specs do): nothing to drop"
        )
    kvi = _interface()
    if kvi is None:
        return Detection.unrecognized("no vllm.v1.kv_cache_interface")
    full = getattr(kvi, "FullAttentionSpec", None)
    if not (isinstance(full, type) and dataclasses.is_dataclass(full)) or not (
        isinstance(_merge_of(full), classmethod)
    ):
        return Detection.unrecognized("no FullAttentionSpec.merge classmethod")
    targets = _targets(kvi)
    if FIELD not in _field_names(full):
        return Detection.not_needed(
            f"FullAttentionSpec has no {FIELD} (only MLA specs do): nothing to drop"
        )
    if all(_is_patched(cls) for cls in targets):
        return Detection.not_needed("merge already patched")
    try:
        reasons = [r for r in (_drops_field(cls) for cls in targets) if r]
    except TypeError as exc:
        return Detection.unrecognized(f"cannot build a probe spec: {exc}")
    if not reasons:
        return Detection.not_needed(f"merge keeps {FIELD}")
    return Detection.needed("; ".join(reasons))


def _is_patched(cls: type) -> bool:
    merge = _merge_of(cls)
    return isinstance(merge, classmethod) and getattr(merge.__func__, _MARK, False)


def _merge_keeping_fields(cls: type, specs: list[Any]) -> Any:
    """``FullAttentionSpec.merge`` that builds the merged spec from ``specs[0]``."""
    kvi = _interface()
    assert kvi is not None
    assert all(isinstance(spec, kvi.FullAttentionSpec) for spec in specs), (
        "All attention layers in the same KV cache group must be FullAttentionSpec."
    )
    mla = getattr(kvi, "MLAAttentionSpec", None)
    assert mla is None or not any(isinstance(spec, mla) for spec in specs), (
        "MLAAttentionSpec should be merged in MLAAttentionSpec.merge"
    )
    names = _field_names(cls)
    changes: dict[str, Any] = {}
    for window in ("sliding_window", "attention_chunk_size"):
        sizes = {getattr(s, window) for s in specs if getattr(s, window) is not None}
        changes[window] = cls.merge_window_sizes(sizes)
    if "non_causal" in names:
        changes["non_causal"] = any(spec.non_causal for spec in specs)
    first = specs[0]
    if type(first) is cls:
        merged = dataclasses.replace(first, **changes)
    else:  # e.g. FullAttentionSpec.merge over subclass specs: result is a cls
        kwargs = {
            f.name: getattr(first, f.name)
            for f in dataclasses.fields(cls)
            if f.init and hasattr(first, f.name)
        }
        merged = cls(**{**kwargs, **changes})

    checked = [f.name for f in dataclasses.fields(kvi.AttentionSpec) if f.compare]
    if FIELD in names and FIELD not in checked:
        checked.append(FIELD)
    for spec in specs:
        for name in checked:
            value, merged_value = getattr(spec, name), getattr(merged, name)
            assert value == merged_value, (
                "All attention layers in the same KV cache group must have the "
                f"same attention spec, but {name} differs: "
                f"{value!r} != {merged_value!r}."
            )
    assert (merged.sliding_window is not None) + (merged.attention_chunk_size is not None) <= 1, (
        "Model with both sliding window layers and chunked local attention layers is not supported."
    )
    return merged


setattr(_merge_keeping_fields, _MARK, True)


def apply(detection: Detection) -> None:
    kvi = _interface()
    if kvi is None:
        raise RuntimeError("vllm.v1.kv_cache_interface is not importable")
    patched = []
    for cls in _targets(kvi):
        if _is_patched(cls):
            continue
        cls.merge = classmethod(_merge_keeping_fields)
        patched.append(f"{cls.__name__}.merge")
    if patched:
        logger.debug("gemma4_quant: %s now keep every field", ", ".join(patched))


# --- what stock vLLM does to a checkpoint that needs this patch (read by doctor)


def doctor_rules() -> tuple[()]:
    # Nothing a checkpoint shows: the lost field comes from --kv-cache-dtype on a build
    # that carries #39582, whichever checkpoint it serves.
    return ()

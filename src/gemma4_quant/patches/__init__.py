"""The patch registry.

Each patch is one module in this package that defines:

- ``NAME``: the name used in logs and in ``GEMMA4_QUANT_DISABLE_PATCHES``;
- ``SUMMARY``: one line for ``gemma4-quant patches``;
- ``detect() -> Detection``: reads the installed vLLM code (feature detection, never
  version strings; cheap: it reads source through :mod:`gemma4_quant.vllm_code` and
  imports nothing heavy) and says whether the patch is needed there, with what it found
  (``Detection.findings``: the code generation it recognized, for instance);
- ``apply(detection) -> None``: makes the change from those findings, usually through
  :func:`when_imported` so that the patched vLLM module is only changed once some
  process imports it. Only called when ``detect()`` said NEEDED; must be idempotent
  across repeated registration. Patches that work on the checkpoint's tensor stream go
  through :mod:`.load_stream`, which fixes their order;
- ``doctor_rules()``: what stock vLLM does to a checkpoint that needs the patch, as
  rules that ``gemma4-quant doctor`` evaluates on checkpoint headers (empty where no
  header shows it).

A patch whose ``detect`` finds code it does not recognize returns UNRECOGNIZED and
changes nothing.
"""

from __future__ import annotations

import enum
import functools
import importlib
import importlib.abc
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

# The order of the log line and of `gemma4-quant patches`; the order in which patches
# touch the checkpoint stream is load_stream.STAGES.
PATCH_MODULES: tuple[str, ...] = (
    "per_layer_config",
    "text_mapper",
    "amx_permission",
    "expert_names",
    "expert_loader",
    "moe_prefix",
    "router",
    "k_eq_v_scheme",
    "load_guard",
    "kv_shared_layers",
    "kv_spec_merge",
    "dequant_fallback",
    "unquantized_experts",
    "tied_lm_head",
    "cpu_gate_dtype",
    "fast_decode",
    "marlin_decode",
    "marlin_moe_decode",
    "router_decode",
    "norm_blocks",
    "ffn_streams",  # after norm_blocks: it rides on that patch's forward
)


class Status(str, enum.Enum):
    NEEDED = "needed"
    NOT_NEEDED = "not needed"
    UNRECOGNIZED = "unrecognized"


@dataclass(frozen=True)
class Detection:
    status: Status
    reason: str
    findings: Any = None  # what apply() needs of what detect() read

    @classmethod
    def needed(cls, reason: str, findings: Any = None) -> Detection:
        return cls(Status.NEEDED, reason, findings)

    @classmethod
    def not_needed(cls, reason: str) -> Detection:
        return cls(Status.NOT_NEEDED, reason)

    @classmethod
    def unrecognized(cls, reason: str) -> Detection:
        return cls(Status.UNRECOGNIZED, reason)


def load_patch_modules() -> list[ModuleType]:
    """Import every patch module, in ``PATCH_MODULES`` order."""
    return [importlib.import_module(f"{__name__}.{name}") for name in PATCH_MODULES]


@dataclass(frozen=True)
class Planned:
    """What one patch found on the installed vLLM, and whether it will be applied."""

    module: ModuleType
    detection: Detection
    disabled_by: str | None = None  # the switch that leaves it out, if any
    error: Exception | None = None  # detect() raised

    @property
    def name(self) -> str:
        return self.module.NAME

    @property
    def applies(self) -> bool:
        return (
            self.disabled_by is None
            and self.error is None
            and self.detection.status is Status.NEEDED
        )


def plan() -> list[Planned]:
    """Every patch's detection and decision, with the switches applied: the one answer
    that registration, ``gemma4-quant patches`` and doctor all use."""
    from .. import envs

    everything = envs.disabled()
    skip = envs.disabled_patches()
    planned = []
    for module in load_patch_modules():
        disabled_by = (
            "GEMMA4_QUANT_DISABLE"
            if everything
            else "GEMMA4_QUANT_DISABLE_PATCHES"
            if module.NAME in skip
            else None
        )
        try:
            planned.append(Planned(module, module.detect(), disabled_by))
        except Exception as exc:  # a broken detection must not take vLLM down
            failed = Detection.unrecognized(f"detection failed: {exc!r}")
            planned.append(Planned(module, failed, disabled_by, exc))
    return planned


def vllm_source(relpath: str) -> str | None:
    """Text of a module file of the installed vLLM, read without importing it."""
    from ..vllm_code import source

    return source(relpath)


def when_imported(module_name: str, callback: Callable[[ModuleType], None]) -> None:
    """Run ``callback(module)`` once ``module_name`` is imported (now, if it is)."""
    module = sys.modules.get(module_name)
    if module is not None and getattr(module, "__spec__", None) is not None:
        _run_callback(module_name, callback, module)
        return
    _FINDER.callbacks.setdefault(module_name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def _run_callback(
    module_name: str, callback: Callable[[ModuleType], None], module: ModuleType
) -> None:
    try:
        callback(module)
    except Exception:  # a patch must never break vLLM's import
        logging.getLogger("vllm.gemma4_quant").exception(
            "gemma4_quant: patching %s failed; it stays as vLLM ships it", module_name
        )


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Wraps the loader of watched modules so callbacks run right after they load."""

    def __init__(self) -> None:
        self.callbacks: dict[str, list[Callable[[ModuleType], None]]] = {}

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_patch(module: ModuleType) -> None:
            exec_module(module)
            for callback in self.callbacks.pop(fullname, []):
                _run_callback(fullname, callback, module)

        loader.exec_module = exec_and_patch
        return spec


_FINDER = _PostImportFinder()


def wrap_once(
    owner: type | ModuleType,
    attr: str,
    mark: str,
    make_wrapper: Callable[[Callable], Callable],
    static: bool = False,
) -> None:
    """Replace ``owner.attr`` (of a class or a module) by ``make_wrapper(original)``,
    unless a wrapper carrying ``mark`` is already in place (plugins are registered once
    per process, but a second copy of the package or a second registration must not wrap
    twice). ``static``: the attribute is a class's staticmethod, and stays one."""
    original = getattr(owner, attr)
    if getattr(original, mark, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, mark, True)
    setattr(owner, attr, staticmethod(wrapper) if static else wrapper)


_ops: set[str] = set()


def define_op(name: str, schema: str, impl: Callable, fake: Callable) -> None:
    """``torch.ops.gemma4_quant.<name>``: ``impl``, and ``fake`` (the output's shape and
    dtype only) for tracing, once per process (every layer a patch takes, and a second
    registration of the plugin, ask again). The schema is spelled out: the patches'
    annotations are strings."""
    if name in _ops:
        return
    import torch

    op = torch.library.custom_op(f"gemma4_quant::{name}", mutates_args=(), schema=schema)(impl)
    op.register_fake(fake)
    _ops.add(name)


_said: set[str] = set()


def info_once(key: str, message: str, *args: Any) -> None:
    """One info line per process for ``key``: a patch that decides per layer says so once."""
    if key in _said:
        return
    _said.add(key)
    logging.getLogger("vllm.gemma4_quant").info(message, *args)


@functools.cache
def cuda_device() -> str:
    """This process's CUDA GPU, in words: name and compute capability (asked once: patches
    that decide per layer pass it to ``info_once`` for every layer they take)."""
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (capability {major}.{minor})"


def one_token_agrees(
    name: str, compute: Callable[[], tuple[Any, Any]], tolerance: float, against: str, keeps: str
) -> bool:
    """A patch's check of its kernels on one token: ``compute`` returns (the kernels'
    output, the reference's). Whatever raises, or errs more than ``tolerance`` (relative
    norm), leaves vLLM's path (``keeps`` says which), with one warning."""
    try:
        got, want = compute()
        got, want = got.float().cpu(), want.float().cpu()
        error = ((got - want).norm() / want.norm()).item()
    except Exception as e:  # noqa: BLE001  (whatever fails, vLLM's path stays)
        logging.getLogger("vllm.gemma4_quant").warning(
            "gemma4_quant: %s: the one-token kernels fail here (%s: %s); %s",
            name,
            type(e).__name__,
            str(e)[:300],
            keeps,
        )
        return False
    if not error <= tolerance:
        logging.getLogger("vllm.gemma4_quant").warning(
            "gemma4_quant: %s: the one-token kernels err %.4f against %s (at most %.2f "
            "expected); %s",
            name,
            error,
            against,
            tolerance,
            keeps,
        )
        return False
    return True

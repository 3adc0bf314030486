"""The kv_spec_merge patch, on the installed vLLM and on a build with #39582's field.

Run inside each environment, e.g. ``.venvs/vllm-0.32.0/bin/python -m pytest
tests/test_kv_spec_merge.py``.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

import pytest

torch = pytest.importorskip("torch")
kvi = pytest.importorskip("vllm.v1.kv_cache_interface")

from gemma4_quant.patches import Status, kv_spec_merge  # noqa: E402

FIELD = "cache_dtype_str"


def field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.fixture
def pr_build(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``vllm.v1.kv_cache_interface`` as a build with the field of upstream PR
    #39582 has it: ``cache_dtype_str`` on ``AttentionSpec`` (and so on every
    spec), and the installed release's own ``merge`` methods, which rebuild the
    merged spec field by field. The classes are real dataclass subclasses of
    vLLM's; they replace vLLM's in the module for the duration of one test."""

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class AttentionSpec(kvi.AttentionSpec):
        cache_dtype_str: str | None = None

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class FullAttentionSpec(kvi.FullAttentionSpec, AttentionSpec):
        pass

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class SinkFullAttentionSpec(kvi.SinkFullAttentionSpec, FullAttentionSpec):
        pass

    for cls in (AttentionSpec, FullAttentionSpec, SinkFullAttentionSpec):
        monkeypatch.setattr(kvi, cls.__name__, cls)
    return kvi


def fp8_spec(cls: type, **kwargs):
    """A layer spec as the attention layer builds it for ``--kv-cache-dtype fp8``."""
    params = dict(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.uint8)
    params[FIELD] = "fp8"
    return cls(**{**params, **kwargs})


def test_detect_not_needed_on_stock_release():
    assert FIELD not in field_names(kvi.FullAttentionSpec)
    detection = kv_spec_merge.detect()
    assert detection.status is Status.NOT_NEEDED, detection
    assert FIELD in detection.reason


def test_detect_reads_the_source_before_any_import():
    """Registration decides without importing the module (0.19.1: seconds of vLLM's
    config), and decides as the imported classes do."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from gemma4_quant.patches import kv_spec_merge as k\n"
        "before = k.detect()\n"
        "assert 'vllm.v1.kv_cache_interface' not in sys.modules\n"
        "import vllm.v1.kv_cache_interface\n"
        "assert k.detect() == before, (before, k.detect())\n"
        "print(before.status.value)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == Status.NOT_NEEDED.value


def test_detect_unrecognized_without_full_attention_spec(monkeypatch):
    monkeypatch.delattr(kvi, "FullAttentionSpec")
    assert kv_spec_merge.detect().status is Status.UNRECOGNIZED


def test_pr_build_merge_drops_the_field(pr_build):
    """The defect itself, on the build the patch is for (no patch applied)."""
    assert FIELD in field_names(pr_build.FullAttentionSpec)
    specs = [fp8_spec(pr_build.FullAttentionSpec) for _ in range(2)]
    with pytest.raises(AssertionError):
        pr_build.FullAttentionSpec.merge(specs)
    detection = kv_spec_merge.detect()
    assert detection.status is Status.NEEDED, detection
    assert "FullAttentionSpec.merge" in detection.reason
    assert "SinkFullAttentionSpec.merge" in detection.reason


def test_detect_not_needed_when_merge_keeps_the_field(pr_build, monkeypatch):
    """A build with the field whose merges copy ``specs[0]`` (as the upstream
    series in ``upstream/v0.33.0`` does) needs no patch."""

    def merge(cls, specs):
        return dataclasses.replace(specs[0])

    for cls in (pr_build.FullAttentionSpec, pr_build.SinkFullAttentionSpec):
        monkeypatch.setattr(cls, "merge", classmethod(merge))
    detection = kv_spec_merge.detect()
    assert detection.status is Status.NOT_NEEDED, detection
    assert "keeps" in detection.reason


def test_apply_keeps_every_field(pr_build):
    kv_spec_merge.apply(kv_spec_merge.detect())
    full, sink = pr_build.FullAttentionSpec, pr_build.SinkFullAttentionSpec

    # A Gemma 4 style group with hybrid allocation off: full-attention layers
    # and sliding-window layers handled as full attention with a window.
    merged = full.merge([fp8_spec(full), fp8_spec(full, sliding_window=1024)])
    assert type(merged) is full
    assert merged.cache_dtype_str == "fp8"
    assert merged.sliding_window == 1024

    merged = sink.merge([fp8_spec(sink, sink_len=4) for _ in range(2)])
    assert type(merged) is sink
    assert (merged.cache_dtype_str, merged.sink_len) == ("fp8", 4)

    # The merge still rejects specs that differ, and says in what.
    with pytest.raises(AssertionError, match="cache_dtype_str differs"):
        full.merge([fp8_spec(full), fp8_spec(full, cache_dtype_str="fp8_e5m2")])
    with pytest.raises(AssertionError, match="num_kv_heads differs"):
        full.merge([fp8_spec(full), fp8_spec(full, num_kv_heads=4)])

    assert kv_spec_merge.detect().status is Status.NOT_NEEDED


def test_apply_is_idempotent_and_leaves_stock_classes(pr_build):
    stock_full_merge = vars(pr_build.FullAttentionSpec.__mro__[1])["merge"]
    kv_spec_merge.apply(kv_spec_merge.detect())
    first = vars(pr_build.FullAttentionSpec)["merge"]
    kv_spec_merge.apply(kv_spec_merge.detect())
    assert vars(pr_build.FullAttentionSpec)["merge"] is first
    assert first is not stock_full_merge
    # vLLM's own classes (parents of the build's) keep their merge.
    assert vars(pr_build.FullAttentionSpec.__mro__[1])["merge"] is stock_full_merge

"""transformers >= 5.15 keeps Gemma 4's head_dim per layer (patch per_layer_config).

Releases whose Gemma 4 code reads ``head_dim`` / ``global_head_dim`` from the whole config
(0.19 - 0.27) fail to build the model config with such a transformers
(``AmbiguousGlobalPerLayerAttributeError``); the plugin gives the config its flat view back.
The loads here run vLLM with a second transformers first on ``PYTHONPATH``, installed
next to the environment (``.ci/make-env.sh``: ``pip install --no-deps --target``, torch
untouched), or wherever ``GEMMA4_QUANT_TEST_TRANSFORMERS`` points; without one the
tests that need it skip and say so.

Numbers: the model loaded through the per-layer config is the model loaded with the
environment's own transformers, parameter for parameter (names, shapes, bits).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_fallback import same_bytes

from gemma4_quant.patches import Status
from gemma4_quant.patches import per_layer_config as plc

LAYOUT = "bf16"
DETECTION = plc.detect()
ERROR = "AmbiguousGlobalPerLayerAttributeError"


def second_transformers() -> tuple[Path | None, str]:
    """A directory holding transformers >= 5.15 for PYTHONPATH, and what was found."""
    where = os.environ.get("GEMMA4_QUANT_TEST_TRANSFORMERS") or str(
        Path(sys.prefix, "transformers-5.17")
    )
    root = Path(where)
    source = root / "transformers" / plc._TRANSFORMERS_CONFIG
    if not source.is_file():
        return None, (
            f"no transformers with Gemma 4 at {root} (set GEMMA4_QUANT_TEST_TRANSFORMERS to "
            "a directory holding transformers >= 5.15, e.g. from `pip install --no-deps "
            "--target DIR transformers==5.17.0 tokenizers==0.23.3`)"
        )
    per_layer, why = plc.transformers_per_layer(source.read_text(encoding="utf-8"))
    if not per_layer:
        return None, f"the transformers at {root}: {why} (< 5.15)"
    versions = sorted(p.name for p in root.glob("transformers-*.dist-info"))
    return root, versions[0] if versions else "transformers"


EXTRA, FOUND = second_transformers()
needs_second = pytest.mark.skipif(EXTRA is None, reason=FOUND)
needs_flat_reader = pytest.mark.skipif(
    plc.vllm_reads_flat() is not True,
    reason="this vLLM reads Gemma 4's per_layer_config: transformers >= 5.15 loads as is",
)


def extra_env() -> dict[str, str]:
    """PYTHONPATH with the second transformers first (absolute, for vLLM's subprocesses)."""
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(EXTRA), rest) if p)}


# --------------------------------------------------------------------- no vLLM


def test_detection_follows_the_code() -> None:
    """Needed exactly where vLLM reads flat attributes and the installed transformers
    writes per-layer configs; the reason names what was found."""
    flat = plc.vllm_reads_flat()
    per_layer, _ = plc.transformers_per_layer()
    if flat is False:
        assert DETECTION.status is Status.NOT_NEEDED, DETECTION
        assert "per_layer_config" in DETECTION.reason
    elif flat and per_layer is False:
        assert DETECTION.status is Status.NOT_NEEDED, DETECTION
    elif flat and per_layer:
        assert DETECTION.status is Status.NEEDED, DETECTION
    # the two forms the releases have
    assert plc.vllm_reads_flat(
        "class Gemma4DecoderLayer:\n def __init__(self, config):\n"
        '  head_dim = getattr(config, "global_head_dim", config.head_dim)\n'
    )
    assert (
        plc.vllm_reads_flat(
            "class Gemma4DecoderLayer:\n def __init__(self, config, i):\n"
            "  head_dim = config.per_layer_config[i].head_dim\n"
        )
        is False
    )
    assert plc.vllm_reads_flat("class Gemma4DecoderLayer:\n def __init__(self): pass\n") is None


@needs_second
def test_flat_view_of_a_per_layer_config(checkpoints) -> None:
    """Under the second transformers: the config raises on head_dim, and after
    ``flatten`` reads the config file's values, with the full-attention ones restored."""
    path = checkpoints(LAYOUT)
    file_config = json.loads((path / "config.json").read_text())
    script = (
        "import json, sys\n"
        "from transformers import AutoConfig\n"
        "from gemma4_quant.patches.per_layer_config import flatten\n"
        "c = AutoConfig.from_pretrained(sys.argv[1])\n"
        "try:\n    c.head_dim\n    raised = ''\n"
        "except Exception as exc:\n    raised = type(exc).__name__\n"
        "changed = flatten(c)\n"
        "print(json.dumps({'raised': raised, 'changed': changed, 'again': flatten(c),"
        " 'values': [c.head_dim, c.num_key_value_heads, c.global_head_dim,"
        " c.num_global_key_value_heads]}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        env={**os.environ, **extra_env()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] == ERROR
    assert result["changed"] and result["again"]
    keys = ("head_dim", "num_key_value_heads", "global_head_dim", "num_global_key_value_heads")
    assert result["values"] == [file_config[k] for k in keys]


# --------------------------------------------------------------------- vLLM


@needs_second
@needs_flat_reader
def test_stock_fails_and_plugin_loads_the_same_model(checkpoints, vllm_load) -> None:
    """Stock vLLM dies building the model config; with the plugin every parameter equals
    the load under the environment's own transformers (flat config), bit for bit."""
    path = checkpoints(LAYOUT)
    stock = vllm_load(path, plugin=False, env=extra_env())
    assert not stock.ok, "stock vLLM loaded a per-layer Gemma 4 config"
    assert ERROR in stock.log and "'head_dim'" in stock.log, stock.log[-3000:]
    plugin = vllm_load(path, env=extra_env())
    assert plugin.ok, plugin.log[-3000:]
    assert "per_layer_config applied" in plugin.log, plugin.log[-3000:]
    assert "flat head_dim=" in plugin.log, plugin.log[-3000:]
    reference = vllm_load(path)
    assert reference.ok, reference.log[-3000:]
    assert sorted(plugin.tensors) == sorted(reference.tensors)
    for name, want in reference.tensors.items():
        got = plugin.tensors[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        assert same_bytes(got, want), name
    # the full-attention layer got its own head size and KV heads
    qkv = [t for n, t in plugin.tensors.items() if n.endswith("self_attn.qkv_proj.weight")]
    assert len({tuple(t.shape) for t in qkv}) == 2, [tuple(t.shape) for t in qkv]
    assert all(t.dtype == torch.bfloat16 for t in qkv)

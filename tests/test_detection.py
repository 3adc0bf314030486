"""Detection fails closed: mutated vLLM source never turns a needed patch off.

Each case takes the installed vLLM's own file, changes it the way an upstream edit might
without changing behaviour (comment lines everywhere inside the function the patch reads,
the whole file reformatted) or by renaming that function, and runs the patch's
``detect()`` on it. Harmless edits keep the decision; a rename is UNRECOGNIZED, never
NOT_NEEDED.
"""

from __future__ import annotations

import ast

import pytest

from gemma4_quant import vllm_code
from gemma4_quant.patches import (
    Status,
    cpu_gate_dtype,
    dequant_fallback,
    expert_loader,
    expert_names,
    fast_decode,
    ffn_streams,
    kv_shared_layers,
    load_guard,
    marlin_decode,
    marlin_moe_decode,
    norm_blocks,
    router,
    router_decode,
    tied_lm_head,
    unquantized_experts,
)

_INC = "model_executor/layers/quantization/inc"
# patch -> (module, [(file, function the patch reads), ...]): the first pair that the
# installed release has is mutated. amx_permission reads the code only on AMX CPUs and
# kv_spec_merge imports its classes instead of reading them: neither is here.
CASES = {
    "fast_decode": (fast_decode, [("model_executor/models/gemma4.py", "Gemma4MLP.forward")]),
    "marlin_decode": (
        marlin_decode,
        [
            (
                "model_executor/kernels/linear/mixed_precision/marlin.py",
                "MarlinLinearKernel.apply_weights",
            )
        ],
    ),
    "marlin_moe_decode": (
        marlin_moe_decode,
        [
            ("model_executor/models/gemma4.py", "Gemma4MoE.__init__"),
            ("model_executor/models/gemma4.py", "Gemma4DecoderLayer.__init__"),  # 0.32+
        ],
    ),
    "load_guard": (
        load_guard,
        [("model_executor/models/gemma4.py", "Gemma4Model.load_weights")],
    ),
    "cpu_gate_dtype": (
        cpu_gate_dtype,
        [("model_executor/layers/utils.py", "dispatch_cpu_unquantized_gemm")],
    ),
    "router": (router, [("model_executor/models/gemma4.py", "Gemma4Router.__init__")]),
    "router_decode": (
        router_decode,
        [("model_executor/models/gemma4.py", "Gemma4Router.forward")],
    ),
    "norm_blocks": (
        norm_blocks,
        [("model_executor/models/gemma4.py", "Gemma4DecoderLayer.forward")],
    ),
    "ffn_streams": (
        ffn_streams,
        [("model_executor/models/gemma4.py", "Gemma4DecoderLayer.forward")],
    ),
    "kv_shared_layers": (
        kv_shared_layers,
        [("model_executor/models/gemma4.py", "Gemma4Attention.__init__")],
    ),
    "expert_names": (
        expert_names,
        [("model_executor/models/gemma4.py", "Gemma4ForCausalLM.load_weights")],
    ),
    # Gemma4ForCausalLM.load_weights decides first on every release (the generic loader
    # of 0.31+ needs no Gemma4Model.load_weights)
    "expert_loader": (
        expert_loader,
        [("model_executor/models/gemma4.py", "Gemma4ForCausalLM.load_weights")],
    ),
    "unquantized_experts": (
        unquantized_experts,
        [
            (f"{_INC}/schemes/inc_wna16_scheme.py", "INCWna16Scheme.get_moe_method"),
            (f"{_INC}.py", "INCConfig.apply_cpu_w4a16_quant_layer"),
            (f"{_INC}.py", "INCConfig.apply_ipex_quant_layer"),  # 0.19
        ],
    ),
    "tied_lm_head": (
        tied_lm_head,
        [("model_executor/layers/vocab_parallel_embedding.py", "ParallelLMHead.tie_weights")],
    ),
    "dequant_fallback": (
        dequant_fallback,
        [
            (
                "model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/"
                "compressed_tensors_moe.py",
                "CompressedTensorsMoEMethod.get_moe_method",
            )
        ],
    ),
}


def case(patch: str):
    """(module, file, function) of a patch on the installed release; skips where the
    release has none of its functions or the patch does not recognize it anyway."""
    module, candidates = CASES[patch]
    for relpath, qualname in candidates:
        text = vllm_code.source(relpath)
        if text is not None and vllm_code.find_function(text, qualname) is not None:
            if module.detect().status is Status.UNRECOGNIZED:
                pytest.skip(f"{patch} does not recognize this release")
            return module, relpath, qualname
    pytest.skip(f"this release has none of {candidates}")


def commented(text: str, qualname: str) -> str:
    """A comment line before every line of the function's body, at that line's indent."""
    node = vllm_code.find_function(text, qualname)
    lines = text.split("\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if node.lineno < number <= node.end_lineno and line.strip():
            indent = line[: len(line) - len(line.lstrip())]
            out.append(f"{indent}# an upstream comment")
        out.append(line)
    return "\n".join(out)


def reformatted(text: str, _qualname: str) -> str:
    return ast.unparse(ast.parse(text))


def renamed(text: str, qualname: str) -> str:
    node = vllm_code.find_function(text, qualname)
    lines = text.split("\n")
    lines[node.lineno - 1] = lines[node.lineno - 1].replace(
        f"def {node.name}(", f"def {node.name}_v2(", 1
    )
    return "\n".join(lines)


def detect_on(monkeypatch, module, relpath: str, text: str):
    real = module.vllm_source
    monkeypatch.setattr(module, "vllm_source", lambda p: text if p == relpath else real(p))
    return module.detect()


@pytest.mark.parametrize("patch", CASES)
@pytest.mark.parametrize("mutation", [commented, reformatted], ids=["comments", "reformatted"])
def test_harmless_edits_keep_the_decision(monkeypatch, patch: str, mutation) -> None:
    module, relpath, qualname = case(patch)
    want = module.detect()
    got = detect_on(monkeypatch, module, relpath, mutation(vllm_code.source(relpath), qualname))
    assert got == want


@pytest.mark.parametrize("patch", CASES)
def test_a_renamed_function_is_unrecognized(monkeypatch, patch: str) -> None:
    module, relpath, qualname = case(patch)
    text = renamed(vllm_code.source(relpath), qualname)
    assert detect_on(monkeypatch, module, relpath, text).status is Status.UNRECOGNIZED

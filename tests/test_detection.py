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
from gemma4_quant.patches import Status, cpu_gate_dtype, load_guard

CASES = {
    "load_guard": (load_guard, "model_executor/models/gemma4.py", "Gemma4Model.load_weights"),
    "cpu_gate_dtype": (
        cpu_gate_dtype,
        "model_executor/layers/utils.py",
        "dispatch_cpu_unquantized_gemm",
    ),
}


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


def detect_on(monkeypatch, module, relpath: str, text: str) -> Status:
    real = module.vllm_source
    monkeypatch.setattr(module, "vllm_source", lambda p: text if p == relpath else real(p))
    return module.detect().status


@pytest.mark.parametrize("patch", CASES)
@pytest.mark.parametrize("mutation", [commented, reformatted], ids=["comments", "reformatted"])
def test_harmless_edits_keep_the_decision(monkeypatch, patch: str, mutation) -> None:
    module, relpath, qualname = CASES[patch]
    text = vllm_code.source(relpath)
    assert text is not None and vllm_code.find_function(text, qualname) is not None
    want = module.detect().status
    assert want is not Status.UNRECOGNIZED
    assert detect_on(monkeypatch, module, relpath, mutation(text, qualname)) is want


@pytest.mark.parametrize("patch", CASES)
def test_a_renamed_function_is_unrecognized(monkeypatch, patch: str) -> None:
    module, relpath, qualname = CASES[patch]
    text = renamed(vllm_code.source(relpath), qualname)
    assert detect_on(monkeypatch, module, relpath, text) is Status.UNRECOGNIZED

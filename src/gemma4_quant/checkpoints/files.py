"""Reading and writing checkpoint directories: config JSON and safetensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

WEIGHTS_FILE = "model.safetensors"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_tensors(tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()},
        str(out_dir / WEIGHTS_FILE),
        metadata={"format": "pt"},
    )


def load_tensors(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file of a checkpoint directory."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(ckpt_dir).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors

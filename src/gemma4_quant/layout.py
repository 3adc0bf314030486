"""Names of the Gemma 4 checkpoint layouts the project builds and checks (no torch)."""

from __future__ import annotations

# Where the public (multimodal) checkpoints keep the text model's tensors.
TEXT_PREFIX = "model.language_model."
DEFAULT_LAYOUT = "ct-fused-w4a16"

LAYOUTS: dict[str, str] = {
    "bf16": "base layout: fused 3D experts, everything bf16, no quantization_config",
    "ct-fused-w4a16": "cyankiwi AWQ-4bit: compressed-tensors pack-quantized int4 g32 sym; "
    "fused 3D experts (<param>_packed/_scale) + attention q/k/v/o quantized",
    "ct-fused-w4a16-asym": "as ct-fused-w4a16, asymmetric: plus packed zero points "
    "(experts.<param>_zero_point, <module>.weight_zero_point)",
    "ct-fused-w4a16-shape": "as ct-fused-w4a16, plus 3-element experts.<param>_shape "
    "tensors (what the compressor emits for a 3D weight)",
    "ct-per-expert-w4a16": "compressed-tensors int4 g32 sym with per-expert 2D names "
    "experts.{e}.{gate,up,down}_proj.weight_packed/_scale/_shape",
    "ct-fused-w4a16-router": "as ct-fused-w4a16, but router.proj quantized too "
    "(not in the ignore list)",
    "autoround-int4": "Intel AutoRound (auto_round:auto_gptq) int4 g128 sym: per-expert "
    "qweight/qzeros/scales; attention, dense MLP and router.proj quantized",
    "fp8-router": "compressed-tensors FP8 (float-quantized, per-channel weight scale, "
    "dynamic per-token activations): per-expert experts, attention, dense MLP and "
    "router.proj quantized",
}

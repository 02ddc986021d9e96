#!/usr/bin/env bash
# Every GPU benchmark and GPU-only check of the project, in two calls of at most 8 minutes each (a device
# command is capped at 600 s), each stage under its own timeout, in priority order; everything appended to
# $OUT/gpu.log (OUT defaults to bench/out). Results go to docs/perf.md with the device, date and versions.
#
#   bash bench/gpu.sh            # part 1 on the GPU machine: what matters most
#   bash bench/gpu.sh --part 2   # part 2: the rest
#   bash bench/gpu.sh --smoke    # on a CPU: both parts at tiny shapes, so the script cannot rot
#                                # (tests/test_bench.py runs it, with datasets / math_verify /
#                                # bitsandbytes made unimportable, as on the GPU image)
#
# Part 1: versions, cuDNN, device and the SDPA backend of the engine's decode and prefill layouts; the decode
#   step's op audit on the device; every Triton kernel compiled (registers, shared memory, occupancy,
#   spills); rollout exactness on the device (engine vs generate, CUDA graphs vs eager); rollout throughput
#   at the 1.5B shape, variable lengths (engine, eager loop, generate; graph count, capture time, peak
#   memory); the log-prob / entropy kernels and the fused lm_head.
# Part 2: rollout at the 1.5B shape, fixed lengths, and generate + static cache + compile; SFT MFU at the
#   1.5B shape, sdpa then flex attention (flex has no CPU backward: it first runs here); one RL step's time
#   split; family checks at real shapes (Llama-3.1-8B, Qwen3-1.7B: engine == generate); the 0.5B rollout.
# A stage whose limit would end past the part's 480 s budget is skipped (logged), so a call never overruns.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
PART=1
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) SMOKE=1; PART=all ;;
    --part) PART=${2:?--part needs 1 or 2}; shift ;;
    *) echo "usage: bash bench/gpu.sh [--part 1|2] [--smoke]" >&2; exit 2 ;;
  esac
  shift
done
case "$PART" in 1|2|all) ;; *) echo "--part must be 1 or 2, got $PART" >&2; exit 2 ;; esac
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SCALE=1 BUDGET=480  # the smoke run's limits only catch hangs: a shared CPU can be many times slower than an idle one
[ "$SMOKE" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} && SCALE=5 && BUDGET=100000

T0=$(date +%s)
FAILED=0
stage() {  # stage NAME SECONDS CMD...: run under a timeout, append to the log, never stop the script
  local name=$1 secs=$(( $2 * SCALE )); shift 2
  local t0; t0=$(date +%s)
  if [ $(( t0 - T0 + secs )) -gt "$BUDGET" ]; then
    echo "=== $name: skipped, its ${secs}s limit would end past this call's ${BUDGET}s budget" | tee -a "$LOG"
    return
  fi
  echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*" | tee -a "$LOG"
  timeout "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "=== $name: rc $rc, $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

if [ "$SMOKE" = 1 ]; then
  R15=(--shape tiny); R05=(--shape tiny); SFT=(--shape tiny --seq 256 --steps 1)
  RL=(--shape tiny --rollout-batch 2 --samples 2 --new 8 --steps 1); FAM=(tiny-llama)
  KERN=(--n 32 --vocab 256 --hidden 32 --chunk-tokens 16 --skip-compile); AOT=(--arch 90 --dtypes bf16 --vocab 1000)
  VER=(--rows 2 --cached 256 --prompt 16); AUD=(--device meta)
  ROLL=(--paths engine,eager,generate,static --regimes variable,fixed)  # part 2's rollout stages: the same script
else
  R15=(--shape qwen2.5-1.5b --batch 256 --new 1024); R05=(--shape qwen2.5-0.5b --batch 256 --new 1024)
  SFT=(--shape qwen2.5-1.5b --seq 4096 --grad-checkpointing --steps 5)
  RL=(--shape qwen2.5-1.5b --rollout-batch 16 --samples 8 --new 1024 --steps 2); FAM=(llama3.1-8b qwen3-1.7b)
  KERN=(--skip-compile); AOT=(); VER=(); AUD=(); ROLL=(--paths engine,eager,generate --regimes variable)
fi

echo "### bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) part=$PART smoke=$SMOKE commit $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$LOG"
if [ "$PART" != 2 ]; then
  stage versions 40 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null;
    $PY bench/versions.py ${VER[*]}"
  stage audit 40 $PY bench/audit_step.py "${AUD[@]}"
  stage kernels-compile 40 $PY bench/compile_kernels.py "${AOT[@]}"
  stage rollout-check 80 $PY bench/bench_rollout.py "${R15[@]}" --check
  stage rollout-1.5b 180 $PY bench/bench_rollout.py "${R15[@]}" "${ROLL[@]}"
  if [ "$SMOKE" = 1 ]; then
    stage kernels 70 env TRITON_INTERPRET=1 $PY bench/bench_kernels.py "${KERN[@]}" --allow-cpu
  else
    stage kernels 70 $PY bench/bench_kernels.py "${KERN[@]}"
  fi
fi
if [ "$PART" != 1 ]; then
  [ "$SMOKE" = 0 ] && stage rollout-1.5b-fixed 150 $PY bench/bench_rollout.py "${R15[@]}" --paths engine,eager,generate --regimes fixed
  stage sft-sdpa 70 $PY bench/bench_sft.py "${SFT[@]}" --attn sdpa
  [ "$SMOKE" = 0 ] && stage sft-flex 80 $PY bench/bench_sft.py "${SFT[@]}" --attn flex_attention  # CPU: no backward
  stage rl-step 80 $PY bench/bench_rl_step.py "${RL[@]}"
  for f in "${FAM[@]}"; do
    stage "family-$f" 40 $PY bench/bench_rollout.py --shape "$f" --check
  done
  [ "$SMOKE" = 0 ] && stage rollout-static 120 $PY bench/bench_rollout.py "${R15[@]}" --paths static,engine --regimes variable
  [ "$SMOKE" = 0 ] && stage rollout-0.5b 90 $PY bench/bench_rollout.py "${R05[@]}" --paths engine,eager --regimes variable
fi

echo "### done in $(( $(date +%s) - T0 ))s, $FAILED stage(s) failed; log: $LOG" | tee -a "$LOG"
[ "$FAILED" -eq 0 ]

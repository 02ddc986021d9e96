#!/usr/bin/env bash
# Every GPU benchmark and GPU-only check of the project, in one command, in priority order, each stage
# under its own timeout, everything appended to $OUT/gpu.log (OUT defaults to bench/out). Sized to finish
# in <= 8 minutes of wall time on one H100/H200, so one device session (15 minutes with the machine's
# start) leaves room for a rerun. Results go to docs/perf.md with the device, date and versions.
#
#   bash bench/gpu.sh            # on the GPU machine
#   bash bench/gpu.sh --smoke    # on a CPU: the same stages at tiny shapes, so the script cannot rot
#                                # (tests/test_bench.py runs it, with datasets / math_verify /
#                                # bitsandbytes made unimportable, as on the GPU image)
#
# Stages: 1 versions; 2 rollout exactness on the device (engine vs generate, CUDA graphs vs eager);
# 3 rollout throughput at the 1.5B shape (variable then fixed lengths; engine first); 4 the log-prob /
# entropy kernels and the fused lm_head; 5 SFT MFU at the 1.5B shape, sdpa vs flex attention; 6 one RL
# step's time split; 7 family checks at real shapes (Llama-3.1-8B, Qwen3-1.7B: engine == generate);
# 8 rollout throughput at the 0.5B shape.
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
LOG=$OUT/gpu.log
PY=${PYTHON:-python}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SCALE=1  # the smoke run's limits only catch hangs: a shared CPU can be many times slower than an idle one
[ "$SMOKE" = 1 ] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} && SCALE=5

T0=$(date +%s)
FAILED=0
stage() {  # stage NAME SECONDS CMD...: run under a timeout, append to the log, never stop the script
  local name=$1 secs=$(( $2 * SCALE )); shift 2
  local t0; t0=$(date +%s)
  echo "=== $name ($(date -u +%H:%M:%S), limit ${secs}s): $*" | tee -a "$LOG"
  timeout "$secs" "$@" >>"$LOG" 2>&1
  local rc=$?
  [ "$rc" -ne 0 ] && FAILED=$((FAILED + 1))
  echo "=== $name: rc $rc, $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

if [ "$SMOKE" = 1 ]; then
  R15=(--shape tiny); R05=(); SFT=(--shape tiny --seq 256 --steps 1)
  RL=(--shape tiny --rollout-batch 2 --samples 2 --new 8 --steps 1); FAM=(tiny-llama)
  KERN=(--n 32 --vocab 256 --hidden 32 --chunk-tokens 16 --skip-compile)
else
  R15=(--shape qwen2.5-1.5b --batch 256 --new 1024); R05=(--shape qwen2.5-0.5b --batch 256 --new 1024)
  SFT=(--shape qwen2.5-1.5b --seq 4096 --grad-checkpointing --steps 5)
  RL=(--shape qwen2.5-1.5b --rollout-batch 16 --samples 8 --new 1024 --steps 2); FAM=(llama3.1-8b qwen3-1.7b)
  KERN=(--skip-compile)
fi

echo "### bench/gpu.sh $(date -u +%Y-%m-%dT%H:%M:%SZ) smoke=$SMOKE commit $(git rev-parse --short HEAD 2>/dev/null)" | tee -a "$LOG"
stage versions 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null;
  $PY -c 'import torch, transformers, triton, platform; print(\"python\", platform.python_version(), \"| torch\",
  torch.__version__, \"| cuda\", torch.version.cuda, \"| transformers\", transformers.__version__, \"| triton\",
  triton.__version__, \"| device\", torch.cuda.get_device_name() if torch.cuda.is_available() else \"cpu\")'"
stage rollout-check 120 $PY bench/bench_rollout.py "${R15[@]}" --check
stage rollout-1.5b 240 $PY bench/bench_rollout.py "${R15[@]}" --paths engine,eager,generate,static
if [ "$SMOKE" = 1 ]; then
  stage kernels 120 env TRITON_INTERPRET=1 $PY bench/bench_kernels.py "${KERN[@]}" --allow-cpu
else
  stage kernels 150 $PY bench/bench_kernels.py "${KERN[@]}"
fi
stage sft-sdpa 120 $PY bench/bench_sft.py "${SFT[@]}" --attn sdpa
[ "$SMOKE" = 0 ] && stage sft-flex 120 $PY bench/bench_sft.py "${SFT[@]}" --attn flex_attention  # CPU: compiles for minutes
stage rl-step 150 $PY bench/bench_rl_step.py "${RL[@]}"
for f in "${FAM[@]}"; do
  stage "family-$f" 120 $PY bench/bench_rollout.py --shape "$f" --check
done
[ "$SMOKE" = 0 ] && stage rollout-0.5b 120 $PY bench/bench_rollout.py "${R05[@]}" --paths engine,eager --regimes variable

echo "### done in $(( $(date +%s) - T0 ))s, $FAILED stage(s) failed; log: $LOG" | tee -a "$LOG"
[ "$FAILED" -eq 0 ]

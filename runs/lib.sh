# Shared by runs/tiny.sh, runs/frontier.sh and runs/ablate.sh (sourced, not run): the environment that makes
# a run reproducible to the digit, and the stage runner.
#   stage NAME CMD...   run CMD, its output to $OUT/logs/NAME.log; print and record its wall and CPU (user + sys)
#                       seconds ($OUT/timings.txt: NAME WALL CPU); on failure print the log's tail and return 1
#   bg NAME CMD...      the same in the background, at most $JOBS at once;  join: wait for all, stop on a failure
#   eval_model M DIR    the held-out evaluations of checkpoint M into DIR: harmful + arithmetic (DIR/attaq.jsonl,
#                       DIR/math500.jsonl), the harmless look-alikes (DIR/harmless/attaq.jsonl) and the wrapped
#                       harmful prompts (DIR/wrapped/attaq.jsonl), in the background
#   require_tiny_run SCRIPT FILE...   exit 2 naming the first FILE of the tiny run (ROOT_OUT) that is missing
# Needs OUT, W (the world), PY, SEED, JOBS, MAX_NEW, MATH_SAMPLES.

# Every stage single-threaded (a second thread changes float reduction order, hence digits), hash seed fixed,
# offline, no progress bars in the logs.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONHASHSEED=0 TOKENIZERS_PARALLELISM=false
# The CPU's vector instruction set changes the float rounding of matmuls and reductions, hence every digit
# (measured: on one AVX-512 machine, AVX2 kernels instead of AVX-512 ones change the tiny reward model's
# weights in the first stage and every number after). Pin ATen, MKL and oneDNN to their AVX2 code paths, the
# newest that every x86-64 CPU of the last decade has (MKL_CBWR is MKL's conditional numerical
# reproducibility). Measured on two CPU models (an Intel Xeon and an AMD EPYC, both AVX-512): each reruns
# byte-identically, but their pinned tables still differ, so the pin buys reruns on one CPU model, not
# agreement across models; other architectures (ARM) compute other digits. Override by exporting the
# variables before running.
if [ "$(uname -m)" = x86_64 ]; then
  export ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-avx2} MKL_CBWR=${MKL_CBWR:-AVX2} \
    ONEDNN_MAX_CPU_ISA=${ONEDNN_MAX_CPU_ISA:-AVX2}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1
unset TRITON_INTERPRET  # CPU: the kernels' PyTorch reference path

now_ms() { "$PY" -c 'import time; print(int(time.time() * 1000))'; }  # portable (macOS date has no %N)

stage() {
  local name=$1; shift
  local t0 cpu TIMEFORMAT='%U %S'; t0=$(now_ms)
  mkdir -p "$OUT/logs"
  if ! cpu=$( { time "$@" >"$OUT/logs/$name.log" 2>&1; } 2>&1 ); then
    echo "$name FAILED"; echo "--- $OUT/logs/$name.log (tail) ---" >&2; tail -n 40 "$OUT/logs/$name.log" >&2; return 1
  fi
  local ms=$(( $(now_ms) - t0 ))
  cpu=$(echo "$cpu" | awk '{printf "%.1f", $1 + $2}')
  printf '%-24s %4d.%ds wall %7ss cpu\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$cpu"
  printf '%s %d.%d %s\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$cpu" >>"$OUT/timings.txt"
}

PIDS=()
bg() {  # bash 3.2 (macOS) has no `wait -n`: poll the number of running jobs
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 0.2; done
  stage "$@" &
  PIDS+=($!)
}
join() {
  local rc=0 p
  for p in ${PIDS[@]+"${PIDS[@]}"}; do wait "$p" || rc=1; done
  PIDS=()
  [ "$rc" = 0 ] || exit 1
}

eval_model() {  # eval_model NAME MODEL_DIR EVAL_DIR
  bg "eval-$1" "$PY" evaluate.py --model "$2" --benchmarks attaq,math500 \
    --data "attaq=$W/attaq.csv,math500=$W/math500.jsonl" --safety-rm "$W/rm" \
    --samples "attaq=1,math500=$MATH_SAMPLES" --max-new-tokens "$MAX_NEW" --batch-size 64 --rm-batch-size 64 \
    --seed "$SEED" --out "$3"
  bg "harmless-$1" "$PY" evaluate.py --model "$2" --benchmarks attaq --data "attaq=$W/harmless.csv" \
    --safety-rm "$W/rm" --samples 1 --max-new-tokens "$MAX_NEW" --batch-size 64 --rm-batch-size 64 \
    --seed "$SEED" --out "$3/harmless"
  bg "wrapped-$1" "$PY" evaluate.py --model "$2" --benchmarks attaq --data "attaq=$W/wrapped.csv" \
    --safety-rm "$W/rm" --samples 1 --max-new-tokens "$MAX_NEW" --batch-size 64 --rm-batch-size 64 \
    --seed "$SEED" --out "$3/wrapped"
}

entropy_model() {  # entropy_model NAME MODEL_DIR EVAL_DIR ENTROPY_DIR (on the model's own held-out generations)
  bg "entropy-$1" "$PY" entropy.py --model "$1=$2" --input "harmful=$3/attaq.jsonl" \
    --input "arithmetic=$3/math500.jsonl" --match word --bootstrap 200 --batch-size 32 --seed "$SEED" --out "$4"
}

require_tiny_run() {  # require_tiny_run SCRIPT FILE...: the tiny run's outputs a script builds on exist (else exit 2)
  local who=$1 f; shift
  for f in "$@"; do
    [ -e "$f" ] || { echo "$who: $f missing: run 'bash runs/tiny.sh' first (TINY_OUT=$ROOT_OUT)" >&2; exit 2; }
  done
}

check_uint() {  # check_uint NAME VALUE: a non-negative integer (positive with a third argument "pos")
  case "$2" in ''|*[!0-9]*) echo "$1 must be a non-negative integer, got '$2'" >&2; exit 2 ;; esac
  if [ "${3:-}" = pos ] && [ "$2" = 0 ]; then echo "$1 must be positive, got 0" >&2; exit 2; fi
}

#!/usr/bin/env bash
# The advantage estimators side by side in the tiny world: rl.py --estimator reinforce++, reinforce++-baseline,
# grpo and rloo, each from the SAME base model (the one runs/tiny.sh trained) with the SAME budget (steps,
# prompts, samples per prompt, learning rate, β), 3 seeds each; every run evaluated on the held-out sets
# (harmful, wrapped harmful, harmless look-alikes, arithmetic) and analysed at reflection words. Writes
# OUT/ablate/ablate.md: per estimator, mean ± 95% t-interval over the seeds of reward gain, final KL, refusal
# (harmful, wrapped, harmless), arithmetic accuracy and entropy at reflection words.
# ABLATE_GRID=loss runs the second grid instead, into OUT/ablate-loss/: reinforce++ with each rl.py --loss-agg
# (token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm) and dr-grpo (--estimator grpo
# --no-std --loss-agg seq-mean-token-sum-norm), same start, budget and seeds. It is a grid of its own
# because 27 runs would double the estimators' wall time (15 runs of the same size: ~10 minutes).
#
#   bash runs/tiny.sh && bash runs/ablate.sh      # ~8 minutes on 2 CPU cores (not in CI; timings: docs/results.md)
#   ABLATE_GRID=loss bash runs/ablate.sh          # ~10 minutes (5/4 of the above, estimated; not in CI)
#
# The budget is smaller than runs/tiny.sh's RL (12 runs must fit the 30 minutes): ABLATE_STEPS (default 20)
# steps of ABLATE_PROMPTS (default 8) prompts x 4 samples (the group the baselines need), 256 new tokens.
# Environment: TINY_OUT (the tiny run's root, default runs/out/tiny: needs world/ and base/), TINY_JOBS
# (default 2), PYTHON, ABLATE_GRID (estimators or loss), ABLATE_ARMS (comma list, default the grid's arms),
# ABLATE_SEEDS (default "0 1 2"), ABLATE_QUICK=1 (a smoke-sized budget on a --quick world).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,20p' "$0"; exit 0 ;; "") ;; *) echo "usage: bash runs/ablate.sh" >&2; exit 2 ;; esac

ROOT_OUT=${TINY_OUT:-runs/out/tiny}
SEED=0  # evaluation and bootstrap seed: the same for every run, so only training differs
JOBS=${TINY_JOBS:-2}
PY=${PYTHON:-python}
W=$ROOT_OUT/world
BASE=$ROOT_OUT/base
GRID=${ABLATE_GRID:-estimators}
case "$GRID" in
  estimators) OUT=$ROOT_OUT/ablate; ALL=reinforce++,reinforce++-baseline,grpo,rloo ;;
  loss) OUT=$ROOT_OUT/ablate-loss; ALL=token-mean,seq-mean-token-mean,seq-mean-token-sum,seq-mean-token-sum-norm,dr-grpo ;;
  *) echo "ABLATE_GRID: unknown grid '$GRID' (estimators, loss)" >&2; exit 2 ;;
esac
. runs/lib.sh
check_uint TINY_JOBS "$JOBS" pos
require_tiny_run ablate "$W/world.json" "$W/rl_prompts.jsonl" "$W/harmless.csv" "$W/wrapped.csv" "$W/rm/config.json" "$BASE/model.safetensors"
ARMS=${ABLATE_ARMS:-$ALL}
SEEDS=${ABLATE_SEEDS:-"0 1 2"}
if [ "${ABLATE_QUICK:-0}" = 1 ]; then
  STEPS=${ABLATE_STEPS:-2}; PROMPTS=${ABLATE_PROMPTS:-4}; RL_NEW=96; MAX_NEW=96; MATH_SAMPLES=1
else
  STEPS=${ABLATE_STEPS:-20}; PROMPTS=${ABLATE_PROMPTS:-8}; RL_NEW=256; MAX_NEW=320; MATH_SAMPLES=2
fi
check_uint ABLATE_STEPS "$STEPS" pos; check_uint ABLATE_PROMPTS "$PROMPTS" pos
for s in $SEEDS; do check_uint ABLATE_SEEDS "$s"; done
arm_flags() {  # the rl.py flags of one arm of the grid
  case "$GRID:$1" in
    estimators:reinforce++|estimators:reinforce++-baseline|estimators:grpo|estimators:rloo) echo "--estimator $1" ;;
    loss:dr-grpo) echo "--estimator grpo --no-std --loss-agg seq-mean-token-sum-norm" ;;
    loss:token-mean|loss:seq-mean-token-mean|loss:seq-mean-token-sum|loss:seq-mean-token-sum-norm)
      echo "--estimator reinforce++ --loss-agg $1" ;;
    *) return 1 ;;
  esac
}
for a in ${ARMS//,/ }; do
  arm_flags "$a" >/dev/null || { echo "ABLATE_ARMS: unknown $GRID arm '$a' (${ALL//,/, })" >&2; exit 2; }
done

rm -rf "${OUT:?}"; mkdir -p "$OUT/logs"
T_ALL=$(now_ms)
echo "ablate -> $OUT (base $BASE; $GRID grid: $ARMS; seeds $SEEDS; $STEPS steps x $PROMPTS prompts x 4 samples; jobs=$JOBS)"
for s in $SEEDS; do
  for a in ${ARMS//,/ }; do
    # shellcheck disable=SC2046  # the arm's flags split into words on purpose
    bg "$a-s$s" "$PY" rl.py --model "$BASE" --prompts "$W/rl_prompts.jsonl" --out "$OUT/$a-s$s" $(arm_flags "$a") \
      --reward-model "$W/rm" --rule math:1 --score-on full --max-steps "$STEPS" --rollout-batch "$PROMPTS" \
      --samples-per-prompt 4 --train-batch $((PROMPTS * 2)) --epochs-per-rollout 1 --micro-batch-size 32 --lr 2e-4 \
      --warmup-ratio 0.1 --kl-coef 1e-3 --max-new-tokens "$RL_NEW" --temperature 1.0 --gen-batch-size 64 \
      --rm-batch-size 64 --save-every 100000 --dump-every 0 --seed "$s"
  done
done
join
for s in $SEEDS; do for a in ${ARMS//,/ }; do eval_model "$a-s$s" "$OUT/$a-s$s" "$OUT/eval/$a-s$s"; done; done
join
for s in $SEEDS; do
  for a in ${ARMS//,/ }; do entropy_model "$a-s$s" "$OUT/$a-s$s" "$OUT/eval/$a-s$s" "$OUT/entropy/$a-s$s"; done
done
join
stage table "$PY" -m runs.report ablate --out "$OUT" --arms "$ARMS" --seeds "$SEEDS" --grid "$GRID"

echo
cat "$OUT/ablate.md"
echo "total $(( ($(now_ms) - T_ALL) / 1000 ))s wall, $(awk '{c += $3} END {printf "%.0f", c}' "$OUT/timings.txt")s CPU" \
  "(per stage: $OUT/timings.txt; logs: $OUT/logs/)"

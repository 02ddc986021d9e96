#!/usr/bin/env bash
# The safety-vs-reasoning frontier of the tiny world: from ONE base model (the one runs/tiny.sh trained), SFT
# at several epoch counts and RL at several KL coefficients β (each RL run snapshotted at several steps),
# every point evaluated on the same held-out sets (harmful, wrapped harmful, harmless look-alikes,
# arithmetic) with the same settings as runs/tiny.sh. Writes OUT/frontier/frontier.md (the table) and
# OUT/frontier/frontier.png (arithmetic accuracy vs refusal on harmful prompts, 95% intervals, base / SFT / RL
# points labelled).
#
#   bash runs/tiny.sh && bash runs/frontier.sh     # ~10 minutes on 2 CPU cores (not in CI; timings: docs/results.md)
#
# The grid is fixed below, chosen before looking at any result (the epoch counts bracket STAR-1's 5; β
# spans three decades around rl.py's default 1e-3); nothing is picked to reproduce the paper.
# Environment: TINY_OUT (the tiny run's root, default runs/out/tiny: needs its world/ and base/), TINY_JOBS
# (default 2), PYTHON, FRONTIER_EPOCHS (default "1 2 3 5 8"), FRONTIER_BETAS (default "0 1e-3 1e-2 1e-1"),
# FRONTIER_STEPS (RL snapshots, default "10 20 30"; the last is the run's length, the LR schedule spans it),
# FRONTIER_QUICK=1 (a smoke-sized grid on a --quick world).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in -h|--help) sed -n '2,15p' "$0"; exit 0 ;; "") ;; *) echo "usage: bash runs/frontier.sh" >&2; exit 2 ;; esac

ROOT_OUT=${TINY_OUT:-runs/out/tiny}
SEED=0
JOBS=${TINY_JOBS:-2}
PY=${PYTHON:-python}
W=$ROOT_OUT/world
BASE=$ROOT_OUT/base
OUT=$ROOT_OUT/frontier
. runs/lib.sh
check_uint TINY_JOBS "$JOBS" pos
require_tiny_run frontier "$W/world.json" "$W/star1.json" "$W/rl_prompts.jsonl" "$W/harmless.csv" "$W/wrapped.csv" \
  "$W/rm/config.json" "$BASE/model.safetensors"
if [ "${FRONTIER_QUICK:-0}" = 1 ]; then
  EPOCHS=${FRONTIER_EPOCHS:-"1 2"}; BETAS=${FRONTIER_BETAS:-"1e-3 1e-1"}; STEPS=${FRONTIER_STEPS:-"1 2"}
  RL_PROMPTS=4; RL_N=2; RL_NEW=96; MAX_NEW=96; MATH_SAMPLES=1
else  # the settings of runs/tiny.sh's full run
  EPOCHS=${FRONTIER_EPOCHS:-"1 2 3 5 8"}; BETAS=${FRONTIER_BETAS:-"0 1e-3 1e-2 1e-1"}; STEPS=${FRONTIER_STEPS:-"10 20 30"}
  RL_PROMPTS=16; RL_N=4; RL_NEW=256; MAX_NEW=320; MATH_SAMPLES=2
fi
for e in $EPOCHS; do check_uint FRONTIER_EPOCHS "$e" pos; done
for s in $STEPS; do check_uint FRONTIER_STEPS "$s" pos; done
for b in $BETAS; do "$PY" -c "import sys; float(sys.argv[1]) >= 0 or sys.exit(1)" "$b" 2>/dev/null \
  || { echo "FRONTIER_BETAS: '$b' is not a non-negative number" >&2; exit 2; }; done
LAST=$(for s in $STEPS; do echo "$s"; done | sort -n | tail -n 1)

rm -rf "${OUT:?}"; mkdir -p "$OUT/logs"
T_ALL=$(now_ms)
echo "frontier -> $OUT (base $BASE; SFT epochs: $EPOCHS; RL β: $BETAS at steps $STEPS; jobs=$JOBS)"

# the points that need no training: base; SFT runs, one per epoch count (the cosine schedule spans each)
eval_model base "$BASE" "$OUT/eval/base"
for e in $EPOCHS; do
  bg "sft-e$e" "$PY" sft.py --model "$BASE" --data "$W/star1.json" --out "$OUT/sft-e$e" --epochs "$e" --lr 1e-3 \
    --warmup-ratio 0.05 --batch-size 16 --micro-batch-size 16 --max-len 512 --decontaminate "$W/attaq.csv" --seed "$SEED"
done
# RL: one run per β, stopped at each snapshot step (--stop-at, then --resume: the same trajectory as an
# uninterrupted run, the LR schedule spanning the last step), the checkpoint copied out as a point
rl_run() {  # rl_run BETA
  local d="$OUT/rl-b$1" s
  for s in $(for s in $STEPS; do echo "$s"; done | sort -n); do
    "$PY" rl.py --model "$BASE" --prompts "$W/rl_prompts.jsonl" --out "$d" --reward-model "$W/rm" --rule math:1 \
      --score-on full --max-steps "$LAST" --stop-at "$s" $( [ -d "$d/state" ] && echo --resume ) \
      --rollout-batch "$RL_PROMPTS" --samples-per-prompt "$RL_N" --train-batch $((RL_PROMPTS * RL_N / 2)) \
      --epochs-per-rollout 1 --micro-batch-size 32 --lr 2e-4 --warmup-ratio 0.1 --kl-coef "$1" \
      --max-new-tokens "$RL_NEW" --temperature 1.0 --gen-batch-size 64 --rm-batch-size 64 --save-every 1000 \
      --dump-every 0 --seed "$SEED" || return 1
    mkdir -p "$d-s$s"
    cp "$d"/*.json "$d"/*.safetensors "$d"/*.jinja "$d-s$s"/ 2>/dev/null || cp "$d"/*.json "$d"/*.safetensors "$d-s$s"/
  done
}
for b in $BETAS; do bg "rl-b$b" rl_run "$b"; done
join
for e in $EPOCHS; do eval_model "sft-e$e" "$OUT/sft-e$e" "$OUT/eval/sft-e$e"; done
for b in $BETAS; do for s in $STEPS; do eval_model "rl-b$b-s$s" "$OUT/rl-b$b-s$s" "$OUT/eval/rl-b$b-s$s"; done; done
join
stage table "$PY" -m runs.report frontier --out "$OUT" --epochs "$EPOCHS" --betas "$BETAS" --steps "$STEPS"

echo
cat "$OUT/frontier.md"
echo "total $(( ($(now_ms) - T_ALL) / 1000 ))s wall, $(awk '{c += $3} END {printf "%.0f", c}' "$OUT/timings.txt")s CPU" \
  "(per stage: $OUT/timings.txt; logs: $OUT/logs/)"

#!/usr/bin/env bash
# The whole paper in miniature, offline, on a laptop CPU:
#   build the tiny world -> base model (sft.py --full-sequence from a random init: capable, unsafe)
#   -> SFT on the STAR-1-like safety set -> RL (REINFORCE++) from base with the tiny reward model
#   -> evaluate base, sft, rl on held-out harmful, wrapped harmful, harmless look-alike and arithmetic prompts
#   -> entropy at reflection tokens -> the table (OUT/results.md), the entropy figures and the training
#   curves (OUT/curves_{base,sft,rl}.png) beside it.
#
#   bash runs/tiny.sh            # full: about 10 minutes on 2 CPU cores, most of it the serial base training
#                                # (measured timings: docs/results.md)
#   bash runs/tiny.sh --quick    # CI-sized (what tests/test_tiny.py runs, twice): a tiny world, one epoch
#                                # each, two RL steps; its table shows the plumbing, not results
#
# Reproducible to the digit: every random choice is seeded (world, inits, data order, sampling per
# (seed + step, global sample index, token index), bootstrap), PYTHONHASHSEED is fixed, every stage runs single-threaded
# and runs/lib.sh pins the CPU kernels to their AVX2 code paths (the vector ISA changes the digits), so a
# rerun on the same machine and software writes a byte-identical results.md. Independent stages (SFT
# beside RL, the six evaluations, the three entropy passes) run side by side, TINY_JOBS at a time; as each
# stage is single-threaded and seeded on its own, that changes the wall time, not a digit. The settings are
# the tiny world's analogues of the paper's (base: from scratch; SFT: STAR-1's 5 epochs, cosine, 5% warmup;
# RL: REINFORCE++ with k1 KL in the reward, temperature 1.0), learning rates scaled up for a 1M-parameter model.
#
# Environment: TINY_OUT (output root, default runs/out/tiny), TINY_SEED (default 0), TINY_JOBS (stages run
# side by side, default 2), PYTHON (default python). OMP_NUM_THREADS is set to 1 for every stage (threads
# are not a knob here: a second thread changes the float reduction order, hence the digits, and OpenMP
# threads stall badly when other jobs share the cores). Every stage's full log is in OUT/logs/STAGE.log.
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "usage: bash runs/tiny.sh [--quick]" >&2; exit 2 ;;
  esac
done
OUT=${TINY_OUT:-runs/out/tiny}
SEED=${TINY_SEED:-0}
JOBS=${TINY_JOBS:-2}
PY=${PYTHON:-python}
. runs/lib.sh
check_uint TINY_SEED "$SEED"; check_uint TINY_JOBS "$JOBS" pos

W=$OUT/world
if [ "$QUICK" = 1 ]; then
  WORLD_FLAGS=(--quick --rm-steps 20)
  BASE_EPOCHS=1; SFT_EPOCHS=1; RL_STEPS=2; RL_PROMPTS=4; RL_N=2; RL_NEW=96; MAX_NEW=96; MATH_SAMPLES=1
else
  WORLD_FLAGS=()
  BASE_EPOCHS=6; SFT_EPOCHS=5; RL_STEPS=30; RL_PROMPTS=16; RL_N=4; RL_NEW=256; MAX_NEW=320; MATH_SAMPLES=2
fi

# a rerun starts from scratch (the stages append to metrics.jsonl and rollouts/)
for d in world base sft rl eval entropy logs; do rm -rf "${OUT:?}/$d"; done
rm -f "$OUT/results.md" "$OUT/timings.txt" "$OUT"/entropy_*.png "$OUT"/curves_*.png
mkdir -p "$OUT/logs"

T_ALL=$(now_ms)
echo "tiny world -> $OUT (quick=$QUICK, seed=$SEED, jobs=$JOBS, threads per stage=$OMP_NUM_THREADS)"
stage world "$PY" -m runs.make_world --out "$W" --seed "$SEED" ${WORLD_FLAGS[@]+"${WORLD_FLAGS[@]}"}

# base: full-sequence training from the random init on compliant answers + arithmetic chains of thought
stage base "$PY" sft.py --model "$W/init" --data "$W/base.jsonl" --out "$OUT/base" --full-sequence \
  --epochs "$BASE_EPOCHS" --lr 5e-3 --warmup-ratio 0.05 --batch-size 16 --micro-batch-size 16 --max-len 256 \
  --seed "$SEED"

# SFT and RL both start from base: side by side (and base's evaluations after the first of them ends).
# SFT: the STAR-1-like safety set (response-only loss), decontaminated against the held-out harmful prompts
bg sft "$PY" sft.py --model "$OUT/base" --data "$W/star1.json" --out "$OUT/sft" \
  --epochs "$SFT_EPOCHS" --lr 1e-3 --warmup-ratio 0.05 --batch-size 16 --micro-batch-size 16 --max-len 512 \
  --decontaminate "$W/attaq.csv" --seed "$SEED"
# RL from base: the star1 prompts (+ some arithmetic prompts), tiny reward model + math rule
bg rl "$PY" rl.py --model "$OUT/base" --prompts "$W/rl_prompts.jsonl" --out "$OUT/rl" \
  --reward-model "$W/rm" --rule math:1 --score-on full --max-steps "$RL_STEPS" \
  --rollout-batch "$RL_PROMPTS" --samples-per-prompt "$RL_N" --train-batch $((RL_PROMPTS * RL_N / 2)) \
  --epochs-per-rollout 1 --micro-batch-size 32 --lr 2e-4 --warmup-ratio 0.1 --kl-coef 1e-3 \
  --max-new-tokens "$RL_NEW" --temperature 1.0 --gen-batch-size 64 --rm-batch-size 64 --save-every 1000 \
  --dump-every 5 --seed "$SEED"
# held-out evaluations: harmful (AttaQ-like) + arithmetic (MATH-500-like), and the harmless look-alikes and the
# wrapped harmful prompts (the same AttaQ format and grader; only their refusal rate is read)
eval_model base "$OUT/base" "$OUT/eval/base"
join
for m in sft rl; do eval_model "$m" "$OUT/$m" "$OUT/eval/$m"; done
entropy_model base "$OUT/base" "$OUT/eval/base" "$OUT/entropy/base"
join
for m in sft rl; do entropy_model "$m" "$OUT/$m" "$OUT/eval/$m" "$OUT/entropy/$m"; done
bg curves "$PY" -m runs.curves "$OUT/base/metrics.jsonl" "$OUT/sft/metrics.jsonl" "$OUT/rl/metrics.jsonl" \
  --out "$OUT/curves_base.png" --out "$OUT/curves_sft.png" --out "$OUT/curves_rl.png" \
  --title "base (sft.py --full-sequence)" --title "SFT on the STAR-1-like set" --title "RL (REINFORCE++) from base"
join
stage table "$PY" -m runs.report table --out "$OUT"

echo
cat "$OUT/results.md"
echo "total $(( ($(now_ms) - T_ALL) / 1000 ))s wall, $(awk '{c += $3} END {printf "%.0f", c}' "$OUT/timings.txt")s CPU" \
  "(per stage: $OUT/timings.txt; logs: $OUT/logs/)"

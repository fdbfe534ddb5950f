#!/usr/bin/env bash
# Reproduces docs/results/fashion-mnist: every row of results.md, in order, resumable.
#
#   bash docs/results/fashion-mnist/run.sh            # the whole series (~2.5 h on 2 cores)
#   LANE_THREADS=4 ...                                  # threads per lane on a bigger machine
#   SLIMTRAIN=path/to/slimtrain RUNS=runs/fmnist bash docs/results/fashion-mnist/run.sh
#
# Each run directory keeps its checkpoints, so after a kill the same command continues where it
# stopped (train/distill/prune --resume); finished steps are skipped. Schedule: 8 epochs at
# lr 1e-3, then 2 epochs at 1e-4 (a resume with a lower --lr: a step decay), batch 32, 64x64.
set -euo pipefail
cd "$(dirname "$0")/../../.."
if [[ -z "${SLIMTRAIN:-}" ]]; then
  cargo build --release -p slimtrain
  SLIMTRAIN=target/release/slimtrain
fi
RUNS=${RUNS:-runs/fmnist}
OUT=docs/results/fashion-mnist
DATA=$("$SLIMTRAIN" data fetch fashion-mnist | tail -n1 | sed 's/^fashion-mnist: //')
COMMON=(--data "$DATA" --input-size 64 --batch-size 32 --seed 0)
mkdir -p "$RUNS"

# run NAME SUBCOMMAND ARGS...: starts RUNS/NAME or resumes it; one log per run.
run() {
  local name=$1 sub=$2
  shift 2
  local resume=()
  [[ -f "$RUNS/$name/run.json" ]] && resume=(--resume)
  echo "== $(date -u +%FT%TZ) $sub $name $*"
  "$SLIMTRAIN" "$sub" "${COMMON[@]}" --out "$RUNS/$name" "${resume[@]}" "$@" 2>>"$RUNS/$name.log"
}
# two-phase schedule: 8 epochs at 1e-3, then epochs 9-10 at 1e-4
fit() {
  local name=$1 sub=$2
  shift 2
  run "$name" "$sub" --epochs 8 --lr 1e-3 "$@"
  run "$name" "$sub" --epochs 10 --lr 1e-4 "$@"
}

fit big train --arch big
fit kd distill --teacher "$RUNS/big/best" --arch student-deeper --temperature 20 --alpha 0.5
# The rest runs as two lanes of one thread each (two single-threaded runs get more done on two
# cores than one run split across both): the scratch student and group-conv, and std-conv and
# the pruning curves. Pruning starts from the distilled student-deeper: 5 steps, 1 fine-tuning
# epoch each, a fresh AdamW per step, cross-entropy only (as the study).
prune_curve() {
  local rate=$1
  [[ -f "$RUNS/prune-$rate/curve.csv" ]] && [[ $(wc -l <"$RUNS/prune-$rate/curve.csv") -ge 7 ]] && return
  run "prune-$rate" prune --model "$RUNS/kd/best" --rate "$rate" --steps 5 --epochs 1 --lr 5e-4
}
export RAYON_NUM_THREADS=${LANE_THREADS:-1}
(fit student-deeper train --arch student-deeper && fit group-conv train --arch group-conv) &
lane_a=$!
(fit std-conv train --arch std-conv && prune_curve 0.95 && prune_curve 0.90) &
lane_b=$!
wait $lane_a
wait $lane_b
unset RAYON_NUM_THREADS

for fmt in uint8 uint8_per_channel f16; do
  "$SLIMTRAIN" quantize --model "$RUNS/kd/best" --out "$RUNS/kd-$fmt" --format "$fmt"
  "$SLIMTRAIN" quantize --model "$RUNS/student-deeper/best" --out "$RUNS/student-deeper-$fmt" --format "$fmt"
done
"$SLIMTRAIN" quantize --model "$RUNS/big/best" --out "$RUNS/big-uint8" --format uint8

models=()
for m in big big-uint8 kd kd-uint8 kd-uint8_per_channel kd-f16 student-deeper student-deeper-uint8 \
         student-deeper-uint8_per_channel student-deeper-f16 std-conv group-conv; do
  dir="$RUNS/$m"
  [[ -d "$dir/best" ]] && dir="$dir/best"
  "$SLIMTRAIN" eval --model "$dir" --data "$DATA" --json >"$OUT/eval-$m.json"
  models+=(--model "$m=$dir:$OUT/eval-$m.json")
done
"$SLIMTRAIN" report --out "$OUT" --title "Fashion-MNIST (64x64, full 10,000-image test set)" \
  --run big-run=$RUNS/big --run kd-run=$RUNS/kd --run student-deeper-run=$RUNS/student-deeper \
  --run std-conv-run=$RUNS/std-conv --run group-conv-run=$RUNS/group-conv \
  --prune rate-0.95=$RUNS/prune-0.95 --prune rate-0.90=$RUNS/prune-0.90 "${models[@]}"
for f in "$RUNS"/*/log.csv "$RUNS"/prune-*/curve.csv; do
  n=$(basename "$(dirname "$f")")
  cp "$f" "$OUT/$n-$(basename "$f")"
done
echo "== $(date -u +%FT%TZ) done: $OUT/results.md"

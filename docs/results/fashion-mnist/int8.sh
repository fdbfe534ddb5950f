#!/usr/bin/env bash
# int8 engine accuracy on Fashion-MNIST: big and student-deeper (and kd when run.sh made it), each
# in f32 and quantized with `slimtrain quantize --format int8` (calibrated on 256 training
# images), evaluated on the full 10,000-image test set; writes int8-accuracy.md beside run.sh.
#
#   RUNS=runs/fmnist bash docs/results/fashion-mnist/int8.sh   # the models run.sh trained
#   EPOCHS=3 RUNS=runs/fmnist-short bash docs/results/fashion-mnist/int8.sh
#
# A model missing from RUNS is trained first (run.sh's flags, EPOCHS epochs at lr 1e-3; default
# 3, a shorter schedule than run.sh's 10: the figure that matters is the int8-f32 gap).
set -euo pipefail
cd "$(dirname "$0")/../../.."
if [[ -z "${SLIMTRAIN:-}" ]]; then
  cargo build --release -p slimtrain
  SLIMTRAIN=target/release/slimtrain
fi
RUNS=${RUNS:-runs/fmnist}
EPOCHS=${EPOCHS:-3}
OUT=docs/results/fashion-mnist
DATA=$("$SLIMTRAIN" data fetch fashion-mnist | tail -n1 | sed 's/^fashion-mnist: //')
COMMON=(--data "$DATA" --input-size 64 --batch-size 32 --seed 0)
mkdir -p "$RUNS"

for arch in big student-deeper; do
  if [[ ! -d "$RUNS/$arch/best" ]]; then
    resume=()
    [[ -f "$RUNS/$arch/run.json" ]] && resume=(--resume)
    echo "== $(date -u +%FT%TZ) train $arch ($EPOCHS epochs)"
    "$SLIMTRAIN" train "${COMMON[@]}" --arch "$arch" --out "$RUNS/$arch" "${resume[@]}" \
      --epochs "$EPOCHS" --lr 1e-3 2>>"$RUNS/$arch.log"
  fi
done

acc() { python3 -c 'import json,sys; print("%.4f" % json.load(open(sys.argv[1]))["accuracy"])' "$1"; }
size() { stat -c %s "$1/model.safetensors"; }
{
  echo "# int8 engine accuracy, Fashion-MNIST (64x64, full 10,000-image test set)"
  echo
  echo "Made by \`RUNS=$RUNS EPOCHS=$EPOCHS bash docs/results/fashion-mnist/int8.sh\` on $(date -u +%F)."
  echo
  echo "| model | f32 accuracy | int8 accuracy | int8 - f32 (points) | f32 bytes | int8 bytes |"
  echo "|---|---|---|---|---|---|"
} >"$OUT/int8-accuracy.md.tmp"
for m in big student-deeper kd; do
  src="$RUNS/$m/best"
  [[ -d "$src" ]] || continue
  [[ -f "$RUNS/$m-int8/config.json" ]] ||
    "$SLIMTRAIN" quantize --model "$src" --out "$RUNS/$m-int8" --format int8 \
      --calibration-data "$DATA" --calibration-images 256
  "$SLIMTRAIN" eval --model "$src" --data "$DATA" --json >"$OUT/eval-$m.json.tmp"
  "$SLIMTRAIN" eval --model "$RUNS/$m-int8" --data "$DATA" --json >"$OUT/eval-$m-int8.json.tmp"
  f=$(acc "$OUT/eval-$m.json.tmp")
  q=$(acc "$OUT/eval-$m-int8.json.tmp")
  d=$(python3 -c "print('%+.2f' % (100 * ($q - $f)))")
  echo "| $m | $f | $q | $d | $(size "$src") | $(size "$RUNS/$m-int8") |" >>"$OUT/int8-accuracy.md.tmp"
  echo "== $m: f32 $f, int8 $q ($d points)"
  # run.sh's own eval-<model>.json (10-epoch models) stay as they are; these are int8.sh's.
  mv "$OUT/eval-$m.json.tmp" "$OUT/int8-eval-$m.json"
  mv "$OUT/eval-$m-int8.json.tmp" "$OUT/int8-eval-$m-int8.json"
done
mv "$OUT/int8-accuracy.md.tmp" "$OUT/int8-accuracy.md"
cat "$OUT/int8-accuracy.md"

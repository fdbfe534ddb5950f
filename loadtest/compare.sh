#!/usr/bin/env bash
# The big-vs-KD-vs-quantized comparison in BENCHMARKS.md: starts the release server on loopback
# with the shipped models, runs `slimserve compare` (each model, then mixed, at concurrency 1
# and 32), writes the table and the full JSON, and stops the server.
#
#   bash loadtest/compare.sh [OUT_DIR]        # default OUT_DIR: loadtest/reports
#   REQUESTS=300 DURATION=30s IMAGES=.cache/food-photos/val bash loadtest/compare.sh
#   API=kserve bash loadtest/compare.sh      # raw FP32 [1,3,S,S] tensors through ModelInfer
#
# IMAGES (default: .cache/food-photos/val when fetched by `slimtrain data fetch food-photos`)
# sends real photos through the own API; without it, requests carry preprocessed tensors.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-loadtest/reports}
REQUESTS=${REQUESTS:-300}
DURATION=${DURATION:-30s}
GRPC=${GRPC:-127.0.0.1:18101}
METRICS=${METRICS:-127.0.0.1:18102}
IMAGES=${IMAGES:-.cache/food-photos/val}
API=${API:-classify}
mkdir -p "$OUT"
cargo build --release --bin slimserve
BIN=target/release/slimserve
[[ -n "${CARGO_TARGET_DIR:-}" ]] && BIN=$CARGO_TARGET_DIR/release/slimserve

"$BIN" serve --models models --grpc-addr "$GRPC" --metrics-addr "$METRICS" --http-addr off >"$OUT/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "serving .* model(s)" "$OUT/server.log" && break
  kill -0 $server 2>/dev/null || { cat "$OUT/server.log"; exit 1; }
  sleep 0.5
done
images=()
[[ "$API" == classify && -d "$IMAGES" ]] && images=(--images "$IMAGES")
"$BIN" compare --api "$API" --addr "$GRPC" --metrics-url "http://$METRICS/metrics" --concurrency 1,32 \
  --requests "$REQUESTS" --duration "$DURATION" --warmup 20 "${images[@]}" \
  --eval-dir docs/results/food-photos --markdown "$OUT/compare.md" --json "$OUT/compare.json"
echo "table: $OUT/compare.md ($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"

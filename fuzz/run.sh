#!/usr/bin/env bash
# Runs the fuzz targets (cargo-fuzz, libFuzzer, nightly Rust; see fuzz/README.md).
#
#   fuzz/run.sh SECONDS [TARGET...]     each target for SECONDS (CI: 10)
#   fuzz/run.sh --runs N [TARGET...]    each target for N executions (the long run: 10000000)
#
# Each target starts from its seeds (fuzz/seeds/TARGET, read only) and grows its own corpus in
# fuzz/corpus/TARGET; a crash, a timeout (10 s on one input), a leak or memory over 2 GiB stops
# the run with the failing input in fuzz/artifacts/TARGET and a non-zero exit. libFuzzer's log
# of each run is kept in fuzz/logs/TARGET.log; the last line it prints per target is echoed.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '4,5p' "$0" | sed 's/^# *//' >&2; exit 2; }
[ $# -ge 1 ] || usage
if [ "$1" = "--runs" ]; then
  [ $# -ge 2 ] || usage
  limit=(-runs="$2"); shift 2
else
  [[ "$1" =~ ^[0-9]+$ ]] || usage
  limit=(-max_total_time="$1"); shift
fi
all=(image classify_request model_infer_request rest_infer_request model_dir checkpoint)
targets=("${@:-${all[@]}}")

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: needs a nightly Rust toolchain (rustup toolchain install nightly)" >&2
  exit 1
fi
# .ci/setup builds a pinned cargo-fuzz into .ci/bin.
export PATH="$PWD/.ci/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz/run.sh: needs cargo-fuzz (bash .ci/setup builds it into .ci/bin)" >&2
  exit 1
fi

cd fuzz
# One build of every target (release, debug assertions, AddressSanitizer).
cargo +nightly fuzz build -O
mkdir -p logs
for t in "${targets[@]}"; do
  [ -d "seeds/$t" ] || { echo "fuzz/run.sh: unknown target $t (${all[*]})" >&2; exit 2; }
  mkdir -p "corpus/$t" "artifacts/$t"
  start=$(date +%s)
  if ! cargo +nightly fuzz run -O "$t" "corpus/$t" "seeds/$t" -- \
      "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="artifacts/$t/" >"logs/$t.log" 2>&1; then
    tail -n 60 "logs/$t.log" >&2
    echo "fuzz/run.sh: target $t FAILED; the input is in fuzz/artifacts/$t/ (log: fuzz/logs/$t.log)" >&2
    exit 1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo "?")
  echo "fuzz $t: $runs executions in $(( $(date +%s) - start )) s, no failure (corpus: $(ls "corpus/$t" | wc -l) inputs)"
done

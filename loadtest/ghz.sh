#!/usr/bin/env bash
# Runs every ghz config in loadtest/ (Classify with a food photo and KServe ModelInfer with a raw
# tensor, for each of big, kd and kd-q8) against a running server, one after another, and keeps
# ghz's JSON report of each.
#
#   bash loadtest/ghz.sh [PHOTO] [-- EXTRA_GHZ_ARGS...]
#
# PHOTO: the image the Classify configs send (default: the first file under
# .cache/food-photos/val). The request bodies are written to loadtest/data/ (gitignored: the
# photos may not be committed), then each config runs as `ghz --config loadtest/NAME.json`.
# Environment:
#   HOST     server address, overriding the configs' 127.0.0.1:8001 (e.g. HOST=slimserve:8001)
#   OUT      report folder (default: loadtest/reports/<UTC timestamp>); one NAME.json per config
#   CONFIGS  which configs to run (default: 'loadtest/*.json'), e.g. CONFIGS='loadtest/infer-*.json'
# Extra arguments after `--` go to every ghz run and override the configs, e.g.
#   bash loadtest/ghz.sh -- --concurrency 32 --total 5000 --disable-template-data
set -euo pipefail
cd "$(dirname "$0")/.."

photo=
if [ $# -gt 0 ] && [ "$1" != "--" ]; then photo=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
extra=("$@")

# ghz on PATH, else the one `bash .ci/setup` builds (pinned) into .ci/bin.
ghz=$(command -v ghz || true)
if [ -z "$ghz" ] && [ -x .ci/bin/ghz ]; then ghz=.ci/bin/ghz; fi
if [ -z "$ghz" ]; then
  cat >&2 <<'EOF'
ghz.sh: ghz is not installed (not on PATH, no .ci/bin/ghz).
  `bash .ci/setup` builds the pinned version into .ci/bin with Go; or install a release binary
  from the ghz project's GitHub releases page, `brew install ghz`, or
  `go install github.com/bojand/ghz/cmd/ghz@v0.120.0`; see loadtest/README.md.
  Without ghz, `slimserve load` drives the same requests (see loadtest/README.md).
EOF
  exit 127
fi
command -v python3 >/dev/null 2>&1 || { echo "ghz.sh: python3 is needed to write the request bodies" >&2; exit 1; }

prep=(python3 loadtest/prepare.py --out loadtest/data)
if [ -n "$photo" ]; then prep+=(--image "$photo"); fi
"${prep[@]}"

out=${OUT:-loadtest/reports/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$out"
host_arg=()
if [ -n "${HOST:-}" ]; then host_arg=("$HOST"); fi

failed=0
# shellcheck disable=SC2086 # CONFIGS is a glob on purpose
for config in ${CONFIGS:-loadtest/*.json}; do
  name=$(basename "$config" .json)
  echo "== $name ($config) -> $out/$name.json"
  if "$ghz" --config "$config" --format json --output "$out/$name.json" "${extra[@]}" "${host_arg[@]}"; then
    python3 - "$out/$name.json" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
ms = lambda ns: f"{ns / 1e6:.1f} ms"
lat = {d["percentage"]: d["latency"] for d in r.get("latencyDistribution") or []}
print(f"   {r.get('count')} requests, {r.get('rps', 0):.1f} req/s, average {ms(r.get('average', 0))}, "
      f"p50 {ms(lat.get(50, 0))}, p99 {ms(lat.get(99, 0))}, status codes {r.get('statusCodeDistribution')}")
PY
  else
    echo "ghz.sh: $name failed" >&2
    failed=1
  fi
done
echo "ghz.sh: reports in $out"
exit $failed

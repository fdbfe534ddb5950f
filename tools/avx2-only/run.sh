#!/usr/bin/env bash
# Runs a command as an AVX2-only x86-64 CPU would, on a machine with AVX-512: CPUID answers
# without the AVX-512 bits (tools/avx2-only/avx2_only.c, preloaded), so this engine's detection,
# ONNX Runtime's MLAS, numpy and the gemm crate all choose their AVX2 kernels. Needs CPUID
# faulting (`cpuid_fault` in /proc/cpuinfo, Linux >= 4.12, also under KVM) and a C compiler.
#
#   bash tools/avx2-only/run.sh slimtrain bench --arch big,student-deeper --threads 2
#   AVX2_ONLY_VERBOSE=1 bash tools/avx2-only/run.sh ...   # each process reports its masked queries
#
# The instruction set is emulated, not the microarchitecture: figures are those of this CPU's
# cores running AVX2 code (on both sides of a comparison), not those of a Zen 3 or a Haswell.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [[ $# -eq 0 ]]; then
  sed -n '2,11p' "$0"
  exit 2
fi
if ! grep -qw cpuid_fault /proc/cpuinfo; then
  echo "avx2-only: this CPU or kernel has no CPUID faulting (no cpuid_fault in /proc/cpuinfo)" >&2
  exit 3
fi
lib=${TMPDIR:-/tmp}/avx2-only-$(id -u).so
if [[ ! -f "$lib" || "$here/avx2_only.c" -nt "$lib" ]]; then
  cc -O2 -shared -fPIC -o "$lib.tmp" "$here/avx2_only.c"
  mv "$lib.tmp" "$lib"
fi
LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}" exec "$@"

#!/usr/bin/env bash
# Prints, one per line, every driver-API symbol a binary compiled against the given cuda.h can
# reference: the cu* names declared with `(`, and the targets of cuda.h's `#define cuX cuY`
# renames (cuCtxDestroy -> cuCtxDestroy_v2, ...) and of its __CUDA_API_PTDS/PTSZ wrappers, which
# are what the object files name.
# Used by deploy/gpu-check.sh to build the link-time stub libcuda.
#   bash deploy/cuda-stub-symbols.sh path/to/cuda.h
set -euo pipefail
h=${1:?usage: cuda-stub-symbols.sh path/to/cuda.h}
[ -r "$h" ] || { echo "cuda-stub-symbols: cannot read $h" >&2; exit 1; }
{
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' "$h" | sed -E 's/[[:space:]]*\($//'
  grep -hE '^[[:space:]]*#[[:space:]]*define[[:space:]]+cu[A-Z][A-Za-z0-9_]*[[:space:]]+cu[A-Z][A-Za-z0-9_]*[[:space:]]*$' "$h" \
    | awk '{ print $NF }'
  # `#define cuX __CUDA_API_PTDS(cuX_v2)`: the inner name (default stream semantics) and its
  # per-thread-stream variant.
  grep -ohE '__CUDA_API_PT(DS|SZ)\([[:space:]]*cu[A-Z][A-Za-z0-9_]*[[:space:]]*\)' "$h" \
    | sed -E 's/__CUDA_API_PT(DS|SZ)\([[:space:]]*([A-Za-z0-9_]+)[[:space:]]*\)/\2 \2_pt\L\1/' \
    | tr ' ' '\n'
} | sort -u

#!/usr/bin/env bash
# GPU check: builds slimserve with candle's CUDA backend (no system CUDA toolkit needed: the
# toolkit comes from NVIDIA's pip wheels, per shared/GPU.md), then
#   1. examples/gpu_check: the server's CPU path vs its GPU path (inputs uploaded as sent,
#      device-generic ops) within 1e-3, as FP32 and as UINT8 batches, for every model under
#      models/ (or fresh `big` and `student-deeper` if there are none), and GPU images/s per
#      model at batch 1, 32, 128 and 256 (upload and compute apart);
#   2. the server on the GPU: `slimserve --device cuda:0` on loopback, `slimserve classify` of
#      a test image against each model, clean shutdown on SIGTERM.
# Run from the repository root on a machine with an NVIDIA driver (H100/H200: sm_90):
#   bash deploy/gpu-check.sh            # B=/path/to/build-cache to reuse the toolkit venv
#   bash deploy/gpu-check.sh --build-only   # no GPU needed: build, link, check the stub with nm,
#                                           # run the device path's ops on the CPU
# Needs python3 (venv, pip), gcc, cargo and PyPI access for the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_ONLY=0
case "${1:-}" in
  --build-only) BUILD_ONLY=1 ;;
  "") ;;
  *) echo "usage: bash deploy/gpu-check.sh [--build-only]" >&2; exit 2 ;;
esac

B=${B:-$PWD/target/gpu-check}
MODELS=${MODELS:-models}
mkdir -p "$B"

echo "== CUDA toolkit from pip wheels into $B/venv"
if [ ! -x "$B/venv/bin/python" ]; then python3 -m venv "$B/venv"; fi
"$B/venv/bin/pip" install -q --disable-pip-version-check --no-deps \
  nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
  nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
N=$(echo "$B"/venv/lib/python3*/site-packages/nvidia)
[ -d "$N/cu13/bin" ] || { echo "gpu-check: no $N/cu13 after pip install" >&2; exit 1; }

echo "== fake CUDA_HOME in $B/cuda (links into the wheels, stub libcuda for linking only)"
CUDA_HOME=$B/cuda
rm -rf "$CUDA_HOME"
mkdir -p "$CUDA_HOME/lib/stubs"
for d in bin include nvvm; do ln -s "$N/cu13/$d" "$CUDA_HOME/$d"; done
link_lib() { # name target-glob
  local target
  target=$(ls "$N"/cu13/lib/$2 2>/dev/null | head -1)
  [ -n "$target" ] || { echo "gpu-check: missing $2 in $N/cu13/lib" >&2; exit 1; }
  ln -s "$target" "$CUDA_HOME/lib/$1"
}
link_lib libcudart.so 'libcudart.so.13*'
link_lib libcublas.so 'libcublas.so.13*'
link_lib libcublasLt.so 'libcublasLt.so.13*'
link_lib libnvrtc.so 'libnvrtc.so.13*'
link_lib libcurand.so 'libcurand.so.10*'
# One dummy function per cu* symbol in cuda.h: enough to link; the driver's libcuda.so.1
# provides the real ones at run time. Never put this directory on LD_LIBRARY_PATH.
# The names declared with `(`, plus what cuda.h maps them to with `#define cuX cuX_v2` (the
# symbols a binary built against cuda.h actually references: cuCtxDestroy_v2, ...).
bash deploy/cuda-stub-symbols.sh "$CUDA_HOME/include/cuda.h" \
  | sed 's/.*/void &(void) {}/' > "$B/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA_HOME/lib/stubs/libcuda.so" "$B/libcuda_stub.c"

export CUDA_HOME PATH=$CUDA_HOME/bin:$PATH CUDA_COMPUTE_CAP=90 CUDARC_CUDA_VERSION=13000
export LIBRARY_PATH=$CUDA_HOME/lib:$CUDA_HOME/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
nvcc --version | tail -2

echo "== cargo build --release --features cuda (first build: ~10 min, nvcc compiles candle's kernels)"
cargo build --release --features cuda --bin slimserve --example gpu_check

BIN=${CARGO_TARGET_DIR:-target}/release
echo "== every driver symbol the binaries reference is in the stub libcuda (nm)"
stub_syms=$(nm -D --defined-only "$CUDA_HOME/lib/stubs/libcuda.so" | awk '{ print $NF }' | sort -u)
for bin in "$BIN/slimserve" "$BIN/examples/gpu_check"; do
  missing=$(nm -D --undefined-only "$bin" | awk '{ print $NF }' | sed 's/@.*//' | grep -E '^cu[A-Z]' \
    | sort -u | comm -23 - <(echo "$stub_syms") || true)
  if [ -n "$missing" ]; then
    echo "gpu-check: $bin references driver symbols the stub lacks:" >&2
    echo "$missing" >&2
    exit 1
  fi
  echo "$bin: $(nm -D --undefined-only "$bin" | grep -cE ' cu[A-Z]' || true) driver symbols, all in the stub"
done
if [ "$BUILD_ONLY" = 1 ]; then
  echo "== the device path on the CPU: every op device-generic, vs the CPU engine (gpu_check --device cpu)"
  # The binary needs libcuda.so.1 to start. Without a driver, the link stub stands in, in a
  # directory of its own used for this run only: with --device cpu no CUDA function is called.
  RUN_LD=$N/cu13/lib
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
    mkdir -p "$B/cpu-run"
    ln -sf "$CUDA_HOME/lib/stubs/libcuda.so" "$B/cpu-run/libcuda.so.1"
    RUN_LD=$B/cpu-run:$RUN_LD
  fi
  LD_LIBRARY_PATH=$RUN_LD${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} \
    "$BIN/examples/gpu_check" --models "$MODELS" --device cpu --batches 1,4 --iters 2
  echo "gpu-check: --build-only: built and linked, stub checked, device path checked on the CPU"
  exit 0
fi

# Run time: the driver's libcuda.so.1 from the system, the rest from the wheels.
export LD_LIBRARY_PATH=$N/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
if ldd "$BIN/slimserve" | grep "not found"; then
  echo "gpu-check: unresolved libraries above (is the NVIDIA driver installed?)" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

echo "== 1. CPU vs GPU logits and GPU throughput"
"$BIN/examples/gpu_check" --models "$MODELS" --device cuda:0

echo "== 2. the server on the GPU"
if ! ls "$MODELS"/*/config.json >/dev/null 2>&1; then
  echo "no models under $MODELS: skipping the server check"
  exit 0
fi
LOG=$B/server.log
"$BIN/slimserve" --models "$MODELS" --device cuda:0 \
  --grpc-addr 127.0.0.1:18001 --metrics-addr 127.0.0.1:18002 --http-addr 127.0.0.1:18000 >"$LOG" 2>&1 &
SERVER=$!
trap 'kill "$SERVER" 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  grep -q "serving .* model" "$LOG" && break
  kill -0 "$SERVER" 2>/dev/null || { cat "$LOG"; echo "gpu-check: server exited" >&2; exit 1; }
  sleep 1
done
grep -q "serving .* model" "$LOG" || { cat "$LOG"; echo "gpu-check: server not ready" >&2; exit 1; }
IMG=$B/check.png
"$B/venv/bin/python" - "$IMG" <<'PY'
import struct, sys, zlib
w = h = 320
raw = bytearray()
for y in range(h):
    raw.append(0)  # filter type: none
    for x in range(w):
        raw += bytes(((x * 7) % 256, (y * 5) % 256, 128))
def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(bytes(raw))) + chunk(b"IEND", b""))
open(sys.argv[1], "wb").write(png)
PY
for dir in "$MODELS"/*/; do
  model=$(basename "$dir")
  "$BIN/slimserve" classify --addr 127.0.0.1:18001 --model "$model" "$IMG"
done
kill -TERM "$SERVER"
wait "$SERVER"
trap - EXIT
grep -E "device|model .*:" "$LOG" | head -20
echo "gpu-check: done"

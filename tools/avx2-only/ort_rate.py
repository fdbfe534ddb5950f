"""ONNX Runtime's batch-1 rate on one model, to check that tools/avx2-only/run.sh changes the
kernels ONNX Runtime picks (its AVX2 path runs slower than its AVX-512 one on the same CPU):

    slimtrain export-onnx --model models/kd --out kd.onnx
    python tools/avx2-only/ort_rate.py kd.onnx 2                              # as detected
    bash tools/avx2-only/run.sh python tools/avx2-only/ort_rate.py kd.onnx 2  # AVX2 only

Arguments: the .onnx file and the intra-op thread count; prints images per second over a
3-second loop after 20 warm-up runs on one random image of the model's input shape.
"""

import sys
import time

import numpy as np
import onnxruntime as ort


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    path, threads = sys.argv[1], int(sys.argv[2])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [1 if not isinstance(d, int) else d for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(20):
        session.run(None, {inp.name: x})
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 3.0:
        session.run(None, {inp.name: x})
        n += 1
    print(f"{path}: {threads} threads: {n / (time.perf_counter() - start):.1f} img/s")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Run or benchmark an exported slimserve ONNX model with onnxruntime (CPU).

  ort_run.py run   --model m.onnx --input x.f32 --shape 3,3,32,32 --output y.f32 [--check]
      Reads the input as raw little-endian f32 of the given NCHW shape, runs it through
      the "input" -> "logits" graph and writes the logits as raw little-endian f32. With
      --check, first runs onnx.checker.check_model(full_check=True). Prints a JSON summary
      ({"output_shape": [...], "input_dims": [...], "output_dims": [...]}) on stdout.

  ort_run.py bench --model m.onnx --batch 8 --threads 1 [--seconds 5 | --iterations 100]
      Times repeated runs of a random batch after a warm-up, with intra_op_num_threads =
      threads, inter_op_num_threads = 1 and ORT_ENABLE_ALL graph optimisations; prints
      {"images_per_s": ..., ...} as JSON on stdout.

  ort_run.py serve --model m.onnx --batch 8 --threads 1
      As bench, but measures on request, so the caller can interleave its own runs with
      ONNX Runtime's: after the warm-up prints {"ready": true}, then for each line on stdin
      (a number of seconds) measures that long and prints one JSON line as bench does.
      Exits at the end of stdin.

  ort_run.py profile --model m.onnx --batch 1 --threads 2 --iterations 100
      As bench, then that many runs with ONNX Runtime's profiler on: prints
      {"run_ms": median whole run, "nodes": [{"name", "op", "ms"}, ...]} on stdout, each node
      (after ORT's graph optimisations and fusions) with its median kernel time, in run order.

  ort_run.py quantize --model m.onnx --calibration x.f32 --shape 16,3,256,256 --output q.onnx
      ONNX Runtime's own static quantization (onnxruntime.quantization.quantize_static) of
      the f32 model: QDQ format, u8 activations, s8 weights per channel, MinMax calibration
      on the given images (raw little-endian f32, NCHW), after ORT's pre-processing
      (shape inference, graph optimisation). Prints {"quantized": ...} on stdout.

Needs onnxruntime, onnx and numpy:
  python3 -m venv .venv && .venv/bin/pip install onnxruntime onnx numpy
"""

import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort

INPUT = "input"
OUTPUT = "logits"


def session(model, threads=None, profile_prefix=None):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def dims(value):
    return [d if isinstance(d, (int, str)) else None for d in value.shape]


def cmd_run(args):
    if args.check:
        import onnx

        onnx.checker.check_model(args.model, full_check=True)
    shape = [int(d) for d in args.shape.split(",")]
    x = np.fromfile(args.input, dtype="<f4")
    if x.size != int(np.prod(shape)):
        sys.exit(f"{args.input}: {x.size} floats, shape {shape} needs {int(np.prod(shape))}")
    sess = session(args.model)
    (y,) = sess.run([OUTPUT], {INPUT: x.reshape(shape)})
    np.ascontiguousarray(y, dtype="<f4").tofile(args.output)
    print(
        json.dumps(
            {
                "output_shape": list(y.shape),
                "input_dims": dims(sess.get_inputs()[0]),
                "output_dims": dims(sess.get_outputs()[0]),
            }
        )
    )


def bench_session(args, profile_prefix=None):
    """A session for args.model with a random input batch, warmed up."""
    sess = session(args.model, threads=args.threads, profile_prefix=profile_prefix)
    inp = sess.get_inputs()[0]
    _, c, h, w = inp.shape
    if not all(isinstance(d, int) for d in (c, h, w)):
        sys.exit(f"{args.model}: input {inp.name} has non-static CHW dims {inp.shape}")
    x = np.random.default_rng(0).standard_normal((args.batch, c, h, w), dtype=np.float32)
    feed = {INPUT: x}

    warm_end = time.perf_counter() + args.warmup_seconds
    warm = 0
    while warm < 2 or time.perf_counter() < warm_end:
        sess.run([OUTPUT], feed)
        warm += 1
    return sess, feed


def measure(sess, feed, args, seconds=None, iterations=None):
    iters = 0
    start = time.perf_counter()
    if iterations is not None:
        for _ in range(iterations):
            sess.run([OUTPUT], feed)
        iters = iterations
    else:
        end = start + seconds
        while iters == 0 or time.perf_counter() < end:
            sess.run([OUTPUT], feed)
            iters += 1
    elapsed = time.perf_counter() - start
    return {
        "images_per_s": iters * args.batch / elapsed,
        "batch": args.batch,
        "threads": args.threads,
        "iterations": iters,
        "seconds": elapsed,
        "ms_per_batch": 1e3 * elapsed / iters,
        "onnxruntime": ort.__version__,
    }


def cmd_bench(args):
    sess, feed = bench_session(args)
    print(json.dumps(measure(sess, feed, args, seconds=args.seconds, iterations=args.iterations)))


def cmd_serve(args):
    sess, feed = bench_session(args)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            seconds = float(line)
        except ValueError:
            sys.exit(f"serve: expected a number of seconds per line, got {line!r}")
        print(json.dumps(measure(sess, feed, args, seconds=seconds)), flush=True)


def cmd_profile(args):
    import os
    import tempfile

    from statistics import median

    with tempfile.TemporaryDirectory() as tmp:
        # The profiler is on from the start; only the last `iterations` runs are kept.
        sess, feed = bench_session(args, profile_prefix=os.path.join(tmp, "ort"))
        for _ in range(args.iterations):
            sess.run([OUTPUT], feed)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs = runs[-args.iterations :]
    if not runs:
        sys.exit("profile: ONNX Runtime's trace has no model_run events")
    start = runs[0]["ts"]
    order, times, ops = [], {}, {}
    for e in events:
        if e.get("cat") != "Node" or e["ts"] < start or not e["name"].endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        if name not in times:
            order.append(name)
            times[name] = []
            ops[name] = e.get("args", {}).get("op_name", "")
        times[name].append(e["dur"] / 1e3)
    nodes = [
        {"name": n, "op": ops[n], "ms": median(times[n]) * len(times[n]) / len(runs)} for n in order
    ]
    print(
        json.dumps(
            {
                "run_ms": median(e["dur"] / 1e3 for e in runs),
                "runs": len(runs),
                "nodes": nodes,
                "onnxruntime": ort.__version__,
            }
        )
    )


def cmd_quantize(args):
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    shape = [int(d) for d in args.shape.split(",")]
    x = np.fromfile(args.calibration, dtype="<f4")
    if x.size != int(np.prod(shape)):
        sys.exit(f"{args.calibration}: {x.size} floats, shape {shape} needs {int(np.prod(shape))}")
    x = x.reshape(shape)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{INPUT: x[i : i + 1]} for i in range(shape[0])])

        def get_next(self):
            return next(self.items, None)

    pre = args.output + ".pre.onnx"
    quant_pre_process(args.model, pre, skip_symbolic_shape=True)
    quantize_static(
        pre,
        args.output,
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
    )
    print(json.dumps({"quantized": args.output, "calibration_images": shape[0]}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run one input batch, write raw f32 logits")
    r.add_argument("--model", required=True)
    r.add_argument("--input", required=True, help="raw little-endian f32, NCHW")
    r.add_argument("--shape", required=True, help="comma-separated NCHW, e.g. 3,3,32,32")
    r.add_argument("--output", required=True, help="where to write raw little-endian f32 logits")
    r.add_argument("--check", action="store_true", help="onnx.checker.check_model(full_check=True) first")
    r.set_defaults(func=cmd_run)

    b = sub.add_parser("bench", help="measure throughput, print JSON")
    b.add_argument("--model", required=True)
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--warmup-seconds", type=float, default=1.0)
    g = b.add_mutually_exclusive_group()
    g.add_argument("--seconds", type=float, default=5.0, help="measure for this long (default)")
    g.add_argument("--iterations", type=int, help="measure exactly this many runs instead")
    b.set_defaults(func=cmd_bench)

    f = sub.add_parser("profile", help="median time per node with ONNX Runtime's profiler, print JSON")
    f.add_argument("--model", required=True)
    f.add_argument("--batch", type=int, default=1)
    f.add_argument("--threads", type=int, default=1)
    f.add_argument("--warmup-seconds", type=float, default=0.5)
    f.add_argument("--iterations", type=int, default=100)
    f.set_defaults(func=cmd_profile)

    v = sub.add_parser("serve", help="measure on request: one line of seconds in, one JSON line out")
    v.add_argument("--model", required=True)
    v.add_argument("--batch", type=int, default=1)
    v.add_argument("--threads", type=int, default=1)
    v.add_argument("--warmup-seconds", type=float, default=1.0)
    v.set_defaults(func=cmd_serve)

    q = sub.add_parser("quantize", help="ONNX Runtime's static int8 quantization (QDQ)")
    q.add_argument("--model", required=True)
    q.add_argument("--calibration", required=True, help="raw little-endian f32, NCHW")
    q.add_argument("--shape", required=True, help="comma-separated NCHW of the calibration file")
    q.add_argument("--output", required=True)
    q.set_defaults(func=cmd_quantize)

    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()

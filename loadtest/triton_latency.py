#!/usr/bin/env python3
"""Client-side latency with Triton's own Python client (tritonclient[grpc]), one request at a
time, against a slimserve (or Triton) KServe v2 endpoint.

Usage: triton_latency.py [--url 127.0.0.1:8001] [--requests 300] [--warmup 20]
                         [--input input|image] MODEL [MODEL ...]

For each model it sends raw [1, 3, S, S] FP32 tensors (`input`, the default) or [1, S, S, 3]
UINT8 pixels (`image`) in a closed loop of one, and prints a markdown table: client p50/p99,
the server's own compute per request over the same requests (ModelStatistics: compute_infer
time / inference count, read before and after), and p50 minus that compute: the overhead a
client sees beyond the forward pass.
"""

import argparse
import time

import numpy as np
import tritonclient.grpc as grpcclient


def compute_ns(client, model):
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    infer = stats.get("inference_stats", {}).get("compute_infer", {})
    return int(infer.get("ns", 0)), int(infer.get("count", 0))


def run(client, model, requests, warmup, input_name):
    meta = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)["config"]
    (declared,) = config["input"]
    dims = [int(d) for d in declared["dims"]]
    size = dims[1] if declared["name"] == "input" else dims[0]
    rng = np.random.default_rng(0)
    if input_name == "input":
        x = rng.random((1, 3, size, size), dtype=np.float32)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    else:
        x = rng.integers(0, 256, (1, size, size, 3), dtype=np.uint8)
        inp = grpcclient.InferInput("image", list(x.shape), "UINT8")
    inp.set_data_from_numpy(x)
    out = grpcclient.InferRequestedOutput("logits")
    for _ in range(warmup):
        client.infer(model, [inp], outputs=[out])
    ns0, n0 = compute_ns(client, model)
    latencies = []
    for _ in range(requests):
        t = time.perf_counter()
        client.infer(model, [inp], outputs=[out])
        latencies.append((time.perf_counter() - t) * 1e3)
    ns1, n1 = compute_ns(client, model)
    compute_ms = (ns1 - ns0) / max(n1 - n0, 1) / 1e6
    p50, p99 = np.percentile(latencies, [50, 99])
    return meta["name"], p50, p99, compute_ms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+")
    p.add_argument("--url", default="127.0.0.1:8001")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--input", choices=["input", "image"], default="input")
    args = p.parse_args()
    client = grpcclient.InferenceServerClient(url=args.url)
    print(f"tritonclient {grpcclient.__name__}, {args.requests} requests per model, concurrency 1, input `{args.input}`\n")
    print("| model | client p50 ms | client p99 ms | server compute ms/request | p50 - compute ms |")
    print("|---|---:|---:|---:|---:|")
    for model in args.models:
        name, p50, p99, compute = run(client, model, args.requests, args.warmup, args.input)
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {compute:.2f} | {p50 - compute:.2f} |")


if __name__ == "__main__":
    main()

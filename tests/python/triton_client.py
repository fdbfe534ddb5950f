"""Drives a slimserve server with the real Triton client (tritonclient[grpc]).

Usage: triton_client.py HOST:PORT MODEL SEED

Checks liveness, readiness and metadata, then sends a deterministic FP32 batch of two as a
numpy array (the tritonclient default: raw_input_contents) and prints the logits as JSON for
the Rust test to compare with its own client's.
"""

import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main() -> None:
    url, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = grpcclient.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    meta = client.get_model_metadata(model, as_json=True)
    # The server declares its UINT8 `image` input; the FP32 `input` used here is accepted too.
    (declared,) = meta["inputs"]
    assert declared["name"] == "image" and declared["datatype"] == "UINT8", meta
    side = int(declared["shape"][1])
    shape = [-1, 3, side, side]
    config = client.get_model_config(model, as_json=True)["config"]
    assert int(config["max_batch_size"]) >= 2, config

    n = 2
    count = n * shape[1] * shape[2] * shape[3]
    # Same formula as the Rust test's f32_input: ((i * 2654435761 + seed) mod 2^32) mod 1000 / 1000.
    i = np.arange(count, dtype=np.uint64)
    x = (((i * 2654435761 + seed) % (1 << 32)) % 1000).astype(np.float32) / 1000.0
    x = x.reshape(n, shape[1], shape[2], shape[3])

    infer_input = grpcclient.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    output = grpcclient.InferRequestedOutput("logits")
    result = client.infer(model, [infer_input], outputs=[output], request_id="py-1")
    logits = result.as_numpy("logits")
    assert logits.shape[0] == n, logits.shape
    stats = client.get_inference_statistics(model, as_json=True)
    print(json.dumps({
        "model": meta["name"],
        "versions": meta["versions"],
        "logits": logits.astype(float).tolist(),
        "inference_count": int(stats["model_stats"][0].get("inference_count", 0)),
    }))


if __name__ == "__main__":
    main()

"""Drives a slimserve server with the real Triton client (tritonclient[grpc] or [http]).

Usage: triton_client.py HOST:PORT MODEL SEED [grpc|http]

Checks liveness, readiness and metadata, then sends a deterministic FP32 batch of two as a
numpy array (over gRPC: raw_input_contents, the tritonclient default; over HTTP: the binary
tensor extension, and again as JSON numbers, which must give the same logits) and prints the
logits as JSON for the Rust test to compare with its own client's.
"""

import json
import sys

import numpy as np


def main() -> None:
    url, model, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    protocol = sys.argv[4] if len(sys.argv) > 4 else "grpc"
    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    client = tc.InferenceServerClient(url=url)
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(model), "model not ready"
    assert not client.is_model_ready("no-such-model"), "unknown model reported ready"
    # tritonclient.http answers JSON (a dict) without the `as_json` argument.
    as_json = {} if protocol == "http" else {"as_json": True}
    meta = client.get_model_metadata(model, **as_json)
    # The server declares its UINT8 `image` input; the FP32 `input` used here is accepted too.
    (declared,) = meta["inputs"]
    assert declared["name"] == "image" and declared["datatype"] == "UINT8", meta
    side = int(declared["shape"][1])
    shape = [-1, 3, side, side]
    config = client.get_model_config(model, **as_json)
    config = config.get("config", config)
    assert int(config["max_batch_size"]) >= 2, config

    n = 2
    count = n * shape[1] * shape[2] * shape[3]
    # Same formula as the Rust test's f32_input: ((i * 2654435761 + seed) mod 2^32) mod 1000 / 1000.
    i = np.arange(count, dtype=np.uint64)
    x = (((i * 2654435761 + seed) % (1 << 32)) % 1000).astype(np.float32) / 1000.0
    x = x.reshape(n, shape[1], shape[2], shape[3])

    infer_input = tc.InferInput("input", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    output = tc.InferRequestedOutput("logits")
    result = client.infer(model, [infer_input], outputs=[output], request_id="py-1")
    logits = result.as_numpy("logits")
    assert logits.shape[0] == n, logits.shape
    if protocol == "http":
        # JSON numbers both ways: the same logits as the binary round trip.
        infer_input.set_data_from_numpy(x, binary_data=False)
        output = tc.InferRequestedOutput("logits", binary_data=False)
        again = client.infer(model, [infer_input], outputs=[output]).as_numpy("logits")
        assert np.abs(again - logits).max() < 1e-6, (again, logits)
        try:
            client.infer("no-such-model", [infer_input])
            raise AssertionError("an unknown model answered")
        except tc.InferenceServerException as e:
            assert e.status() == "404" and "not found" in e.message(), (e.status(), e.message())
    stats = client.get_inference_statistics(model, **as_json)
    print(json.dumps({
        "model": meta["name"],
        "versions": meta["versions"],
        "logits": logits.astype(float).tolist(),
        "inference_count": int(stats["model_stats"][0].get("inference_count", 0)),
    }))


if __name__ == "__main__":
    main()

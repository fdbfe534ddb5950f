"""Model control with the real Triton client (tritonclient[grpc]) against a server started with
--model-control explicit, under load.

Usage: triton_repository.py HOST:PORT REPOSITORY STAGED

REPOSITORY is the server's --models; STAGED holds ready-made version directories
(STAGED/m-2, STAGED/broken-1) that this script publishes by rename, as the README says.
While four threads send ModelInfer to `m` in a closed loop (UINT8 `image` input, no version
named), it: reads the repository index, loads `m` (version 1 serves), publishes m/2 and loads
again (version 2 serves), fails to load `broken` (the error says why; `m` is untouched), unloads
`other`, and checks the index. Prints a JSON summary; exits non-zero on any failed request.
"""

import json
import os
import sys
import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException


def index(client):
    return {
        (m["name"], m.get("version", "")): (m.get("state", ""), m.get("reason", ""))
        for m in client.get_model_repository_index(as_json=True).get("models", [])
    }


def main() -> None:
    url, repo, staged = sys.argv[1], sys.argv[2], sys.argv[3]
    client = grpcclient.InferenceServerClient(url=url)
    before = index(client)
    assert before[("m", "")][0] == "UNAVAILABLE", before
    assert before[("other", "1")][0] == "READY", before
    client.load_model("m")
    assert client.is_model_ready("m"), "m not ready after load_model"
    side = int(client.get_model_metadata("m", as_json=True)["inputs"][0]["shape"][1])

    stop = threading.Event()
    answers, failures = [], []

    def load():
        c = grpcclient.InferenceServerClient(url=url)
        x = np.random.default_rng(0).integers(0, 256, (1, side, side, 3), dtype=np.uint8)
        inp = grpcclient.InferInput("image", list(x.shape), "UINT8")
        inp.set_data_from_numpy(x)
        while not stop.is_set():
            try:
                r = c.infer("m", [inp])
                answers.append(r.get_response().model_version)
            except InferenceServerException as e:
                failures.append(str(e))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.5)
    os.rename(os.path.join(staged, "m-2"), os.path.join(repo, "m", "2"))
    client.load_model("m")
    versions = client.get_model_metadata("m", as_json=True)["versions"]
    assert versions == ["2"], versions
    time.sleep(0.5)

    os.makedirs(os.path.join(repo, "broken"))
    os.rename(os.path.join(staged, "broken-1"), os.path.join(repo, "broken", "1"))
    try:
        client.load_model("broken")
        raise AssertionError("loading a broken model succeeded")
    except InferenceServerException as e:
        broken_error = str(e)
    assert "broken" in broken_error, broken_error
    client.unload_model("other")
    assert not client.is_model_ready("other"), "other still ready after unload_model"
    time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    after = index(client)
    assert after[("m", "2")][0] == "READY", after
    assert after[("broken", "1")][0] == "UNAVAILABLE" and after[("broken", "1")][1], after
    assert after[("other", "")] == ("UNAVAILABLE", "unloaded"), after
    print(
        json.dumps(
            {
                "requests": len(answers) + len(failures),
                "failures": failures[:5],
                "failed": len(failures),
                "versions": sorted(set(answers)),
                "broken_error": broken_error,
            }
        )
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()

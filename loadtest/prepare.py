#!/usr/bin/env python3
"""Writes the request bodies that the ghz configs in loadtest/ send (their "data-file"s).

Photos cannot be committed (the food photos are AGPL), so the bodies are made at run time:

  classify-<model>.json  slimserve.v1.Classifier/Classify: the photo's bytes (base64, as protobuf
                         JSON encodes `bytes`), top_k 3;
  infer-<model>.json     inference.GRPCInferenceService/ModelInfer: one FP32 NCHW tensor
                         [1, 3, S, S] named `input` in raw_input_contents (base64), values in
                         [0, 1], S from models/<model>/config.json (input_size, else 256);
  perf_analyzer-input-<model>.json  the same tensor for Triton's perf_analyzer (--input-data):
                         only the `input` tensor, base64, batch 1, at that model's size.

The tensor is a fixed synthetic pattern, not the decoded photo: decoding JPEG needs more than
the standard library, and compute cost does not depend on pixel values.

Standard library only, so loadtest/ghz.sh runs with any python3. tests/python/check_ghz.py runs
it into a temporary folder and checks every body against the protos.

Usage: python3 loadtest/prepare.py [--image PHOTO] [--out loadtest/data] [--models models]
"""

import argparse
import base64
import json
import math
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Where the committed configs expect the bodies (relative to the repository root).
DATA_DIR = "loadtest/data"
MODELS = ("big", "kd", "kd-q8")
PHOTOS = ".cache/food-photos/val"


def default_photo():
    """The first photo (by path) under .cache/food-photos/val, or None."""
    root = ROOT / PHOTOS
    if not root.is_dir():
        return None
    photos = sorted(p for p in root.rglob("*") if p.is_file())
    return photos[0] if photos else None


def input_size(models_dir, model):
    try:
        return int(json.loads((models_dir / model / "config.json").read_text())["input_size"])
    except (OSError, KeyError, ValueError):
        return 256


def tensor_bytes(s):
    """[1, 3, s, s] float32 little-endian: smooth per-channel gradients in [0, 1]."""
    values = []
    for c in range(3):
        for y in range(s):
            row = [0.5 + 0.5 * math.sin((x * (c + 1) + y * (3 - c)) / s * math.pi) for x in range(s)]
            values.extend(row)
    return struct.pack(f"<{len(values)}f", *values)


def classify_body(model, image):
    return {
        "model": model,
        "top_k": 3,
        "image": base64.b64encode(image).decode("ascii"),
        "id": f"ghz-{model}",
    }


def infer_body(model, s, raw):
    return {
        "model_name": model,
        "id": f"ghz-{model}",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, s, s]}],
        "outputs": [{"name": "logits"}],
        "raw_input_contents": [base64.b64encode(raw).decode("ascii")],
    }


def prepare(image_path, out_dir, models_dir=ROOT / "models", models=MODELS):
    """Writes every body into out_dir; returns the paths written."""
    image = Path(image_path).read_bytes()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    written = []
    for model in models:
        s = input_size(Path(models_dir), model)
        if s not in tensors:
            tensors[s] = tensor_bytes(s)
        for name, body in (
            (f"classify-{model}.json", classify_body(model, image)),
            (f"infer-{model}.json", infer_body(model, s, tensors[s])),
        ):
            path = out_dir / name
            path.write_text(json.dumps(body) + "\n")
            written.append(path)
    for model in models:
        # perf_analyzer names inputs, not models: one file per model, at its input size.
        s = input_size(Path(models_dir), model)
        path = out_dir / f"perf_analyzer-input-{model}.json"
        body = {"data": [{"input": {"content": {"b64": base64.b64encode(tensors[s]).decode("ascii")},
                                    "shape": [3, s, s]}}]}
        path.write_text(json.dumps(body) + "\n")
        written.append(path)
    return written


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--image", help=f"photo to send (default: the first file under {PHOTOS})")
    ap.add_argument("--out", default=str(ROOT / DATA_DIR), help=f"output folder (default: {DATA_DIR})")
    ap.add_argument("--models", default=str(ROOT / "models"), help="model directories, for input sizes")
    args = ap.parse_args()
    image = Path(args.image) if args.image else default_photo()
    if image is None:
        sys.exit(f"prepare: no photo given and none under {PHOTOS}; pass --image PHOTO")
    if not image.is_file():
        sys.exit(f"prepare: {image} is not a file")
    for path in prepare(image, args.out, args.models):
        print(f"prepare: wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# Regenerates the generated seed corpora under fuzz/seeds/ (deterministic): images, requests
# of both APIs and tiny model directories from examples/fuzz_seeds.rs, and PyTorch zip and
# legacy checkpoints of those models from tests/python/make_torch_checkpoint.py (numpy, from
# .venv). The real files (fuzz/seeds/image/real-*) were copied in by hand; see fuzz/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${SLIMSERVE_PYTHON:-.venv/bin/python}
cargo run --quiet --release --example fuzz_seeds -- fuzz/seeds
ck=fuzz/seeds/checkpoint
for st in "$ck"/*.safetensors; do
  base=${st%.safetensors}
  "$python" tests/python/make_torch_checkpoint.py --safetensors "$st" --out "$base.pth"
  "$python" tests/python/make_torch_checkpoint.py --safetensors "$st" --out "$base-legacy.pth" --legacy
  "$python" tests/python/make_torch_checkpoint.py --safetensors "$st" --out "$base-strided.pth" \
    --strided --key state_dict --prefix module.
done
echo "seeds: $(find fuzz/seeds -type f | wc -l) files"

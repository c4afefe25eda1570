#!/usr/bin/env bash
# Create .venv and install vlm with its test tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The torch/torchvision pair first, pinned: a CPU-only torch without matching torchvision operators breaks timm.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev,hub,onnx,parquet]"

#!/usr/bin/env bash
# Set up .venv, train the default captioner on the built-in scenes, and show what it learned.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/vlm train --out runs/default
.venv/bin/vlm demo --model runs/default/model --out runs/default/demo

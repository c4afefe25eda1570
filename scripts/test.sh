#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_tools.sh  # Debian's chromium and Java for the flagship tests that need them
.venv/bin/python -m pytest tests "$@"

#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/setup_browser.sh  # Debian's chromium for tests/test_browser.py (skipped where it cannot be installed)
.venv/bin/python -m pytest tests "$@"

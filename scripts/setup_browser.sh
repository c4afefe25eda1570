#!/usr/bin/env bash
# Install Debian's chromium for the browser tests (tests/test_browser.py). Fast when it is already there;
# never fails: where it cannot be installed (not root, no apt), the browser tests skip and say why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_browser: chromium is missing and apt-get as root is not available; browser tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null; }; then
    echo "setup_browser: apt-get install chromium failed; browser tests will skip" >&2
fi
exit 0

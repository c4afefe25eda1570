#!/usr/bin/env bash
# Install, from Debian's packages, the system tools that flagship tests need: chromium (tests/test_browser.py) and
# a Java runtime (the official PTB tokenizer in tests/test_metrics.py). Fast when both are there. Never fails:
# where they cannot be installed (not root, no apt-get) it says so, and their tests skip saying why -- or fail,
# under CI=true (tests/conftest.py).
set -uo pipefail
packages=()
command -v chromium >/dev/null 2>&1 || packages+=(chromium fonts-liberation)
command -v java >/dev/null 2>&1 || packages+=(default-jre-headless)
if [ ${#packages[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "setup_tools: ${packages[*]} missing and apt-get as root is not available; their tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
mkdir -p /usr/share/man/man1  # slim images drop it, and the JRE's post-install scripts link man pages there
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null; }; then
    echo "setup_tools: apt-get install ${packages[*]} failed; their tests will skip" >&2
fi
exit 0

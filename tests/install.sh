#!/usr/bin/env bash
# Installs what the test suite needs: the app's requirements, the test tools, and Debian's Chromium
# for the one real-browser test (Playwright drives /usr/bin/chromium; it never downloads a browser).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python -m pip install -q -r "$here/requirements.txt"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "Chromium is missing: install Debian's 'chromium' package (the browser test needs /usr/bin/chromium)." >&2
    exit 1
  fi
fi

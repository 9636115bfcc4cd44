#!/usr/bin/env bash
# Installs what the browser tests (tests/browser/) need, idempotently:
#   1. Debian's chromium at /usr/bin/chromium (apt-get), when it is missing,
#   2. the Python `playwright` driver into ./.venv (pip).
# Never `playwright install`: it downloads a browser build of its own, which cannot be
# fetched here; the tests drive the system chromium through `executable_path`.
# Without apt-get (e.g. macOS) it says so and goes on; the browser tests then skip locally
# and fail under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

CHROMIUM=/usr/bin/chromium
if [ ! -x "$CHROMIUM" ]; then
    echo "setup_browser: installing chromium (apt-get)" >&2
    status=0
    tools/apt_install.sh chromium fonts-dejavu-core || status=$?
    if [ "$status" -eq 3 ]; then
        echo "setup_browser: no apt-get here; install chromium at $CHROMIUM for the browser tests" >&2
    elif [ "$status" -ne 0 ]; then
        exit "$status"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup_browser: no .venv yet; run tools/bootstrap.sh (it calls this script)" >&2
    exit 1
fi
if ! .venv/bin/python -c 'import playwright' 2>/dev/null; then
    echo "setup_browser: installing playwright (the driver only, no browser download)" >&2
    .venv/bin/python -m pip install -q --disable-pip-version-check 'playwright>=1.45'
fi

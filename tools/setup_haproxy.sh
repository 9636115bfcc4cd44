#!/usr/bin/env bash
# Installs HAProxy, idempotently, for the replica tests (tests/integration/test_replicas.py)
# and the example config (deploy/haproxy.cfg):
#   - Linux: the distribution's haproxy (apt-get), when `haproxy` is missing;
#   - macOS: Homebrew's haproxy, when brew is there (a warning, not a failure, if it fails).
# Without either it says so and goes on; the replica tests then skip locally and fail on
# Linux under CI=true.
set -euo pipefail

# Debian puts it in /usr/sbin, which is not on every user's PATH.
if command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ]; then
    exit 0
fi
if command -v apt-get >/dev/null; then
    echo "setup_haproxy: installing haproxy (apt-get)" >&2
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        haproxy >/dev/null
    # The package enables a system service; the tests run their own haproxy in the
    # foreground and need none (where there is no init system this does nothing).
    if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        $SUDO systemctl disable --now haproxy >/dev/null 2>&1 || true
    fi
elif command -v brew >/dev/null; then
    echo "setup_haproxy: installing haproxy (brew)" >&2
    brew install --quiet haproxy >/dev/null ||
        echo "setup_haproxy: brew could not install haproxy; the replica tests will skip" >&2
else
    echo "setup_haproxy: no apt-get or brew here; install haproxy for the replica tests" >&2
fi

#!/usr/bin/env bash
# Installs the load balancers deploy/ has a config for, idempotently, for the replica tests
# (tests/integration/test_replicas*.py): HAProxy (deploy/haproxy.cfg) and nginx
# (deploy/nginx.conf), those of the two that are missing:
#   - Linux: the distribution's packages (tools/apt_install.sh);
#   - macOS: Homebrew's, when brew is there (a warning, not a failure, if it fails).
# Without either it says so and goes on; the replica tests then skip locally and fail on
# Linux under CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for tool in haproxy nginx; do
    # Debian puts both in /usr/sbin, which is not on every user's PATH.
    if ! command -v "$tool" >/dev/null && [ ! -x "/usr/sbin/$tool" ]; then
        missing+=("$tool")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "setup_haproxy: installing ${missing[*]}" >&2
# Each package enables a system service of its own name; the tests run their own process
# in the foreground and need neither.
no_services=()
for tool in "${missing[@]}"; do
    no_services+=(--no-service "$tool")
done
status=0
tools/apt_install.sh "${no_services[@]}" "${missing[@]}" || status=$?
if [ "$status" -eq 3 ]; then  # no apt-get
    if command -v brew >/dev/null; then
        brew install --quiet "${missing[@]}" >/dev/null ||
            echo "setup_haproxy: brew could not install ${missing[*]}; their replica tests will skip" >&2
    else
        echo "setup_haproxy: no apt-get or brew here; install ${missing[*]} for the replica tests" >&2
    fi
elif [ "$status" -ne 0 ]; then
    exit "$status"
fi

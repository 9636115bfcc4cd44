#!/usr/bin/env bash
# Installs Debian packages with apt-get, quietly and without questions, for tools/bootstrap.sh
# and the tools/setup_*.sh scripts: `tools/apt_install.sh [--no-service NAME]... PACKAGE...`
#   - sudo when not root; `apt-get update` first; no recommended packages;
#   - `--no-service NAME`: the package enables a system service NAME that nothing here needs
#     (the tests run their own process in the foreground): it is disabled and stopped where
#     systemd runs (without an init system there is nothing to do).
# Exits 3, having installed nothing, where there is no apt-get: the caller then tries
# something else (brew) or says what to install by hand.
set -euo pipefail

services=()
while [ "${1:-}" = "--no-service" ]; do
    services+=("$2")
    shift 2
done
if [ $# -eq 0 ]; then
    echo "usage: tools/apt_install.sh [--no-service NAME]... PACKAGE..." >&2
    exit 2
fi
if ! command -v apt-get >/dev/null; then
    exit 3
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$@" >/dev/null
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    for service in ${services[@]+"${services[@]}"}; do  # an empty array is unset to bash 3
        $SUDO systemctl disable --now "$service" >/dev/null 2>&1 || true
    done
fi

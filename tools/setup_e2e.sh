#!/usr/bin/env bash
# Installs the pinned strict clients for tests/e2e (the OpenCode CLI and the Vercel AI SDK)
# into tools/e2e/node_modules, from tools/e2e/package-lock.json with `npm ci`.
# Idempotent: nothing is done when the installed packages already match the lock file.
# Needs Node >= 18 and npm; fails loudly without them.
set -euo pipefail
cd "$(dirname "$0")/e2e"

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "setup_e2e: '$tool' not found. The end-to-end tests need Node >= 18 and npm:" \
            "install them (Debian/Ubuntu: apt-get install nodejs npm; or https://nodejs.org)," \
            "then run tools/setup_e2e.sh again." >&2
        exit 1
    fi
done
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 18 ? 0 : 1)'; then
    echo "setup_e2e: Node $(node --version) is too old; the AI SDK needs Node >= 18" >&2
    exit 1
fi

# The pinned opencode version, and whether node_modules (npm's own record of it,
# node_modules/.package-lock.json) holds every locked package at its locked version.
pinned=$(node -p 'require("./package-lock.json").packages["node_modules/opencode-ai"].version')
installed_matches_lock() {
    [ -f node_modules/.package-lock.json ] || return 1
    node -e '
        const want = require("./package-lock.json").packages;
        const have = require("./node_modules/.package-lock.json").packages;
        for (const [path, pkg] of Object.entries(want)) {
            if (!path || (pkg.optional && !(path in have))) continue;
            if (!have[path] || have[path].version !== pkg.version) process.exit(1);
        }'
}
opencode_runs() {
    [ "$(node_modules/.bin/opencode --version 2>/dev/null)" = "$pinned" ]
}

if installed_matches_lock && opencode_runs; then
    echo "setup_e2e: tools/e2e/node_modules is up to date (opencode $pinned)" >&2
    exit 0
fi
echo "setup_e2e: npm ci in tools/e2e (opencode-ai $pinned, ai, @ai-sdk/openai-compatible)" >&2
start=$SECONDS
npm ci --no-audit --no-fund --no-update-notifier --loglevel=error
# opencode-ai's postinstall links the platform binary from its optional dependency. The lock
# pins opencode-linux-x64 with its integrity; the other platforms' packages are locked by exact
# version only (the registry mirror the lock was made with serves linux-x64 alone), which
# `npm ci` needs to accept the lock at all.
if ! opencode_runs; then
    echo "setup_e2e: node_modules/.bin/opencode does not run as version $pinned after npm ci" \
        "(was its postinstall script skipped?)" >&2
    exit 1
fi
echo "setup_e2e: installed in $((SECONDS - start)) s" >&2

#!/usr/bin/env bash
# Installs the pinned strict clients for tests/e2e (the OpenCode CLI, the Codex CLI, the Claude
# Code CLI and the Vercel AI SDK) into tools/e2e/node_modules, from tools/e2e/package-lock.json
# with `npm ci`.
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

# The pinned opencode, codex and claude versions, and whether node_modules (npm's own record of
# it, node_modules/.package-lock.json) holds every locked package at its locked version.
pinned=$(node -p 'require("./package-lock.json").packages["node_modules/opencode-ai"].version')
codex_pinned=$(node -p 'require("./package-lock.json").packages["node_modules/@openai/codex"].version')
claude_pinned=$(node -p 'require("./package-lock.json").packages["node_modules/@anthropic-ai/claude-code"].version')
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
# `codex --version` prints "codex-cli 0.171.0"; bin/codex.js runs the native binary from the
# platform package (@openai/codex-linux-x64, an npm alias of @openai/codex@<version>-linux-x64).
# Even --version writes into $CODEX_HOME (~/.codex by default): give it a throwaway one.
codex_runs() {
    local home version
    home=$(mktemp -d)
    version=$(CODEX_HOME="$home" node_modules/.bin/codex --version 2>/dev/null || true)
    rm -rf "$home"
    [ "$version" = "codex-cli $codex_pinned" ]
}
# `claude --version` prints "2.1.328 (Claude Code)". bin/claude.exe is a stub until the
# package's postinstall (install.cjs) links the native binary of the platform package
# (@anthropic-ai/claude-code-linux-x64, an optional dependency) over it; the binary needs no
# Node at run time. A throwaway HOME, as for every run: Claude Code keeps its state there.
claude_runs() {
    local home version
    home=$(mktemp -d)
    version=$(env -i PATH="$PATH" HOME="$home" CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 \
        node_modules/.bin/claude --version 2>/dev/null || true)
    rm -rf "$home"
    [ "$version" = "$claude_pinned (Claude Code)" ]
}

if installed_matches_lock && opencode_runs && codex_runs && claude_runs; then
    echo "setup_e2e: tools/e2e/node_modules is up to date (opencode $pinned, codex $codex_pinned," \
        "claude $claude_pinned)" >&2
    exit 0
fi
echo "setup_e2e: npm ci in tools/e2e (opencode-ai $pinned, @openai/codex $codex_pinned," \
    "@anthropic-ai/claude-code $claude_pinned, ai, @ai-sdk/openai-compatible)" >&2
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
# @openai/codex has no install script: its launcher finds the native binary in the platform
# package, which the lock pins for every platform with its integrity.
if ! codex_runs; then
    echo "setup_e2e: node_modules/.bin/codex does not run as codex-cli $codex_pinned after npm ci" \
        "(is @openai/codex-linux-x64 missing? it is an optional dependency)" >&2
    exit 1
fi
# @anthropic-ai/claude-code's postinstall puts the native binary in place of its bin stub; the
# lock pins every platform package with its integrity.
if ! claude_runs; then
    echo "setup_e2e: node_modules/.bin/claude does not run as $claude_pinned (Claude Code) after" \
        "npm ci (was its postinstall script skipped, or is the optional dependency" \
        "@anthropic-ai/claude-code-linux-x64 missing?)" >&2
    exit 1
fi
echo "setup_e2e: installed in $((SECONDS - start)) s" >&2

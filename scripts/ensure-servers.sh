#!/usr/bin/env bash
# Installs the real servers the test suite starts: redis-server and PostgreSQL binaries
# (Debian packages), when they are missing. Needs root (or sudo) only when it installs.
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# redis-cli creates the test suite's Redis Cluster (`redis-cli --cluster create`)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 && ! command -v pg_config >/dev/null 2>&1; then
    missing+=(postgresql)
fi
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
# the dashboard's browser tests (tests/browser/) drive Debian's headless Chromium
command -v chromium >/dev/null 2>&1 || missing+=(chromium)

if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "redis-server: $(redis-server --version | awk '{print $3}')"
echo "postgres: $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -n1)"
echo "chromium: $(chromium --version 2>/dev/null | awk '{print $2}')"

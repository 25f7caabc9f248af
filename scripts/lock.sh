#!/usr/bin/env bash
# Regenerates requirements.lock (runtime, with the embedded servers) and requirements-dev.lock
# (test and lint tools) from a fresh virtualenv, so two installs a month apart match.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install --quiet --upgrade pip
"$tmp/venv/bin/pip" install --quiet '.[embedded]'
"$tmp/venv/bin/pip" freeze --exclude conveyor > "$tmp/runtime.txt"
"$tmp/venv/bin/pip" install --quiet '.[embedded,dev]'
"$tmp/venv/bin/pip" freeze --exclude conveyor > "$tmp/all.txt"
{
    echo "# Pinned versions of Conveyor's runtime dependencies: \`pip install -c requirements.lock .\`"
    echo "# Regenerate: scripts/lock.sh"
    cat "$tmp/runtime.txt"
} > requirements.lock
{
    echo "# Pinned versions of the test and lint tools, on top of requirements.lock."
    echo "# Regenerate: scripts/lock.sh"
    comm -13 <(sort "$tmp/runtime.txt") <(sort "$tmp/all.txt")
} > requirements-dev.lock
echo "wrote requirements.lock ($(grep -c == requirements.lock) pins), requirements-dev.lock ($(grep -c == requirements-dev.lock) pins)"

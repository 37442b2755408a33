#!/usr/bin/env bash
# Runs the benchmark: a real Dovecot, a direct connection and mailgate side by side.
# Needs root (Dovecot's mail processes, raised file limits); installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# Every proxied session holds two descriptors in mailgate: raise the soft limit as far as
# allowed (the benchmark sizes its idle-session test to what fits).
ulimit -n "$(ulimit -Hn)"
exec cargo bench --bench proxy

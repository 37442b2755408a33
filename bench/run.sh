#!/usr/bin/env bash
# Runs the benchmark: a real Dovecot, a direct connection and mailgate side by side.
# Needs root (Dovecot's mail processes, raised file limits); installs what it needs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# 10,000 sessions through a proxy hold 20,000+ descriptors here, plus Dovecot's.
ulimit -n 65536
exec cargo bench --bench proxy

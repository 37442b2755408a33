#!/usr/bin/env bash
# Runs a benchmark: a real Dovecot, a direct connection and mailgate side by side.
# Needs root (Dovecot's mail processes, raised file limits); installs what it needs.
#
#   bench/run.sh            # one mailgate: throughput, login latency, idle sessions
#   bench/run.sh replicas   # 1, 2 and 3 replicas on one Redis: logins/s, provider requests,
#                           # Redis commands per login
#   bench/run.sh pool       # warm login latency (p50, p99) through a pool of 3 backends
#                           # against one server
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
# Every proxied session holds two descriptors in mailgate: raise the soft limit as far as
# allowed (the benchmark sizes its idle-session test to what fits).
ulimit -n "$(ulimit -Hn)"
exec cargo bench --bench "${1:-proxy}"

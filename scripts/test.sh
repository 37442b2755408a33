#!/usr/bin/env bash
# The test command: installs the end-to-end dependencies if needed, then runs every test
# (unit tests, and integration tests against a private Dovecot on 127.0.0.1). Benchmarks
# are not run here: see bench/run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-test-deps.sh
cargo test --no-fail-fast
# Deployment checks (tests/chart/): the Helm chart rendered through Helm's library and validated
# strictly, the sidecar manifest, the systemd unit via systemd-analyze, packaging metadata.
scripts/test-deploy.sh

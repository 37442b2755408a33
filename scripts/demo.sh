#!/usr/bin/env bash
# Runs the demo: a local token-only Dovecot, an authentication server and mailgate, then a
# password login over IMAP and a sent mail over SMTP through mailgate. Needs root (Dovecot);
# installs Dovecot, curl, openssl and a C compiler when missing, nothing the tests alone need.
# With --keep it leaves everything running until Ctrl-C, to repeat the printed commands by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh --demo
cargo build --quiet --bin mailgate --example demo
MAILGATE_BIN="$PWD/target/debug/mailgate" exec target/debug/examples/demo "$@"

#!/usr/bin/env bash
# Installs what the demo, or the end-to-end tests, need (Debian/Ubuntu).
#
#   scripts/install-test-deps.sh          # the tests: the demo's packages and the browser's
#   scripts/install-test-deps.sh --demo   # only what scripts/demo.sh uses
#
# The demo needs a real Dovecot as the upstream, curl as the client, openssl for the throwaway
# CA and a C compiler for ring. The tests add Chromium with chromedriver for the browser
# tests, plus fonts with Arial/Helvetica metrics so pages and their screenshots look as they
# would on a desktop (Debian's chromium packages; Ubuntu's are stubs for a snap, which does not
# run here), and redis-server for the replicas' shared state (the tests start their own; the
# package's own service is not used). Checks that Rust is new enough first. Idempotent: installs only what is missing.
# As root it uses apt-get; otherwise it lists what is missing and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."

# The minimum Rust comes from Cargo.toml (rust-version); Debian's own rustc is far older.
required_rust=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-test-deps: cargo not found. Install Rust $required_rust or newer with rustup:" >&2
    echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y && . \"\$HOME/.cargo/env\"" >&2
    exit 1
fi
have_rust=$(cargo --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$required_rust" "$have_rust" | sort -V | head -n 1)" != "$required_rust" ]; then
    echo "install-test-deps: Rust $have_rust is too old; mailgate needs $required_rust or newer: rustup update stable" >&2
    exit 1
fi

# The Dovecot the demo and the tests start serves POP3 and ManageSieve too.
demo_packages=(dovecot-core dovecot-imapd dovecot-submissiond dovecot-lmtpd dovecot-pop3d dovecot-managesieved curl openssl gcc libc6-dev)
test_only_packages=(chromium chromium-driver fonts-liberation redis-server sieve-connect)

case "${1:-}" in
    --demo) packages=("${demo_packages[@]}") ;;
    "") packages=("${demo_packages[@]}" "${test_only_packages[@]}") ;;
    *)
        echo "usage: $0 [--demo]" >&2
        exit 64
        ;;
esac

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$pkg")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "install-test-deps: all present (${packages[*]})"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "install-test-deps: missing packages: ${missing[*]}" >&2
    echo "install-test-deps: run as root, or: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
echo "install-test-deps: installing ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

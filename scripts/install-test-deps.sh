#!/usr/bin/env bash
# Installs what the end-to-end tests need (Debian/Ubuntu): a real Dovecot as the upstream,
# curl as the client, openssl for the throwaway CA. Idempotent: installs only what is missing.
# As root it uses apt-get; otherwise it lists what is missing and exits 1.
set -euo pipefail

packages=(dovecot-core dovecot-imapd dovecot-submissiond dovecot-lmtpd curl openssl)

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

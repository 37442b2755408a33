#!/usr/bin/env bash
# The deployment tests (tests/chart/): the Helm chart (helm lint, rendering with several
# value sets, strict validation against Kubernetes schemas), the native-sidecar manifest,
# the systemd unit (systemd-analyze verify and security) and the packaging metadata.
#
# Installs what it needs. Debian packages with apt-get, as root: python3 and
# python3-venv, and systemd for systemd-analyze, when missing. Python packages, pinned in
# tests/chart/requirements.txt, into a virtual environment that is kept between runs and
# rebuilt when the requirements or the Python version change.
#
#   scripts/test-deploy.sh                 # everything
#   scripts/test-deploy.sh -k networkpolicy   # extra arguments go to pytest
#
# Environment: PYTHON (default python3), MAILGATE_TEST_VENV (default
# ${XDG_CACHE_HOME:-$HOME/.cache}/mailgate-test-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

started=$SECONDS
python="${PYTHON:-python3}"
venv="${MAILGATE_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/mailgate-test-venv}"
requirements=tests/chart/requirements.txt

say() { echo "test-deploy: $*"; }

# --- Debian packages -------------------------------------------------------------------
missing=()
if ! command -v "$python" >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif ! "$python" -c 'import ensurepip' >/dev/null 2>&1; then
    # Debian ships venv's pip bootstrap separately.
    missing+=(python3-venv)
fi
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
# pip checks the package index's certificate against the system's CA bundle.
[ -f /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        say "missing packages: ${missing[*]}" >&2
        say "run as root, or: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- Python packages -------------------------------------------------------------------
python_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
wanted="$(sha256sum "$requirements" | cut -d' ' -f1) python-$python_version"
stamp="$venv/.mailgate-requirements"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null || true)" != "$wanted" ]; then
    say "creating $venv (Python $python_version)"
    rm -rf "$venv"
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv"
    pip_args=(--quiet --disable-pip-version-check --no-input)
    # helm-sdkpy asks for Python 3.12 but runs on 3.11 (see requirements.txt).
    if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
        pip_args+=(--ignore-requires-python)
    fi
    "$venv/bin/python" -m pip install "${pip_args[@]}" -r "$requirements"
    echo "$wanted" >"$stamp"
fi

# --- the tests -------------------------------------------------------------------------
# The Helm library reads its environment once, when it is loaded: release records in
# memory (the tests' stand-in API server does not store them), its files in a
# temporary directory instead of $HOME.
helm_home="$(mktemp -d)"
trap 'rm -rf "$helm_home"' EXIT
export HELM_DRIVER=memory
export HELM_CACHE_HOME="$helm_home/cache" HELM_CONFIG_HOME="$helm_home/config" HELM_DATA_HOME="$helm_home/data"

status=0
"$venv/bin/python" -m pytest tests/chart "$@" || status=$?

elapsed=$((SECONDS - started))
if [ "$status" -eq 0 ]; then
    say "PASS: chart, sidecar manifest, systemd unit and packaging checks (${elapsed}s)"
else
    say "FAIL: pytest exited with $status (${elapsed}s); see the failures above" >&2
fi
exit "$status"

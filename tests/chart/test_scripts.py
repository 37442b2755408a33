"""The scripts a newcomer runs first install what they use and no more: run with stand-ins
for dpkg-query (nothing installed), id (root), apt-get (records its arguments) and cargo (a
new enough version; the build step stops the script before anything else runs)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO

DEMO_PACKAGES = {
    "dovecot-core", "dovecot-imapd", "dovecot-submissiond", "dovecot-lmtpd",
    "dovecot-pop3d", "dovecot-managesieved", "curl", "openssl", "gcc", "libc6-dev",
}
# Only the tests use these: Chromium for the browser tests, the Redis the replicas' tests start,
# sieve-connect as a real ManageSieve client.
TEST_ONLY_PACKAGES = {
    "chromium", "chromium-driver", "fonts-liberation", "redis-server", "sieve-connect",
}

STAND_INS = {
    "dpkg-query": "exit 1",
    "id": 'echo 0',
    "apt-get": 'echo "$*" >> "$APT_LOG"',
    "cargo": 'if [ "$1" = --version ]; then echo "cargo 99.0.0"; else exit 3; fi',
}


def installed_by(tmp_path: Path, *command: str) -> set[str]:
    """The packages `command` asks apt-get to install."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    log = tmp_path / "apt.log"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "APT_LOG": str(log)}
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=60)
    installs = [line.split() for line in log.read_text().splitlines() if " install " in f" {line} "]
    assert len(installs) == 1, log.read_text()
    return {word for word in installs[0] if not word.startswith("-") and word != "install"}


def test_the_demo_installs_only_what_it_uses(tmp_path):
    assert installed_by(tmp_path, "scripts/demo.sh") == DEMO_PACKAGES


def test_the_tests_install_the_browser_and_redis_too(tmp_path):
    assert installed_by(tmp_path, "scripts/install-test-deps.sh") == DEMO_PACKAGES | TEST_ONLY_PACKAGES

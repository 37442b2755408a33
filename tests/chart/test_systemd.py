"""deploy/systemd/: the unit checked by systemd's own tools, and its example config.

`systemd-analyze verify` refuses a unit whose ExecStart= binary does not exist, and
mailgate is not installed at /usr/bin/mailgate here. So the unit is verified as a copy
in a temporary directory whose /usr/bin/mailgate is replaced by a stub script there;
nothing else in the unit changes (/bin/kill, the ExecReload line, must exist for real).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, duration_seconds

UNIT = REPO / "deploy" / "systemd" / "mailgate.service"
CONFIG = REPO / "deploy" / "systemd" / "mailgate.yaml"
CREDENTIALS_DIRECTORY = "/run/credentials/mailgate.service"
# systemd-analyze security's overall exposure, 0.0 (locked down) to 10.0; it
# calls up to 1.9 "OK". The unit is at 1.1; fail if hardening is lost.
MAX_EXPOSURE = 1.5


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing (Debian package systemd; scripts/test-deploy.sh installs it)"
    return path


def directives(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) for every line; keys may repeat, as systemd allows."""
    section, found = "", []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(key: str, section: str = "Service") -> list[str]:
    return [v for s, k, v in directives() if s == section and k == key]


def value(key: str, section: str = "Service") -> str:
    (found,) = values(key, section)
    return found


@pytest.fixture(scope="module")
def unit_copy(tmp_path_factory) -> Path:
    """The unit with ExecStart's binary pointing at an executable stub."""
    directory = tmp_path_factory.mktemp("unit")
    stub = directory / "mailgate"
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    copy = directory / "mailgate.service"
    copy.write_text(UNIT.read_text().replace("/usr/bin/mailgate", str(stub)))
    return copy


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_unit_verifies(unit_copy):
    result = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit_copy)],
                            capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # verify exits 0 even for an unknown key or a value it cannot parse ("..., ignoring"):
    # it only prints a line per problem. So any output is a failure.
    assert not output.strip(), output


def test_unit_is_hardened(unit_copy):
    result = subprocess.run([systemd_analyze(), "security", "--offline=yes", "--no-pager", str(unit_copy)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for mailgate\.service: (\d+\.\d+)", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_required_settings():
    assert value("DynamicUser") == "yes"
    assert value("ProtectSystem") == "strict"
    assert value("StateDirectory") == "mailgate"
    assert value("Restart") == "on-failure"
    assert value("RestartPreventExitStatus") == "64"  # a refused config
    assert "/bin/kill -HUP $MAINPID" in values("ExecReload")
    assert value("ExecStart") == "/usr/bin/mailgate serve --config /etc/mailgate/mailgate.yaml"
    assert value("WantedBy", "Install") == "multi-user.target"


def test_stop_timeout_exceeds_mailgate_shutdown(config):
    needed = duration_seconds(config["drain_delay"]) + duration_seconds(config["shutdown_grace"]) + 3
    assert duration_seconds(value("TimeoutStopSec")) > needed


def test_config_reads_secrets_from_credentials(config):
    loaded = {v.split(":", 1)[0] for v in values("LoadCredential")}
    paths = [config["tokens"]["auth_server"]["password_file"], config["client_auth"]["accounts_file"]]
    for listener in config["listeners"]:
        paths += [listener["tls"]["cert_file"], listener["tls"]["key_file"]]
    for path in paths:
        directory, _, name = path.rpartition("/")
        assert directory == CREDENTIALS_DIRECTORY, path
        assert name in loaded, f"{path}: no LoadCredential={name}:..."
    for source in (v.split(":", 1)[1] for v in values("LoadCredential")):
        assert source.startswith("/etc/mailgate/credentials/"), source


def test_example_config_uses_the_admin_key(config):
    assert "metrics" not in config
    assert config["admin"]["listen"].startswith("127.0.0.1:"), "keep the admin port off the network"


# mailgate's default listeners[].max_connections (src/config/mod.rs).
DEFAULT_MAX_CONNECTIONS = 20_000
# Descriptors besides the sessions': the admin endpoint, token requests, files.
SPARE_DESCRIPTORS = 1024


def test_listeners_off_loopback_require_tls(config):
    """Issue 13 item 20: the example took passwords in clear on 0.0.0.0."""
    for listener in config["listeners"]:
        if listener["listen"].startswith(("127.", "[::1]")):
            continue
        tls = listener.get("tls") or {}
        assert tls.get("mode") in ("starttls", "implicit"), listener["name"]
        assert tls.get("require", True) is True, listener["name"]


def test_limits_cover_the_example_config(config):
    """Issue 13 item 20: LimitNOFILE (65536) was below the example's 80,000 descriptors, and
    nothing capped memory or threads."""
    sessions = sum(l.get("max_connections", DEFAULT_MAX_CONNECTIONS) for l in config["listeners"])
    # A client's socket and its upstream's.
    assert int(value("LimitNOFILE")) >= 2 * sessions + SPARE_DESCRIPTORS
    assert re.fullmatch(r"\d+[KMG]", value("MemoryMax")), value("MemoryMax")
    assert int(value("TasksMax")) > 512, "room for tokio's blocking pool (512) and the workers"

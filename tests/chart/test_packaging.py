"""The container image definition and the .deb metadata, checked as text.

Neither is built here: images cannot be pulled on this machine, and a .deb needs a
release build (cargo deb, see docs/systemd.md). These tests catch the mistakes that
would only show up in those builds.
"""

from __future__ import annotations

import re
import tomllib

import pytest

from conftest import REPO

DOCKERFILE = REPO / "deploy" / "Dockerfile"
CARGO_TOML = REPO / "Cargo.toml"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        joined.append(current + stripped)
        current = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1] if " " in i else "") for i in joined]


def test_base_images_are_fully_qualified():
    stages = set()
    for instruction, arguments in dockerfile_instructions():
        if instruction != "FROM":
            continue
        image, *rest = arguments.split()
        if rest:
            stages.add(rest[-1])
        if image == "scratch" or image in stages:
            continue
        # registry host (with a dot or a port) / namespace / name
        assert re.match(r"^[a-z0-9.-]+\.[a-z]+(:\d+)?/[^/]+/[^/]+", image), f"not fully qualified: {image}"


def test_runtime_image_is_static_on_scratch():
    froms = [a for i, a in dockerfile_instructions() if i == "FROM"]
    assert froms[-1] == "scratch"
    assert ("USER", "65534:65534") in dockerfile_instructions()


def test_oci_labels():
    labels = " ".join(a for i, a in dockerfile_instructions() if i == "LABEL")
    for key in ("title", "description", "version", "revision", "created", "source", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_exposes_mail_and_admin_ports():
    exposed = " ".join(a for i, a in dockerfile_instructions() if i == "EXPOSE").split()
    assert sorted(exposed) == ["1143/tcp", "1587/tcp", "9090/tcp"]


@pytest.fixture(scope="module")
def deb() -> dict:
    return tomllib.loads(CARGO_TOML.read_text())["package"]["metadata"]["deb"]


def test_deb_installs_binary_unit_and_config(deb):
    targets = {}
    for source, target, mode in deb["assets"]:
        targets[target] = (source, mode)
        if not source.startswith("target/"):
            assert (REPO / source).is_file(), f"asset {source} does not exist"
    assert targets["usr/bin/"] == ("target/release/mailgate", "755")
    assert targets["lib/systemd/system/mailgate.service"] == ("deploy/systemd/mailgate.service", "644")
    assert targets["etc/mailgate/mailgate.yaml"] == ("deploy/systemd/mailgate.yaml", "644")
    assert "/etc/mailgate/mailgate.yaml" in deb["conf-files"]
    assert deb["maintainer"]

"""deploy/kubernetes-sidecar.yaml: mailgate as a native sidecar next to an application."""

from __future__ import annotations

import pytest
import yaml

from conftest import KUBERNETES_VERSIONS, REPO, duration_seconds, validate

MANIFEST = REPO / "deploy" / "kubernetes-sidecar.yaml"
# The application's own shutdown time the manifest budgets for (see its comment).
APP_STOP_SECONDS = 15


@pytest.fixture(scope="module")
def objects() -> list[dict]:
    return [o for o in yaml.safe_load_all(MANIFEST.read_text()) if o]


def one(objects, kind):
    (found,) = [o for o in objects if o["kind"] == kind]
    return found


@pytest.fixture(scope="module")
def pod(objects) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]


@pytest.fixture(scope="module")
def mailgate(pod) -> dict:
    (container,) = [c for c in pod["initContainers"] if c["name"] == "mailgate"]
    return container


@pytest.fixture(scope="module")
def config(objects) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap")["data"]["config.yaml"])


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
def test_validates_strictly(objects, kube_version):
    assert {o["kind"] for o in objects} == {"Secret", "ConfigMap", "Deployment"}
    for obj in objects:
        validate(obj, kube_version)


def test_mailgate_is_a_native_sidecar(pod, mailgate):
    # An init container that keeps running: started before, stopped after the app.
    assert mailgate["restartPolicy"] == "Always"
    assert "mailgate" not in [c["name"] for c in pod["containers"]]
    assert pod["initContainers"][0]["name"] == "mailgate"


def test_probes(mailgate):
    admin = next(p for p in mailgate["ports"] if p["name"] == "admin")
    assert admin["containerPort"] == 9090
    # The app starts only after this passes, so it must not wait for the app (/readyz does).
    assert mailgate["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert mailgate["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert mailgate["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_hardening(pod, mailgate):
    context = mailgate["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["runAsNonRoot"] is True
    assert context["runAsUser"] == 65534 and context["runAsGroup"] == 65534
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False


def test_grace_period_covers_app_then_mailgate(pod, config):
    mailgate_stop = duration_seconds(config["drain_delay"]) + duration_seconds(config["shutdown_grace"]) + 3
    assert pod["terminationGracePeriodSeconds"] > APP_STOP_SECONDS + mailgate_stop


def test_config_matches_the_pod(pod, mailgate, config):
    assert config["admin"]["listen"] == "0.0.0.0:9090"
    assert "metrics" not in config
    listen_ports = {}
    for listener in config["listeners"]:
        host, port = listener["listen"].rsplit(":", 1)
        assert host == "127.0.0.1", "loopback only: client_auth is any"
        listen_ports[listener["protocol"]] = port
    (app,) = pod["containers"]
    env = {e["name"]: e["value"] for e in app["env"]}
    assert env["IMAP_PORT"] == listen_ports["imap"]
    assert env["SMTP_PORT"] == listen_ports["smtp"]
    mounts = {m["mountPath"] for m in mailgate["volumeMounts"]}
    assert "/etc/mailgate" in mounts
    password_file = config["tokens"]["auth_server"]["password_file"]
    assert password_file.rsplit("/", 1)[0] in mounts

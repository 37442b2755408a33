"""Replicas sharing state through Redis (values `redis`, docs/replicas.md): the chart
renders tokens.shared.redis with the password as a file, lifts the one-writer guard of the
token store and mounts it no volume; without redis.url nothing changes. Value set (i) in
tests/chart/values/ is also validated strictly in test_chart.py."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from conftest import REPO, mailgate_check
from test_chart import render, render_fails, rendered, values_with
from test_facing_network import mounts, secret_file, volumes

URL = "redis://redis-master.mail.svc.cluster.local:6379/0"
PASSWORD_FILE = "/var/run/secrets/mailgate/redis/password"
STORE_KEY_FILE = "/var/run/secrets/mailgate/store-key/key"
SHARED_KEY_FILE = "/var/run/secrets/mailgate/shared-key/key"
CA_FILE = "/var/run/secrets/mailgate/redis-ca/ca.crt"
# What the pods' Secrets would hold, for `mailgate check` with files.
KEY = base64.b64encode(bytes(range(32))).decode() + "\n"
PASSWORD = "not-in-any-manifest-7c1e\n"


def shared(result) -> dict:
    return result.config()["tokens"]["shared"]


def with_redis(**redis) -> dict:
    """The defaults (an auth server, no store) sharing through Redis with a sealing key."""
    return values_with({"redis": {"url": URL, "sealingKey": {"existingSecret": "mailgate-shared-key"}, **redis}})


def ca_certificate() -> str:
    """A CA certificate mailgate can load (the system's first), for `ca_file`."""
    bundle = open("/etc/ssl/certs/ca-certificates.crt").read()
    end = "-----END CERTIFICATE-----"
    return bundle.split(end)[0] + end + "\n"


# --- with redis.url ----------------------------------------------------------------------


def test_redis_is_rendered_with_its_password_as_a_file():
    result = rendered("replicas-redis")
    assert shared(result) == {
        "redis": {"url": URL, "password_file": PASSWORD_FILE, "key_prefix": "mail:", "timeout": "500ms"},
    }
    assert secret_file(result, PASSWORD_FILE) == ("redis", "redis-password")
    assert mounts(result)["redis-password"] == {"name": "redis-password",
                                                "mountPath": "/var/run/secrets/mailgate/redis", "readOnly": True}
    # The store's key seals everything shared: mailgate refuses a second one.
    store = result.config()["tokens"]["oauth2"]["store"]
    assert store == {"key_file": STORE_KEY_FILE}
    assert "key_file" not in shared(result)


def test_replicas_share_a_store_without_a_volume():
    result = rendered("replicas-redis")
    assert result.deployment["spec"]["replicas"] == 3
    # No one-writer rule: pods may overlap during a rollout.
    assert result.deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert not result.of_kind("PersistentVolumeClaim")
    assert "token-store" not in volumes(result) and "token-store" not in mounts(result)
    assert "dir" not in result.config()["tokens"]["oauth2"]["store"]
    assert "Redis" in result.notes and "appendonly" in result.notes
    assert "kept on the volume" not in result.notes


def test_the_token_holder_scales_once_it_shares_through_redis():
    """Values (g) with a store on a volume: redis.url is all it takes to lift the guard."""
    values = values_with({"replicaCount": 3, "redis": {"url": URL}}, "token-holder")
    values["admin"]["onboarding"]["existingSecret"] = ""
    values["config"]["admin"].pop("onboarding")
    result = render(values)
    assert result.deployment["spec"]["replicas"] == 3
    assert result.deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert not result.of_kind("PersistentVolumeClaim")
    assert result.config()["tokens"]["oauth2"]["store"] == {"key_file": STORE_KEY_FILE}


def test_no_password_anywhere_in_the_manifests():
    result = rendered("replicas-redis")
    for obj in result.objects:
        assert obj["kind"] != "Secret", "the chart must not create a Secret for the password"
    redis = shared(result)["redis"]
    assert "password" not in redis and "password_env" not in redis
    assert "@" not in redis["url"]
    assert not re.search(r"\bpassword:", result.manifest)
    for bad in ("redis://:hunter2@redis:6379/0", "redis://default:hunter2@redis:6379/0",
                "rediss://mailgate:hunter2@redis:6380", "redis+unix:///run/redis.sock?pass=hunter2"):
        message = render_fails(with_redis(url=bad), "redis.url holds a password", "redis.password.existingSecret")
        assert "hunter2" not in message


def test_without_a_store_the_sealing_key_comes_from_its_secret():
    result = render(with_redis())
    assert shared(result) == {"redis": {"url": URL}, "key_file": SHARED_KEY_FILE}
    assert secret_file(result, SHARED_KEY_FILE) == ("mailgate-shared-key", "key")
    render_fails(values_with({"redis": {"url": URL}}),
                 "redis.url needs a key to seal", "redis.sealingKey.existingSecret")
    render_fails(values_with({"redis": {"sealingKey": {"existingSecret": "k"}}}, "replicas-redis"),
                 "redis.sealingKey.existingSecret is set, but with an OAuth2 token store")


def test_tls_ca_and_user():
    result = render(with_redis(url="rediss://redis.example.com:6380/2", username="mailgate",
                               ca={"existingSecret": "redis-ca"}))
    redis = shared(result)["redis"]
    assert redis == {"url": "rediss://redis.example.com:6380/2", "username": "mailgate", "ca_file": CA_FILE}
    assert secret_file(result, CA_FILE) == ("redis-ca", "ca.crt")
    assert shared(render(with_redis(tls=True)))["redis"] == {"url": URL, "tls": True}
    render_fails(with_redis(ca={"existingSecret": "redis-ca"}), "redis.ca.existingSecret is set but",
                 "not TLS")


def test_sentinel_and_cluster():
    redis = shared(render(with_redis(url="redis://redis:26379/0", sentinel="mymaster")))["redis"]
    assert redis == {"url": "redis://redis:26379/0", "sentinel": "mymaster"}
    assert shared(render(with_redis(cluster=True)))["redis"] == {"url": URL, "cluster": True}
    render_fails(values_with({"redis": {"sentinel": "mymaster"}}), "redis.sentinel is set but redis.url is not")


def passes_mailgate_check(result, files: dict[str, str], binary, tmp_path) -> None:
    """mailgate reads the Secrets' files as the pod would, and takes the configuration."""
    config = result.config()
    # The pod's other files (client TLS, the accounts) are not what this checks.
    for listener in config["listeners"]:
        listener.pop("tls", None)
    config["client_auth"] = {"mode": "any", "allow_remote": True}
    checked = mailgate_check(binary, config, tmp_path, files)
    assert checked.returncode == 0, checked.stderr
    assert "configuration is valid" in checked.stderr + checked.stdout


def test_a_store_in_redis_passes_mailgate_check(mailgate_binary, tmp_path):
    files = {STORE_KEY_FILE: KEY, PASSWORD_FILE: PASSWORD,
             "/var/run/secrets/mailgate/oauth2/m365/client-secret": "client-secret\n"}
    passes_mailgate_check(rendered("replicas-redis"), files, mailgate_binary, tmp_path)


def test_tls_with_a_sealing_key_passes_mailgate_check(mailgate_binary, tmp_path):
    result = render(with_redis(url="rediss://redis.example.com:6380/0", password={"existingSecret": "redis"},
                               ca={"existingSecret": "redis-ca"}))
    files = {SHARED_KEY_FILE: KEY, PASSWORD_FILE: PASSWORD, CA_FILE: ca_certificate()}
    passes_mailgate_check(result, files, mailgate_binary, tmp_path)


def test_the_demo_values_in_the_docs_install():
    """docs/replicas.md's mailgate-values.yaml, on the chart's defaults."""
    text = (REPO / "docs" / "replicas.md").read_text()
    block = text.split("```yaml\n# mailgate-values.yaml")[1].split("```")[0]
    demo = yaml.safe_load(block.split("\n", 1)[1])
    result = render(demo)
    assert result.deployment["spec"]["replicas"] == 3
    assert not result.of_kind("PersistentVolumeClaim")
    assert shared(result) == {"redis": {"url": URL, "password_file": PASSWORD_FILE}}
    assert secret_file(result, PASSWORD_FILE) == ("redis", "redis-password")


# --- refused -----------------------------------------------------------------------------


@pytest.mark.parametrize("given, name", [
    ({"tls": True}, "redis.tls"),
    ({"username": "mailgate"}, "redis.username"),
    ({"keyPrefix": "mail:"}, "redis.keyPrefix"),
    ({"timeout": "2s"}, "redis.timeout"),
    ({"password": {"existingSecret": "redis"}}, "redis.password.existingSecret"),
    ({"ca": {"existingSecret": "redis-ca"}}, "redis.ca.existingSecret"),
    ({"sealingKey": {"existingSecret": "k"}}, "redis.sealingKey.existingSecret"),
])
def test_redis_values_without_a_url_are_refused(given, name):
    render_fails(values_with({"redis": given}), f"{name} is set but redis.url is not")


@pytest.mark.parametrize("bad", [
    {"url": "http://redis:6379"},
    {"url": "redis://redis:6379/zero"},
    {"url": "redis-master:6379"},
    {"timeout": "1 second"},
    {"keyPrefix": "mail gate:"},
    {"passwordSecret": {"name": "redis"}},
    {"password": {"name": "redis"}},
])
def test_wrong_redis_values_fail_the_schema(bad):
    render_fails(values_with({"redis": {"url": URL, **bad}}), "values don't meet the specifications of the schema")


def test_one_shared_section_and_no_claim():
    both = with_redis()
    both["config"] = {"tokens": {"shared": {"redis": {"url": URL}, "key_env": "K"}}}
    render_fails(both, "config.tokens.shared is set and redis.url too")
    render_fails(values_with({"oauth2": {"store": {"existingClaim": "tokens"}}}, "replicas-redis"),
                 "oauth2.store.existingClaim is set, but with redis.url")


def test_onboarding_still_needs_one_replica():
    values = values_with({"admin": {"tls": {"existingSecret": "admin-tls"},
                                    "onboarding": {"existingSecret": "onboarding"}}}, "replicas-redis")
    render_fails(values, "config.admin.onboarding with replicaCount 3", "one process")


def without_redis_url(changes: dict | None = None) -> dict:
    """Values (i) with no redis value set."""
    return values_with({"redis": {"url": "", "password": {"existingSecret": ""}, "keyPrefix": "", "timeout": ""},
                        **(changes or {})}, "replicas-redis")


def test_shared_section_by_hand_lifts_the_guard_too():
    """config.tokens.shared written in `config` (e.g. its password from extraEnv) counts as Redis."""
    values = without_redis_url()
    values["config"]["tokens"]["shared"] = {"redis": {"url": URL, "password_env": "REDIS_PASSWORD"}}
    result = render(values)
    assert result.deployment["spec"]["replicas"] == 3
    assert not result.of_kind("PersistentVolumeClaim")
    assert shared(result) == {"redis": {"url": URL, "password_env": "REDIS_PASSWORD"}}


# --- without redis.url -------------------------------------------------------------------


@pytest.mark.parametrize("value_set", ["defaults", "token-holder", "delegated-local"])
def test_without_redis_nothing_is_shared(value_set):
    result = rendered(value_set)
    assert "shared" not in result.config().get("tokens", {})
    assert not {"redis-password", "redis-ca", "shared-key"} & set(volumes(result))
    assert "Redis" not in result.notes


def test_without_redis_the_store_keeps_one_writer():
    render_fails(without_redis_url(),
                 "replicaCount 3 with an OAuth2 token store on files", "redis.url")

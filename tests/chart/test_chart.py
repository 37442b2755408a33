"""The Helm chart (helm/mailgate): lint, render with several value sets, validate every
object against the Kubernetes schemas, and check what the chart promises."""

from __future__ import annotations

import copy
import hashlib

import helm_sdkpy
import pytest

from conftest import (
    KUBERNETES_VERSIONS,
    NAMESPACE,
    duration_seconds,
    load_values,
    lint,
    mailgate_check,
    render,
    validate,
)

# (e) is the defaults; (a) to (d) and (f) to (j) are files in tests/chart/values/.
VALUE_SETS = {
    "defaults": None,
    "sidecar-single-account": "sidecar-single-account",
    "standalone-loadbalancer": "standalone-loadbalancer",
    "servicemonitor": "servicemonitor",
    "config-secret": "config-secret",
    "facing-network": "facing-network",
    "token-holder": "token-holder",
    "delegated-local": "delegated-local",
    "replicas-redis": "replicas-redis",
    "backend-pool": "backend-pool",
}

# helm.sh/helm/v4/pkg/chart/common/support: lint message severities.
LINT_INFO, LINT_WARNING, LINT_ERROR = 1, 2, 3

_rendered: dict[tuple[str, str], object] = {}


def rendered(value_set: str, kube_version: str = KUBERNETES_VERSIONS[-1]):
    """Each value set is rendered once per Kubernetes version and shared by the tests."""
    key = (value_set, kube_version)
    if key not in _rendered:
        name = VALUE_SETS[value_set]
        _rendered[key] = render(load_values(name) if name else None, kube_version)
    return _rendered[key]


def values_with(changes: dict, base: str | None = None) -> dict:
    """A value set (default: none, i.e. the chart's defaults) with `changes` merged in."""
    values = copy.deepcopy(load_values(base)) if base else {}

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = value

    merge(values, changes)
    return values


def render_fails(values: dict, *fragments: str) -> str:
    """Renders `values`, expects Helm to refuse them, and checks the message."""
    with pytest.raises(helm_sdkpy.InstallError) as refused:
        render(values)
    message = str(refused.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in Helm's message: {message}"
    return message


def admin_port(result) -> int:
    port = next(p for p in result.container["ports"] if p["name"] == "admin")
    return port["containerPort"]


# --- lint --------------------------------------------------------------------------------


def test_lint_passes_with_default_values():
    result = lint()
    assert result["TotalChartsLinted"] == 1
    assert not result.get("Errors")
    # The library returns each message's severity and file but not its text (a Go
    # error serialises as {}). INFO ("icon is recommended") is all that may be there.
    worst = [(m["Severity"], m["Path"]) for m in result["Messages"] if m["Severity"] >= LINT_WARNING]
    assert not worst, f"helm lint reported warnings or errors (severity, file): {worst}"


# --- every value set renders and validates ---------------------------------------------


@pytest.mark.parametrize("kube_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_renders_and_validates_strictly(value_set, kube_version):
    result = rendered(value_set, kube_version)
    kinds = sorted(o["kind"] for o in result.objects)
    assert {"Deployment", "Service", "ServiceAccount"} <= set(kinds)
    for obj in result.objects:
        validate(obj, kube_version)
    # What Helm sent to the (fake) API server is what it rendered.
    assert [o["metadata"]["name"] for o in result.fake.created("Deployment")] == [
        result.deployment["metadata"]["name"]
    ]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_config_passes_mailgate_check(value_set, mailgate_binary, tmp_path):
    checked = mailgate_check(mailgate_binary, rendered(value_set).config(), tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "configuration is valid" in checked.stderr + checked.stdout


def test_default_values_install_and_notes_render():
    result = rendered("defaults")
    assert result.release["info"]["status"] == "deployed"
    assert "mg-mailgate-admin" in result.notes
    assert "kubectl -n mail create secret generic mailgate-client-accounts" in result.notes
    config = result.config()
    assert config["admin"] == {"listen": "0.0.0.0:9090"}
    assert "metrics" not in config
    assert config["client_auth"]["accounts_file"] == "/var/run/secrets/mailgate/client-accounts/accounts.yaml"


def test_default_listeners_require_starttls(mailgate_binary, tmp_path):
    """Issue 13 item 20: the default listeners took passwords in clear on 0.0.0.0."""
    result = rendered("defaults")
    config = result.config()
    for listener in config["listeners"]:
        tls = listener["tls"]
        assert tls["mode"] == "starttls" and tls["require"] is True, listener
        assert tls["cert_file"] == "/var/run/secrets/mailgate/tls/tls.crt", listener
    checked = mailgate_check(mailgate_binary, config, tmp_path)
    assert checked.returncode == 0 and "warning" not in checked.stderr, checked.stderr
    assert "kubectl -n mail create secret tls mg-mailgate-tls --cert=tls.crt --key=tls.key" in result.notes


# --- the admin port ---------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_admin_port_is_never_on_the_mail_service(value_set):
    result = rendered(value_set)
    port = admin_port(result)
    mail = result.one("Service", "mg-mailgate")
    for entry in mail["spec"]["ports"]:
        assert entry["name"] != "admin"
        assert entry["targetPort"] != "admin"
        assert entry["port"] != port
        mail_container_port = next(p for p in result.container["ports"] if p["name"] == entry["targetPort"])
        assert mail_container_port["containerPort"] != port

    admin = result.one("Service", "mg-mailgate-admin")
    assert admin["spec"]["type"] == "ClusterIP"
    assert admin["spec"]["ports"] == [{"name": "admin", "port": port, "targetPort": "admin", "protocol": "TCP"}]
    assert admin["spec"]["selector"] == result.deployment["spec"]["selector"]["matchLabels"]


def test_load_balancer_carries_only_mail_ports():
    result = rendered("standalone-loadbalancer")
    mail = result.one("Service", "mg-mailgate")
    assert mail["spec"]["type"] == "LoadBalancer"
    assert mail["spec"]["externalTrafficPolicy"] == "Local"
    assert mail["spec"]["loadBalancerSourceRanges"] == ["192.0.2.0/24", "198.51.100.0/24"]
    assert [p["name"] for p in mail["spec"]["ports"]] == ["imap", "submission"]
    assert [s["spec"]["type"] for s in result.of_kind("Service")].count("LoadBalancer") == 1


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_probes_use_the_admin_port(value_set):
    result = rendered(value_set)
    container = result.container
    # HTTPS exactly when the admin endpoint serves it.
    scheme = {"scheme": "HTTPS"} if "tls" in result.config()["admin"] else {}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin", **scheme}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin", **scheme}
    # Not /readyz: a pod waits for its auth server there, and must not be restarted for it.
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin", **scheme}


def test_admin_port_follows_config():
    result = render(values_with({"config": {"admin": {"listen": "[::]:9100"}}}))
    assert admin_port(result) == 9100
    assert result.one("Service", "mg-mailgate-admin")["spec"]["ports"][0]["port"] == 9100


def test_legacy_metrics_key_still_works():
    result = render(values_with({"config": {"admin": None, "metrics": {"listen": "0.0.0.0:9091"}}}))
    assert admin_port(result) == 9091
    assert result.config()["metrics"] == {"listen": "0.0.0.0:9091"}


# --- the configuration and its checksum --------------------------------------------------


def config_object_text(result, template: str) -> str:
    for part in result.manifest.split("---\n# Source: "):
        if part.startswith(f"mailgate/templates/{template}\n"):
            return part.split("\n", 1)[1].strip()
    raise AssertionError(f"{template} not rendered")


@pytest.mark.parametrize(
    ("value_set", "kind", "template"),
    [("defaults", "ConfigMap", "configmap.yaml"), ("config-secret", "Secret", "config-secret.yaml")],
)
def test_config_checksum_is_a_pod_annotation(value_set, kind, template):
    result = rendered(value_set)
    assert len(result.of_kind(kind)) == 1
    other = {"ConfigMap": "Secret", "Secret": "ConfigMap"}[kind]
    assert not result.of_kind(other)

    checksum = result.pod["metadata"]["annotations"]["checksum/config"]
    # The template's output, which the manifest shows with its surrounding blank lines trimmed.
    text = config_object_text(result, template)
    candidates = {hashlib.sha256(t.encode()).hexdigest() for t in (text, f"\n{text}\n", f"{text}\n")}
    assert checksum in candidates

    volume = next(v for v in result.pod["spec"]["volumes"] if v["name"] == "config")
    if kind == "Secret":
        assert volume["secret"]["secretName"] == "mg-mailgate"
    else:
        assert volume["configMap"]["name"] == "mg-mailgate"
    mount = next(m for m in result.container["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/mailgate", "readOnly": True}  # no subPath


def test_checksum_changes_with_the_config_only():
    base = rendered("defaults").pod["metadata"]["annotations"]["checksum/config"]
    changed = render(values_with({"config": {"log": {"level": "debug"}}}))
    assert changed.pod["metadata"]["annotations"]["checksum/config"] != base
    unrelated = render(values_with({"replicaCount": 5}))
    assert unrelated.pod["metadata"]["annotations"]["checksum/config"] == base


def test_no_checksum_when_mailgate_reloads_in_place():
    result = render(values_with({"rollOnConfigChange": False}))
    assert "checksum/config" not in (result.pod["metadata"].get("annotations") or {})


def test_secrets_are_mounted_and_referenced():
    result = rendered("standalone-loadbalancer")
    config = result.config()
    assert config["tokens"]["auth_server"]["password_file"] == "/var/run/secrets/mailgate/auth-server/password"
    assert config["client_auth"]["accounts_file"] == "/var/run/secrets/mailgate/client-accounts/accounts.yaml"
    volumes = {v["name"]: v for v in result.pod["spec"]["volumes"]}
    assert volumes["auth-server-password"]["secret"]["secretName"] == "mailgate-auth-server"
    assert volumes["client-accounts"]["secret"]["secretName"] == "mailgate-accounts"


def test_inline_accounts_need_no_accounts_secret():
    result = rendered("sidecar-single-account")
    assert "accounts_file" not in result.config()["client_auth"]
    assert "client-accounts" not in {v["name"] for v in result.pod["spec"]["volumes"]}


def test_accounts_secret_is_not_mounted_without_static_auth():
    values = values_with({
        "config": {
            "listeners": [{"name": "imap", "protocol": "imap", "listen": "0.0.0.0:1143",
                           "upstream": {"host": "imap.example.com", "port": 993, "tls": "implicit"}}],
            "client_auth": {"mode": "any", "allow_remote": True},
        },
        "service": {"ports": [{"name": "imap", "port": 143, "targetPort": 1143}]},
    })
    result = render(values)
    assert "accounts_file" not in result.config()["client_auth"]
    assert "client-accounts" not in {v["name"] for v in result.pod["spec"]["volumes"]}


# --- memory ------------------------------------------------------------------------------


def memory_limit(result) -> str:
    return result.container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("hash_workers, limit", [(2, "102Mi"), (8, "216Mi"), (None, "140Mi")])
def test_memory_limit_follows_hash_workers(hash_workers, limit):
    """Each argon2 check holds m= (19 MiB); the pod's limit leaves room for hash_workers of
    them (mailgate's most by default when unset: 4), so a login burst is not OOM-killed."""
    values = values_with({"config": {"client_auth": {"hash_workers": hash_workers}}})
    assert memory_limit(render(values)) == limit


def test_memory_limit_follows_the_hashes_memory_cost():
    values = values_with({"memoryLimit": {"baseMiB": 48, "argon2KiB": 65536}})
    assert memory_limit(render(values)) == f"{48 + 2 * 64}Mi"


def test_memory_limit_without_password_hashes_is_the_base():
    values = values_with({
        "config": {"client_auth": {"mode": "auth_server", "hash_workers": None,
                                   "auth_server": {"url": "https://auth.example/check"}}},
    })
    assert memory_limit(render(values)) == "64Mi"


def test_an_explicit_memory_limit_wins():
    values = values_with({"resources": {"limits": {"memory": "1Gi", "cpu": "1"}}})
    limits = render(values).container["resources"]["limits"]
    assert limits == {"memory": "1Gi", "cpu": "1"}


# --- shutdown timing ---------------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_grace_period_exceeds_drain_and_shutdown(value_set):
    result = rendered(value_set)
    config = result.config()
    drain = duration_seconds(config.get("drain_delay", "5s"))
    grace = duration_seconds(config.get("shutdown_grace", "20s"))
    needed = drain + grace + 3
    assert result.pod["spec"]["terminationGracePeriodSeconds"] > needed


def test_too_short_grace_period_is_refused():
    render_fails(values_with({"terminationGracePeriodSeconds": 28}),
                 "terminationGracePeriodSeconds (28) must exceed", "= 28 s")
    render_fails(values_with({"config": {"shutdown_grace": "1m 30s"}}),
                 "terminationGracePeriodSeconds (35) must exceed", "= 98 s")
    render(values_with({"config": {"shutdown_grace": "1m 30s"}, "terminationGracePeriodSeconds": 105}))


def test_unreadable_duration_is_refused():
    render_fails(values_with({"config": {"drain_delay": "5 seconds"}}), "config.drain_delay")


# --- ServiceMonitor, PodDisruptionBudget, NetworkPolicy ---------------------------------


def test_service_monitor_scrapes_the_admin_service():
    result = rendered("servicemonitor")
    monitor = result.one("ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "admin", "path": "/metrics", "scheme": "http", "interval": "15s", "scrapeTimeout": "5s"}
    ]
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in result.of_kind("Service")
                if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert [s["metadata"]["name"] for s in selected] == ["mg-mailgate-admin"]


def test_optional_objects_are_off_by_default():
    kinds = {o["kind"] for o in rendered("defaults").objects}
    assert not kinds & {"ServiceMonitor", "PodDisruptionBudget", "NetworkPolicy"}


def test_pod_disruption_budget():
    pdb = rendered("standalone-loadbalancer").one("PodDisruptionBudget")
    # minAvailable wins over the default maxUnavailable.
    assert pdb["spec"]["minAvailable"] == 2
    assert "maxUnavailable" not in pdb["spec"]
    default = render(values_with({"podDisruptionBudget": {"enabled": True}})).one("PodDisruptionBudget")
    assert default["spec"]["maxUnavailable"] == 1


def ingress_rules(result) -> tuple[dict, dict]:
    """(the rule for the mail ports, the rule for the admin port)."""
    policy = result.one("NetworkPolicy")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert policy["spec"]["podSelector"]["matchLabels"] == result.deployment["spec"]["selector"]["matchLabels"]
    port = admin_port(result)
    rules = policy["spec"]["ingress"]
    assert len(rules) == 2
    admin = [r for r in rules if [p["port"] for p in r["ports"]] == [port]]
    mail = [r for r in rules if port not in [p["port"] for p in r["ports"]]]
    assert len(admin) == 1 and len(mail) == 1, rules
    return mail[0], admin[0]


def mail_ports(result) -> list[int]:
    names = [p["name"] for p in result.one("Service", "mg-mailgate")["spec"]["ports"]]
    return [p["containerPort"] for p in result.container["ports"] if p["name"] in names]


def namespaces_of(peer: dict) -> list[str]:
    selector = peer["namespaceSelector"]
    if "matchLabels" in selector:
        return [selector["matchLabels"]["kubernetes.io/metadata.name"]]
    (expression,) = selector["matchExpressions"]
    assert expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "In"
    return expression["values"]


def test_network_policy_mail_from_namespaces_admin_from_monitoring():
    result = rendered("sidecar-single-account")
    mail, admin = ingress_rules(result)
    assert [p["port"] for p in mail["ports"]] == mail_ports(result) == [1143]
    (peer,) = mail["from"]
    assert namespaces_of(peer) == ["ticket-system"]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "ticket-system"}}
    (peer,) = admin["from"]
    assert namespaces_of(peer) == ["monitoring"]
    assert "podSelector" not in peer and "ipBlock" not in peer


def test_network_policy_mail_from_cidrs():
    result = rendered("standalone-loadbalancer")
    mail, admin = ingress_rules(result)
    assert [p["port"] for p in mail["ports"]] == mail_ports(result) == [1143, 1587]
    assert mail["from"] == [{"ipBlock": {"cidr": "192.0.2.0/24"}}, {"ipBlock": {"cidr": "198.51.100.0/24"}}]
    (peer,) = admin["from"]
    assert namespaces_of(peer) == ["observability"]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}


def test_network_policy_defaults_to_the_release_namespace():
    mail, admin = ingress_rules(rendered("servicemonitor"))
    (peer,) = mail["from"]
    assert namespaces_of(peer) == [NAMESPACE]
    (peer,) = admin["from"]
    assert namespaces_of(peer) == ["monitoring"]


def test_pop3_and_managesieve_listeners_get_ports_and_policy(mailgate_binary, tmp_path):
    """Issue 15: POP3 (110 with STLS, 995 implicit) and ManageSieve (4190) listeners are
    served, admitted and checked like IMAP and SMTP ones."""
    m365 = {"host": "outlook.office365.com", "port": 995, "tls": "implicit", "mechanism": "xoauth2"}
    listeners = [
        {"name": "pop3", "protocol": "pop3", "listen": "0.0.0.0:1110",
         "tls": {"mode": "starttls", "require": True}, "upstream": m365},
        {"name": "pop3s", "protocol": "pop3", "listen": "0.0.0.0:1995",
         "tls": {"mode": "implicit"}, "upstream": m365},
        {"name": "sieve", "protocol": "managesieve", "listen": "0.0.0.0:14190",
         "tls": {"mode": "starttls", "require": True},
         "upstream": {"host": "sieve.example.net", "port": 4190, "tls": "starttls"}},
    ]
    ports = [
        {"name": "pop3", "port": 110, "targetPort": 1110},
        {"name": "pop3s", "port": 995, "targetPort": 1995},
        {"name": "sieve", "port": 4190, "targetPort": 14190},
    ]
    result = render(values_with({"config": {"listeners": listeners}, "service": {"ports": ports},
                                 "networkPolicy": {"enabled": True}}))
    # The Service targets the container ports by name.
    service = result.one("Service", "mg-mailgate")["spec"]["ports"]
    assert [(p["name"], p["port"], p["targetPort"]) for p in service] == [
        ("pop3", 110, "pop3"), ("pop3s", 995, "pop3s"), ("sieve", 4190, "sieve")]
    container = {p["name"]: p["containerPort"] for p in result.container["ports"]}
    assert {name: container.get(name) for name in ("pop3", "pop3s", "sieve")} == {
        "pop3": 1110, "pop3s": 1995, "sieve": 14190}
    mail, _ = ingress_rules(result)
    assert [p["port"] for p in mail["ports"]] == mail_ports(result) == [1110, 1995, 14190]
    config = result.config()
    assert [listener["protocol"] for listener in config["listeners"]] == ["pop3", "pop3", "managesieve"]
    checked = mailgate_check(mailgate_binary, config, tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "configuration is valid" in checked.stderr + checked.stdout


# --- the pod's hardening -----------------------------------------------------------------


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_pod_runs_unprivileged(value_set):
    result = rendered(value_set)
    pod = result.pod["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65534
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    context = result.container["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}


# --- values the schema or the templates refuse ------------------------------------------


@pytest.mark.parametrize(
    ("typo", "where"),
    [
        ({"replicas": 3}, "replicas"),
        ({"service": {"typ": "LoadBalancer"}}, "typ"),
        ({"serviceMonitor": {"enable": True}}, "enable"),
        ({"networkPolicy": {"mail": {"fromNamespace": ["apps"]}}}, "fromNamespace"),
        ({"image": {"tags": "1.0"}}, "tags"),
        ({"podDisruptionBudget": {"maxUnavailabe": 1}}, "maxUnavailabe"),
        # Issue 13 item 20: mailgate's own file was free-form here, so these crash-looped.
        ({"config": {"log": {"levle": "debug"}}}, "levle"),
        ({"config": {"client_auth": {"mode": "static", "throttle": {"windw": "1m"}}}}, "windw"),
    ],
)
def test_typo_in_values_fails(typo, where):
    message = render_fails(values_with(typo), "values don't meet the specifications of the schema")
    assert where in message


@pytest.mark.parametrize(
    "bad",
    [
        {"replicaCount": "two"},
        {"service": {"type": "ExternalName"}},
        {"configStorage": "configmap"},
        {"service": {"ports": [{"name": "admin", "port": 9090, "targetPort": 9090}]}},
        {"serviceMonitor": {"interval": "30 seconds"}},
        {"networkPolicy": {"mail": {"fromCIDRs": ["office"]}}},
        {"config": "listeners: []"},
        {"config": {"client_auth": {"mode": "statc"}}},
        # pop3 and managesieve are protocols since issue 15; pop4 is none.
        {"config": {"listeners": [{"name": "imap", "protocol": "pop4", "listen": "0.0.0.0:1143",
                                   "upstream": {"host": "mx", "port": 993, "tls": "implicit"}}]}},
    ],
)
def test_wrong_types_fail_the_schema(bad):
    render_fails(values_with(bad), "values don't meet the specifications of the schema")


def test_service_port_must_be_a_listener():
    render_fails(values_with({"service": {"ports": [{"name": "pop3", "port": 110, "targetPort": 1110}]}}),
                 "targetPort 1110 is not the port of any config.listeners[].listen")


def test_admin_endpoint_is_required_and_not_loopback():
    render_fails(values_with({"config": {"admin": None}}), "config.admin.listen is required")
    render_fails(values_with({"config": {"admin": {"listen": "127.0.0.1:9090"}}}), "is loopback")
    render_fails(values_with({"config": {"metrics": {"listen": "0.0.0.0:9091"}}}),
                 "config.admin and config.metrics are the same section")
    render_fails(values_with({"config": {"admin": {"listen": "0.0.0.0:1143"}}}),
                 "port 1143, which a listener uses too")


def test_static_auth_without_accounts_fails():
    render_fails(values_with({"clientAccounts": {"existingSecret": ""}}),
                 "config.client_auth.mode is static but no account is given")


def test_auth_server_secret_needs_a_user_name_in_the_url():
    render_fails(
        values_with({"authServer": {"existingSecret": "s"},
                     "config": {"tokens": {"auth_server": {"url": "http://auth.example.com/token"}}}}),
        "put the basic-auth user name in config.tokens.auth_server.url",
    )

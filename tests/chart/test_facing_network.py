"""The chart facing networks: client TLS from Secrets or cert-manager, PROXY headers from
a load balancer, the OAuth2 token store on a volume with its one-writer guard, and the
admin endpoint's TLS and passwords. Value sets (f) to (h) in tests/chart/values/; each
is also validated strictly and passes `mailgate check` in test_chart.py."""

from __future__ import annotations

import posixpath

import pytest

from conftest import mailgate_check
from test_chart import ingress_rules, load_values, namespaces_of, render, render_fails, rendered, values_with

TLS_DIR = "/var/run/secrets/mailgate/tls"
ADMIN_TLS_DIR = "/var/run/secrets/mailgate/admin-tls"


def volumes(result) -> dict[str, dict]:
    return {v["name"]: v for v in result.pod["spec"]["volumes"]}


def mounts(result) -> dict[str, dict]:
    return {m["name"]: m for m in result.container["volumeMounts"]}


def secret_file(result, path: str) -> tuple[str, str]:
    """(Secret name, key) behind a file path in the container, following mounts and items."""
    for mount in result.container["volumeMounts"]:
        if posixpath.dirname(path) == mount["mountPath"]:
            secret = volumes(result)[mount["name"]]["secret"]
            (item,) = [i for i in secret["items"] if i["path"] == posixpath.basename(path)]
            return secret["secretName"], item["key"]
    raise AssertionError(f"no volume mounted for {path}")


def tls_listeners(config: dict) -> list[dict]:
    return [listener for listener in config["listeners"]
            if listener.get("tls", {}).get("mode") in ("implicit", "starttls")]


def listener(name: str, port: int, **extra) -> dict:
    return {"name": name, "protocol": "imap", "listen": f"0.0.0.0:{port}",
            "upstream": {"host": "imap.example.com", "port": 993, "tls": "implicit"}, **extra}


def one_listener(*listeners: dict, **changes) -> dict:
    """Default values with these listeners, each on the mail Service."""
    ports = [{"name": item["name"], "port": 10000 + i, "targetPort": int(item["listen"].rsplit(":", 1)[1])}
             for i, item in enumerate(listeners)]
    return values_with({"config": {"listeners": list(listeners)}, "service": {"ports": ports}, **changes})


# --- client TLS ------------------------------------------------------------------------


def test_tls_listeners_get_the_secret_as_a_directory():
    result = rendered("facing-network")
    config = result.config()
    listeners = tls_listeners(config)
    assert [item["name"] for item in listeners] == ["imap", "imaps", "submission", "submissions"]
    for item in listeners:
        assert item["tls"]["cert_file"] == f"{TLS_DIR}/tls.crt"
        assert item["tls"]["key_file"] == f"{TLS_DIR}/tls.key"
        assert secret_file(result, item["tls"]["cert_file"]) == ("mg-mailgate-tls", "tls.crt")
        assert secret_file(result, item["tls"]["key_file"]) == ("mg-mailgate-tls", "tls.key")
    # A directory mount: cert-manager's renewals arrive through the ..data link swap.
    assert mounts(result)["tls"] == {"name": "tls", "mountPath": TLS_DIR, "readOnly": True}


@pytest.mark.parametrize("value_set", ["facing-network", "token-holder", "delegated-local", "replicas-redis", "defaults"])
def test_no_mount_uses_sub_path(value_set):
    result = rendered(value_set)
    for mount in result.container["volumeMounts"]:
        assert "subPath" not in mount and "subPathExpr" not in mount, mount
    for volume in result.pod["spec"]["volumes"]:
        if "secret" in volume:
            assert volume["secret"]["defaultMode"] == 0o440
            assert mounts(result)[volume["name"]]["readOnly"] is True


def test_cert_manager_certificate_writes_the_mounted_secret():
    result = rendered("facing-network")
    (certificate,) = result.of_kind("Certificate")
    assert certificate["apiVersion"] == "cert-manager.io/v1"
    spec = certificate["spec"]
    assert spec["secretName"] == volumes(result)["tls"]["secret"]["secretName"] == "mg-mailgate-tls"
    assert spec["dnsNames"] == ["mail.example.com"]
    assert spec["issuerRef"] == {"name": "letsencrypt-prod", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert spec["privateKey"] == {"algorithm": "RSA", "size": 2048, "rotationPolicy": "Always"}


def test_implicit_tls_listeners_are_on_993_and_465():
    result = rendered("facing-network")
    modes = {item["listen"].rsplit(":", 1)[1]: item["tls"]["mode"] for item in tls_listeners(result.config())}
    container_ports = {p["name"]: p["containerPort"] for p in result.container["ports"]}
    service = {p["port"]: container_ports[p["targetPort"]] for p in result.one("Service", "mg-mailgate")["spec"]["ports"]}
    assert {port: modes[str(target)] for port, target in service.items()} == {
        143: "starttls", 993: "implicit", 587: "starttls", 465: "implicit"}


def test_existing_tls_secret_needs_no_certificate():
    result = rendered("delegated-local")
    assert not result.of_kind("Certificate")
    assert volumes(result)["tls"]["secret"]["secretName"] == "mail-example-com-tls"
    for item in tls_listeners(result.config()):
        assert secret_file(result, item["tls"]["cert_file"]) == ("mail-example-com-tls", "tls.crt")


def test_listener_with_its_own_files_keeps_them():
    own = {"mode": "implicit", "cert_file": "/etc/other/tls.crt", "key_file": "/etc/other/tls.key"}
    result = render(one_listener(listener("imap", 1143, tls={"mode": "starttls"}), listener("imaps", 1993, tls=own),
                                 listener("plain", 2143, tls={"mode": "none"}),
                                 tls={"existingSecret": "mail-tls"}))
    by_name = {item["name"]: item for item in result.config()["listeners"]}
    assert by_name["imap"]["tls"]["cert_file"] == f"{TLS_DIR}/tls.crt"
    assert by_name["imaps"]["tls"] == own
    assert by_name["plain"]["tls"] == {"mode": "none"}


def test_tls_wiring_mistakes_are_refused():
    # Without a Secret named, a TLS listener gets <fullname>-tls (to create, NOTES.txt says).
    result = render(one_listener(listener("imaps", 1993, tls={"mode": "implicit"})))
    volumes = {v["name"]: v for v in result.pod["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "mg-mailgate-tls"
    assert "create secret tls mg-mailgate-tls" in result.notes
    render_fails(one_listener(listener("imap", 1143), tls={"existingSecret": "mail-tls"}),
                 "the client TLS Secret mail-tls is mounted but no listener uses it")
    render_fails(one_listener(listener("imaps", 1993, tls={"mode": "implicit", "cert_file": "/a"}),
                              tls={"existingSecret": "mail-tls"}),
                 "names only one of tls.cert_file and tls.key_file")
    certificate = {"enabled": True, "issuerRef": {"name": "le"}, "dnsNames": []}
    render_fails(one_listener(listener("imaps", 1993, tls={"mode": "implicit"}), tls={"certManager": certificate}),
                 "tls.certManager.dnsNames")
    certificate = {"enabled": True, "dnsNames": ["mail.example.com"]}
    render_fails(one_listener(listener("imaps", 1993, tls={"mode": "implicit"}), tls={"certManager": certificate}),
                 "tls.certManager.issuerRef.name")


def test_mailgate_check_refuses_a_tls_listener_without_files(mailgate_binary, tmp_path):
    """The check the value sets pass is not vacuous: without the chart's wiring it fails."""
    config = rendered("facing-network").config()
    del config["listeners"][0]["tls"]["cert_file"]
    checked = mailgate_check(mailgate_binary, config, tmp_path)
    assert checked.returncode == 64
    assert "listeners[0].tls" in checked.stderr


# --- load balancers ------------------------------------------------------------------------


def test_proxy_protocol_from_the_load_balancer():
    result = rendered("facing-network")
    cidrs = ["10.20.0.0/24", "10.20.1.0/24"]
    assert {item["name"]: item["accept_proxy"] for item in result.config()["listeners"]} == {
        "imap": cidrs, "imaps": cidrs, "submission": cidrs, "submissions": cidrs}
    service = result.one("Service", "mg-mailgate")
    assert service["metadata"]["annotations"]["service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"] == "*"
    assert "externalTrafficPolicy" not in service["spec"]
    # The balancer's connections are admitted to the mail ports, next to the chosen namespaces.
    mail, _admin = ingress_rules(result)
    assert [p["port"] for p in mail["ports"]] == [1143, 1993, 1587, 1465]
    namespace_peer, *cidr_peers = mail["from"]
    assert namespaces_of(namespace_peer) == ["apps"]
    assert cidr_peers == [{"ipBlock": {"cidr": cidr}} for cidr in cidrs]


def test_every_listeners_accept_proxy_is_admitted():
    values = one_listener(
        listener("imap", 1143),
        listener("direct", 2143, accept_proxy=[]),
        listener("haproxy", 3143, accept_proxy=["192.0.2.10", "2001:db8::7", "10.20.0.0/24"]),
        proxyProtocol={"fromCIDRs": ["10.20.0.0/24"]},
        networkPolicy={"enabled": True},
    )
    result = render(values)
    by_name = {item["name"]: item for item in result.config()["listeners"]}
    assert by_name["imap"]["accept_proxy"] == ["10.20.0.0/24"]
    assert by_name["direct"]["accept_proxy"] == []
    assert by_name["haproxy"]["accept_proxy"] == ["192.0.2.10", "2001:db8::7", "10.20.0.0/24"]
    mail, _admin = ingress_rules(result)
    assert [peer["ipBlock"]["cidr"] for peer in mail["from"] if "ipBlock" in peer] == [
        "10.20.0.0/24", "192.0.2.10/32", "2001:db8::7/128"]


def test_local_traffic_policy_keeps_client_addresses_without_proxy():
    result = rendered("delegated-local")
    assert result.one("Service", "mg-mailgate")["spec"]["externalTrafficPolicy"] == "Local"
    assert all("accept_proxy" not in item for item in result.config()["listeners"])
    mail, _admin = ingress_rules(result)
    assert mail["from"] == [{"ipBlock": {"cidr": "192.0.2.0/24"}}]


# --- the OAuth2 token store ----------------------------------------------------------------


def test_token_store_on_a_kept_volume():
    result = rendered("token-holder")
    store = result.config()["tokens"]["oauth2"]["store"]
    assert store["dir"] == "/var/lib/mailgate/tokens"
    assert secret_file(result, store["key_file"]) == ("mailgate-store-key", "key")

    claim = result.one("PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "mg-mailgate-tokens"
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert claim["spec"] == {"accessModes": ["ReadWriteOnce"], "storageClassName": "gp3",
                             "resources": {"requests": {"storage": "1Gi"}}}
    assert volumes(result)["token-store"] == {"name": "token-store",
                                              "persistentVolumeClaim": {"claimName": "mg-mailgate-tokens"}}
    mount = mounts(result)["token-store"]
    assert mount == {"name": "token-store", "mountPath": "/var/lib/mailgate"}
    assert store["dir"].startswith(mount["mountPath"] + "/")
    # Writable through fsGroup; the root file system stays read-only.
    assert result.pod["spec"]["securityContext"]["fsGroup"] == 65534
    assert result.container["securityContext"]["readOnlyRootFilesystem"] is True


def test_one_writer_on_the_store():
    result = rendered("token-holder")
    assert result.deployment["spec"]["replicas"] == 1
    assert result.deployment["spec"]["strategy"] == {"type": "Recreate"}
    render_fails(values_with({"replicaCount": 2}, "token-holder"),
                 "replicaCount 2 with an OAuth2 token store", "oauth2.store.sharedByReplicas")


def without_onboarding(values: dict) -> dict:
    """Values without the onboarding page, which needs one replica whatever the store."""
    values["admin"]["onboarding"]["existingSecret"] = ""
    values["config"]["admin"].pop("onboarding")
    return values


def shared_store(**store) -> dict:
    """The token holder with two replicas on one store, opted in."""
    return without_onboarding(values_with(
        {"replicaCount": 2, "oauth2": {"store": {"sharedByReplicas": True, **store}}}, "token-holder"))


def test_shared_store_is_an_explicit_choice_on_a_shared_volume():
    render_fails(shared_store(), "oauth2.store.sharedByReplicas needs a volume every replica can mount",
                 "ReadWriteMany")
    result = render(shared_store(accessModes=["ReadWriteMany"]))
    assert result.deployment["spec"]["replicas"] == 2
    assert result.deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert result.one("PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]
    # An existing claim is the operator's to vouch for.
    result = render(shared_store(existingClaim="mail-tokens-rwx"))
    assert not result.of_kind("PersistentVolumeClaim")
    assert volumes(result)["token-store"]["persistentVolumeClaim"] == {"claimName": "mail-tokens-rwx"}


def test_onboarding_needs_one_replica():
    values = values_with({"replicaCount": 2, "admin": {"tls": {"existingSecret": "admin-tls"},
                                                       "onboarding": {"existingSecret": "onboarding"}}})
    render_fails(values, "config.admin.onboarding with replicaCount 2", "one process")


def test_store_wiring_mistakes_are_refused():
    render_fails(values_with({"oauth2": {"store": {"key": {"existingSecret": ""}}}}, "token-holder"),
                 "oauth2.store.enabled needs the store key")
    moved = values_with({"config": {"tokens": {"oauth2": {"store": {"dir": "/tmp/tokens"}}}}}, "token-holder")
    render_fails(moved, "config.tokens.oauth2.store.dir /tmp/tokens is not on the store's volume")
    render_fails(values_with({"podSecurityContext": {"fsGroup": None}}, "token-holder"),
                 "oauth2.store.enabled needs podSecurityContext.fsGroup")
    # A store in the configuration without the chart's volume: the root file system is read-only.
    by_hand = without_onboarding(values_with(
        {"oauth2": {"store": {"enabled": False}},
         "config": {"tokens": {"oauth2": {"store": {"dir": "/data/tokens", "key_file": "/k"}}}}},
        "token-holder"))
    render_fails(by_hand, "config.tokens.oauth2.store.dir /data/tokens is on no writable volume")
    by_hand.update(extraVolumes=[{"name": "data", "emptyDir": {}}],
                   extraVolumeMounts=[{"name": "data", "mountPath": "/data"}])
    render(by_hand)
    # The one-writer guard holds for a store mounted by hand as well.
    render_fails({**by_hand, "replicaCount": 2}, "replicaCount 2 with an OAuth2 token store")


def test_store_dir_below_the_volume_is_kept():
    values = values_with({"config": {"tokens": {"oauth2": {"store": {"dir": "/var/lib/mailgate/m365"}}}}},
                         "token-holder")
    assert render(values).config()["tokens"]["oauth2"]["store"]["dir"] == "/var/lib/mailgate/m365"


# --- OAuth2 provider secrets -----------------------------------------------------------------


def test_provider_secrets_become_files():
    result = rendered("token-holder")
    providers = result.config()["tokens"]["oauth2"]["providers"]
    m365 = providers["m365"]["client_certificate"]
    assert secret_file(result, m365["cert_file"]) == ("mailgate-m365", "tls.crt")
    assert secret_file(result, m365["key_file"]) == ("mailgate-m365", "tls.key")
    google = providers["google"]
    assert secret_file(result, google["client_secret_file"]) == ("mailgate-google", "client-secret")
    assert secret_file(result, google["service_account_file"]) == ("mailgate-google", "service-account.json")


def test_provider_wiring_mistakes_are_refused():
    render_fails(values_with({"oauth2": {"providers": {"m356": {"existingSecret": "s", "clientSecretKey": "k"}}}},
                             "token-holder"),
                 "oauth2.providers.m356: config.tokens.oauth2.providers has no provider m356")
    both = values_with({"oauth2": {"providers": {"google": {"existingSecret": "s", "clientSecretKey": "k"}}},
                        "config": {"tokens": {"oauth2": {"providers": {"google": {"client_secret_env": "X"}}}}}},
                       "token-holder")
    render_fails(both, "config.tokens.oauth2.providers.google has its own client secret")
    render_fails(values_with({"oauth2": {"providers": {"m365": {"existingSecret": "s"}}}}),
                 "values don't meet the specifications of the schema")


# --- the admin endpoint ----------------------------------------------------------------------


def test_admin_tls_and_passwords_from_secrets():
    result = rendered("token-holder")
    admin = result.config()["admin"]
    assert admin["tls"] == {"cert_file": f"{ADMIN_TLS_DIR}/tls.crt", "key_file": f"{ADMIN_TLS_DIR}/tls.key"}
    assert secret_file(result, admin["tls"]["cert_file"]) == ("mg-mailgate-admin-tls", "tls.crt")
    assert secret_file(result, admin["onboarding"]["password_file"]) == ("mailgate-onboarding", "password")
    assert admin["onboarding"]["redirect_url"] == "https://mailgate-admin.example.com/oauth/callback"
    assert secret_file(result, admin["token_service"]["password_file"]) == ("mailgate-token-service", "password")
    assert mounts(result)["admin-tls"] == {"name": "admin-tls", "mountPath": ADMIN_TLS_DIR, "readOnly": True}


def test_token_service_clients_from_secrets():
    result = rendered("token-holder")
    clients = result.config()["admin"]["token_service"]["clients"]
    assert clients == {"printer-sidecar": {
        "password_file": "/var/run/secrets/mailgate/token-service-clients/printer-sidecar/password",
        "accounts": ["printer"]}}
    assert secret_file(result, clients["printer-sidecar"]["password_file"]) == ("mailgate-printer-sidecar", "password")


def test_admin_certificate_names_the_admin_service():
    (certificate,) = rendered("token-holder").of_kind("Certificate")
    spec = certificate["spec"]
    assert spec["secretName"] == "mg-mailgate-admin-tls"
    assert spec["dnsNames"] == ["mg-mailgate-admin", "mg-mailgate-admin.mail", "mg-mailgate-admin.mail.svc",
                                "mg-mailgate-admin.mail.svc.cluster.local"]
    assert spec["issuerRef"] == {"name": "cluster-ca", "kind": "Issuer", "group": "cert-manager.io"}
    assert spec["privateKey"] == {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"}


def test_service_monitor_scrapes_https():
    (endpoint,) = rendered("token-holder").one("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == load_values("token-holder")["serviceMonitor"]["tlsConfig"]
    render_fails(values_with({"serviceMonitor": {"tlsConfig": None}}, "token-holder"),
                 "the admin endpoint serves HTTPS: set serviceMonitor.tlsConfig")


def test_admin_port_admits_monitoring_ingress_and_sidecars():
    result = rendered("token-holder")
    _mail, admin = ingress_rules(result)
    assert admin["ports"] == [{"port": 9443, "protocol": "TCP"}]
    monitoring, *extra = admin["from"]
    assert namespaces_of(monitoring) == ["monitoring"]
    assert extra == load_values("token-holder")["networkPolicy"]["admin"]["extraFrom"]
    # Still never on the mail Service, whatever it serves.
    assert result.one("Service", "mg-mailgate-admin")["spec"]["type"] == "ClusterIP"


def test_admin_wiring_mistakes_are_refused():
    render_fails(values_with({"admin": {"onboarding": {"existingSecret": "onboarding"}}, "replicaCount": 1}),
                 "config.admin.onboarding serves passwords and tokens and needs HTTPS",
                 "admin.tls.existingSecret")
    render_fails(values_with({"config": {"admin": {"token_service": {"password_env": "X"}}}}),
                 "config.admin.token_service serves passwords and tokens and needs HTTPS")
    render_fails(values_with({"admin": {"tls": {"existingSecret": "admin-tls"}},
                              "config": {"admin": {"tls": {"cert_file": "/a", "key_file": "/b"}}}}),
                 "config.admin.tls is set and admin.tls too")
    render_fails(values_with({"admin": {"tls": {"existingSecret": "admin-tls"},
                                        "tokenService": {"existingSecret": "tokens"}},
                              "config": {"admin": {"token_service": {"password_file": "/p"}}}}),
                 "config.admin.token_service has its own password_file")
    client = {"accounts": ["*"]}
    render_fails(values_with({"admin": {"tls": {"existingSecret": "admin-tls"},
                                        "tokenService": {"clients": {"a": {"existingSecret": "a", **client}}}},
                              "config": {"admin": {"token_service": {"clients": {"a": {"password_file": "/p", **client}}}}}}),
                 "config.admin.token_service.clients.a is set and admin.tokenService.clients.a too")


# --- delegated client authentication and the token holder as auth server --------------------


def test_password_check_and_token_server_secrets():
    result = rendered("delegated-local")
    config = result.config()
    check = config["client_auth"]["auth_server"]
    assert secret_file(result, check["password_file"]) == ("mailgate-directory", "password")
    tokens = config["tokens"]["auth_server"]
    assert secret_file(result, tokens["password_file"]) == ("mailgate-token-service", "password")
    assert secret_file(result, tokens["ca_file"]) == ("tokens-mailgate-admin-tls", "ca.crt")
    # Hashes are not needed in this mode, so the accounts Secret is not mounted.
    assert "client-accounts" not in volumes(result)


def test_password_check_secret_needs_its_mode():
    render_fails(values_with({"clientAuthServer": {"existingSecret": "directory"}}),
                 "clientAuthServer.existingSecret is set but config.client_auth.mode is not auth_server")


# --- notes and the schema ----------------------------------------------------------------------


def test_notes_tell_where_certificates_and_tokens_live():
    notes = rendered("facing-network").notes
    assert "kubectl -n mail get certificate mg-mailgate-tls" in notes
    holder = rendered("token-holder").notes
    assert "curl -sk https://localhost:9443/readyz" in holder
    assert "https://localhost:9443/accounts" in holder
    assert 'mg-mailgate-tokens, which "helm uninstall"' in holder
    # No auth server in this configuration, so nothing about its password or readiness.
    assert "authentication server" not in holder


@pytest.mark.parametrize(
    ("typo", "where"),
    [
        ({"tls": {"certManger": {"enabled": True}}}, "certManger"),
        ({"tls": {"certManager": {"issuerRef": {"nmae": "le"}}}}, "nmae"),
        ({"oauth2": {"store": {"enable": True}}}, "enable"),
        ({"oauth2": {"providers": {"m365": {"existingSecret": "s", "clientSecret": "k"}}}}, "clientSecret"),
        ({"admin": {"onboarding": {"secret": "x"}}}, "secret"),
        ({"proxyProtocol": {"cidrs": ["10.0.0.0/8"]}}, "cidrs"),
        ({"networkPolicy": {"admin": {"extraFrm": []}}}, "extraFrm"),
    ],
)
def test_typo_in_new_values_fails(typo, where):
    message = render_fails(values_with(typo), "values don't meet the specifications of the schema")
    assert where in message


@pytest.mark.parametrize(
    "bad",
    [
        {"proxyProtocol": {"fromCIDRs": ["10.0.0.1"]}},
        {"oauth2": {"store": {"accessModes": ["ReadOnlyMany"]}}},
        {"oauth2": {"store": {"size": "1 GB"}}},
        {"oauth2": {"providers": {"a/b": {"existingSecret": "s", "clientSecretKey": "k"}}}},
        {"tls": {"certManager": {"privateKey": {"algorithm": "DSA"}}}},
    ],
)
def test_wrong_new_values_fail_the_schema(bad):
    render_fails(values_with(bad), "values don't meet the specifications of the schema")


# --- the chart README's examples ---------------------------------------------------------------


def readme_values(section: str) -> list[dict]:
    """The YAML blocks under one `### section` of helm/mailgate/README.md."""
    import yaml

    from conftest import CHART

    text = (CHART / "README.md").read_text().split(f"### {section}\n", 1)[1].split("\n### ", 1)[0]
    return [yaml.safe_load(block.split("```", 1)[0]) for block in text.split("```yaml\n")[1:]]


def test_readme_examples_render_and_pass_check(mailgate_binary, tmp_path):
    (internet,) = readme_values("Facing the network")
    store, mail_release = readme_values("OAuth2 accounts and the token store")
    (admin,) = readme_values("The admin endpoint: onboarding and the token service")
    # The store and admin examples are two halves of the token holder; the mail release's
    # example is what changes in a mail-facing release such as (f).
    holder = {**store, **{key: value for key, value in admin.items() if key != "config"}}
    holder["config"] = {**store["config"], **admin["config"]}
    mail = values_with(mail_release, "facing-network")
    configs = [render(values).config() for values in (internet, holder, mail)]
    for config in configs:
        checked = mailgate_check(mailgate_binary, config, tmp_path)
        assert checked.returncode == 0, checked.stderr
    internet, holder, mail = configs
    assert [item["tls"]["mode"] for item in tls_listeners(internet)] == ["starttls", "implicit"] * 2
    assert {"onboarding", "token_service", "tls"} <= set(holder["admin"])
    assert holder["tokens"]["oauth2"]["store"]["dir"] == "/var/lib/mailgate/tokens"
    assert mail["tokens"]["auth_server"]["ca_file"].endswith("/ca.crt")

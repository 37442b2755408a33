"""A stand-in Kubernetes API server on 127.0.0.1, just enough for Helm's install action.

helm-sdkpy exposes Helm's install action but not `helm template` (a client-only dry
run). So the tests run a real install against this server: Helm renders the chart
exactly as `helm template` would, checks the values against values.schema.json, reads
the cluster version and API groups from here (they become .Capabilities), looks for
existing objects (none), then creates each object and stores the release record.
The release's manifest, returned by the install, is what `helm template` prints.

It answers discovery (/version, /api, /apis, one resource list per group version),
lists (always empty), GET of a named object (404 unless created here), and
POST/PUT/PATCH/DELETE on a plain in-memory store. No validation happens here: that
is kubernetes-validate's job in the tests.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import yaml

# group/version -> [(plural, kind), ...]; every resource here is namespaced.
RESOURCES = {
    "v1": [
        ("configmaps", "ConfigMap"),
        ("secrets", "Secret"),
        ("services", "Service"),
        ("serviceaccounts", "ServiceAccount"),
        ("pods", "Pod"),
        ("persistentvolumeclaims", "PersistentVolumeClaim"),
    ],
    "apps/v1": [("deployments", "Deployment")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor")],
    "cert-manager.io/v1": [("certificates", "Certificate")],
}

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]


def _resource_list(group_version: str) -> dict:
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": [
            {"name": plural, "singularName": kind.lower(), "namespaced": True, "kind": kind, "verbs": VERBS}
            for plural, kind in RESOURCES[group_version]
        ],
    }


def _group_list() -> dict:
    groups = []
    for group_version in RESOURCES:
        if "/" not in group_version:
            continue
        group, version = group_version.split("/")
        entry = {"groupVersion": group_version, "version": version}
        groups.append({"name": group, "versions": [entry], "preferredVersion": entry})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeKube:
    """One fake cluster; use as a context manager. `kubeconfig` points Helm at it."""

    def __init__(self, kube_version: str, namespace: str):
        major, minor, _patch = kube_version.split(".")
        self.version = {"major": major, "minor": minor, "gitVersion": f"v{kube_version}",
                        "platform": "linux/amd64"}
        self.namespace = namespace
        # (collection path, name) -> object, e.g. ("/apis/apps/v1/namespaces/mail/deployments", "x")
        self.objects: dict[tuple[str, str], dict] = {}
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def kubeconfig(self) -> str:
        """Kubeconfig text (the library takes YAML text as well as a file name)."""
        port = self.server.server_address[1]
        return yaml.safe_dump({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                       "namespace": self.namespace}}],
            "current-context": "fake",
        })

    def __enter__(self) -> FakeKube:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def created(self, kind: str) -> list[dict]:
        """Objects of `kind` that Helm created, in creation order."""
        with self.lock:
            return [o for o in self.objects.values() if o.get("kind") == kind]

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> dict:
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length) or b"{}")

            def _split(self) -> tuple[str, str | None]:
                """(collection path, object name or None) of a resource path."""
                path = urlsplit(self.path).path.rstrip("/")
                parts = path.split("/")
                # /api/v1/namespaces/NS/PLURAL[/NAME] or /apis/G/V/namespaces/NS/PLURAL[/NAME]
                base = 3 if parts[1] == "api" else 4
                if len(parts) == base + 3:
                    return path, None
                if len(parts) == base + 4:
                    return "/".join(parts[:-1]), parts[-1]
                return path, None

            def do_GET(self):
                path = urlsplit(self.path).path.rstrip("/")
                if path == "/version":
                    return self._reply(200, fake.version)
                if path == "/api":
                    return self._reply(200, {"kind": "APIVersions", "versions": ["v1"],
                                             "serverAddressByClientCIDRs": []})
                if path == "/apis":
                    return self._reply(200, _group_list())
                if path == "/api/v1":
                    return self._reply(200, _resource_list("v1"))
                if path.startswith("/apis/") and path.count("/") == 3:
                    group_version = path[len("/apis/"):]
                    if group_version in RESOURCES:
                        return self._reply(200, _resource_list(group_version))
                    return self._reply(404, _status(404, "NotFound", f"{group_version} not served"))
                collection, name = self._split()
                if name is None:
                    # Helm lists its release records here; the fake has none.
                    return self._reply(200, {"kind": "List", "apiVersion": "v1",
                                             "metadata": {"resourceVersion": "1"}, "items": []})
                with fake.lock:
                    obj = fake.objects.get((collection, name))
                if obj is None:
                    return self._reply(404, _status(404, "NotFound", f"{name} not found"))
                return self._reply(200, obj)

            def do_POST(self):
                collection, _ = self._split()
                obj = self._body()
                meta = obj.setdefault("metadata", {})
                meta.setdefault("namespace", fake.namespace)
                meta["uid"] = str(uuid.uuid4())
                meta["resourceVersion"] = "1"
                with fake.lock:
                    key = (collection, meta.get("name", ""))
                    if key in fake.objects:
                        return self._reply(409, _status(409, "AlreadyExists", f"{key[1]} exists"))
                    fake.objects[key] = obj
                return self._reply(201, obj)

            def do_PUT(self):
                collection, name = self._split()
                obj = self._body()
                with fake.lock:
                    fake.objects[(collection, name)] = obj
                return self._reply(200, obj)

            def do_PATCH(self):
                collection, name = self._split()
                self._body()
                with fake.lock:
                    obj = fake.objects.get((collection, name))
                if obj is None:
                    return self._reply(404, _status(404, "NotFound", f"{name} not found"))
                return self._reply(200, obj)

            def do_DELETE(self):
                collection, name = self._split()
                with fake.lock:
                    fake.objects.pop((collection, name), None)
                return self._reply(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        return Handler

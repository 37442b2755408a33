"""Shared helpers for the deployment tests: render the chart with the Helm library,
validate Kubernetes objects, find the repository's files.

Run through scripts/test-deploy.sh, which installs the pinned packages
(requirements.txt) into a virtual environment.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "mailgate"
VALUES_DIR = Path(__file__).resolve().parent / "values"
NAMESPACE = "mail"
RELEASE = "mg"

# The Go library reads the environment once, from the process's start, so these come
# from scripts/test-deploy.sh: HELM_DRIVER=memory keeps Helm's release records in memory
# (the fake API server below does not speak the protobuf Helm stores them with), and
# HELM_{CACHE,CONFIG,DATA}_HOME keep Helm's files out of $HOME.
if os.environ.get("HELM_DRIVER") != "memory":
    pytest.exit("run these tests through scripts/test-deploy.sh (it sets HELM_DRIVER=memory)", returncode=4)

import helm_sdkpy  # noqa: E402  (after the environment above)
import kubernetes_validate  # noqa: E402

from fakekube import FakeKube  # noqa: E402

# The oldest Kubernetes the manifests promise (native sidecars are 1.29+) and the
# newest kubernetes-validate ships schemas for.
OLDEST_KUBERNETES = "1.29"
NEWEST_KUBERNETES = ".".join(kubernetes_validate.latest_version().split(".")[:2])
KUBERNETES_VERSIONS = [OLDEST_KUBERNETES, NEWEST_KUBERNETES]


def duration_seconds(duration: str) -> float:
    """Seconds in a mailgate duration such as "500ms", "20s" or "1m 30s"."""
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+)(ms|s|m|h)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(int(n) * scale[unit] for n, unit in parts)


def load_values(name: str) -> dict:
    """A value set from tests/chart/values/NAME.yaml."""
    return yaml.safe_load((VALUES_DIR / f"{name}.yaml").read_text())


class Rendered:
    """The objects one install rendered, with lookups by kind and name."""

    def __init__(self, release: dict, fake: FakeKube):
        self.release = release
        self.manifest = release["manifest"]
        self.notes = release.get("info", {}).get("notes", "")
        self.objects = [o for o in yaml.safe_load_all(self.manifest) if o]
        self.fake = fake

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict:
        return self.one("Deployment")

    @property
    def pod(self) -> dict:
        return self.deployment["spec"]["template"]

    @property
    def container(self) -> dict:
        containers = self.pod["spec"]["containers"]
        return next(c for c in containers if c["name"] == "mailgate")

    def config(self) -> dict:
        """mailgate's config.yaml as rendered into the ConfigMap or Secret."""
        import base64

        for obj in self.of_kind("ConfigMap"):
            return yaml.safe_load(obj["data"]["config.yaml"])
        for obj in self.of_kind("Secret"):
            return yaml.safe_load(base64.b64decode(obj["data"]["config.yaml"]))
        raise AssertionError("no ConfigMap or Secret with config.yaml")


def render(values: dict | None = None, kube_version: str = NEWEST_KUBERNETES) -> Rendered:
    """`helm template` through the library: an install into a fresh fake cluster.

    Raises helm_sdkpy.InstallError with Helm's message when the values fail the schema
    or a template calls `fail`.
    """
    with FakeKube(f"{kube_version}.0", NAMESPACE) as fake:
        config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=fake.kubeconfig)
        install = helm_sdkpy.Install(config)
        release = asyncio.run(install.run(RELEASE, str(CHART), values=values, wait=False, timeout=60))
        return Rendered(release, fake)


def lint(chart: Path = CHART) -> dict:
    """`helm lint` through the library (default values only: the library takes none)."""
    config = helm_sdkpy.Configuration(namespace=NAMESPACE)
    return asyncio.run(helm_sdkpy.Lint(config).run(str(chart)))


def validate(obj: dict, kube_version: str = NEWEST_KUBERNETES) -> None:
    """Strict schema validation of one object: unknown fields fail.

    kubernetes-validate has the built-in kinds. A ServiceMonitor and a cert-manager
    Certificate are checked against their CRDs (the Prometheus Operator's,
    cert-manager's), through models generated from them: these check types and
    enums but ignore unknown fields, so a round trip that loses a field means the
    field is unknown.
    """
    models = {"monitoring.coreos.com/v1": "prometheus_operator", "cert-manager.io/v1": "cert_manager"}
    if obj["apiVersion"] in models:
        import importlib

        module = importlib.import_module(f"cloudcoil.models.{models[obj['apiVersion']]}.v1")
        model = getattr(module, obj["kind"])
        again = model.model_validate(obj).model_dump(by_alias=True, exclude_unset=True, mode="json")
        assert again == obj, f"{obj['kind']} has fields its CRD does not know:\n{obj}\nvs\n{again}"
        return
    kubernetes_validate.validate(obj, kube_version, strict=True)


@pytest.fixture(scope="session")
def mailgate_binary() -> Path:
    """The mailgate binary, built once per session (`cargo build`, debug, so the
    build `cargo test` already made is reused); MAILGATE_BIN names another."""
    if os.environ.get("MAILGATE_BIN"):
        return Path(os.environ["MAILGATE_BIN"])
    cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
    if not Path(cargo).exists():
        pytest.fail("cargo not found: the chart tests check rendered configs with the mailgate binary "
                    "(install Rust, or set MAILGATE_BIN)")
    subprocess.run([cargo, "build", "--quiet", "--bin", "mailgate"], cwd=REPO, check=True, timeout=1800)
    metadata = subprocess.run([cargo, "metadata", "--format-version", "1", "--no-deps"], cwd=REPO,
                              check=True, capture_output=True, text=True, timeout=120)
    return Path(json.loads(metadata.stdout)["target_directory"]) / "debug" / "mailgate"


def mailgate_check(binary: Path, config: dict, tmp_path: Path,
                   files: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`mailgate check` on a configuration. Without `files`, `--no-files`: the files it
    names are the pod's, not this machine's, so only their presence in the right keys is
    checked. With `files` (the pod's path -> content), each is written below tmp_path and
    the configuration points there, so mailgate reads them as the pod would."""
    args = ["--no-files"]
    if files is not None:
        args = []
        local = {pod: tmp_path / "pod" / pod.lstrip("/") for pod in files}
        for pod, text in files.items():
            local[pod].parent.mkdir(parents=True, exist_ok=True)
            local[pod].write_text(text)

        def moved(value):
            if isinstance(value, dict):
                return {k: moved(v) for k, v in value.items()}
            if isinstance(value, list):
                return [moved(v) for v in value]
            return str(local[value]) if isinstance(value, str) and value in local else value

        config = moved(config)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([str(binary), "check", *args, "--config", str(path)],
                          capture_output=True, text=True, timeout=60)

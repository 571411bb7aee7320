"""Helm and kubeconform for the chart tests, and helpers that render the chart.

Both tools live in ``~/.cache/kvstack/bin/<tool>-v<version>/`` (where ``cluster/build.sh`` puts them
too); when missing they are built with ``go install``, and when Go is missing the tests fail with
a message that says how to get them. Kubernetes' JSON schemas are generated offline from the
OpenAPI spec in the ``k8s.io/kubernetes`` Go module by ``scripts/k8s-schemas.py``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "kvstack"
VALUES_DIR = Path(__file__).resolve().parent / "values"
CACHE = Path(os.environ.get("KVSTACK_CACHE_DIR", Path.home() / ".cache" / "kvstack"))
MONITORING_SCHEMAS = ROOT / "cluster" / "schemas"


def _pinned_versions() -> dict[str, str]:
    """``cluster/versions.env`` (shared with the cluster harness), when it exists."""
    path = ROOT / "cluster" / "versions.env"
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {k.strip(): v.strip() for k, v in pairs if not k.strip().startswith("#")}


_PINS = _pinned_versions()
HELM_VERSION = _PINS.get("HELM_VERSION", "3.19.5")
KUBECONFORM_VERSION = _PINS.get("KUBECONFORM_VERSION", "0.7.0")
K8S_VERSION = _PINS.get("K8S_VERSION", "1.34.10")


# kubeconform over a manifest text: the finished process (stdout holds the summary).
Validate = Callable[[str], subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class GoTool:
    """A command-line tool installed with ``go install`` into a versioned cache folder."""

    name: str
    package: str  # the Go package path of its main
    version: str
    ldflags: str = ""

    @property
    def path(self) -> Path:
        return CACHE / "bin" / f"{self.name}-v{self.version}" / self.name

    def ensure(self) -> Path:
        """The binary, built first if it is not there yet."""
        if self.path.is_file():
            return self.path
        go = shutil.which("go")
        if go is None:
            pytest.fail(
                f"{self.name} v{self.version} is not at {self.path} and Go is not installed to build it; "
                f"run cluster/build.sh, or "
                f"`GOBIN={self.path.parent} go install {self.package}@v{self.version}`",
                pytrace=False,
            )
        self.path.parent.parent.mkdir(parents=True, exist_ok=True)
        # Build into a private folder and rename, so a concurrent reader never sees half a binary.
        with tempfile.TemporaryDirectory(dir=self.path.parent.parent) as tmp:
            cmd = [go, "install", *(["-ldflags", self.ldflags] if self.ldflags else [])]
            cmd.append(f"{self.package}@v{self.version}")
            print(f"building {self.name} v{self.version}: {' '.join(cmd)}", file=sys.stderr)
            proc = subprocess.run(cmd, env={**os.environ, "GOBIN": tmp}, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.fail(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-3000:]}", pytrace=False)
            self.path.parent.mkdir(exist_ok=True)
            if not self.path.is_file():
                (Path(tmp) / self.name).replace(self.path)
        return self.path


_K8S_MINOR = K8S_VERSION.split(".")[1]
HELM = GoTool(
    "helm",
    "helm.sh/helm/v3/cmd/helm",
    HELM_VERSION,
    # Without these `helm template` assumes Kubernetes 1.20 (tests pass --kube-version anyway).
    ldflags=(
        f"-s -w -X helm.sh/helm/v3/internal/version.version=v{HELM_VERSION}"
        " -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
        f" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor={_K8S_MINOR}"
    ),
)
KUBECONFORM = GoTool("kubeconform", "github.com/yannh/kubeconform/cmd/kubeconform", KUBECONFORM_VERSION)


def k8s_schema_dir() -> Path:
    """Strict standalone schemas of Kubernetes ``K8S_VERSION``, generated on first use."""
    out = CACHE / "schemas" / f"v{K8S_VERSION}"
    if (out / "deployment-apps-v1.json").is_file():
        return out
    if shutil.which("go") is None:
        pytest.fail(f"no schemas at {out} and Go is not installed to fetch k8s.io/kubernetes", pytrace=False)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "k8s-schemas.py"),
            *("--kubernetes-version", K8S_VERSION, "--out", str(out)),
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"scripts/k8s-schemas.py failed:\n{proc.stderr[-3000:]}", pytrace=False)
    return out


@dataclass
class Rendered:
    """The objects ``helm template`` produced, with lookups the assertions need."""

    text: str
    objects: list[dict[str, Any]] = field(default_factory=list)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str = "") -> dict[str, Any]:
        """The one object of ``kind`` named ``name``; ``-x`` means the release's ``rel-kvstack-x``."""
        full = f"rel-kvstack{name}" if name.startswith("-") else name
        found = [o for o in self.of_kind(kind) if not name or o["metadata"]["name"] == full]
        assert len(found) == 1, (
            f"expected one {kind} named {full or '*'}, got {[o['metadata']['name'] for o in found]}"
        )
        return found[0]

    def engines(self) -> list[dict[str, Any]]:
        return [
            d
            for d in self.of_kind("Deployment")
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "engine"
        ]


def pod_specs(obj: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The pod spec of a workload (Deployment, StatefulSet, ...), if it has one."""
    template = obj.get("spec", {}).get("template")
    if isinstance(template, dict) and "spec" in template:
        yield template["spec"]


def containers(obj: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    for spec in pod_specs(obj):
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


@dataclass(frozen=True)
class HelmChart:
    """Runs helm against the chart at ``path``."""

    helm: Path
    path: Path = CHART

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.helm), *args], capture_output=True, text=True, timeout=120)

    def template_args(
        self, values: Sequence[Path] = (), set_values: Sequence[str] = (), release: str = "rel"
    ) -> list[str]:
        args = ["template", release, str(self.path), "--namespace", "kvstack", "--kube-version", K8S_VERSION]
        for file in values:
            args += ["-f", str(file)]
        for item in set_values:
            args += ["--set", item]
        return args

    def template(
        self, values: Sequence[Path] = (), set_values: Sequence[str] = (), release: str = "rel"
    ) -> Rendered:
        proc = self.run(*self.template_args(values, set_values, release))
        assert proc.returncode == 0, f"helm template failed:\n{proc.stderr}"
        objects = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        return Rendered(proc.stdout, objects)

    def template_error(self, values: Sequence[Path] = (), set_values: Sequence[str] = ()) -> str:
        """The error of a ``helm template`` that must fail."""
        proc = self.run(*self.template_args(values, set_values))
        assert proc.returncode != 0, "helm template accepted values it should reject"
        return proc.stderr


# `helm template` prints no notes: a probe template renders NOTES.txt into a ConfigMap instead.
NOTES_PROBE = """apiVersion: v1
kind: ConfigMap
metadata:
  name: notes-probe
data:
  notes: {{ tpl (.Files.Get "files/NOTES.txt") . | quote }}
"""


def render_notes(chart_copy: HelmChart, *set_values: str) -> str:
    """NOTES.txt as ``helm install`` would print it with ``set_values``, through the probe template
    (written into the chart: ``chart_copy`` must be a copy of it)."""
    assert chart_copy.path != CHART, "render_notes writes into the chart: give it a copy"
    probe = chart_copy.path / "templates" / "notes-probe.yaml"
    if not probe.exists():
        shutil.copy(chart_copy.path / "templates" / "NOTES.txt", chart_copy.path / "files" / "NOTES.txt")
        probe.write_text(NOTES_PROBE)
    rendered = chart_copy.template(set_values=list(set_values))
    return str(rendered.one("ConfigMap", "notes-probe")["data"]["notes"])


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    return HELM.ensure()


@pytest.fixture(scope="session")
def chart(helm_bin: Path) -> HelmChart:
    return HelmChart(helm_bin)


@pytest.fixture(scope="session")
def kubeconform(tmp_path_factory: pytest.TempPathFactory) -> Validate:
    """``validate(manifests_text) -> CompletedProcess`` with kubeconform -strict, fully offline."""
    binary = KUBECONFORM.ensure()
    k8s = k8s_schema_dir()
    work = tmp_path_factory.mktemp("kubeconform")

    layout = "/{{ .ResourceKind }}{{ .KindSuffix }}.json"

    def validate(text: str) -> subprocess.CompletedProcess[str]:
        fd, name = tempfile.mkstemp(suffix=".yaml", dir=work)
        with os.fdopen(fd, "w") as manifest:
            manifest.write(text)
        return subprocess.run(
            [
                *(str(binary), "-strict", "-summary", "-output", "text"),
                *("-kubernetes-version", K8S_VERSION),
                *("-schema-location", str(k8s) + layout),
                *("-schema-location", str(MONITORING_SCHEMAS) + layout),
                name,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )

    return validate


def values_files() -> list[Path]:
    return sorted(VALUES_DIR.glob("*.yaml"))


def load_values(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}

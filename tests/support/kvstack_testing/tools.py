"""Where the test control plane's binaries live, and building them (``cluster/build.sh``) when absent."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

# src/kvstack/testing/tools.py -> the repository root (the package is installed in editable mode).
REPO_ROOT = Path(__file__).resolve().parents[3]  # tests/support/kvstack_testing/tools.py
CLUSTER_DIR = REPO_ROOT / "cluster"


def cache_root() -> Path:
    """``$KVSTACK_CACHE`` or ``~/.cache/kvstack``: binaries under ``bin/``, build logs under ``logs/``."""
    return Path(os.environ.get("KVSTACK_CACHE") or Path.home() / ".cache" / "kvstack")


def parse_versions(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``cluster/versions.env`` (comments and blank lines skipped)."""
    versions = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            versions[key.strip()] = value.strip().strip("\"'")
    return versions


@dataclass(frozen=True, slots=True)
class Toolchain:
    """Paths of every binary, keyed by the versions pinned in ``cluster/versions.env``."""

    bin_root: Path
    kubernetes: str
    etcd_version: str
    helm_version: str
    kwok_version: str
    kubeconform_version: str
    prometheus_version: str
    otelcol_version: str

    @classmethod
    def load(
        cls, versions_file: Path = CLUSTER_DIR / "versions.env", bin_root: Path | None = None
    ) -> Toolchain:
        v = parse_versions(versions_file.read_text())
        return cls(
            bin_root=bin_root or cache_root() / "bin",
            kubernetes=v["K8S_VERSION"],
            etcd_version=v["ETCD_VERSION"],
            helm_version=v["HELM_VERSION"],
            kwok_version=v["KWOK_VERSION"],
            kubeconform_version=v["KUBECONFORM_VERSION"],
            prometheus_version=v["PROMETHEUS_VERSION"],
            otelcol_version=v["OTELCOL_VERSION"],
        )

    def _path(self, tool: str, version: str, binary: str) -> Path:
        return self.bin_root / f"{tool}-v{version}" / binary

    @property
    def kube_bin_dir(self) -> Path:
        return self.bin_root / f"kubernetes-v{self.kubernetes}"

    @property
    def kube_apiserver(self) -> Path:
        return self.kube_bin_dir / "kube-apiserver"

    @property
    def kube_controller_manager(self) -> Path:
        return self.kube_bin_dir / "kube-controller-manager"

    @property
    def kube_scheduler(self) -> Path:
        return self.kube_bin_dir / "kube-scheduler"

    @property
    def kubectl(self) -> Path:
        return self.kube_bin_dir / "kubectl"

    @property
    def etcd(self) -> Path:
        return self._path("etcd", self.etcd_version, "etcd")

    @property
    def kwok(self) -> Path:
        return self._path("kwok", self.kwok_version, "kwok")

    @property
    def kwokctl(self) -> Path:
        return self._path("kwok", self.kwok_version, "kwokctl")

    @property
    def helm(self) -> Path:
        return self._path("helm", self.helm_version, "helm")

    @property
    def kubeconform(self) -> Path:
        return self._path("kubeconform", self.kubeconform_version, "kubeconform")

    @property
    def prometheus(self) -> Path:
        """Prometheus with Kubernetes service discovery (Debian's package has none)."""
        return self._path("prometheus", self.prometheus_version, "prometheus")

    @property
    def otelcol(self) -> Path:
        """The OpenTelemetry Collector of the tracing tests (cluster/otelcol/manifest.yaml)."""
        return self._path("otelcol", self.otelcol_version, "otelcol")

    def cluster_binaries(self) -> list[Path]:
        """What a running cluster and the tests around it need."""
        return [
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.kubectl,
            self.etcd,
            self.kwok,
            self.kwokctl,
            self.prometheus,
        ]

    def missing(self, paths: Sequence[Path] | None = None) -> list[Path]:
        return [p for p in (self.cluster_binaries() if paths is None else paths) if not os.access(p, os.X_OK)]


def build_tools(steps: Sequence[str] = ("all",), *, echo: Callable[[str], None] | None = None) -> Toolchain:
    """Run ``cluster/build.sh`` for ``steps`` (idempotent), echoing its one-line-per-step progress."""
    show = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    proc = subprocess.Popen(
        ["bash", str(CLUSTER_DIR / "build.sh"), *steps],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        show(line.rstrip())
    if proc.wait() != 0:
        raise RuntimeError(f"cluster/build.sh {' '.join(steps)} failed (exit {proc.returncode}); see above")
    return Toolchain.load()


def ensure_cluster_tools(*, echo: Callable[[str], None] | None = None) -> Toolchain:
    """The toolchain, building whatever the cluster needs that is not cached yet."""
    tools = Toolchain.load()
    if tools.missing():
        tools = build_tools(("etcd", "kwok", "k8s", "prometheus"), echo=echo)
    return tools


def ensure_otelcol(*, echo: Callable[[str], None] | None = None) -> Toolchain:
    """The toolchain, building the OpenTelemetry Collector first if it is not cached yet."""
    tools = Toolchain.load()
    if tools.missing([tools.otelcol]):
        tools = build_tools(("otelcol",), echo=echo)
    return tools

"""A local Prometheus for kvstack: scrape-config rendering, the process, and a small HTTP API client.

Used by ``kvstack up --prometheus`` and by the tests that check every dashboard query and rule
against live series. Job names and the ``pod``/``namespace`` labels match what a PodMonitor and a
ServiceMonitor give the same series on Kubernetes, so the rules work unchanged in both places.
:func:`pod_sd_job` renders such a job with Kubernetes pod discovery, as the Prometheus Operator
renders a PodMonitor, for a Prometheus that runs outside the Operator (and for the cluster tests).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import yaml

from kvstack.common.procs import ManagedProcess

Job = Literal["kvstack-engine", "kvstack-router", "kvstack-redis", "kvstack-operator"]
LOCAL_NAMESPACE = "local"
PROMETHEUS_BINARY = "prometheus"


def packaged_rules_file() -> Path:
    """The generated rules file shipped inside the ``kvstack.dashboards`` package."""
    import kvstack.dashboards

    return Path(kvstack.dashboards.__file__).resolve().parent / "rules" / "kvstack.rules.yaml"


@dataclass(frozen=True, slots=True)
class Target:
    """One scrape target: ``url`` is the component's base URL (``/metrics`` is appended)."""

    job: Job
    url: str
    pod: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        parts = urlsplit(self.url)
        if not parts.hostname or not parts.port:
            raise ValueError(f"target URL needs a host and a port: {self.url!r}")
        return f"{parts.hostname}:{parts.port}"


# Pod discovery labels (Prometheus turns every character outside [a-zA-Z0-9_] into "_").
_META = "__meta_kubernetes_pod_"
COMPONENT_LABEL = "app.kubernetes.io/component"
MODEL_LABEL = "kvstack.dev/model"
PORT_ANNOTATION = "kvstack.dev/port"
# The target label the alert rules select components by (dashboards/rules.py), never the job name.
COMPONENT_TARGET_LABEL = "kvstack_component"


def _component(job: Job) -> str:
    return job.removeprefix("kvstack-")


def _meta_name(kind: Literal["label", "annotation"], key: str) -> str:
    return _META + kind + "_" + "".join(c if c.isalnum() else "_" for c in key)


@dataclass(frozen=True, slots=True)
class KubeAccess:
    """How Prometheus reaches the API server.

    All fields None: in-cluster (the pod's service-account token and CA). Else either a
    ``kubeconfig`` file, or ``api_server`` with a CA file and a bearer-token file or a client
    certificate and key: credentials are always files, so a rotated token is re-read.
    """

    kubeconfig: Path | None = None
    api_server: str | None = None
    ca_file: Path | None = None
    bearer_token_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.kubeconfig is not None and self.api_server is not None:
            raise ValueError("give a kubeconfig or an api_server, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")
        if self.api_server is None and any(
            f is not None for f in (self.ca_file, self.bearer_token_file, self.cert_file)
        ):
            raise ValueError("credential files need an api_server")

    def sd_fields(self) -> dict[str, Any]:
        """The connection keys of one ``kubernetes_sd_configs`` entry."""
        if self.kubeconfig is not None:
            return {"kubeconfig_file": str(self.kubeconfig)}
        if self.api_server is None:
            return {}
        fields: dict[str, Any] = {"api_server": self.api_server}
        if self.bearer_token_file is not None:
            fields["authorization"] = {"type": "Bearer", "credentials_file": str(self.bearer_token_file)}
        tls = {
            key: str(path)
            for key, path in (
                ("ca_file", self.ca_file),
                ("cert_file", self.cert_file),
                ("key_file", self.key_file),
            )
            if path is not None
        }
        if tls:
            fields["tls_config"] = tls
        return fields


@dataclass(frozen=True, slots=True)
class PodJob:
    """Scrape the pods of one kvstack component as the chart's PodMonitor does."""

    job: Job
    component: str  # value of the pods' app.kubernetes.io/component label
    namespaces: tuple[str, ...] = ()  # empty: every namespace Prometheus may list pods in
    port_name: str = "http"  # the container port to scrape, by name
    honor_labels: bool = False


def pod_sd_job(pod_job: PodJob, access: KubeAccess) -> dict[str, Any]:
    """One scrape config with Kubernetes pod discovery.

    Pods are selected by component label on the API server; one target per pod, on the container
    port named ``port_name`` (the ``kvstack.dev/port`` annotation, as the router's discovery reads it,
    overrides the port). Pods that finished are dropped. Targets get ``namespace`` and ``pod``, and
    engines ``kvstack_model``, and ``kvstack_component``, as under the Prometheus Operator.
    """
    sd: dict[str, Any] = {
        "role": "pod",
        **access.sd_fields(),
        "selectors": [{"role": "pod", "label": f"{COMPONENT_LABEL}={pod_job.component}"}],
    }
    if pod_job.namespaces:
        sd["namespaces"] = {"names": list(pod_job.namespaces)}
    relabel: list[dict[str, Any]] = [
        {"source_labels": [_META + "container_port_name"], "regex": pod_job.port_name, "action": "keep"},
        {"source_labels": [_META + "phase"], "regex": "Succeeded|Failed", "action": "drop"},
        {
            "source_labels": [_META + "ip", _meta_name("annotation", PORT_ANNOTATION)],
            "regex": r"([^:]+);(\d+)",  # an IPv4 pod IP and a port number; otherwise keep the port's address
            "replacement": "$1:$2",
            "target_label": "__address__",
        },
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": [_META + "name"], "target_label": "pod"},
        {"source_labels": [_meta_name("label", COMPONENT_LABEL)], "target_label": COMPONENT_TARGET_LABEL},
    ]
    if pod_job.component == "engine":
        relabel.append({"source_labels": [_meta_name("label", MODEL_LABEL)], "target_label": "kvstack_model"})
    cfg: dict[str, Any] = {
        "job_name": pod_job.job,
        "metrics_path": "/metrics",
        "kubernetes_sd_configs": [sd],
        "relabel_configs": relabel,
    }
    if pod_job.honor_labels:
        cfg["honor_labels"] = True
    return cfg


def render_config(
    targets: Sequence[Target],
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "5s",
    evaluation_interval: str | None = None,
    namespace: str = LOCAL_NAMESPACE,
    file_sd: Mapping[Job, Path] | None = None,
    pod_jobs: Sequence[PodJob] = (),
    kube: KubeAccess | None = None,
) -> dict[str, Any]:
    """prometheus.yml as a mapping: one job per component kind, one static group per target.

    ``file_sd`` adds jobs whose targets come from a file (re-read every second), for targets that come
    and go where no Kubernetes service discovery is at hand. ``pod_jobs`` add jobs that discover pods
    through the API server that ``kube`` reaches (default: in-cluster).
    """
    jobs: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        # kvstack_component: the label the alert rules select by, as the chart's monitors set it.
        labels = {"pod": t.pod, "namespace": namespace, COMPONENT_TARGET_LABEL: _component(t.job), **t.labels}
        jobs.setdefault(t.job, []).append({"targets": [t.address], "labels": labels})
    scrape_configs: list[dict[str, Any]] = []
    for job, groups in sorted(jobs.items()):
        cfg: dict[str, Any] = {"job_name": job, "metrics_path": "/metrics", "static_configs": groups}
        if job == "kvstack-operator":
            # Operator series carry the namespace of the model they describe (CONTRACT.md).
            cfg["honor_labels"] = True
        scrape_configs.append(cfg)
    for job, path in sorted((file_sd or {}).items()):
        scrape_configs.append(
            {"job_name": job, "file_sd_configs": [{"files": [str(path)], "refresh_interval": "1s"}]}
        )
    scrape_configs += [pod_sd_job(j, kube or KubeAccess()) for j in pod_jobs]
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval or scrape_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": scrape_configs,
    }


_READY_PATH = "/-/ready"


def prometheus_process(
    workdir: Path,
    targets: Sequence[Target],
    port: int,
    rule_files: Sequence[Path] | None = None,
    scrape_interval: str = "5s",
    host: str = "127.0.0.1",
    binary: str = PROMETHEUS_BINARY,
    name: str = "prometheus",
    file_sd: Mapping[Job, Path] | None = None,
    pod_jobs: Sequence[PodJob] = (),
    kube: KubeAccess | None = None,
) -> ManagedProcess:
    """Write ``workdir/prometheus.yml`` and return the (unstarted) Prometheus process scraping ``targets``.

    ``rule_files`` defaults to kvstack's generated rules; ``pod_jobs`` need a ``binary`` built with
    Kubernetes service discovery (Debian's has none). Pass the result to
    :func:`kvstack.common.procs.running`, which waits for ``/-/ready`` and always stops it.
    """
    rules = [packaged_rules_file()] if rule_files is None else list(rule_files)
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            render_config(targets, rules, scrape_interval, file_sd=file_sd, pod_jobs=pod_jobs, kube=kube),
            sort_keys=False,
        )
    )
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        "--storage.tsdb.retention.time=1d",
        f"--web.listen-address={host}:{port}",
        "--log.level=warn",
    ]
    return ManagedProcess(name, argv, workdir, ready_url=f"http://{host}:{port}{_READY_PATH}")


class PrometheusError(RuntimeError):
    """Prometheus answered with an error (bad query, unreachable)."""


class PrometheusAPI:
    """The few calls of the HTTP API the tests and the preview need."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def _get(self, path: str, params: dict[str, str]) -> Any:
        try:
            resp = httpx.get(f"{self.base_url}{path}", params=params, timeout=self.timeout)
        except httpx.HTTPError as err:
            raise PrometheusError(f"cannot reach Prometheus at {self.base_url}: {err}") from err
        try:
            body = resp.json()
        except ValueError as err:
            raise PrometheusError(f"{path}: HTTP {resp.status_code}, not JSON") from err
        if body.get("status") != "success":
            raise PrometheusError(
                f"{params.get('query', path)}: {body.get('errorType')}: {body.get('error')}"
            )
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant vector (or scalar, as one sample) of ``expr`` now."""
        data = self._get("/api/v1/query", {"query": expr})
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        data = self._get(
            "/api/v1/query_range", {"query": expr, "start": str(start), "end": str(end), "step": str(step)}
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> dict[str, float]:
        """``job/pod`` -> value of ``up``."""
        return {
            f"{s['metric'].get('job')}/{s['metric'].get('pod')}": float(s["value"][1])
            for s in self.query("up")
        }

    def wait_for(self, expr: str, timeout: float = 60.0, interval: float = 0.5) -> list[dict[str, Any]]:
        """Poll until ``expr`` returns data; raise with the last answer after ``timeout``."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = self.query(expr)
            if last:
                return last
            time.sleep(interval)
        raise PrometheusError(f"no data for {expr} after {timeout:.0f}s")


def prometheus_url(proc: ManagedProcess) -> str:
    """The HTTP API base of a process from :func:`prometheus_process` (its ready URL, less the path)."""
    return (proc.ready_url or "").removesuffix(_READY_PATH)

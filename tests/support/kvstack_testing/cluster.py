"""A real Kubernetes control plane on loopback, for tests and ``make cluster``.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler (1.34, built by ``cluster/build.sh``)
run as local processes wired by ``kwokctl --runtime binary``; the kwok controller plays the kubelet
for fake GPU nodes, and gives pods IPs inside 127.0.0.0/8 so that a process bound to a pod's IP
(see :mod:`kvstack_testing.pod_sims`) is reachable exactly where clients look for that pod.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvstack.common.config import build
from kvstack.common.kube import Credentials, load_credentials, resource_path
from kvstack.common.kube.blocking import BlockingKube
from kvstack.common.waits import wait_until
from kvstack_testing.manifests import gpu_nodes, kwokctl_configuration
from kvstack_testing.tools import Toolchain, ensure_cluster_tools
from kvstack_testing.workdirs import (
    OWNER_FILE,
    POD_CIDR_FILE,
    WORKDIR_PREFIX,
    choose_pod_cidr,
    end_processes,
    free_ports,
    kill_recorded_processes,
    pid_alive,
    pod_cidrs_in_use,
    reap_stale_clusters,
    recorded_pids,
)

__all__ = [  # the bookkeeping helpers are re-exported: tests import them from here
    "OWNER_FILE",
    "WORKDIR_PREFIX",
    "Cluster",
    "ClusterConfig",
    "choose_pod_cidr",
    "kill_recorded_processes",
    "pid_alive",
    "reap_stale_clusters",
]


class ClusterConfig(BaseSettings):
    """Shape of the test cluster; ``KVSTACK_CLUSTER_*`` environment variables override defaults."""

    model_config = SettingsConfigDict(env_prefix="KVSTACK_CLUSTER_", extra="forbid")

    name: str = Field("kvstack", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=40)
    gpu_nodes: int = Field(2, ge=0, le=200)
    gpus_per_node: int = Field(8, ge=0, le=64)
    # Linux routes all of 127.0.0.0/8 to lo: every pod IP is then a local address. None: a free
    # 127.X.0.0/16 not used by another cluster on this machine, so their pods' addresses never clash.
    pod_cidr: str | None = None
    workdir: Path | None = None  # default: a fresh directory under the system temp dir
    start_timeout_s: float = Field(180.0, gt=0)

    @field_validator("pod_cidr")
    @classmethod
    def _loopback_cidr(cls, value: str | None) -> str | None:
        if value is None:
            return None
        network = ipaddress.ip_network(value)
        if not (
            isinstance(network, ipaddress.IPv4Network)
            and network.subnet_of(ipaddress.IPv4Network("127.0.0.0/8"))
        ):
            raise ValueError("must lie inside 127.0.0.0/8 so pod IPs are loopback addresses")
        if network.prefixlen > 16:
            raise ValueError("must be /16 or wider: each node takes a /24 and kwok's fallback the 256th")
        return str(network)


PORT_OPTIONS = (
    "etcdPort",
    "etcdPeerPort",
    "kubeApiserverPort",
    "kubeControllerManagerPort",
    "kubeSchedulerPort",
    "kwokControllerPort",
)


class Cluster:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok, with fake GPU nodes.

    ``start()`` blocks until the API answers and every fake node is Ready; ``stop()`` kills every
    process and removes the working directory. Both are idempotent; the object is a context manager.
    """

    def __init__(self, config: ClusterConfig | None = None, tools: Toolchain | None = None) -> None:
        self.config = config or build(ClusterConfig, "cluster config")
        self._tools = tools
        self.workdir: Path | None = None
        self._owns_workdir = False
        self._kube: BlockingKube | None = None
        self.started = False

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> Cluster:
        if self.started:
            return self
        reap_stale_clusters()
        self._tools = self._tools or ensure_cluster_tools()
        if self.config.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
            self._owns_workdir = True
        else:
            self.workdir = self.config.workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        if self.config.pod_cidr is None:  # resolved once, so config.pod_cidr is set while running
            self.config = self.config.model_copy(update={"pod_cidr": choose_pod_cidr(pod_cidrs_in_use())})
        (self.workdir / POD_CIDR_FILE).write_text(self.pod_cidr)
        (self.workdir / OWNER_FILE).write_text(str(os.getpid()))
        self.started = True
        atexit.register(self.stop)  # the components run in their own sessions: never leave them behind
        try:
            self._create()
            self._add_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        atexit.unregister(self.stop)
        if not self.started or self.workdir is None:
            return
        if self._kube is not None:
            with contextlib.suppress(Exception):
                self._kube.close()
            self._kube = None
        pids = recorded_pids(self.workdir)  # kwokctl deletes the pid files, maybe before the exits
        with contextlib.suppress(subprocess.SubprocessError, OSError, RuntimeError):
            self._kwokctl(
                "delete", "cluster", "--name", self.config.name, "--kubeconfig", str(self.kubeconfig)
            )
        end_processes(pids)
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            (self.workdir / OWNER_FILE).unlink(missing_ok=True)
        self.started = False

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- what users of the cluster need ----------------------------------------------------------
    @property
    def tools(self) -> Toolchain:
        if self._tools is None:
            raise RuntimeError("the cluster has not been started")
        return self._tools

    @property
    def pod_cidr(self) -> str:
        """The loopback /16 this cluster's pod IPs come from (chosen at start unless configured)."""
        if self.config.pod_cidr is None:
            raise RuntimeError("the cluster has not been started")
        return self.config.pod_cidr

    @property
    def kubeconfig(self) -> Path:
        """An admin kubeconfig for this cluster only (never ``~/.kube/config``)."""
        if self.workdir is None:
            raise RuntimeError("the cluster has not been started")
        return self.workdir / "kubeconfig.yaml"

    @property
    def context(self) -> str:
        return f"kwok-{self.config.name}"

    @property
    def server(self) -> str:
        """The API server's URL (https on 127.0.0.1)."""
        doc = yaml.safe_load(self.kubeconfig.read_text())
        return str(next(c["cluster"]["server"] for c in doc["clusters"] if c["name"] == self.context))

    def credentials(self) -> Credentials:
        """The admin credentials of this cluster (from its own kubeconfig), for a :class:`KubeClient`."""
        return load_credentials(self.kubeconfig, self.context)

    def kube(self) -> BlockingKube:
        """A blocking client for this cluster (shared; closed by ``stop()``)."""
        if self._kube is None:
            self._kube = BlockingKube(self.credentials())
        return self._kube

    @contextlib.contextmanager
    def temporary_namespace(self, prefix: str) -> Iterator[str]:
        """A fresh namespace ``prefix`` + 8 hex digits, deleted (with everything in it) afterwards."""
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        kube = self.kube()
        kube.create(resource_path("v1", "namespaces"), {"metadata": {"name": name}})
        try:
            # the controller-manager adds the default ServiceAccount a moment later; a pod created
            # before it is refused (403), so the namespace is handed out only once it is there
            default = resource_path("v1", "serviceaccounts", name, "default")
            wait_until(lambda: kube.get(default), f"the default ServiceAccount of {name}", 30, 0.05)
            yield name
        finally:
            kube.delete(resource_path("v1", "namespaces", name=name))

    def server_version(self) -> str:
        """``gitVersion`` the API server reports, e.g. ``v1.34.10``."""
        version = self.kube().get("/version")
        assert version is not None
        return str(version["gitVersion"])

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run the matching kubectl against this cluster."""
        return subprocess.run(
            [str(self.tools.kubectl), "--kubeconfig", str(self.kubeconfig), "--context", self.context, *args],
            check=check,
            capture_output=True,
            text=True,
            input=input,
            timeout=120,
        )

    def env(self) -> dict[str, str]:
        """Environment for child processes (helm, kubectl, an operator) to target this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": self._path()}

    # ---- internals -------------------------------------------------------------------------------
    def _path(self) -> str:
        dirs = [self.tools.kube_bin_dir, self.tools.helm.parent, self.tools.kwokctl.parent]
        return os.pathsep.join([*(str(d) for d in dirs), os.environ.get("PATH", "")])

    def _kwokctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        assert self.workdir is not None
        env = {**os.environ, "KWOK_WORKDIR": str(self.workdir), "PATH": self._path()}
        proc = subprocess.run(
            [str(self.tools.kwokctl), *args], env=env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"kwokctl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def _config_file(self) -> Path:
        assert self.workdir is not None
        t = self.tools
        binaries = {
            "kubeApiserverBinary": str(t.kube_apiserver),
            "kubeControllerManagerBinary": str(t.kube_controller_manager),
            "kubeSchedulerBinary": str(t.kube_scheduler),
            "kubectlBinary": str(t.kubectl),
            "kwokControllerBinary": str(t.kwok),
            "etcdBinary": str(t.etcd),
        }
        doc = kwokctl_configuration(
            kube_version=t.kubernetes,
            etcd_version=t.etcd_version,
            binaries=binaries,
            pod_cidr=self.pod_cidr,
        )
        doc["options"].update(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)), strict=True))
        path = self.workdir / "kwokctl.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    def _create(self) -> None:
        timeout = self.config.start_timeout_s
        self._kwokctl(
            "create", "cluster",
            "--name", self.config.name,
            "--config", str(self._config_file()),
            "--kubeconfig", str(self.kubeconfig),
            "--wait", f"{int(timeout)}s",
            timeout=timeout + 30,
        )  # fmt: skip

    def _add_nodes(self) -> None:
        kube = self.kube()
        names = []
        for node in gpu_nodes(self.config.gpu_nodes, self.config.gpus_per_node, self.pod_cidr):
            kube.create(resource_path("v1", "nodes"), node)
            names.append(node["metadata"]["name"])

        def ready() -> bool:
            return all(_node_ready(kube.get(resource_path("v1", "nodes", name=name))) for name in names)

        try:
            wait_until(ready, f"fake nodes {names} Ready", self.config.start_timeout_s, 0.2)
        except AssertionError as exc:
            raise TimeoutError(str(exc)) from None


def _node_ready(node: dict[str, Any] | None) -> bool:
    conditions = ((node or {}).get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

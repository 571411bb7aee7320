"""The real control plane: version, fake GPU nodes, scheduling by GPU, loopback pod IPs, simulators."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvstack.common.kube import resource_path
from kvstack.common.waits import wait_until
from kvstack_testing import Cluster, ClusterConfig, PodSimulators, SimTarget
from kvstack_testing.cluster import pid_alive

pytestmark = pytest.mark.cluster

ENGINE_LABELS = {"app.kubernetes.io/name": "kvstack", "app.kubernetes.io/component": "engine"}


def gpu_deployment(name: str, replicas: int, model: str, gpus: int = 1) -> dict[str, Any]:
    """An engine-shaped Deployment: one container asking for ``gpus`` GPUs, model in its args."""
    labels = {**ENGINE_LABELS, "app.kubernetes.io/instance": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "engine",
                            "image": "vllm/vllm-openai:v0.24.0",
                            "args": ["--model", model],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                        }
                    ]
                },
            },
        },
    }


def pods(cluster: Cluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return cluster.kube().list(resource_path("v1", "pods", namespace), label_selector=selector).items


def running(cluster: Cluster, namespace: str, selector: str, count: int) -> list[dict[str, Any]]:
    found = [
        p
        for p in pods(cluster, namespace, selector)
        if p["status"].get("phase") == "Running" and p["status"].get("podIP")
    ]
    return found if len(found) == count else []


def create_deployment(cluster: Cluster, namespace: str, body: dict[str, Any]) -> None:
    cluster.kube().create(resource_path("apps/v1", "deployments", namespace), body)


def is_true(obj: dict[str, Any], condition: str) -> bool:
    return any(
        c["type"] == condition and c["status"] == "True" for c in obj["status"].get("conditions") or []
    )


def http_get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(resp.status), resp.read()


def test_api_server_reports_pinned_version(cluster: Cluster) -> None:
    expected = f"v{cluster.tools.kubernetes}"
    assert cluster.server_version() == expected
    binary = subprocess.run(
        [cluster.tools.kube_apiserver, "--version"], capture_output=True, text=True, check=True
    )
    assert binary.stdout.strip() == f"Kubernetes {expected}"
    client_version = json.loads(cluster.kubectl("version", "-o", "json").stdout)
    assert client_version["clientVersion"]["gitVersion"] == expected
    assert client_version["serverVersion"]["gitVersion"] == expected


def listening_addresses(pid: int) -> set[str]:
    """IPv4/IPv6 addresses that process ``pid`` has listening TCP sockets on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = str(fd.readlink())
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A = LISTEN
                raw = bytes.fromhex(fields[1].split(":")[0])
                # /proc prints each 32-bit word in host (little-endian) order
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, size, 4))
                found.add(str(ipaddress.ip_address(words)))
    return found


def test_every_component_listens_on_loopback_only(cluster: Cluster) -> None:
    assert cluster.server.startswith("https://127.0.0.1:")
    assert cluster.workdir is not None
    pid_files = sorted(cluster.workdir.glob("clusters/*/pids/*.pid"))
    assert {p.stem for p in pid_files} >= {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    }
    for pid_file in pid_files:
        addresses = listening_addresses(int(pid_file.read_text()))
        assert addresses, f"{pid_file.stem} listens nowhere"
        assert all(ipaddress.ip_address(a).is_loopback for a in addresses), (pid_file.stem, addresses)


def test_fake_gpu_nodes_are_ready_with_gpus(cluster: Cluster) -> None:
    nodes = cluster.kube().list(resource_path("v1", "nodes")).items
    assert sorted(n["metadata"]["name"] for n in nodes) == ["gpu-node-0", "gpu-node-1"]
    for node in nodes:
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert is_true(node, "Ready")
        assert ipaddress.ip_network(node["spec"]["podCIDR"]).subnet_of(ipaddress.ip_network(cluster.pod_cidr))


def test_gpu_deployment_gets_running_pods_on_loopback_ips(cluster: Cluster, namespace: str) -> None:
    create_deployment(cluster, namespace, gpu_deployment("engine", 2, "m"))
    found = wait_until(lambda: running(cluster, namespace, "app.kubernetes.io/instance=engine", 2), "2 pods")
    for pod in found:
        ip = ipaddress.ip_address(pod["status"]["podIP"])
        assert ip in ipaddress.ip_network(cluster.pod_cidr)
        assert ip.is_loopback
        assert pod["spec"]["nodeName"] in {"gpu-node-0", "gpu-node-1"}
        assert is_true(pod, "Ready")  # routers need it
        with socket.socket() as s:  # the pod IP is a local address: a process can serve on it
            s.bind((str(ip), 0))


def test_scheduler_honours_gpu_capacity(cluster: Cluster, namespace: str) -> None:
    # 2 nodes x 8 GPUs: three pods of 4 GPUs fit, the fifth and sixth cannot be placed.
    create_deployment(cluster, namespace, gpu_deployment("big", 6, "m", gpus=4))
    selector = "app.kubernetes.io/instance=big"
    wait_until(lambda: running(cluster, namespace, selector, 4), "4 running pods")

    def unschedulable() -> list[dict[str, Any]]:
        pending = [p for p in pods(cluster, namespace, selector) if p["status"].get("phase") == "Pending"]
        return [
            p
            for p in pending
            if any(
                c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                for c in p["status"].get("conditions") or []
            )
        ]

    stuck = wait_until(lambda: len(unschedulable()) == 2 and unschedulable(), "2 unschedulable pods")
    message = stuck[0]["status"]["conditions"][0]["message"]
    assert "nvidia.com/gpu" in message


def test_pod_simulators_follow_pods(cluster: Cluster, namespace: str) -> None:
    model = "Qwen/Qwen3-0.6B"
    with PodSimulators(
        cluster.credentials(), "app.kubernetes.io/component=engine", namespace=namespace
    ) as sims:
        create_deployment(cluster, namespace, gpu_deployment("sim", 2, model))
        targets = sims.wait_for(2, timeout=90)
        ips = {p["status"]["podIP"] for p in running(cluster, namespace, "app.kubernetes.io/instance=sim", 2)}
        assert {t.host for t in targets} == ips
        for target in targets:
            assert http_get(f"{target.url}/health")[0] == 200
            status, body = http_get(f"{target.url}/v1/models")
            assert status == 200
            assert [m["id"] for m in json.loads(body)["data"]] == [model]

        # A simulator that dies is restarted on the same address, as the kubelet restarts a container.
        victim = targets[0]
        old_pid = sims.pids[victim.uid]
        os.killpg(old_pid, signal.SIGKILL)
        wait_until(lambda: sims.pids.get(victim.uid, old_pid) != old_pid, "a restarted simulator")
        sims.wait_for(2, timeout=30)
        assert http_get(f"{victim.url}/health")[0] == 200

        cluster.kube().scale(resource_path("apps/v1", "deployments", namespace, "sim"), 3)
        assert len(sims.wait_for(3, timeout=90)) == 3

        cluster.kube().delete(resource_path("apps/v1", "deployments", namespace, "sim"))
        sims.wait_for(0, timeout=90)
        for target in targets:
            with pytest.raises((urllib.error.URLError, ConnectionError)):
                http_get(f"{target.url}/health")


def test_a_simulator_that_cannot_start_is_reported_with_its_log(cluster: Cluster, namespace: str) -> None:
    def broken(target: SimTarget) -> list[str]:  # e.g. a bad flag in sim.kvstack.io/args
        return [sys.executable, "-c", f"print('cannot serve {target.model}'); raise SystemExit(2)"]

    with PodSimulators(cluster.credentials(), namespace=namespace, command=broken) as sims:
        create_deployment(cluster, namespace, gpu_deployment("broken", 1, "m-broken"))
        with pytest.raises(TimeoutError, match="cannot serve m-broken"):
            sims.wait_for(1, timeout=8)
        log_dir = sims.log_dir
    assert not log_dir.exists()  # its own temp dir goes with stop()


def test_stop_kills_every_process_and_is_idempotent(cluster: Cluster) -> None:
    other = Cluster(ClusterConfig(name="second", gpu_nodes=1, gpus_per_node=1), tools=cluster.tools)
    with other:
        assert other.pod_cidr != cluster.pod_cidr  # pods of concurrent clusters never share an address
        assert other.server != cluster.server
        workdir = other.workdir
        assert workdir is not None
        assert other.server_version() == f"v{cluster.tools.kubernetes}"
        pids = [int(p.read_text()) for p in workdir.glob("clusters/*/pids/*.pid")]
        assert len(pids) >= 5  # etcd, apiserver, controller-manager, scheduler, kwok
    assert not workdir.exists()
    assert [pid for pid in pids if pid_alive(pid)] == []
    other.stop()  # a second stop is a no-op
    assert cluster.server_version()  # the session's cluster is untouched


def test_build_script_skips_cached_tools(cluster: Cluster) -> None:
    from kvstack_testing.tools import CLUSTER_DIR

    out = subprocess.run(
        ["bash", str(CLUSTER_DIR / "build.sh"), "k8s", "etcd", "kwok"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    steps = [line for line in out.splitlines() if ": cached in " in line]
    assert len(steps) == 3, out
    assert "building" not in out


def test_a_failed_start_cleans_up(cluster: Cluster, tmp_path: Path) -> None:
    broken = dataclasses.replace(cluster.tools, bin_root=tmp_path / "no-binaries")
    failing = Cluster(ClusterConfig(name="broken", workdir=tmp_path / "work"), tools=broken)
    with pytest.raises(OSError):
        failing.start()
    assert not failing.started
    assert not (tmp_path / "work" / "owner.pid").exists()


def test_a_script_that_forgets_stop_leaves_nothing_behind(cluster: Cluster, tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from kvstack_testing import Cluster, ClusterConfig\n"
        "c = Cluster(ClusterConfig(name='forgot', gpu_nodes=0)).start()\n"
        "pids = [p.read_text() for p in c.workdir.glob('clusters/*/pids/*.pid')]\n"
        "print(c.workdir, *pids)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    workdir, pids = Path(out[0]), [int(p) for p in out[1:]]
    assert len(pids) >= 5
    assert not workdir.exists()
    assert [pid for pid in pids if pid_alive(pid)] == []


def prometheus_targets(url: str) -> list[dict[str, Any]]:
    try:
        _, body = http_get(f"{url}/api/v1/targets")
    except OSError:
        return []
    targets: list[dict[str, Any]] = json.loads(body)["data"]["activeTargets"]
    return targets


def test_prometheus_pod_discovery_scrapes_simulators(
    cluster: Cluster, namespace: str, tmp_path: Path
) -> None:
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "engines",
                "kubernetes_sd_configs": [
                    {
                        "role": "pod",
                        "kubeconfig_file": str(cluster.kubeconfig),
                        "namespaces": {"names": [namespace]},
                    }
                ],
                "relabel_configs": [
                    {
                        "source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"],
                        "regex": "engine",
                        "action": "keep",
                    },
                    {
                        "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                        "regex": "http",
                        "action": "keep",
                    },
                    {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    version = subprocess.run(
        [cluster.tools.prometheus, "--version"], capture_output=True, text=True, check=True
    )
    assert f"version {cluster.tools.prometheus_version} " in version.stdout
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    prometheus = subprocess.Popen(
        [
            str(cluster.tools.prometheus),
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("wb"),
    )
    try:
        with PodSimulators(cluster.credentials(), namespace=namespace) as sims:
            create_deployment(cluster, namespace, gpu_deployment("prom", 2, "m"))
            targets = sims.wait_for(2, timeout=90)

            def scraped() -> list[dict[str, Any]]:
                found = [t for t in prometheus_targets(url) if t["health"] == "up"]
                return found if len(found) == 2 else []

            up = wait_until(scraped, "Prometheus scraping both pods", timeout=90)
            assert {t["scrapeUrl"] for t in up} == {f"{t.url}/metrics" for t in targets}
            assert {t["labels"]["pod"] for t in up} == {t.name for t in targets}
    finally:
        prometheus.terminate()
        try:
            prometheus.wait(timeout=10)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()

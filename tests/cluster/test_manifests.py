"""Fake GPU nodes, their loopback pod CIDRs, kwok/kwokctl configuration, version pins: pure builders."""

from __future__ import annotations

import ipaddress
import random

import pytest

from kvstack.common.config import ConfigError, build
from kvstack_testing.cluster import ClusterConfig, choose_pod_cidr
from kvstack_testing.manifests import (
    gpu_node,
    gpu_nodes,
    kwokctl_configuration,
    node_pod_cidr,
)
from kvstack_testing.tools import CLUSTER_DIR, Toolchain, parse_versions


@pytest.mark.parametrize(
    ("cidr", "index", "expected"),
    [
        ("127.16.0.0/16", 0, "127.16.0.0/24"),
        ("127.16.0.0/16", 1, "127.16.1.0/24"),
        ("127.16.0.0/16", 255, "127.16.255.0/24"),
        ("127.0.0.0/8", 300, "127.1.44.0/24"),
    ],
)
def test_node_pod_cidr(cidr: str, index: int, expected: str) -> None:
    assert node_pod_cidr(cidr, index) == expected


@pytest.mark.parametrize(
    ("cidr", "index"), [("127.16.0.0/16", 256), ("127.16.0.0/16", -1), ("127.16.0.0/25", 0)]
)
def test_node_pod_cidr_rejects_out_of_range(cidr: str, index: int) -> None:
    with pytest.raises(ValueError):
        node_pod_cidr(cidr, index)


def test_gpu_node_advertises_gpus_and_is_managed_by_kwok() -> None:
    node = gpu_node("n0", pod_cidr="127.16.0.0/24", gpus=4)
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["spec"]["podCIDR"] == "127.16.0.0/24"
    assert "taints" not in node["spec"]  # charts must schedule here without kwok tolerations


def test_gpu_nodes_get_disjoint_loopback_cidrs() -> None:
    nodes = gpu_nodes(3, 8, "127.16.0.0/16")
    cidrs = [ipaddress.ip_network(n["spec"]["podCIDR"]) for n in nodes]
    assert [n["metadata"]["name"] for n in nodes] == ["gpu-node-0", "gpu-node-1", "gpu-node-2"]
    assert all(c.subnet_of(ipaddress.IPv4Network("127.0.0.0/8")) for c in cidrs)  # type: ignore[arg-type]
    assert len({str(c) for c in cidrs}) == 3


@pytest.mark.parametrize(
    ("cidr", "fallback"), [("127.16.0.0/16", "127.16.255.0/24"), ("127.0.0.0/8", "127.255.255.0/24")]
)
def test_kwok_fallback_cidr_is_loopback_and_apart_from_nodes(cidr: str, fallback: str) -> None:
    doc = kwokctl_configuration(kube_version="1.34.10", etcd_version="3.6.16", binaries={}, pod_cidr=cidr)
    (patch,) = doc["componentsPatches"]
    assert patch["name"] == "kwok-controller"
    assert {"key": "cidr", "value": fallback} in patch["extraArgs"]


def test_kwokctl_configuration_only_local_binaries() -> None:
    doc = kwokctl_configuration(
        kube_version="1.34.10",
        etcd_version="v3.6.16",
        binaries={"etcdBinary": "/x/etcd"},
        pod_cidr="127.16.0.0/16",
    )
    assert doc["options"]["kubeVersion"] == "v1.34.10"
    assert doc["options"]["etcdVersion"] == "3.6.16"
    assert doc["options"]["bindAddress"] == "127.0.0.1"
    assert doc["options"]["etcdBinary"] == "/x/etcd"


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"pod_cidr": "10.0.0.0/16"}, "pod_cidr"),
        ({"pod_cidr": "127.16.0.0/24"}, "pod_cidr"),
        ({"pod_cidr": "not-a-cidr"}, "pod_cidr"),
        ({"gpu_nodes": -1}, "gpu_nodes"),
        ({"name": "Bad_Name"}, "name"),
    ],
)
def test_cluster_config_rejects_bad_fields(values: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        build(ClusterConfig, "cluster config", **values)


def test_cluster_config_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTACK_CLUSTER_GPU_NODES", "3")
    assert build(ClusterConfig, "cluster config").gpu_nodes == 3


def test_versions_file_pins_kubernetes_1_34() -> None:
    versions = parse_versions((CLUSTER_DIR / "versions.env").read_text())
    assert versions["K8S_VERSION"].startswith("1.34.")
    tools = Toolchain.load()
    assert tools.kube_apiserver.parent.name == f"kubernetes-v{versions['K8S_VERSION']}"
    assert tools.helm.parent.name == f"helm-v{versions['HELM_VERSION']}"


def test_parse_versions_skips_comments() -> None:
    assert parse_versions("# c\n\nA=1\nB = 'x'\n") == {"A": "1", "B": "x"}


def test_wrapper_module_replaces_every_staging_module() -> None:
    go_mod = (CLUSTER_DIR / "k8s" / "go.mod").read_text()
    version = parse_versions((CLUSTER_DIR / "versions.env").read_text())["K8S_VERSION"]
    staging = f"v0.{version.removeprefix('1.')}"
    replaces = [line.split() for line in go_mod.splitlines() if line.startswith("replace k8s.io/")]
    assert len(replaces) >= 25
    assert all(parts[-1] == staging for parts in replaces)
    assert f"k8s.io/kubernetes v{version}" in go_mod


ALL_CIDRS = {f"127.{x}.0.0/16" for x in range(16, 255)}


@pytest.mark.parametrize(
    ("taken", "expected"),
    [
        (ALL_CIDRS - {"127.200.0.0/16"}, "127.200.0.0/16"),
        (ALL_CIDRS - {"127.16.0.0/16"}, "127.16.0.0/16"),
        (ALL_CIDRS - {"127.254.0.0/16"}, "127.254.0.0/16"),
    ],
)
def test_choose_pod_cidr_takes_a_free_one(taken: set[str], expected: str) -> None:
    assert choose_pod_cidr(taken) == expected


def test_choose_pod_cidr_avoids_taken_and_fails_when_full() -> None:
    taken = {f"127.{x}.0.0/16" for x in range(16, 250)}
    picks = {choose_pod_cidr(taken, random.Random(seed)) for seed in range(50)}
    assert picks <= ALL_CIDRS - taken
    with pytest.raises(RuntimeError, match="taken"):
        choose_pod_cidr(ALL_CIDRS)

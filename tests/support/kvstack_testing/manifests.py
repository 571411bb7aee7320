"""Pure builders for the objects the test cluster is made of: fake GPU nodes and kwok's configuration."""

from __future__ import annotations

import ipaddress
from typing import Any

# kwok manages only the nodes that carry this annotation (kwokctl's default selector).
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"


def node_pod_cidr(pod_cidr: str, index: int, prefix: int = 24) -> str:
    """The ``index``-th /``prefix`` subnet of ``pod_cidr``: each fake node hands out its own pod IPs."""
    network = ipaddress.ip_network(pod_cidr)
    if prefix < network.prefixlen or prefix > network.max_prefixlen:
        raise ValueError(f"node prefix /{prefix} does not fit inside the pod CIDR {pod_cidr}")
    count = 2 ** (prefix - network.prefixlen)
    if not 0 <= index < count:
        raise ValueError(f"node index {index} outside 0..{count - 1} for /{prefix} subnets of {pod_cidr}")
    first = int(network.network_address) + index * 2 ** (network.max_prefixlen - prefix)
    return f"{ipaddress.ip_address(first)}/{prefix}"


def gpu_node(
    name: str,
    *,
    pod_cidr: str,
    gpus: int = 8,
    cpu: str = "192",
    memory: str = "2Ti",
    pods: int = 110,
    gpu_product: str = "NVIDIA-H200",
) -> dict[str, Any]:
    """A Node that kwok keeps Ready, with ``gpus`` allocatable ``nvidia.com/gpu`` and roomy CPU/memory.

    No kwok taint: the stack's charts must schedule onto these nodes exactly as onto real GPU nodes.
    """
    resources = {"cpu": cpu, "memory": memory, "pods": str(pods), GPU_RESOURCE: str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/role": "agent",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": gpu_product,
                "nvidia.com/gpu.count": str(gpus),
            },
        },
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
        "status": {
            "allocatable": dict(resources),
            "capacity": dict(resources),
        },
    }


def gpu_nodes(
    count: int, gpus_per_node: int, pod_cidr: str, prefix: str = "gpu-node"
) -> list[dict[str, Any]]:
    """``count`` GPU nodes named ``<prefix>-<i>``, node ``i`` owning the ``i``-th /24 of ``pod_cidr``."""
    return [
        gpu_node(f"{prefix}-{i}", pod_cidr=node_pod_cidr(pod_cidr, i), gpus=gpus_per_node)
        for i in range(count)
    ]


def kwokctl_configuration(
    *,
    kube_version: str,
    etcd_version: str,
    binaries: dict[str, str],
    pod_cidr: str,
    bind_address: str = "127.0.0.1",
) -> dict[str, Any]:
    """kwokctl's options for the binary runtime with local binaries only: it must never download.

    ``binaries`` maps kwokctl's option names (``kubeApiserverBinary``, ``etcdBinary``, ...) to paths.
    Pods on nodes without a podCIDR get IPs from the last /24 of ``pod_cidr``, so they stay on
    loopback too. (Flags, not a KwokConfiguration document: such a document replaces kwok's
    defaults wholesale and the controller then refuses to start.)
    """
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokctlConfiguration",
        "options": {
            "runtime": "binary",
            "kubeVersion": f"v{kube_version.removeprefix('v')}",
            "etcdVersion": etcd_version.removeprefix("v"),
            "bindAddress": bind_address,
            "securePort": True,
            # RBAC on, so the chart's Roles are enforced for service-account tokens as in production.
            "kubeAuthorization": True,
            "disableQPSLimits": True,
            **binaries,
        },
        "componentsPatches": [
            {
                "name": "kwok-controller",
                "extraArgs": [
                    {"key": "cidr", "value": node_pod_cidr(pod_cidr, _last_subnet(pod_cidr))},
                    {"key": "node-ip", "value": bind_address, "override": True},
                ],
            }
        ],
    }


def _last_subnet(pod_cidr: str, prefix: int = 24) -> int:
    return int(2 ** (prefix - ipaddress.ip_network(pod_cidr).prefixlen)) - 1

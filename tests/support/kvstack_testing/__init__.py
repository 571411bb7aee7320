"""Test harness: a real Kubernetes control plane on loopback, and simulators behind its pods.

``Cluster`` starts etcd + kube-apiserver + controller-manager + scheduler + kwok with fake GPU nodes;
``PodSimulators`` runs one ``kvstack engine sim`` per Running pod on the pod's loopback IP.
"""

from kvstack_testing.cluster import Cluster, ClusterConfig, reap_stale_clusters
from kvstack_testing.file_sd import SimulatorTargets, file_sd_prometheus
from kvstack_testing.operator_settings import operator_runner, operator_settings
from kvstack_testing.pod_sims import PodSimulators
from kvstack_testing.pod_targets import SimTarget
from kvstack_testing.tools import Toolchain, build_tools, ensure_cluster_tools

__all__ = [
    "Cluster",
    "ClusterConfig",
    "PodSimulators",
    "SimTarget",
    "SimulatorTargets",
    "Toolchain",
    "build_tools",
    "ensure_cluster_tools",
    "file_sd_prometheus",
    "operator_runner",
    "operator_settings",
    "reap_stale_clusters",
]

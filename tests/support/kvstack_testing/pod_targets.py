"""Pure decisions for :mod:`kvstack_testing.pod_sims`: which pods get a simulator, and with what.

Pods are the API's JSON form (camelCase dicts), as a watch event or ``sanitize_for_serialization``
gives them, so these functions need neither a cluster nor the ``kubernetes`` package.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Annotations a test (or the chart's values) may set on an engine pod to steer its simulator.
MODEL_ANNOTATION = "sim.kvstack.io/model"
ARGS_ANNOTATION = "sim.kvstack.io/args"
PORT_ANNOTATION = "sim.kvstack.io/port"
MODEL_ENV = "KVSTACK_ENGINE_MODEL"
DEFAULT_PORT_NAME = "http"
DEFAULT_PORT = 8000
DEFAULT_MODEL = "kvstack/sim-model"

Pod = Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class SimTarget:
    """One simulator to run: where it listens and which model it serves, for the pod ``uid``."""

    uid: str
    namespace: str
    name: str
    host: str
    port: int
    model: str
    extra_args: tuple[str, ...] = ()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def _containers(pod: Pod) -> Sequence[Mapping[str, Any]]:
    return list(pod.get("spec", {}).get("containers") or [])


def _flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``--flag X`` or ``--flag=X`` in ``args`` (last one wins, as argparse does)."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def pod_model(pod: Pod, default: str = DEFAULT_MODEL) -> str:
    """The model a pod serves: annotation, then ``--model`` in a container's args, then its env."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    if annotations.get(MODEL_ANNOTATION):
        return str(annotations[MODEL_ANNOTATION])
    for container in _containers(pod):
        argv = [*(container.get("command") or []), *(container.get("args") or [])]
        model = _flag_value([str(a) for a in argv], "--model")
        if model:
            return model
        for env in container.get("env") or []:
            if env.get("name") == MODEL_ENV and env.get("value"):
                return str(env["value"])
    return default


def pod_port(pod: Pod, port_name: str = DEFAULT_PORT_NAME) -> int:
    """The port a pod serves HTTP on: annotation, the container port named ``port_name``, the first one."""
    annotations = pod.get("metadata", {}).get("annotations") or {}
    if annotations.get(PORT_ANNOTATION):
        return int(annotations[PORT_ANNOTATION])
    ports = [p for c in _containers(pod) for p in (c.get("ports") or []) if p.get("containerPort")]
    for port in ports:
        if port.get("name") == port_name:
            return int(port["containerPort"])
    return int(ports[0]["containerPort"]) if ports else DEFAULT_PORT


def sim_target(pod: Pod, port_name: str = DEFAULT_PORT_NAME) -> SimTarget | None:
    """The simulator a pod should have, or None: only Running pods with an IP that are not terminating."""
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or status.get("phase") != "Running" or not status.get("podIP"):
        return None
    annotations = meta.get("annotations") or {}
    return SimTarget(
        uid=str(meta["uid"]),
        namespace=str(meta.get("namespace", "")),
        name=str(meta.get("name", "")),
        host=str(status["podIP"]),
        port=pod_port(pod, port_name),
        model=pod_model(pod),
        extra_args=tuple(shlex.split(annotations.get(ARGS_ANNOTATION, ""))),
    )


def apply_event(pods: Mapping[str, Pod], event_type: str, pod: Pod) -> dict[str, Pod]:
    """The pod map (by uid) after one watch event; BOOKMARK and unknown types change nothing."""
    uid = pod.get("metadata", {}).get("uid")
    updated = dict(pods)
    if not uid or event_type not in ("ADDED", "MODIFIED", "DELETED"):
        return updated
    if event_type == "DELETED":
        updated.pop(uid, None)
    else:
        updated[uid] = pod
    return updated


def desired_targets(pods: Mapping[str, Pod], port_name: str = DEFAULT_PORT_NAME) -> dict[str, SimTarget]:
    """Every simulator that should run for ``pods``, by pod uid."""
    targets = (sim_target(pod, port_name) for pod in pods.values())
    return {t.uid: t for t in targets if t is not None}


def plan(
    running: Mapping[str, SimTarget], desired: Mapping[str, SimTarget]
) -> tuple[list[SimTarget], list[str]]:
    """(targets to start, uids to stop): a changed target (new IP, port, model) is stopped, then started."""
    to_stop = sorted(uid for uid, target in running.items() if desired.get(uid) != target)
    to_start = [t for uid, t in sorted(desired.items()) if running.get(uid) != t]
    return to_start, to_stop

"""Pure pod bookkeeping for Kubernetes discovery: watch events in, endpoints out.

Why pods and not EndpointSlices: a pod carries everything the router needs in one object: its
readiness (condition ``Ready``), whether it is terminating (``deletionTimestamp``), its named
container ports (the OpenAI port and the KV-event ports) and annotations; it needs no Service
in front of the engines and only ``get/list/watch pods`` RBAC. EndpointSlices would need a
Service listing every port and would still lack annotations.

An engine pod is routable when it is ``Running``, its ``Ready`` condition is ``True``, it has no
``deletionTimestamp`` and it has a pod IP. Its ports, by container port name (configurable):

- ``http`` (else ``default_port``, 8000): the OpenAI server, ``http://<podIP>:<port>``;
- ``kv-events``: vLLM's KV-event ZMQ publisher, ``tcp://<podIP>:<port>``;
- ``kv-replay``: its replay socket.

Annotations override them: ``kvstack.dev/port``, ``kvstack.dev/kv-events-port``,
``kvstack.dev/kv-replay-port`` (numbers), and ``kvstack.dev/served-model-names`` (comma-separated model
names, as the Helm chart and the operator set them;
without it the monitor learns them from ``/v1/models``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvstack.common.config import comma_list
from kvstack.router.engines import Endpoint

ANNOTATION_PORT = "kvstack.dev/port"
ANNOTATION_KV_EVENTS_PORT = "kvstack.dev/kv-events-port"
ANNOTATION_KV_REPLAY_PORT = "kvstack.dev/kv-replay-port"
ANNOTATION_MODELS = "kvstack.dev/served-model-names"
# pods naming one device share its time (engines on one time-sliced GPU): see Endpoint.device
ANNOTATION_DEVICE = "kvstack.dev/device"


@dataclass(frozen=True, slots=True)
class PortNames:
    """Which container ports mean what; see the module docstring."""

    http: str = "http"
    default_port: int = 8000
    kv_events: str = "kv-events"
    kv_replay: str = "kv-replay"


@dataclass(frozen=True, slots=True)
class PodInfo:
    """What discovery keeps of one pod."""

    name: str
    ip: str | None
    phase: str
    ready: bool
    terminating: bool
    ports: tuple[tuple[str, int], ...] = ()  # (container port name, number)
    annotations: tuple[tuple[str, str], ...] = ()

    @property
    def routable(self) -> bool:
        return self.phase == "Running" and self.ready and not self.terminating and bool(self.ip)


@dataclass(frozen=True, slots=True)
class WatchStep:
    """The result of one watch event: the new pod map and where to resume the watch."""

    pods: Mapping[str, PodInfo]
    resource_version: str | None
    resync: bool = False  # the watch cannot continue: re-list
    reason: str = ""


def pod_info(obj: Mapping[str, Any]) -> PodInfo:
    """Extract a :class:`PodInfo` from a Pod object (as JSON); ValueError if it has no name."""
    meta = obj.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("pod without metadata.name")
    status = obj.get("status") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
    )
    ports: list[tuple[str, int]] = []
    for container in (obj.get("spec") or {}).get("containers") or []:
        for port in container.get("ports") or []:
            if isinstance(port.get("name"), str) and isinstance(port.get("containerPort"), int):
                ports.append((port["name"], port["containerPort"]))
    annotations = meta.get("annotations") or {}
    return PodInfo(
        name=name,
        ip=status.get("podIP") or None,
        phase=str(status.get("phase") or "Unknown"),
        ready=ready,
        terminating=meta.get("deletionTimestamp") is not None,
        ports=tuple(ports),
        annotations=tuple(sorted((str(k), str(v)) for k, v in annotations.items())),
    )


def _resource_version(obj: Mapping[str, Any]) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return rv if isinstance(rv, str) and rv else None


def apply_event(
    pods: Mapping[str, PodInfo], resource_version: str | None, event: Mapping[str, Any]
) -> WatchStep:
    """Fold one watch event (``{"type", "object"}``) into the pod map."""
    kind = event.get("type")
    obj = event.get("object") or {}
    if kind == "ERROR":
        code = obj.get("code")
        reason = f"watch error {code} {obj.get('reason', '')}: {obj.get('message', '')}".strip()
        return WatchStep(pods, None if code == 410 else resource_version, resync=True, reason=reason)
    rv = _resource_version(obj) or resource_version
    if kind == "BOOKMARK":
        return WatchStep(pods, rv)
    if kind not in ("ADDED", "MODIFIED", "DELETED"):
        return WatchStep(pods, resource_version, resync=True, reason=f"unknown watch event type {kind!r}")
    info = pod_info(obj)
    new = dict(pods)
    if kind == "DELETED":
        new.pop(info.name, None)
    else:
        new[info.name] = info
    return WatchStep(new, rv)


def _port(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        port = int(value)
    except ValueError:
        return None
    return port if 0 < port < 65536 else None


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip  # IPv6 pod IPs need brackets in URLs


def pod_endpoint(pod: PodInfo, names: PortNames) -> Endpoint | None:
    """The engine endpoint of a routable pod, else None."""
    if not pod.routable or pod.ip is None:
        return None
    ports = dict(pod.ports)
    notes = dict(pod.annotations)
    host = _host(pod.ip)
    http = _port(notes.get(ANNOTATION_PORT)) or ports.get(names.http) or names.default_port
    events = _port(notes.get(ANNOTATION_KV_EVENTS_PORT)) or ports.get(names.kv_events)
    replay = _port(notes.get(ANNOTATION_KV_REPLAY_PORT)) or ports.get(names.kv_replay)
    models = frozenset(comma_list(notes.get(ANNOTATION_MODELS, "")))
    return Endpoint(
        url=f"http://{host}:{http}",
        name=pod.name,
        models=models,
        kv_events_endpoint=f"tcp://{host}:{events}" if events else None,
        kv_events_replay_endpoint=f"tcp://{host}:{replay}" if replay else None,
        device=notes.get(ANNOTATION_DEVICE) or None,
    )


def endpoints_from_pods(pods: Mapping[str, PodInfo], names: PortNames) -> list[Endpoint]:
    """Endpoints of the routable pods, ordered by pod name."""
    out = []
    for name in sorted(pods):
        ep = pod_endpoint(pods[name], names)
        if ep is not None:
            out.append(ep)
    return out


def pods_from_list(body: Mapping[str, Any]) -> tuple[dict[str, PodInfo], str | None]:
    """A PodList body -> (pod map, the list's resourceVersion to watch from)."""
    pods = {}
    for item in body.get("items") or []:
        info = pod_info(item)
        pods[info.name] = info
    return pods, _resource_version(body)

"""Pod watch events -> pod map -> endpoints: the pure half of Kubernetes discovery."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack.router.discovery.kubernetes import backoff_delay
from kvstack.router.discovery.pods import (
    PodInfo,
    PortNames,
    apply_event,
    endpoints_from_pods,
    pod_info,
    pods_from_list,
)
from kvstack.router.engines import Endpoint

NAMES = PortNames()


def pod(
    name: str = "engine-0",
    ip: str | None = "10.0.0.5",
    *,
    phase: str = "Running",
    ready: bool = True,
    deleting: bool = False,
    rv: str = "100",
    ports: dict[str, int] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "llm", "resourceVersion": rv}
    if deleting:
        meta["deletionTimestamp"] = "2026-11-21T08:00:00Z"
    if annotations:
        meta["annotations"] = annotations
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip:
        status["podIP"] = ip
    container_ports = [{"name": k, "containerPort": v} for k, v in (ports or {"http": 8000}).items()]
    return {
        "metadata": meta,
        "spec": {"containers": [{"name": "vllm", "ports": container_ports}]},
        "status": status,
    }


def ev(kind: str, obj: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, "object": obj}


def state(*objs: dict[str, Any]) -> dict[str, PodInfo]:
    return {pod_info(o).name: pod_info(o) for o in objs}


def urls(pods: Any) -> list[str]:
    return [ep.url for ep in endpoints_from_pods(pods, NAMES)]


GONE = {"kind": "Status", "status": "Failure", "code": 410, "reason": "Expired", "message": "too old"}


@pytest.mark.parametrize(
    ("before", "event", "after_urls", "rv", "resync"),
    [
        pytest.param(
            (), ev("ADDED", pod(rv="101")), ["http://10.0.0.5:8000"], "101", False, id="added-ready"
        ),
        pytest.param((), ev("ADDED", pod(ready=False, rv="101")), [], "101", False, id="added-not-ready"),
        pytest.param((), ev("ADDED", pod(phase="Pending", ip=None)), [], "100", False, id="added-pending"),
        pytest.param(
            (pod(),), ev("MODIFIED", pod(ready=False, rv="102")), [], "102", False, id="modified-to-not-ready"
        ),
        pytest.param(
            (pod(ready=False),),
            ev("MODIFIED", pod(rv="102")),
            ["http://10.0.0.5:8000"],
            "102",
            False,
            id="modified-to-ready",
        ),
        pytest.param(
            (pod(),), ev("MODIFIED", pod(deleting=True, rv="103")), [], "103", False, id="terminating"
        ),
        pytest.param((pod(),), ev("DELETED", pod(rv="104")), [], "104", False, id="deleted"),
        pytest.param((), ev("DELETED", pod(rv="104")), [], "104", False, id="deleted-unknown"),
        pytest.param(
            (pod(),),
            ev("MODIFIED", pod(ip="10.0.0.9", rv="105")),
            ["http://10.0.0.9:8000"],
            "105",
            False,
            id="ip-change",
        ),
        pytest.param(
            (pod(),), ev("MODIFIED", pod(phase="Failed", rv="106")), [], "106", False, id="phase-failed"
        ),
        pytest.param(
            (pod(),),
            ev("BOOKMARK", {"kind": "Pod", "metadata": {"resourceVersion": "200"}}),
            ["http://10.0.0.5:8000"],
            "200",
            False,
            id="bookmark",
        ),
        pytest.param((pod(),), ev("ERROR", GONE), ["http://10.0.0.5:8000"], None, True, id="error-410"),
        pytest.param(
            (pod(),),
            ev("ERROR", {"kind": "Status", "code": 500, "message": "etcd"}),
            ["http://10.0.0.5:8000"],
            "100",
            True,
            id="error-500",
        ),
        pytest.param((pod(),), {"type": "WHAT"}, ["http://10.0.0.5:8000"], "100", True, id="unknown-type"),
    ],
)
def test_apply_event(
    before: tuple[dict[str, Any], ...],
    event: dict[str, Any],
    after_urls: list[str],
    rv: str | None,
    resync: bool,
) -> None:
    start = state(*before)
    step = apply_event(start, "100", event)
    assert urls(step.pods) == after_urls
    assert step.resource_version == rv
    assert step.resync is resync
    assert start == state(*before)  # the input map is never changed


def test_bookmark_and_error_keep_the_same_map() -> None:
    start = state(pod())
    assert apply_event(start, "1", ev("BOOKMARK", {"metadata": {"resourceVersion": "2"}})).pods is start
    assert apply_event(start, "1", ev("ERROR", GONE)).pods is start


def test_event_for_a_nameless_pod_raises() -> None:
    with pytest.raises(ValueError):
        apply_event({}, "1", ev("ADDED", {"metadata": {}}))


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(pod(), Endpoint("http://10.0.0.5:8000", "engine-0"), id="named-http-port"),
        pytest.param(
            pod(ports={"metrics": 9000}), Endpoint("http://10.0.0.5:8000", "engine-0"), id="default-port"
        ),
        pytest.param(
            pod(ports={"http": 8080}), Endpoint("http://10.0.0.5:8080", "engine-0"), id="other-port"
        ),
        pytest.param(
            pod(ports={"http": 8000, "kv-events": 5557, "kv-replay": 5558}),
            Endpoint(
                "http://10.0.0.5:8000", "engine-0", frozenset(), "tcp://10.0.0.5:5557", "tcp://10.0.0.5:5558"
            ),
            id="kv-event-ports",
        ),
        pytest.param(
            pod(
                annotations={
                    "kvstack.dev/port": "9001",
                    "kvstack.dev/kv-events-port": "6000",
                    "kvstack.dev/kv-replay-port": "junk",
                    "kvstack.dev/served-model-names": "llama, llama-lora-1,",
                }
            ),
            Endpoint(
                "http://10.0.0.5:9001",
                "engine-0",
                frozenset({"llama", "llama-lora-1"}),
                "tcp://10.0.0.5:6000",
            ),
            id="annotations",
        ),
        pytest.param(pod(ip="fd00::5"), Endpoint("http://[fd00::5]:8000", "engine-0"), id="ipv6"),
        pytest.param(
            pod(annotations={"kvstack.dev/device": "node-1/gpu-0"}),
            Endpoint("http://10.0.0.5:8000", "engine-0", device="node-1/gpu-0"),
            id="a-shared-device",
        ),
        pytest.param(
            pod(annotations={"kvstack.dev/device": ""}),
            Endpoint("http://10.0.0.5:8000", "engine-0"),
            id="an-empty-device-is-its-own",
        ),
    ],
)
def test_endpoint_of_a_ready_pod(obj: dict[str, Any], expected: Endpoint) -> None:
    assert endpoints_from_pods(state(obj), NAMES) == [expected]


def test_custom_port_names() -> None:
    names = PortNames(http="openai", default_port=9999, kv_events="events", kv_replay="replay")
    obj = pod(ports={"openai": 7000, "events": 7001})
    assert endpoints_from_pods(state(obj), names) == [
        Endpoint("http://10.0.0.5:7000", "engine-0", frozenset(), "tcp://10.0.0.5:7001")
    ]
    assert urls(state(pod(ports={"openai": 7000}))) == ["http://10.0.0.5:8000"]


def test_list_then_events() -> None:
    body = {
        "kind": "PodList",
        "metadata": {"resourceVersion": "500"},
        "items": [pod("b", "10.0.0.2"), pod("a", "10.0.0.1"), pod("c", "10.0.0.3", ready=False)],
    }
    pods, rv = pods_from_list(body)
    assert rv == "500"
    assert urls(pods) == ["http://10.0.0.1:8000", "http://10.0.0.2:8000"]  # ordered by pod name
    step = apply_event(pods, rv, ev("MODIFIED", pod("c", "10.0.0.3", rv="501")))
    step = apply_event(step.pods, step.resource_version, ev("DELETED", pod("a", "10.0.0.1", rv="502")))
    assert urls(step.pods) == ["http://10.0.0.2:8000", "http://10.0.0.3:8000"]
    assert step.resource_version == "502"


@pytest.mark.parametrize(
    ("failures", "expected"), [(1, 0.5), (2, 1.0), (3, 2.0), (6, 16.0), (7, 30.0), (50, 30.0), (0, 0.5)]
)
def test_backoff_delay(failures: int, expected: float) -> None:
    assert backoff_delay(failures, 0.5, 30.0) == expected

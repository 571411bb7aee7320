"""Which pods get a simulator, on which address, serving which model: pure decisions, table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from kvstack_testing.pod_targets import (
    DEFAULT_MODEL,
    SimTarget,
    apply_event,
    desired_targets,
    plan,
    pod_model,
    pod_port,
    sim_target,
)


def pod(
    uid: str = "u1",
    *,
    phase: str = "Running",
    ip: str | None = "127.16.0.5",
    deleting: bool = False,
    annotations: dict[str, str] | None = None,
    containers: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "uid": uid,
        "name": f"engine-{uid}",
        "namespace": "ns",
        "annotations": annotations,
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-11-21T00:00:00Z"
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": {"containers": containers or [{"name": "engine"}]}, "status": status}


def target(
    uid: str = "u1", ip: str = "127.16.0.5", port: int = 8000, model: str = DEFAULT_MODEL
) -> SimTarget:
    return SimTarget(uid=uid, namespace="ns", name=f"engine-{uid}", host=ip, port=port, model=model)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (pod(), target()),
        (pod(phase="Pending"), None),
        (pod(phase="Succeeded"), None),
        (pod(ip=None), None),
        (pod(deleting=True), None),
    ],
    ids=["running", "pending", "succeeded", "no-ip", "terminating"],
)
def test_sim_target(case: dict[str, Any], expected: SimTarget | None) -> None:
    assert sim_target(case) == expected


def test_sim_target_passes_extra_args_from_annotation() -> None:
    got = sim_target(pod(annotations={"sim.kvstack.io/args": "--block-size 32 --speed '10'"}))
    assert got is not None
    assert got.extra_args == ("--block-size", "32", "--speed", "10")
    assert got.url == "http://127.16.0.5:8000"


@pytest.mark.parametrize(
    ("annotations", "containers", "expected"),
    [
        (None, None, DEFAULT_MODEL),
        (
            {"sim.kvstack.io/model": "from-annotation"},
            [{"args": ["--model", "from-args"]}],
            "from-annotation",
        ),
        (None, [{"args": ["--model", "meta-llama/Llama-3.1-8B"]}], "meta-llama/Llama-3.1-8B"),
        (None, [{"args": ["--model=a", "--model=b"]}], "b"),
        (None, [{"command": ["vllm", "serve", "--model", "cmd-model"]}], "cmd-model"),
        (None, [{"args": ["--model"]}], DEFAULT_MODEL),
        (None, [{"env": [{"name": "KVSTACK_ENGINE_MODEL", "value": "env-model"}]}], "env-model"),
        (None, [{"name": "sidecar"}, {"args": ["--model", "second"]}], "second"),
    ],
    ids=[
        "default",
        "annotation-wins",
        "args",
        "last-flag-wins",
        "command",
        "dangling-flag",
        "env",
        "2nd-container",
    ],
)
def test_pod_model(
    annotations: dict[str, str] | None, containers: list[dict[str, Any]] | None, expected: str
) -> None:
    assert pod_model(pod(annotations=annotations, containers=containers)) == expected


@pytest.mark.parametrize(
    ("annotations", "containers", "expected"),
    [
        (None, None, 8000),
        (None, [{"ports": [{"containerPort": 9000}]}], 9000),
        (
            None,
            [
                {
                    "ports": [
                        {"name": "metrics", "containerPort": 9100},
                        {"name": "http", "containerPort": 8080},
                    ]
                }
            ],
            8080,
        ),
        ({"sim.kvstack.io/port": "7000"}, [{"ports": [{"name": "http", "containerPort": 8080}]}], 7000),
        (None, [{"ports": [{"name": "kv-events", "containerPort": 5557}]}], 5557),
    ],
    ids=["default", "only-port", "named-http", "annotation-wins", "first-when-unnamed"],
)
def test_pod_port(
    annotations: dict[str, str] | None, containers: list[dict[str, Any]] | None, expected: int
) -> None:
    assert pod_port(pod(annotations=annotations, containers=containers)) == expected


@pytest.mark.parametrize(
    ("before", "event", "obj", "after"),
    [
        ({}, "ADDED", pod("a"), {"a"}),
        ({"a": pod("a")}, "MODIFIED", pod("a", phase="Failed"), {"a"}),
        ({"a": pod("a"), "b": pod("b")}, "DELETED", pod("a"), {"b"}),
        ({"b": pod("b")}, "DELETED", pod("a"), {"b"}),
        ({"a": pod("a")}, "BOOKMARK", {"metadata": {"resourceVersion": "9"}}, {"a"}),
        ({"a": pod("a")}, "ERROR", {"code": 410}, {"a"}),
    ],
    ids=["added", "modified", "deleted", "deleted-unknown", "bookmark", "error"],
)
def test_apply_event(before: dict[str, Any], event: str, obj: dict[str, Any], after: set[str]) -> None:
    result = apply_event(before, event, obj)
    assert set(result) == after
    if event == "MODIFIED":
        assert result["a"]["status"]["phase"] == "Failed"


def test_desired_targets_keeps_only_running_pods() -> None:
    pods = {"a": pod("a"), "b": pod("b", phase="Pending"), "c": pod("c", ip="127.16.1.2", deleting=True)}
    assert desired_targets(pods) == {"a": target("a")}


@pytest.mark.parametrize(
    ("running", "desired", "start", "stop"),
    [
        ({}, {"a": target("a")}, ["a"], []),
        ({"a": target("a")}, {"a": target("a")}, [], []),
        ({"a": target("a")}, {}, [], ["a"]),
        ({"a": target("a")}, {"a": target("a", ip="127.16.0.9")}, ["a"], ["a"]),
        ({"a": target("a")}, {"a": target("a", model="other")}, ["a"], ["a"]),
        ({"b": target("b"), "a": target("a")}, {"c": target("c"), "a": target("a")}, ["c"], ["b"]),
    ],
    ids=["new", "unchanged", "gone", "ip-changed", "model-changed", "mixed"],
)
def test_plan(
    running: dict[str, SimTarget], desired: dict[str, SimTarget], start: list[str], stop: list[str]
) -> None:
    to_start, to_stop = plan(running, desired)
    assert [t.uid for t in to_start] == start
    assert to_stop == stop

"""Annotated engine Deployments (the Helm chart's): parsing the annotations, the state they keep,
and which Deployments the operator tracks. Pure; the end-to-end run is in
``test_chart_autoscaling_cluster.py``.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from kvstack.common.config import ConfigError
from kvstack.operator.annotated import (
    AUTOSCALING,
    MAX_REPLICAS,
    MIN_REPLICAS,
    POLICY,
    SERVED_NAMES,
    STATUS,
    Memory,
    compact,
    dump_memory,
    load_memory,
    parse,
    wants_autoscaling,
)
from kvstack.operator.annotated_scaler import AnnotatedScaler
from kvstack.operator.autoscale import Observation, Policy, decide
from kvstack.operator.runtime import Runtime
from kvstack.operator.settings import OperatorSettings

KVSTACK_OWNER = {"apiVersion": "kvstack.dev/v1alpha1", "kind": "KVStack", "name": "demo", "uid": "u"}


def deployment(
    annotations: dict[str, str] | None = None,
    template_annotations: dict[str, str] | None = None,
    owners: list[dict[str, Any]] | None = None,
    name: str = "rel-kvstack-engine-llama",
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "llm", "uid": "d-1"}
    meta["annotations"] = {AUTOSCALING: "true"} if annotations is None else annotations
    if owners:
        meta["ownerReferences"] = owners
    template = {SERVED_NAMES: "meta-llama/Llama-3.1-8B-Instruct"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "template": {
                "metadata": {
                    "annotations": template if template_annotations is None else template_annotations
                }
            }
        },
    }


def chart(policy: dict[str, Any] | str | None = None, lo: str = "1", hi: str = "4") -> dict[str, str]:
    """The annotations the chart renders."""
    out = {AUTOSCALING: "true", MIN_REPLICAS: lo, MAX_REPLICAS: hi}
    if policy is not None:
        out[POLICY] = policy if isinstance(policy, str) else json.dumps(policy)
    return out


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"annotations": {AUTOSCALING: "true"}}, True),
        ({"annotations": {AUTOSCALING: "True"}}, True),
        ({"annotations": {AUTOSCALING: "false"}}, False),
        ({"annotations": {}}, False),
        ({}, False),
        # A KVStack's engines scale with their stack, whatever they carry.
        ({"annotations": {AUTOSCALING: "true"}, "ownerReferences": [KVSTACK_OWNER]}, False),
        # Another owner (e.g. an Argo rollout or a GitOps tool's object) does not matter.
        (
            {"annotations": {AUTOSCALING: "true"}, "ownerReferences": [{"apiVersion": "v1", "kind": "X"}]},
            True,
        ),
    ],
)
def test_which_deployments_ask_for_autoscaling(meta: dict[str, Any], expected: bool) -> None:
    assert wants_autoscaling(meta) is expected


@pytest.mark.parametrize(
    ("annotations", "template", "expected"),
    [
        # Nothing but the switch: the KVStack defaults (waiting 5 per replica, 1..4).
        (chart(), None, ("meta-llama/Llama-3.1-8B-Instruct", "waitingPerReplica", 5.0, 1, 4, 15, 300)),
        (
            chart(
                {"metric": "kvCacheUsage", "target": 0.7, "scaleDown": {"stabilizationSeconds": 120}},
                "2",
                "8",
            ),
            None,
            ("meta-llama/Llama-3.1-8B-Instruct", "kvCacheUsage", 0.7, 2, 8, 15, 120),
        ),
        (
            chart({"metric": "ttftP90", "intervalSeconds": 5}, "0", "1"),
            None,
            ("meta-llama/Llama-3.1-8B-Instruct", "ttftP90", 1.0, 0, 1, 5, 300),
        ),
        # The first served name is vLLM's model_name; the Deployment's own annotation also works.
        (chart(), {SERVED_NAMES: "llama, llama-alias"}, ("llama", "waitingPerReplica", 5.0, 1, 4, 15, 300)),
        (
            {**chart(), SERVED_NAMES: "hand-made"},
            {},
            ("hand-made", "waitingPerReplica", 5.0, 1, 4, 15, 300),
        ),
    ],
)
def test_chart_annotations_parse_to_a_policy(
    annotations: dict[str, str], template: dict[str, str] | None, expected: tuple[Any, ...]
) -> None:
    parsed = parse(deployment(annotations, template))
    a, b = parsed.autoscaling, parsed.bounds
    got = (
        parsed.model_name,
        a.metric,
        a.effective_target,
        b.min_replicas,
        b.max_replicas,
        a.interval_seconds,
        a.scale_down.stabilization_seconds,
    )
    assert got == expected
    policy = parsed.policy
    assert (policy.min_replicas, policy.max_replicas, policy.target) == (
        b.min_replicas,
        b.max_replicas,
        a.effective_target,
    )


@pytest.mark.parametrize(
    ("annotations", "template", "names"),
    [
        (chart(lo="5", hi="2"), None, [MIN_REPLICAS, MAX_REPLICAS]),
        (chart(lo="two"), None, [MIN_REPLICAS, "integer"]),
        (chart(hi="0"), None, [MAX_REPLICAS, "greater than or equal to 1"]),
        (chart("{not json"), None, [POLICY, "not JSON"]),
        (chart("[1, 2]"), None, [POLICY, "JSON object"]),
        (chart({"metric": "queueDepth"}), None, [POLICY, "metric"]),
        (chart({"target": -1}), None, [POLICY, "target"]),
        (chart({"scaleUp": {"maxPods": 0}}), None, [POLICY, "scaleUp.maxPods"]),
        (chart({"intervalSecs": 5}), None, [POLICY, "intervalSecs", "Extra inputs"]),
        (chart({"enabled": False}), None, [POLICY, "enabled"]),
        (chart({"prometheusUrl": "prom:9090"}), None, [POLICY, "prometheusUrl"]),
        (chart(), {}, [SERVED_NAMES]),
        (chart(), {SERVED_NAMES: " , "}, [SERVED_NAMES]),
    ],
)
def test_a_bad_annotation_fails_naming_it_and_the_field(
    annotations: dict[str, str], template: dict[str, str] | None, names: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(deployment(annotations, template))
    message = str(caught.value)
    assert "llm/rel-kvstack-engine-llama" in message
    for name in names:
        assert name in message


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ((), ()),
        (((1.0, 2),), ((1.0, 2),)),
        (((1.0, 2), (2.0, 2), (3.0, 2)), ((3.0, 2),)),
        (((1.0, 2), (2.0, 3), (3.0, 2)), ((2.0, 3), (3.0, 2))),
        (((1.0, 4), (2.0, 3), (3.0, 2), (4.0, 3)), ((1.0, 4), (3.0, 2), (4.0, 3))),
    ],
)
def test_compact_keeps_the_latest_recommendation_per_count(
    history: tuple[tuple[float, int], ...], expected: tuple[tuple[float, int], ...]
) -> None:
    assert compact(history) == expected


def test_compacted_history_decides_exactly_as_the_full_one() -> None:
    # The annotation holds the compacted history: every decision must come out the same.
    rng = random.Random(7)
    policy = Policy("waiting", 2.0, 1, 10, up_window_s=30, down_window_s=120, up_max_pods=2)
    for _ in range(300):
        full: tuple[tuple[float, int], ...] = ()
        short: tuple[tuple[float, int], ...] = ()
        current = rng.randint(1, 10)
        for step in range(40):
            now = 1000.0 + 5 * step
            obs = Observation(now, current, rng.uniform(0, 8), reporting=current, running=rng.uniform(0, 4))
            a, b = decide(policy, obs, full), decide(policy, obs, short)
            assert (a.replicas, a.reason) == (b.replicas, b.reason)
            full, short, current = a.history, compact(b.history), a.replicas


def test_memory_round_trips_through_the_annotation() -> None:
    entry = {"desiredReplicas": 3, "lastDecision": {"reason": "queue", "toReplicas": 3}}
    memory = Memory(((10.0, 2), (20.0, 3), (30.0, 3)), 12.5, True, {"name": "x", "deployment": "y", **entry})
    text = dump_memory(memory)
    back = load_memory({STATUS: text})
    assert back.history == ((10.0, 2), (30.0, 3))
    assert (back.idle_since, back.prometheus_reachable, back.entry) == (12.5, True, entry)
    assert len(text) < 400


@pytest.mark.parametrize(
    "raw",
    [None, "", "{", "[]", '{"history": [[1, "x"]]}', '{"history": 5}', '{"idleSince": "soon"}'],
)
def test_unreadable_memory_counts_as_none(raw: str | None) -> None:
    annotations = {} if raw is None else {STATUS: raw}
    assert load_memory(annotations) == Memory()


def test_the_scaler_tracks_annotated_deployments_as_watch_events_arrive() -> None:
    scaler = AnnotatedScaler(Runtime(OperatorSettings(metrics_port=0, liveness_port=0)))
    key = ("llm", "rel-kvstack-engine-llama")
    scaler.observe(None, deployment(chart()))  # the initial listing
    assert scaler.tracked == [key]
    scaler.observe("MODIFIED", deployment({AUTOSCALING: "false"}))  # autoscaling switched off
    assert scaler.tracked == []
    scaler.observe("ADDED", deployment(chart()))
    scaler.observe("ADDED", deployment(chart(), owners=[KVSTACK_OWNER], name="demo-llama"))
    assert scaler.tracked == [key]
    scaler.observe("DELETED", deployment(chart()))
    assert scaler.tracked == []


async def test_an_evaluation_cut_short_by_cleanup_logs_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    # The race at a stop: cleanup closes the shared client while the loop evaluates a Deployment.
    # _guarded is the loop's per-Deployment step; the loop itself skips everything once closing.
    from kvstack.common.kube import Credentials, KubeClient, StaticToken
    from kvstack.common.procs import free_port
    from kvstack.operator.kube import Kube

    runtime = Runtime(OperatorSettings(metrics_port=0, liveness_port=0))
    runtime.kube = Kube(KubeClient(Credentials(f"http://127.0.0.1:{free_port()}", StaticToken(None))))
    await runtime.kube.aclose()
    scaler = AnnotatedScaler(runtime)
    key = ("llm", "rel-kvstack-engine-llama")
    await scaler._guarded(key)
    assert [r.levelname for r in caplog.records] == ["ERROR"]  # not stopping: a bug worth a traceback
    caplog.clear()
    runtime.closing = True
    await scaler._guarded(key)
    assert caplog.records == []

"""End to end: ``helm install`` with ``engines.autoscaling.enabled``, and the operator scales the chart's
engine Deployment on a real Prometheus scraping the simulators behind its pods.

The operator runs under KopfRunner with the chart's own operator ServiceAccount (a TokenRequest
token in a kubeconfig), so the chart's Role is what it may do. kwok plays the kubelet;
``PodSimulators`` serves each engine pod on its IP; Prometheus finds them through file discovery,
labelled ``namespace`` and ``pod`` as the chart's PodMonitor labels them.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.helm.test_cluster_install import release

from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import prometheus_url
from kvstack.operator.annotated import POLICY, STATUS
from kvstack_testing import Cluster, PodSimulators, SimulatorTargets, file_sd_prometheus, operator_runner

from .chart_operator import chart_operator
from .conftest import Api

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "sim-llama"
ENGINE = "rel-kvstack-engine-llama"
VALUES: dict[str, Any] = {
    "router": {"enabled": False},
    "lmcache": {"remote": {"mode": "none"}},
    # The chart's operator pod is a kwok pod that runs nothing; the test runs the operator itself.
    "operator": {"enabled": True, "crds": {"enabled": False}},
    "engines": {
        "autoscaling": {
            "enabled": True,
            "target": 2,
            "intervalSeconds": 2,
            "staleAfterSeconds": 30,
            "scaleDown": {"stabilizationSeconds": 600},
        },
        "models": [
            {
                "name": "llama",
                "model": MODEL,
                "autoscaling": {"minReplicas": 1, "maxReplicas": 3},
                # One sequence at a time: concurrent requests queue, which is the signal.
                "podAnnotations": {"sim.kvstack.io/model": MODEL, "sim.kvstack.io/args": "--max-num-seqs 1"},
            }
        ],
    },
}


class Load(threading.Thread):
    """Keeps ``concurrent`` completions in flight against the running simulators."""

    def __init__(self, sims: PodSimulators, concurrent: int) -> None:
        super().__init__(daemon=True)
        self.sims, self.concurrent, self.done = sims, concurrent, threading.Event()

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.concurrent)
        ]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=70)

    def _worker(self, i: int) -> None:
        body = {"model": MODEL, "prompt": "hello " * 20, "max_tokens": 200, "ignore_eos": True}
        with httpx.Client(timeout=60) as client:
            while not self.done.is_set():
                targets = sorted(self.sims.targets.values(), key=lambda t: t.name)
                if not targets:
                    self.done.wait(0.2)
                    continue
                try:
                    client.post(f"{targets[i % len(targets)].url}/v1/completions", json=body)
                except httpx.HTTPError:
                    self.done.wait(0.2)  # a simulator starting or stopping


def annotations(api: Api) -> dict[str, str]:
    dep = api.deployment(ENGINE)
    assert dep is not None
    return dict(dep["metadata"].get("annotations") or {})


def memory(api: Api) -> dict[str, Any]:
    raw = annotations(api).get(STATUS)
    return dict(json.loads(raw)) if raw else {}


def events(api: Api, reason: str) -> list[dict[str, Any]]:
    return [e for e in api.events(ENGINE) if e["reason"] == reason]


def test_the_operator_scales_the_charts_engines_and_survives_a_bad_policy(
    cluster: Cluster,
    namespace: str,
    api: Api,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    targets = tmp_path / "targets.json"
    prom = file_sd_prometheus(tmp_path / "prometheus", targets)
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(VALUES))
    release(cluster, "install", namespace, "-f", str(values))
    assert annotations(api)["kvstack.dev/autoscaling"] == "true"
    assert POLICY in annotations(api)

    prom.start()
    try:
        prom.wait_ready(60)
        runtime, sims = chart_operator(cluster, namespace, tmp_path, monkeypatch, prometheus_url(prom))
        with (
            sims,
            SimulatorTargets(sims, targets),
            operator_runner(runtime, namespace) as runner,
        ):
            sims.wait_for(1, timeout=90)
            # 1. Evaluations start: the state annotation appears, Prometheus answers.
            wait_until(
                lambda: memory(api).get("prometheusReachable") is True, "a first evaluation", timeout=90
            )
            wait_until(
                lambda: (
                    runtime.metrics.registry.get_sample_value(
                        "kvstack_operator_scaling_signal",
                        {"namespace": namespace, "model_name": MODEL, "signal": "waiting_per_replica"},
                    )
                    is not None
                ),
                "the waiting signal seen",
            )
            assert api.replicas(ENGINE) == 1

            # 2. Load: 6 requests on a one-sequence engine, 5 waiting vs target 2: replicas rise.
            load = Load(sims, concurrent=6)
            load.start()
            try:
                wait_until(lambda: api.replicas(ENGINE) > 1, "a scale up", timeout=90)
                up = wait_until(lambda: events(api, "ScaledUp"), "a ScaledUp Event on the Deployment")
                assert "(queue)" in up[0]["message"] or "(max_replicas)" in up[0]["message"]
                last = wait_until(lambda: memory(api).get("lastScale"), "lastScale in the state annotation")
                assert last["direction"] == "up" and last["fromReplicas"] == 1
                assert memory(api)["history"], "the recommendation history is kept for the windows"
                desired = runtime.metrics.registry.get_sample_value(
                    "kvstack_operator_desired_replicas", {"namespace": namespace, "model_name": MODEL}
                )
                assert desired is not None and desired > 1
            finally:
                load.done.set()
                load.join(timeout=90)
            # The operator wrote replicas through /scale as its own field manager; Helm owns the rest.
            dep = api.deployment(ENGINE)
            assert dep is not None
            managers = {f["manager"] for f in dep["metadata"].get("managedFields") or []}
            assert "kvstack-autoscaler" in managers
            # No finalizer: `helm uninstall` and namespace deletion never wait for the operator.
            assert not dep["metadata"].get("finalizers")

            # 3. A bad policy: a Warning Event naming the field, replicas held, the operator alive.
            before = api.replicas(ENGINE)
            annotate = ("annotate", "deployment", ENGINE, "-n", namespace, "--overwrite")
            cluster.kubectl(*annotate, f'{POLICY}={{"metric": "queueDepth"}}')
            bad = wait_until(
                lambda: events(api, "InvalidAutoscalingPolicy"), "an InvalidAutoscalingPolicy Event"
            )
            assert (
                bad[0]["type"] == "Warning" and "metric" in bad[0]["message"] and POLICY in bad[0]["message"]
            )
            assert api.replicas(ENGINE) == before
            # Fixed again: scaling resumes (a fresh evaluation stamps the state annotation).
            stamp = memory(api)["lastDecision"]["time"]
            fixed = {"target": 2, "intervalSeconds": 2, "scaleDown": {"stabilizationSeconds": 600}}
            cluster.kubectl(*annotate, f"{POLICY}={json.dumps(fixed)}")
            wait_until(lambda: memory(api)["lastDecision"]["time"] > stamp, "evaluations again", timeout=30)
            assert len(events(api, "InvalidAutoscalingPolicy")) == 1  # once per problem, not per tick

            # 4. Prometheus gone: replicas held, a Warning Event, the state and the gauge say so.
            held = api.replicas(ENGINE)
            prom.stop()
            wait_until(lambda: events(api, "PrometheusUnreachable"), "a PrometheusUnreachable Event")
            wait_until(lambda: memory(api).get("prometheusReachable") is False, "the blind state recorded")
            stamp = memory(api)["lastDecision"]["time"]
            wait_until(lambda: memory(api)["lastDecision"]["time"] > stamp, "a blind evaluation", timeout=30)
            assert memory(api)["lastDecision"]["reason"] == "metrics_unavailable"
            assert api.replicas(ENGINE) == held
            assert runtime.metrics.registry.get_sample_value("kvstack_operator_prometheus_up") == 0.0
            assert len(events(api, "PrometheusUnreachable")) == 1  # on the change, not per evaluation
        assert runner.exception is None, runner.output
        # The chart's Role is enough: nothing the operator (or kopf under it) asked for was refused.
        refused = [r.getMessage() for r in caplog.records if "forbidden" in r.getMessage().lower()]
        assert not refused, refused[:3]
    finally:
        prom.stop()

"""The operator's own ``kvstack_operator_*`` series, exactly as ``dashboards/CONTRACT.md`` names them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from kvstack.operator.autoscale import DIRECTIONS, REASONS, Decision

MODEL_LABELS = ("namespace", "model_name")
LORA_OPERATIONS = ("load", "unload")
LORA_RESULTS = ("success", "failure")


class OperatorMetrics:
    """One registry per operator process (tests make their own)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.desired = Gauge(
            "kvstack_operator_desired_replicas", "Replicas the autoscaler wants.", MODEL_LABELS, registry=r
        )
        self.current = Gauge(
            "kvstack_operator_current_replicas", "Engine spec.replicas.", MODEL_LABELS, registry=r
        )
        self.ready = Gauge(
            "kvstack_operator_ready_replicas", "Engine ready replicas.", MODEL_LABELS, registry=r
        )
        self.decisions = Counter(
            "kvstack_operator_scaling_decisions",
            "Autoscaler evaluations by outcome.",
            (*MODEL_LABELS, "direction", "reason"),
            registry=r,
        )
        self.last_evaluation = Gauge(
            "kvstack_operator_last_evaluation_timestamp_seconds",
            "Unix time of the last finished evaluation.",
            MODEL_LABELS,
            registry=r,
        )
        self.errors = Counter(
            "kvstack_operator_evaluation_errors",
            "Failed evaluations by stage (query, apply).",
            (*MODEL_LABELS, "stage"),
            registry=r,
        )
        self.signal = Gauge(
            "kvstack_operator_scaling_signal",
            "Inputs of the last evaluation.",
            (*MODEL_LABELS, "signal"),
            registry=r,
        )
        self.prometheus_up = Gauge(
            "kvstack_operator_prometheus_up", "1 if the last Prometheus query succeeded.", registry=r
        )
        self.lora_operations = Counter(
            "kvstack_operator_lora_operations",
            "LoRA adapter loads and unloads on engines, by result (success, failure).",
            (*MODEL_LABELS, "operation", "result"),
            registry=r,
        )
        self._known: set[tuple[str, str]] = set()
        self._signals: dict[tuple[str, str], set[str]] = {}
        self._lora_known: set[tuple[str, str, str]] = set()

    def _init_model(self, namespace: str, model: str) -> None:
        # Every pair exists at 0 from the start, so rate() and increase() work at once.
        if (namespace, model) in self._known:
            return
        self._known.add((namespace, model))
        for direction in DIRECTIONS:
            for reason in REASONS:
                self.decisions.labels(namespace, model, direction, reason)
        for stage in ("query", "apply"):
            self.errors.labels(namespace, model, stage)

    def record(
        self,
        namespace: str,
        model: str,
        decision: Decision,
        current: int,
        ready: int,
        signal: tuple[str, float] | None,
        now: float,
    ) -> None:
        self._init_model(namespace, model)
        self.desired.labels(namespace, model).set(decision.replicas)
        self.current.labels(namespace, model).set(current)
        self.ready.labels(namespace, model).set(ready)
        self.decisions.labels(namespace, model, decision.direction, decision.reason).inc()
        if signal is not None:
            self.signal.labels(namespace, model, signal[0]).set(signal[1])
            self._signals.setdefault((namespace, model), set()).add(signal[0])
        self.last_evaluation.labels(namespace, model).set(now)

    def error(self, namespace: str, model: str, stage: str, now: float) -> None:
        self._init_model(namespace, model)
        self.errors.labels(namespace, model, stage).inc()
        self.last_evaluation.labels(namespace, model).set(now)

    def lora_operation(self, namespace: str, model: str, operation: str, ok: bool) -> None:
        if (namespace, model, "lora") not in self._lora_known:
            # every series at 0 from the first round, so increase() sees the first failure
            self._lora_known.add((namespace, model, "lora"))
            for op in LORA_OPERATIONS:
                for result in LORA_RESULTS:
                    self.lora_operations.labels(namespace, model, op, result)
        self.lora_operations.labels(namespace, model, operation, "success" if ok else "failure").inc()

    def forget(self, namespace: str, model: str) -> None:
        """Drop a deleted model's series, so dashboards stop showing it."""
        self._known.discard((namespace, model))
        for metric in (self.desired, self.current, self.ready, self.last_evaluation):
            _remove(metric, namespace, model)
        for direction in DIRECTIONS:
            for reason in REASONS:
                _remove(self.decisions, namespace, model, direction, reason)
        for stage in ("query", "apply"):
            _remove(self.errors, namespace, model, stage)
        for name in self._signals.pop((namespace, model), set()):
            _remove(self.signal, namespace, model, name)
        if (namespace, model, "lora") in self._lora_known:
            self._lora_known.discard((namespace, model, "lora"))
            for op in LORA_OPERATIONS:
                for result in LORA_RESULTS:
                    _remove(self.lora_operations, namespace, model, op, result)

    def serve(self, port: int, host: str = "0.0.0.0") -> Callable[[], None]:
        """Serve ``/metrics`` on a background thread; returns the function that stops it."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop


def _remove(metric: Gauge | Counter, *values: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*values)

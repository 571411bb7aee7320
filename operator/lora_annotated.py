"""LoRA adapters of annotated engine Deployments (the Helm chart's), outside any ``KVStack``.

The chart renders, on each engine Deployment of a model with ``lora.enabled``::

    kvstack.dev/lora: '{"maxLoras": 4, "maxLoraRank": 16, "adapters": [...], "intervalSeconds": 15}'

(a model's ``lora`` section, camelCase JSON, the same model and checks as a ``KVStack``'s, plus how
often to run a round). :class:`AnnotatedLora` runs the same round as a ``KVStack`` model
(:func:`kvstack.operator.lora_loader.run_round`) on the Deployment's pods, posts the same Events on
the Deployment, and writes ``status.adapters``' entries to ``kvstack.dev/lora-status`` (JSON) on it:
no custom resource holds status here. kopf feeds :meth:`observe` from the Deployment watch the
autoscaler uses; no timer, so no finalizer on objects Helm owns (see
:mod:`kvstack.operator.annotated_scaler`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from pydantic import Field

from kvstack.common.config import ConfigError, build, comma_list
from kvstack.common.lora import LoraSpec
from kvstack.operator.annotated import SERVED_NAMES
from kvstack.operator.crd import GROUP
from kvstack.operator.deployment_rounds import DeploymentRounds, Key
from kvstack.operator.lora_loader import engine_pods, run_round
from kvstack.operator.runtime import Runtime

log = logging.getLogger(__name__)
LORA = f"{GROUP}/lora"
LORA_STATUS = f"{GROUP}/lora-status"


class AnnotationLora(LoraSpec):
    """A model's ``lora`` section as the chart renders it into ``kvstack.dev/lora``."""

    interval_seconds: int = Field(15, ge=1, le=600, description="seconds between rounds")


def parse_lora(dep: dict[str, Any]) -> AnnotationLora:
    """The Deployment's LoRA annotation; ConfigError naming what is wrong."""
    meta = dep.get("metadata", {})
    where = f"Deployment {meta.get('namespace')}/{meta.get('name')}"
    raw = (meta.get("annotations") or {}).get(LORA, "")
    try:
        values = json.loads(raw)
    except ValueError as err:
        raise ConfigError(f"invalid {LORA} of {where}: not JSON: {err}") from err
    if not isinstance(values, dict):
        raise ConfigError(f"invalid {LORA} of {where}: not a JSON object")
    return build(AnnotationLora, f"{LORA} of {where}", **values)


def served_name(dep: dict[str, Any]) -> str:
    """The model's first served name (the router's model_name), from the pod template, else the Deployment."""
    for meta in (dep.get("spec", {}).get("template", {}).get("metadata", {}), dep.get("metadata", {})):
        names = comma_list((meta.get("annotations") or {}).get(SERVED_NAMES, ""))
        if names:
            return names[0]
    return str(dep.get("metadata", {}).get("name", ""))


class AnnotatedLora(DeploymentRounds):
    """The Deployments with a LoRA annotation, and when each is next handled."""

    round_name = "LoRA round of"

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        self._reported: dict[Key, str] = {}

    def _can_run(self) -> bool:
        return super()._can_run() and self._runtime.lora is not None

    def observe(self, event_type: str | None, body: Any) -> None:
        meta = body.get("metadata", {})
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if event_type == "DELETED" or LORA not in (meta.get("annotations") or {}):
            self._due.pop(key, None)
            self._reported.pop(key, None)
        elif key not in self._due:
            log.info("placing LoRA adapters of Deployment %s/%s from its annotation", *key)
            self._due[key] = 0.0

    async def evaluate(self, key: Key) -> None:
        """One round for one Deployment: place, load, unload, tell, remember."""
        kube, client = self._runtime.kube, self._runtime.lora
        assert kube is not None and client is not None
        namespace, name = key
        dep = await kube.get("apps/v1", "Deployment", namespace, name)
        if dep is None or LORA not in (dep.get("metadata", {}).get("annotations") or {}):
            self.observe("DELETED", {"metadata": {"namespace": namespace, "name": name}})
            return
        try:
            lora = parse_lora(dep)
        except ConfigError as err:
            if self._reported.get(key) != str(err):
                log.error("not placing adapters of %s/%s: %s", namespace, name, err)
                await self._tell(dep, True, "InvalidLoraSpec", str(err))
                self._reported[key] = str(err)
            return
        self._reported.pop(key, None)
        self._due[key] = time.time() + lora.interval_seconds
        labels = dep.get("spec", {}).get("selector", {}).get("matchLabels") or {}
        pods = await engine_pods(kube, namespace, labels)
        annotations = dep["metadata"].get("annotations") or {}
        try:
            previous_list = json.loads(annotations.get(LORA_STATUS) or "[]")
        except ValueError:
            previous_list = []
        previous = {str(e.get("name")): e for e in previous_list if isinstance(e, dict)}
        prom = self._runtime.prometheus(None)
        served = served_name(dep)
        done = await run_round(
            client, prom, self._runtime.metrics, namespace, served, lora, pods, previous, name
        )
        for told in done.told:
            await self._tell(dep, told.warning, told.reason, told.message)
        text = json.dumps(done.adapters, sort_keys=True, separators=(",", ":"))
        if annotations.get(LORA_STATUS) != text:
            await kube.annotate(namespace, name, {LORA_STATUS: text})

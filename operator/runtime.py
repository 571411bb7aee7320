"""What every handler of one operator process shares: settings, clients, metrics, the scaling loop.

Its own module so that the handlers and the annotated Deployments' scaler both depend on it and not
on each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from kvstack.common.lora import LoraClient
from kvstack.common.tasks import BackgroundTask, Body
from kvstack.operator.kube import Kube
from kvstack.operator.metrics import OperatorMetrics
from kvstack.operator.prom import Prometheus
from kvstack.operator.settings import OperatorSettings

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """Clients, metrics and settings of one operator process; :meth:`start` and :meth:`close` bracket it."""

    settings: OperatorSettings
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    kube: Kube | None = None  # from start() until close()
    proms: dict[str, Prometheus] = field(default_factory=dict)  # one client per base URL
    lora: LoraClient | None = None  # from start() until close(): engines' runtime LoRA endpoints
    stop_metrics: Callable[[], None] | None = None
    scaling: BackgroundTask | None = None  # the annotated Deployments' evaluation loop
    closing: bool = False  # set first by close(): a handler mid-request then ends quietly

    def prometheus(self, url: str | None) -> Prometheus:
        """The client of ``url``, or of the operator's default Prometheus when it is None."""
        base = url or self.settings.prometheus_url
        if base not in self.proms:
            self.proms[base] = Prometheus(base, timeout=self.settings.prometheus_timeout_s)
        return self.proms[base]

    def start(self, scaling: Body) -> None:
        """Open the API client, serve ``/metrics`` when a port is set, and run ``scaling`` as a task."""
        s = self.settings
        self.kube = Kube.from_environment(s.kubeconfig, s.context)
        self.lora = LoraClient()
        if s.metrics_port:
            self.stop_metrics = self.metrics.serve(s.metrics_port, s.metrics_host)
        self.scaling = BackgroundTask("kvstack-annotated-autoscaling", scaling, logger=log)
        self.scaling.start()

    async def close(self) -> None:
        """Stop the scaling loop, close every client and the ``/metrics`` server."""
        self.closing = True
        if self.scaling is not None:
            await self.scaling.stop()
            self.scaling = None
        for prom in self.proms.values():
            await prom.aclose()
        self.proms.clear()
        if self.kube is not None:
            await self.kube.aclose()
            self.kube = None
        if self.lora is not None:
            await self.lora.aclose()
            self.lora = None
        if self.stop_metrics is not None:
            self.stop_metrics()
            self.stop_metrics = None

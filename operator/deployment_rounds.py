"""Rounds over annotated Deployments, each on its own schedule: what the chart's autoscaler
(:mod:`kvstack.operator.annotated_scaler`) and LoRA loader (:mod:`kvstack.operator.lora_annotated`)
share.

A subclass tracks Deployments in ``_due`` (key -> when its next round is due; 0 for at once) from
kopf's watch events and implements :meth:`DeploymentRounds.evaluate`. :meth:`run` wakes every tick
and runs the due rounds concurrently; a round that fails is retried after :data:`RETRY_S` (unless it
set its own next time before failing), logged as a warning for an API error and with a traceback
for anything else, and never stops the other Deployments' rounds. While the operator is stopping,
a failure is expected (cleanup closed the clients under the round) and says nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kvstack.operator.kube import KubeError
from kvstack.operator.runtime import Runtime

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (namespace, name)
RETRY_S = 15.0  # a Deployment whose round failed (bad annotation, API error) is retried this often


class DeploymentRounds:
    """The Deployments a kind of round is tracking, and when each is next due."""

    round_name = "round of"  # the log lines' words for one round: "<round_name> Deployment ns/name"

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        self._due: dict[Key, float] = {}

    @property
    def tracked(self) -> list[Key]:
        return sorted(self._due)

    def _can_run(self) -> bool:
        """Whether rounds can run now: the clients they need are open and the operator is not stopping."""
        return self._runtime.kube is not None and not self._runtime.closing

    async def evaluate(self, key: Key) -> None:
        """One round for the Deployment ``key``."""
        raise NotImplementedError

    async def run(self) -> None:
        """Run the due rounds, every tick, until cancelled."""
        while True:
            await asyncio.sleep(self._runtime.settings.tick_seconds)
            if not self._can_run():
                continue
            now = time.time()
            due = [key for key, at in self._due.items() if at <= now]
            if due:
                await asyncio.gather(*(self._guarded(key) for key in due))

    async def _guarded(self, key: Key) -> None:
        self._due[key] = time.time() + RETRY_S  # unless the round sets its own interval
        try:
            await self.evaluate(key)
        except Exception as err:
            if self._runtime.closing:
                # cleanup closed the clients under this round (a transport error, or httpx's
                # RuntimeError for a closed client): the operator is stopping, nothing to report.
                return
            if isinstance(err, KubeError):
                log.warning("%s Deployment %s/%s failed, retrying: %s", self.round_name, *key, err)
            else:  # one Deployment's bug must not stop the others' rounds
                log.exception("%s Deployment %s/%s failed", self.round_name, *key)

    async def _tell(self, dep: dict[str, Any], warning: bool, reason: str, message: str) -> None:
        """Post an Event on ``dep``; best effort: a refused Event never stops a round."""
        assert self._runtime.kube is not None
        try:
            await self._runtime.kube.event(dep, "Warning" if warning else "Normal", reason, message)
        except KubeError as err:
            log.warning("cannot post a %s Event: %s", reason, err)

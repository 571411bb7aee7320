"""Where each try's outcome on an engine goes: the upstream-error counter and outlier detection.

The proxy hands over every try that ran to an outcome. A failure is counted by engine and kind;
then :func:`kvstack.router.ejection.judge_outcome` (pure: the rules live there) decides on the
engine's outlier track, and this module applies its verdict: the new track, the ejection counter and
a log line when the engine is ejected, or when an ejection was refused because too many engines are
ejected already. An answer that was too large, or a model the engine no longer serves
(:mod:`kvstack.router.model_gone`), says nothing about the engine's health: recorded as a success.
"""

from __future__ import annotations

import logging

from kvstack.router.config import RouterSettings
from kvstack.router.context import RouterContext
from kvstack.router.ejection import OutlierRules, judge_outcome
from kvstack.router.engines import EngineState
from kvstack.router.retry import AttemptFailure

log = logging.getLogger(__name__)

# failures of the request, not of the engine's health
_NOT_HEALTH = ("too_large", "model_gone")


def outlier_rules(settings: RouterSettings) -> OutlierRules:
    """The ejection thresholds from the router's ``eject_*`` settings."""
    return OutlierRules(
        consecutive_failures=settings.eject_after_failures,
        failure_rate=settings.eject_failure_rate,
        min_requests=settings.eject_min_requests,
        interval_s=settings.eject_interval_s,
        base_ejection_s=settings.eject_duration_s,
        max_ejection_s=settings.eject_max_duration_s,
        max_ejected_percent=settings.max_ejected_percent,
    )


class OutcomeRecorder:
    """Records tries' outcomes against the router's engines, under the settings' ejection rules."""

    def __init__(self, ctx: RouterContext) -> None:
        self.ctx = ctx
        self.rules = outlier_rules(ctx.settings)

    def record(self, engine: EngineState, failure: AttemptFailure | None) -> None:
        """Feed one try's outcome (``None``: it succeeded) to outlier detection; eject when it says so."""
        ctx = self.ctx
        now = ctx.clock()
        others = 0
        if failure is None:
            engine.last_answer = now  # the monitor's sign that a slow /health is a busy engine
        else:
            kind = f"status_{failure.status}" if failure.kind == "status" else failure.kind
            ctx.metrics.upstream_errors.labels(engine.name, kind).inc()
            others = sum(1 for e in ctx.registry.all() if e is not engine and e.ejected_until > now)
        verdict = judge_outcome(
            engine.outlier,
            failed=failure is not None and failure.kind not in _NOT_HEALTH,
            now=now,
            ejected_others=others,
            engines=len(ctx.registry),
            rules=self.rules,
        )
        engine.outlier = verdict.track
        if verdict.ejected:
            ctx.metrics.ejections.labels(engine.name).inc()
            log.warning(
                "engine ejected for %.1f s (%s)",
                verdict.ejected_for,
                verdict.reason,
                extra={"engine": engine.name, "eject_s": verdict.ejected_for},
            )
        elif verdict.reason == "over_cap":
            log.warning(
                "engine not ejected: too many engines are ejected already", extra={"engine": engine.name}
            )

"""Which engines have room for one more request now, and where a request given its turn may go.

The engine side of flow control: the router's ledger of each engine (:mod:`.ledger`), what it
knows of the model's requests (their time at an engine, the classes seen lately), and the two
questions the queue asks of them: how many engines can take a request of a class now
(:meth:`Room.unsaturated`), and which engines the policy may choose among for a request given its
turn (:meth:`Room.with_room`, late binding). The decisions are the pure functions of
:mod:`.saturation` and :mod:`.placement`; this module gathers their inputs.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from kvstack.router.engines import EngineRegistry, EngineState
from kvstack.router.flow.config import FlowControlConfig
from kvstack.router.flow.device_speed import Bucket, alone_rate, observe, speeds
from kvstack.router.flow.ledger import EngineFlow
from kvstack.router.flow.placement import Option, prefer_hit_engine, slot_wait_s
from kvstack.router.flow.saturation import (
    EngineLoad,
    Limits,
    Verdict,
    class_share,
    device_busy,
    kv_to_spare,
    learn_rate,
    rate_sample,
    reserved_engines,
    saturation,
)
from kvstack.router.metrics import RouterMetrics
from kvstack.router.policies.base import ExpectedHit

log = logging.getLogger(__name__)

SERVICE_WEIGHT = 0.1  # of each request in the EWMA of the time at an engine
SLOT_WAITS = ("full", "waiting", "overdue")  # saturations a request can wait out at the engine
# saturations of an engine's compute: on a device shared with an engine that has room, the device
# has time for one more, and the cache-aware estimate (which prices the slowdown of waking another
# engine there) chooses between them; batch slots and KV stay each engine's own. An idle engine
# does not count as that room while its device is behind (saturation.device_busy)
DEVICE_PACED = ("overdue", "prefill_backlog")
# a stream this long past due is stuck on its engine (a hung engine whose /health still answers),
# not slowed by its GPU: it keeps no idle neighbour from taking requests (saturation.device_busy).
# Streams under overload on four LMCache engines of an H200 came 5-28 s after arrival
STUCK_STREAM_S = 60.0


class Room:
    """The engines' side of one router's flow control."""

    def __init__(
        self,
        config: FlowControlConfig,
        metrics: RouterMetrics,
        clock: Callable[[], float],
        max_in_flight: int | None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        sat = config.saturation
        self.limits = Limits(sat.prefill_target_s, sat.max_kv_usage, sat.max_waiting, max_in_flight)
        self.engines: dict[str, EngineFlow] = {}
        # per shared device, its engines' learnt rates (the measured ones): an unmeasured engine's
        # rate is their mean, found without a scan of every ledger on each saturation check
        self.device_rates: dict[str, dict[str, float]] = {}
        # per shared device, its prefill-rate samples by the number of its engines busy
        # (flow/device_speed.py): how much a busy neighbour slows an engine there, learnt
        self.device_buckets: dict[str, dict[int, Bucket]] = {}
        # per model, a request's time at its engine (an EWMA): with the requests in flight there, the
        # rate slots free up (Little's law), known before the queue has given any turn
        self.service_s: dict[str, float] = {}
        # when a request of each priority was last admitted: the headroom for higher classes
        self.seen: dict[int, float] = {}

    def ledger(self, engine: EngineState) -> EngineFlow:
        flow = self.engines.get(engine.url)
        if flow is None:
            flow = self.engines[engine.url] = EngineFlow(self.config.saturation.prefill_tokens_per_s)
        device = engine.endpoint.device  # the engines file or pod may name another since
        if device != flow.device:
            self._forget_rate(engine.url, flow.device)
            flow.device = device
            if flow.measured and device:
                self.device_rates.setdefault(device, {})[engine.url] = flow.rate
        return flow

    def _forget_rate(self, url: str, device: str | None) -> None:
        """``url``'s learnt rate no longer counts in ``device``'s mean (it left, or moved)."""
        if device is None or (rates := self.device_rates.get(device)) is None:
            return
        rates.pop(url, None)
        if not rates:
            del self.device_rates[device]

    def rate(self, engine: EngineState) -> float:
        """The engine's prefill rate: its own once learnt; before that, the mean learnt rate of the
        engines sharing its device (they prefill at the device's pace), else the configured default.
        Priced at the default, an idle engine beside a busy one looked 3.5x faster than it was, and
        flow control sent cold the first turns the busy one held a prefix of (simulators of four
        engines on one H200, bench-results/lmcache section 13)."""
        flow = self.ledger(engine)
        if flow.measured or not flow.device:
            return flow.rate
        known = self.device_rates.get(flow.device)
        return sum(known.values()) / len(known) if known else flow.rate

    def forget_gone(self, registry: EngineRegistry) -> None:
        """Drop the ledgers of engines that left (pods come and go for months)."""
        for url in [u for u in self.engines if registry.get(u) is None]:
            self._forget_rate(url, self.engines.pop(url).device)
        live = {flow.device for flow in self.engines.values()}
        for device in [d for d in self.device_buckets if d not in live]:
            del self.device_buckets[device]

    def pricing_rate(self, engine: EngineState) -> float:
        """The rate the cache-aware cost model prices ``engine``'s prefill at, before its device's
        slowdown (:meth:`device_speeds`): on a shared device whose engines were measured alone, that
        alone rate (the engine's own mixes samples taken alone and beside busy neighbours, and
        would be slowed twice); else :meth:`rate`."""
        device = engine.endpoint.device
        alone = alone_rate(self.device_buckets.get(device, {})) if device else None
        return self.rate(engine) if alone is None else alone

    def device_speeds(self, device: str, prior: tuple[float, ...]) -> tuple[float, ...]:
        """``device``'s engines' speed relative to alone with 2, 3, ... busy: learnt, else ``prior``."""
        return speeds(self.device_buckets.get(device, {}), prior)

    def prefill_done(
        self,
        engine: EngineState,
        grant_id: int,
        work_tokens: float,
        took_s: float,
        learn: bool = True,
        busy: int = 1,
    ) -> None:
        """A prefill at ``engine`` ended after ``took_s`` for ``work_tokens`` (its own and the backlog
        ahead of it at dispatch): the engine's prefill rate learns from it (``saturation.learn_rate``)
        unless not to ``learn`` (it waited there for a batch slot first), and so does its device's
        speed with ``busy`` of its engines busy at dispatch (:mod:`.device_speed`)."""
        flow = self.ledger(engine)
        if flow.prefill.pop(grant_id, None) is None or not learn:
            return
        sat = self.config.saturation
        rate = self.rate(engine)
        sample = rate_sample(rate, sat.prefill_tokens_per_s, work_tokens, took_s)
        if sample is not None:
            if not flow.measured:  # its own learning starts from its device's rate
                flow.rate, flow.measured = rate, True
            flow.samples.append(sample)
            flow.rate = learn_rate(flow.rate, flow.samples, sat.learn_weight)
            if flow.device:
                self.device_rates.setdefault(flow.device, {})[engine.url] = flow.rate
                if sat.learn_weight > 0:
                    known = self.device_buckets.get(flow.device, {})
                    self.device_buckets[flow.device] = observe(known, busy, sample)

    def served(self, model: str, took_s: float) -> None:
        """A request of ``model`` spent ``took_s`` at its engine."""
        known = self.service_s.get(model)
        self.service_s[model] = took_s if known is None else known + SERVICE_WEIGHT * (took_s - known)

    def load(self, engine: EngineState, now: float) -> EngineLoad:
        flow = self.ledger(engine)
        return EngineLoad(
            in_flight=engine.in_flight,
            prefill_tokens=flow.backlog(now),
            prefill_tokens_per_s=self.rate(engine),
            num_waiting=flow.waiting(engine),
            kv_usage=engine.kv_cache_usage,
            queueing=flow.queueing(now),
            slots=flow.slots,
        )

    def top_active(self, now: float) -> int | None:
        """The highest priority admitted within the headroom window (None: none)."""
        window = self.config.saturation.headroom_window_s
        return max((p for p, t in self.seen.items() if now - t <= window), default=None)

    def limits_for(self, priority: int, now: float) -> Limits:
        """The saturation limits for a request of ``priority``: a lower class than one seen within
        the headroom window fills only its share of each engine (:func:`class_share`)."""
        share = class_share(priority, self.top_active(now), self.config.saturation.lower_class_share)
        return self.limits if share == 1.0 else dataclasses.replace(self.limits, share=share)

    def verdicts(self, candidates: list[EngineState], limits: Limits, now: float) -> list[Verdict]:
        """Each candidate's saturation under ``limits`` (:meth:`limits_for`); for a class below one
        seen lately, the engines kept clear for that class are ``reserved`` (:func:`reserved_engines`)."""
        loads = [self.load(e, now) for e in candidates]
        if limits.share < 1.0:
            top = self.top_active(now)
            held = [top is not None and self.ledger(e).holds_below(top, now) for e in candidates]
            clear = reserved_engines(held, limits.share)
            loads = [dataclasses.replace(load, reserved=r) for load, r in zip(loads, clear, strict=True)]
        return device_busy(
            [saturation(load, limits) for load in loads],
            [e.endpoint.device for e in candidates],
            # only a shared device's engines are asked: the scan of their streams is per request
            [
                e.endpoint.device is not None
                and kv_to_spare(e.kv_cache_usage)
                and self.ledger(e).behind(now, STUCK_STREAM_S)
                for e in candidates
            ],
        )

    def unsaturated(self, candidates: list[EngineState], now: float, priority: int) -> int:
        """How many of ``candidates`` can take one more request of ``priority``."""
        limits = self.limits_for(priority, now)
        return sum(1 for v in self.verdicts(candidates, limits, now) if not v.saturated)

    def with_room(
        self,
        candidates: list[EngineState],
        model: str,
        priority: int | None,
        hits: Callable[[EngineState], ExpectedHit] | None,
        prompt_tokens: float,
    ) -> list[EngineState]:
        """The candidates that can take one more request (of ``priority``: None for the top class)
        now (all of them when none can). With ``hits`` (an engine's cached prefix of the prompt):
        only the saturated engine holding the most of it, when waiting there beats the best engine
        with room (:func:`prefer_hit_engine`)."""
        now = self.clock()
        limits = self.limits if priority is None else self.limits_for(priority, now)
        verdicts = dict(zip((e.url for e in candidates), self.verdicts(candidates, limits, now), strict=True))
        roomy = {e.endpoint.device for e in candidates if not verdicts[e.url].saturated and e.endpoint.device}
        free = [e for e in candidates if not verdicts[e.url].saturated or device_paced(e, verdicts, roomy)]
        if free and len(free) < len(candidates) and log.isEnabledFor(logging.DEBUG):
            # one line per narrowed decision, with why the others had no room (kvstack bench flow
            # --decision-log counts them by reason)
            saturated = {e.name: verdicts[e.url].reason for e in candidates if verdicts[e.url].saturated}
            log.debug("flow narrowed", extra={"model": model, "saturated": saturated})
        if not free or hits is None or len(free) == len(candidates):
            return free or candidates
        hit_of = {e.url: hits(e) for e in candidates}
        best = max(candidates, key=lambda e: hit_of[e.url].tokens)
        alt = max(free, key=lambda e: hit_of[e.url].tokens)
        if best in free:
            return free
        slot_wait = self._slot_wait(best, verdicts[best.url].reason, model)
        at_hit, at_alt = hit_of[best.url], hit_of[alt.url]
        best_flow, alt_flow = self.ledger(best), self.ledger(alt)
        hit = Option(at_hit.tokens, best_flow.backlog(now), self.rate(best), slot_wait or 0.0, at_hit.load_s)
        other = Option(at_alt.tokens, alt_flow.backlog(now), self.rate(alt), load_s=at_alt.load_s)
        waitable = slot_wait is not None and limits.share == 1.0
        # the cold prefill's delay to the next request counts on the last engine with room, while the
        # hit engine is queueing by its own signals (overdue streams, requests waiting in it): there
        # the router's backlog is behind the engine and the requests after this one are late already
        queueing = verdicts[best.url].reason in ("overdue", "waiting")
        prefer = prefer_hit_engine(prompt_tokens, hit, other, waitable, last_room=len(free) == 1 and queueing)
        log.debug(
            "flow placement: hit engine %s %s (hit %.0f, backlog %.0f, slot wait %s, rate %.0f) vs %s "
            "(hit %.0f, backlog %.0f, rate %.0f), prompt %.0f: %s",
            best.url,
            verdicts[best.url].reason,
            hit.hit_tokens,
            hit.backlog_tokens,
            slot_wait,
            hit.tokens_per_s,
            alt.url,
            other.hit_tokens,
            other.backlog_tokens,
            other.tokens_per_s,
            prompt_tokens,
            "wait at the hit engine" if prefer else "go cold",
        )
        if prefer:
            self.metrics.flow_hit_waits.labels(self.metrics.model_label(model)).inc()
            return [best]
        return free

    def _slot_wait(self, engine: EngineState, reason: str, model: str) -> float | None:
        """The wait for a batch slot at a saturated ``engine`` (:func:`slot_wait_s`): 0 when only a
        prefill backlog saturates it; None when it cannot be waited out there (KV full, the hard
        cap, kept clear) or not estimated yet (no request of the model has finished)."""
        if reason == "prefill_backlog" or (
            reason in ("waiting", "overdue") and kv_to_spare(engine.kv_cache_usage)
        ):
            # with KV to spare, requests waiting there wait for a step's token budget, not a slot:
            # its prefill backlog is the wait (vLLM's chunked prefill), already weighed
            return 0.0
        service = self.service_s.get(model)
        if reason not in SLOT_WAITS or not service:
            return None
        return slot_wait_s(service, engine.in_flight, self.ledger(engine).waiting(engine) or 0.0)


def device_paced(engine: EngineState, verdicts: dict[str, Verdict], roomy: set[str]) -> bool:
    """Whether ``engine``, saturated, still takes requests: its saturation is its compute's
    (:data:`DEVICE_PACED`), its KV is known to have room (:func:`kv_to_spare`: an overdue stream
    at an engine with its KV nearly full is waiting for KV, the engine's own), and an engine on its
    device has room. Engines time-slicing one GPU are one compute: narrowed to the idle one, a
    first turn the busy one held a prefix of went cold there, at a fraction of the GPU, and slowed
    the busy one (simulators of four engines on an H200 at load 0.9: 10 and 35 requests on two
    engines, TTFT p90 383 ms against 327 ms unnarrowed)."""
    return (
        verdicts[engine.url].reason in DEVICE_PACED
        and engine.endpoint.device is not None
        and engine.endpoint.device in roomy
        and kv_to_spare(engine.kv_cache_usage)
    )

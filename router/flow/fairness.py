"""Weighted, work-conserving fair shares between tenants: start-time fair queuing. No clock, no I/O.

Each tenant with requests waiting has a virtual time: the work it was given while waiting, divided
by its weight. Work is a request's uncached prompt tokens plus ``request_tokens`` per request, so
many small requests and a few large ones are both counted. The next request goes to the waiting
tenant with the least virtual time; the system's virtual time is that of the tenant last served.

A tenant that starts waiting enters at the system's virtual time (or keeps its own, when larger): an
idle tenant banks no credit for its idle time, and its share is used by the others meanwhile (work
conserving). A tenant that stops waiting is forgotten, so the state is bounded by the tenants
waiting, whatever the tenant names clients send.

:func:`over_share` says whether a tenant holds more of a queue than its weight entitles it to,
:func:`below_share` whether it holds less of some work (the prefill in flight);
:func:`fair_work_ahead` how much of a queue goes before a newcomer under these shares.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


class FairShare:
    """Virtual times of the tenants waiting in one queue."""

    def __init__(self, weights: Mapping[str, float], request_tokens: float = 256.0) -> None:
        self.weights = dict(weights)
        self.request_tokens = request_tokens
        self.now = 0.0  # system virtual time
        self.vtime: dict[str, float] = {}

    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def waiting(self, tenant: str) -> None:
        """``tenant`` has a request waiting (again)."""
        self.vtime[tenant] = max(self.now, self.vtime.get(tenant, self.now))

    def idle(self, tenant: str) -> None:
        """``tenant`` has nothing waiting any more."""
        self.vtime.pop(tenant, None)

    def pick(self, tenants: set[str]) -> str:
        """The one of ``tenants`` (waiting) to serve next: least virtual time, then name."""
        return min(tenants, key=lambda t: (self.vtime.get(t, self.now), t))

    def charge(self, tenant: str, tokens: float) -> None:
        """``tenant`` was given a request of ``tokens`` uncached prompt tokens."""
        start = max(self.now, self.vtime.get(tenant, self.now))
        self.now = start
        self.vtime[tenant] = start + (tokens + self.request_tokens) / self.weight(tenant)


def over_share(
    tenant: str, cost: float, queued: Mapping[str, float], weights: Mapping[str, float], request_tokens: float
) -> bool:
    """Whether ``tenant`` would hold more than its weighted share of a queue with one more request
    of ``cost`` tokens from it. ``queued``: each waiting tenant's queued work (tokens + request_tokens
    per request); the shares are among the tenants waiting, newcomer included."""
    work = dict(queued)
    work[tenant] = work.get(tenant, 0.0) + cost + request_tokens
    return work[tenant] > _share(tenant, sum(work.values()), work, weights) + 1e-9


def below_share(tenant: str, work: Mapping[str, float], weights: Mapping[str, float]) -> bool:
    """Whether ``tenant`` holds less than its weighted share of ``work`` (per tenant; the shares
    are among the tenants holding some, ``tenant`` included). Nothing held by anyone: True."""
    total = sum(work.values())
    if total <= 0:
        return True
    holders = {t for t, w in work.items() if w > 0} | {tenant}
    return work.get(tenant, 0.0) < _share(tenant, total, holders, weights) - 1e-9


def _share(tenant: str, total: float, among: Iterable[str], weights: Mapping[str, float]) -> float:
    """``tenant``'s weighted share of ``total`` among the tenants ``among`` (``tenant`` one of them)."""
    return total * weights.get(tenant, 1.0) / sum(weights.get(t, 1.0) for t in among)


def fair_work_ahead(
    tenant: str, cost: float, queued: Mapping[str, float], weights: Mapping[str, float], request_tokens: float
) -> float:
    """The queued work served before a newcomer of ``tenant`` (``cost`` tokens) under fair shares.

    The newcomer is served when its tenant's virtual time reaches ``V = (its queued work + cost +
    request_tokens) / its weight``; by then each other tenant has been given at most ``V x`` its
    weight of its own queued work. So a tenant under its share is not put behind the whole backlog
    of one over it (the prediction that admits or sheds it must say so), while the tenant holding
    the backlog waits behind all of it.
    """
    own = queued.get(tenant, 0.0)
    v = (own + cost + request_tokens) / weights.get(tenant, 1.0)
    others = sum(min(w, v * weights.get(t, 1.0)) for t, w in queued.items() if t != tenant)
    return own + others

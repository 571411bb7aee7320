"""The waiting requests of one model: bounded, ordered by :mod:`.ordering`, shared by :mod:`.fairness`.

Each waiting request is a :class:`Ticket` whose future the controller completes: with None when it
is its turn, or with a :class:`Shed` when it has to make way (its client gets a 429). A ticket whose
client went away is removed at once. Everything runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from kvstack.router.flow.admission import QueueState
from kvstack.router.flow.config import Ordering
from kvstack.router.flow.fairness import FairShare
from kvstack.router.flow.ordering import Waiting, next_waiting, order_key


class Shed(Exception):
    """A waiting request had to make way for another one (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(eq=False, slots=True)
class Ticket:
    waiting: Waiting
    class_name: str
    tenant_label: str  # the tenant as a metric label: a configured name or "other"
    future: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class FlowQueue:
    """Bounded by ``max_count`` requests and ``max_tokens`` prompt tokens (plus one prompt)."""

    def __init__(
        self, ordering: Ordering, max_count: int, max_tokens: int, fair: FairShare, aging_tokens_per_s: float
    ) -> None:
        self.ordering: Ordering = ordering
        self.max_count = max_count
        self.max_tokens = max_tokens
        self.fair = fair
        self.aging = aging_tokens_per_s
        self.tickets: dict[int, Ticket] = {}
        self.tokens = 0.0

    def __len__(self) -> int:
        return len(self.tickets)

    def state_for(self, priority: int, max_held: int = 0, max_wait_s: float | None = None) -> QueueState:
        """What :func:`kvstack.router.flow.admission.decide` needs, for a newcomer of ``priority``
        (``max_held``: the bound while the model has no ready engine; ``max_wait_s``: on a wait)."""
        ahead = [t.waiting for t in self.tickets.values() if t.waiting.priority >= priority]
        work: dict[str, float] = {}
        for t in self.tickets.values():
            w = t.waiting
            work[w.tenant] = work.get(w.tenant, 0.0) + w.cost + self.fair.request_tokens
        return QueueState(
            count=len(self.tickets),
            tokens=self.tokens,
            max_count=self.max_count,
            max_tokens=self.max_tokens,
            tokens_ahead=sum(w.cost for w in ahead),
            waiting_ahead=len(ahead),
            lowest_priority=min((t.waiting.priority for t in self.tickets.values()), default=None),
            work=work,
            weights=self.fair.weights,
            request_tokens=self.fair.request_tokens,
            max_held=max_held,
            max_wait_s=max_wait_s,
        )

    def add(self, ticket: Ticket) -> int:
        """Queue ``ticket``; returns its position (1: next) as ordering stands now."""
        self.tickets[ticket.waiting.seq] = ticket
        self.tokens += ticket.waiting.cost
        self.fair.waiting(ticket.waiting.tenant)
        return self.position(ticket)

    def position(self, ticket: Ticket) -> int:
        """1 + the waiting requests that go before it by class and ordering (fair shares aside)."""
        w = ticket.waiting
        key = (-w.priority, *_key(w, self))
        return 1 + sum(
            1 for t in self.tickets.values() if (-t.waiting.priority, *_key(t.waiting, self)) < key
        )

    def remove(self, ticket: Ticket) -> bool:
        """Take ``ticket`` out (its turn came, it was shed, or its client left); False if not in."""
        if self.tickets.pop(ticket.waiting.seq, None) is None:
            return False
        self.tokens -= ticket.waiting.cost
        tenant = ticket.waiting.tenant
        if not any(t.waiting.tenant == tenant for t in self.tickets.values()):
            self.fair.idle(tenant)
        if not self.tickets:
            self.tokens = 0.0  # no float drift survives an empty queue
        return True

    def peek_next(self) -> Ticket | None:
        """The ticket whose turn it is, left in the queue."""
        chosen = next_waiting(
            (t.waiting for t in self.tickets.values()), self.ordering, self.aging, self.fair.pick
        )
        return None if chosen is None else self.tickets[chosen.seq]

    def pop_next(self) -> Ticket | None:
        """The ticket whose turn it is, out of the queue and charged to its tenant."""
        ticket = self.peek_next()
        if ticket is None:
            return None
        chosen = ticket.waiting
        self.fair.charge(chosen.tenant, chosen.cost)
        self.remove(ticket)
        return ticket

    def victim(self, priority: int, tenant: str | None) -> Ticket | None:
        """The newest waiting request of ``priority`` (and ``tenant`` when given)."""
        pool = [
            t
            for t in self.tickets.values()
            if t.waiting.priority == priority and (tenant is None or t.waiting.tenant == tenant)
        ]
        return max(pool, key=lambda t: (t.waiting.arrival, t.waiting.seq), default=None)


def _key(w: Waiting, queue: FlowQueue) -> tuple[float, float, int]:
    return order_key(w, queue.ordering, queue.aging)

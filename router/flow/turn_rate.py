"""The rate at which a model's flow queue gives turns, which admission uses to predict a wait.

Two measures, and the slower wins: the turns the queue has been giving while it was not empty (over
its last :data:`TURNS_KEPT` turns, from :data:`MIN_TURNS` on, since a few turns say nothing of a
rate), and the requests running at the model's engines over their time at an engine. A queue that
empties forgets its turns, so a later backlog is measured afresh.
"""

from __future__ import annotations

from collections import deque

TURNS_KEPT, MIN_TURNS = 64, 8


class TurnRate:
    """Per model, the times of the last turns given from a non-empty queue."""

    def __init__(self) -> None:
        self._times: dict[str, deque[float]] = {}

    def given(self, model: str, now: float) -> None:
        self._times.setdefault(model, deque(maxlen=TURNS_KEPT)).append(now)

    def emptied(self, model: str) -> None:
        self._times.pop(model, None)

    def per_s(self, model: str, running: float, service_s: float | None) -> float | None:
        """Turns per second, or None while neither measure is known. ``running``: requests at the
        model's engines; ``service_s``: a request's usual time at an engine."""
        rates: list[float] = []
        times = self._times.get(model)
        if times is not None and len(times) >= MIN_TURNS and times[-1] > times[0]:
            rates.append((len(times) - 1) / (times[-1] - times[0]))
        if service_s and running:
            rates.append(running / service_s)
        return min(rates, default=None)

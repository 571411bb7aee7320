"""One request's passage through flow control: what it was admitted as, where it went, and the
headers that tell its client (:class:`Grant`). Written by :mod:`.controller`, carried by the proxy."""

from __future__ import annotations

from dataclasses import dataclass

from kvstack.router.flow.admission import Reason


@dataclass(eq=False, slots=True)
class Grant:
    """One request's passage through flow control; the proxy carries it on the call."""

    id: int
    model: str
    class_name: str
    priority: int
    tenant: str
    tenant_label: str
    objective_s: float | None
    cost: float
    predicted_ttft_s: float | None = None
    admission: Reason | None = None  # the admission decision's reason: room, queued, held, ...
    correction: float = 1.0  # the model's prediction correction it was predicted with
    position: int = 0  # in the queue at admission; 0: an engine had room
    queue_wait_s: float = 0.0
    reserved: bool = False  # given its turn, not yet at an engine
    engine: str | None = None  # the URL of the engine it was last sent to
    dispatched_at: float = 0.0
    backlog_at_dispatch: float = 0.0
    uncached: float = 0.0
    # it waited at its engine for a batch slot (saturation.waits_for_slot): its TTFT is no prefill rate
    waited_for_slot: bool = False
    device_busy: int = 1  # engines busy on its engine's device at dispatch, itself included

    def headers(self) -> list[tuple[bytes, bytes]]:
        shown = [
            (b"x-kvstack-priority-class", self.class_name.encode()),
            (b"x-kvstack-queue-position", str(self.position).encode()),
            (b"x-kvstack-queue-wait-ms", str(round(self.queue_wait_s * 1000)).encode()),
        ]
        # how and on what it was admitted, beside what it got: a late first token with a small
        # prediction is the prediction's error, with a large one the admission rule's
        if self.admission is not None:
            shown.append((b"x-kvstack-admission", self.admission.encode()))
        if self.predicted_ttft_s is not None:
            shown.append((b"x-kvstack-predicted-ttft-ms", str(round(self.predicted_ttft_s * 1000)).encode()))
        return shown

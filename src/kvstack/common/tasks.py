"""One named coroutine running in the background for the object that owns it.

The owner builds a :class:`BackgroundTask` around its loop and calls :meth:`~BackgroundTask.start`
and :meth:`~BackgroundTask.stop` from its own start and stop:

- ``start()`` creates the task on the running loop, unless one is still running (so it is
  idempotent, and a task that ended is replaced by a fresh one).
- ``cancel()`` asks the task to end without waiting, for owners that must stay synchronous.
- ``stop()`` cancels the task and waits for it to end, at most ``grace`` seconds: a body that
  ignores its cancellation is logged and left behind rather than hanging the owner's shutdown.
  Stopping twice, or stopping a task that already ended, does nothing more. A caller cancelled
  while it waits is cancelled as usual (the body's own cancellation is never mistaken for it).
- A body that raises is logged with its traceback the moment it ends, never lost in a task nobody
  awaits; :attr:`~BackgroundTask.failure` keeps the exception for the owner to report.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)

Body = Callable[[], Coroutine[Any, Any, None]]


class BackgroundTask:
    """Owns at most one running task of ``body``, named ``name`` (in logs and ``asyncio`` dumps)."""

    __slots__ = ("_body", "_log", "_task", "failure", "name")

    def __init__(self, name: str, body: Body, *, logger: logging.Logger | None = None) -> None:
        self.name = name
        self._body = body
        self._log = logger or log
        self._task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None  # what the last run raised, if it crashed

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Run the body in a new task (call on the event loop); nothing if one is still running."""
        if self.running:
            return
        self.failure = None
        task = asyncio.get_running_loop().create_task(self._body(), name=self.name)
        task.add_done_callback(self._ended)
        self._task = task

    def cancel(self) -> None:
        """Ask the task to end, without waiting for it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def stop(self, *, grace: float = 5.0) -> None:
        """Cancel the task and wait until it has ended (at most ``grace`` seconds)."""
        task, self._task = self._task, None
        if task is None or task.done():
            return
        task.cancel()
        # asyncio.wait neither raises the task's CancelledError nor swallows one meant for us.
        _, pending = await asyncio.wait({task}, timeout=grace)
        if pending:
            self._log.warning("background task %s did not stop within %g s", self.name, grace)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            self.failure = err
            self._log.error("background task %s crashed", self.name, exc_info=err)


__all__ = ["BackgroundTask", "Body"]

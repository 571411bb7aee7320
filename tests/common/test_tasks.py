"""BackgroundTask: one named task per owner, started and stopped idempotently, crashes logged."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kvstack.common.tasks import BackgroundTask


class Loop:
    """A body that counts its runs, signals that it runs, and records how it ended."""

    def __init__(self, *, crash: bool = False, finish: bool = False, stubborn: bool = False) -> None:
        self.crash, self.finish, self.stubborn = crash, finish, stubborn
        self.runs = 0
        self.started = asyncio.Event()
        self.saw_cancel = asyncio.Event()
        self.release = asyncio.Event()  # lets a stubborn body end after ignoring a cancellation
        self.cancelled = 0
        self.tasks: list[asyncio.Task[object]] = []  # every run's task, in order

    async def __call__(self) -> None:
        self.runs += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)
        self.started.set()
        if self.crash:
            raise RuntimeError("the loop broke")
        if self.finish:
            return
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            self.saw_cancel.set()
            if not self.stubborn:
                raise
            await self.release.wait()


async def ended(body: Loop) -> None:
    """Wait until the body's latest run has ended and BackgroundTask's done callback has run
    (it was added before this wait's own, and done callbacks run in order)."""
    await body.started.wait()
    await asyncio.wait({body.tasks[-1]})


async def started(body: Loop, name: str = "loop", logger: logging.Logger | None = None) -> BackgroundTask:
    """A BackgroundTask of ``body``, started, once the body runs."""
    task = BackgroundTask(name, body, logger=logger)
    task.start()
    await body.started.wait()
    return task


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Warnings and errors of kvstack's loggers (the helper's own and an owner's)."""
    caplog.set_level(logging.WARNING, logger="kvstack")
    return caplog


def crash_records(logs: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in logs.records if "background task loop crashed" in r.getMessage()]


async def test_start_runs_the_body_once_however_often_it_is_called() -> None:
    body = Loop()
    task = BackgroundTask("loop", body)
    task.start()
    task.start()
    await body.started.wait()
    task.start()
    assert task.running
    assert body.runs == 1
    await task.stop()


async def test_the_task_carries_its_name() -> None:
    task = await started(Loop(), "kv-events http://e1")
    assert "kv-events http://e1" in {t.get_name() for t in asyncio.all_tasks()}
    await task.stop()


async def test_stop_cancels_and_waits_and_is_idempotent() -> None:
    body = Loop()
    await BackgroundTask("loop", body).stop()  # never started: nothing to do
    task = await started(body)
    await task.stop()
    assert body.cancelled == 1  # the body saw its cancellation before stop returned
    assert not task.running
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "loop"]
    await task.stop()
    assert body.cancelled == 1
    assert task.failure is None


async def test_a_crashing_body_is_logged_with_its_traceback_when_it_crashes(
    logs: pytest.LogCaptureFixture,
) -> None:
    body = Loop(crash=True)
    task = await started(body)
    await ended(body)  # nobody stops or awaits it: the crash must be logged anyway
    [crash] = crash_records(logs)
    assert crash.name == "kvstack.common.tasks"
    assert crash.exc_info is not None
    assert isinstance(crash.exc_info[1], RuntimeError)
    assert str(crash.exc_info[1]) == "the loop broke"
    assert isinstance(task.failure, RuntimeError)
    assert not task.running
    await task.stop()  # stopping a crashed task neither raises nor logs again
    assert len(crash_records(logs)) == 1


async def test_a_crash_goes_to_the_owners_logger(logs: pytest.LogCaptureFixture) -> None:
    body = Loop(crash=True)
    await started(body, logger=logging.getLogger("kvstack.tests.owner"))
    await ended(body)
    assert [r.name for r in crash_records(logs)] == ["kvstack.tests.owner"]


async def test_start_after_a_crash_runs_the_body_again() -> None:
    body = Loop(crash=True)
    task = await started(body)
    await ended(body)
    assert task.failure is not None
    body.crash = False
    body.started.clear()
    task.start()
    await body.started.wait()
    assert task.running
    assert task.failure is None  # the failure belonged to the previous run
    assert body.runs == 2
    await task.stop()


async def test_stop_after_the_body_finished_does_nothing_and_start_runs_it_again(
    logs: pytest.LogCaptureFixture,
) -> None:
    body = Loop(finish=True)
    task = await started(body)
    await ended(body)
    await task.stop()
    assert body.cancelled == 0
    body.started.clear()
    task.start()  # the ended task is replaced by a fresh run
    await ended(body)
    await task.stop()
    assert body.runs == 2
    assert logs.records == []
    assert task.failure is None


async def test_a_body_that_ignores_cancellation_does_not_hang_stop(logs: pytest.LogCaptureFixture) -> None:
    body = Loop(stubborn=True)
    task = await started(body)
    await task.stop(grace=0.01)
    assert body.cancelled == 1
    assert any("background task loop did not stop" in r.getMessage() for r in logs.records)
    body.release.set()  # let it end, so the test leaves no task behind
    await ended(body)


async def test_a_caller_cancelled_while_stopping_is_cancelled() -> None:
    body = Loop(stubborn=True)
    task = await started(body)
    stopper = asyncio.create_task(task.stop(grace=3600))
    await body.saw_cancel.wait()  # the stopper now waits for the stubborn body
    stopper.cancel()
    with pytest.raises(asyncio.CancelledError):
        await stopper
    body.release.set()
    await ended(body)


async def test_cancel_asks_the_task_to_end_without_waiting() -> None:
    body = Loop()
    task = await started(body)
    task.cancel()
    assert not task.running
    assert body.cancelled == 0  # not waited for: the body has not run since
    await body.saw_cancel.wait()
    await ended(body)
    task.cancel()  # again: nothing to do
    assert body.cancelled == 1


def test_start_needs_a_running_event_loop() -> None:
    task = BackgroundTask("loop", Loop())
    with pytest.raises(RuntimeError):
        task.start()

"""The router's server wakes for its housekeeping once a second, not uvicorn's ten times, keeps the
``Date`` header current, and stops at once when told to (``should_exit``, from another thread)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar

import httpx
import uvicorn

from kvstack.common.procs import free_port
from kvstack.common.waits import wait_until
from kvstack.router.server import RouterServer


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering every request with an empty 200."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class CountingServer(RouterServer):
    """The router's server, counting its housekeeping wake-ups."""

    ticks = 0

    async def on_tick(self, counter: int) -> bool:
        self.ticks += 1
        return await super().on_tick(counter)


class HourlyServer(CountingServer):
    """Housekeeping once an hour: only being told to exit can end its wait."""

    tick_s: ClassVar[float] = 3600.0


@contextmanager
def serving(kind: type[CountingServer]) -> Iterator[tuple[CountingServer, threading.Thread, str]]:
    port = free_port()
    server = kind(uvicorn.Config(hello, host="127.0.0.1", port=port, lifespan="off", log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server to start", 10, 0.01)
    try:
        yield server, thread, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_an_idle_server_wakes_once_a_second_and_keeps_the_date_current() -> None:
    with serving(CountingServer) as (server, _, url):
        before = server.ticks
        first = httpx.get(url)
        time.sleep(2.5)
        second = httpx.get(url)
        woken = server.ticks - before
    assert 1 <= woken <= 4  # uvicorn's own loop: 25 in 2.5 s
    dates = [parsedate_to_datetime(resp.headers["date"]) for resp in (first, second)]
    assert (dates[1] - dates[0]).total_seconds() >= 1


def test_setting_should_exit_from_another_thread_stops_it_without_waiting_for_a_tick() -> None:
    with serving(HourlyServer) as (server, thread, url):
        assert httpx.get(url).status_code == 200
        server.should_exit = True
        thread.join(30)  # an hour's wait unless the setting woke it
        assert not thread.is_alive()
        assert server.ticks == 2  # the first look, and the one the setting woke

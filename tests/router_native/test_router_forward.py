"""The router's streams on the compiled relay, end to end: the router behind its own server
(router/server.py, as ``kvstack router`` runs it), real simulators and the real ``openai`` client.

The same requests through a router with ``native_relay: false`` (every event in Python, the
reference) must give the client the same stream; a client that leaves mid-stream must end the
engine's request; an engine that breaks off after the first token must end the stream with an
error event, as the Python relay does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Iterator

import httpx
import openai
import pytest
from tests.router.conftest import MODEL, RawEngine, Sim, run_sims
from tests.security.conftest import EdgeFactory, EdgeRouter, edge

from kvstack.common.waits import wait_until
from kvstack.router.native_relay import available

__all__ = ["edge"]

pytestmark = pytest.mark.skipif(not available(), reason="the compiled relay is not built (router/native)")

PROMPT = [{"role": "user", "content": "Tell me about the relay that forwards these tokens."}]


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Sim]]:
    with run_sims(tmp_path_factory.mktemp("sims"), 1) as running:
        yield running


def forwarded(r: EdgeRouter, outcome: str) -> float:
    """How many streams ended on the native relay with ``outcome``."""
    value: float = r.ctx.metrics.native_streams.labels(outcome)._value.get()
    return value


def stream_events(url: str, max_tokens: int) -> list[dict[str, object]]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    events = client.chat.completions.create(
        model=MODEL,
        messages=PROMPT,  # type: ignore[arg-type]
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    return [e.model_dump() for e in events]


def text(events: list[dict[str, object]]) -> str:
    out = []
    for e in events:
        for choice in e["choices"]:  # type: ignore[attr-defined]
            out.append(choice["delta"].get("content") or "")
    return "".join(out)


@pytest.mark.parametrize("max_tokens", [1, 2, 64])
def test_a_simulators_stream_on_the_native_relay_is_whole(
    sims: list[Sim], edge: EdgeFactory, max_tokens: int
) -> None:
    """The simulator's streams (their event count varies run to run) arrive whole through both
    relays: the role first, every token, the finish, the usage, ``[DONE]``."""
    for flag in (True, False):
        r = edge(engines=[sims[0].url], native_relay=flag)
        before = forwarded(r, "end")
        events = stream_events(r.url, max_tokens)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"  # type: ignore[index]
        assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"  # type: ignore[index]
        assert events[-1]["usage"]["completion_tokens"] == max_tokens  # type: ignore[index]
        assert len({e["id"] for e in events}) == 1 and text(events) != ""
        # after the first token the rest went on the native thread, to its end (Python: never). A
        # one- or two-token answer may end before the transport has sent its head: then Python ends it
        if max_tokens > 2 or not flag:
            # counted before Python writes the [DONE] the thread held back, at which the client stops
            assert forwarded(r, "end") == before + (1 if flag else 0)


def chat_event(delta: dict[str, str], finish: str | None = None) -> bytes:
    """One SSE event of a streamed chat answer, as an engine writes it."""
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class LateEnd(RawEngine):
    """A short answer whose ``[DONE]`` comes a moment before the body's end, as from an engine that
    works on after its last event (the simulators under ``kvstack up`` store KV in Redis then). Its
    events come a read each (the thread forwards all after the first token) or, ``at_once``, all in
    one write (Python holds them all: the stream never goes to the thread). ``breaks``: then the
    connection breaks off instead of the body's end."""

    def __init__(self, at_once: bool, breaks: bool = False) -> None:
        super().__init__()
        self.breaks = breaks
        deltas = [{"role": "assistant", "content": ""}] + [{"content": f" t{i}"} for i in range(4)]
        events = [chat_event(d) for d in deltas] + [chat_event({}, "length"), b"data: [DONE]\n\n"]
        self.writes = [b"".join(events)] if at_once else events

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for data in self.writes:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.02)
        if self.breaks:
            writer.transport.abort()
        else:
            writer.write(b"0\r\n\r\n")


STREAMS = 40  # enough that the old race (the thread wrote [DONE] before Python's end) shows


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
@pytest.mark.parametrize("engine", ["simulator", "late_end", "late_end_at_once"])
def test_streams_the_client_closes_on_done_are_whole_answers(
    sims: list[Sim], edge: EdgeFactory, engine: str, native: bool
) -> None:
    """The openai SDK's iterator stops at ``[DONE]`` and closes the connection at once. The thread
    (or Python, before it hands over; or the Python relay, ``native_relay: false``) holds ``[DONE]``
    back and Python writes it with the stream's end, so the client can never close before the answer
    is complete: every stream is counted a 200, never the client's 499."""
    with contextlib.ExitStack() as stack:
        at_once = engine == "late_end_at_once"
        url = sims[0].url if engine == "simulator" else stack.enter_context(LateEnd(at_once)).url
        r = edge(engines=[url], native_relay=native)
        client = openai.OpenAI(base_url=f"{r.url}/v1", api_key="none", max_retries=0)
        route = "/v1/chat/completions"
        for _ in range(STREAMS):
            events = client.chat.completions.create(
                model=MODEL,
                messages=PROMPT,  # type: ignore[arg-type]
                max_tokens=16,
                stream=True,
            )
            assert text([e.model_dump() for e in events]) != ""  # read to [DONE], then closed

        def count(status: str) -> float:
            return r.metric("kvstack_router_route_requests_total", route=route, status=status)

        wait_until(lambda: count("200") + count("499") == STREAMS, "every stream to be counted", 20, 0.01)
        assert (count("200"), count("499")) == (STREAMS, 0)
        assert forwarded(r, "end") == (0 if at_once or not native else STREAMS)


class ScriptedStream(RawEngine):
    """Streams fixed bytes: a role chunk, then events of every size (one split across two writes
    and chunks, one of 200 KB), then ``ending``, a chunk each; :attr:`sent` is the body as the engine
    sent it."""

    def __init__(self, ending: list[bytes]) -> None:
        super().__init__()
        parts = [{"role": "assistant", "content": ""}] + [{"content": "x" * n} for n in (1, 7, 300, 4096)]
        parts += [{"content": f" t{i}"} for i in range(40)] + [{"content": "y" * 200_000}]
        self.events = [chat_event(d) for d in parts] + ending
        self.sent = b"".join(self.events)

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for i, event in enumerate(self.events):
            pieces = [event[:9], event[9:]] if i == 7 else [event]  # one event split across chunks
            for piece in pieces:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                await asyncio.sleep(0.002)
        writer.write(b"0\r\n\r\n")


ENDINGS = {
    "done": [b"data: [DONE]\n\n"],
    "done_crlf": [b"data: [DONE]\r\n\r\n"],
    "done_split": [b"data: [DO", b"NE]\n\n"],
    "after_done": [b"data: [DONE]\n\n", b'data: {"late": true}\n\n'],
    "no_done": [],
}


@pytest.mark.parametrize("ending", ENDINGS)
def test_the_native_relay_delivers_the_engines_bytes_exactly(edge: EdgeFactory, ending: str) -> None:
    """The same bytes as the Python relay, whether ``[DONE]`` ends the stream (held back by the
    thread, written by Python with the end) or not."""
    with ScriptedStream(ENDINGS[ending]) as engine:
        for flag in (True, False):
            r = edge(engines=[engine.url], native_relay=flag)
            body = {"model": MODEL, "messages": PROMPT, "max_tokens": 64, "stream": True}
            resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200
            assert resp.content == engine.sent
            assert forwarded(r, "end") == (1 if flag else 0)


def test_a_client_leaving_mid_stream_ends_the_engines_request(
    tmp_path_factory: pytest.TempPathFactory, edge: EdgeFactory
) -> None:
    with run_sims(tmp_path_factory.mktemp("slow"), 1, "--speed", "0.05") as slow:
        r = edge(engines=[slow[0].url], native_relay=True)
        body = {"model": MODEL, "messages": PROMPT, "max_tokens": 400, "stream": True}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", f"{r.url}/v1/chat/completions", json=body) as resp,
        ):
            assert resp.status_code == 200
            lines = resp.iter_lines()
            seen = 0
            for line in lines:
                if line.startswith("data: ") and '"content"' in line:
                    seen += 1
                if seen >= 3:
                    break  # the native thread is forwarding by now
        # the connection is closed: the router notices (its watcher or the thread's write) and the
        # engine's request is aborted, so the engine has nothing running
        wait_until(
            lambda: r.ctx.metrics.disconnects.labels(MODEL)._value.get() == 1, "the disconnect", 20, 0.05
        )
        engine = r.ctx.registry.all()[0]
        wait_until(lambda: engine.in_flight == 0, "the engine's request to end", 20, 0.05)

        def engine_idle() -> bool:
            metrics = httpx.get(f"{slow[0].url}/metrics").text
            running = [line for line in metrics.splitlines() if line.startswith("vllm:num_requests_running")]
            return bool(running) and all(float(line.rsplit(" ", 1)[1]) == 0 for line in running)

        wait_until(engine_idle, "the engine to stop generating", 20, 0.1)


class BreaksOffEngine(RawEngine):
    """Streams a role chunk and two tokens, then closes the connection mid-stream; with
    ``half_event``, after writing the first half of a third event."""

    def __init__(self, half_event: bool) -> None:
        super().__init__()
        self.half_event = half_event

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        for delta in ({"role": "assistant", "content": ""}, {"content": "one"}, {"content": " two"}):
            data = chat_event(delta)
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()
            await asyncio.sleep(0.05)
        if self.half_event:
            half = b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"con'
            writer.write(b"%x\r\n%s\r\n" % (len(half), half))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.transport.abort()  # no terminating chunk: the response broke off


@pytest.mark.parametrize("half_event", [False, True])
def test_an_engine_breaking_off_after_the_first_token_ends_the_stream_with_an_error_event(
    edge: EdgeFactory, half_event: bool
) -> None:
    """The error event starts on its own line: half an event is never passed on (SSEFramer's rule)."""
    with BreaksOffEngine(half_event) as engine:
        r = edge(engines=[engine.url], native_relay=True)
        body = {"model": MODEL, "messages": PROMPT, "max_tokens": 8, "stream": True}
        resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30)
        assert resp.status_code == 200
        events = [line[6:] for line in resp.text.splitlines() if line.startswith("data: ")]
        contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in events[:-1]]
        assert contents == ["", "one", " two"]
        assert json.loads(events[-1])["error"]["code"] == 502  # the Python relay's answer too
        assert forwarded(r, "read") == 1


@pytest.mark.parametrize("at_once", [False, True])
def test_an_engine_breaking_off_after_its_done_event_gives_the_python_relays_events(
    edge: EdgeFactory, at_once: bool
) -> None:
    """A ``[DONE]`` held back (by the thread, or by Python before it hands over) still goes out
    before the error event, where the Python relay sends it."""
    with LateEnd(at_once, breaks=True) as engine:
        seen = []
        for flag in (True, False):
            r = edge(engines=[engine.url], native_relay=flag)
            body = {"model": MODEL, "messages": PROMPT, "max_tokens": 8, "stream": True}
            resp = httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200
            events = [line for line in resp.text.splitlines() if line.startswith("data: ")]
            assert events[-2] == "data: [DONE]" and json.loads(events[-1][6:])["error"]["code"] == 502
            seen.append(events[:-1])  # the error's words differ: the native relay names the outcome
            assert forwarded(r, "read") == (1 if flag and not at_once else 0)
        assert seen[0] == seen[1]


class FloodEngine(RawEngine):
    """Streams a chat answer of 16 KB events as fast as it can, until the connection breaks."""

    async def post(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: asyncio.StreamWriter
    ) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        data = chat_event({"role": "assistant", "content": "x" * 16_000})
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await writer.drain()


class ServerErrors(logging.Handler):
    """The server's (uvicorn's) error records: its logger does not propagate to caplog's."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_client_that_stops_reading_is_let_go_as_the_clients_499(edge: EdgeFactory) -> None:
    """A client that reads the stream's head and then nothing: the relay's thread gives up on it
    after the idle timeout (``client_stalled``), and the server is told to close the connection. The
    request is the client's 499, counted as a disconnect, and the server logs no error (it used to
    see an app that left its response unfinished, and logged one per such client)."""
    errors = ServerErrors()
    server_log = logging.getLogger("uvicorn.error")
    server_log.addHandler(errors)
    try:
        with FloodEngine() as engine:
            r = edge(engines=[engine.url], native_relay=True, idle_timeout_s=0.5)
            body = json.dumps({"model": MODEL, "messages": PROMPT, "stream": True}).encode()
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            client.connect(("127.0.0.1", int(r.url.rsplit(":", 1)[1])))
            with client:
                client.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: r\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(body), body)
                )
                assert client.recv(1024).startswith(b"HTTP/1.1 200")  # then it reads no more
                wait_until(lambda: forwarded(r, "client_stalled") == 1, "the thread to give up", 30, 0.05)
                disconnects = r.ctx.metrics.disconnects.labels(MODEL)
                wait_until(
                    lambda: disconnects._value.get() == 1, "the request to end as the client's", 10, 0.05
                )
        assert errors.messages == []
    finally:
        server_log.removeHandler(errors)

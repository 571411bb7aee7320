"""Token buckets, per-key limits, the admission queue, API keys, and the edge's
pure decisions: forwarded headers, Retry-After, 404 versus 503, the body budget, SSE framing."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvstack.common.config import ConfigError
from kvstack.common.errors import OpenAIError
from kvstack.router.admission import no_engine
from kvstack.router.auth import ANONYMOUS, KeyStore, read_keys_file
from kvstack.router.config import load_settings
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.exchange import RetryLater
from kvstack.router.headers import answer_headers, scan_headers, upstream_headers
from kvstack.router.limits import BodyBudget, KeyLimiter, TokenBucket
from kvstack.router.protocol import SSEFramer
from kvstack.router.upstream import UpstreamError


@pytest.mark.parametrize(
    ("rate", "burst", "times", "granted"),
    [
        (1.0, 2.0, [0.0, 0.0, 0.0], [True, True, False]),
        (1.0, 2.0, [0.0, 0.0, 0.0, 1.0], [True, True, False, True]),
        (10.0, 1.0, [0.0, 0.05, 0.1, 0.2], [True, False, True, True]),
        (
            2.0,
            3.0,
            [0.0, 0.0, 0.0, 0.0, 10.0, 10.0, 10.0, 10.0],
            [True, True, True, False, True, True, True, False],
        ),
    ],
)
def test_token_bucket(rate: float, burst: float, times: list[float], granted: list[bool]) -> None:
    bucket = TokenBucket(rate, burst)
    assert [bucket.take(t) == 0.0 for t in times] == granted


def test_token_bucket_says_when_to_come_back() -> None:
    bucket = TokenBucket(rate=4.0, burst=1.0)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.25)


def test_key_limiter_rate_is_per_key() -> None:
    limiter = KeyLimiter(rate=1.0, burst=1.0, max_concurrency=None)
    assert limiter.admit("a", 0.0) is None
    assert limiter.admit("b", 0.0) is None
    refused = limiter.admit("a", 0.1)
    assert refused is not None and refused[0] == "rate_limit" and refused[1] == pytest.approx(0.9)


def test_key_limiter_concurrency_cap_and_release() -> None:
    limiter = KeyLimiter(rate=None, burst=None, max_concurrency=2)
    assert limiter.admit("a", 0.0) is None
    assert limiter.admit("a", 0.0) is None
    assert limiter.admit("a", 0.0) == ("key_concurrency", 1.0)
    limiter.release("a")
    assert limiter.admit("a", 0.0) is None


def test_key_limiter_off() -> None:
    assert not KeyLimiter(rate=None, burst=None, max_concurrency=None).enabled


def test_keystore_identifies_keys_by_name_only() -> None:
    store = KeyStore([("team-a", "sk-aaa"), (None, "sk-bbb")])
    assert store.identify(b"Bearer sk-aaa") == "team-a"
    assert store.identify(b"bearer sk-bbb") == "key-2"
    for bad in (None, b"", b"sk-aaa", b"Bearer ", b"Bearer sk-aa", b"Basic sk-aaa", b"Bearer sk-aaab"):
        assert store.identify(bad) is None


def test_keystore_off_admits_everyone_anonymously() -> None:
    store = KeyStore([])
    assert not store.enabled
    assert store.identify(None) == ANONYMOUS


def test_keys_file(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# comment\nteam-a sk-1\n\nsk-2  # trailing comment\n")
    assert read_keys_file(path) == [("team-a", "sk-1"), (None, "sk-2")]
    path.write_text("a b c\n")
    with pytest.raises(ConfigError, match=":1"):
        read_keys_file(path)


# ---------------------------------------------------------------------- the edge's pure decisions


@pytest.mark.parametrize(
    ("client", "client_host", "expected"),
    [
        ([(b"x-a", b"1")], "10.0.0.1", [(b"x-a", b"1"), (b"x-forwarded-for", b"10.0.0.1")]),
        ([(b"cookie", b"s=1"), (b"x-a", b"1")], None, [(b"x-a", b"1")]),
        ([(b"connection", b"x-hop, Keep-Alive"), (b"x-hop", b"1"), (b"x-a", b"1")], None, [(b"x-a", b"1")]),
        (
            [(b"x-forwarded-for", b"1.2.3.4"), (b"x-forwarded-for", b" 5.6.7.8 ")],
            "10.0.0.1",
            [(b"x-forwarded-for", b"1.2.3.4, 5.6.7.8, 10.0.0.1")],
        ),
        ([(b"host", b"h"), (b"authorization", b"Bearer c"), (b"x-request-id", b"theirs")], None, []),
    ],
)
def test_upstream_headers(
    client: list[tuple[bytes, bytes]], client_host: str | None, expected: list[tuple[bytes, bytes]]
) -> None:
    out = upstream_headers(client, "rid", None, False, client_host)
    assert out == [*expected, (b"x-request-id", b"rid")]


def test_upstream_headers_engine_key_replaces_the_clients() -> None:
    client = [(b"authorization", b"Bearer client")]
    assert upstream_headers(client, "r", b"engine", False)[-1] == (b"authorization", b"Bearer engine")
    assert upstream_headers(client, "r", None, True)[-1] == (b"authorization", b"Bearer client")


@pytest.mark.parametrize(
    ("headers", "outcome"),
    [
        ([(b"authorization", b"Bearer a"), (b"content-length", b"5")], (b"Bearer a", 5, None)),
        ([(b"x-session-id", b"s")], (None, None, b"s")),
        ([(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")], "more than one Authorization"),
        ([(b"content-length", b"5x")], "invalid Content-Length"),
    ],
)
def test_scan_headers(headers: list[tuple[bytes, bytes]], outcome: object) -> None:
    if isinstance(outcome, str):
        with pytest.raises(OpenAIError, match=outcome) as err:
            scan_headers(headers, b"x-session-id")
        assert err.value.status == 400
    else:
        assert scan_headers(headers, b"x-session-id") == outcome


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (200, "5", None),
        (429, "7", b"7"),
        (429, None, b"1"),
        (503, "Wed, 21 Oct 2026 07:28:00 GMT", b"Wed, 21 Oct 2026 07:28:00 GMT"),
        (503, "x" * 100, b"1"),  # not a plausible value: ours instead
        (503, "1\r\nx-injected: 1", b"1"),
    ],
)
def test_answer_headers_always_tell_429_and_503_when_to_come_back(
    status: int, retry_after: str | None, expected: bytes | None
) -> None:
    headers = dict(answer_headers(status, "application/json", retry_after))
    assert headers[b"content-type"] == b"application/json"
    assert headers.get(b"retry-after") == expected


def _engine(models: set[str]) -> EngineState:
    return EngineState(endpoint=Endpoint(url="http://e", name="e"), models=frozenset(models))


@pytest.mark.parametrize(
    ("model", "engines", "status"),
    [
        ("m", [], 404),  # no engine at all (an empty engines file): nothing serves it
        ("m", [_engine({"other"}), _engine(set())], 503),  # one engine's models not learnt yet
        ("m", [_engine({"other"})], 404),  # every engine known, none serves it
        ("m", [_engine({"m"})], 503),  # served, but no engine available now
        (None, [_engine({"m"})], 503),
    ],
)
def test_no_engine_is_404_only_when_certain(
    model: str | None, engines: list[EngineState], status: int
) -> None:
    err = no_engine(model, engines)
    assert err.status == status
    assert isinstance(err, RetryLater) == (status == 503)


def test_body_budget() -> None:
    budget = BodyBudget(10)
    assert budget.take(6) and not budget.take(5) and budget.held == 6
    budget.give(6)
    assert budget.take(10) and budget.held == 10
    assert BodyBudget(None).take(10**12)


@pytest.mark.parametrize(
    ("chunks", "frames"),
    [
        ([b"data: a\n\n"], [b"data: a\n\n"]),
        ([b"data: a\n", b"\ndata: b\n\n"], [b"", b"data: a\n\ndata: b\n\n"]),
        ([b"data: a", b"bc", b"d\n\nda"], [b"", b"", b"data: abcd\n\n"]),
    ],
)
def test_sse_framer_joins_split_frames(chunks: list[bytes], frames: list[bytes]) -> None:
    framer = SSEFramer(100)
    assert [framer.feed(c) for c in chunks] == frames


def test_sse_framer_refuses_an_event_over_its_cap() -> None:
    framer = SSEFramer(max_frame=10)
    assert framer.feed(b"data: 1234") == b""
    with pytest.raises(UpstreamError) as err:
        framer.feed(b"5")
    assert err.value.kind == "too_large"
    assert framer.flush() == b""


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"max_header_bytes": 10}, "max_header_bytes"),
        ({"max_header_count": 0}, "max_header_count"),
        ({"header_timeout_s": 0}, "header_timeout_s"),
        ({"client_idle_timeout_s": -1}, "client_idle_timeout_s"),
        ({"max_client_connections": 0}, "max_client_connections"),
        ({"max_response_bytes": 10}, "max_response_bytes"),
        ({"max_body_bytes": 64 << 20, "max_buffered_body_bytes": 32 << 20}, "max_buffered_body_bytes"),
        ({"port": 8000, "metrics_port": 8000}, "metrics_port"),
    ],
)
def test_edge_limits_are_validated_at_start(values: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        load_settings(**values)

"""Token buckets, per-key limits, the admission queue and API keys."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvstack.common.config import ConfigError
from kvstack.router.auth import ANONYMOUS, KeyStore, read_keys_file
from kvstack.router.limits import AdmissionQueue, KeyLimiter, QueueFull, QueueTimeout, TokenBucket


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


async def test_admission_queue_is_fifo_bounded_and_times_out() -> None:
    queue = AdmissionQueue(max_waiting=2)
    await queue.acquire(capacity=1, max_wait=1.0)
    order: list[str] = []

    async def waiter(name: str) -> None:
        await queue.acquire(capacity=1, max_wait=5.0)
        order.append(name)

    first = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    assert queue.waiting == 2
    with pytest.raises(QueueFull):
        await queue.acquire(capacity=1, max_wait=1.0)
    queue.release(capacity=1)
    await first
    assert order == ["first"] and queue.active == 1
    queue.release(capacity=1)
    await second
    assert order == ["first", "second"]
    with pytest.raises(QueueTimeout):
        await queue.acquire(capacity=1, max_wait=0.01)
    assert queue.waiting == 0


async def test_admission_queue_cancelled_waiter_leaves_no_trace() -> None:
    queue = AdmissionQueue(max_waiting=4)
    await queue.acquire(capacity=1, max_wait=1.0)
    task = asyncio.create_task(queue.acquire(capacity=1, max_wait=5.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert queue.waiting == 0
    queue.release(capacity=1)
    assert queue.active == 0


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

"""The flow benchmark client's retry rule (the openai SDK's): which answers, and how long to wait."""

from __future__ import annotations

import pytest

from kvstack.bench.flow_retry import retry_after_s, retry_wait_s, retryable


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        *[(status, True) for status in (429, 408, 409, 500, 503, 599)],
        *[(status, False) for status in (200, 400, 404, 422, 0, 600)],
    ],
)
def test_retryable(status: int, expected: bool) -> None:
    assert retryable(status) is expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("2", 2.0),
        (" 1.5 ", 1.5),
        ("0", 0.0),
        ("Wed, 21 Oct 2026 07:28:00 GMT", None),  # an HTTP date: not a delay the router sends
        ("", None),
        ("inf", None),
        ("nan", None),
    ],
)
def test_retry_after_header(header: str | None, expected: float | None) -> None:
    assert retry_after_s(header) == expected


@pytest.mark.parametrize(
    ("header", "header_ms", "expected"),
    [
        ("1", "250", 0.25),  # the exact wait first, as the SDK reads it
        ("2", None, 2.0),
        ("2", "soon", 2.0),  # not a number: the whole seconds then
        (None, "1500", 1.5),
        (None, "nan", None),
    ],
)
def test_retry_after_ms_comes_first(
    header: str | None, header_ms: str | None, expected: float | None
) -> None:
    assert retry_after_s(header, header_ms) == expected


@pytest.mark.parametrize(
    ("retry_after", "retries_done", "jitter", "expected"),
    [
        # the answer's Retry-After, when it is one to honour, whatever the retry and the draw
        (1.0, 0, 0.0, 1.0),
        (0.5, 1, 0.9, 0.5),
        (60.0, 0, 0.5, 60.0),
        # none, zero, negative or above 60 s: the backoff, 0.5 s doubled per retry done, at most 8 s
        (None, 0, 0.0, 0.5),
        (None, 1, 0.0, 1.0),
        (None, 2, 0.0, 2.0),
        (None, 4, 0.0, 8.0),
        (None, 10, 0.0, 8.0),
        (None, 10_000, 0.0, 8.0),
        (0.0, 0, 0.0, 0.5),
        (-3.0, 1, 0.0, 1.0),
        (61.0, 0, 0.0, 0.5),
        # the jitter shortens a backoff by up to a quarter
        (None, 0, 0.5, 0.4375),
        (None, 3, 0.999, 3.001),  # 4 s x (1 - 0.25 x 0.999)
    ],
)
def test_retry_wait(retry_after: float | None, retries_done: int, jitter: float, expected: float) -> None:
    assert retry_wait_s(retry_after, retries_done, jitter) == pytest.approx(expected)


@pytest.mark.parametrize(("retries_done", "jitter"), [(-1, 0.0), (0, 1.0), (0, -0.1)])
def test_retry_wait_rejects_bad_input(retries_done: int, jitter: float) -> None:
    with pytest.raises(ValueError, match=r"retries_done|jitter"):
        retry_wait_s(None, retries_done, jitter)

"""The one deadline loop: returns the first truthy value, or fails naming what it waited for."""

from __future__ import annotations

import itertools

import pytest

from kvstack.common.waits import wait_until, wait_until_async


def test_returns_the_first_truthy_value() -> None:
    values = iter([0, None, "", 7, 8])
    assert wait_until(lambda: next(values), "a number", timeout=5, interval=0) == 7


def test_fails_naming_what_and_the_last_value() -> None:
    counter = itertools.count()
    with pytest.raises(AssertionError, match=r"waiting for the moon \(last: 0\)"):
        wait_until(lambda: 0 * next(counter), "the moon", timeout=0.05, interval=0.01)


async def test_async_returns_the_first_truthy_value_and_fails_alike() -> None:
    values = iter([False, [], {"x": 1}])
    assert await wait_until_async(lambda: next(values), "a dict", timeout=5, interval=0) == {"x": 1}
    with pytest.raises(AssertionError, match=r"waiting for nothing \(last: False\)"):
        await wait_until_async(lambda: False, "nothing", timeout=0.05, interval=0.01)

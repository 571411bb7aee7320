"""The response-id map and the id readers of router/sticky.py: pure, no I/O."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvstack.common.config import ConfigError
from kvstack.router.config import load_settings
from kvstack.router.engines import Endpoint, EngineState
from kvstack.router.sticky import (
    ResponseOwners,
    StickyResponsesConfig,
    id_from_body,
    id_from_frames,
    prefer_owner,
    previous_owner,
)

RID = "resp_0a1b2c"


@pytest.mark.parametrize(
    ("body", "found"),
    [
        (b'{"id":"resp_0a1b2c","created_at":1,"object":"response"}', RID),
        (b'{ "id" : "resp_0a1b2c", "object": "response"}', RID),
        (b'{"created_at":1,"id":"resp_0a1b2c"}', None),  # not at the top: never searched for
        (b'{"id":"chatcmpl-1"}', None),
        (b'{"error":{"message":"x"}}', None),
        (b" " * 300 + b'{"id":"resp_0a1b2c"}', None),  # beyond the head read
        (b"", None),
    ],
)
def test_id_from_body(body: bytes, found: str | None) -> None:
    assert id_from_body(body) == found


CREATED = (
    b'event: response.created\ndata: {"type":"response.created","sequence_number":0,'
    b'"response":{"id":"resp_0a1b2c","created_at":1}}\n\n'
)


@pytest.mark.parametrize(
    ("frames", "found"),
    [
        (CREATED, RID),
        (CREATED + b'event: response.in_progress\ndata: {"response":{"id":"resp_other"}}\n\n', RID),
        (b'event: response.in_progress\ndata: {"response":{"id":"resp_0a1b2c"}}\n\n', None),
        (b'data: {"id":"chatcmpl-1","choices":[]}\n\n', None),
    ],
)
def test_id_from_frames(frames: bytes, found: str | None) -> None:
    assert id_from_frames(frames) == found


def test_owners_are_bounded_least_recently_used_first() -> None:
    owners = ResponseOwners(StickyResponsesConfig(max_entries=2, ttl_s=100))
    owners.remember("resp_a", "http://e0", 0.0)
    owners.remember("resp_b", "http://e1", 0.0)
    assert owners.owner("resp_a", 1.0) == "http://e0"  # now the most recent
    owners.remember("resp_c", "http://e1", 2.0)
    assert (owners.owner("resp_b", 3.0), owners.owner("resp_a", 3.0)) == (None, "http://e0")
    assert len(owners) == 2


def test_owners_forget_after_the_ttl() -> None:
    owners = ResponseOwners(StickyResponsesConfig(max_entries=10, ttl_s=5))
    owners.remember("resp_a", "http://e0", 10.0)
    assert owners.owner("resp_a", 15.0) == "http://e0"
    assert owners.owner("resp_a", 15.1) is None
    assert len(owners) == 0


def test_no_room_remembers_nothing() -> None:
    owners = ResponseOwners(StickyResponsesConfig(max_entries=0))
    owners.remember("resp_a", "http://e0", 0.0)
    assert owners.owner("resp_a", 0.0) is None


def _engines(*urls: str) -> list[EngineState]:
    return [EngineState(endpoint=Endpoint(url=u, name=u)) for u in urls]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"previous_response_id": "resp_a"}, ["http://e1"]),  # the owner only
        ({"previous_response_id": "resp_gone"}, ["http://e0", "http://e1"]),  # unknown: all
        ({"previous_response_id": "resp_off"}, ["http://e0", "http://e1"]),  # owner not available
        ({"previous_response_id": 7}, ["http://e0", "http://e1"]),
        ({}, ["http://e0", "http://e1"]),
    ],
)
def test_previous_response_id_prefers_its_owner(body: dict[str, object], expected: list[str]) -> None:
    owners = ResponseOwners(StickyResponsesConfig())
    owners.remember("resp_a", "http://e1", 0.0)
    owners.remember("resp_off", "http://e9", 0.0)
    chosen = prefer_owner(previous_owner(owners, body, 1.0), _engines("http://e0", "http://e1"))
    assert [e.url for e in chosen] == expected


def test_a_bad_bound_names_the_field() -> None:
    with pytest.raises((ConfigError, ValidationError)) as err:
        load_settings(sticky_responses={"max_entries": -1})
    assert "sticky_responses.max_entries" in str(err.value)

"""The soak's real-size chat workload: prompts of real size whose histories grow, and its plan."""

from __future__ import annotations

import itertools

import pytest

from kvstack.bench.soak import SoakLoad, request_plan
from kvstack.bench.soak_chats import ChatWorkload, chat_messages
from kvstack.common import tokenizer

W = ChatWorkload()


def prompt_tokens(i: int) -> int:
    messages = [(m["role"], m["content"]) for m in chat_messages(i, W)]
    return len(tokenizer.apply_chat_template(messages))


@pytest.mark.parametrize("turn", range(W.turns))
def test_prompts_are_real_size_and_near_the_estimate(turn: int) -> None:
    n = prompt_tokens(turn * W.users + 7)
    assert 2900 <= n <= 5000
    assert abs(n - W.prompt_tokens(turn)) <= 0.1 * W.prompt_tokens(turn)  # TOKENS_PER_WORD holds


@pytest.mark.parametrize("user", [0, 1, W.groups, W.users - 1])
def test_a_users_history_grows_a_turn_per_request_then_restarts(user: int) -> None:
    turns = [chat_messages(user + t * W.users, W) for t in range(W.turns + 1)]
    for before, after in itertools.pairwise(turns[:-1]):  # the last one starts a new conversation
        assert after[: len(before) - 1] == before[:-1]  # the history is resent as it was
        assert after[len(before) - 1] == before[-1] and len(after) == len(before) + 2
    restarted = turns[-1]
    assert restarted[0] == turns[0][0] and restarted[1] != turns[0][1]  # same team, new document
    assert chat_messages(user + 1, W)[1] != turns[0][1]  # users do not share documents


def test_users_of_a_team_share_its_system_prompt_only() -> None:
    assert chat_messages(0, W)[0] == chat_messages(W.groups, W)[0]
    assert chat_messages(0, W)[0] != chat_messages(1, W)[0]


@pytest.mark.parametrize(
    ("i", "routed", "stream"),
    [(0, True, True), (1, True, False), (9, False, False), (19, False, False), (10, True, True)],
)
def test_plan_sends_chats_to_the_router_with_a_direct_share(i: int, routed: bool, stream: bool) -> None:
    load = SoakLoad("http://router", ("http://e0", "http://e1"), 60.0, 1.0, chats=W)
    url, body, is_routed = request_plan(i, load)
    assert (is_routed, body["stream"]) == (routed, stream)
    assert url == ("http://router" if routed else f"http://e{i % 2}")
    assert body["messages"] == chat_messages(i, W) and body["user"] == f"user-{i % W.users}"

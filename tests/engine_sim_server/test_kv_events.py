"""KV events of a real simulator over real ZMQ: PUB stream, contiguous sequence numbers, replay."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
import zmq
from tests.conftest import free_port
from tests.engine_sim_server.conftest import MODEL, Sim, run_sim

from kvstack.common.kv_events import (
    REPLAY_END,
    AllBlocksCleared,
    BlockStored,
    decode_batch,
    decode_seq,
    encode_seq,
)
from kvstack.engine.sim.cli import kv_events_flags

TOPIC = b"sim-kv"


@pytest.fixture(scope="module")
def ports() -> tuple[int, int]:
    return free_port(), free_port()


@pytest.fixture(scope="module")
def events_sim(ports: tuple[int, int]) -> Iterator[Sim]:
    pub, replay = ports
    with run_sim(
        "--speed", "50",
        "--max-model-len", "2048",
        "--num-gpu-blocks", "1000",
        *kv_events_flags(pub, replay),
        "--kv-events-topic", TOPIC.decode(),
    ) as s:  # fmt: skip
        yield s


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield c
    finally:
        c.destroy(linger=0)


def subscriber(ctx: zmq.Context[zmq.Socket[bytes]], port: int, topic: bytes = TOPIC) -> zmq.Socket[bytes]:
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 5000)
    sub.connect(f"tcp://127.0.0.1:{port}")
    sub.subscribe(topic)
    time.sleep(0.3)  # ZMQ's slow joiner: let the subscription reach the publisher
    return sub


def receive_until(sub: zmq.Socket[bytes], last_seq: int) -> list[tuple[int, bytes]]:
    got: list[tuple[int, bytes]] = []
    while not got or got[-1][0] < last_seq:
        topic, seq, payload = sub.recv_multipart()
        assert topic == TOPIC
        got.append((decode_seq(seq), payload))
    return got


def complete(sim: Sim, prompt: list[int]) -> None:
    r = httpx.post(
        f"{sim.base_url}/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3}, timeout=10
    )
    assert r.status_code == 200


def stored_tokens(payloads: list[bytes]) -> list[int]:
    out: list[int] = []
    for payload in payloads:
        for ev in decode_batch(payload).events:
            if isinstance(ev, BlockStored):
                out.extend(ev.token_ids)
    return out


def replay(ctx: zmq.Context[zmq.Socket[bytes]], port: int, start: int) -> list[tuple[int, bytes]]:
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send_multipart([b"", encode_seq(start)])
    out: list[tuple[int, bytes]] = []
    while True:
        empty, seq, payload = dealer.recv_multipart()
        assert empty == b""
        if seq == REPLAY_END:
            assert payload == b""
            dealer.close(0)
            return out
        out.append((decode_seq(seq), payload))


def test_events_sequence_and_replay_after_a_gap(
    events_sim: Sim, ports: tuple[int, int], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    pub_port, replay_port = ports
    early = subscriber(ctx, pub_port)
    prompts = [list(range(base, base + 48)) for base in (5000, 6000, 7000)]  # 3 full blocks each
    complete(events_sim, prompts[0])
    first = receive_until(early, 0)
    assert first[0][0] == 0  # sequence numbers start at 0
    assert stored_tokens([first[0][1]])[:48] == prompts[0]
    for prompt in prompts[1:]:
        complete(events_sim, prompt)
    time.sleep(0.2)
    # a late subscriber missed all of it; replay from 0 fills the gap
    late = subscriber(ctx, pub_port)
    recovered = replay(ctx, replay_port, 0)
    last = recovered[-1][0]
    seen = first + (receive_until(early, last) if first[-1][0] < last else [])
    assert [s for s, _ in seen] == list(range(last + 1))  # contiguous
    assert [s for s, _ in recovered] == list(range(last + 1))
    assert [p for _, p in recovered] == [p for _, p in seen]
    stored = stored_tokens([p for _, p in recovered])
    for prompt in prompts:
        assert prompt == stored[stored.index(prompt[0]) : stored.index(prompt[0]) + 48]
    # replay from the middle, and past the end
    assert [s for s, _ in replay(ctx, replay_port, last)] == [last]
    assert replay(ctx, replay_port, last + 100) == []
    # both subscribers now get the next batch live: a reset clears every block
    assert httpx.post(f"{events_sim.url}/reset_prefix_cache").status_code == 200
    for sub in (early, late):
        seq, payload = receive_until(sub, last + 1)[-1]
        assert seq == last + 1
        assert any(isinstance(ev, AllBlocksCleared) for ev in decode_batch(payload).events)


def test_cache_salt_goes_into_the_first_blocks_extra_keys(
    events_sim: Sim, ports: tuple[int, int], ctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    sub = subscriber(ctx, ports[0])
    prompt = list(range(8000, 8048))  # 3 full blocks
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 1, "cache_salt": "tenant-a"}
    assert httpx.post(f"{events_sim.base_url}/completions", json=body, timeout=10).status_code == 200
    while True:
        _, _, payload = sub.recv_multipart()
        stored = [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
        if stored:
            break
    assert stored[0].token_ids == prompt
    assert stored[0].parent_block_hash is None
    assert stored[0].lora_name is None
    assert stored[0].extra_keys == [["tenant-a"], None, None]


def test_lmcache_cpu_chunks_on_the_stream(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = free_port()
    with run_sim(
        "--speed", "50",
        "--max-model-len", "2048",
        "--num-gpu-blocks", "1000",
        "--lmcache", "--lmcache-chunk-size", "64", "--lmcache-kv-events",
        "--kv-events-endpoint", f"tcp://127.0.0.1:{pub}",
    ) as s:  # fmt: skip
        sub = subscriber(ctx, pub, b"kv-events")  # the default topic
        prompt = list(range(9000, 9130))  # two full chunks of 64 and a partial one
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 1}
        assert httpx.post(f"{s.base_url}/completions", json=body, timeout=10).status_code == 200
        cpu: list[BlockStored] = []
        while len(cpu) < 2:
            _, _, payload = sub.recv_multipart()
            events = decode_batch(payload).events
            cpu += [e for e in events if isinstance(e, BlockStored) and e.medium == "cpu"]
            if cpu:  # LMCache's chunks travel in the batch of the step that computed them
                assert any(isinstance(e, BlockStored) and e.medium == "GPU" for e in events)
        assert [e.token_ids for e in cpu] == [prompt[:64], prompt[64:128]]
        assert [e.block_size for e in cpu] == [64, 64]
        assert cpu[0].parent_block_hash is None
        assert cpu[1].parent_block_hash == cpu[0].block_hashes[0]
        assert all(len(e.block_hashes) == 1 and e.extra_keys is None and e.lora_name is None for e in cpu)


def test_bad_kv_events_endpoint_fails_at_start() -> None:
    with pytest.raises(RuntimeError, match="exited"), run_sim("--kv-events-endpoint", "tcp://256.0.0.1:1"):
        pass

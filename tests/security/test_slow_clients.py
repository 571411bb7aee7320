"""Slow clients: a client that trickles or stalls its request body cannot hold the router's resources.

The key's concurrency slot (taken before the body is read) is the resource a client can observe: a
slow-loris client holding it forever would lock every other client of that key out with 429s.
"""

from __future__ import annotations

import socket
import threading
import time

import httpx
from tests.router.conftest import MODEL, RouterFactory, Sim

from kvstack.common.waits import wait_until

KEY = "sk-slow-client-test"


def _stalled_upload(port: int, trickle: float, results: list[bytes]) -> None:
    """Declare 200 bytes, send 20 (one every ``trickle`` s after the first 10), then go silent."""
    head = (
        b"POST /v1/completions HTTP/1.1\r\nhost: r\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %s\r\ncontent-length: 200\r\n\r\n" % KEY.encode()
    )
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + b'{"model": ')
        for byte in b'"m", "pro':
            time.sleep(trickle)
            s.sendall(bytes([byte]))
        try:
            results.append(s.recv(65536))  # the router's answer, or b"" when it just closes
        except OSError as err:
            results.append(repr(err).encode())


def test_a_stalled_upload_is_cut_off_and_frees_its_key_slot(sims: list[Sim], router: RouterFactory) -> None:
    """The stalled client gets a 408 within the body timeout; its key can send requests again."""
    r = router(engines=[sims[0].url], api_keys=[KEY], max_concurrency_per_key=1, body_timeout_s=1.0)
    results: list[bytes] = []
    slow = threading.Thread(target=_stalled_upload, args=(r.port, 0.05, results))
    slow.start()
    # its declared 200 bytes are taken from the body budget once it holds the key's slot
    wait_until(lambda: r.ctx.bodies.held == 200, "the slow upload to start", timeout=15, interval=0.02)
    headers = {"authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    # while the upload is in progress it holds the key's only slot
    assert httpx.post(f"{r.url}/v1/completions", json=body, headers=headers).status_code == 429
    slow.join(15)
    assert not slow.is_alive(), "the router never cut the stalled client off"
    assert results and results[0].startswith(b"HTTP/1.1 408"), results
    assert httpx.post(f"{r.url}/v1/completions", json=body, headers=headers).status_code == 200

"""API keys: accepted only whole, and never written anywhere an operator reads (logs, metrics, errors).

Per-key rate limits and concurrency caps are tested in tests/router (test_proxy_faults.py::
test_rate_limit_per_key, test_limits_auth.py); keys in the Helm chart in tests/helm (test_render.py::
test_generated_credentials_stay_inside_their_secret, test_existing_secrets_are_referenced_never_rendered).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import openai
import pytest
from tests.conftest import free_port
from tests.reliability.conftest import KVSTACK, router_process
from tests.router.conftest import MODEL, run_sims

from kvstack.common.procs import running
from kvstack.router.auth import KeyStore

CLIENT_KEYS = ["sk-client-secret-0a1b2c3d4e5f", "sk-client-secret-9z8y7x6w5v4u"]
ENGINE_KEY = "sk-engine-secret-q1w2e3r4t5y6"
WRONG_KEY = "sk-wrong-secret-m1n2b3v4c5x6"
SECRETS = [*CLIENT_KEYS, ENGINE_KEY, WRONG_KEY]


@pytest.mark.parametrize(
    ("authorization", "accepted"),
    [
        (b"Bearer sk-long-key", "key-1"),
        (b"bearer sk-long-key", "key-1"),  # the scheme is case-insensitive, as in RFC 7235
        (b"Bearer sk-short", "key-2"),
        (b"Bearer sk-long-ke", None),  # a prefix of a key
        (b"Bearer sk-long-key0", None),  # a key plus more
        (b"Bearer sk-shor", None),
        (b"Bearer SK-LONG-KEY", None),  # the key itself is case-sensitive
        (b"Basic sk-long-key", None),
        (b"sk-long-key", None),
        (b"Bearer ", None),
        (b"Bearer", None),
        (b"", None),
        (None, None),
    ],
)
def test_only_a_whole_key_is_accepted(authorization: bytes | None, accepted: str | None) -> None:
    """Keys are compared as fixed-length digests with hmac.compare_digest over every key (no early
    exit, router/auth.py), so neither a prefix nor the key's length can be probed."""
    keys = KeyStore([(None, "sk-long-key"), (None, "sk-short")])
    assert keys.identify(authorization) == accepted


@pytest.mark.slow
def test_keys_never_reach_the_routers_logs_or_metrics(tmp_path: Path) -> None:
    """Serve good, wrong, streamed, refused and failed requests with debug logging and the access
    log on: the router's log names the key (``key-1``) but never holds a key's value, nor does
    /metrics or /router/engines."""
    with run_sims(tmp_path, 1, "--api-key", ENGINE_KEY) as (sim,):
        port = free_port()
        env = {
            "KVSTACK_ROUTER_API_KEYS": ",".join(CLIENT_KEYS),
            "KVSTACK_ROUTER_ENGINE_API_KEY": ENGINE_KEY,
            "KVSTACK_ROUTER_ACCESS_LOG": "true",
        }
        proc = router_process(tmp_path, port, [sim.url], "--log-level", "debug", env=env)
        url = f"http://127.0.0.1:{port}"
        with running([proc]):
            good = openai.OpenAI(base_url=f"{url}/v1", api_key=CLIENT_KEYS[0], max_retries=0, timeout=20)
            assert good.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "a"}], max_tokens=2
            )
            stream = good.completions.create(model=MODEL, prompt="b", max_tokens=4, stream=True)
            assert [c for c in stream]
            assert [m.id for m in good.models.list().data] == [MODEL]
            with pytest.raises(openai.NotFoundError):
                good.completions.create(model="no-such-model", prompt="c", max_tokens=1)
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key=WRONG_KEY, max_retries=0).models.list()
            for header in (f"Basic {CLIENT_KEYS[1]}", f"Bearer {WRONG_KEY}", CLIENT_KEYS[1]):
                resp = httpx.post(
                    f"{url}/v1/completions", json={"model": MODEL}, headers={"authorization": header}
                )
                assert resp.status_code == 401
            bad = httpx.post(
                f"{url}/v1/completions",
                content=b"{oops",
                headers={"authorization": f"Bearer {CLIENT_KEYS[1]}"},
            )
            assert bad.status_code == 400
            auth = {"authorization": f"Bearer {CLIENT_KEYS[0]}"}
            exposed = httpx.get(f"{url}/metrics").text + httpx.get(f"{url}/router/engines", headers=auth).text
        log = proc.log_path.read_text()
    assert '"key":"key-1"' in log and '"status":401' in log, "no access log: the test would prove nothing"
    for secret in SECRETS:
        assert secret not in log, f"{secret} in the router's log"
        assert secret not in exposed, f"{secret} in /metrics or /router/engines"


def test_a_bad_setting_beside_keys_names_the_setting_not_the_keys(tmp_path: Path) -> None:
    """A configuration error exits 2 naming the bad field; the keys set beside it are not echoed."""
    env = {"KVSTACK_ROUTER_API_KEYS": ",".join(CLIENT_KEYS), "KVSTACK_ROUTER_ENGINE_API_KEY": ENGINE_KEY}
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"team-a {CLIENT_KEYS[0]} {CLIENT_KEYS[1]}\n")  # three words: malformed
    for extra_env, args, field in (
        ({"KVSTACK_ROUTER_MAX_ATTEMPTS": "99"}, [], "max_attempts"),
        ({"KVSTACK_ROUTER_ENGINE_API_KEY": "{'a': 1}"}, ["--upstream-backend", "nope"], "upstream_backend"),
        ({}, ["--api-keys-file", str(keys_file)], "api_keys_file"),
    ):
        done = subprocess.run(
            [KVSTACK, "router", "--port", "0", *args],
            env={**env, **extra_env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        out = done.stdout + done.stderr
        assert done.returncode == 2, out
        assert field in out
        for secret in SECRETS:
            assert secret not in out, f"{secret} echoed in: {out}"

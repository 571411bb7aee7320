"""Loading credentials: which source wins, and how each kubeconfig field is read (files only, no server)."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstack.common.kube.credentials import (
    ExecPlugin,
    KubeConfigError,
    Pem,
    StaticToken,
    TokenFile,
    from_kubeconfig,
    load_credentials,
)


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def config(
    users: list[dict[str, Any]], contexts: list[dict[str, Any]], current: str | None = "a"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c1",
                "cluster": {"server": "https://10.0.0.1:6443/", "certificate-authority": "ca.crt"},
            },
            {"name": "c2", "cluster": {"server": "http://127.0.0.1:8080", "insecure-skip-tls-verify": True}},
        ],
        "users": users,
        "contexts": contexts,
        **({"current-context": current} if current else {}),
    }


USERS = [
    {"name": "tok", "user": {"token": "s3cret"}},
    {"name": "file", "user": {"tokenFile": "token.txt"}},
    {
        "name": "cert",
        "user": {"client-certificate": "/abs/tls.crt", "client-key-data": base64.b64encode(b"KEY").decode()},
    },
    {
        "name": "exec",
        "user": {"exec": {"command": "./plugin", "args": ["x"], "env": [{"name": "K", "value": "V"}]}},
    },
]
CONTEXTS = [
    {"name": "a", "context": {"cluster": "c1", "user": "tok", "namespace": "llm"}},
    {"name": "b", "context": {"cluster": "c2", "user": "file"}},
    {"name": "c", "context": {"cluster": "c1", "user": "cert"}},
    {"name": "d", "context": {"cluster": "c2", "user": "exec"}},
]


@pytest.mark.parametrize(
    ("context", "server", "namespace", "token"),
    [
        (None, "https://10.0.0.1:6443", "llm", StaticToken("s3cret")),  # current-context; trailing / dropped
        ("a", "https://10.0.0.1:6443", "llm", StaticToken("s3cret")),
        ("b", "http://127.0.0.1:8080", "default", "TokenFile"),
        ("c", "https://10.0.0.1:6443", "default", StaticToken(None)),
        ("d", "http://127.0.0.1:8080", "default", "ExecPlugin"),
    ],
)
def test_a_context_picks_its_cluster_user_and_namespace(
    tmp_path: Path, context: str | None, server: str, namespace: str, token: Any
) -> None:
    path = write(tmp_path / "kc", config(USERS, CONTEXTS))
    creds = from_kubeconfig([path], context)
    assert (creds.server, creds.namespace) == (server, namespace)
    if isinstance(token, str):
        assert type(creds.token).__name__ == token
    else:
        assert creds.token == token


def test_relative_paths_start_at_the_kubeconfig_and_data_fields_are_decoded(tmp_path: Path) -> None:
    path = write(tmp_path / "kc", config(USERS, CONTEXTS))
    c = from_kubeconfig([path], "c")
    assert c.ca == Pem(path=tmp_path / "ca.crt")
    assert c.client_cert == Pem(path=Path("/abs/tls.crt"))  # absolute stays absolute
    assert c.client_key == Pem(data=b"KEY")
    b = from_kubeconfig([path], "b")
    assert isinstance(b.token, TokenFile) and b.token.path == tmp_path / "token.txt"
    assert b.insecure
    d = from_kubeconfig([path], "d")
    assert isinstance(d.token, ExecPlugin)
    assert (d.token.command, d.token.args, dict(d.token.env), d.token.cwd) == (
        "./plugin",
        ("x",),
        {"K": "V"},
        tmp_path,
    )


def test_a_kubeconfig_list_merges_first_value_wins(tmp_path: Path) -> None:
    first = write(
        tmp_path / "one", {"users": [{"name": "tok", "user": {"token": "first"}}], "current-context": "b"}
    )
    second = write(
        tmp_path / "two", config([{"name": "tok", "user": {"token": "second"}}, *USERS[1:]], CONTEXTS)
    )
    env = {"KUBECONFIG": os.pathsep.join([str(first), str(tmp_path / "missing"), str(second)])}
    assert load_credentials(environ=env).server == "http://127.0.0.1:8080"  # current-context of the first
    assert load_credentials(context="a", environ=env).token == StaticToken("first")


@pytest.mark.parametrize(
    ("doc", "context", "named"),
    [
        (config(USERS, CONTEXTS), "nope", "no context named 'nope'"),
        (config(USERS, CONTEXTS, current=None), None, "no current-context"),
        (
            config(USERS, [{"name": "a", "context": {"cluster": "gone", "user": "tok"}}]),
            None,
            "no cluster named 'gone'",
        ),
        (
            config(USERS, [{"name": "a", "context": {"cluster": "c1", "user": "gone"}}]),
            None,
            "no user named 'gone'",
        ),
        (
            config([{"name": "tok", "user": {"auth-provider": {"name": "gcp"}}}], CONTEXTS),
            "a",
            "'auth-provider' is not",
        ),
        (
            config([{"name": "tok", "user": {"exec": {"args": []}}}], CONTEXTS),
            "a",
            "exec plugin without a command",
        ),
    ],
)
def test_bad_kubeconfigs_name_what_is_wrong(
    tmp_path: Path, doc: dict[str, Any], context: str | None, named: str
) -> None:
    path = write(tmp_path / "kc", doc)
    with pytest.raises(KubeConfigError, match=named) as err:
        from_kubeconfig([path], context)
    assert str(path) in str(err.value)


def test_in_cluster_needs_its_files_and_reads_the_namespace(tmp_path: Path) -> None:
    env = {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "6443"}
    with pytest.raises(KubeConfigError, match="no service-account token"):
        load_credentials(service_account_dir=tmp_path, environ=env)
    (tmp_path / "token").write_text("t\n")
    (tmp_path / "namespace").write_text("llm")
    creds = load_credentials(service_account_dir=tmp_path, environ=env)
    assert (creds.server, creds.namespace, creds.ca) == ("https://[fd00::1]:6443", "llm", None)
    # a kubeconfig named explicitly wins over the pod's own account
    kc = write(tmp_path / "kc", config(USERS, CONTEXTS))
    assert load_credentials(kc, service_account_dir=tmp_path, environ=env).server == "https://10.0.0.1:6443"


async def test_a_token_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("one\n")
    source = TokenFile(path)
    assert await source.token() == "one"
    replacement = tmp_path / "token.new"  # the kubelet's way: a new file renamed over the old
    replacement.write_text("two-rotated\n")
    replacement.replace(path)
    assert await source.token() == "two-rotated"

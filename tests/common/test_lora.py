"""The shared LoRA spec's validation, and the client's reading of vLLM 0.24's answers."""

from __future__ import annotations

import json
import socket

import pytest

from kvstack.common.config import ConfigError, build
from kvstack.common.lora import (
    Adapter,
    LoadedAdapter,
    LoraClient,
    LoraError,
    LoraSpec,
    adapters_in,
    check_adapters,
    error_for,
    source_kind,
)


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("kvstack/sql-lora", "hub"),
        ("org/name.v2", "hub"),
        ("/models/adapters/sql", "path"),
        ("https://example.com/adapters/sql.tar", "url"),
        ("http://minio:9000/a/b", "url"),
        ("sql-lora", None),  # neither a repo id nor a path
        ("models/adapters/sql", None),  # relative: three parts
        ("/models/../etc", None),
        ("ftp://host/x", None),
        ("../x/y", None),
    ],
)
def test_source_kinds(source: str, kind: str | None) -> None:
    assert source_kind(source) == kind


def _spec(**values: object) -> LoraSpec:
    return build(LoraSpec, "lora", **values)


def test_defaults_and_camel_case() -> None:
    spec = _spec(maxLoras=4, maxLoraRank=64, maxCpuLoras=8, adapters=[{"name": "sql", "source": "org/sql"}])
    assert (spec.max_loras, spec.max_lora_rank, spec.max_cpu_loras) == (4, 64, 8)
    assert spec.adapters == [Adapter(name="sql", source="org/sql")]
    assert spec.adapters[0].pinned is False
    assert spec.engine_args() == [
        "--enable-lora", "--max-loras", "4", "--max-lora-rank", "64", "--max-cpu-loras", "8",
    ]  # fmt: skip
    assert _spec().engine_args() == ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "16"]


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (
            {"adapters": [{"name": "a", "source": "o/a"}, {"name": "a", "source": "o/b"}]},
            "adapters[1].name: 'a' is declared twice",
        ),
        (
            {"maxLoraRank": 8, "adapters": [{"name": "a", "source": "o/a", "rank": 16}]},
            "16 is over maxLoraRank 8",
        ),
        ({"maxLoraRank": 24}, "maxLoraRank"),
        ({"maxLoras": 4, "maxCpuLoras": 2}, "maxCpuLoras (2) must be at least maxLoras (4)"),
        ({"maxLoras": 0}, "maxLoras"),
        ({"adapters": [{"name": "a", "source": "nowhere"}]}, "adapters.0.source: source must be"),
        ({"adapters": [{"name": "a b", "source": "o/a"}]}, "adapters.0.name"),
        ({"adapters": [{"name": "a", "source": "o/a", "weight": 1}]}, "adapters.0.weight"),
    ],
)
def test_invalid_specs_name_the_field(values: dict[str, object], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        _spec(**values)
    assert says in str(err.value)


def test_adapter_named_like_the_model_or_taken() -> None:
    spec = _spec(adapters=[{"name": "ok", "source": "o/a"}, {"name": "llama", "source": "o/b"}])
    with pytest.raises(ValueError, match=r"adapters\[1\].name: 'llama' is the model's own served name"):
        check_adapters(spec, ["llama"])
    with pytest.raises(ValueError, match="'ok' is already model 'other'"):
        check_adapters(spec, ["x"], {"ok": "model 'other'"})
    check_adapters(spec, ["x"], {"y": "model 'other'"})


def _vllm(status: int, message: str, type_: str) -> bytes:
    # vLLM 0.24's ErrorResponse, as create_error_response() builds it
    return json.dumps({"error": {"message": message, "type": type_, "param": None, "code": status}}).encode()


@pytest.mark.parametrize(
    ("op", "status", "body", "kind"),
    [
        ("load", 200, b"Success: LoRA adapter 'a' added successfully.", None),
        (
            "load",
            400,
            _vllm(
                400,
                "The lora adapter 'a' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                "InvalidUserInput",
            ),
            "already_loaded",
        ),
        (
            "load",
            400,
            _vllm(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"),
            "invalid",
        ),
        (
            "load",
            404,
            _vllm(404, "Loading lora a failed: No adapter found for /x", "NotFoundError"),
            "source_not_found",
        ),
        ("load", 404, b'{"detail":"Not Found"}', "disabled"),
        (
            "load",
            500,
            _vllm(500, "LoRA rank 64 is greater than max_lora_rank 16.", "InternalServerError"),
            "engine",
        ),
        ("load", 502, b"bad gateway", "engine"),
        ("load", 302, b"", "protocol"),
        ("unload", 200, b"Success: LoRA adapter 'a' removed successfully.", None),
        ("unload", 404, _vllm(404, "The lora adapter 'a' cannot be found.", "NotFoundError"), "not_loaded"),
        ("unload", 404, b'{"detail":"Not Found"}', "disabled"),
        (
            "unload",
            500,
            _vllm(500, "Failed to remove lora adapter 'a' from the engine.", "InternalServerError"),
            "engine",
        ),
        # an older vLLM's flat error shape is vLLM's too
        (
            "unload",
            404,
            b'{"object":"error","message":"cannot be found","type":"NotFoundError","code":404}',
            "not_loaded",
        ),
    ],
)
def test_error_mapping(op: str, status: int, body: bytes, kind: str | None) -> None:
    err = error_for(op, "a", status, body)  # type: ignore[arg-type]
    assert (err.kind if err else None) == kind
    if err is not None and kind not in ("disabled", "protocol"):
        assert (
            err.message == json.loads(body)["error"]["message"]
            if body.startswith(b'{"error"')
            else err.message
        )


def test_disabled_says_how_to_enable() -> None:
    err = error_for("load", "a", 404, b'{"detail":"Not Found"}')
    assert err is not None and "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in err.message


def test_models_list_adapters() -> None:
    body = {
        "object": "list",
        "data": [
            {"id": "llama", "object": "model", "root": "/models/llama", "parent": None},
            {"id": "sql", "object": "model", "root": "/models/adapters/sql", "parent": "llama"},
        ],
    }
    assert adapters_in(body) == (LoadedAdapter("sql", "llama", "/models/adapters/sql"),)
    with pytest.raises(LoraError) as err:
        adapters_in({"data": [{"object": "model"}]})
    assert err.value.kind == "protocol"


async def test_unreachable_engine() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = LoraClient(timeout=5)
    try:
        with pytest.raises(LoraError) as err:
            await client.load(f"http://127.0.0.1:{port}", "a", "org/a")
        assert err.value.kind == "unreachable"
        with pytest.raises(LoraError):
            await client.loaded(f"http://127.0.0.1:{port}")
    finally:
        await client.aclose()

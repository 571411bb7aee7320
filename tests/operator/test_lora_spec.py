"""LoRA in the KVStack resource: the spec's checks, the CRD's rules, the engine and router configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from kvstack.common.config import ConfigError
from kvstack.engine.serve.config import load_config
from kvstack.engine.serve.render import render
from kvstack.operator import crd
from kvstack.operator.ownership import Owner
from kvstack.operator.resources import desired_objects, router_settings
from kvstack.operator.spec import parse_spec

OWNER = Owner(name="demo", namespace="serving", uid="1234-5678")
LORA = {
    "maxLoras": 2,
    "maxLoraRank": 32,
    "adapters": [
        {"name": "sql", "source": "org/sql-lora", "pinned": True},
        {"name": "chat", "source": "/models/adapters/chat", "rank": 16},
    ],
}


def spec(lora: dict[str, Any] | None = LORA, **model: Any) -> dict[str, Any]:
    entry = {"name": "llama", "model": "meta/llama", **model}
    if lora is not None:
        entry["lora"] = lora
    return {"models": [entry]}


def test_lora_section_parses_with_defaults() -> None:
    parsed = parse_spec(spec())
    lora = parsed.models[0].lora
    assert lora is not None
    assert (lora.max_loras, lora.max_lora_rank, lora.max_cpu_loras) == (2, 32, None)
    assert [(a.name, a.source, a.pinned, a.rank) for a in lora.adapters] == [
        ("sql", "org/sql-lora", True, None),
        ("chat", "/models/adapters/chat", False, 16),
    ]
    assert parse_spec(spec(None)).models[0].lora is None


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (
            spec({"adapters": [{"name": "a", "source": "o/a"}, {"name": "a", "source": "o/b"}]}),
            "declared twice",
        ),
        (
            spec({"maxLoraRank": 8, "adapters": [{"name": "a", "source": "o/a", "rank": 64}]}),
            "over maxLoraRank 8",
        ),
        (spec({"maxLoras": 4, "maxCpuLoras": 1}), "maxCpuLoras (1) must be at least maxLoras (4)"),
        (spec({"adapters": [{"name": "meta/llama", "source": "o/a"}]}), "models.0.lora.adapters.0.name"),
        (
            spec({"adapters": [{"name": "chat", "source": "o/a"}]}, servedModelNames=["chat"]),
            "models[0].lora.adapters[0].name: 'chat' is the model's own served name",
        ),
        (
            spec({"adapters": [{"name": "a", "source": "somewhere"}]}),
            "source must be a Hugging Face Hub repo id",
        ),
    ],
)
def test_bad_lora_specs_name_the_field(raw: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_spec(raw, "KVStack serving/demo")
    assert says in str(err.value)


def test_an_adapter_may_not_take_another_models_or_adapters_name() -> None:
    two = {
        "models": [
            {"name": "a", "model": "org/a", "servedModelNames": ["base-a"], "lora": LORA},
            {"name": "b", "model": "org/b", "lora": {"adapters": [{"name": "sql", "source": "o/x"}]}},
        ]
    }
    with pytest.raises(ConfigError) as err:
        parse_spec(two)
    assert "models[1].lora.adapters[0].name: 'sql' is already an adapter of model 'a'" in str(err.value)
    two["models"][1]["lora"] = {"adapters": [{"name": "base-a", "source": "o/x"}]}
    with pytest.raises(ConfigError) as err:
        parse_spec(two)
    assert "'base-a' is already a name of model 'a'" in str(err.value)


def test_crd_carries_the_lora_rules() -> None:
    schema = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    model = schema["properties"]["spec"]["properties"]["models"]["items"]
    lora = model["properties"]["lora"]
    assert lora["properties"]["maxLoraRank"]["enum"] == [1, 8, 16, 32, 64, 128, 256, 320, 512]
    assert lora["properties"]["adapters"]["x-kubernetes-list-map-keys"] == ["name"]
    rules = [r["rule"] for r in lora["x-kubernetes-validations"]]
    assert any("maxCpuLoras >= self.maxLoras" in r for r in rules)
    assert any("a.rank <= self.maxLoraRank" in r for r in rules)
    status = schema["properties"]["status"]["properties"]["adapters"]
    assert set(status["items"]["properties"]) == {
        "name",
        "model",
        "desired",
        "loaded",
        "engines",
        "reason",
        "lastError",
    }


def test_engine_config_carries_the_limits_and_renders_lora(tmp_path: Path) -> None:
    objs = {(o["kind"], o["metadata"]["name"]): o for o in desired_objects(OWNER, parse_spec(spec()))}
    text = objs[("ConfigMap", "demo-llama")]["data"]["engine.yaml"]
    assert yaml.safe_load(text)["lora"] == {"max_loras": 2, "max_lora_rank": 32}
    path = tmp_path / "engine.yaml"
    path.write_text(text)
    launched = render(load_config(path))
    assert launched.argv[launched.argv.index("--enable-lora") :][:5] == [
        "--enable-lora", "--max-loras", "2", "--max-lora-rank", "32",
    ]  # fmt: skip
    assert launched.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


def test_no_lora_no_lora_anywhere() -> None:
    objs = desired_objects(OWNER, parse_spec(spec(None)))
    text = next(o for o in objs if o["kind"] == "ConfigMap" and "engine.yaml" in o.get("data", {}))
    assert "lora" not in yaml.safe_load(text["data"]["engine.yaml"])
    assert "adapters" not in router_settings(OWNER, parse_spec(spec(None)))


def test_router_config_lists_the_declared_adapters_under_their_model() -> None:
    settings = router_settings(OWNER, parse_spec(spec(servedModelNames=["llama-8b"])))
    assert settings["adapters"] == [
        {"name": "sql", "model": "llama-8b", "source": "org/sql-lora"},
        {"name": "chat", "model": "llama-8b", "source": "/models/adapters/chat"},
    ]

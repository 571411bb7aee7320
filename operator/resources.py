"""Pure builders of the objects a ``KVStack`` owns: engines per model, the router, the shared cache.

Every object is labelled and owned as :mod:`kvstack.operator.ownership` says, so deleting the stack
deletes them. The operator applies them with server-side apply, so building the same object twice
changes nothing.
"""

from __future__ import annotations

import hashlib
import json

import yaml

from kvstack.common.config import build
from kvstack.engine.serve.config import EngineConfig
from kvstack.operator.ownership import (
    Obj,
    Owner,
    cache_name,
    engine_name,
    labels,
    object_meta,
    router_name,
    selector_labels,
)
from kvstack.operator.spec import KVStackSpec, Model

HTTP_PORT, EVENTS_PORT, REPLAY_PORT, REDIS_PORT = 8000, 5557, 5558, 6379
CONFIG_DIR = "/etc/kvstack"


def _remote_url(owner: Owner, spec: KVStackSpec) -> str | None:
    cache = spec.cache
    if cache.mode == "internal":
        return f"redis://{cache_name(owner)}.{owner.namespace}.svc:{REDIS_PORT}"
    if cache.mode == "external":
        return cache.url  # None when it comes from a Secret (an env var then)
    return None


def engine_config(owner: Owner, spec: KVStackSpec, model: Model) -> EngineConfig:
    """The model's ``kvstack engine serve`` config; raises ConfigError naming a bad field."""
    lm = model.lmcache
    lmcache: Obj = {
        "enabled": lm.enabled,
        "chunk_size": lm.chunk_size,
        "local_cpu": lm.local_cpu,
        "max_local_cpu_size": lm.max_local_cpu_size_gb,
        "pin_timeout_sec": lm.pin_timeout_sec,
    }
    remote = _remote_url(owner, spec)
    if lm.enabled and lm.share_remote and remote:
        lmcache["remote_url"] = remote
    values: Obj = {
        "model": model.model,
        "served_model_name": model.served_names,
        "port": HTTP_PORT,
        "tensor_parallel_size": model.tensor_parallel_size or max(1, model.gpus),
        "gpu_memory_utilization": model.gpu_memory_utilization,
        "block_size": model.block_size,
        "kv_events": {
            "enabled": True,
            "endpoint": f"tcp://*:{EVENTS_PORT}",
            "replay_endpoint": f"tcp://*:{REPLAY_PORT}",
        },
        "lmcache": lmcache,
        "extra_args": model.args,
        "extra_env": model.vllm_env,
    }
    if model.max_model_len is not None:
        values["max_model_len"] = model.max_model_len
    if model.lora is not None:
        # the limits only: the engine starts without adapters, the operator loads them at runtime
        values["lora"] = model.lora.model_dump(include={"max_loras", "max_lora_rank", "max_cpu_loras"})
    return build(EngineConfig, f"engine config of model {model.name}", **values)


def engine_configmap(owner: Owner, spec: KVStackSpec, model: Model) -> Obj:
    config = engine_config(owner, spec, model)
    text = yaml.safe_dump(config.model_dump(mode="json", exclude={"api_key"}, exclude_none=True))
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(owner, engine_name(owner, model), "engine", model.name),
        "data": {"engine.yaml": text},
    }


def _checksum(obj: Obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _engine_env(spec: KVStackSpec, model: Model) -> list[Obj]:
    env: list[Obj] = [{"name": "PYTHONHASHSEED", "value": "0"}, {"name": "HOME", "value": "/cache"}]
    ref = spec.cache.url_secret_ref
    if spec.cache.mode == "external" and ref and model.lmcache.enabled and model.lmcache.share_remote:
        env.append(
            {
                "name": "KVSTACK_ENGINE_LMCACHE__REMOTE_URL",
                "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}},
            }
        )
    return [*env, *model.env]


def _resources(model: Model) -> Obj:
    resources = {k: dict(v) for k, v in model.resources.items() if isinstance(v, dict)}
    if model.gpus > 0:
        for part in ("requests", "limits"):
            resources.setdefault(part, {}).setdefault("nvidia.com/gpu", model.gpus)
    return resources


def engine_deployment(owner: Owner, spec: KVStackSpec, model: Model, configmap: Obj) -> Obj:
    """One model's engines. Autoscaled: no ``replicas`` (the autoscaler owns it via ``/scale``)."""
    name = engine_name(owner, model)
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5, "timeoutSeconds": 3}
    container: Obj = {
        "name": "engine",
        "image": model.image,
        "imagePullPolicy": model.image_pull_policy,
        "command": ["kvstack", "engine", "serve"],
        "args": ["--config", f"{CONFIG_DIR}/engine.yaml"],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "kv-events", "containerPort": EVENTS_PORT, "protocol": "TCP"},
            {"name": "kv-replay", "containerPort": REPLAY_PORT, "protocol": "TCP"},
        ],
        "env": _engine_env(spec, model),
        "resources": _resources(model),
        # Model loads take minutes (45-75 s for an 8B model on an H200, more when downloading).
        "startupProbe": {**probe, "periodSeconds": 10, "failureThreshold": 120},
        "readinessProbe": {**probe, "failureThreshold": 2},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 3},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "cache", "mountPath": "/cache"},
        ],
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 60,
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": name}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if model.node_selector:
        pod_spec["nodeSelector"] = dict(model.node_selector)
    if model.tolerations:
        pod_spec["tolerations"] = list(model.tolerations)
    deploy_spec: Obj = {
        "selector": {"matchLabels": selector_labels(owner, "engine", model.name)},
        "progressDeadlineSeconds": 1200,
        "template": {
            "metadata": {
                "labels": {**model.pod_labels, **labels(owner, "engine", model.name)},
                "annotations": {
                    **model.pod_annotations,
                    "checksum/config": _checksum(configmap["data"]),
                    "kvstack.dev/served-model-names": ",".join(model.served_names),
                },
            },
            "spec": pod_spec,
        },
    }
    if not spec.autoscaling.enabled:
        deploy_spec["replicas"] = model.replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(owner, name, "engine", model.name),
        "spec": deploy_spec,
    }


def engine_service(owner: Owner, model: Model) -> Obj:
    """Headless: one DNS record per engine pod, for monitors and debugging; the router watches pods."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(owner, engine_name(owner, model), "engine", model.name),
        "spec": {
            "clusterIP": "None",
            "selector": selector_labels(owner, "engine", model.name),
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": "http"},
                {"name": "kv-events", "port": EVENTS_PORT, "targetPort": "kv-events"},
                {"name": "kv-replay", "port": REPLAY_PORT, "targetPort": "kv-replay"},
            ],
        },
    }


def router_settings(owner: Owner, spec: KVStackSpec) -> Obj:
    """The router's config file: kvstack.router.config.RouterSettings keys."""
    config: Obj = {
        "host": "0.0.0.0",
        "port": spec.router.port,
        "policy": spec.router.policy,
        "discovery": "kubernetes",
        "kubernetes": {
            "namespace": owner.namespace,
            "label_selector": f"app.kubernetes.io/instance={owner.name},app.kubernetes.io/component=engine",
            "port_name": "http",
            "kv_events_port_name": "kv-events",
            "kv_replay_port_name": "kv-replay",
        },
        # Engine pods run real vLLM, whose tokenizer and chat template are the model's own: block
        # keys must come from the engines' /tokenize (the simulator serves it identically).
        "tokenizer": "engine",
        "flow_control": spec.router.flow_control.router_config(),
    }
    if spec.autoscaling.enabled and spec.autoscaling.scale_to_zero.enabled:
        # Requests for a model scaled to zero wait in the router (counted, which wakes the model)
        # instead of failing; the names are listed so a restarted router still knows them.
        config["hold_models"] = [n for m in spec.models if m.min_replicas == 0 for n in m.served_names]
    if adapters := router_adapters(spec):
        config["adapters"] = adapters
    if spec.cache.mode != "none" and any(m.lmcache.enabled and m.lmcache.share_remote for m in spec.models):
        # LMCache writes what an engine prefills through to the shared store: the router prices a
        # session sent to another engine as the load from there (router/kvindex/index.py)
        config["cache_aware"] = {"index": {"shared_store_from_gpu": True}}
    return {**config, **spec.router.extra_config}


def router_adapters(spec: KVStackSpec) -> list[Obj]:
    """The declared adapters as the router knows them: a name, its base model's name, its source."""
    return [
        {"name": a.name, "model": m.served_names[0], "source": a.source}
        for m in spec.models
        if m.lora is not None
        for a in m.lora.adapters
    ]


def router_objects(owner: Owner, spec: KVStackSpec) -> list[Obj]:
    """ServiceAccount, Role, RoleBinding, ConfigMap, Deployment and Service of the router."""
    name = router_name(owner)
    config_text = yaml.safe_dump(router_settings(owner, spec), sort_keys=True)
    r = spec.router
    container: Obj = {
        "name": "router",
        "image": r.image,
        "imagePullPolicy": r.image_pull_policy,
        "command": ["kvstack", "router"],
        "args": ["--config", f"{CONFIG_DIR}/router.yaml"],
        "ports": [{"name": "http", "containerPort": r.port, "protocol": "TCP"}],
        "resources": {k: dict(v) for k, v in r.resources.items() if isinstance(v, dict)},
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    meta = object_meta(owner, name, "router")
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "verbs": ["get", "list", "watch"],
                },
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": owner.namespace}],
        },
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"router.yaml": config_text}},
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": r.replicas,
                "selector": {"matchLabels": selector_labels(owner, "router")},
                "template": {
                    "metadata": {
                        "labels": labels(owner, "router"),
                        "annotations": {"checksum/config": _checksum({"router.yaml": config_text})},
                    },
                    "spec": {
                        "serviceAccountName": name,
                        "containers": [container],
                        "volumes": [{"name": "config", "configMap": {"name": name}}],
                    },
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "selector": selector_labels(owner, "router"),
                "ports": [{"name": "http", "port": r.port, "targetPort": "http"}],
            },
        },
    ]


def cache_objects(owner: Owner, spec: KVStackSpec) -> list[Obj]:
    """The internal Redis (LRU, no persistence): LMCache's shared tier."""
    name, c = cache_name(owner), spec.cache.internal
    container: Obj = {
        "name": "redis",
        "image": c.image,
        "args": ["--maxmemory", c.max_memory, "--maxmemory-policy", "allkeys-lru", "--save", ""],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "resources": {k: dict(v) for k, v in c.resources.items() if isinstance(v, dict)},
        "readinessProbe": {"tcpSocket": {"port": "redis"}, "periodSeconds": 5},
    }
    meta = object_meta(owner, name, "cache")
    return [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": meta,
            "spec": {
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"matchLabels": selector_labels(owner, "cache")},
                "template": {
                    "metadata": {"labels": labels(owner, "cache")},
                    "spec": {"automountServiceAccountToken": False, "containers": [container]},
                },
            },
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "selector": selector_labels(owner, "cache"),
                "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
            },
        },
    ]


def desired_objects(owner: Owner, spec: KVStackSpec) -> list[Obj]:
    """Everything the stack should own, in apply order. Raises ConfigError for a bad model."""
    out: list[Obj] = []
    if spec.cache.mode == "internal":
        out += cache_objects(owner, spec)
    for model in spec.models:
        configmap = engine_configmap(owner, spec, model)
        out += [configmap, engine_service(owner, model), engine_deployment(owner, spec, model, configmap)]
    if spec.router.enabled:
        out += router_objects(owner, spec)
    return out

"""``kvstack bench autoscale --cluster``: a load step against real (kwok) pods and the real operator.

One test cluster (:mod:`kvstack_testing`: kube-apiserver, controller-manager, scheduler, kwok with
fake GPU nodes, a ``kvstack engine sim`` behind every engine pod), then per variant, in a fresh
namespace: a real Prometheus scraping the simulators, the operator in-process (kopf's
``KopfRunner``) reconciling a KVStack, a real ``kvstack router`` finding the pods through the
Kubernetes API, and an open-loop client stepping its rate up and back down through the router.
A pod counts as Ready once Kubernetes says so *and* its simulator answers, and as serving once a
request routed to it succeeded. Writes ``cluster.json`` and ``cluster.png``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from kvstack.bench.autoscale_live import OpenLoopLoad, Recorder
from kvstack.bench.autoscale_plan import MODEL, Phases, PodShape, Sample, Variant, summarize, variants
from kvstack.bench.progress import BenchProgress
from kvstack.bench.report import save_figure
from kvstack.common.kube import resource_path
from kvstack.common.procs import ManagedProcess, free_port
from kvstack.common.waits import wait_until
from kvstack.observability.prometheus import prometheus_url
from kvstack_testing import (
    Cluster,
    PodSimulators,
    SimTarget,
    SimulatorTargets,
    file_sd_prometheus,
    operator_settings,
)
from kvstack_testing.pod_sims import Command, kvstack_executable, sim_command

Echo = Callable[[str], None]
ENGINE_SELECTOR = "app.kubernetes.io/component=engine"
STACK = "bench"


@dataclass(frozen=True)
class ClusterBench:
    scale: int = 5  # every autoscaling period divided by this, in both variants
    phases: Phases = field(default_factory=Phases)
    pod: PodShape = field(default_factory=PodShape)
    min_replicas: int = 1
    max_replicas: int = 8
    only: tuple[str, ...] = ()  # variant names to run (default: all)
    # An 8B model's vLLM start-up on the H200 took 45-75 s (tests/reference/README.md): a simulator starts
    # this long after its pod runs, shortened by the same scale as the periods.
    model_load_s: float = 60.0

    @property
    def load_delay_s(self) -> float:
        return self.model_load_s / self.scale

    def variants(self) -> list[Variant]:
        found = variants(self.scale, self.max_replicas)
        return [v for v in found if not self.only or v.name in self.only]


def install_crd(cluster: Cluster) -> None:
    from kvstack.operator.crd import CRD_FILE, GROUP, PLURAL

    applied = cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE), check=False)
    if applied.returncode != 0:
        raise RuntimeError(f"cannot apply the KVStack CRD: {applied.stderr}")
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")


@contextlib.contextmanager
def _kubeconfig_env(cluster: Cluster) -> Iterator[None]:
    # kopf's login reads $KUBECONFIG: point it at the bench's cluster only, and put it back after.
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


def _wait(predicate: Callable[[], Any], what: str, timeout: float) -> Any:
    def attempt() -> Any:
        with contextlib.suppress(Exception):  # not there yet (404, connection refused)
            return predicate()
        return None

    return wait_until(attempt, what, timeout=timeout)


def _loading(delay_s: float) -> Command:
    """The pod's simulator, started ``delay_s`` after the pod runs, as a model load delays vLLM."""

    def command(target: SimTarget) -> list[str]:
        return ["sh", "-c", f'sleep {delay_s:g} && exec "$@"', "sim", *sim_command(target)]

    return command


def _router(cluster: Cluster, namespace: str, workdir: Path) -> ManagedProcess:
    """A real router on loopback, discovering the engine pods through the Kubernetes API."""
    port = free_port()
    config = {
        "host": "127.0.0.1",
        "port": port,
        "discovery": "kubernetes",
        "kubernetes": {
            "namespace": namespace,
            "label_selector": f"app.kubernetes.io/instance={STACK},{ENGINE_SELECTOR}",
            "kubeconfig": str(cluster.kubeconfig),
            "context": cluster.context,
        },
        # least_loaded: prompts are all different, so the measure is the autoscaler, not routing
        "policy": "least_loaded",
        "tokenizer": "builtin",
        "expose_engine_header": True,
        "monitor": {"probe_interval": 1.0},
        # kwok marks a pod Ready at once, before its simulator answers (a kubelet would wait for the
        # readiness probe): a refused connection sends the request on to another pod and takes this
        # one out for a second, so an answering pod is never missed and a loading one costs a retry.
        "max_attempts": 10,
        "eject_after_failures": 1,
        "eject_duration_s": 1.0,
        "access_log": False,
        "log_level": "warning",
        # The engines' own queues are what both variants scale on (this Prometheus does not scrape
        # the router): the router's flow control would hold the queue itself instead.
        "flow_control": {"enabled": False},
    }
    path = workdir / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    argv = [kvstack_executable(), "router", "--config", str(path)]
    return ManagedProcess("router", argv, workdir, ready_url=f"http://127.0.0.1:{port}/ready")


def _stacks(namespace: str, name: str | None = None) -> str:
    from kvstack.operator.crd import GROUP, PLURAL, VERSION

    return resource_path(f"{GROUP}/{VERSION}", PLURAL, namespace, name)


def _condition(cluster: Cluster, namespace: str, type_: str) -> bool:
    body = cluster.kube().get(_stacks(namespace, STACK)) or {}
    conditions = body.get("status", {}).get("conditions", [])
    return any(c["type"] == type_ and c["status"] == "True" for c in conditions)


def _progress(name: str, s: Sample) -> str:
    waiting = "-" if s.waiting is None else f"{s.waiting:.0f}"
    return (
        f"[{name}] t={s.t:+6.0f}s rate {s.rate:.1f}/s  desired {s.desired}  ready {s.ready}  "
        f"serving {s.serving}  in flight {s.in_flight}  waiting {waiting}"
    )


def run_variant(
    cluster: Cluster,
    bench: ClusterBench,
    variant: Variant,
    echo: Echo,
    progress: Callable[[float], None] = lambda _s: None,
) -> dict[str, Any]:
    """One variant in its own namespace; every process it starts is stopped before it returns.
    ``progress`` is told the seconds of load sent so far."""
    from kopf.testing import KopfRunner

    from kvstack.bench.autoscale_plan import stack_spec
    from kvstack.operator.crd import GROUP, VERSION
    from kvstack.operator.handlers import build_registry
    from kvstack.operator.runtime import Runtime

    workdir = Path(tempfile.mkdtemp(prefix="kvstack-bench-autoscale-"))
    targets = workdir / "targets.json"
    prom = file_sd_prometheus(workdir / "prometheus", targets)
    prom_url = prometheus_url(prom)
    try:
        with cluster.temporary_namespace("bench-") as namespace, _kubeconfig_env(cluster):
            settings = operator_settings(cluster, namespace, resync_seconds=30, prometheus_url=prom_url)
            runtime = Runtime(settings)
            sims = PodSimulators(
                cluster.credentials(),
                ENGINE_SELECTOR,
                namespace=namespace,
                command=_loading(bench.load_delay_s),
                log_dir=workdir / "sims",
            )
            router = _router(cluster, namespace, workdir)
            args = ["run", "--standalone", "--namespace", namespace]
            prom.start()
            try:
                prom.wait_ready(60)
                with (
                    sims,
                    SimulatorTargets(sims, targets),
                    KopfRunner(args, registry=build_registry(runtime), timeout=30) as runner,
                ):
                    body = {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "KVStack",
                        "metadata": {"name": STACK},
                        "spec": stack_spec(variant, bench.pod, bench.min_replicas, bench.max_replicas),
                    }
                    cluster.kube().create(_stacks(namespace), body)
                    sims.wait_for(bench.min_replicas, timeout=120)
                    router.start().wait_ready(60)
                    router_url = (router.ready_url or "").removesuffix("/ready")
                    _wait(
                        lambda: MODEL in httpx.get(f"{router_url}/v1/models").text, "the router's model", 60
                    )
                    _wait(
                        lambda: _condition(cluster, namespace, "PrometheusReachable"),
                        "the operator's query",
                        60,
                    )
                    echo(f"[{variant.name}] stack up in {namespace}: {variant.description}")
                    result = _drive(cluster, namespace, bench, variant, router_url, prom_url, echo, progress)
                result["operator_exception"] = repr(runner.exception) if runner.exception else None
                return result
            finally:
                router.stop()
                prom.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _drive(
    cluster: Cluster,
    namespace: str,
    bench: ClusterBench,
    variant: Variant,
    router_url: str,
    prom_url: str,
    echo: Echo,
    progress: Callable[[float], None],
) -> dict[str, Any]:
    phases = bench.phases
    step_at = time.monotonic() + phases.warm_s
    load = OpenLoopLoad(router_url, phases, bench.pod, step_at)
    deployment = f"{STACK}-llm"
    with Recorder(cluster.kube(), namespace, deployment, load, prom_url) as recorder:
        load.start()
        try:
            next_line = -phases.warm_s
            while load.now() < phases.end_s:
                progress(load.now() + phases.warm_s)
                if recorder.samples and load.now() >= next_line:
                    echo(_progress(variant.name, recorder.samples[-1]))
                    next_line += 10.0
                time.sleep(0.25)
        finally:
            load.stop(grace_s=15.0)
    samples = recorder.final()
    summary = summarize(samples, load.requests, phases)
    echo(f"[{variant.name}] done: {summary}")
    per_pod: dict[str, int] = {}
    for r in load.requests:
        if r.ok:
            per_pod[r.engine] = per_pod.get(r.engine, 0) + 1
    return {
        "name": variant.name,
        "description": variant.description,
        "autoscaling": variant.autoscaling,
        "summary": summary,
        "errors_by_kind": load.errors,
        "unfinished_at_end": load.unfinished,
        "requests_per_pod": dict(sorted(per_pod.items())),
        "first_served_s": {k: round(v, 2) for k, v in sorted(load.served.items())},
        "timeline": {key: [getattr(s, key) for s in samples] for key in Sample.__dataclass_fields__},
    }


def run(cluster: Cluster, bench: ClusterBench, echo: Echo) -> dict[str, Any]:
    """Every variant on a started cluster; the report ``write`` saves."""
    install_crd(cluster)
    load_start = os.getloadavg()
    variants = bench.variants()
    per_variant = bench.phases.warm_s + bench.phases.end_s  # seconds of load, from -warm_s to end_s
    runs = []
    # Plain lines only: kopf's runner captures stderr while the operator runs, so no bar can draw.
    with BenchProgress(
        "bench autoscale --cluster", len(variants) * per_variant, "s of load", show_bar=False, say=echo
    ) as bar:
        for i, variant in enumerate(variants):

            def progress(seconds: float, offset: float = i * per_variant) -> None:
                bar.update(offset + seconds)

            runs.append(run_variant(cluster, bench, variant, echo, progress))
    return {
        "mode": "cluster",
        "what": (
            "kwok pods with a kvstack engine sim behind each, the real operator (in-process) on a real "
            "Prometheus, a real router; every autoscaling period divided by `scale` in both variants"
        ),
        "scale": bench.scale,
        "phases": asdict(bench.phases),
        "pod": {
            **asdict(bench.pod),
            "num_gpu_blocks": bench.pod.num_gpu_blocks,
            "sim_args": bench.pod.sim_args(),
        },
        "model_load_s": bench.model_load_s,
        "simulator_start_delay_s": bench.load_delay_s,
        "min_replicas": bench.min_replicas,
        "max_replicas": bench.max_replicas,
        "cpu_count": os.cpu_count(),
        "loadavg_start": list(load_start),
        "loadavg_end": list(os.getloadavg()),
        "runs": runs,
    }


def write(out: Path, report: dict[str, Any]) -> tuple[Path, Path]:
    """``cluster.json`` and ``cluster.png`` (replicas over time per variant, with the load)."""
    from kvstack.bench import report as output

    json_path, png_path = out / "cluster.json", out / "cluster.png"
    output.write_json(json_path, report)
    plot(report, png_path)
    return json_path, png_path


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    phases = report["phases"]
    fig, axes = plt.subplots(
        len(runs) + 1, 1, figsize=(12, 3.2 * (len(runs) + 1)), sharex=True, squeeze=False
    )
    for ax, run in zip(axes[:, 0], runs, strict=False):
        tl = run["timeline"]
        ax.step(tl["t"], tl["desired"], where="post", label="desired (spec.replicas)", linewidth=2)
        ax.step(tl["t"], tl["ready"], where="post", label="Ready and answering", linestyle="--")
        ax.step(tl["t"], tl["serving"], where="post", label="served a routed request", linestyle=":")
        ax.set_ylabel("pods")
        s = run["summary"]
        ax.set_title(
            f"{run['name']}: decision {s['decision_s']} s, Ready {s['ready_s']} s, "
            f"serving {s['serving_s']} s after the step; peak {s['peak_replicas']}",
            fontsize=9,
        )
        load = ax.twinx()
        load.plot(tl["t"], tl["rate"], color="gray", alpha=0.5, label="offered req/s")
        load.set_ylabel("req/s", color="gray")
        lines = ax.get_legend_handles_labels()[0] + load.get_legend_handles_labels()[0]
        labels = [str(h.get_label()) for h in lines]
        ax.legend(lines, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.07, 1.0))
    queue = axes[-1, 0]
    for run in runs:
        tl = run["timeline"]
        queue.plot(tl["t"], [w if w is not None else float("nan") for w in tl["waiting"]], label=run["name"])
    queue.set_ylabel("waiting requests (all pods)")
    queue.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.07, 1.0))
    queue.set_xlabel(f"seconds since the load step (step ends at {phases['step_s']:g} s)")
    for ax in axes[:, 0]:
        ax.axvline(0, color="black", linewidth=0.8)
        ax.axvline(phases["step_s"], color="black", linewidth=0.8)
    fig.suptitle(
        f"Autoscaling on a kwok cluster: load step {phases['base_rate']:g} -> {phases['step_rate']:g} req/s "
        f"(periods / {report['scale']})",
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)


def main_run(out: Path, bench: ClusterBench, echo: Echo) -> dict[str, Any]:
    """Start a test cluster, run every variant, write the results; the cluster always stops."""
    from kvstack_testing import ensure_cluster_tools

    echo("starting the test cluster (kwok) ...")
    with Cluster(tools=ensure_cluster_tools(echo=echo)) as cluster:
        echo(f"cluster up: Kubernetes {cluster.server_version()}, pod IPs in {cluster.pod_cidr}")
        report = run(cluster, bench, echo)
    write(out, report)
    return report

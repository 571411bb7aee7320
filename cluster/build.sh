#!/usr/bin/env bash
# Builds (once) every binary of the local test control plane into a cache keyed by version:
#   ~/.cache/kvstack/bin/<tool>-v<version>/<binary>
# Kubernetes and etcd come from the wrapper modules in cluster/k8s and cluster/etcd; Helm, kwok,
# kwokctl and kubeconform are `go install`ed; the OpenTelemetry Collector of the tracing tests is
# made by the Collector Builder from cluster/otelcol/manifest.yaml. A step whose binaries exist is
# skipped, so running this again costs nothing. Everything is fetched from the Go module proxy;
# nothing else is reached.
#
# Usage: cluster/build.sh [all|k8s|etcd|helm|kwok|kubeconform|prometheus|otelcol]...   (default: all)
# Env:   KVSTACK_CACHE (default ~/.cache/kvstack)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"

cache=${KVSTACK_CACHE:-$HOME/.cache/kvstack}
bin=$cache/bin
logs=$cache/logs
mkdir -p "$bin" "$logs"
log=$logs/build-$(date +%Y%m%d-%H%M%S).log
export CGO_ENABLED=0 GOFLAGS=-trimpath GOTOOLCHAIN=${GOTOOLCHAIN:-auto}
# The official tarball's place, for shells (make, IDEs) that did not add it to PATH.
command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "build.sh: 'go' is not on PATH (Go >= 1.24 needed)" >&2; exit 1; }

started=$SECONDS
say() { printf '[cluster-build %4ds] %s\n' "$((SECONDS - started))" "$*"; }

# have DIR NAME... : true when every named binary already exists in DIR.
have() {
    local dir=$1 name
    shift
    for name in "$@"; do [[ -x $dir/$name ]] || return 1; done
}

# run_step LABEL DIR BINARIES... -- COMMAND...: builds into DIR.tmp, then renames it to DIR, so an
# interrupted build never leaves a half-written binary where the harness would pick it up.
run_step() {
    local label=$1 dir=$2 names=() t0=$SECONDS
    shift 2
    while [[ $1 != -- ]]; do names+=("$1"); shift; done
    shift
    if have "$dir" "${names[@]}"; then
        say "$label: cached in $dir"
        return
    fi
    say "$label: building (log: $log)"
    local tmp=$dir.tmp.$$
    rm -rf "$tmp" && mkdir -p "$tmp"
    if ! OUT=$tmp "$@" >>"$log" 2>&1; then
        rm -rf "$tmp"
        say "$label: FAILED after $((SECONDS - t0))s; last lines of $log:"
        tail -n 20 "$log" >&2
        exit 1
    fi
    mkdir -p "$dir"
    for name in "${names[@]}"; do mv -f "$tmp/$name" "$dir/$name"; done
    rm -rf "$tmp"
    say "$label: done in $((SECONDS - t0))s"
}

build_k8s_cmds() {
    local minor=${K8S_VERSION#1.}
    minor=${minor%%.*}
    local pkg=k8s.io/component-base/version
    local flags="-s -w -X $pkg.gitVersion=v$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    flags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
    # kubectl reports its version through client-go's copy of the same variables.
    local cpkg=k8s.io/client-go/pkg/version
    flags+=" -X $cpkg.gitVersion=v$K8S_VERSION -X $cpkg.gitMajor=1 -X $cpkg.gitMinor=$minor"
    go -C "$here/k8s" build -ldflags "$flags" -o "$OUT/" \
        k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
        k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl
}

build_etcd() {
    local flags="-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=v$ETCD_VERSION"
    go -C "$here/etcd" build -ldflags "$flags" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
}

build_helm() {
    # Without these, `helm template` assumes Kubernetes v1.20 and helm reports a dev version.
    local flags="-s -w -X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION"
    flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1"
    flags+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$(cut -d. -f2 <<<"$K8S_VERSION")"
    GOBIN=$OUT go install -ldflags "$flags" "helm.sh/helm/v3/cmd/helm@v$HELM_VERSION"
}

# Prometheus 3.M.P is published as Go module version v0.3MM.P (3.15.0 -> v0.315.0).
prometheus_module_version() {
    local major minor patch
    IFS=. read -r major minor patch <<<"$PROMETHEUS_VERSION"
    echo "v0.$((major * 100 + minor)).$patch"
}

build_prometheus() {
    local pkg=github.com/prometheus/common/version
    local flags="-s -w -X $pkg.Version=$PROMETHEUS_VERSION -X $pkg.Branch=HEAD -X $pkg.Revision=$(prometheus_module_version)"
    go -C "$here/prometheus" build -tags "$PROMETHEUS_TAGS" -ldflags "$flags" -o "$OUT/prometheus" \
        github.com/prometheus/prometheus/cmd/prometheus
}

build_kwok() {
    GOBIN=$OUT go install -ldflags "-s -w" \
        "sigs.k8s.io/kwok/cmd/kwok@v$KWOK_VERSION" "sigs.k8s.io/kwok/cmd/kwokctl@v$KWOK_VERSION"
}

build_kubeconform() {
    GOBIN=$OUT go install -ldflags "-s -w" "github.com/yannh/kubeconform/cmd/kubeconform@v$KUBECONFORM_VERSION"
}

# The core collector distribution is not a published Go module, so the builder (itself one) writes a
# main package of just the manifest's components and compiles it. Builder and sources stay in OUT's
# scratch folders, which run_step removes; only the binary is kept.
build_otelcol() {
    GOBIN=$OUT/.builder go install "go.opentelemetry.io/collector/cmd/builder@v$OTELCOL_VERSION"
    mkdir -p "$OUT/.src"
    (cd "$OUT/.src" && "$OUT/.builder/builder" --config "$here/otelcol/manifest.yaml" --ldflags "-s -w")
    mv "$OUT/.src/dist/otelcol" "$OUT/otelcol"
}

check_modules() {
    grep -q "k8s.io/kubernetes v$K8S_VERSION\$" "$here/k8s/go.mod" &&
        grep -q "go.etcd.io/etcd/server/v3 v$ETCD_VERSION\$" "$here/etcd/go.mod" &&
        grep -q "github.com/prometheus/prometheus $(prometheus_module_version)\b" "$here/prometheus/go.mod" || {
        echo "build.sh: cluster/{k8s,etcd,prometheus} do not match versions.env; run cluster/gen-modules.sh" >&2
        exit 1
    }
    # Collector modules of other releases do not build together: every one is at OTELCOL_VERSION.
    if grep -E '^\s*- gomod:' "$here/otelcol/manifest.yaml" | grep -vq " v$OTELCOL_VERSION\$"; then
        echo "build.sh: a module of cluster/otelcol/manifest.yaml is not at OTELCOL_VERSION=$OTELCOL_VERSION" >&2
        exit 1
    fi
}

step() {
    case $1 in
    k8s) run_step "kubernetes v$K8S_VERSION" "$bin/kubernetes-v$K8S_VERSION" \
        kube-apiserver kube-controller-manager kube-scheduler kubectl -- build_k8s_cmds ;;
    etcd) run_step "etcd v$ETCD_VERSION" "$bin/etcd-v$ETCD_VERSION" etcd -- build_etcd ;;
    helm) run_step "helm v$HELM_VERSION" "$bin/helm-v$HELM_VERSION" helm -- build_helm ;;
    kwok) run_step "kwok v$KWOK_VERSION" "$bin/kwok-v$KWOK_VERSION" kwok kwokctl -- build_kwok ;;
    prometheus) run_step "prometheus v$PROMETHEUS_VERSION" "$bin/prometheus-v$PROMETHEUS_VERSION" prometheus -- \
        build_prometheus ;;
    kubeconform) run_step "kubeconform v$KUBECONFORM_VERSION" "$bin/kubeconform-v$KUBECONFORM_VERSION" \
        kubeconform -- build_kubeconform ;;
    otelcol) run_step "otelcol v$OTELCOL_VERSION" "$bin/otelcol-v$OTELCOL_VERSION" otelcol -- build_otelcol ;;
    all) for s in etcd kwok k8s prometheus kubeconform helm otelcol; do step "$s"; done ;;
    *) echo "build.sh: unknown step '$1' (all|k8s|etcd|helm|kwok|kubeconform|prometheus|otelcol)" >&2; exit 2 ;;
    esac
}

check_modules
# One build at a time per cache: a second caller (another test session) waits, then finds it cached.
exec 9>"$cache/build.lock"
if ! flock -n 9; then
    say "another build holds $cache/build.lock; waiting"
    flock 9
fi
say "go $(go env GOVERSION), cache $bin"
for s in "${@:-all}"; do step "$s"; done
say "all requested tools ready"

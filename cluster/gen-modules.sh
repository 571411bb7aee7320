#!/usr/bin/env bash
# Regenerates the wrapper Go modules (cluster/k8s, cluster/etcd) from cluster/versions.env.
#
# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and
# resolves them with replace directives that only apply inside its own repository. A wrapper main
# module must map every one of those v0.0.0 requirements to the published v0.<minor>.<patch> tag.
# The list changes between releases, so it is read from the release's own go.mod, never typed in.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
export GOFLAGS=-mod=mod GOTOOLCHAIN=${GOTOOLCHAIN:-auto}

# The wrapper asks for no newer Go than the module it wraps.
go_directive() { awk '$1 == "go" { print $2; exit }' "$1"; }

gen_k8s() {
    local dir=$here/k8s staging_version=v0.${K8S_VERSION#1.}
    local upstream_mod
    upstream_mod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    [[ -f $upstream_mod ]] || { echo "cannot read go.mod of k8s.io/kubernetes@v$K8S_VERSION" >&2; exit 1; }
    rm -f "$dir/go.mod" "$dir/go.sum"
    (cd "$dir" && go mod init kvstack.local/cluster/k8s >/dev/null 2>&1)
    # Exactly "k8s.io/<name> v0.0.0": pseudo-versions such as v0.0.0-2025... must stay untouched.
    awk -v v="$staging_version" '$1 ~ /^k8s\.io\// && $2 == "v0.0.0" { print "-replace=" $1 "=" $1 "@" v }' \
        "$upstream_mod" | sort -u | xargs go -C "$dir" mod edit
    go -C "$dir" mod edit -require="k8s.io/kubernetes@v$K8S_VERSION" -go="$(go_directive "$upstream_mod")"
    go -C "$dir" mod tidy
    echo "k8s wrapper: k8s.io/kubernetes v$K8S_VERSION, $(grep -c '=> k8s.io' "$dir/go.mod") staging replaces"
}

gen_etcd() {
    # etcd's server module replaces its sibling modules with ../ paths, so `go install` refuses it;
    # requiring it from a wrapper module resolves the siblings at the versions it pins.
    local dir=$here/etcd
    rm -f "$dir/go.mod" "$dir/go.sum"
    (cd "$dir" && go mod init kvstack.local/cluster/etcd >/dev/null 2>&1)
    local upstream_mod
    upstream_mod=$(go mod download -json "go.etcd.io/etcd/server/v3@v$ETCD_VERSION" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    go -C "$dir" mod edit -require="go.etcd.io/etcd/server/v3@v$ETCD_VERSION" -go="$(go_directive "$upstream_mod")"
    go -C "$dir" mod tidy
    echo "etcd wrapper: go.etcd.io/etcd/server/v3 v$ETCD_VERSION"
}

gen_prometheus() {
    # Debian's prometheus is built without Kubernetes service discovery. This one keeps only the
    # kubernetes SD plugin (static and file SD are always in): far fewer modules to build.
    # Prometheus 3.M.P is published as module version v0.3MM.P (3.15.0 -> v0.315.0).
    local dir=$here/prometheus module=github.com/prometheus/prometheus
    local major minor patch
    IFS=. read -r major minor patch <<<"$PROMETHEUS_VERSION"
    local version=v0.$((major * 100 + minor)).$patch upstream_mod
    upstream_mod=$(go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
    rm -f "$dir/go.mod" "$dir/go.sum"
    (cd "$dir" && go mod init kvstack.local/cluster/prometheus >/dev/null 2>&1)
    go -C "$dir" mod edit -go="$(go_directive "$upstream_mod")"
    # Its go.mod pins some modules with module-to-module replaces, which only a main module honours.
    awk '$1 == "replace" && $3 == "=>" && NF == 5 { print "-replace=" $2 "=" $4 "@" $5 }' "$upstream_mod" |
        xargs -r go -C "$dir" mod edit
    if grep -q '^replace ($' "$upstream_mod"; then
        echo "gen-modules.sh: $module $version has a replace block; extend gen_prometheus" >&2
        exit 1
    fi
    # `go get` with the build tags records only what this trimmed build needs (tidy would pull every SD).
    GOFLAGS="-mod=mod -tags=$PROMETHEUS_TAGS" go -C "$dir" get "$module/cmd/prometheus@$version"
    echo "prometheus wrapper: $module $version (tags $PROMETHEUS_TAGS)"
}

for what in "${@:-k8s etcd prometheus}"; do
    for w in $what; do "gen_$w"; done
done

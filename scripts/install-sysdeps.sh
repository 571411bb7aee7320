#!/usr/bin/env bash
# System programs the local stack and the tests run for real: redis-server (LMCache's shared tier in
# `kvstack up`), prometheus + promtool (`kvstack up --prometheus`, scraping and rule tests) and the
# Redis exporter (the Redis-down alert). Installs only what is missing, so a second run does nothing;
# never reads stdin (apt-get -y, sudo -n), so it runs in CI and under `make` alike.
set -euo pipefail
exec </dev/null

# program on PATH -> the Debian package that ships it
declare -A package=(
  [redis-server]=redis-server
  [prometheus]=prometheus
  [promtool]=prometheus
  [prometheus-redis-exporter]=prometheus-redis-exporter
)
need=()
for program in redis-server prometheus promtool prometheus-redis-exporter; do
  command -v "$program" >/dev/null && continue
  pkg=${package[$program]}
  [[ " ${need[*]-} " == *" $pkg "* ]] || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0

fail() {
  echo "install-sysdeps: $*" >&2
  exit 1
}
command -v apt-get >/dev/null ||
  fail "missing ${need[*]} and no apt-get here: install them with your package manager"
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || fail "missing ${need[*]}: run this script as root (no sudo here)"
  sudo -n true 2>/dev/null ||
    fail "missing ${need[*]}: sudo asks for a password; run 'sudo bash scripts/install-sysdeps.sh' once"
  sudo=(sudo -n)
fi
echo "install-sysdeps: installing Debian packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt_install() {
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
}
# A stale or empty package list makes install fail; refresh once and retry.
apt_install 2>/dev/null || {
  "${sudo[@]}" apt-get update -q >/dev/null
  apt_install
}
# Debian starts the packaged services; kvstack up and the tests start their own on free ports.
for svc in redis-server prometheus prometheus-redis-exporter; do
  "${sudo[@]}" service "$svc" stop >/dev/null 2>&1 || true
done
for program in redis-server prometheus promtool prometheus-redis-exporter; do
  command -v "$program" >/dev/null || fail "$program is still missing after installing ${need[*]}"
done

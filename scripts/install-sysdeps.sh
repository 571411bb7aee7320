#!/usr/bin/env bash
# Debian packages the tests and the local stack run for real: redis-server (LMCache's shared
# store), prometheus + promtool (scraping, rules) and the Redis exporter (the Redis-down alert).
# Installs only what is missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v prometheus-redis-exporter >/dev/null || need+=(prometheus-redis-exporter)
[ ${#need[@]} -eq 0 ] && exit 0
echo "installing Debian packages: ${need[*]}"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
# A stale or empty package list makes install fail; refresh once and retry.
$sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null 2>&1 || {
  $sudo apt-get update -q >/dev/null
  $sudo apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
}
# Debian starts the packaged services; the tests start their own on free ports.
for svc in redis-server prometheus prometheus-redis-exporter; do
  $sudo service "$svc" stop >/dev/null 2>&1 || true
done

#!/bin/bash
# On the GPU machine, once vLLM 0.24 + LMCache are installed in /tmp/site, redis-server unpacked under
# /tmp/redisroot and the model written to /tmp/model: Redis, two real engines started through
# `kvstack engine serve`, then the proof (`kvstack bench gpu`, src/kvstack/bench/gpu.py) with the router in front.
#   bash scripts/gpu/device.sh start            Redis + both engines (setsid: they outlive the call)
#   bash scripts/gpu/device.sh proof ARGS...    the proof over the running engines, results in $OUT
#   bash scripts/gpu/device.sh matrix ARGS...   issue #23's matrix (or a slice of it) in one call: plan +
#       estimate first, refused when estimated over MATRIX_BUDGET_S (default 560 s of the call's 600);
#       a fresh cache (reset + FLUSHALL) before every case; e.g. after `ENGINES=4 ... start` (~510 s):
#       matrix --engines-subset 2 --workload multi_round_qa --load 0.3 --load 0.9 --load 1.3
#              --runs 2 --policy cache_aware --policy sglang_cache_aware --policy sglang_round_robin
#              --duration-s 5 --label m-e2-mrqa
#       MATRIX_DRY_RUN=1 prints the plan and its estimate only (no engines needed)
#   bash scripts/gpu/device.sh calib ARGS...    the same traces on two simulators sized like the engines
#   bash scripts/gpu/device.sh logs             engine log tails into $OUT
#   ENGINES=4 GPU_UTIL=0.2 bash scripts/gpu/device.sh start    four engines (~97K tokens of KV each on an H200)
#   ENGINES=auto bash scripts/gpu/device.sh start              four on an H200, two at 0.45 on an H100
#   bash scripts/gpu/device.sh flow ARGS...     kvstack bench flow over the running engines, results in $OUT
#   SHARED_DEVICE=0 before proof, matrix or flow: the router is not told the engines share the GPU
#   bash scripts/gpu/device.sh restart          stop the engines and Redis, then start again: LMCache's CPU
#       buffer survives vLLM's prefix-cache reset (matrix and flow empty it per case through LMCache's
#       internal API since session 28; CLEAR_LMCACHE=0 keeps it, as before)
#   bash scripts/gpu/device.sh lmcache_full     each engine's LMCache CPU-buffer pressure: evictions, failed stores
#   SPY_S=N before proof, matrix or flow: py-spy (its wheel carried in .whl) samples the call's first
#       kvstack router for N s from SPY_DELAY_S (default 8) after it starts, Python threads only, idle
#       left out: raw stacks in $OUT/router-spy.txt (the relay's Rust threads are not sampled)
#   kvstack itself travels as a wheel: build it here with `pip wheel --no-deps -w .whl .` and carry
#   .whl; every call installs it afresh into /tmp/kvsite (the package maps folders, so no PYTHONPATH
#   to the checkout would import it).
set -u
export PYTHONPATH=/tmp/site:/tmp/kvsite VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
rm -rf /tmp/kvsite && python3 -m pip install -q --no-deps --no-index --target /tmp/kvsite .whl/kvstack-*.whl || exit 1
export PATH=/tmp/bin:$PATH
LOGS=/tmp/gpulogs
REDIS_PORT=6390
# LMCache CPU buffer per engine (GB): 5 filled within minutes on the first long run and stalled stores
LMCACHE_CPU_GB=${LMCACHE_CPU_GB:-20}
# ENGINES: how many engines `start` runs (2 fit at 0.3 of the GPU each, 4 at 0.2); LMCACHE=0 runs them
# without the connector; ENGINE_ARGS: extra vLLM flags as a YAML list body, e.g. '--enforce-eager' (not flags
# kvstack renders from config fields, such as LoRA's: `engine serve` refuses those; tests/gpu checks each variant)
ENGINES=${ENGINES:-2}
# ENGINES=auto: the card decides, four engines at 0.2 of one over 100 GB (an H200: ~97K tokens of KV
# each), else two at 0.45 (an H100: ~160K each); a lease asked for either card gets whichever starts
size_to_card() {
  if [ "$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)" -gt 100000 ]; then
    ENGINES=4 GPU_UTIL=${GPU_UTIL:-0.2}
  else
    ENGINES=2 GPU_UTIL=${GPU_UTIL:-0.45}
  fi
}
[ "$ENGINES" = auto ] && size_to_card
LMCACHE=${LMCACHE:-1}
GPU_UTIL=${GPU_UTIL:-$( [ "$ENGINES" -gt 2 ] && echo 0.2 || echo 0.3 )}
ENGINE_ARGS=${ENGINE_ARGS:-}
# LMCache's internal API of engine i listens from LMCACHE_API_PORT + 10 i (its worker at + 1)
LMCACHE_API_PORT=${LMCACHE_API_PORT:-7000}
# DEV_MODE=1 (default): the engines expose POST /reset_prefix_cache (VLLM_SERVER_DEV_MODE), which
# `matrix` calls before every case; DEV_MODE=0 serves without vLLM's development routes
DEV_MODE=${DEV_MODE:-1}
mkdir -p "$LOGS" /tmp/bin "${OUT:-/tmp/out}"

engine_yaml() {  # $1 index
  local i=$1
  cat <<YAML
model: /tmp/model
served_model_name: [kvstack-8b]
host: 127.0.0.1
port: $((8100 + i))
max_model_len: 32768
gpu_memory_utilization: $GPU_UTIL
kv_events: {enabled: true, endpoint: "tcp://*:$((5557 + 2 * i))", replay_endpoint: "tcp://*:$((5558 + 2 * i))", topic: kv-events}
python_hash_seed: "0"
dev_mode: $( [ "${DEV_MODE:-1}" = 1 ] && echo true || echo false )
extra_args: [--load-format, dummy${ENGINE_ARGS:+, $ENGINE_ARGS}]
YAML
  local env='VLLM_USE_FLASHINFER_SAMPLER: "0", HF_HUB_OFFLINE: "1"'
  # `engine serve` turns LMCache on unless told otherwise
  if [ "$LMCACHE" = 1 ]; then
    # LMCache's internal API, so `matrix` and `flow` can empty its CPU tier before every case
    # (lmcache_api_args): on the worker's port, LMCACHE_INTERNAL_API_SERVER_PORT_START + 1
    env+=", LMCACHE_INTERNAL_API_SERVER_ENABLED: \"true\", LMCACHE_INTERNAL_API_SERVER_HOST: 127.0.0.1"
    env+=", LMCACHE_INTERNAL_API_SERVER_PORT_START: \"$((${LMCACHE_API_PORT:-7000} + 10 * i))\""
    echo "lmcache: {remote_url: \"redis://127.0.0.1:$REDIS_PORT\", max_local_cpu_size: $LMCACHE_CPU_GB}"
  else
    echo "lmcache: {enabled: false}"
  fi
  echo "extra_env: {$env}"
}

wait_health() {  # $1 url, $2 seconds, $3 log
  local deadline=$((SECONDS + $2))
  until python3 -c "import urllib.request as u; u.urlopen('$1/health', timeout=2)" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then echo "NOT READY: $1"; tail -40 "$3"; return 1; fi
    sleep 2
  done
  echo "ready: $1 after ${SECONDS}s"
}

start() {
  cat > /tmp/bin/vllm <<'SH'
#!/bin/bash
exec python3 -c 'import sys; from vllm.entrypoints.cli.main import main; sys.argv[0] = "vllm"; sys.exit(main())' "$@"
SH
  chmod +x /tmp/bin/vllm
  LD_LIBRARY_PATH=/tmp/redisroot/usr/lib/x86_64-linux-gnu /tmp/redisroot/usr/bin/redis-server \
    --port $REDIS_PORT --bind 127.0.0.1 --save '' --appendonly no --maxmemory 16gb \
    --maxmemory-policy allkeys-lru --daemonize yes --logfile $LOGS/redis.log
  : > $LOGS/engines.yaml  # every engine here runs on the one GPU: device gpu-0 tells the router
  for i in $(seq 0 $((ENGINES - 1))); do
    echo "- {url: \"http://127.0.0.1:$((8100 + i))\", name: gpu$i, models: [kvstack-8b], kv_events_endpoint: \"tcp://127.0.0.1:$((5557 + 2 * i))\", kv_events_replay_endpoint: \"tcp://127.0.0.1:$((5558 + 2 * i))\", device: gpu-0}" >> $LOGS/engines.yaml
  done
  for i in $(seq 0 $((ENGINES - 1))); do
    engine_yaml $i > $LOGS/engine$i.yaml
    setsid nohup python3 -m kvstack engine serve --config $LOGS/engine$i.yaml > $LOGS/engine$i.log 2>&1 < /dev/null &
    if [ $i -lt $((ENGINES - 1)) ]; then
      # the next engine starts once this one has sized its KV cache, so none profiles another
      for _ in $(seq 150); do grep -q "KV cache size\|Available KV cache memory" $LOGS/engine$i.log && break; sleep 1; done
      grep -m2 "KV cache" $LOGS/engine$i.log
    fi
  done
  for i in $(seq 0 $((ENGINES - 1))); do
    wait_health http://127.0.0.1:$((8100 + i)) 240 $LOGS/engine$i.log || return 1
  done
  # says here, not at the first case, which engines' LMCache CPU tier `matrix` and `flow` can empty
  if [ "$LMCACHE" = 1 ]; then echo "LMCache internal API answers on $(lmcache_api_args | grep -c "^http") of $ENGINES engines"; fi
  # the router scrapes /metrics/ by sample name (router/scrape.py): one sample line here, not ~600
  echo "scrape by name: $(curl -s 'http://127.0.0.1:8100/metrics/?name%5B%5D=vllm%3Anum_requests_running' | grep -c '^vllm:') sample line(s); whole: $(curl -s http://127.0.0.1:8100/metrics | grep -c '^vllm:')"
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv
}

stop() {  # the engines and Redis of `start`; the brackets keep pkill off this call's own shell line
  pkill -f "[e]ngine serve"; pkill -f "[v]llm"; pkill -f "[r]edis-server"
  for _ in $(seq 90); do pgrep -f "[e]ngine serve|[v]llm serve" > /dev/null || return 0; sleep 1; done
  echo "engines still running after 90 s"; return 1
}

restart() {  # fresh engines (and an empty LMCache CPU buffer): pass the environment `start` had
  stop && start
}

lmcache_full() {  # $1: engine logs folder. Per engine, LMCache's CPU-buffer pressure, from its log.
  # "Failed to allocate memory block" is logged by every allocation that finds the buffer full,
  # including each retry after one chunk is evicted (LMCache 0.5.3, local_cpu_backend.py): with a full
  # buffer it is normal and the store goes on. A store is lost only when nothing can be evicted
  # (chunks pinned by lookups or held by queued Redis puts): "choosing to store only" (the rest of
  # the prompt's KV is dropped) or, where the caller waits, "No eviction candidates found" (0.1 s
  # sleeps). Those two are what make a run's figures suspect (bench-results/flow, session 27).
  local f full dropped waits
  for f in "${1:-$LOGS}"/engine[0-9].log; do
    [ -e "$f" ] || continue
    full=$(grep -c "Failed to allocate memory block" "$f")
    dropped=$(grep -c "choosing to store only" "$f")
    waits=$(grep -c "No eviction candidates found" "$f")
    echo "$(basename "$f" .log): CPU buffer full at $full allocations (evicting), $dropped stores cut short, $waits waits for an evictable chunk$( [ $((dropped + waits)) -gt 0 ] && echo " (stores are failing: restart for clean figures)")"
  done
}

engines_file() {  # the engines file the router is given. SHARED_DEVICE=0: a copy without `device:`,
  # each engine its own compute to the router (the A/B of bench-results/lmcache section 16: on an
  # H100 past saturation, the device pricing put nearly every request on one engine of the GPU)
  if [ "${SHARED_DEVICE:-1}" = 0 ]; then
    sed 's/, device: [^,}]*//' "$LOGS/engines.yaml" > "$LOGS/engines-own-device.yaml"
    echo "$LOGS/engines-own-device.yaml"
  else
    echo "$LOGS/engines.yaml"
  fi
}

proof() {
  spy_router
  timeout "${PROOF_TIMEOUT:-420}" python3 -m kvstack bench gpu --engines-file "$(engines_file)" --model kvstack-8b \
    --out "$OUT" "$@" 2>&1 | tee -a "$OUT/proof.log"
  bundle_traces
}

spy_router() {  # SPY_S set: the background sampler the usage above describes
  [ -n "${SPY_S:-}" ] || return 0
  python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy*.whl || return 0
  (
    local pid=""
    for _ in $(seq 1200); do
      # the bracket keeps the pattern from matching this call's own command line
      pid=$(pgrep -f "kvstack route[r] --port" | head -1)
      [ -n "$pid" ] && break
      sleep 0.5
    done
    [ -n "$pid" ] || exit 0
    sleep "${SPY_DELAY_S:-8}"
    /tmp/pyspy/bin/py-spy record -p "$pid" -d "$SPY_S" -r 250 -f raw --nonblocking \
      -o "$OUT/router-spy.txt" > "$OUT/router-spy.log" 2>&1
  ) &
}

matrix() {  # engines x workloads x loads x runs x routers in one call (gpu_plan.py), within its budget
  local base=(--engines-file "$(engines_file)" --model kvstack-8b --redis-url "redis://127.0.0.1:$REDIS_PORT"
    --trace "${TRACE:-m$(date +%s)}" --budget-s "${MATRIX_BUDGET_S:-560}" --out "$OUT")
  if [ "${MATRIX_DRY_RUN:-0}" = 1 ]; then
    python3 -m kvstack bench gpu "${base[@]}" --dry-run "$@"
    return
  fi
  # the router tokenizes with the model's own files unless the caller passes --tokenizer: with the
  # engines' /tokenize each request paid 15-25 ms of routing on the H200 (bench-results/gpu/r13)
  local tok=(--tokenizer local --tokenizer-path /tmp/model)
  names_tokenizer "$@" && tok=()
  local clear
  mapfile -t clear < <(lmcache_api_args)
  spy_router
  timeout "${PROOF_TIMEOUT:-590}" python3 -m kvstack bench gpu "${base[@]}" ${tok[@]+"${tok[@]}"} \
    ${clear[@]+"${clear[@]}"} "$@" 2>&1 | tee -a "$OUT/matrix.log"
  lmcache_full | tee -a "$OUT/matrix.log"
  bundle_traces
}

lmcache_api_args() {  # --lmcache-api per engine of `start` with LMCache (engine_yaml's ports), unless
  # CLEAR_LMCACHE=0: every case then starts with empty CPU tiers, not those earlier cases filled
  # An API that does not answer is left out with a word on stderr (the case runs, its tier kept).
  [ "${LMCACHE:-1}" = 1 ] && [ "${CLEAR_LMCACHE:-1}" = 1 ] || return 0
  local i port
  for i in $(seq 0 $((${ENGINES:-2} - 1))); do
    port=$((${LMCACHE_API_PORT:-7000} + 1 + 10 * i))
    if python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=2).close()" 2>/dev/null; then
      printf -- '--lmcache-api\nhttp://127.0.0.1:%s\n' "$port"
    else
      echo "LMCache internal API of engine $i (port $port) does not answer: its CPU tier is not cleared" >&2
    fi
  done
}

names_tokenizer() {  # whether the arguments choose the router's tokenizer (--tokenizer X, --tokenizer=X)
  local arg
  for arg in "$@"; do
    case $arg in --tokenizer | --tokenizer=*) return 0 ;; esac
  done
  return 1
}

bundle_traces() {  # a run call returns at most 8 files from $OUT: the per-case traces go back as one
  # archive, so the results JSON, PNG and log come back beside it (r13 lost them to 18 traces)
  local traces=("$OUT"/*.trace.jsonl)
  [ -e "${traces[0]}" ] || return 0
  tar -C "$OUT" -czf "$OUT/traces-$(date +%s).tgz" "${traces[@]##*/}" && rm -f "${traces[@]}"
}

flow() {  # flow control under overload over the running engines (kvstack bench flow)
  # the router's tokenizer: the engines' /tokenize unless the caller passes its own --tokenizer
  # (e.g. --tokenizer local --tokenizer-path /tmp/model: the router's own, as `bench gpu` does)
  local tok=(--tokenizer engine)
  names_tokenizer "$@" && tok=()
  # Redis flushed before every case, as matrix does: without it LMCache's shared tier kept the last
  # run's chunks, and a later policy on the same traces found them (bench-results/flow, session 22)
  local clear
  mapfile -t clear < <(lmcache_api_args)
  spy_router
  timeout "${PROOF_TIMEOUT:-580}" python3 -m kvstack bench flow --engines-file "$(engines_file)" --model kvstack-8b \
    --redis-url "redis://127.0.0.1:$REDIS_PORT" ${tok[@]+"${tok[@]}"} ${clear[@]+"${clear[@]}"} --speed 1 \
    --out "$OUT" "$@" 2>&1 | tee -a "$OUT/flow.log"
  lmcache_full | tee -a "$OUT/flow.log"
}

calib() {  # the same traces on two simulators sized like the real engines
  local blocks
  blocks=$(python3 -c "
from kvstack.bench import promtext
from kvstack.bench.gpu_summary import num_gpu_blocks
print(num_gpu_blocks(promtext.scrape('http://127.0.0.1:8100/metrics')) or 0)")
  echo "simulators with $blocks KV blocks each"
  PROOF_TIMEOUT=${PROOF_TIMEOUT:-420} timeout "${PROOF_TIMEOUT:-420}" python3 -m kvstack bench gpu --sims 2 \
    --sim-blocks "$blocks" --model kvstack-8b --label sim --out "$OUT" "$@" 2>&1 | tee -a "$OUT/calib.log"
}

logs() {
  for f in $LOGS/engine[0-9].log; do tail -c 200000 "$f" > "$OUT/$(basename $f)"; done
}

cmd=${1:-start}; shift || true
"$cmd" "$@"

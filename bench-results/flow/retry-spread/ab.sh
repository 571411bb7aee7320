# Run from the repository root at commit 63fbb0b (reverted since: no measured gain): flow control
# at 2x its capacity from a cold start, the retry spreading on and off (its environment variable)
C="--policy cache_aware+flow --scenario ramp --load 2 --capacity-rps 8 --duration-s 20 --prefill-tokens-per-s 4048 --sim-config bench-results/flow/sim-h200-x4-shared.yaml --out /tmp/retry-spread"
for i in 1 2 3; do
  for spread in true false; do
    KVSTACK_ROUTER_FLOW_CONTROL__SPREAD_RETRIES=$spread .venv/bin/kvstack bench flow $C --label 2x-spread-$spread-$i 2>&1 | grep "ramp  "
  done
done
echo done

# run from the repository root
C="--scenario ramp --capacity-rps 8 --duration-s 20 --prefill-tokens-per-s 4048 --sim-config bench-results/flow/sim-h200-x4-shared.yaml --out /tmp/device-ab"
for i in 1 2 3; do
  for dev in shared-device no-shared-device; do
    .venv/bin/kvstack bench flow --policy cache_aware+flow --load 2 --$dev $C --label 2x-$dev-$i 2>&1 | grep "ramp"
  done
done
for i in 1 2; do
  for dev in shared-device no-shared-device; do
    .venv/bin/kvstack bench flow --policy cache_aware --load 0.5 --$dev $C --label half-$dev-$i 2>&1 | grep "ramp"
  done
done
echo done

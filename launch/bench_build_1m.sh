#!/usr/bin/env bash
# Build time of the ANN auto presets at N = 1M on this machine (every core): train + index + the
# evaluation sweep, timed with /usr/bin/time; the data and its exact ground truth are made (and cached)
# first, outside the timing. METHODS="lmi" to time one. Logs: runs/auto1m-<method>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
SPEC="synthetic-ann:n=1000000,q=1000,d=64,clusters=1000,metric=euclidean,seed=7"
python3 -c "from jaxidx.data import load; load('$SPEC')"
for m in ${METHODS:-lmi irli}; do
  rm -rf "runs/auto1m-$m"
  /usr/bin/time -f "$m wall %e s, max RSS %M KB" python3 launch/train.py --config="configs/$m.py:auto:$SPEC" \
    --workdir="runs/auto1m-$m" --noprogress > "runs/auto1m-$m.log" 2>&1
  tail -1 "runs/auto1m-$m.log"
done

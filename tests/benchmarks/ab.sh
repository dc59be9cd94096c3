#!/usr/bin/env bash
# Speed A/B on one machine: an older revision (unpacked in ab_old/) against the working tree (or a
# revision unpacked in ab_new/), the two alternated and the order reversed each round (the host can
# be slower for whichever runs second).
#   here:        bash tests/benchmarks/ab.sh prepare a7cf237          # ab_old/ = that revision's package and tests
#                bash tests/benchmarks/ab.sh prepare HEAD ab_new      # optional: the new side as committed
#   GPU machine: OUT=$OUT ROUNDS="1 2" [NEW=ab_new] bash tests/benchmarks/ab.sh qwen3-0.6b|llama-3.1-8b|latency
#                (carry ab_old, and ab_new if used)
set -uo pipefail
what=$1
if [ "$what" = prepare ]; then
  dest=${3:-ab_old}
  rm -rf "$dest" && mkdir "$dest" && git archive "$2" vllm_engine tests | tar -x -C "$dest"
  echo "$dest/ = $2"; exit 0
fi
export PYTHONUNBUFFERED=1 OUT=${OUT:-results}
mkdir -p "$OUT"
for round in ${ROUNDS:-1 2}; do
  order="new old"; [ $((round % 2)) = 0 ] && order="old new"
  for side in $order; do
    dir=${NEW:-.}; [ $side = old ] && dir=ab_old
    echo "=== $what $side round $round $(date +%T)"
    if [ "$what" = latency ]; then
      (cd $dir && PYTHONPATH=. python tests/benchmarks/latency.py --model llama-3.1-8b --input-len 1000 --output-len 128 \
         --batch-sizes 1 --runs 5 --out "$OUT/lat_${side}_$round.json" 2>&1 | grep -A1 "^batch")
    else
      (cd $dir && PYTHONPATH=. python tests/benchmarks/throughput.py --model "$what" --dataset nano --runs 2 \
         --out "$OUT/tp_${what}_${side}_$round.json" 2>&1 | grep -E "result:|first run|Error")
    fi
  done
done

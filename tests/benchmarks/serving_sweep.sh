#!/usr/bin/env bash
# Issue 23's GPU measurement: the request rate a server sustains with TTFT p99 < 200 ms and TPOT p99 < 30 ms
# (Llama-3.1-8B shape, dummy weights, 1000 prompt + 128 output tokens, Poisson arrivals), served directly,
# through the router (ROUTER=1: its own cost), or as DP replicas behind it (DP=2: 2 GPUs).
#   OUT=results bash tests/benchmarks/serving_sweep.sh
#   OUT=results ROUTER=1 bash tests/benchmarks/serving_sweep.sh
#   OUT=results DP=2 bash tests/benchmarks/serving_sweep.sh
#   OUT=results SHARED=2 bash tests/benchmarks/serving_sweep.sh   (2 replicas on one GPU, 0.45 of it each,
#                                                                    behind the router)
# Knobs: MODEL, MAX_LEN, INPUT_LEN, OUTPUT_LEN, RATES, PROMPTS, PORT, TTFT_MS, TPOT_MS.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-results}; DP=${DP:-1}; ROUTER=${ROUTER:-0}; SHARED=${SHARED:-0}; MODEL=${MODEL:-llama-3.1-8b}; PORT=${PORT:-8011}
MAX_LEN=${MAX_LEN:-4096}; INPUT_LEN=${INPUT_LEN:-1000}; OUTPUT_LEN=${OUTPUT_LEN:-128}
RATES=${RATES:-"2 4 8 12 16 24 32 48"}; PROMPTS=${PROMPTS:-200}; TTFT_MS=${TTFT_MS:-200}; TPOT_MS=${TPOT_MS:-30}
mkdir -p "$OUT"
tag="$(basename "$MODEL")_dp${DP}$([ "$ROUTER" = 1 ] && echo _router || true)$([ "$SHARED" != 0 ] && echo "_shared$SHARED" || true)"
args="$MODEL --load-format dummy --max-model-len $MAX_LEN --log-level warning"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait "${pids[@]}" 2>/dev/null || true' EXIT
if [ "$SHARED" != 0 ]; then  # replicas started one after another on the same GPU, each its share of it
  share=$(python -c "print(round(0.9 / $SHARED, 3))")
  backends=()
  for i in $(seq 1 "$SHARED"); do
    # shellcheck disable=SC2086
    python -m vllm_engine.cli serve $args --gpu-memory-utilization "$share" --port $((PORT + i)) \
      > "$OUT/serve_${tag}_$i.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 900); do
      python -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$((PORT + i))/health').status_code != 200)" \
        2> /dev/null && break
      kill -0 "${pids[-1]}" 2>/dev/null || { tail -20 "$OUT/serve_${tag}_$i.log"; exit 1; }
      sleep 1
    done
    backends+=(--backend "http://127.0.0.1:$((PORT + i))")
  done
  python -m vllm_engine.cli router "${backends[@]}" --port "$PORT" --log-level warning > "$OUT/serve_$tag.log" 2>&1 &
elif [ "$ROUTER" = 1 ] && [ "$DP" = 1 ]; then
  python -m vllm_engine.cli router --serve "$args" --port "$PORT" --log-level warning > "$OUT/serve_$tag.log" 2>&1 &
else
  # shellcheck disable=SC2086
  python -m vllm_engine.cli serve $args --data-parallel-size "$DP" --port "$PORT" > "$OUT/serve_$tag.log" 2>&1 &
fi
pid=$!
pids+=("$pid")
for _ in $(seq 1 900); do
  python -c "import httpx, sys; sys.exit(httpx.get('http://127.0.0.1:$PORT/health').status_code != 200)" \
    2> /dev/null && break
  kill -0 $pid 2>/dev/null || { tail -20 "$OUT/serve_$tag.log"; exit 1; }
  sleep 1
done
# shellcheck disable=SC2086
python tests/benchmarks/serving_bench.py --base-url "http://127.0.0.1:$PORT" --dataset random --input-len "$INPUT_LEN" \
  --output-len "$OUTPUT_LEN" --num-prompts "$PROMPTS" --request-rate $RATES --goodput "ttft:$TTFT_MS" "tpot:$TPOT_MS" \
  --out "$OUT/serving_$tag.json" --plot "$OUT/serving_$tag.png"

#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, stage by stage (run from the repo root on the GPU machine):
#   OUT=results bash tests/benchmarks/gpu_suite.sh check throughput latency memory prefix sweep
#   issues 19-24:  OUT=results bash tests/benchmarks/gpu_suite.sh newkernels newmodels newspec fp8kv quant moe spec \
#                    specnano verifygraphs startup serving structured   (a few stages per device call)
#   several GPUs:  OUT=results bash tests/benchmarks/gpu_suite.sh multigpu allreduce tpscaling llama70b
#   then:          python tests/benchmarks/plot_scaling.py --latency results/latency_tp*.json \
#                    --throughput results/throughput_70b_*.json --out docs/scaling.png
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1  # keeps wheels carried to the device (/tmp/site)
OUT=${OUT:-results}
mkdir -p "$OUT"
B=tests/benchmarks
for stage in "$@"; do
  echo "=== $stage $(date +%T)"
  case $stage in
    gputest)    python -m pytest -q -x tests/e2e/test_gpu_engine.py tests/layers/test_sampler.py tests/kernels/test_fused_ops.py \
                  tests/kernels/test_triton_sampler.py tests/kernels/test_linear.py tests/kernels/test_triton_attention.py \
                  2>&1 | tail -15 ;;
    linear)     python $B/linear_bench.py --out "$OUT/linear.json" ;;
    gemvstack)  python $B/gemv_stack.py --model llama-3.1-8b --rows 1 4 --out "$OUT/gemv_stack.json" ;;
    decodeattn) python $B/decode_attn_bench.py --model llama-3.1-8b --context 1000 --batch-sizes 1 4 --splits 16 32 64 \
                  --stages 1 3 --out "$OUT/decode_attn_bs1_4.json" | grep -A4 "^batch"
                python $B/decode_attn_bench.py --model qwen3-0.6b --context 1000 --batch-sizes 8 16 32 64 128 --layers 8 \
                  --splits 1 2 4 8 16 --tiles 64 --warps 2 4 --stages 3 --out "$OUT/decode_attn_splits.json" | grep -A4 "^batch" ;;
    prefillattn) python $B/prefill_attn_bench.py --out "$OUT/prefill_attn.json" ;;
    profile1)   python $B/gpu_kernel_profile.py --model llama-3.1-8b --batch 1 --input-len 1000 --steps 20 > "$OUT/profile_llama8b_bs1.txt" 2>&1
                grep -A9 "GPU time per step" "$OUT/profile_llama8b_bs1.txt" ;;
    cublas)     # A/B: the same measurements with cuBLAS for every linear layer (no LinearPicker)
                VLLM_ENGINE_LINEAR=cublas python $B/latency.py --model llama-3.1-8b --input-len 1000 --output-len 128 \
                  --batch-sizes 1 4 --runs 5 --out "$OUT/latency_cublas.json"
                VLLM_ENGINE_LINEAR=cublas python $B/throughput.py --model qwen3-0.6b --dataset nano --runs 3 \
                  --out "$OUT/throughput_qwen3_cublas.json" ;;
    timeline)   python $B/gpu_timeline.py --model qwen3-0.6b --out "$OUT/timeline_qwen3.json"
                python $B/gpu_timeline.py --model llama-3.1-8b --out "$OUT/timeline_llama8b.json" ;;
    profile)    python $B/gpu_kernel_profile.py --model qwen3-0.6b --batch 256 | tail -12
                python $B/gpu_kernel_profile.py --model llama-3.1-8b --batch 256 --steps 5 | tail -12 ;;
    check)      python -m pytest -q -x tests/e2e/test_gpu_engine.py 2>&1 | tail -15
                python tests/kernels/gpu_check.py --out "$OUT/kernels.json" ;;
    structured) python -m pytest -q -x tests/structured_outputs/test_gpu.py 2>&1 | tail -5
                python $B/structured_throughput.py --model qwen3-0.6b --load-format dummy --dataset nano --num-prompts 64 \
                  --max-num-seqs 64 --out "$OUT/structured_qwen3.json"
                python $B/structured_throughput.py --dataset nano --num-prompts 64 --max-num-seqs 64 \
                  --out "$OUT/structured_smollm2.json" ;;
    # Issues 19-24 on one GPU. Every stage writes one log (the device tool brings back few files).
    # (each under the 10-minute limit of one device call; families and spec decode build many engines)
    newkernels) python -m pytest -q -p no:cacheprovider -rfE --tb=short tests/kernels/test_fp8_kv_cache.py \
                  tests/kernels/test_fp8_kv_scales.py tests/worker/test_kv_cache_dtype.py tests/quantization/test_wna16_kernels.py \
                  tests/quantization/test_gpu_quant.py tests/kernels/test_fused_moe.py tests/kernels/test_sliding_window_freed_blocks.py \
                  tests/model_loader/test_staged_safetensors.py tests/model_loader/test_checkpoint_rows.py \
                  > "$OUT/newkernels.txt" 2>&1; tail -25 "$OUT/newkernels.txt" ;;
    newmodels)  python -m pytest -q -p no:cacheprovider -rfE --tb=short tests/models/test_families_gpu.py \
                  tests/models/test_gemma_kv_cache_groups.py > "$OUT/newmodels.txt" 2>&1; tail -25 "$OUT/newmodels.txt" ;;
    newspec)    python -m pytest -q -p no:cacheprovider -rfE --tb=short tests/spec_decode > "$OUT/newspec.txt" 2>&1
                tail -25 "$OUT/newspec.txt" ;;
    verifygraphs) python -m pytest -q -p no:cacheprovider -rfE --tb=short tests/worker/test_verify_graphs.py \
                  tests/spec_decode/test_engine_spec.py tests/spec_decode/test_draft_model.py tests/spec_decode/test_eagle.py \
                  tests/spec_decode/test_eagle3.py > "$OUT/verifygraphs.txt" 2>&1; tail -25 "$OUT/verifygraphs.txt" ;;
    fp8kv)      for kv in auto fp8 auto fp8; do  # issue 19: at least 1.5x with kv_cache_dtype=fp8
                  python $B/throughput.py --model qwen3-0.6b --dataset nano --runs 2 --kv-cache-dtype $kv \
                    --out "$OUT/throughput_qwen3_kv_$kv.json" 2>&1 | grep -E "result:|Error"
                done ;;
    quant)      python $B/quant_bench.py --model llama-3.1-8b --part kernels latency --methods none gptq awq fp8 \
                  --runs 2 --out "$OUT/quant.json" 2>&1 | tail -12 ;;
    moe)        for m in mixtral-8x7b qwen3-30b-a3b; do python $B/moe_bench.py --model $m --out "$OUT/moe_$m.json" | tail -9; done
                for m in qwen3-30b-a3b mixtral-8x7b gemma-2-9b deepseek-v2-lite; do  # issue 20: 70% of the roofline
                  python $B/throughput.py --model $m --dataset nano --runs 2 --out "$OUT/throughput_$m.json" 2>&1 \
                    | grep -E "result:|Error"
                done ;;
    spec)       python $B/spec_decode_bench.py --out "$OUT/spec_ngram_smollm2.json" 2>&1 | tail -8  # needs the SmolLM2 GGUF
                for d in llama-3.2-1b eagle-llama-3.1-8b; do  # forced acceptance 0.5 / 0.7 / 0.9
                  python $B/spec_decode_bench.py --model llama-3.1-8b --load-format dummy --draft-model $d \
                    --num-speculative-tokens 2 4 --input-len 512 --output-len 128 --out "$OUT/spec_$d.json" 2>&1 | tail -8
                done ;;
    specnano)   for spec in off on off on; do  # issue 21: nano with n-gram speculation on >= 0.98x off
                  cfg=""; [ $spec = on ] && cfg='{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}'
                  python $B/throughput.py --model qwen3-0.6b --dataset nano --runs 2 ${cfg:+--speculative-config "$cfg"} \
                    --out "$OUT/throughput_qwen3_spec_$spec.json" 2>&1 | grep -E "result:|Error"
                done ;;
    startup)    python $B/startup.py --model llama-3.1-8b --out "$OUT/startup_llama8b.json" 2>&1 | tail -20
                python $B/weight_load_bench.py --dir /tmp/wl-llama8b --out "$OUT/weight_load.json" 2>&1 | tail -8 ;;
    serving)    bash $B/serving_sweep.sh 2>&1 | tail -12
                ROUTER=1 bash $B/serving_sweep.sh 2>&1 | tail -12
                SHARED=2 bash $B/serving_sweep.sh 2>&1 | tail -12 ;;  # two replicas on this one GPU
    # Several GPUs (issue 18; NVLink multicast stays off, as the machine sets it):
    multigpu)   python -m pytest -q -x tests/distributed/test_multi_gpu.py tests/worker/test_cuda_graph_stages.py 2>&1 | tail -8 ;;
    allreduce)  python $B/allreduce_bench.py --world-sizes 2 4 8 --hidden 8192 --out "$OUT/allreduce.json" ;;
    tpscaling)  for tp in 1 2 4 8; do
                  python $B/latency.py --model llama-3.1-8b --input-len 1000 --output-len 128 --batch-sizes 1 --runs 3 \
                    -tp $tp --out "$OUT/latency_tp$tp.json" | grep -A1 "^batch"
                done ;;
    llama70b)   for layout in "-tp 4" "-tp 8" "-tp 2 -pp 2"; do
                  name=$(echo $layout | tr -d ' -')
                  python $B/throughput.py --model llama-3.1-70b --dataset nano --runs 3 $layout \
                    --out "$OUT/throughput_70b_$name.json" | grep -E "result:|first run|Error"
                done ;;
    smoke)      python $B/throughput.py --model qwen3-0.6b --dataset random --num-prompts 64 --input-len 256 --output-len 128 --runs 1 ;;
    throughput) python $B/throughput.py --model qwen3-0.6b --dataset nano --runs 3 --backend both --out "$OUT/throughput_qwen3.json"
                python $B/throughput.py --model llama-3.1-8b --dataset nano --runs 3 --out "$OUT/throughput_llama8b.json" ;;
    overhead)   python $B/throughput.py --model qwen3-0.6b --dataset nano --runs 3 --no-enable-prefix-caching --out "$OUT/throughput_qwen3_nocache.json" ;;
    ab)         # A/B of the batch-1 features, one machine: norm/activation folded into GEMVs, PDL
                for env in "VLLM_ENGINE_FOLD=1" "VLLM_ENGINE_FOLD=0" "VLLM_ENGINE_PDL=0"; do
                  echo "--- $env"
                  env $env python $B/latency.py --model llama-3.1-8b --input-len 1000 --output-len 128 --batch-sizes 1 4 \
                    --runs 5 --out "$OUT/latency_${env//=/_}.json" | tail -2
                done ;;
    host)       python $B/host_prepare.py --out "$OUT/host_prepare_cuda.json"
                python $B/host_step.py --out "$OUT/host_step_cuda.json" ;;
    latency)    python $B/latency.py --model llama-3.1-8b --input-len 1000 --output-len 128 --batch-sizes 1 4 16 --runs 5 --out "$OUT/latency.json" ;;
    memory)     python $B/memory_usage.py --model qwen3-0.6b --out "$OUT/memory.json" ;;
    prefix)     python $B/prefix_cache.py --model llama-3.1-8b --out "$OUT/prefix_cache.json" ;;
    sweep)      python $B/batch_sweep.py --model qwen3-0.6b --out "$OUT/sweep.json" --plot "$OUT/throughput_vs_batch.png" ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done

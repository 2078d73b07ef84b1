#!/usr/bin/env bash
# Issue 17's GPU measurements as named steps, one device call each (each fits the 10-minute limit of
# a call; steps after the first on a warm host reuse its Triton cache and the engine's tuning tables,
# kept under build/, which git ignores and the device tool keeps between calls):
#   attention   the decode attention over both value layouts (bench.attention_sweep), minutes
#   fp8-scale   8B fp8 engine through Triton at 256 and 512 streams (the 28,447 tokens/s target)
#   batch1      8B bf16 and fp8 engines through Triton at one stream, each in its own server
#   bf16-scale  8B bf16 engine through Triton at 256 and 512 streams (the energy ratio's baseline)
#   1b          1B bf16 and fp8 engines in-process at one stream (bench.quant_speed)
#   1b-batch1   1B bf16 and fp8 engines through Triton at one stream, each in its own server
#   1b-profile  the 1B fp8 step at 1-2 rows, each fused form against its unfused one (bench.profile_step)
#   8b-profile  the same for the 8B fp8 step
# Usage, from the repository root on the GPU host (carry .carry for the Triton steps):
#   TRITONLLM_COMMIT=<short sha measured> OUT=/path bash scripts/gpu_quant_runs.sh STEP
# Results and a log of each step land in $OUT; add them to results/ and docs/benchmarks.md here.
# DRY_RUN=1 prints the step's command instead of running it.
set -euo pipefail
steps="attention fp8-scale batch1 bf16-scale 1b 1b-batch1 1b-profile 8b-profile"
step=${1:?"name a step: $steps"}
: "${OUT:?set OUT to the folder the results go to}"
: "${TRITONLLM_COMMIT:?set TRITONLLM_COMMIT to the commit measured (the copy on the host may lack .git)}"
export TRITONLLM_DIRTY=${TRITONLLM_DIRTY:-0} PYTHONUNBUFFERED=1 XDG_CACHE_HOME=$PWD/build/xdg
fp8=fp8:quantization=fp8,quantize_lm_head=True,kv_cache_dtype=fp8
served=(python -m bench.bench_llm --device gpu --rounds 4 --kv-cache-memory-fraction 0.8 --client-procs 8
  --tokenizer-instances 4 --detokenizer-instances 4 --systems triton --server-pythonpath /tmp/np1 --out "$OUT")
case "$step" in
  attention)
    run=(python -m bench.attention_sweep --batches 256 512 1024 --contexts 192 --value-layouts pages rows
      --out "$OUT" --topic attention-value-layouts) ;;
  fp8-scale)
    run=("${served[@]}" --shape 8b --concurrency 256 512 --triton-variants "$fp8" --topic 8b-triton-256-512-fp8) ;;
  batch1)
    run=("${served[@]}" --shape 8b --concurrency 1 --triton-variants bench "$fp8" --server-per-variant
      --topic 8b-triton-batch1-fp8) ;;
  bf16-scale)
    run=("${served[@]}" --shape 8b --concurrency 256 512 --triton-variants bench --topic 8b-triton-256-512-bf16) ;;
  1b-batch1)
    run=("${served[@]}" --shape 1b --concurrency 1 --triton-variants bench "$fp8" --server-per-variant
      --topic 1b-triton-batch1-fp8) ;;
  1b)
    run=(python -m bench.quant_speed --shapes 1b --schemes none fp8+head --concurrency 1 --kv-cache-dtype fp8
      --rounds 6 --out "$OUT" --topic quant-speed-1b-batch1) ;;
  1b-profile|8b-profile)
    shape=${step%-profile}
    run=(python -m bench.profile_step --shape "$shape" --quantization fp8 --kv-cache-dtype fp8 --quantize-lm-head
      --batches 1 2 --prefill 0 --out "$OUT" --topic "profile-step-$shape-fp8-batch1") ;;
  *) echo "unknown step $step: $steps" >&2; exit 2 ;;
esac
if [ -n "${DRY_RUN:-}" ]; then  # the command alone (tests/unit/test_gpu_steps.py parses each step's arguments)
  printf '%q ' "${run[@]}"; echo; exit 0
fi
if [ "${run[0]} ${run[2]}" = "python bench.bench_llm" ]; then  # served: the Triton tree and numpy 1.26 stubs
  [ -d /tmp/site/tritonclient ] || bash scripts/gpu_host_setup.sh
  export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p "$OUT"
echo "+ ${run[*]}" | tee "$OUT/$step.log"
"${run[@]}" 2>&1 | tee -a "$OUT/$step.log"

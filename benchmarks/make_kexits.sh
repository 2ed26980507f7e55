#!/usr/bin/env bash
# The restricted-vocabulary exits committed under benchmarks/exits/ (issue 18), rebuilt on a CPU.
#
#   bash benchmarks/make_kexits.sh [smollm2|gemma3|gemma3-draft|both]   (default both; ~10 minutes on 2 cores)
#
# SmolLM2-135M: the H100-tuned `mlp` exits after layers 10 and 20 (shared LM head), restricted to
# the K most frequent tokens of the tuning data plus OTHER (`convert --from-exits`), then tuned
# briefly on this CPU (the OTHER row is new; LM loss, so the trunk stops at layer 20).
# Gemma-3-270M: fresh `norm` exits after layers 13, 17 and 18 (the last: a restricted LM head),
# shared LM head rows, restricted the same way, tuned briefly (norm weights and OTHER rows only).
# Gemma-3-270M draft exit (gemma3-draft, not in `both`): one untuned `norm` exit after the last layer
# whose head is the LM head's rows of 16,384 tokens plus an OTHER row at zero (shared rows: only the
# copied final norm and the OTHER row are stored). The tokens are ranked on a 50/50 mixture of the
# BoolQ passages and 3,800 tokens the model samples itself (about 10 CPU minutes, cached): BoolQ
# passages hold no line breaks, so ranked on them alone the head missed '\n', 4% of Gemma-3's own
# summary tokens. Drafting with it runs the whole trunk but a 16k-row head; verification is the
# 262k-row LM head over the round's tokens at once, so rounds amortise the head, which costs more
# than the whole trunk on this model. Decode it with `--draft-context`: the prompt's own tokens
# (names, rare words that summaries copy) join the draft vocabulary per request.
# Each of the first two is then calibrated (`eetune calibrate`, stored in its exit_config.json): 0.9 token agreement
# for SmolLM2, 0.95 for Gemma-3, as issue 18's speed targets say.
set -euo pipefail
cd "$(dirname "$0")/.."
EETUNE=${EETUNE:-.venv/bin/eetune}
WORK=${WORK:-runs/kexits}
WHICH=${1:-both}
K_SMOL=${K_SMOL:-4k}
K_GEMMA=${K_GEMMA:-4k}
mkdir -p "$WORK"

if [[ $WHICH == smollm2 || $WHICH == both ]]; then
  OUT=benchmarks/exits/smollm2-mlp-10-20-k$K_SMOL
  $EETUNE convert --from-exits benchmarks/exits/smollm2-mlp-10-20-h100 --exit-vocab "$K_SMOL" --out "$WORK/smollm2-start"
  rm -rf "$WORK/smollm2.train"
  $EETUNE tune "$WORK/smollm2-start" --data default --steps 60 --seq-len 256 --batch-size 8 --lr 2e-3 --warmup 6 \
    --distill 0 --val-blocks 4 --eval-every 20 --train-dir "$WORK/smollm2.train" --out "$OUT"
  $EETUNE calibrate "$OUT" --target-agreement 0.9 --calib-blocks 8 --test-blocks 8
fi

if [[ $WHICH == gemma3 || $WHICH == both ]]; then
  OUT=benchmarks/exits/gemma3-norm-13-17-18-k$K_GEMMA
  $EETUNE convert --model gemma3-270m --exits 13,17,18 --arch norm --output-embedding shared \
    --exit-vocab "$K_GEMMA" --out "$WORK/gemma3-start"
  rm -rf "$WORK/gemma3.train"
  $EETUNE tune "$WORK/gemma3-start" --data default --steps 24 --seq-len 256 --batch-size 8 --lr 1e-2 --warmup 3 \
    --distill 0 --val-blocks 4 --eval-every 12 --train-dir "$WORK/gemma3.train" --out "$OUT"
  $EETUNE calibrate "$OUT" --target-agreement 0.95 --calib-blocks 8 --test-blocks 8
fi

if [[ $WHICH == gemma3-draft ]]; then
  $EETUNE convert --model gemma3-270m --exits 18 --arch norm --output-embedding shared --exit-vocab 16k \
    --vocab-data default:0.5,generated:3800:0.5 --out benchmarks/exits/gemma3-draft-18-k16k
fi

"""How often the final layer's own distribution, folded onto K tokens + OTHER, has OTHER on top.

    .venv/bin/python benchmarks/folded_other.py --model smollm2-135m --k 2k,4k,8k,16k,32k
    .venv/bin/python benchmarks/folded_other.py --model gemma3-270m --k 2k,4k,8k,16k,32k --blocks 32

A restricted-vocabulary head (K tokens + OTHER) distilled from the final layer learns the folded
distribution: OTHER's target is the final layer's mass outside the K ids. Where that mass beats
every single K token, a perfectly distilled head's argmax is OTHER, which the top-1 agreement of
`benchmarks/exit_vocab_quality.py` counts as a miss. This measures that ceiling, teacher forced on
held-out BoolQ dev blocks, for the K most frequent tokens of the tuning data (the ranking `convert
--exit-vocab K` and exit_vocab_quality.py use): per K, the share of positions whose folded argmax
is OTHER, the mean mass outside K, and the share whose final top-1 lies outside K.

Prints one JSON line and writes it to benchmarks/results/folded_other-<model>-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from eetune import load_backbone  # noqa: E402
from eetune.model.backbone import load_tokenizer  # noqa: E402
from eetune.model.heads import parse_exit_vocab  # noqa: E402
from eetune.train.data import train_val_blocks  # noqa: E402
from eetune.train.tune import rank_vocabulary  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--k", default="2k,4k,8k,16k,32k")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=64, help="held-out BoolQ dev blocks of --seq-len")
    args = ap.parse_args(argv)

    bb = load_backbone(args.model)
    V = bb.vocab_size
    tok = load_tokenizer(bb)
    train, _, info = train_val_blocks("default", tok, args.seq_len, val_blocks=4, progress=False)
    ranking = rank_vocabulary(train, V)
    dev, _, dev_info = train_val_blocks("default-dev", tok, args.seq_len, val_blocks=0, progress=False)
    dev = dev[:args.blocks]
    specs = [s.strip() for s in args.k.split(",")]
    Ks = {s: parse_exit_vocab(s, V) for s in specs}
    inside = {s: torch.zeros(V, dtype=torch.bool).index_fill_(0, ranking[:K], True) for s, K in Ks.items()}
    other_top, outside_mass, top1_out = ({s: 0.0 for s in specs} for _ in range(3))
    n = 0
    with torch.no_grad():
        for b in range(0, dev.shape[0], 2):
            p = bb.model(dev[b:b + 2]).logits[:, :-1].float().softmax(-1).reshape(-1, V)
            top1 = p.argmax(-1)
            n += p.shape[0]
            for s in specs:
                keep = inside[s]
                out = p[:, ~keep].sum(-1)
                best_in = p[:, keep].amax(-1)
                other_top[s] += float((out > best_in).sum())
                outside_mass[s] += float(out.sum())
                top1_out[s] += float((~keep[top1]).sum())
            print(f"blocks {min(b + 2, dev.shape[0])}/{dev.shape[0]}", file=sys.stderr, flush=True)
    import transformers
    rows = {s: {"K": Ks[s], "folded_argmax_is_other": round(other_top[s] / n, 4),
                "mean_mass_outside_k": round(outside_mass[s] / n, 4),
                "final_top1_outside_k": round(top1_out[s] / n, 4)} for s in specs}
    out = {"model": args.model, "vocab_size": V, "ranked_by": "data", "data": info.get("source"),
           "held_out": dev_info.get("source"), "held_out_blocks": int(dev.shape[0]), "positions": n, "by_k": rows,
           "device": "cpu", "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
           "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(out))
    (ROOT / "results" / f"folded_other-{args.model}-cpu.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Restricted-vocabulary exit heads against full-vocabulary ones at equal tuning tokens (issue 18).

    .venv/bin/python benchmarks/exit_vocab_quality.py --model smollm2-135m \
        --start benchmarks/exits/smollm2-mlp-10-20-h100 --k 2k,4k,8k,16k,32k,all --steps 40
    .venv/bin/python benchmarks/exit_vocab_quality.py --model gemma3-270m --exits 12,15,17 --arch norm \
        --k 2k,4k,8k,16k,32k,all --steps 40

Starts every K from the same heads (`--start`, an exits directory, or fresh `--arch` exits at
`--exits` with a shared LM head), restricts them to the K most frequent tokens of the tuning data
(BoolQ training passages) plus OTHER (`all`: left unrestricted), tunes each with the same settings,
seed and tokens (`eetune.train.tune.tune`), and measures on held-out BoolQ dev passages, teacher
forced, per exit:

- top-1 agreement with the final layer (OTHER never agrees) and its difference from the `all`
  heads with a paired 95% bootstrap interval (resampling held-out blocks);
- the ceiling: the share of held-out tokens whose final top-1 lies among the K ids, and the
  full-vocabulary heads' agreement counted on those tokens only (the most a K-head could keep);
- the head's best token among its K with OTHER left out (`top1_among_k`): agreement, paired
  difference from `all`, coverage at >= 0.95;
- coverage at >= 0.95 agreement: the largest share of tokens that can leave at that exit (OTHER
  not winning, max-prob at or above a threshold) while those that leave agree with the final
  layer at least 95% of the time;
- the cost of the exit (transform + projection) and of the LM head, in decoder layers
  (`eetune.decode.policy.measure_costs`).

Prints one JSON line and writes it to benchmarks/results/exit_vocab_quality-<model>-<device>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from eetune import EarlyExitModel, load_backbone  # noqa: E402
from eetune.model.backbone import load_tokenizer  # noqa: E402
from eetune.model.heads import parse_exit_vocab  # noqa: E402
from eetune.train.data import train_val_blocks  # noqa: E402
from eetune.train.tune import TuneConfig, rank_vocabulary, tune  # noqa: E402
from exit_cost import cost_in_layers  # noqa: E402


def coverage_at(conf: torch.Tensor, agree: torch.Tensor, can: torch.Tensor, target: float = 0.95) -> tuple:
    """(coverage, threshold): the largest share of positions that leave (can & conf >= t) while
    the leaving ones agree at least `target` of the time; (0, None) when no threshold does."""
    c = torch.where(can, conf, torch.full_like(conf, -1.0))
    order = torch.argsort(c, descending=True)
    ok = agree[order].float().cumsum(0) / torch.arange(1, len(order) + 1)
    valid = (c[order] >= 0) & (ok >= target)
    if not valid.any():
        return 0.0, None
    n = int(torch.nonzero(valid).max()) + 1
    return n / len(order), float(c[order][n - 1])


def paired_ci(a: torch.Tensor, b: torch.Tensor, blocks: int, reps: int = 2000, seed: int = 0) -> tuple:
    """Mean of a - b (per-token 0/1 vectors laid out block by block) and its 95% bootstrap
    interval, resampling whole blocks."""
    per = (a.float() - b.float()).reshape(blocks, -1).mean(1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, blocks, (reps, blocks), generator=g)
    means = per[idx].mean(1)
    return float(per.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--start", default=None, help="exits directory every K starts from (its heads restricted)")
    ap.add_argument("--exits", default="10,20", help="without --start: fresh exits after these layers")
    ap.add_argument("--arch", default="norm", help="without --start: their architecture (shared LM head)")
    ap.add_argument("--k", default="2k,4k,8k,16k,32k,all")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--distill", type=float, default=None,
                    help="distillation weight (default: 1, or 0 with --cache: the LM loss; with --cache and a weight "
                         "> 0 the cache holds the final layer's states too)")
    ap.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                    help="tune every K on one cache of the trunk's hidden states at the exits (LM loss; the trunk runs "
                         "once for all K, so the full-vocabulary heads' projection is the only large cost)")
    ap.add_argument("--eval-blocks", type=int, default=32, help="held-out BoolQ dev blocks of --seq-len")
    ap.add_argument("--repeats", type=int, default=3,
                    help="cost measurements per K (median; 0: skip, e.g. on a busy machine: exit_cost.py measures it)")
    ap.add_argument("--tag", default="", help="suffix of the results file (e.g. distill)")
    ap.add_argument("--keep", default=None, help="directory to keep each K's tuned exits in (default: temporary)")
    args = ap.parse_args(argv)

    bb = load_backbone(args.model)
    V, L = bb.vocab_size, bb.num_layers
    tok = load_tokenizer(bb)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="eetune-kq-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.start:
        start = EarlyExitModel.from_pretrained(args.start, backbone=bb)
        start_desc = args.start
    else:
        start = EarlyExitModel.convert(bb, [int(k) for k in args.exits.split(",")], arch=args.arch,
                                       output_embedding="shared")
        start_desc = f"fresh {args.arch} exits at {args.exits}, shared LM head, copy init"
    exits = list(start.exit_layers)
    distill = args.distill if args.distill is not None else (0.0 if args.cache else 1.0)
    cfg = TuneConfig(data="default", steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                     warmup=max(1, args.steps // 10), distill=distill, val_blocks=4, progress=True, seed=0,
                     cache_hidden=str(work / "hidden-cache") if args.cache else None)
    train, _, info = train_val_blocks("default", tok, args.seq_len, val_blocks=cfg.val_blocks, progress=False)
    ranking = rank_vocabulary(train, V)
    dev, _, dev_info = train_val_blocks("default-dev", tok, args.seq_len, val_blocks=0, progress=False)
    dev = dev[:args.eval_blocks]
    blocks = dev.shape[0]

    # The trunk's hidden states at the exits and the final top-1, once (teacher forced).
    torch.set_grad_enabled(False)
    hid = {k: [] for k in exits}
    final_top1 = []
    for b in range(0, blocks, 4):
        out = start(dev[b:b + 4], final=True, return_hidden=True)
        for k in exits:
            hid[k].append(out.exit_hidden[k][:, :-1])
        final_top1.append(out.final_logits[:, :-1].argmax(-1))
    final_top1 = torch.cat(final_top1).reshape(-1)
    torch.set_grad_enabled(True)

    rows, agree_all = {}, {}
    specs = args.k.split(",")
    specs = [s for s in specs if s.strip().lower() == "all"] + [s for s in specs if s.strip().lower() != "all"]
    for spec in specs:
        K = parse_exit_vocab(spec, V)
        fresh = EarlyExitModel.from_pretrained(args.start, backbone=bb) if args.start else \
            EarlyExitModel.convert(bb, exits, arch=args.arch, output_embedding="shared")
        if K is not None:
            fresh.restrict_vocab(ranking[:K], {"ranked_by": "data", "data": info.get("source"),
                                               "tokens": int(train.numel())})
        src = work / f"k-{spec}-start"
        fresh.save_pretrained(src)
        t0 = time.time()
        summary = tune(src, work / f"k-{spec}", cfg, backbone=bb)
        tune_s = time.time() - t0
        tuned = EarlyExitModel.from_pretrained(work / f"k-{spec}", backbone=bb)
        row = {"K": V if K is None else K, "tune_seconds": round(tune_s, 1),
               "tokens": summary.get("tokens_seen") or summary.get("tokens"), "exits": {}}
        with torch.no_grad():
            for k in exits:
                head = tuned.head(k)
                h = torch.cat(hid[k]).reshape(-1, bb.hidden_size)
                conf, pred = [], []
                for a in range(0, h.shape[0], 1024):
                    c, p = head.predict(head(h[a:a + 1024]))
                    conf.append(c)
                    pred.append(p)
                conf, pred = torch.cat(conf), torch.cat(pred)
                agree = pred == final_top1
                cov, thr = coverage_at(conf, agree, pred >= 0)
                ex = {"agreement": round(float(agree.float().mean()), 4), "coverage_at_0.95": round(cov, 4),
                      "threshold_at_0.95": None if thr is None else round(thr, 4),
                      "other_share": round(float((pred < 0).float().mean()), 4)}
                if K is None:
                    agree_all[k] = agree
                else:
                    d, lo, hi = paired_ci(agree, agree_all[k], blocks)
                    ex["agreement_minus_all"] = {"mean": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]}
                    # what no K-head can match: the full heads' agreements on tokens whose final
                    # top-1 lies outside the K ids (OTHER never agrees)
                    inside = torch.isin(final_top1, head.vocab_ids.to(final_top1.device))
                    ex["final_top1_in_k"] = round(float(inside.float().mean()), 4)
                    ex["all_heads_agreement_in_k"] = round(float((agree_all[k] & inside).float().mean()), 4)
                    # the head's best token with OTHER left out (softmax over the K tokens): how well
                    # it ranks tokens, apart from how often OTHER wins
                    kc, kp = [], []
                    for a in range(0, h.shape[0], 1024):
                        pk = head(h[a:a + 1024]).float()[..., :K].softmax(-1)
                        c, i = pk.max(-1)
                        kc.append(c)
                        kp.append(head.vocab_ids[i])
                    agree_k = torch.cat(kp) == final_top1
                    d, lo, hi = paired_ci(agree_k, agree_all[k], blocks)
                    ex["top1_among_k"] = {"agreement": round(float(agree_k.float().mean()), 4),
                                          "minus_all": {"mean": round(d, 4), "ci95": [round(lo, 4), round(hi, 4)]},
                                          "coverage_at_0.95": round(coverage_at(torch.cat(kc), agree_k,
                                                                                torch.ones_like(agree_k))[0], 4)}
                row["exits"][str(k)] = ex
        if args.repeats > 0:
            with torch.no_grad():
                row["cost"] = cost_in_layers(tuned, exits, args.repeats)
        rows[spec] = row
        print(json.dumps({spec: row}), file=sys.stderr)
        del fresh, tuned
    import transformers
    out = {"model": args.model, "num_layers": L, "vocab_size": V, "exit_layers": exits, "start": start_desc,
           "tune": {"steps": args.steps, "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
                    "distill": distill, "cached_hidden_states": args.cache, "data": info.get("source"), "seed": 0,
                    "tokens_per_k": args.steps * args.batch_size * args.seq_len},
           "ranked_by": "data", "held_out": dev_info.get("source"), "held_out_blocks": blocks,
           "held_out_tokens": int(final_top1.numel()), "by_k": rows,
           "device": "cpu", "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
           "dtype": "fp32", "torch": torch.__version__, "transformers": transformers.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(out))
    path = ROOT / "results" / f"exit_vocab_quality-{args.model}-cpu{'-' + args.tag if args.tag else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

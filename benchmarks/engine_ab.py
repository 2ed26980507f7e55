"""A/B timing of the decoding engine against an earlier git revision, on the real default model.

    .venv/bin/python benchmarks/engine_ab.py --rev f522d4a            # this tree vs that commit
    .venv/bin/python benchmarks/engine_ab.py --rev f522d4a --new HEAD --prompts 4 --rounds 3

Two package versions cannot share a process, so the script checks the old revision out into a
temporary git worktree and alternates worker processes (`PYTHONPATH=<tree>/src`), A B A B …,
`--rounds` times each: a change in machine load touches both alike. Each worker loads the tuned
exits (default: the H100-tuned MLP exits with gates, benchmarks/exits/smollm2-mlp-10-20-h100),
warms up every setting, then decodes the same XSum prompts (batch 1, greedy, fp32, chat
template) with every setting interleaved prompt by prompt, and reports generated tokens ÷
decode seconds per setting. Per setting the result is the ratio of the two versions' summed
tokens/s over rounds (new ÷ old), the per-round ratios and their median (robust to a round that
other work on the machine disturbed); outputs are checked identical.
Prints one JSON line and writes it to benchmarks/results/engine_ab-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent

SETTINGS = {  # name -> DecodeOptions fields common to both versions
    "full": {"mode": "full"},
    "early-exit max-prob 0.9": {"mode": "early-exit", "threshold": 0.9},
    "early-exit max-prob 0.4": {"mode": "early-exit", "threshold": 0.4},
    "early-exit gate 0.8": {"mode": "early-exit", "threshold": 0.8, "confidence": "gate"},
    "self-spec 0.5/4": {"mode": "self-spec", "threshold": 0.5, "draft_len": 4},
}

WORKER = r'''
import json, sys, torch
torch.manual_seed(0)
from eetune import EarlyExitModel, load_tokenizer
from eetune.decode import DecodeOptions, generate
args = json.loads(sys.argv[1])
model = EarlyExitModel.from_pretrained(args["exits"])
model.eval()
tok = load_tokenizer(model.backbone)
prompts = []
for line in open(args["xsum"], encoding="utf-8"):
    doc = json.loads(line)["document"]
    ids = tok(doc, add_special_tokens=False)["input_ids"][:args["doc_tokens"]]
    text = "Summarize the following news article in one sentence.\n\n" + tok.decode(ids)
    x = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                return_dict=False)
    prompts.append(list(x["input_ids"]) if hasattr(x, "keys") else list(x))
    if len(prompts) == args["prompts"]:
        break
for name, kw in args["settings"].items():  # warm-up: every setting once, untimed
    generate(model, [prompts[0]], DecodeOptions(max_new_tokens=8, **kw))
tokens = {n: 0 for n in args["settings"]}
seconds = {n: 0.0 for n in args["settings"]}
ids = {n: [] for n in args["settings"]}
for p in prompts:
    for name, kw in args["settings"].items():
        g = generate(model, [p], DecodeOptions(max_new_tokens=args["new_tokens"], **kw))
        tokens[name] += len(g.rows[0].ids)
        seconds[name] += g.seconds
        ids[name].append(g.rows[0].ids)
print(json.dumps({"tokens": tokens, "seconds": seconds, "ids": ids}))
'''


def worker(tree: Path, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    from eetune.model.defaults import default_data_file
    payload = json.dumps({"exits": str(Path(args.exits).resolve()), "prompts": args.prompts,
                          "xsum": str(default_data_file("xsum_test.jsonl")),
                          "doc_tokens": args.doc_tokens, "new_tokens": args.new_tokens, "settings": SETTINGS})
    proc = subprocess.run([sys.executable, "-c", WORKER, payload], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"worker for {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="the earlier git revision (A)")
    ap.add_argument("--new", default=None, help="the later git revision (B; default: this working tree)")
    ap.add_argument("--exits", default=str(ROOT / "exits" / "smollm2-mlp-10-20-h100"))
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    old = Path(tempfile.mkdtemp(prefix="eetune-ab-")) / "tree"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.rev], check=True,
                   capture_output=True)
    new = REPO
    if args.new:
        new = Path(tempfile.mkdtemp(prefix="eetune-ab-")) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(new), args.new], check=True,
                       capture_output=True)
    try:
        runs = {"old": [], "new": []}
        for r in range(args.rounds):
            for which, tree in (("old", old), ("new", new)) if r % 2 == 0 else (("new", new), ("old", old)):
                runs[which].append(worker(tree, args))
                print(f"round {r + 1}/{args.rounds} {which} done", file=sys.stderr, flush=True)
    finally:
        for tree in {old, new} - {REPO}:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False,
                           capture_output=True)

    def tps(run, name):
        return run["tokens"][name] / run["seconds"][name]
    result = {}
    for name in SETTINGS:
        per_round = [tps(n, name) / tps(o, name) for n, o in zip(runs["new"], runs["old"])]
        same = all(n["ids"][name] == o["ids"][name] for n, o in zip(runs["new"], runs["old"]))
        result[name] = {"new_over_old": round(sum(tps(n, name) for n in runs["new"])
                                              / sum(tps(o, name) for o in runs["old"]), 4),
                        "per_round": [round(x, 4) for x in per_round],
                        "median_round": round(statistics.median(per_round), 4),
                        "old_tokens_per_s": round(sum(tps(o, name) for o in runs["old"]) / args.rounds, 2),
                        "identical_outputs": same}
    import torch
    import transformers
    line = {"benchmark": "engine_ab", "old_rev": args.rev, "new_rev": args.new or "working tree", "settings": result,
            "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
            "torch": torch.__version__, "transformers": transformers.__version__, "exits": "benchmarks/exits/"
            + Path(args.exits).name, "prompts": args.prompts, "doc_tokens": args.doc_tokens,
            "new_tokens": args.new_tokens, "rounds": args.rounds, "batch": 1, "dtype": "fp32",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(json.dumps(line))
    out = ROOT / "results" / f"engine_ab-{args.tag}.json"
    out.write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()

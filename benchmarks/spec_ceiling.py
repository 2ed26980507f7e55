"""Self-speculation on a draft exit, simulated teacher forced: its predicted speedup and its ceiling.

    .venv/bin/python benchmarks/spec_ceiling.py --exits benchmarks/exits/gemma3-draft-18-k16k --draft-exit 18 \
        --rules 0.5:4,0.5:6,0.3:6 --tag cpu-gemma3-draft18-k16k

Self-speculation is lossless, so the text it emits is `full`'s, and the draft exit's prediction
and confidence at every position of that text are what a teacher-forced pass over it gives
(`eetune.measure.calibrate.token_table`; KV recomputation keeps hidden states exact). This script
decodes `--prompts` XSum documents in `full` (the prompts `benchmarks/decode_speed.py` times),
takes that table for the draft exit, and replays the rounds:

- a **rule** `t:n` drafts while the exit's confidence >= t (and its OTHER class does not win),
  at most n tokens; the round emits the leading accepted drafts and one token of the full model;
- the **oracle** `n` drafts exactly the tokens that will be accepted, at most n: the ceiling of any
  stopping rule at that draft length with zero-cost decisions (issue 18's "ceiling").

A round's cost is `eetune.decode.policy.DraftPolicy`'s model with the costs measured in this run
(`measure_costs`, each figure the median of `--cost-repeats` runs: one layer, the 5-token block,
the LM head on 1 and 5 rows, the draft head):
(n + 1) d layers + n draft heads + (L - d) layers and the LM head on n + 1 rows. Speedup = the
cost of one full step per token ÷ the cost per emitted token. Prints one JSON line and writes it
to benchmarks/results/spec_ceiling-<tag>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from decode_speed import _repo_relative, xsum_prompts  # noqa: E402
from prediction import continuation_table, run_meta, save_result  # noqa: E402
from eetune import EarlyExitModel, load_tokenizer  # noqa: E402
from eetune.decode import DecodeOptions, generate  # noqa: E402
from eetune.decode.policy import DraftPolicy, measure_costs  # noqa: E402


def replay(conf: list[float], agree: list[bool], t: float | None, n: int, cost) -> dict:
    """Rounds over one continuation (tokens 1.. of it; token 0 is the prefill's). `t` None: the
    oracle. `cost(k)`: seconds of a round with k drafts."""
    i, seconds, rounds, drafted, accepted = 0, 0.0, 0, 0, 0
    while i < len(conf):
        k = 0
        while k < n and i + k < len(conf) and (agree[i + k] if t is None else conf[i + k] >= t):
            k += 1
        a = 0
        while a < k and agree[i + a]:
            a += 1
        seconds += cost(k)
        rounds, drafted, accepted = rounds + 1, drafted + k, accepted + a
        i += a + 1
    return {"seconds": seconds, "rounds": rounds, "drafted": drafted, "accepted": accepted}


def median_costs(model, repeats: int) -> dict:
    """`measure_costs` `repeats` times afresh, each figure the median: the LM head's cost is a
    difference of two timings and one measurement of it can be 1.5x off on this CPU."""
    import statistics

    runs = []
    for _ in range(repeats):
        model._eetune_costs = None  # measure_costs caches on the model
        runs.append(measure_costs(model, DecodeOptions()))
    out = {**runs[-1], "repeats": repeats}
    for k in ("layer", "layer_x5", "final", "final_x5"):
        out[k] = statistics.median(r[k] for r in runs)
    out["heads"] = {h: {**runs[-1]["heads"][h], **{f: statistics.median(r["heads"][h][f] for r in runs)
                                                    for f in ("transform", "projection")}}
                    for h in runs[-1]["heads"]}
    model._eetune_costs = out
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", required=True)
    ap.add_argument("--draft-exit", type=int, default=None, help="the drafting exit (default: the deepest)")
    ap.add_argument("--rules", default="0.5:4,0.5:6,0.3:6", help="threshold:draft_len pairs to replay")
    ap.add_argument("--oracle", default="4,6,8,16", help="draft lengths of the oracle")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--doc-tokens", type=int, default=384)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--cost-repeats", type=int, default=5, help="measure_costs runs, each cost their median")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)

    model = EarlyExitModel.from_pretrained(args.exits)
    model.eval()
    tok = load_tokenizer(model.backbone)
    d = args.draft_exit or max(model.exit_layers)
    if d not in model.exit_layers:
        sys.exit(f"spec_ceiling: no exit after layer {d} in {args.exits} (exits {list(model.exit_layers)})")
    row = model.exit_layers.index(d)
    prompts, _ = xsum_prompts(tok, args.prompts, args.doc_tokens, chat=not args.no_chat)
    eos = tuple(sorted({tok.eos_token_id, *([model.backbone.config.eos_token_id]
                                               if isinstance(model.backbone.config.eos_token_id, int) else [])}))
    tables = []
    for i, p in enumerate(prompts):
        new = generate(model, [p], DecodeOptions(mode="full", max_new_tokens=args.max_new_tokens,
                                                 eos_token_ids=eos)).rows[0].ids
        if len(new) > 1:
            c, a = continuation_table(model, p, new)
            tables.append((c[row].tolist(), a[row].tolist()))
        print(f"prompt {i + 1}/{len(prompts)} continued", file=sys.stderr, flush=True)

    costs = median_costs(model, args.cost_repeats)
    policy = DraftPolicy(model, costs, draft_len=max(16, *[int(x) for x in args.oracle.split(",")]), draft_vocab=None)
    full_step = costs["num_layers"] * costs["layer"] + costs["final"]
    tokens = sum(len(c) for c, _ in tables)

    def summary(t, n) -> dict:
        runs = [replay(c, a, t, n, lambda k: policy.cost(d, k)) for c, a in tables]
        tot = {k: sum(r[k] for r in runs) for k in runs[0]}
        return {"threshold": t, "draft_len": n, "speedup": tokens * full_step / tot["seconds"],
                "tokens_per_round": tokens / tot["rounds"], "drafted": tot["drafted"], "accepted": tot["accepted"],
                "acceptance": tot["accepted"] / tot["drafted"] if tot["drafted"] else None}

    rules = [summary(float(t), int(n)) for t, n in (x.split(":") for x in args.rules.split(",") if x)]
    oracle = [summary(None, int(n)) for n in args.oracle.split(",") if n]
    agree_all = sum(sum(a) for _, a in tables) / tokens
    result = {"exits": _repo_relative(args.exits), "draft_exit": d, "num_layers": costs["num_layers"],
              "tokens": tokens, "draft_agreement": agree_all, "rules": rules, "oracle": oracle,
              "costs_s": {k: costs[k] for k in ("layer", "layer_x5", "final", "final_x5")}, "cost_repeats": args.cost_repeats,
              "draft_head_s": policy.head_cost[d], "full_step_s": full_step,
              "prompts": len(prompts), "doc_tokens": args.doc_tokens, "max_new_tokens": args.max_new_tokens,
              **run_meta()}
    out = save_result(result, f"spec_ceiling-{args.tag}.json")
    print(f"\ndraft exit {d}: top-1 equal to the final layer's on {agree_all:.3f} of {tokens} tokens")
    for r in rules + oracle:
        name = "oracle" if r["threshold"] is None else f"t={r['threshold']}"
        print(f"{name:<8} n={r['draft_len']:<3} predicted {r['speedup']:.3f}x  {r['tokens_per_round']:.2f} tokens/round  "
              f"acceptance {r['acceptance'] if r['acceptance'] is not None else float('nan'):.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

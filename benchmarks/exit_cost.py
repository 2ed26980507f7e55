"""What an exit costs, in decoder-layer equivalents, measured by the engine's own cost measurement.

    .venv/bin/python benchmarks/exit_cost.py --model smollm2-135m --exits 10,20
    .venv/bin/python benchmarks/exit_cost.py --model gemma3-270m --exits 12,16
    .venv/bin/python benchmarks/exit_cost.py --model smollm2-135m --exit-vocab 2k,4k,8k,16k,32k,all

Converts untuned `norm` and `mlp` exits (shared LM head) at `--exits` and runs
`eetune.decode.policy.measure_costs` (one token on a 64-token context, best of 5, the engine's own
segments) `--repeats` times: per exit its transform and vocabulary projection, and the final
norm + LM head, each divided by the time of one decoder layer.

With `--exit-vocab`, the heads are restricted (issue 18) to the K most frequent tokens of the
default tuning data (BoolQ training passages) plus OTHER, for each K, and beside the cost the
coverage is reported: the share of held-out tokens (BoolQ dev passages) inside the K, and the
share of the final layer's top-1 predictions on them inside the K (a token outside can never
leave early). The knee of cost against coverage is the default K. Prints one JSON line and writes
it to benchmarks/results/exit_cost-<model>-<device>[-vocab].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from eetune import DecodeOptions, EarlyExitModel, load_backbone  # noqa: E402
from eetune.decode.policy import measure_costs  # noqa: E402


def cost_in_layers(model, exits, repeats: int) -> dict:
    """Median over `repeats` fresh `measure_costs` runs: each exit's transform + projection and the
    final norm + LM head, in decoder layers."""
    runs = []
    for _ in range(repeats):
        model._eetune_costs = None  # measure afresh
        runs.append(measure_costs(model, DecodeOptions()))
    layer = statistics.median(r["layer"] for r in runs)
    final = statistics.median(r["final"] for r in runs) / layer
    per_exit = {str(k): round(statistics.median((r["heads"][k]["transform"] + r["heads"][k]["projection"])
                                                for r in runs) / layer, 2) for k in exits}
    projection = {str(k): round(statistics.median(r["heads"][k]["projection"] for r in runs) / layer, 2)
                  for k in exits}
    return {"exit_layers_equivalent": per_exit, "projection_layers_equivalent": projection,
            "lm_head_layers_equivalent": round(final, 2), "layer_ms": round(layer * 1e3, 3)}


def sweep(bb, exits, args) -> dict:
    """Cost and coverage of restricted heads for each K of `--exit-vocab`."""
    from eetune.model.backbone import load_tokenizer
    from eetune.model.heads import parse_exit_vocab
    from eetune.train.data import train_val_blocks
    from eetune.train.tune import rank_vocabulary

    tok = load_tokenizer(bb)
    train, _, info = train_val_blocks("default", tok, 512, val_blocks=0, progress=False)
    ranking = rank_vocabulary(train, bb.vocab_size)
    dev_blocks, _, dev_info = train_val_blocks("default-dev", tok, 256, val_blocks=0, progress=False)
    held = dev_blocks.reshape(-1)
    # the final layer's top-1 on the first held-out blocks (teacher forced)
    n_blocks = max(1, args.coverage_tokens // dev_blocks.shape[1])
    top1 = []
    for b in range(0, n_blocks, 4):
        ids = dev_blocks[b:min(b + 4, n_blocks)].to(bb.model.device)
        out = bb.model(input_ids=ids)
        top1.append(out.logits.argmax(-1).reshape(-1).cpu())
    top1 = torch.cat(top1)
    rank_of = torch.empty_like(ranking)
    rank_of[ranking] = torch.arange(ranking.numel())
    rows = {}
    for spec in args.exit_vocab.split(","):
        K = parse_exit_vocab(spec, bb.vocab_size)
        K_eff = bb.vocab_size if K is None else K
        row = {"K": K_eff, "coverage_text": round(float((rank_of[held] < K_eff).float().mean()), 4),
               "coverage_final_top1": round(float((rank_of[top1] < K_eff).float().mean()), 4)}
        model = EarlyExitModel.convert(bb, exits, arch="norm", output_embedding="shared",
                                       exit_vocab_ids=None if K is None else ranking[:K])
        row["norm"] = cost_in_layers(model, exits, args.repeats)
        rows[spec] = row
        print(json.dumps({spec: row}), file=sys.stderr)
    return {"ranked_by": "data", "ranking_data": info.get("source"), "ranking_tokens": int(train.numel()),
            "held_out": dev_info.get("source"), "held_out_tokens": int(held.numel()),
            "top1_tokens": int(top1.numel()), "by_k": rows}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--exits", default="10,20")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per head kind; the median is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--exit-vocab", default=None,
                    help="comma-separated K values (2k, 4096, all): sweep restricted-vocabulary heads")
    ap.add_argument("--coverage-tokens", type=int, default=8192,
                    help="held-out tokens whose final-layer top-1 is checked against each K")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    bb = load_backbone(args.model, device=args.device)
    exits = [int(k) for k in args.exits.split(",")]
    out = {"model": args.model, "num_layers": bb.num_layers, "hidden_size": bb.hidden_size,
           "vocab_size": bb.vocab_size, "exit_layers": exits, "heads": {}}
    if args.exit_vocab:
        out["sweep"] = sweep(bb, exits, args)
    else:
        for arch in ("norm", "mlp"):
            model = EarlyExitModel.convert(bb, exits, arch=arch, output_embedding="shared")
            out["heads"][arch] = cost_in_layers(model, exits, args.repeats)
    dev = torch.device(args.device)
    import transformers
    out.update({"device": args.device,
                "machine": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"),
                "dtype": "fp32", "torch": torch.__version__, "transformers": transformers.__version__,
                "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M")})
    print(json.dumps(out))
    path = ROOT / "results" / f"exit_cost-{args.model}-{dev.type}{'-vocab' if args.exit_vocab else ''}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

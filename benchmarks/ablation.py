"""Ablation: check the EE-Tuning paper's findings on the default model, at equal steps.

    .venv/bin/python benchmarks/ablation.py                 # small: 15 steps of 2 x 128 tokens per run
    .venv/bin/python benchmarks/ablation.py --steps 100 --batch-size 8 --seq-len 256

Exits after layers 10 and 20 of SmolLM2-135M (30 layers), own (copied) output embeddings,
AdamW, the same BoolQ training blocks and held-out validation blocks for every run, through
`eetune.train.tune.tune`. The runs share one `--cache-hidden` directory, so only the first one runs the
backbone; the others read the trunk's hidden states from disk. Compared:
- copy vs random initialisation (`norm` exits);
- shallow (layer 10) vs deep (layer 20) exits (every run);
- `embedding` / `norm` / `mlp` / `layer` architectures;
- fixed vs dynamic token-wise loss weights (`mlp` exits).
Prints one JSON line per run and a table; writes benchmarks/results/ablation.json (with machine,
versions and settings) and ablation.png (training-loss curves).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RUNS = {  # name -> (arch, init, dynamic weights)
    "norm-copy": ("norm", "copy", False),
    "norm-random": ("norm", "random", False),
    "embedding-copy": ("embedding", "copy", False),
    "mlp-copy": ("mlp", "copy", False),
    "layer-copy": ("layer", "copy", False),
    "mlp-copy-dynamic": ("mlp", "copy", True),
}
EXITS = (10, 20)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--val-blocks", type=int, default=4)
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ablation"))
    args = ap.parse_args()

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    import transformers

    import eetune
    from eetune.cli import main as cli
    from eetune.train.tune import TuneConfig, tune

    settings = {"model": "smollm2-135m", "exits": list(EXITS), "output_embedding": "copy", "steps": args.steps,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "lr": args.lr, "warmup": args.warmup,
                "decay": "linear to 0.1", "val_blocks": args.val_blocks, "data": "default (BoolQ training passages)",
                "dtype": "fp32", "hidden_cache": "bf16"}
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
               "transformers": transformers.__version__, "eetune": eetune.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    results, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        work = Path(tmp)
        cache = work / "hidden"
        untuned_val = {}
        for name in args.runs.split(","):
            arch, init, dynamic = RUNS[name]
            exits = work / f"exits-{arch}-{init}"
            if not exits.exists():
                assert cli(["convert", "--model", "smollm2-135m", "--exits", ",".join(map(str, EXITS)), "--arch", arch,
                            "--init", init, "--out", str(exits)]) == 0
            base = dict(data="default", seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                        warmup=args.warmup, val_blocks=args.val_blocks, max_blocks=args.steps * args.batch_size,
                        progress=False, cache_hidden=str(cache))
            if (arch, init) not in untuned_val:  # validation CE of the untouched heads (lr ~ 0, one step)
                z = tune(exits, work / f"zero-{arch}-{init}", TuneConfig(**{**base, "steps": 1, "lr": 1e-12,
                                                                             "warmup": 0}))
                untuned_val[(arch, init)] = z["val_loss"]
            t = time.time()
            s = tune(exits, work / f"out-{name}", TuneConfig(**base, steps=args.steps, dynamic_weights=dynamic))
            with open(work / f"out-{name}.train" / "log.csv") as f:
                rows = list(csv.DictReader(f))
            curves[name] = {k: [float(r[f"loss_{k}"]) for r in rows] for k in EXITS}
            row = {"run": name, "arch": arch, "init": init, "dynamic_weights": dynamic,
                   "val_ce_untuned": untuned_val[(arch, init)], "val_ce": s["val_loss"],
                   "train_ce_last": s["train_loss"], "tokens": s["tokens"], "wall_s": round(time.time() - t, 1),
                   "trunk_layers_held": s["trunk_layers_held"]}
            print(json.dumps(row), flush=True)
            results.append(row)

    # The findings, as measured (True / False), and a table.
    by = {r["run"]: r for r in results}
    v = lambda run, k: by[run]["val_ce"][str(k)]  # noqa: E731
    findings = {}
    if {"norm-copy", "norm-random"} <= set(by):
        findings["copy init beats random init (both exits)"] = all(v("norm-copy", k) < v("norm-random", k) for k in EXITS)
    findings["deeper exit (20) beats shallower (10), every run"] = all(v(r, 20) < v(r, 10) for r in by)
    archs = [a for a in ("embedding-copy", "norm-copy", "mlp-copy", "layer-copy") if a in by]
    if archs:
        order = sorted(archs, key=lambda a: v(a, 20))
        findings["architectures by exit-20 validation CE (best first)"] = order
        if {"embedding-copy", "norm-copy", "mlp-copy", "layer-copy"} <= set(by):
            findings["more head parameters -> lower CE (layer <= mlp <= norm <= embedding at exit 20)"] = (
                v("layer-copy", 20) <= v("mlp-copy", 20) <= v("norm-copy", 20) <= v("embedding-copy", 20))
    if {"mlp-copy", "mlp-copy-dynamic"} <= set(by):
        d = {k: v("mlp-copy-dynamic", k) - v("mlp-copy", k) for k in EXITS}
        findings["dynamic minus fixed weights, validation CE per exit"] = d
    print("\n| run | val CE exit 10 (untuned -> tuned) | val CE exit 20 (untuned -> tuned) |")
    print("| --- | --- | --- |")
    for r in results:
        cells = [f"{r['val_ce_untuned'][str(k)]:.2f} -> {r['val_ce'][str(k)]:.2f}" for k in EXITS]
        print(f"| {r['run']} | {cells[0]} | {cells[1]} |")
    for k, val in findings.items():
        print(f"- {k}: {val}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"machine": machine, "settings": settings, "results": results,
                                               "findings": findings, "curves": curves}, indent=2) + "\n")
    panels = [("initialisation (norm exits)", ["norm-copy", "norm-random"]),
              ("architecture", archs),
              ("loss weighting (mlp exits)", ["mlp-copy", "mlp-copy-dynamic"])]
    panels = [(t, [n for n in names if n in curves]) for t, names in panels]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for i, n in enumerate(names):
            colour = f"C{i}"
            for k, style in zip(EXITS, ("--", "-")):
                ys = curves[n][k]
                ax.plot(range(1, len(ys) + 1), ys, style, color=colour, label=f"{n}, exit {k}")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("training CE (nats)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.suptitle(f"EE-Tuning ablation, SmolLM2-135M, {args.steps} steps x {args.batch_size}x{args.seq_len} tokens")
    fig.tight_layout()
    fig.savefig(f"{out}.png", dpi=110)
    print(f"wrote {out}.json and {out}.png", file=sys.stderr)


if __name__ == "__main__":
    main()

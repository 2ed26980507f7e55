"""Tuning cost: EE-Tuning step time and peak memory against full-parameter fine-tuning.

    .venv/bin/python benchmarks/tune_cost.py                      # small default: 2 x 256 tokens per step
    .venv/bin/python benchmarks/tune_cost.py --batch-size 4 --seq-len 512 --steps 4

On the default model (SmolLM2-135M, 30 layers), one run, one machine, the same batch of BoolQ
training blocks and the same optimizer (AdamW, betas 0.9/0.95, clip 1.0, fp32):
- `full`: a full-parameter fine-tuning step (all 135M weights trainable, LM loss at the top);
- EE-Tuning through `eetune.train.tune.tune` itself, exits after layers 10 and 20 (1/3 and 2/3 of
  depth): `norm` with copied and with shared output embeddings, `mlp` and `layer` (copied output
  embeddings, the paper's default), and an epoch served from `--cache-hidden` (every hidden state
  already on disk, so no backbone layer is held or run) for `norm` copy and shared.
Each configuration runs in a fresh process (its exits are converted in another), so its peak
resident memory is its own: peak RSS (VmHWM) above the process's RSS right after importing torch,
transformers (with the model's modelling module), accelerate, safetensors and eetune (the
baseline, also reported), so the ratios compare what each
configuration allocates rather than the shared libraries. With the paper's LM loss (`--distill 0`,
used here) tune loads the backbone only up to the deepest exit (partial loading). Step time is the median over the steps after the first. Prints one JSON line per configuration
with its ratios to `full`, and writes them all with machine, versions and settings to
benchmarks/results/tune_cost.json.
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

CONFIGS = {  # name -> (arch, output embedding, served from the hidden-state cache)
    "norm-copy": ("norm", "copy", False),
    "norm-shared": ("norm", "shared", False),
    "mlp-copy": ("mlp", "copy", False),
    "layer-copy": ("layer", "copy", False),
    "norm-copy-cached": ("norm", "copy", True),
    "norm-shared-cached": ("norm", "shared", True),
}
EXITS = (10, 20)


def run_full(args) -> dict:
    """Full-parameter fine-tuning steps of the default model (the baseline)."""
    import torch
    import torch.nn.functional as F

    from eetune import load_backbone, load_tokenizer
    from eetune.train.data import train_val_blocks

    bb = load_backbone("smollm2-135m")
    train, _, _ = train_val_blocks("default", load_tokenizer(bb), args.seq_len, 1, args.batch_size * args.steps)
    model = bb.model
    model.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-5, betas=(0.9, 0.95), eps=1e-8)
    times = []
    for s in range(args.steps):
        ids = train[s * args.batch_size:(s + 1) * args.batch_size]
        t = time.perf_counter()
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in model.parameters())
    return {"step_s": times, "trainable_params": trainable}


def run_ee(args, name: str, work: Path) -> dict:
    """EE-Tuning steps through eetune.train.tune.tune; step times from its CSV log."""
    import csv

    from eetune.cli import main
    from eetune.train.tune import TuneConfig, tune

    arch, emb, cached = CONFIGS[name]
    exits = work / f"exits-{arch}-{emb}"
    if args.convert_only:
        if not exits.exists():
            assert main(["convert", "--model", "smollm2-135m", "--exits", ",".join(map(str, EXITS)), "--arch",
                         arch, "--output-embedding", emb, "--out", str(exits)]) == 0
        return {}
    blocks = args.batch_size * args.steps
    cfg = TuneConfig(data="default", steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=1e-5,
                     val_blocks=1, max_blocks=blocks, progress=False, distill=0.0,  # the paper's LM loss
                     cache_hidden=str(work / f"cache-{arch}-{emb}") if cached else None)
    out = work / f"out-{name}"
    s = tune(exits, out, cfg)
    with open(out.with_name(out.name + ".train") / "log.csv") as f:
        times = [float(r["step_s"]) for r in csv.DictReader(f)]
    from safetensors.torch import load_file
    trainable = sum(t.numel() for k, t in load_file(str(out / "exit_heads.safetensors")).items()
                    if not (k.startswith("gate.") or k == "vocab_by_frequency"))  # the heads only
    return {"step_s": times, "trainable_params": trainable, "trunk_layers_held": s["trunk_layers_held"]}


def child(args) -> None:
    import torch
    import transformers  # noqa: F401 - part of the baseline

    import eetune  # noqa: F401
    from eetune.model.backbone import model_config
    sys.path.insert(0, str(Path(__file__).parent))
    from load_memory import import_model_code, proc_status_mb

    if args.threads:
        torch.set_num_threads(args.threads)
    import_model_code(model_config("smollm2-135m"))
    baseline = proc_status_mb("VmRSS")
    work = Path(args.work)
    if args.one == "full":
        r = run_full(args)
    else:
        r = run_ee(args, args.one, work)
    peak = proc_status_mb("VmHWM")
    r.update(peak_rss_mb=peak, baseline_rss_mb=baseline, peak_above_baseline_mb=peak - baseline)
    print("RESULT " + json.dumps(r))


def spawn(args, name: str, work: Path, convert_only: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--work", str(work), "--batch-size", str(args.batch_size),
           "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--threads", str(args.threads)]
    cmd += ["--convert-only"] if convert_only else []
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="steps per configuration (the first is not timed)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "tune_cost.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return child(args)
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is not timed)")
    import torch
    import transformers

    import eetune
    settings = {"model": "smollm2-135m", "exits": list(EXITS), "batch_size": args.batch_size,
                "seq_len": args.seq_len, "steps": args.steps, "dtype": "fp32", "optimizer": "AdamW(0.9, 0.95), clip 1.0",
                "threads": args.threads or torch.get_num_threads()}
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
               "eetune": eetune.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune_cost-") as tmp:
        work = Path(tmp)
        full = spawn(args, "full", work)
        full_step = statistics.median(full["step_s"][1:])
        row = {"config": "full", "step_s": full_step, "peak_rss_mb": full["peak_rss_mb"],
               "baseline_rss_mb": full["baseline_rss_mb"], "peak_above_baseline_mb": full["peak_above_baseline_mb"],
               "trainable_params": full["trainable_params"], "settings": settings}
        print(json.dumps(row), flush=True)
        rows.append(row)
        for name in args.configs.split(","):
            spawn(args, name, work, convert_only=True)  # not measured
            if CONFIGS[name][2]:  # fill the cache first (one epoch over the same blocks), not measured
                spawn(args, name, work)
            r = spawn(args, name, work)
            step = statistics.median(r["step_s"][1:])
            row = {"config": name, "arch": CONFIGS[name][0], "output_embedding": CONFIGS[name][1],
                   "from_cache": CONFIGS[name][2], "step_s": step, "peak_rss_mb": r["peak_rss_mb"],
                   "trainable_params": r["trainable_params"], "trunk_layers_held": r["trunk_layers_held"],
                   "baseline_rss_mb": r["baseline_rss_mb"], "peak_above_baseline_mb": r["peak_above_baseline_mb"],
                   "step_time_ratio": step / full_step,
                   "peak_memory_ratio": r["peak_above_baseline_mb"] / full["peak_above_baseline_mb"],
                   "peak_rss_ratio": r["peak_rss_mb"] / full["peak_rss_mb"],
                   "settings": settings}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": settings, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

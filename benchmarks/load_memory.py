"""Partial loading: peak memory of loading the backbone up to layer k against a full load.

    .venv/bin/python benchmarks/load_memory.py                     # default model, k = 10, 20 and full
    .venv/bin/python benchmarks/load_memory.py --layers 5,10,15,20,25

Each load runs in a fresh process: import torch, transformers (with the architecture's modelling
module), accelerate, safetensors and eetune, read VmRSS (the baseline), call `eetune.load_backbone(MODEL, up_to_layer=k)` (full: no `up_to_layer`, which is
transformers' own `from_pretrained`), read every loaded tensor once (safetensors weights may be
memory-mapped and only become resident when used, as they do in the first forward pass), then
read VmHWM (the peak). The figure compared is the peak
above the baseline. The same process then checks that the exits' hidden state at layer k equals
a reference computed from a full load in another process (bit for bit, on fixed tokens). Prints
one JSON line per load and writes all of them with machine, versions and settings to
benchmarks/results/load_memory-cpu.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise SystemExit("needs /proc/self/status (Linux)")


def import_model_code(config) -> None:
    """Import the architecture's modelling module and the loaders (accelerate, safetensors): about
    90 MB of code on this machine, the same for every load, so it belongs to the baseline."""
    import accelerate  # noqa: F401
    import safetensors.torch  # noqa: F401
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def child(args) -> None:
    import torch
    import transformers  # noqa: F401 - part of the baseline

    import eetune  # noqa: F401
    from eetune import load_backbone
    from eetune.model.backbone import model_config

    import_model_code(model_config(args.model))
    baseline = proc_status_mb("VmRSS")
    k = None if args.one == "full" else int(args.one)
    t0 = time.perf_counter()
    bb = load_backbone(args.model, up_to_layer=k)
    seconds = time.perf_counter() - t0
    with torch.no_grad():  # weights may be memory-mapped and read lazily: make every loaded byte resident
        for t in list(bb.model.parameters()) + list(bb.model.buffers()):
            t.float().sum()
    peak = proc_status_mb("VmHWM")
    params = sum(p.numel() for p in bb.model.parameters())
    loaded = sum(bb.is_loaded(i) for i in range(bb.num_layers))
    with torch.no_grad():  # hidden states at every checked depth this load holds, for the equality check
        ids = torch.arange(1, 33).unsqueeze(0) * 37 % 1000
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        h = bb.embed(ids, pos)
        ctx = bb.context(h, pos)
        states, done = {}, 0
        for depth in sorted(args.check):
            if depth > loaded:
                break
            h = bb.run_layers(h, done, depth, ctx)
            done = depth
            states[depth] = h
    from safetensors.torch import save_file
    save_file({str(d): s.contiguous() for d, s in states.items()}, args.states)
    print("RESULT " + json.dumps({"k": args.one, "baseline_rss_mb": baseline, "peak_rss_mb": peak,
                                  "peak_above_baseline_mb": peak - baseline, "params": params,
                                  "layers_loaded": loaded, "load_s": seconds}))


def spawn(args, k: str, states: Path) -> dict:
    cmd = [sys.executable, __file__, "--one", k, "--model", args.model, "--states", str(states),
           "--check", ",".join(map(str, args.check))]
    p = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"load up to {k} failed:\n{p.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", default="10,20", help="the k of each partial load (a full load is always run)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "load_memory-cpu.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--states", help=argparse.SUPPRESS)
    ap.add_argument("--check", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    ks = [int(k) for k in args.layers.split(",") if k.strip()]
    if args.one:
        args.check = [int(x) for x in args.check.split(",") if x]
        return child(args)
    args.check = ks
    import torch
    import transformers
    from safetensors.torch import load_file

    import eetune
    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
               "eetune": eetune.__version__, "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    settings = {"model": args.model, "layers": ks, "dtype": "fp32",
                "measure": "peak RSS (VmHWM) above RSS after importing torch, transformers, eetune; fresh process"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="load_memory-") as tmp:
        full = spawn(args, "full", Path(tmp) / "full.safetensors")
        ref = load_file(str(Path(tmp) / "full.safetensors"))
        row = {**full, "ratio_to_full": 1.0, "settings": settings}
        print(json.dumps(row), flush=True)
        rows.append(row)
        for k in ks:
            r = spawn(args, str(k), Path(tmp) / f"{k}.safetensors")
            got = load_file(str(Path(tmp) / f"{k}.safetensors"))
            same = all(torch.equal(got[d], ref[d]) for d in got) and str(k) in got
            row = {**r, "ratio_to_full": r["peak_above_baseline_mb"] / full["peak_above_baseline_mb"],
                   "param_ratio": r["params"] / full["params"], "hidden_states_equal_full_load": same,
                   "settings": settings}
            print(json.dumps(row), flush=True)
            rows.append(row)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "settings": settings, "results": rows}, indent=2) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()

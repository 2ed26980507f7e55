"""What an exit costs, in decoder-layer equivalents, measured by the engine's own cost measurement.

    .venv/bin/python benchmarks/exit_cost.py --model smollm2-135m --exits 10,20
    .venv/bin/python benchmarks/exit_cost.py --model gemma3-270m --exits 12,16

Converts untuned `norm` and `mlp` exits (shared LM head) at `--exits` and runs
`eetune.decode.policy.measure_costs` (one token on a 64-token context, best of 5, the engine's own
segments) `--repeats` times: per exit its transform and vocabulary projection, and the final
norm + LM head, each divided by the time of one decoder layer. This is the price restricted-
vocabulary heads (issue 18) must bring under the layers an exit skips. Prints one JSON line and
writes it to benchmarks/results/exit_cost-<model>-<device>.json.
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--exits", default="10,20")
    ap.add_argument("--repeats", type=int, default=3, help="measurements per head kind; the median is kept")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    bb = load_backbone(args.model, device=args.device)
    exits = [int(k) for k in args.exits.split(",")]
    out = {"model": args.model, "num_layers": bb.num_layers, "hidden_size": bb.hidden_size,
           "vocab_size": bb.vocab_size, "exit_layers": exits, "heads": {}}
    for arch in ("norm", "mlp"):
        model = EarlyExitModel.convert(bb, exits, arch=arch, output_embedding="shared")
        runs = []
        for _ in range(args.repeats):
            model._eetune_costs = None  # measure afresh
            runs.append(measure_costs(model, DecodeOptions()))
        layer = statistics.median(r["layer"] for r in runs)
        final = statistics.median(r["final"] for r in runs) / layer
        per_exit = {str(k): round(statistics.median((r["heads"][k]["transform"] + r["heads"][k]["projection"])
                                                    for r in runs) / layer, 2) for k in exits}
        out["heads"][arch] = {"exit_layers_equivalent": per_exit, "lm_head_layers_equivalent": round(final, 2),
                              "layer_ms": round(layer * 1e3, 3)}
    dev = torch.device(args.device)
    import transformers
    out.update({"device": args.device,
                "machine": (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
                            f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"),
                "dtype": "fp32", "torch": torch.__version__, "transformers": transformers.__version__,
                "repeats": args.repeats, "date": time.strftime("%Y-%m-%d %H:%M")})
    print(json.dumps(out))
    path = ROOT / "results" / f"exit_cost-{args.model}-{dev.type}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

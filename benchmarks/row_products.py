"""Few-row products on this machine: `F.linear` against `eetune.model.rows.linear`.

    .venv/bin/python benchmarks/row_products.py [--model smollm2-135m|gemma3-270m|both]

For the embedded models' real shapes (random fp32 weights of their sizes, so no download is
needed): the LM head alone, and every linear layer of the decoder stack in turn (distinct
weights, so they stream from memory as in decoding), at 1, 2, 3, 4, 5 and 8 rows. Median of
repeated timings, both paths interleaved. Prints one JSON line and writes it to
benchmarks/results/row_products-<tag>.json with the machine and versions.
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

from eetune.model.rows import linear  # noqa: E402

# (vocabulary, hidden, layers, [(out, in) of each linear layer in one decoder layer])
SHAPES = {
    "smollm2-135m": (49152, 576, 30, [(576, 576), (192, 576), (192, 576), (576, 576),
                                      (1536, 576), (1536, 576), (576, 1536)]),
    "gemma3-270m": (262144, 640, 18, [(1024, 640), (256, 640), (256, 640), (640, 1024),
                                      (2048, 640), (2048, 640), (640, 2048)]),
}
ROWS = (1, 2, 3, 4, 5, 8)


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return 1e3 * ts[len(ts) // 2]


def measure(name: str, repeats: int) -> dict:
    V, H, L, layer_shapes = SHAPES[name]
    g = torch.Generator().manual_seed(0)
    head = torch.randn(V, H, generator=g)
    stack = [[torch.randn(o, i, generator=g) for o, i in layer_shapes] for _ in range(L)]
    out = {"head": {}, "layers": {}}
    for m in ROWS:
        xs = {i: torch.randn(m, i, generator=g) for _, i in layer_shapes}
        xh = torch.randn(m, H, generator=g)

        def run_stack(f):
            for layer in stack:
                for w in layer:
                    f(xs[w.shape[1]], w)
        res = {}
        for path, f in (("F.linear", torch.nn.functional.linear), ("rows.linear", linear)):
            res[path] = {"head_ms": median_ms(lambda: f(xh, head), repeats),
                         "layers_ms": median_ms(lambda: run_stack(f), repeats)}
        for part in ("head", "layers"):
            a, b = res["F.linear"][f"{part}_ms"], res["rows.linear"][f"{part}_ms"]
            out[part][str(m)] = {"F.linear_ms": round(a, 2), "rows.linear_ms": round(b, 2), "speedup": round(a / b, 2)}
        print(f"{name} rows={m}: head {res['F.linear']['head_ms']:.1f} -> {res['rows.linear']['head_ms']:.1f} ms, "
              f"{L} layers {res['F.linear']['layers_ms']:.1f} -> {res['rows.linear']['layers_ms']:.1f} ms",
              file=sys.stderr, flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="both", choices=["both", *SHAPES])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)
    import transformers
    names = list(SHAPES) if args.model == "both" else [args.model]
    result = {"benchmark": "row_products", "dtype": "fp32", "rows": list(ROWS), "repeats": args.repeats,
              "machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
                         f"{torch.get_num_threads()} threads)",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M"),
              "models": {n: measure(n, args.repeats) for n in names}}
    line = json.dumps(result)
    print(line)
    path = ROOT / "results" / f"row_products-{args.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(line + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

"""Engine efficiency with forced exit decisions: how much of the layer savings the engine keeps.

    .venv/bin/python benchmarks/engine_trace.py                      # CPU: SmolLM2-135M shape
    .venv/bin/python benchmarks/engine_trace.py --shapes smollm2-135m,llama-3.2-1b --new-tokens 48
    python benchmarks/engine_trace.py --device cuda --dtype bf16 --shapes smollm2-135m,llama-3.2-1b,llama-2-7b
    python benchmarks/engine_trace.py --device cuda --dtype bf16 --hf-compile --compile --shapes llama-3.2-1b

Exit quality is measured elsewhere (decode_speed.py, eetune evaluate); here the exit decisions
are *forced*, so the engine's cost is measured apart from how good the exits are. Models are
random weights of real shapes (timing depends on shapes and control flow, not on weight values),
with MLP exits sharing the LM head and random gates. Decisions come from

- synthetic mixes: `none` (every exit evaluated, none taken: the decision overhead),
  `50/25` (50% of tokens leave at the first exit, 25% at the second), `75/0`;
- traces recorded with the real tuned default model on XSum (benchmarks/traces/, written by
  decode_speed.py --save-traces): per token the exit it left at, per self-spec round how many
  tokens were drafted and accepted. Exit i of the recording maps to exit i of the shape.

Per row: ms/token of HF `generate`, our `full`, early exit (forced, with gates or max-prob) or
self-spec (replayed rounds), realized speedup over `full`, the layer-count ideal (layers ÷ mean
exit layer; for self-spec, full layer passes ÷ the round's drafted-through-d plus verified
layers with a block costing one pass), the realized ÷ ideal ratio, and a cost-model ideal that
also counts the measured cost of the exit head and LM head each token pays. ms/token excludes
the prefill (timed separately and subtracted). All settings of a shape are interleaved, best of
`--reps`. One JSON line per row; all rows go to benchmarks/results/engine_trace-<tag>.jsonl.

Our engine records its segments as CUDA graphs on a GPU and runs them eagerly on a CPU.
`--compile` adds our `full` through torch.compile'd segments; `--hf-compile` adds HF `generate` with a static cache,
which transformers compiles (torch.compile, mode reduce-overhead) on a GPU. Every row also
gives ms/token ÷ the memory-bandwidth floor: the bytes of the weights one token reads (decoder
layers, final norm, LM head) ÷ the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))

from eetune import EarlyExitModel  # noqa: E402
from eetune.model.backbone import adapter_for  # noqa: E402
from eetune.decode import DecodeOptions, generate  # noqa: E402
from eetune.decode.policy import measure_costs  # noqa: E402
from eetune.model.gates import ExitGate  # noqa: E402

SHAPES = {  # Llama-architecture shapes: layers, hidden, MLP, heads, KV heads, vocabulary, exits
    "smollm2-135m": dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, exits=(10, 20), tie_word_embeddings=True),
    "llama-3.2-1b": dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, exits=(4, 8), tie_word_embeddings=True),
    "llama-2-7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000, exits=(8, 16), tie_word_embeddings=False),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig
    spec = dict(SHAPES[shape])
    exits = spec.pop("exits")
    cfg = LlamaConfig(**spec, max_position_embeddings=4096, initializer_range=0.02)
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they are used (a 7B CPU init takes minutes)
        hf = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval().requires_grad_(False)
    bb = adapter_for(hf)
    bb.source, bb.revision, bb.model_path = f"random-{shape}", None, None
    model = EarlyExitModel.convert(bb, exits, arch="mlp", output_embedding="shared")
    model.heads.to(device=device, dtype=dtype)
    model.set_gates({k: ExitGate(cfg.hidden_size, device=device) for k in exits})
    model.vocab_by_frequency = torch.randperm(cfg.vocab_size, device=device)
    return model


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def synthetic(kind: str, exits, L: int, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    if kind == "none":
        return [L] * n
    p1, p2 = (int(x) / 100 for x in kind.split("/"))
    out = []
    for _ in range(n):
        r = rng.random()
        out.append(exits[0] if r < p1 else exits[1] if r < p1 + p2 else L)
    return out


def load_traces(path: Path, exits, L: int, n: int, wanted: list[str]) -> tuple[dict, dict]:
    """Recorded traces whose setting name contains one of `wanted`, mapped onto this shape's
    exits; early-exit traces cut or cycled to n tokens."""
    if not path.is_file():
        return {}, {}
    data = json.loads(path.read_text())
    data["early_exit"] = {k: v for k, v in data.get("early_exit", {}).items() if any(w in k for w in wanted)}
    data["self_spec"] = {k: v for k, v in data.get("self_spec", {}).items() if any(w in k for w in wanted)}
    src_exits, src_L = data["exit_layers"], data["num_layers"]
    mapping = {k: exits[i] for i, k in enumerate(src_exits)}
    mapping[src_L] = L
    ee, ss = {}, {}
    for name, per_prompt in data.get("early_exit", {}).items():
        seq = [mapping.get(k, L) for prompt in per_prompt for k in prompt]
        ee[name] = (seq * (n // max(1, len(seq)) + 1))[:n]
    for name, per_prompt in data.get("self_spec", {}).items():
        rounds = [tuple(r) for prompt in per_prompt for r in prompt]
        ss[name] = rounds
    return ee, ss


def token_bytes(model) -> int:
    """Bytes of weights one decoded token reads: every decoder layer, the final norm, the LM head
    (the input embedding reads one row)."""
    bb = model.backbone
    params = [p for layer in bb.layers for p in layer.parameters()] + list(bb.final_norm.parameters())
    params.append(bb.lm_head.weight)
    return sum(p.numel() * p.element_size() for p in params)


def copy_bandwidth(device) -> float:
    """Bytes per second a device-to-device copy of 1 GiB moves (read + written), best of 5."""
    n = 1 << 29 if torch.device(device).type == "cuda" else 1 << 26
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    best = min(timed(lambda: b.copy_(a), device) for _ in range(5))
    return 2 * n / best


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def run_shape(shape: str, args) -> list[dict]:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build(shape, args.device, dtype)
    bb = model.backbone
    L = bb.num_layers
    exits = model.exit_layers
    N = args.new_tokens
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, bb.vocab_size, (args.prompt_tokens,), generator=g).tolist()
    hf = bb.model
    ids = torch.tensor([prompt], device=args.device)

    def hf_run(n):
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, eos_token_id=None)

    cache_len = args.prompt_tokens + N + 8

    def hf_static(n):  # one cache object shape for every call: compiled once
        from transformers import StaticCache
        cache = StaticCache(config=hf.config, max_cache_len=cache_len)
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=0, eos_token_id=None, past_key_values=cache)

    engine = "cuda-graphs" if torch.device(args.device).type == "cuda" else "eager"

    def ours(n, **kw):
        return generate(model, [prompt], DecodeOptions(max_new_tokens=n, **kw))

    ee_traces, ss_traces = load_traces(ROOT / "traces" / args.traces, exits, L, N,
                                       [w for w in args.trace_rows.split(",") if w])
    settings = [("hf-generate", "hf", {}, None), ("full", "full", {}, None)]
    if args.hf_compile:
        settings.insert(1, ("hf-generate static cache + compile", "hf-static", {}, None))
    if args.compile:
        settings.insert(2, ("full, graphs + compile", "full", {"compile": True}, None))
    for mix in ("none", "50/25", "75/0"):
        trace = synthetic(mix, exits, L, N)
        settings.append((f"early-exit gate, forced {mix}", "early-exit", {"confidence": "gate", "threshold": 0.5,
                                                                          "replay": tuple(trace)}, trace))
        if mix in ("none", "50/25"):
            settings.append((f"early-exit max-prob, forced {mix}", "early-exit",
                             {"confidence": "max-prob", "threshold": 0.5, "replay": tuple(trace)}, trace))
    for name, trace in ee_traces.items():
        settings.append((f"early-exit gate, trace {name}", "early-exit",
                         {"confidence": "gate", "threshold": 0.5, "replay": tuple(trace)}, trace))
    synth_rounds = []
    rng = random.Random(2)
    while sum(a + 1 for _, a in synth_rounds) < N + 8:
        a = 0
        while a < 4 and rng.random() < 0.7:
            a += 1
        synth_rounds.append((4 if a == 4 else min(4, a + 1), a))
    ss_sets = {"synthetic p=0.7/4": synth_rounds, **ss_traces}
    for name, rounds in ss_sets.items():
        for vocab in (None, args.draft_vocab):
            kw = {"threshold": 0.0, "draft_len": max(max(m for m, _ in rounds), 1), "replay": tuple(rounds),
                  "draft_exit": exits[-1]}
            label = f"self-spec, rounds {name}"
            if vocab:
                kw["draft_vocab"] = vocab
                label += f", draft vocab {vocab}"
            settings.append((label, "self-spec", kw, rounds))

    # warm-up, then prefill times (subtracted from every run)
    hf_run(2)
    ours(2, mode="full")
    compile_s = ours_compile_s = None
    if args.compile:
        ours_compile_s = timed(lambda: ours(3, mode="full", compile=True), args.device)
        print(f"{shape}: our graphs + compile: first call {ours_compile_s:.1f} s", file=sys.stderr, flush=True)
    if args.hf_compile:
        compile_s = timed(lambda: hf_static(3), args.device)  # compiles
        print(f"{shape}: HF static cache + compile: first call {compile_s:.1f} s", file=sys.stderr, flush=True)
    best = {name: float("inf") for name, *_ in settings}
    pre_hf = pre_ours = pre_static = float("inf")
    passes = {}
    for rep in range(args.reps):
        pre_hf = min(pre_hf, timed(lambda: hf_run(1), args.device))
        pre_ours = min(pre_ours, timed(lambda: ours(1, mode="full"), args.device))
        if args.hf_compile:
            pre_static = min(pre_static, timed(lambda: hf_static(1), args.device))
        for name, mode, kw, _ in settings:
            if mode == "hf":
                t = timed(lambda: hf_run(N), args.device) - pre_hf
            elif mode == "hf-static":
                t = timed(lambda: hf_static(N), args.device) - pre_static
            else:
                out = {}
                t = timed(lambda: out.setdefault("g", ours(N, mode=mode, **kw)), args.device) - pre_ours
                gen = out["g"]
                assert len(gen.rows[0].ids) == N, (name, len(gen.rows[0].ids))
                passes[name] = (gen.layer_passes_per_token, gen.mean_layers_per_token, gen.round_log)
            best[name] = min(best[name], t)
        print(f"{shape}: rep {rep + 1}/{args.reps} done", file=sys.stderr, flush=True)

    weight_bytes, bandwidth = token_bytes(model), copy_bandwidth(args.device)
    floor_ms = weight_bytes / bandwidth * 1e3
    costs = measure_costs(model, DecodeOptions())
    c_layer, c_final = costs["layer"], costs["final"]
    c_head = {k: costs["heads"][k]["transform"] for k in exits}
    full_ms = best["full"] / (N - 1) * 1e3
    import transformers
    machine = (torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else
               f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    meta = {"shape": shape, "num_layers": L, "exit_layers": list(exits), "device": args.device, "machine": machine,
            "dtype": args.dtype, "new_tokens": N, "prompt_tokens": args.prompt_tokens, "reps": args.reps,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "cost_layer_ms": c_layer * 1e3, "cost_lm_head_ms": c_final * 1e3,
            "cost_exit_mlp_ms": {str(k): v * 1e3 for k, v in c_head.items()},
            "engine": engine, "floor_ms": round(floor_ms, 4), "bandwidth_gb_s": round(bandwidth / 1e9, 1),
            "weight_bytes_per_token": weight_bytes, "hf_compile_first_call_s": compile_s,
            "ours_compile_first_call_s": ours_compile_s,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = []
    for name, mode, kw, trace in settings:
        ms = best[name] / (N - 1) * 1e3
        row = {"setting": name, "ms_per_token": round(ms, 3), "speedup_vs_full": round(full_ms / ms, 3),
               "vs_hf": round(best["hf-generate"] / best[name], 3), "x_floor": round(ms / floor_ms, 2), **meta}
        if args.hf_compile:
            row["vs_hf_static_compile"] = round(best["hf-generate static cache + compile"] / best[name], 3)
        if mode == "early-exit":
            toks = trace[1:N]  # the first token comes from the prefill
            mean_layer = sum(toks) / len(toks)
            row["mean_exit_layer"] = round(mean_layer, 2)
            row["ideal_layer_count"] = round(L / mean_layer, 3)
            row["realized_over_ideal"] = round(row["speedup_vs_full"] / row["ideal_layer_count"], 3)
            gate = kw["confidence"] == "gate"
            # cost model: layers climbed + the exit MLP and LM head of the exit taken (gates: only
            # those; max-prob: every exit passed pays its MLP and the LM head), recomputation free
            def tok_cost(k):
                passed = [e for e in exits if e <= k and e < L] if not gate else ([k] if k < L else [])
                return k * c_layer + sum(c_head[e] + c_final for e in passed) + (c_final if k == L else 0)
            model_cost = sum(tok_cost(k) for k in toks) / len(toks)
            row["ideal_with_heads"] = round((L * c_layer + c_final) / model_cost, 3)
            row["realized_over_ideal_with_heads"] = round(row["speedup_vs_full"] / row["ideal_with_heads"], 3)
            if name.endswith("forced none"):
                row["decision_overhead"] = round(ms / full_ms - 1, 4)
        if mode == "self-spec":
            d = kw["draft_exit"]
            log = passes[name][2]
            emitted = sum(a + 1 for _, a in log)
            layer_passes = sum((m + 1) * d + (L - d) for m, _ in log)
            row["rounds"] = len(log)
            row["ideal_layer_count"] = round(emitted * L / layer_passes, 3)
            row["realized_over_ideal"] = round(row["speedup_vs_full"] / row["ideal_layer_count"], 3)
            row["accepted_per_round"] = round((emitted - len(log)) / len(log), 3)
        if not mode.startswith("hf"):
            row["layer_passes_per_token"] = round(passes[name][0], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="smollm2-135m", help=f"comma-separated, of {', '.join(SHAPES)}")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run (default 64)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="random prompt length (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, best kept (default 3)")
    ap.add_argument("--draft-vocab", type=int, default=4096, help="self-spec draft vocabulary row (default 4096)")
    ap.add_argument("--traces", default="smollm2-135m-xsum.json", help="file under benchmarks/traces/")
    ap.add_argument("--trace-rows", default="threshold=0.6 gate_filter,threshold=0.2 gate_filter,"
                                             "self-spec max-prob threshold=0.5 draft_len=4 draft_vocab",
                    help="recorded settings to replay: comma-separated substrings of their names")
    ap.add_argument("--hf-compile", action="store_true",
                    help="add HF generate with a static cache (compiled by transformers on a GPU)")
    ap.add_argument("--compile", action="store_true",
                    help="add our full decoding with torch.compile'd segments (recorded as CUDA graphs on a GPU)")
    ap.add_argument("--tag", default=None, help="results file tag (default: device)")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = []
    for shape in args.shapes.split(","):
        rows += run_shape(shape.strip(), args)
    out = ROOT / "results" / f"engine_trace-{args.tag or torch.device(args.device).type}.jsonl"
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, out)
    print(f"\n{'shape':<14} {'setting':<48} {'ms/tok':>8} {'xfloor':>6} {'vs full':>8} {'vs HF':>6} {'ideal':>6} "
          f"{'real/id':>7} {'id+heads':>8}")
    for r in rows:
        print(f"{r['shape']:<14} {r['setting']:<48} {r['ms_per_token']:8.2f} {r['x_floor']:6.1f} {r['speedup_vs_full']:8.2f} "
              f"{r['vs_hf']:6.2f} {r.get('ideal_layer_count', float('nan')):6.2f} "
              f"{r.get('realized_over_ideal', float('nan')):7.2f} {r.get('ideal_with_heads', float('nan')):8.2f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

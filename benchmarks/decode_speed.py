"""Decode-speed benchmark: early exit and self-speculative decoding vs the full model vs HF.

    .venv/bin/python benchmarks/decode_speed.py --exits runs/demo/exits-tuned

On XSum documents (summarisation, as in the EE-Tuning paper), one prompt at a time (batch 1),
greedy, the same prompts for every setting, in one run on one machine: tokens/s of HF
`generate`, our `full` mode, `early-exit` at thresholds 1.0 .. 0.2 and `self-spec` at a few
(threshold, draft length) pairs. For each: speedup over `full`, mean exit layer per token,
decoder-layer passes per token (recomputation and verification included), quality against
the `full` output (token agreement, ROUGE-L) and against the reference summaries (ROUGE-L).
Prints one JSON line per setting, writes them (with machine, versions and settings) to
benchmarks/results/decode_speed-<tag>.jsonl, a table to stdout, and a PNG of speedup vs
quality beside it.
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

from eetune import EarlyExitModel, load_tokenizer  # noqa: E402
from eetune.decode import DecodeOptions, generate  # noqa: E402
from eetune.measure.evaluate import rouge_l, token_agreement  # noqa: E402

INSTRUCTION = "Summarize the following news article in one sentence.\n\n"


def _repo_relative(path) -> str:
    """A path inside this repository as relative to its root (results carry no machine paths)."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(ROOT.parent))
    except ValueError:
        return str(path)


def xsum_texts(tok, n: int, doc_tokens: int, chat: bool) -> tuple[list[str], list[str], bool]:
    """(prompt texts, reference summaries, whether the texts are user turns of the chat template)
    of the first `n` XSum documents cut to `doc_tokens` tokens; without a chat template (or
    `chat`), plain text ending in "Summary:"."""
    from eetune.model.defaults import default_data_file
    rows = [json.loads(line) for line in open(default_data_file("xsum_test.jsonl"), encoding="utf-8")]
    chat = bool(chat and getattr(tok, "chat_template", None))
    texts, refs = [], []
    for r in rows[:n]:
        doc_ids = tok(r["document"], add_special_tokens=False)["input_ids"][:doc_tokens]
        text = INSTRUCTION + tok.decode(doc_ids)
        texts.append(text if chat else text + "\n\nSummary:")
        refs.append(r["summary"])
    return texts, refs, chat


def xsum_prompts(tok, n: int, doc_tokens: int, chat: bool) -> tuple[list[list[int]], list[str]]:
    texts, refs, chat = xsum_texts(tok, n, doc_tokens, chat)
    if chat:
        from eetune.decode.api import chat_prompt_ids
        return [chat_prompt_ids(tok, t) for t in texts], refs
    return [tok(t)["input_ids"] for t in texts], refs


def run_one(model, prompt, opts: DecodeOptions) -> tuple[list[int], dict]:
    g = generate(model, [prompt], opts)
    r = g.rows[0]
    return r.ids, {"seconds": g.seconds, "new_tokens": len(r.ids), "layers": sum(t.exit_layer for t in r.tokens),
                   "passes": g.layer_token_passes, "drafted": g.drafted, "accepted": g.accepted,
                   "exit_trace": [t.exit_layer for t in r.tokens], "round_log": [list(x) for x in g.round_log]}


def run_hf(model, prompt, max_new, eos) -> tuple[list[int], dict]:
    hf = model.backbone.model
    ids = torch.tensor([prompt], device=hf.device)
    t = time.perf_counter()
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                      eos_token_id=list(eos), pad_token_id=eos[0])
    if hf.device.type == "cuda":
        torch.cuda.synchronize()
    secs = time.perf_counter() - t
    new = out[0, len(prompt):].tolist()
    return new, {"seconds": secs, "new_tokens": len(new), "layers": 0, "passes": 0, "drafted": 0, "accepted": 0,
                 "exit_trace": [], "round_log": []}


def summarise(name, mode, kw, outs, stats, full_outs, refs, tok, L, meta) -> dict:
    """Aggregate one setting over the prompts done so far."""
    n = len(outs)
    secs = sum(s["seconds"] for s in stats)
    tokens = sum(s["new_tokens"] for s in stats)
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    full_texts = [tok.decode(o, skip_special_tokens=True) for o in full_outs[:n]]
    drafted = sum(s["drafted"] for s in stats)
    accepted = sum(s["accepted"] for s in stats)
    return {"setting": name, "mode": mode, **kw, "prompts_done": n, "seconds": secs, "new_tokens": tokens,
            "tokens_per_s": tokens / secs,
            "mean_exit_layer": (sum(s["layers"] for s in stats) / tokens) if mode != "hf-generate" else L,
            "layer_passes_per_token": (sum(s["passes"] for s in stats) / tokens) if mode != "hf-generate" else None,
            "drafted": drafted, "accepted": accepted, "acceptance_rate": accepted / drafted if drafted else None,
            "token_agreement_vs_full": sum(token_agreement(o, f) for o, f in zip(outs, full_outs)) / n,
            "identical_to_full": sum(o == f for o, f in zip(outs, full_outs)) / n,
            "rougeL_vs_full": sum(rouge_l(t, f) for t, f in zip(texts, full_texts)) / n,
            "rougeL_vs_reference": sum(rouge_l(t, r) for t, r in zip(texts, refs)) / n, **meta}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", default=str(ROOT / "exits" / "smollm2-mlp-10-20-h100"),
                    help="tuned exits directory (default: the MLP exits tuned on an H100, see README)")
    ap.add_argument("--prompts", type=int, default=20, help="number of XSum documents (default 20)")
    ap.add_argument("--doc-tokens", type=int, default=384, help="document tokens per prompt (default 384)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--thresholds", default="1.0,0.9,0.8,0.6,0.4,0.2", help="early-exit thresholds")
    ap.add_argument("--self-spec", default="0.5:4,0.7:6,0.3:3", help="self-spec threshold:draft_len pairs")
    ap.add_argument("--draft-exit", type=int, default=None, help="self-spec draft exit (default: deepest)")
    ap.add_argument("--confidence", default="max-prob", help="confidence of the early-exit/self-spec rows above")
    ap.add_argument("--gate-thresholds", default="", help="early-exit rows with --confidence gate (needs gates)")
    ap.add_argument("--gate-self-spec", default="", help="self-spec threshold:draft_len rows with gates")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="also run every self-spec row with this draft vocabulary (K most frequent tokens)")
    ap.add_argument("--draft-context", action="store_true",
                    help="each self-spec row also with --draft-context (a restricted draft head: + the prompt's tokens)")
    ap.add_argument("--auto", default="", help="self-spec --draft-exit auto rows, threshold:draft_len (e.g. 0.5:6)")
    ap.add_argument("--save-traces", default=None,
                    help="write the per-token exit layers and self-spec rounds of every row here (JSON)")
    ap.add_argument("--calibrated", action="store_true",
                    help="add early-exit at the exits directory's calibrated per-exit thresholds (eetune calibrate)")
    ap.add_argument("--control", action="store_true",
                    help="time `full` twice per prompt (a second row, \"full (control)\"): its speedup over `full` is "
                         "this run's own noise, the smallest difference between settings the run resolves")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    ap.add_argument("--tag", default=None, help="results file tag (default: device name)")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    model = EarlyExitModel.from_pretrained(args.exits, dtype=args.dtype, device=args.device)
    model.eval()
    tok = load_tokenizer(model.backbone)
    prompts, refs = xsum_prompts(tok, args.prompts, args.doc_tokens, chat=not args.no_chat)
    eos = tuple(sorted({tok.eos_token_id, *([model.backbone.config.eos_token_id]
                                               if isinstance(model.backbone.config.eos_token_id, int) else [])}))
    L = model.backbone.num_layers
    dev = torch.device(args.device)
    machine = (torch.cuda.get_device_name(dev) if dev.type == "cuda" else
               f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
    import transformers
    meta = {"machine": machine, "torch": torch.__version__, "transformers": transformers.__version__,
            "exits": _repo_relative(args.exits), "exit_layers": list(model.exit_layers), "arch": model.config.arch,
            "num_layers": L, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts), "dtype": args.dtype,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    # warm-up (allocator, first-call overheads) outside the timings
    generate(model, [prompts[0]], DecodeOptions(mode="full", max_new_tokens=8, eos_token_ids=eos))
    if args.auto:  # the draft policy's costs are measured once per loaded model: not inside a timed run
        from eetune.decode.policy import measure_costs
        measure_costs(model, DecodeOptions())

    settings = [("hf-generate", "hf-generate", {}), ("full", "full", {})]
    if args.control:
        settings.append(("full (control)", "full", {}))
    conf = args.confidence
    settings += [(f"early-exit {conf} threshold={t}", "early-exit", {"threshold": float(t), "confidence": conf})
                 for t in args.thresholds.split(",") if t]
    if args.calibrated:
        from eetune.model.early_exit import calibrated_thresholds
        chosen, how = calibrated_thresholds(model, conf)
        if chosen is None:
            sys.exit(f"decode_speed: --calibrated, but {args.exits} has no usable calibration ({how}): run "
                     f"`eetune calibrate` first")
        cal = model.config.calibration
        meta["calibration"] = {"thresholds": {str(k): t for k, t in chosen.items()},
                               **{k: cal.get(k) for k in ("target_agreement", "test_agreement", "predicted_speedup")
                                  if k in cal}}
        settings.append((f"early-exit {conf} calibrated", "early-exit", {"exit_thresholds": chosen, "confidence": conf}))
    settings += [(f"early-exit gate threshold={t}", "early-exit", {"threshold": float(t), "confidence": "gate"})
                 for t in args.gate_thresholds.split(",") if t]
    spec_rows = [(conf, x) for x in args.self_spec.split(",") if x]
    spec_rows += [("gate", x) for x in args.gate_self_spec.split(",") if x]
    spec_rows += [("auto", x) for x in args.auto.split(",") if x]
    for c, pair in spec_rows:
        t, n = pair.split(":")
        kw = {"threshold": float(t), "draft_len": int(n), "confidence": conf if c == "auto" else c}
        if c == "auto":
            kw["draft_exit"] = "auto"
        elif args.draft_exit is not None:
            kw["draft_exit"] = args.draft_exit
        base = f"self-spec {'auto ' if c == 'auto' else ''}{kw['confidence']} threshold={t} draft_len={n}"
        settings.append((base, "self-spec", kw))
        if args.draft_vocab:
            settings.append((base + f" draft_vocab={args.draft_vocab}", "self-spec",
                             {**kw, "draft_vocab": args.draft_vocab}))
        if args.draft_context:
            settings.append((base + " draft_context", "self-spec", {**kw, "draft_context": True}))

    tag = args.tag or ("cuda" if dev.type == "cuda" else "cpu")
    out_dir = ROOT / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decode_speed-{tag}.jsonl"
    # Settings are interleaved prompt by prompt, so that a change in machine load touches all of
    # them alike; the results file is rewritten after every prompt (a cut-short run still counts).
    outs = {name: [] for name, _, _ in settings}
    stats = {name: [] for name, _, _ in settings}
    for i, prompt in enumerate(prompts):
        for name, mode, kw in settings:
            if mode == "hf-generate":
                o, st = run_hf(model, prompt, args.max_new_tokens, eos)
            else:
                o, st = run_one(model, prompt, DecodeOptions(mode=mode, max_new_tokens=args.max_new_tokens,
                                                             eos_token_ids=eos, **kw))
            outs[name].append(o)
            stats[name].append(st)
        rows = [summarise(name, mode, kw, outs[name], stats[name], outs["full"], refs, tok, L, meta)
                for name, mode, kw in settings]
        full_tps = rows[1]["tokens_per_s"]
        for r in rows:
            r["speedup_vs_full"] = r["tokens_per_s"] / full_tps
            r["speedup_vs_hf"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)
        print(f"prompt {i + 1}/{len(prompts)} done: full {full_tps:.2f} tok/s", file=sys.stderr, flush=True)
        if args.save_traces:
            traces = {"exit_layers": list(model.exit_layers), "num_layers": L, "exits": _repo_relative(args.exits),
                      "prompts": i + 1, "max_new_tokens": args.max_new_tokens,
                      "early_exit": {name: [s["exit_trace"] for s in stats[name]]
                                     for name, mode, _ in settings if mode == "early-exit"},
                      "self_spec": {name: [s["round_log"] for s in stats[name]]
                                    for name, mode, _ in settings if mode == "self-spec"}}
            tpath = Path(args.save_traces)
            tpath.parent.mkdir(parents=True, exist_ok=True)
            ttmp = tpath.with_suffix(".tmp")
            ttmp.write_text(json.dumps(traces))
            os.replace(ttmp, tpath)
    for r in rows:
        print(json.dumps(r), flush=True)

    full_ref = next(r for r in rows if r["mode"] == "full")["rougeL_vs_reference"]
    print(f"\n{'setting':<44} {'tok/s':>7} {'vs full':>8} {'vs HF':>6} {'exit L':>7} {'passes':>7} "
          f"{'agree':>6} {'RL/full':>7} {'RL/ref':>7} {'dRL%':>6}")
    for r in rows:
        d = 100 * (r["rougeL_vs_reference"] - full_ref) / full_ref if full_ref else 0.0
        print(f"{r['setting']:<44} {r['tokens_per_s']:7.2f} {r['speedup_vs_full']:8.2f} {r['speedup_vs_hf']:6.2f} "
              f"{r['mean_exit_layer']:7.1f} {r['layer_passes_per_token'] or float('nan'):7.1f} "
              f"{r['token_agreement_vs_full']:6.2f} {r['rougeL_vs_full']:7.3f} {r['rougeL_vs_reference']:7.3f} {d:6.1f}")
    plot(rows, out_dir / f"decode_speed-{tag}.png", machine)
    print(f"\nwrote {path} and {path.with_suffix('.png')}")


def family(r: dict) -> str:
    """The line a row belongs to in the plot: mode plus how it decides."""
    if r["mode"] == "early-exit":
        return f"early-exit {r['setting'].split()[1]}"  # the confidence, as the setting names it
    if r["mode"] == "self-spec":
        return "self-spec" + (" auto" if r.get("draft_exit") == "auto" else "") + (
            " + draft vocab" if r.get("draft_vocab") else "") + (" + draft context" if r.get("draft_context") else "")
    return r["setting"]


def plot(rows, path, machine):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.6))
    fams = list(dict.fromkeys(family(r) for r in rows))
    markers = {"early-exit": "o", "self-spec": "^"}
    for j, fam in enumerate(fams):
        sel = [r for r in rows if family(r) == fam]
        mode = sel[0]["mode"]
        colour = "black" if fam == "full" else "grey" if mode in ("hf-generate", "full") else f"C{j % 10}"
        for i, key in enumerate(("rougeL_vs_reference", "token_agreement_vs_full")):
            ax[i].plot([r["speedup_vs_full"] for r in sel], [r[key] for r in sel], marker=markers.get(mode, "s"),
                       color=colour, linestyle="-" if mode == "early-exit" else "none", label=fam)
            for r in sel:
                lab = f"{r.get('threshold', '')}" + (f"/{r['draft_len']}" if mode == "self-spec" else "")
                if lab:
                    ax[i].annotate(lab, (r["speedup_vs_full"], r[key]), fontsize=6, xytext=(3, 3),
                                   textcoords="offset points")
    ax[0].set_ylabel("ROUGE-L vs reference summaries")
    ax[1].set_ylabel("token agreement with full decoding")
    for a in ax:
        a.set_xlabel("speedup over full (tokens/s ratio)")
        a.axvline(1.0, color="lightgrey", lw=0.8)
        a.grid(alpha=0.3)
    ax[1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"Early exit vs self-speculative decoding, XSum, batch 1 — {machine}", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()

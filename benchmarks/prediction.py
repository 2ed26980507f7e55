"""Predicted against realized early-exit speedup, in one run (issue 18's "prediction" target).

    .venv/bin/python benchmarks/prediction.py --exits benchmarks/exits/gemma3-norm-13-17-18-k4k --tag cpu-gemma3-k4k

`eetune calibrate` predicts an early-exit speedup from teacher-forced text and the costs it
measures on this machine (`eetune.measure.calibrate`: `token_table`, `cost_model`, `simulate`).
This script checks that prediction against decoding, at the exits directory's stored calibrated
thresholds, on XSum summaries (the text `benchmarks/decode_speed.py` times):

1. **Realized**: `full` and `early-exit` at the calibrated thresholds on `--prompts` XSum
   documents (the first ones, as decode_speed.py), batch 1, greedy, `--max-new-tokens`,
   interleaved prompt by prompt. Each prompt's prefill is timed apart (the same prompt decoded
   for one token), so the decode-only ratio is known as well as the end-to-end one.
2. **Predicted**, with costs measured in this run (`measured_costs`, median of 3):
   - `stored`: the calibration's own prediction (teacher forced on its data, its costs);
   - `calib-text`: the stored thresholds simulated on the calibration's text (default-dev,
     BoolQ dev passages) with this run's costs;
   - `self-heldout`: the stored thresholds simulated on the model's own greedy continuations of
     `--heldout` other XSum documents (items after the timed ones): teacher forced on prompt +
     continuation, counting only the continuation's tokens after the first (which the prefill
     emits at full depth), as a user would calibrate on the model's output for their prompts;
   - `self-same`: the same on the timed prompts' `full` continuations (the cost model alone,
     with the text the decode saw).
   Each decode-only prediction is also carried to end to end with the timed prefill:
   (P + N t) / (P + t + (N - 1) t / s) for N new tokens, prefill P and full token time t.

With `--recalibrate N` the exits are first calibrated afresh, on a copy, by `eetune calibrate
--continue-tokens N` itself (the stored calibration's target and per-exit setting) on the
`--heldout` prompts (half calibration, half test part): its stored prediction is then
calibrate's own prediction from the model's own text, and the realized ratio is timed at its
thresholds.

Prints one JSON line and writes it, with machine, versions and settings, to
benchmarks/results/prediction-<tag>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from decode_speed import _repo_relative, xsum_prompts, xsum_texts  # noqa: E402
from eetune import EarlyExitModel, load_tokenizer  # noqa: E402
from eetune.decode import DecodeOptions, generate  # noqa: E402
from eetune.measure.calibrate import calibration_blocks, cost_model, measured_costs, simulate, token_table  # noqa: E402
from eetune.model.early_exit import calibrated_thresholds  # noqa: E402


def continuation_table(model, prompt: list[int], new: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and agreement (E, n) of the continuation tokens `new[1:]` teacher forced after
    `prompt`: position len(prompt) + j - 1 predicts new[j]; new[0] comes from the prefill."""
    seq = torch.tensor([prompt + new])  # token_table leaves out each block's last position
    conf, agree = token_table(model, seq, batch_size=1)
    lo, hi = len(prompt), len(prompt) + len(new) - 1
    return conf[:, lo:hi], agree[:, lo:hi]


def recalibrate(args) -> tuple[str, dict]:
    """A copy of `args.exits` calibrated by `eetune calibrate --continue-tokens` on the held-out
    prompts (XSum documents after the timed ones, as this script builds them). Returns (its
    directory, what was run)."""
    from eetune.cli import main as eetune_main
    from eetune.measure.calibrate import continuation_prompts
    from eetune.model.config import ExitConfig

    stored = ExitConfig.load(args.exits).calibration or {}
    work = Path(tempfile.mkdtemp(prefix="eetune-prediction-")) / "exits"
    shutil.copytree(args.exits, work)
    model = EarlyExitModel.from_pretrained(work)
    tok = load_tokenizer(model.backbone)
    texts, _, chat = xsum_texts(tok, args.prompts + args.heldout, args.doc_tokens, chat=not args.no_chat)
    path = work.parent / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[args.prompts:]), encoding="utf-8")
    want = xsum_prompts(tok, args.prompts + args.heldout, args.doc_tokens, chat=not args.no_chat)[0][args.prompts:]
    assert continuation_prompts(tok, str(path), chat) == want, "calibrate would continue other prompts"
    del model
    calib = args.heldout // 2
    argv = ["calibrate", str(work), "--data", str(path), "--continue-tokens", str(args.recalibrate),
            "--calib-blocks", str(calib), "--test-blocks", str(args.heldout - calib),
            "--target-agreement", str(stored.get("target_agreement", 0.95))]
    argv += ["--per-exit"] if stored.get("per_exit") else []
    argv += ["--chat"] if chat else []
    t0 = time.time()
    if eetune_main(argv) != 0:
        sys.exit("prediction: eetune calibrate failed")
    shown = ["eetune", *argv[:1], "EXITS", *argv[2:3], "HELD-OUT-XSUM-PROMPTS", *argv[4:]]
    return str(work), {"command": " ".join(shown), "seconds": round(time.time() - t0, 1),
                       "stored_before": {"thresholds": stored.get("thresholds"), "data": stored.get("data"),
                                         "predicted_speedup": stored.get("predicted_speedup")}}


def run_meta() -> dict:
    """Machine, versions and date, for a results file."""
    import transformers
    return {"machine": f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} threads)",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def save_result(row: dict, name: str) -> Path:
    """Print `row` as one JSON line and write it to benchmarks/results/`name` (atomically)."""
    print(json.dumps(row), flush=True)
    out = ROOT / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def end_to_end(s: float, prefill_s: float, token_s: float, n: int) -> float:
    """A decode-only speedup `s` carried to whole generations of `n` tokens after `prefill_s`."""
    return (prefill_s + n * token_s) / (prefill_s + token_s + (n - 1) * token_s / s)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--exits", required=True, help="exits directory with a stored calibration")
    ap.add_argument("--prompts", type=int, default=8, help="timed XSum documents (default 8)")
    ap.add_argument("--heldout", type=int, default=16, help="other XSum documents continued for the prediction")
    ap.add_argument("--doc-tokens", type=int, default=384)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--no-chat", action="store_true", help="plain prompts instead of the chat template")
    ap.add_argument("--recalibrate", type=int, default=0, metavar="N",
                    help="calibrate a copy of --exits first with `eetune calibrate --continue-tokens N` on the "
                         "--heldout prompts, and time and predict with that calibration")
    ap.add_argument("--tag", default="cpu")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    exits, recalibrated = args.exits, None
    if args.recalibrate:
        exits, recalibrated = recalibrate(args)
    model = EarlyExitModel.from_pretrained(exits)
    model.eval()
    tok = load_tokenizer(model.backbone)
    thresholds, how = calibrated_thresholds(model, "max-prob")
    if thresholds is None:
        sys.exit(f"prediction: {args.exits} has no usable max-prob calibration ({how}): run `eetune calibrate`")
    cal = model.config.calibration
    prompts, _ = xsum_prompts(tok, args.prompts + args.heldout, args.doc_tokens, chat=not args.no_chat)
    timed, heldout = prompts[:args.prompts], prompts[args.prompts:]
    eos = tuple(sorted({tok.eos_token_id, *([model.backbone.config.eos_token_id]
                                               if isinstance(model.backbone.config.eos_token_id, int) else [])}))
    tvec = [thresholds[k] for k in model.exit_layers]

    def decode(prompt, mode, n, **kw):
        g = generate(model, [prompt], DecodeOptions(mode=mode, max_new_tokens=n, eos_token_ids=eos, **kw))
        return g.rows[0].ids, g.seconds, sum(t.exit_layer for t in g.rows[0].tokens)

    decode(timed[0], "full", 8)  # warm-up outside the timings
    # 1. realized, interleaved prompt by prompt
    real = {"full": [0.0, 0, 0], "early-exit": [0.0, 0, 0]}
    prefill, full_outs = 0.0, []
    for i, p in enumerate(timed):
        prefill += decode(p, "full", 1)[1]
        ids, secs, layers = decode(p, "full", args.max_new_tokens)
        full_outs.append(ids)
        real["full"] = [real["full"][0] + secs, real["full"][1] + len(ids), real["full"][2] + layers]
        ids, secs, layers = decode(p, "early-exit", args.max_new_tokens, exit_thresholds=thresholds)
        real["early-exit"] = [real["early-exit"][0] + secs, real["early-exit"][1] + len(ids),
                              real["early-exit"][2] + layers]
        print(f"prompt {i + 1}/{len(timed)} timed", file=sys.stderr, flush=True)
    tps = {m: v[1] / v[0] for m, v in real.items()}
    n_new = real["full"][1] / len(timed)
    p_s = prefill / len(timed)  # mean prefill (with one new token's head)
    token_s = (real["full"][0] - prefill) / max(1.0, real["full"][1] - len(timed))  # full decode per token
    ee_decode = (real["early-exit"][0] - prefill) / max(1.0, real["early-exit"][1] - len(timed))
    realized = {"end_to_end": tps["early-exit"] / tps["full"], "decode_only": token_s / ee_decode,
                "full_tokens_per_s": tps["full"], "early_exit_tokens_per_s": tps["early-exit"],
                "mean_exit_layer": real["early-exit"][2] / real["early-exit"][1], "prefill_s": p_s,
                "full_token_s": token_s, "mean_new_tokens": n_new}

    # 2. predicted, with this run's costs
    costs = measured_costs(model)
    cost = cost_model(model, costs=costs)

    def predict(conf, agree) -> dict:
        sim = simulate(conf, agree, tvec, cost)
        return {"decode_only": sim["speedup"], "end_to_end": end_to_end(sim["speedup"], p_s, token_s, round(n_new)),
                "agreement": sim["agreement"], "exit_share": sim["exit_share"], "tokens": sim["tokens"]}

    data = cal.get("data") or {}
    predicted = {"stored": {"decode_only": cal.get("test", {}).get("speedup", cal.get("predicted_speedup")),
                            "agreement": cal.get("test", {}).get("agreement")}}
    if not data.get("continuations"):  # a calibration on passages: this run's costs on its text
        calib, test, _ = calibration_blocks(tok, data.get("source", "default-dev"), int(data.get("seq_len", 256)),
                                            int(data.get("calib_blocks", 8)), int(data.get("test_blocks", 8)))
        predicted["calib-text"] = predict(*token_table(model, torch.cat([calib, test]), batch_size=2))
    tables = [continuation_table(model, p, o) for p, o in zip(timed, full_outs) if len(o) > 1]
    predicted["self-same"] = predict(torch.cat([c for c, _ in tables], 1), torch.cat([a for _, a in tables], 1))
    tables = []
    for i, p in enumerate(heldout):
        o = decode(p, "full", args.max_new_tokens)[0]
        if len(o) > 1:
            tables.append(continuation_table(model, p, o))
        print(f"held-out prompt {i + 1}/{len(heldout)} continued", file=sys.stderr, flush=True)
    predicted["self-heldout"] = predict(torch.cat([c for c, _ in tables], 1), torch.cat([a for _, a in tables], 1))
    for v in predicted.values():
        if v.get("decode_only") is not None:
            v["end_to_end"] = v.get("end_to_end") or end_to_end(v["decode_only"], p_s, token_s, round(n_new))
            v["vs_realized"] = v["end_to_end"] / realized["end_to_end"] - 1

    row = {"exits": _repo_relative(args.exits), "recalibrated": recalibrated, "thresholds": {str(k): t for k, t in thresholds.items()},
           "target_agreement": cal.get("target_agreement"), "realized": realized, "predicted": predicted,
           "costs": {"lm_head_layers": cost["lm_head_layers"], "outcome": cost["outcome"],
                     "full_layers": cost["full_layers"], "layer_s": costs.get("layer_s"),
                     "step_overhead_layers": cost.get("step_overhead_layers"),
                     "decode_token_layers": costs.get("decode_token_layers")},
           "prompts": len(timed), "heldout": len(heldout), "doc_tokens": args.doc_tokens,
           "max_new_tokens": args.max_new_tokens, **run_meta()}
    out = save_result(row, f"prediction-{args.tag}.json")
    print(f"\nrealized early exit / full: {realized['end_to_end']:.3f} end to end, {realized['decode_only']:.3f} "
          f"decode only (mean exit layer {realized['mean_exit_layer']:.1f})")
    for name, v in predicted.items():
        if v.get("decode_only") is not None:
            print(f"predicted {name:<13} {v['end_to_end']:.3f} end to end ({v['vs_realized']:+.1%}), "
                  f"{v['decode_only']:.3f} decode only, agreement {v.get('agreement') or float('nan'):.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""The `eetune` command line: each verb is a thin call into one library function.

    eetune convert --model smollm2-135m --exits 10,20 --arch mlp --out runs/exits
    eetune info runs/exits
    eetune evaluate runs/exits --data default-dev

Bad input prints one line `eetune: error: ...` and exits with code 2, writing nothing (`eetune --debug
VERB ...` also shows the traceback behind it).
"""

from __future__ import annotations

import argparse
import json
import sys

from eetune.decode.api import DecodeOptions
from eetune.errors import EETuneError
from eetune.flags import add_fields, from_args
from eetune.train.tune import TuneConfig


# --- convert -------------------------------------------------------------------------------
def add_convert(sub):
    p = sub.add_parser("convert", help="attach exit heads to a pretrained causal LM (stage 1 of EE-Tuning), or "
                                       "restrict an exits directory's heads to K tokens",
                       description="Attach exit heads after chosen layers of a pretrained causal LM and write "
                                   "an exits directory (exit_config.json + exit_heads.safetensors). With "
                                   "--exit-vocab K each head projects onto the K token ids most frequent in "
                                   "--vocab-data plus one OTHER class for the rest of the vocabulary (its "
                                   "projection costs about K/V of the LM head's). With --from-exits DIR instead "
                                   "of --model, the heads of an existing exits directory (tuned or not) are "
                                   "restricted that way: the K rows of each head's projection and a fresh OTHER "
                                   "row, its transform kept; tune them briefly after (`eetune tune`).")
    p.add_argument("--model", default=None,
                   help="local HF directory, .gguf file, hub id, or an embedded model: 'smollm2-135m' (the default) "
                        "or 'gemma3-270m' (required unless --from-exits)")
    p.add_argument("--from-exits", metavar="DIR", default=None,
                   help="instead of attaching new heads to --model, restrict the heads of this exits directory (tuned "
                        "or not) to --exit-vocab K tokens + OTHER and write them to --out (--exits, --arch, --init, "
                        "--output-embedding and --revision are its own)")
    p.add_argument("--exits", default=None,
                   help="exit positions: 1-based layers ('after layer k', e.g. 10,20) or fractions of depth "
                        "(0.33,0.67); required with --model")
    p.add_argument("--arch", default=None, choices=["embedding", "norm", "mlp", "layer"],
                   help="exit head architecture (default: norm)")
    p.add_argument("--init", default=None, choices=["copy", "random"],
                   help="initialise heads by copying backbone modules (default) or at random")
    p.add_argument("--output-embedding", default=None, choices=["copy", "shared"],
                   help="own trainable LM-head copy per exit (default) or share the frozen backbone head")
    p.add_argument("--exit-vocab", metavar="K", default=None,
                   help="restricted-vocabulary heads: each projects onto the K token ids most frequent in "
                        "--vocab-data plus one OTHER class standing for the rest (a token count such as 4096 or 4k, "
                        "1 to the vocabulary size; K = the vocabulary size permutes the full head; `all`: the full "
                        "vocabulary, the default)")
    p.add_argument("--vocab-data", metavar="SPEC", default=None,
                   help="data whose training blocks rank the token ids for --exit-vocab, as `eetune tune --data` takes "
                        "it (default: default, the data tune uses by default); generated:N ranks the model's own "
                        "samples (all its layers are loaded), a mixture such as default:0.5,generated:200000:0.5 both")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled weights (.bin/.pt), which can run code when loaded; off by default: "
                        "safetensors only (EETUNE_ALLOW_PICKLE=1 does the same for every verb)")
    p.add_argument("--out", required=True, help="exits directory to write (new, empty, or an exits directory)")
    p.set_defaults(func=cmd_convert)


def _config_vocab_size(config) -> int | None:
    """The vocabulary size an HF config names (a multimodal config's text part), or None."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    v = getattr(text, "vocab_size", None)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def _check_exit_vocab(args, vocab_size: int | None) -> int | None:
    """--exit-vocab / --vocab-data before anything loads: K, or None for the full vocabulary."""
    from eetune.model.heads import parse_exit_vocab

    if args.exit_vocab is None:
        if args.vocab_data is not None:
            raise EETuneError("--vocab-data ranks the token ids of restricted heads: give --exit-vocab K with it")
        return None
    return parse_exit_vocab(args.exit_vocab, vocab_size or 2 ** 62)


def _needs_whole_model(spec: str | None) -> bool:
    """Whether ranking the vocabulary on `spec` samples from the model (generated:N): all its layers."""
    from eetune.train.data import parse_data_spec

    return spec is not None and any(p.generated is not None for p in parse_data_spec(spec) if p.weight > 0)


def _restricted_line(model) -> str:
    src = model.config.exit_vocab_source or {}
    return (f"restricted to the {model.exit_vocab:,} of {model.backbone.vocab_size:,} token ids most frequent in "
            f"{src.get('tokens', 0):,} tokens of {src.get('data', '?')} ({src.get('ranked_by', '?')}) plus OTHER")


def cmd_convert(args):
    from pathlib import Path

    from eetune.model.backbone import load_backbone, model_config
    from eetune.model.config import ExitConfig, parse_exit_layers
    from eetune.model.early_exit import EarlyExitModel, check_output_dir

    if args.from_exits is not None:
        return _convert_from_exits(args)
    if args.model is None or args.exits is None:
        raise EETuneError("give --model and --exits (new exit heads), or --from-exits DIR --exit-vocab K (restrict "
                          "the heads of an exits directory)")
    args.arch, args.init = args.arch or "norm", args.init or "copy"
    args.output_embedding = args.output_embedding or "copy"
    check_output_dir(Path(args.out))  # refuse before the (slow) model load
    check_writable(args.out, "write --out", kind="dir")
    config = model_config(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
    K = _check_exit_vocab(args, _config_vocab_size(config))
    if K is not None:
        _needs_whole_model(args.vocab_data)  # refuses a malformed spec before loading
    depth = config.num_hidden_layers
    layers = parse_exit_layers(args.exits, depth)
    ExitConfig(exit_layers=layers, num_layers=depth, arch=args.arch)  # validates the layers before loading
    if depth in layers and K is None:  # a restricted exit there is a cheap LM head: a token leaving skips the full one
        print(f"eetune: warning: the exit after layer {depth} is after the model's last layer: it reproduces the "
              f"final layer's logits and can never save compute (exits that can go after layers 1..{depth - 1}, or "
              f"a restricted vocabulary with --exit-vocab K, whose tokens then skip the full LM head)",
              file=sys.stderr)
    # Partial loading: the layers up to the deepest exit (and the last one, which `layer` exits copy).
    also = (depth - 1,) if args.arch == "layer" and args.init == "copy" else ()
    # Ranking the vocabulary on generated data samples from the whole model.
    whole = K is not None and _needs_whole_model(args.vocab_data)
    backbone = load_backbone(args.model, dtype=args.dtype, revision=args.revision,
                             trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                             up_to_layer=None if whole else max(layers), also_layers=also)
    model = EarlyExitModel.convert(backbone, layers, arch=args.arch, init=args.init,
                                   output_embedding=args.output_embedding)
    restricted = _restrict_heads(model, args, K)
    model.save_pretrained(args.out)
    c = model.parameter_counts()
    print(f"wrote {args.out}: {args.arch} exits after layers {list(layers)} of {backbone.num_layers} "
          f"({c['trainable']:,} trainable head parameters; {c['frozen_backbone']:,} frozen backbone parameters "
          f"loaded, {backbone.num_layers - backbone.released_count()} of {backbone.num_layers} layers)"
          + (f"; heads {restricted}" if restricted else ""))


def _restrict_heads(model, args, K: int | None) -> str | None:
    """Restrict the model's heads to the K ids most frequent in --vocab-data's training blocks
    (the blocks `eetune tune --data SPEC` trains on); a line saying so, or None without K."""
    from eetune.model.heads import parse_exit_vocab
    from eetune.train.tune import TuneConfig, rank_exit_vocab

    if K is None:
        return None
    K = parse_exit_vocab(args.exit_vocab, model.backbone.vocab_size)  # the loaded model's own vocabulary
    ids, source = rank_exit_vocab(model, args.vocab_data or TuneConfig.data, K, progress=True)
    model.restrict_vocab(ids, source)
    return _restricted_line(model)


def _convert_from_exits(args):
    """`convert --from-exits DIR --exit-vocab K --out OUT`: DIR's heads, tuned or not, restricted
    to K token ids + OTHER (each head's K rows, a fresh OTHER row, its transform kept), written to
    OUT with DIR's configuration and training record (its calibration and gates, which described
    the old heads, dropped)."""
    from pathlib import Path

    from eetune.model.backbone import load_backbone, model_config
    from eetune.model.config import ExitConfig
    from eetune.model.early_exit import EarlyExitModel, check_output_dir

    own = [flag for flag, v in (("--model", args.model), ("--exits", args.exits), ("--arch", args.arch),
                                ("--init", args.init), ("--output-embedding", args.output_embedding),
                                ("--revision", args.revision), ("--trust-remote-code", args.trust_remote_code or None))
           if v is not None]
    if own:
        raise EETuneError(f"--from-exits restricts the heads of an exits directory as they are: {', '.join(own)} "
                          f"{'is' if len(own) == 1 else 'are'} its own; drop {'it' if len(own) == 1 else 'them'}")
    if args.exit_vocab is None:
        raise EETuneError("--from-exits DIR restricts the heads of DIR to K tokens: give --exit-vocab K")
    src = Path(args.from_exits)
    config = ExitConfig.load(src)  # refuses a directory that is not an exits directory
    if Path(args.out).resolve() == src.resolve():
        raise EETuneError(f"--out {args.out} is --from-exits itself: write the restricted heads to another directory")
    check_output_dir(Path(args.out))
    check_writable(args.out, "write --out", kind="dir")
    vocab = _config_vocab_size(model_config(config.base_model, revision=config.revision)) if config.base_model         else None
    K = _check_exit_vocab(args, vocab)
    if config.exit_vocab is not None:
        raise EETuneError(f"the heads of {src} are restricted to {config.exit_vocab:,} tokens already: convert "
                          f"from the model (--model ... --exit-vocab K) to choose another vocabulary")
    if K is None:
        raise EETuneError(f"--exit-vocab {args.exit_vocab}: the heads of {src} have the full vocabulary already; "
                          f"give a token count K to restrict them")
    whole = _needs_whole_model(args.vocab_data)
    backbone = None
    if config.base_model:
        covered = config.num_layers if config.fingerprint_layers is None else config.fingerprint_layers
        backbone = load_backbone(config.base_model, dtype=args.dtype, revision=config.revision,
                                 allow_pickle=args.allow_pickle,
                                 up_to_layer=None if whole else max(max(config.exit_layers), covered))
    model = EarlyExitModel.from_pretrained(src, backbone=backbone, dtype=args.dtype)
    line = _restrict_heads(model, args, K)
    model.save_pretrained(args.out)
    print(f"wrote {args.out}: the {config.arch} exits of {src} after layers {list(config.exit_layers)}, heads {line} "
          f"(tune them: `eetune tune {args.out} --out OUT`)")


# --- info ----------------------------------------------------------------------------------
def add_info(sub):
    p = sub.add_parser("info", help="show an exits directory's configuration and parameter counts",
                       description="Print an exits directory's configuration and its trainable vs frozen "
                                   "parameter counts (loads the backbone it names).")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)


def cmd_info(args):
    from eetune.model.early_exit import EarlyExitModel

    model = EarlyExitModel.from_pretrained(args.dir)
    cfg, counts = model.config.to_dict(), model.parameter_counts()
    gate_exits = [k for k in model.exit_layers if model.gate(k) is not None]
    vocab = None if model.vocab_by_frequency is None else int(model.vocab_by_frequency.numel())
    report = (cfg.get("gates") or {}).get("report")
    if args.json:
        print(json.dumps({"config": cfg, "parameters": counts, "gates": {"exits": gate_exits, "report": report},
                          "ranked_vocab_size": vocab}, indent=2, sort_keys=True, default=str))
        return
    print(f"exits directory  {args.dir}")
    for key in ("base_model", "model_type", "num_layers", "exit_layers", "arch", "init", "output_embedding",
                "backbone_fingerprint", "eetune_version"):
        print(f"  {key:<22} {cfg[key]}")
    ev, src = cfg.get("exit_vocab"), cfg.get("exit_vocab_source") or {}
    print(f"  {'exit vocabulary':<22} " + (f"{ev:,} of {model.backbone.vocab_size:,} token ids + OTHER (ranked by "
                                          f"{src.get('ranked_by', '?')}: {src.get('tokens', 0):,} tokens of "
                                          f"{src.get('data', '?')})" if ev else "the whole vocabulary"))
    total = counts["frozen_backbone"] + counts["trainable"]
    print(f"  {'trainable (heads)':<22} {counts['trainable']:,} ({counts['trainable'] / total:.1%} of all)")
    print(f"  {'frozen (backbone)':<22} {counts['frozen_backbone']:,}")
    for k, n in counts["per_exit"].items():
        print(f"  {'exit after layer ' + str(k):<22} {n:,} parameters")
    t = cfg.get("training") or {}
    if "steps" in t:
        data = (t.get("data") or {}).get("source", "?")
        print(f"  {'training':<22} {t['steps']} steps, {t.get('tokens', 0):,} tokens of {data} in "
              f"{t.get('wall_time_s', 0):.0f} s")
        sel = t.get("selected")
        if sel:
            which = "last step" if sel["step"] == t["steps"] else f"step {sel['step']}, best by {t.get('select')}"
            print(f"  {'validation':<22} " + ", ".join(
                f"exit {k}: CE {v:.3f}, agreement {sel['val_agreement'][k]:.3f}" for k, v in sel["val_loss"].items())
                + f" ({which})")
    prof = t.get("exit_profile")
    if prof:
        on = prof.get("measured_on") or {}
        print(f"  {'exit profile':<22} measured on {prof.get('tokens', 0):,} tokens of {on.get('data', '?')} "
              f"(`eetune evaluate` prints it; --json shows it)")
    cal = cfg.get("calibration")
    if cal:
        th = (f"threshold {cal['threshold']}" if cal.get("threshold") is not None
              else "thresholds " + ", ".join(f"exit {k}: {v}" for k, v in (cal.get("thresholds") or {}).items()))
        print(f"  {'calibration':<22} {cal.get('confidence')} {th} for target agreement {cal.get('target_agreement')}"
              f" (test split {cal.get('test_agreement', float('nan')):.3f}, predicted speedup "
              f"{cal.get('predicted_speedup', float('nan')):.2f}x); the default of `generate --mode early-exit`")
    print(f"  {'ranked vocabulary':<22} " + (f"{vocab:,} token ids (most frequent in the tuning data first)"
                                             if vocab is not None else "none"))
    g = cfg.get("gates") or {}
    if gate_exits:
        data = g.get("data", {}).get("source", "?")
        print(f"  {'gates':<22} exits after layers {gate_exits} (fit on {g.get('tokens', 0):,} tokens of {data} "
              f"in {g.get('seconds', 0):.0f} s)")
    else:
        print(f"  {'gates':<22} none (train them with `eetune tune DIR --out OUT --gates-only`)")
    if gate_exits and report:
        from eetune.measure.evaluate import format_gate_report
        print(format_gate_report(report, indent="  "))


# --- evaluate ------------------------------------------------------------------------------
def add_evaluate(sub):
    p = sub.add_parser("evaluate", help="per-exit held-out cross-entropy, agreement with the final layer, and "
                                        "the exit profile (share exiting vs agreement per threshold, exit costs)",
                       description="Teacher-forced evaluation of every exit on held-out text: next-token "
                                   "cross-entropy, top-1 agreement with the final layer, confident share. In the "
                                   "same pass, the exit profile: for max-prob thresholds t = 0.1 .. 0.99, the share "
                                   "of tokens that would exit at each exit (max-prob >= t) and their top-1 "
                                   "agreement with the final layer, plus each exit's cost (transform + projection) "
                                   "and the LM head's, measured in decoder-layer equivalents on this machine. The "
                                   "profile is printed as a table, drawn as a PNG (DIR/exit_profile.png; needs "
                                   "matplotlib) and stored in DIR/exit_config.json under "
                                   "training.exit_profile with the data it was measured on.")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--data", default="default-dev",
                   help="evaluation text: default-dev (BoolQ dev passages), a .txt/.jsonl file or folder")
    p.epilog = ("An exits directory with gates also gets their coverage/precision beside max-prob confidence. "
                "The plot needs matplotlib (pip install 'eetune[bench]'); without it the plot is skipped.")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--max-blocks", type=int, default=16, help="number of blocks to evaluate (default 16)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per forward pass (default 8)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table (the profile under 'profile')")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--plot", metavar="PATH", default=None,
                      help="where to save the exit-profile PNG (default: DIR/exit_profile.png; with --no-store, "
                           "no plot unless --plot is given)")
    plot.add_argument("--no-plot", action="store_true", help="draw no exit-profile PNG")
    p.add_argument("--no-store", action="store_true",
                   help="leave the exits directory untouched: no profile recorded in its exit_config.json "
                        "(by default under training.exit_profile) and no PNG written into it")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args):
    import os
    from pathlib import Path

    from eetune.model.backbone import load_tokenizer
    from eetune.model.config import CONFIG_NAME
    from eetune.train.data import load_texts, pack_blocks
    from eetune.measure.evaluate import (blocks_digest, exit_costs, exit_metrics, format_gate_report, format_metrics,
                           format_profile, json_safe, plot_profile, store_profile)
    from eetune.train.gates import gate_report
    from eetune.model.early_exit import EarlyExitModel

    if args.seq_len < 2 or args.max_blocks < 1 or args.batch_size < 1:
        raise EETuneError("--seq-len must be >= 2, --max-blocks and --batch-size >= 1")
    plot_path = (Path(args.plot) if args.plot else None if args.no_plot or args.no_store
                 else Path(args.dir) / "exit_profile.png")
    if plot_path is not None:
        check_writable(plot_path, "write the exit-profile plot", "give --plot a path in a folder you may write to, "
                                                                 "or --no-plot")
    if plot_path is not None and (plot_path.is_dir() or not plot_path.parent.is_dir()):
        raise EETuneError(f"cannot write the plot to {plot_path} (a directory, or its folder does not exist): "
                          f"give --plot a file path in an existing folder, or --no-plot")
    if not args.no_store and (Path(args.dir) / CONFIG_NAME).is_file():
        if not os.access(args.dir, os.W_OK):
            raise EETuneError(f"cannot store the exit profile: {args.dir} is not writable; pass --no-store")
        check_writable(args.dir, "store the exit profile", "pass --no-store", kind="into")
    texts = load_texts(args.data)
    model = EarlyExitModel.from_pretrained(args.dir)
    blocks = pack_blocks(load_tokenizer(model.backbone), texts, args.seq_len, args.max_blocks)
    metrics = exit_metrics(model, blocks, args.batch_size, progress=True)  # a bar, or status lines in a log
    if len(model.gates):
        metrics["gates"] = gate_report(model, blocks, batch_size=args.batch_size, progress=True)
    profile = metrics["profile"]
    profile["costs"] = exit_costs(model)
    from eetune.measure.evaluate import profile_speedups
    profile["speedup"] = profile_speedups(profile)
    source = args.data
    if Path(source).exists():  # a path as tune records it: relative to the working directory when inside it
        try:
            source = str(Path(source).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            pass
    profile["measured_on"] = {"data": source, "seq_len": args.seq_len, "blocks": int(blocks.shape[0]),
                              "max_blocks": args.max_blocks, "tokens": profile["tokens"],
                              "blocks_digest": blocks_digest(blocks)}
    out = sys.stderr if args.json else sys.stdout  # notes; with --json stdout holds the JSON only
    if args.json:
        print(json.dumps(json_safe(metrics), indent=2, sort_keys=True))
    else:
        print(format_metrics(metrics))
        if "gates" in metrics:
            print(format_gate_report(metrics["gates"]))
        print(format_profile(profile))
    if plot_path is not None:
        if plot_profile(profile, plot_path, title=f"exit profile of {args.dir} ({profile['tokens']:,} tokens of "
                                                  f"{source})"):
            print(f"exit profile plot: {plot_path}", file=out)
        else:
            print("exit profile plot skipped: matplotlib is not installed (pip install 'eetune[bench]')", file=out)
    if not args.no_store:
        path = store_profile(args.dir, profile)
        print(f"exit profile stored in {path} (training.exit_profile)", file=out)


# --- tune ----------------------------------------------------------------------------------
def add_tune(sub):
    p = sub.add_parser("tune", help="tune only the exit heads, backbone frozen (stage 2 of EE-Tuning)",
                       description="Train the exit heads of an exits directory on text with the backbone frozen "
                                   "and write the tuned exits directory. Under torchrun: DDP, or FSDP2 with --fsdp.")
    p.add_argument("dir", help="exits directory to tune (from `eetune convert`, or an earlier tune)")
    p.add_argument("--out", required=True, help="tuned exits directory to write (new, empty, or an exits directory)")
    # Every other flag is a field of TuneConfig: its type, default, choices and help come from there.
    add_fields(p, TuneConfig, ["data"])
    add_fields(p.add_mutually_exclusive_group(), TuneConfig, ["steps", "tokens"])
    add_fields(p, TuneConfig, ["seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "decay",
                               "weight_decay", "betas", "clip", "dtype", "seed", "loss_weights", "loss_weights_start",
                               "loss_weights_warmup", "loss_chunk", "dynamic_weights", "distill", "val_blocks", "max_blocks",
                               "eval_every", "select", "save_every", "resume", "train_dir", "cache_hidden",
                               "cache_dtype", "fsdp", "progress"],
               metavars={"distill": "ALPHA", "cache_hidden": "DIR", "train_dir": "DIR", "betas": "B1,B2",
                         "loss_weights": "W1,W2,...", "loss_weights_start": "W1,W2,..."})
    add_fields(p.add_argument_group("generated data (--data generated:N: continuations sampled from the model, "
                                    "cached)"), TuneConfig,
               ["gen_temperature", "gen_top_p", "gen_max_new_tokens", "gen_batch_size"])
    add_fields(p.add_argument_group("restricted-vocabulary heads (K token ids + OTHER)"), TuneConfig, ["exit_vocab"],
               metavars={"exit_vocab": "K"})
    g = p.add_argument_group("gates (learned exit decisions: a logistic probe per exit on its input hidden state)")
    add_fields(g.add_mutually_exclusive_group(), TuneConfig, ["gates", "gates_only"])
    add_fields(g, TuneConfig, ["gate_tokens"], metavars={"gate_tokens": "N"})
    p.set_defaults(func=cmd_tune)


def cmd_tune(args):
    import os

    from eetune.train.tune import tune

    cfg = from_args(TuneConfig, args)  # progress: a bar on a terminal, status lines elsewhere (eetune.progress)
    # Every path tune writes, refused before the data and the model are loaded.
    check_writable(args.out, "write --out", kind="dir")
    for flag, path in (("--train-dir", cfg.train_dir), ("--cache-hidden", cfg.cache_hidden)):
        if path:
            check_writable(path, f"write {flag}", kind="into")
    s = tune(args.dir, args.out, cfg)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if not args.gates_only:
        sel = s.get("selected")
        if sel:
            val = ", ".join(f"exit {k}: CE {v:.3f}, agreement {sel['val_agreement'][k]:.3f}"
                            for k, v in sel["val_loss"].items())
            which = (f"the heads of step {sel['step']} (best validation {args.select})" if sel["step"] != s["steps"]
                     else "the last step's heads")
        else:
            val, which = "none (no held-out blocks)", "the last step's heads"
        print(f"wrote {args.out}: {s['steps']} steps, {s['tokens']:,} tokens in {s['wall_time_s']:.0f} s; "
              f"{which}; validation {val}")
    g = s.get("gates")
    if g:
        from eetune.measure.evaluate import format_gate_report
        print(f"{'wrote ' + args.out + ': ' if args.gates_only else ''}gates for exits after layers "
              f"{[int(k) for k in g['report']['exits']]} fit on {g['tokens']:,} tokens in {g['seconds']:.0f} s "
              f"({g['collect_s']:.0f} s collecting features, {g['fit_s']:.1f} s fitting)")
        print(format_gate_report(g["report"]))


# --- generate ------------------------------------------------------------------------------
EXIT_COLOURS = ["32", "36", "33", "35", "34", "92", "96", "93"]  # ANSI: green, cyan, yellow, ...


def add_generate(sub):
    p = sub.add_parser("generate", help="decode with early exits (full | early-exit | self-spec)",
                       description="Generate text with an exits directory: full-depth baseline, lossy early exit "
                                   "by confidence (KV recomputation), or lossless self-speculative decoding. "
                                   "Prompts are plain text to be continued unless --chat puts them through the "
                                   "tokenizer's chat template (instruct models, questions and instructions).")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
    p.add_argument("--prompt-file", help="a UTF-8 text file whose whole content is one prompt")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=False,
                   help="wrap each prompt as a user turn of the tokenizer's chat template, as instruct models expect "
                        "for questions and instructions. Default: off, plain completion (the prompt is continued as "
                        "text; right for base models and for 'The capital of France is'), as in the Python API")
    # The decoding flags are fields of DecodeOptions: type, default, choices and help come from there.
    add_fields(p, DecodeOptions, ["mode", "threshold", "exit_thresholds", "confidence", "draft_len", "draft_exit",
                                  "draft_vocab", "draft_context", "compile", "verbose", "max_new_tokens",
                                  "temperature", "top_k", "top_p", "seed"],
               defaults={"mode": "early-exit"}, types={"draft_exit": _draft_exit, "exit_thresholds": _exit_thresholds},
               metavars={"draft_vocab": "K", "draft_exit": "LAYER|auto", "exit_thresholds": "K:T,..."})
    p.add_argument("--device", default="cpu", help="torch device (default cpu; on cuda the engine records its "
                                                   "segments as CUDA graphs)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone weights dtype (default fp32)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--stream", action="store_true", help="print text as it is generated (one prompt)")
    p.add_argument("--show-exits", action="store_true",
                   help="colour each token by the exit that produced it (plain text when not a terminal)")
    p.add_argument("--json", action="store_true", help="print text and per-token statistics as JSON")
    p.set_defaults(func=cmd_generate)


def use_chat(flag: bool | None, tokenizer) -> bool:
    """Whether prompts go through the chat template: only with --chat. The default is plain
    completion, the same as the Python API (`eetune.generate`, `eetune.decode.generate_text`:
    chat=False), whatever the tokenizer; a model without a template refuses --chat."""
    return bool(flag)


def empty_note(row: int, rows: int, result, chat: bool) -> str:
    """One line saying why a generation came back empty."""
    which = f"prompt {row + 1}" if rows > 1 else "the prompt"
    if result.finished_by == "eos":
        why = "the model emitted its end token at once"
        hint = "" if chat else " (an instruct model expects its chat template: add --chat)"
    elif result.finished_by == "stop":
        why, hint = "a --stop string came first", ""
    else:
        why, hint = "the new tokens decode to no visible text", " (raise --max-new-tokens)"
    return f"eetune: note: {which} produced no text: {why}{hint}"


def _draft_exit(value: str):
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither an exit layer nor 'auto'") from None


def _exit_thresholds(value: str) -> dict:
    """`10:0.95,20:0.9` -> {10: 0.95, 20: 0.9}."""
    out = {}
    for part in (x.strip() for x in value.split(",")):
        k, sep, t = part.partition(":")
        try:
            if not sep:
                raise ValueError
            out[int(k)] = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: give exit layer:threshold pairs, e.g. 10:0.95,20:0.9") \
                from None
    return out


def cmd_generate(args):
    import math
    from pathlib import Path

    from eetune.model.backbone import load_tokenizer
    from eetune.decode.api import DecodeOptions, generate
    from eetune.model.early_exit import EarlyExitModel

    prompts = list(args.prompt)
    if args.prompt_file:
        if not Path(args.prompt_file).is_file():
            raise EETuneError(f"prompt file not found: {args.prompt_file}")
        try:
            prompts.append(Path(args.prompt_file).read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise EETuneError(f"prompt file {args.prompt_file} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
                              f"offset {e.start}): convert it, e.g. `iconv -f latin1 -t utf-8 {args.prompt_file} > "
                              f"prompt.txt`, and pass that file") from None
    if not prompts:
        raise EETuneError("no prompt: give --prompt TEXT or --prompt-file FILE")
    if any(not p.strip() for p in prompts):
        raise EETuneError("empty prompt: give some text")
    if args.stream and len(prompts) != 1:
        raise EETuneError("--stream takes exactly one prompt")
    check_device(args.device)
    model = EarlyExitModel.from_pretrained(args.dir, dtype=args.dtype, device=args.device)
    opts = from_args(DecodeOptions, args)
    opts.validate(model)
    tok = load_tokenizer(model.backbone)
    colour = args.show_exits and sys.stdout.isatty()
    L = model.backbone.num_layers
    palette = {k: EXIT_COLOURS[i % len(EXIT_COLOURS)] for i, k in enumerate(model.exit_layers)}

    def paint(piece, stat):
        if not colour or stat.exit_layer >= L:
            return piece
        return f"\x1b[{palette[stat.exit_layer]}m{piece}\x1b[0m"

    pieces = [[] for _ in prompts]

    def on_text(b, piece, stat):
        pieces[b].append(paint(piece, stat))
        if args.stream and not args.json:
            sys.stdout.write(pieces[b][-1])
            sys.stdout.flush()

    if colour:
        legend = "  ".join(f"\x1b[{c}mexit {k}\x1b[0m" for k, c in palette.items())
        print(f"legend: {legend}  final layer {L}", file=sys.stderr)
    chat = use_chat(args.chat, tok)
    result = generate(model, prompts, tokenizer=tok, chat=chat, stop=tuple(args.stop), on_text=on_text, **{
        k: v for k, v in opts.__dict__.items() if k not in ("record_logits", "replay")})
    for b, r in enumerate(result.rows):
        if not r.text:
            print(empty_note(b, len(prompts), r, chat), file=sys.stderr)
    if args.json:
        def num(x):
            return None if isinstance(x, float) and math.isnan(x) else x
        out = {"summary": {k: num(v) for k, v in result.summary().items()},
               "rows": [{"prompt": p, "text": r.text, "ids": r.ids, "finished_by": r.finished_by,
                         "tokens": [{"id": t.token, "exit_layer": t.exit_layer, "confidence": num(t.confidence),
                                     "drafted": t.drafted} for t in r.tokens]}
                        for p, r in zip(prompts, result.rows)]}
        print(json.dumps(out, indent=2))
        return
    if args.stream:
        print()
    else:
        for b, r in enumerate(result.rows):
            if len(prompts) > 1:
                print(f"--- prompt {b + 1}")
            print("".join(pieces[b]) if colour else r.text)
    s = result.summary()
    extra = (f", {s['accepted']}/{s['drafted']} drafts accepted" if args.mode == "self-spec" else
             f", mean exit layer {s['mean_layers_per_token']:.1f} of {L}")
    if args.mode != "full":
        from eetune.measure.calibrate import describe_thresholds
        extra += f", threshold {describe_thresholds(result.thresholds)} ({result.threshold_source})"
    print(f"[{args.mode}: {s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tokens/s{extra}]", file=sys.stderr)


# --- scan ----------------------------------------------------------------------------------
def add_scan(sub):
    p = sub.add_parser("scan", help="where to put exits: fit a norm head after every layer, predict speedups",
                       description="Exit-placement scan: one pass of the frozen backbone, a norm head (final norm + "
                                   "frozen LM head) fitted after every layer, per-layer agreement and confidence on "
                                   "held-out tokens, and the predicted speedup of every set of 1-3 exits. Takes a few "
                                   "minutes on a CPU for SmolLM2-135M; nothing is written but --json and --plot.")
    p.add_argument("model", help="local HF directory, .gguf file, hub id, or an embedded model: 'smollm2-135m' (the default) or 'gemma3-270m'")
    p.add_argument("--data", default="default",
                   help="text to scan: default (BoolQ training passages), a .txt/.jsonl/.json/.parquet/.csv file "
                        "or a folder of .txt")
    p.add_argument("--tokens", type=int, default=8192,
                   help="tokens read, fitting + held out, in whole blocks (default 8192)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per backbone batch (default 8)")
    p.add_argument("--holdout", type=float, default=0.75,
                   help="share of the blocks held out to measure the heads (default 0.75; the rest fits them)")
    p.add_argument("--loss", default="kl", choices=["kl", "ce"],
                   help="head fitting loss: kl to the final layer's distribution (default) or next-token ce")
    p.add_argument("--epochs", type=int, default=2, help="AdamW epochs over the fitting tokens (default 2)")
    p.add_argument("--lr", type=float, default=5e-2, help="AdamW learning rate of the norm weights (default 5e-2)")
    p.add_argument("--fit-batch", type=int, default=32, help="tokens per optimizer step (default 32)")
    p.add_argument("--hidden-dtype", default="bf16", choices=["bf16", "fp32"],
                   help="hidden states of every layer kept in memory as (default bf16)")
    p.add_argument("--thresholds", default="0.5,0.8,0.9",
                   help="confidence thresholds of the table (default 0.5,0.8,0.9)")
    p.add_argument("--threshold", type=float, default=0.9,
                   help="the exit threshold the exit sets are simulated at (default 0.9)")
    p.add_argument("--target-agreement", type=float, default=0.95,
                   help="rank only exit sets whose predicted agreement with the full model reaches this (default 0.95)")
    p.add_argument("--head-cost", type=float, default=None, metavar="LAYERS",
                   help="cost of one exit head and of the LM head in decoder-layer equivalents (default: measured)")
    p.add_argument("--exit-vocab", default=None, metavar="K",
                   help="fit restricted-vocabulary heads: the K most frequent tokens of the fitting blocks plus OTHER "
                        "(4096, 4k; all = the whole vocabulary, the default), and cost them as such")
    p.add_argument("--max-exits", type=int, default=3, choices=[1, 2, 3], help="largest exit set (default 3)")
    p.add_argument("--top", type=int, default=5, help="exit sets to print (default 5)")
    p.add_argument("--seed", type=int, default=0, help="document order and fitting seed (default 0)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", default="scan.png", metavar="PATH",
                   help="PNG of agreement and confident share per layer (default scan.png; needs matplotlib)")
    p.add_argument("--no-plot", action="store_true", help="draw no plot")
    p.add_argument("--revision", default=None, help="hub revision of the model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone weights dtype (default fp32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load pickled weights (.bin/.pt), which can run code when loaded; off by default: "
                        "safetensors only (EETUNE_ALLOW_PICKLE=1 does the same for every verb)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress: no bar on a terminal, no status lines elsewhere (a log, a pipe)")
    p.set_defaults(func=cmd_scan)


def cmd_scan(args):
    import time
    from pathlib import Path

    from eetune.model.backbone import load_backbone, load_tokenizer
    from eetune.measure.scan import ScanConfig, format_report, run_scan, suggestion, write_json, write_plot

    try:
        thresholds = tuple(float(t) for t in args.thresholds.split(",") if t.strip())
    except ValueError:
        raise EETuneError(f"--thresholds {args.thresholds!r}: give comma-separated probabilities, e.g. 0.5,0.8,0.9") \
            from None
    cfg = ScanConfig(data=args.data, tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                     holdout=args.holdout, loss=args.loss, epochs=args.epochs, lr=args.lr, fit_batch=args.fit_batch,
                     hidden_dtype=args.hidden_dtype, thresholds=thresholds, threshold=args.threshold,
                     target_agreement=args.target_agreement, head_cost=args.head_cost, max_exits=args.max_exits,
                     top=args.top, seed=args.seed, progress=not args.no_progress,
                     exit_vocab=args.exit_vocab)
    cfg.validate()  # before the (slow) model load
    check_device(args.device)
    plot = None if args.no_plot else args.plot
    for flag, path in (("--json", args.json), ("--plot", plot)):
        if path:
            check_writable(path, f"write {flag}", "give a path in a folder you may write to"
                                                  + (", or --no-plot" if flag == "--plot" else ""))
        if path and not Path(path).resolve().parent.is_dir():
            raise EETuneError(f"{flag} {path}: folder {Path(path).parent} does not exist: create it or give "
                              f"another path")
    t0 = time.perf_counter()
    backbone = load_backbone(args.model, dtype=args.dtype, revision=args.revision,
                             trust_remote_code=args.trust_remote_code, device=args.device,
                             allow_pickle=args.allow_pickle)
    try:
        tok = load_tokenizer(backbone)
    except Exception as e:  # noqa: BLE001 - one line instead of a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EETuneError(f"cannot load the tokenizer of {args.model}: {first}: give a model with its tokenizer") \
            from None
    result = run_scan(backbone, tok, cfg)
    result["seconds"]["total_s"] = time.perf_counter() - t0
    result["suggested"] = suggestion(result, args.model)
    print(format_report(result, args.top, args.model))
    print(f"(scan took {result['seconds']['total_s']:.0f} s)")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    if plot:
        if write_plot(result, plot):
            print(f"wrote {plot}")
        else:
            print("plot skipped: matplotlib is not installed (pip install 'eetune[bench]', or pass --no-plot)")


# --- plan ----------------------------------------------------------------------------------
def add_plan(sub):
    p = sub.add_parser("plan", help="memory per rank of tuning or decoding, from the model's config.json alone",
                       description="Plan memory before running: parameter bytes of the trunk up to the deepest exit "
                                   "(the whole trunk when distillation or decoding needs it), embeddings, exit heads, "
                                   "their gradients and AdamW state, activations of a batch, and the KV cache when "
                                   "decoding; per rank, with FSDP sharding over --ranks. Reads config.json only (no "
                                   "weights, no network); says whether it fits --mem-per-rank and the smallest "
                                   "number of ranks that does.")
    p.add_argument("model", help="local HF model directory, its config.json, or an embedded model: 'smollm2-135m' or 'gemma3-270m'")
    p.add_argument("--exits", required=True,
                   help="exit positions: 1-based layers ('after layer k', e.g. 10,20) or fractions of depth (0.33,0.67)")
    p.add_argument("--mode", default="tune", choices=["tune", "decode"], help="what to plan (default tune)")
    p.add_argument("--arch", default="norm", choices=["embedding", "norm", "mlp", "layer"],
                   help="exit head architecture (default: norm)")
    p.add_argument("--output-embedding", default="copy", choices=["copy", "shared"],
                   help="own trainable LM-head copy per exit (default) or share the frozen backbone head")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                   help="backbone weights and compute dtype (default fp32; tune keeps the heads in fp32)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="blocks per micro-batch per rank, as `eetune tune --batch-size` (default 8); decode: prompts "
                        "(default 1)")
    p.add_argument("--seq-len", type=int, default=512, help="tune: tokens per block (default 512)")
    p.add_argument("--distill", type=float, default=None, metavar="ALPHA",
                   help="tune: distillation weight (default: tune's, 1 = the whole trunk is held for the final "
                        "layer's logits; 0 = the trunk up to the deepest exit only)")
    p.add_argument("--loss-chunk", type=int, default=None, metavar="TOKENS",
                   help="tune: tokens per chunk of the exit losses, as `eetune tune --loss-chunk` (default: tune's, "
                        "256; 0 = whole logits)")
    p.add_argument("--exit-vocab", default=None, metavar="K",
                   help="restricted-vocabulary heads: K token rows + OTHER per exit (4096, 4k; all = the whole "
                        "vocabulary, the default)")
    p.add_argument("--prompt-len", type=int, default=128, help="decode: prompt tokens (default 128)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="decode: new tokens (default 128)")
    p.add_argument("--ranks", type=int, default=1, help="tune: processes under torchrun, FSDP (default 1)")
    p.add_argument("--mem-per-rank", type=float, default=None, metavar="GIB",
                   help="memory of one rank (GPU or host) in GiB: say whether the plan fits and the fewest ranks "
                        "that do")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)


def cmd_plan(args):
    from eetune.measure.plan import format_plan, plan

    result = plan(args.model, args.exits, mode=args.mode, arch=args.arch, output_embedding=args.output_embedding,
                  dtype=args.dtype, distill=args.distill, batch_size=args.batch_size, seq_len=args.seq_len,
                  ranks=args.ranks, mem_per_rank_gib=args.mem_per_rank, prompt_len=args.prompt_len,
                  max_new_tokens=args.max_new_tokens, loss_chunk=args.loss_chunk, exit_vocab=args.exit_vocab)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(format_plan(result))


# --- eval ----------------------------------------------------------------------------------
def add_eval(sub):
    p = sub.add_parser("eval", help="downstream tasks: quality against speed, per threshold, with confidence "
                                    "intervals; results, plots and an HTML report",
                       description="Evaluate an exits directory on downstream tasks from the embedded data "
                                   "(ppl, xsum, boolq, mmlu, narrativeqa): quality of full, early-exit at each "
                                   "threshold and self-spec decoding on --limit items (bootstrap 95% intervals, "
                                   "paired against full), speed at batch 1 on --speed-items items, every "
                                   "setting warmed up first, then timed in interleaved rounds until each has "
                                   "--speed-min-tokens decode tokens. Writes results.json, results.csv, a PNG per task and "
                                   "report.html into --out. Prompts are zero-shot (see eetune.measure.downstream).")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--tasks", default="boolq,xsum", help="comma-separated: ppl, xsum, boolq, mmlu, narrativeqa "
                                                         "(default boolq,xsum)")
    p.add_argument("--out", required=True, help="results directory to write (replaced whole when it exists): "
                                                "results.json, results.csv, a PNG per task and report.html")
    p.add_argument("--thresholds", default="1,0.9,0.8,0.6,0.4,0.2",
                   help="early-exit thresholds (default 1,0.9,0.8,0.6,0.4,0.2); `calibrated`: the per-exit "
                        "thresholds `eetune calibrate` stored in DIR, e.g. --thresholds 0.9,calibrated")
    p.add_argument("--confidence", default="max-prob", choices=["max-prob", "gate"],
                   help="early-exit confidence measure (default max-prob)")
    p.add_argument("--limit", type=int, default=200, help="quality items per task (default 200)")
    p.add_argument("--speed-items", type=int, default=8, help="items per task timed at batch 1 (default 8)")
    p.add_argument("--speed-min-tokens", type=int, default=None,
                   help="decode tokens timed per setting at least (default 256; rounds repeat the items until then)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together for quality (default 16)")
    p.add_argument("--max-context", type=int, default=384,
                   help="tokens of a passage or article kept in a prompt (default 384)")
    p.add_argument("--no-self-spec", action="store_true", help="skip the self-spec setting")
    p.add_argument("--ppl-data", default="default-dev", help="held-out text of the ppl task (default default-dev)")
    p.add_argument("--ppl-blocks", type=int, default=16, help="blocks of the ppl task (default 16)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block of the ppl task (default 256)")
    p.add_argument("--seed", type=int, default=0, help="which items are sampled (default 0)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu; cuda on a GPU)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone weights dtype (default fp32)")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress: no bar on a terminal, no status lines elsewhere (a log, a pipe)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args):
    import os
    from pathlib import Path

    from eetune.model.backbone import load_tokenizer
    from eetune.measure.downstream import EvalConfig, format_tables, machine_meta, parse_tasks, parse_thresholds, run_eval, \
        write_outputs
    from eetune.model.early_exit import EarlyExitModel

    cfg = EvalConfig(tasks=parse_tasks(args.tasks), thresholds=parse_thresholds(args.thresholds),
                     confidence=args.confidence, limit=args.limit, speed_items=args.speed_items,
                     **({} if args.speed_min_tokens is None else {"speed_min_tokens": args.speed_min_tokens}),
                     batch_size=args.batch_size, max_context=args.max_context, self_spec=not args.no_self_spec,
                     ppl_data=args.ppl_data, ppl_blocks=args.ppl_blocks, seq_len=args.seq_len, seed=args.seed,
                     progress=not args.no_progress)  # a bar on a terminal, status lines elsewhere
    cfg.validate()
    out = Path(args.out)
    check_writable(out, "write results to", "give --out a directory in a folder you may write to", kind="dir")
    parent = out.resolve().parent
    if out.exists() and not out.is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK) \
            or out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise EETuneError(f"cannot write results to {out}: give a new directory, an empty one or an earlier "
                          f"`eetune eval` output, in a folder you may write to")
    if "xsum" in cfg.tasks:
        from eetune.measure.downstream import Rouge
        Rouge()  # refuses now, not after the other tasks, when rouge-score is missing
    check_device(args.device)
    model = EarlyExitModel.from_pretrained(args.dir, dtype=args.dtype, device=args.device)
    if cfg.confidence == "gate" and not model.has_gates:
        raise EETuneError("--confidence gate: these exits have no gates; train them with `eetune tune DIR --out "
                          "OUT --gates-only`, or use --confidence max-prob")
    tok = load_tokenizer(model.backbone)
    results = run_eval(model, tok, cfg)
    results["config"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}
    results["meta"] = machine_meta(model, args.dir)
    print(format_tables(results))
    write_outputs(results, out, model)
    print(f"wrote {out}/results.json, results.csv, report.html")


def add_report(sub):
    p = sub.add_parser("report", help="print the tables of `eetune eval` outputs and where their reports are",
                       description="Print the tables of one or more `eetune eval` output directories (their "
                                   "results.json) and the path of each report.html.")
    p.add_argument("dirs", nargs="+", help="`eetune eval --out` directories")
    p.set_defaults(func=cmd_report)


def cmd_report(args):
    from pathlib import Path

    from eetune.measure.downstream import format_tables

    for d in args.dirs:
        path = Path(d) / "results.json"
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError):
            raise EETuneError(f"{path} is missing or not JSON: give a directory written by `eetune eval --out`") \
                from None
        meta = results.get("meta", {})
        print(f"== {d}: {meta.get('exits', '?')} ({meta.get('machine', '?')}, {meta.get('date', '?')})")
        print(format_tables(results))
        print(f"report: {Path(d) / 'report.html'}")


# --- lm-eval -------------------------------------------------------------------------------
def add_lm_eval(sub):
    # Every argument after the verb goes to lm-eval's own command line untouched: this parser has
    # no options of its own (its prefix character is one nobody types), so `--model`, `--tasks`,
    # `-h` ... are collected as plain strings.
    p = sub.add_parser("lm-eval", help="run lm-evaluation-harness with the `eetune` model type (needs eetune[eval])",
                       description="lm-evaluation-harness's command line (`lm_eval ...`) with the `eetune` model "
                                   "type registered and `--model eetune` the default, e.g. `eetune lm-eval "
                                   "--model_args exits=DIR,mode=early-exit,threshold=0.8 --tasks hellaswag "
                                   "--device cpu`. model_args: exits (required), mode, threshold, confidence, "
                                   "draft_len, draft_exit, dtype, device, batch_size, max_length, logits_from "
                                   "(final or an exit layer); see eetune.measure.lmeval.",
                       add_help=False, prefix_chars="\x1f")
    p.add_argument("lm_eval_args", nargs="*", help="lm-eval's arguments (`eetune lm-eval --help` shows them)")
    p.set_defaults(func=cmd_lm_eval, lm_eval_parser=p)


def cmd_lm_eval(args):
    rest = list(args.lm_eval_args)
    if rest in ([], ["-h"], ["--help"]):  # this verb's own help, then lm-eval's (which exits 0)
        args.lm_eval_parser.print_help()
        print()
        rest = ["--help"]
    out = _lm_eval_output_path(rest)
    if out:  # lm-eval writes its results at the very end: refuse an unwritable path now
        from pathlib import Path
        check_writable(out, "write --output_path",
                       kind="file" if Path(out).suffix == ".json" or Path(out).is_file() else "into")
    try:
        from eetune.measure.lmeval import run_harness  # importing it registers the `eetune` model type
    except ImportError as e:
        raise EETuneError(f"lm-evaluation-harness is not installed ({e}): pip install 'eetune[eval]'") from None
    run_harness(rest)


def _lm_eval_output_path(argv: list[str]) -> str | None:
    """The value of lm-eval's --output_path (-o) in its argument list, if given."""
    for i, a in enumerate(argv):
        for flag in ("--output_path", "--output-path", "-o"):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "=") and flag != "-o":
                return a.split("=", 1)[1]
    return None


# --- calibrate -----------------------------------------------------------------------------
def add_calibrate(sub):
    from eetune.decode.rules import CONFIDENCES

    p = sub.add_parser("calibrate", help="choose the early-exit threshold that meets a target agreement with the "
                                         "full model, on held-out text; generate then uses it by default",
                       description="Calibrate the early-exit threshold on held-out text: teacher-forced, every "
                                   "token's confidence and top-1 at each exit and the final layer's top-1; the "
                                   "engine's rule (the first exit whose confidence >= its threshold emits its top-1, "
                                   "else the final layer) simulated on a calibration part for a fine grid of "
                                   "thresholds (> 1: never exit); the threshold meeting --target-agreement (share of "
                                   "tokens equal to the full model's top-1) at the highest predicted speedup (layers "
                                   "climbed + exit heads evaluated + the LM head, costs measured on this machine) is "
                                   "chosen, then measured on a separate test part. Stored in DIR/exit_config.json "
                                   "under `calibration`: `eetune generate DIR` in early-exit mode uses it when no "
                                   "--threshold is given and --confidence matches. With --continue-tokens N the text is "
                                   "the model's own: prompts continued greedily for N tokens, only the continuations "
                                   "counted (what a decode of such prompts sees; a model is surer of its own text).")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--target-agreement", type=float, default=0.95,
                   help="share of tokens that must equal the full model's top-1, in (0, 1] (default 0.95)")
    p.add_argument("--confidence", default="max-prob", choices=list(CONFIDENCES),
                   help="confidence measure to calibrate, as `generate --confidence` (default max-prob)")
    p.add_argument("--per-exit", action="store_true",
                   help="one threshold per exit (coordinate search from the best global one) instead of one for all")
    p.add_argument("--data", default="default-dev",
                   help="held-out text: default-dev (BoolQ dev passages), a .txt/.jsonl file or folder (as evaluate); "
                        "with --continue-tokens, the prompts: default-dev (requests about BoolQ dev passages) or "
                        "each text of a file one prompt")
    p.add_argument("--continue-tokens", type=int, default=0, metavar="N",
                   help="calibrate on the model's own greedy continuations of N tokens of the --data prompts, "
                        "counting only them (0, the default: teacher-forced --data text)")
    p.add_argument("--chat", action="store_true",
                   help="with --continue-tokens and a prompts file: each prompt is a user turn of the chat template")
    p.add_argument("--calib-blocks", type=int, default=8,
                   help="blocks (prompts with --continue-tokens) the threshold is chosen on (default 8)")
    p.add_argument("--test-blocks", type=int, default=8,
                   help="further blocks (prompts) it is then measured on (default 8)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--batch-size", type=int, default=4, help="blocks per teacher-forced pass (default 4)")
    p.add_argument("--json", action="store_true", help="print the calibration record as JSON")
    p.add_argument("--no-store", action="store_true", help="leave the exits directory untouched")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args):
    import os

    from eetune.model.backbone import load_tokenizer
    from eetune.measure.calibrate import (calibrate, calibration_blocks, check_continue_tokens, check_settings,
                                          continuation_parts, format_calibration, store_calibration)
    from eetune.model.config import ExitConfig
    from eetune.measure.evaluate import json_safe
    from eetune.model.early_exit import EarlyExitModel

    check_settings(args.target_agreement, args.confidence, args.calib_blocks, args.test_blocks, args.seq_len,
                   args.batch_size)
    if args.continue_tokens != 0:
        check_continue_tokens(args.continue_tokens)
    if args.chat and not args.continue_tokens:
        raise EETuneError("--chat applies to the prompts of --continue-tokens: give --continue-tokens N too")
    config = ExitConfig.load(args.dir)  # before the (slow) model load
    if args.confidence == "gate" and not config.gates:
        raise EETuneError("--confidence gate: these exits have no gates; train them with `eetune tune DIR --out OUT "
                          "--gates-only`, or use --confidence max-prob")
    if not args.no_store:
        if not os.access(args.dir, os.W_OK):
            raise EETuneError(f"cannot store the calibration: {args.dir} is not writable; pass --no-store")
        check_writable(args.dir, "store the calibration", "pass --no-store", kind="into")
    model = EarlyExitModel.from_pretrained(args.dir)
    tokenizer = load_tokenizer(model.backbone)
    if args.continue_tokens:
        calib, test, data = continuation_parts(model, tokenizer, args.data, args.calib_blocks, args.test_blocks,
                                               args.continue_tokens, args.chat, batch_size=8, progress=True)
    else:
        calib, test, data = calibration_blocks(tokenizer, args.data, args.seq_len, args.calib_blocks, args.test_blocks)
    result = {**calibrate(model, calib, test, args.target_agreement, args.confidence, args.per_exit,
                          args.batch_size, progress=True), "data": data}
    out = sys.stderr if args.json else sys.stdout  # notes; with --json stdout holds the JSON only
    if args.json:
        print(json.dumps(json_safe(result), indent=2, sort_keys=True))
    else:
        print(format_calibration(result, args.dir))
    if not args.no_store:
        path = store_calibration(args.dir, result)
        print(f"stored in {path} (calibration): `eetune generate {args.dir}` uses it in early-exit mode with "
              f"--confidence {args.confidence} when no --threshold is given", file=out)


# --- export --------------------------------------------------------------------------------
def add_export(sub):
    p = sub.add_parser("export", help="write one exit as a standalone draft model (HF directory or GGUF) for vLLM, "
                                      "SGLang, llama.cpp or transformers' assistant_model",
                       description="Write the backbone's first k layers plus exit k's transform, norm and output "
                                   "projection as an ordinary model of the backbone's family (no custom code): a "
                                   "Hugging Face directory (config.json, model.safetensors, generation_config.json, "
                                   "tokenizer files) or, with --format gguf, one GGUF file. Its logits are the exit's. "
                                   "See docs/export.md.")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--exit", type=int, required=True, metavar="K", help="the exit to export (its layer, 1-based)")
    p.add_argument("--out", required=True,
                   help="directory to write (--format hf), or .gguf file (--format gguf); must not exist unless --force")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="Hugging Face directory (default) or GGUF")
    p.add_argument("--gguf-type", default="f32", choices=["f32", "f16"], help="GGUF tensor type (default f32)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weights dtype of an HF export (default fp32)")
    p.add_argument("--other-rows", action="store_true",
                   help="export a restricted-vocabulary head (K tokens + OTHER) anyway: every non-K row of the "
                        "full-vocabulary LM head is the OTHER row (drafting stays lossless, acceptance drops)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)


def cmd_export(args):
    from eetune.serve.export import export

    result = export(args.dir, args.exit, args.out, format=args.format, force=args.force, other_rows=args.other_rows,
                    dtype=args.dtype, gguf_type=args.gguf_type)
    print(result.line())


# --- serve ---------------------------------------------------------------------------------
def add_serve(sub):
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching; full, early-exit, "
                                     "self-spec or auto per request)",
                       description="Serve an exits directory over HTTP with the OpenAI API (/v1/completions, "
                                   "/v1/chat/completions, /v1/models, /health, /metrics), streaming as Server-Sent "
                                   "Events. Requests join a running batch at the next step (continuous batching, "
                                   "chunked prefill). Per request, extra_body={\"eetune\": {\"mode\": ..., "
                                   "\"threshold\": ...}} picks the decoding. Needs `pip install eetune[serve]`. "
                                   "See docs/serving.md.")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--model-name", default=None, help="the model id clients pass (default: the directory's name)")
    p.add_argument("--mode", default="auto", choices=["full", "early-exit", "self-spec", "auto"],
                   help="decoding of requests that do not choose one (default auto: --auto-mode while at most "
                        "--ee-max-batch rows run, batched full above)")
    p.add_argument("--auto-mode", default="self-spec", choices=["self-spec", "early-exit"],
                   help="what auto uses at small batch (default self-spec: lossless)")
    p.add_argument("--ee-max-batch", type=int, default=1,
                   help="auto: most running rows at which early exit / self-spec is used (default 1)")
    p.add_argument("--threshold", type=float, default=None,
                   help="default exit / draft threshold (default: the exits directory's calibration for early exit, "
                        "else 0.9)")
    p.add_argument("--draft-len", type=int, default=4, help="self-spec: most tokens drafted per round (default 4)")
    p.add_argument("--draft-exit", type=_draft_exit, default=None, metavar="LAYER|auto",
                   help="self-spec: the exit that drafts (default: the deepest)")
    p.add_argument("--draft-context", action="store_true",
                   help="self-spec: a restricted-vocabulary draft head also proposes each prompt's tokens outside "
                        "its K (requests may set eetune.draft_context themselves)")
    p.add_argument("--max-batch", type=int, default=8, help="most requests decoding at once (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a row; more are refused with 503 and Retry-After (default 64)")
    p.add_argument("--max-context", type=int, default=2048,
                   help="cache positions per row: prompt + max_tokens must fit (default 2048, at most the model's)")
    p.add_argument("--prefill-chunk", type=int, default=256,
                   help="prompt tokens read per scheduler step, between decode steps (default 256)")
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of requests that give none (default 256)")
    p.add_argument("--drain-s", type=float, default=30.0,
                   help="on SIGTERM: seconds to let running requests finish before exiting (default 30)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="backbone weights dtype (default fp32)")
    p.add_argument("--step-delay", type=float, default=0.0,
                   help="seconds to sleep after each scheduler step (tests and demonstrations: makes a tiny model "
                        "slow enough to watch queueing, disconnects and draining; default 0)")
    p.set_defaults(func=cmd_serve)


def cmd_serve(args):
    try:
        from eetune.serve.server import serve
    except ImportError as e:
        raise EETuneError(f"`eetune serve` needs the serve extra ({e.name} is missing): pip install 'eetune[serve]'") \
            from None
    for flag, v, lo in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                        ("--ee-max-batch", args.ee_max_batch, 0), ("--max-context", args.max_context, 2),
                        ("--prefill-chunk", args.prefill_chunk, 1), ("--max-tokens", args.max_tokens, 1),
                        ("--draft-len", args.draft_len, 1)):
        if v < lo:
            raise EETuneError(f"{flag} must be at least {lo} (got {v})")
    if not 0 <= args.port <= 65535:
        raise EETuneError(f"--port {args.port} is not a port (0..65535)")
    check_device(args.device)
    code = serve(args.dir, args.host, args.port, device=args.device, dtype=args.dtype, drain_s=args.drain_s,
                 settings={"mode": args.mode, "threshold": args.threshold, "draft_len": args.draft_len,
                           "draft_exit": args.draft_exit, "draft_context": args.draft_context,
                           "max_tokens": args.max_tokens,
                           **({"model_name": args.model_name} if args.model_name else {})},
                 scheduler={"max_batch": args.max_batch, "max_queue": args.max_queue,
                            "ee_max_batch": args.ee_max_batch, "auto_mode": args.auto_mode,
                            "prefill_chunk": args.prefill_chunk, "capacity": args.max_context,
                            "step_delay": args.step_delay})
    if code:
        raise SystemExit(code)

# --- entry point ---------------------------------------------------------------------------
def check_device(value: str) -> None:
    """Refuse, in one line, a --device that is not a torch device or names CUDA on a machine without."""
    import torch

    try:
        device = torch.device(value)
    except RuntimeError:
        raise EETuneError(f"--device {value!r} is not a torch device: give cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EETuneError(f"--device {value}: no CUDA device on this machine: use --device cpu")


def check_writable(path, what: str, fix: str = "give a path in a folder you may write to", *,
                   kind: str = "file") -> None:
    """Refuse, in one line and before any loading or work, an output path this process cannot write.

    `kind`: "file" (a file written under its own name) or "dir" (a directory written under its own
    name) is made beside itself and renamed into place (eetune.fsio), so its folder must take new
    files; "into" (an existing directory written into: an exits directory whose config is updated, a
    cache, a checkpoint folder) must itself take them. Folders that do not exist yet are created then,
    so the nearest existing one is what is tried, by creating and removing a temporary file in it:
    this also catches what permission bits do not (root, read-only file systems, /proc). The error
    reads `cannot WHAT: PATH is not writable (why); FIX`."""
    import os
    import tempfile
    from pathlib import Path

    path = Path(path)
    if kind == "file" and path.is_dir():
        raise EETuneError(f"cannot {what}: {path} is a directory; {fix}")
    folder = Path(os.path.abspath(path if kind == "into" else path.parent))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    why = None
    if not folder.is_dir():
        why = f"{folder} is a file, not a folder"
    else:
        try:
            fd, probe = tempfile.mkstemp(prefix=".eetune-write-check-", dir=folder)
        except OSError as e:
            why = f"cannot create a file in {folder}: {e.strerror or e}"
        else:
            os.close(fd)
            os.unlink(probe)
    if why is not None:
        raise EETuneError(f"cannot {what}: {path} is not writable ({why}); {fix}")


VERBS = [add_convert, add_info, add_evaluate, add_tune, add_generate, add_scan, add_plan, add_eval, add_report, add_lm_eval,
         add_calibrate, add_export, add_serve]


class _Parser(argparse.ArgumentParser):
    """argparse, but bad arguments give one line (`eetune: error: ...`) and exit code 2."""

    def error(self, message):
        self.exit(2, f"eetune: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from eetune.version import __version__

    parser = _Parser(prog="eetune", description="Early-exit tuning and decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"eetune {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error instead of its one-line message "
                             "(also EETUNE_DEBUG=1)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for add in VERBS:
        add(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits with 2 and one usage line on bad syntax
    _quiet_transformers()
    try:
        args.func(args)
    except EETuneError as e:
        import os
        if args.debug or os.environ.get("EETUNE_DEBUG") == "1":
            import traceback
            traceback.print_exc()
        print(f"eetune: {'interrupted' if e.exit_code == 130 else 'error'}: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # the reader went away (e.g. `| head`): not an error of ours
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except OSError as e:  # a full disk or a path we may not write: one line, unless debugging
        import os
        line = _os_error_line(e)
        if line is None or args.debug or os.environ.get("EETUNE_DEBUG") == "1":
            raise
        print(f"eetune: error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eetune: interrupted (Ctrl-C); nothing half-written is left under the output's name", file=sys.stderr)
        return 130
    return 0


def _os_error_line(e: OSError) -> str | None:
    """The one line for a resource or permission error of the file system (None: another kind of
    OSError, shown with its traceback). Every file eetune writes goes to a temporary name first,
    so what the name held before is still there."""
    import errno

    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}: nothing was half-written, what was there before is kept; "
                f"free some space and run the same command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{e.strerror.lower()}{where}: give a path you may write to (or read, for inputs)"
    return None


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


if __name__ == "__main__":
    sys.exit(main())

"""The `eetune` command line: each verb is a thin call into one library function.

    eetune convert --model smollm2-135m --exits 10,20 --arch mlp --out runs/exits
    eetune info runs/exits
    eetune evaluate runs/exits --data default-dev

Bad input prints one line `eetune: error: ...` and exits with code 2, writing nothing.
"""

from __future__ import annotations

import argparse
import json
import sys

from .errors import EETuneError


# --- convert -------------------------------------------------------------------------------
def add_convert(sub):
    p = sub.add_parser("convert", help="attach exit heads to a pretrained causal LM (stage 1 of EE-Tuning)",
                       description="Attach exit heads after chosen layers of a pretrained causal LM and write "
                                   "an exits directory (exit_config.json + exit_heads.safetensors).")
    p.add_argument("--model", required=True,
                   help="local HF directory, .gguf file, hub id, or 'smollm2-135m' (the embedded default)")
    p.add_argument("--exits", required=True,
                   help="exit positions: 1-based layers ('after layer k', e.g. 10,20) or fractions of depth (0.33,0.67)")
    p.add_argument("--arch", default="norm", choices=["embedding", "norm", "mlp", "layer"],
                   help="exit head architecture (default: norm)")
    p.add_argument("--init", default="copy", choices=["copy", "random"],
                   help="initialise heads by copying backbone modules (default) or at random")
    p.add_argument("--output-embedding", default="copy", choices=["copy", "shared"],
                   help="own trainable LM-head copy per exit (default) or share the frozen backbone head")
    p.add_argument("--revision", default=None, help="hub revision of --model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights dtype (default fp32)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code (off by default)")
    p.add_argument("--out", required=True, help="exits directory to write (new, empty, or an exits directory)")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args):
    from pathlib import Path

    from .backbone import load_backbone
    from .config import parse_exit_layers
    from .model import EarlyExitModel, check_output_dir

    check_output_dir(Path(args.out))  # refuse before the (slow) model load
    backbone = load_backbone(args.model, dtype=args.dtype, revision=args.revision,
                             trust_remote_code=args.trust_remote_code)
    layers = parse_exit_layers(args.exits, backbone.num_layers)
    model = EarlyExitModel.convert(backbone, layers, arch=args.arch, init=args.init,
                                   output_embedding=args.output_embedding)
    model.save_pretrained(args.out)
    c = model.parameter_counts()
    print(f"wrote {args.out}: {args.arch} exits after layers {list(layers)} of {backbone.num_layers} "
          f"({c['trainable']:,} trainable head parameters, {c['frozen_backbone']:,} frozen backbone parameters)")


# --- info ----------------------------------------------------------------------------------
def add_info(sub):
    p = sub.add_parser("info", help="show an exits directory's configuration and parameter counts",
                       description="Print an exits directory's configuration and its trainable vs frozen "
                                   "parameter counts (loads the backbone it names).")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)


def cmd_info(args):
    from .model import EarlyExitModel

    model = EarlyExitModel.from_pretrained(args.dir)
    cfg, counts = model.config.to_dict(), model.parameter_counts()
    if args.json:
        print(json.dumps({"config": cfg, "parameters": counts}, indent=2, sort_keys=True, default=str))
        return
    print(f"exits directory  {args.dir}")
    for key in ("base_model", "model_type", "num_layers", "exit_layers", "arch", "init", "output_embedding",
                "backbone_fingerprint", "eetune_version"):
        print(f"  {key:<22} {cfg[key]}")
    total = counts["frozen_backbone"] + counts["trainable"]
    print(f"  {'trainable (heads)':<22} {counts['trainable']:,} ({counts['trainable'] / total:.1%} of all)")
    print(f"  {'frozen (backbone)':<22} {counts['frozen_backbone']:,}")
    for k, n in counts["per_exit"].items():
        print(f"  {'exit after layer ' + str(k):<22} {n:,} parameters")
    if cfg.get("training"):
        print(f"  {'training':<22} {json.dumps(cfg['training'], sort_keys=True)}")


# --- evaluate ------------------------------------------------------------------------------
def add_evaluate(sub):
    p = sub.add_parser("evaluate", help="per-exit held-out cross-entropy and agreement with the final layer",
                       description="Teacher-forced evaluation of every exit on held-out text: next-token "
                                   "cross-entropy, top-1 agreement with the final layer, confident share.")
    p.add_argument("dir", help="exits directory")
    p.add_argument("--data", default="default-dev",
                   help="evaluation text: default-dev (BoolQ dev passages), a .txt/.jsonl file or folder")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per block (default 256)")
    p.add_argument("--max-blocks", type=int, default=16, help="number of blocks to evaluate (default 16)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args):
    from .backbone import load_tokenizer
    from .data import load_texts, pack_blocks
    from .evaluate import exit_metrics, format_metrics
    from .model import EarlyExitModel

    if args.seq_len < 2 or args.max_blocks < 1 or args.batch_size < 1:
        raise EETuneError("--seq-len must be >= 2, --max-blocks and --batch-size >= 1")
    texts = load_texts(args.data)
    model = EarlyExitModel.from_pretrained(args.dir)
    blocks = pack_blocks(load_tokenizer(model.backbone), texts, args.seq_len, args.max_blocks)
    metrics = exit_metrics(model, blocks, args.batch_size, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    else:
        print(format_metrics(metrics))


# --- entry point ---------------------------------------------------------------------------
VERBS = [add_convert, add_info, add_evaluate]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="eetune", description="Early-exit tuning and decoding for HF causal LMs.")
    parser.add_argument("--version", action="version", version=f"eetune {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
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
        print(f"eetune: error: {e}", file=sys.stderr)
        return 2
    return 0


def _quiet_transformers():
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass


if __name__ == "__main__":
    sys.exit(main())

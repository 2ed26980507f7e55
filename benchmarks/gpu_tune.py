"""EE-Tuning step against a full fine-tuning step on a GPU: step time and peak memory (issue 8, item 4).

    python3 benchmarks/gpu_tune.py                                  # CUDA if present: llama-3.2-1b shape, 8 x 2048
    python3 benchmarks/gpu_tune.py --device cuda --shape llama-3.2-1b --batch-size 8 --seq-len 2048 --steps 5
    .venv/bin/python benchmarks/gpu_tune.py --device cpu --shape tiny --batch-size 2 --seq-len 64 --steps 2 \
        --tag cpu-smoke --out /tmp/gpu_tune_smoke.json              # CPU smoke run of the code path

Random weights of a Llama shape (SHAPES of benchmarks/engine_trace.py, plus `tiny` for CPU smoke
runs; timing depends on shapes, not on weight values), built directly on the device. Nothing is
downloaded: the model gets a word-level tokenizer of its vocabulary size, and the data are random
tokens written to a temporary text file. One process, one machine, the same batch shape:

- `full`: full fine-tuning, the baseline users would run: every weight trainable, fp32 master
  parameters, bf16 autocast, `model(input_ids, labels=input_ids)` (the whole logits, as Hugging
  Face computes them), backward, clip 1.0, AdamW (0.9, 0.95). If it runs out of memory, the
  result says so and the same batch is retried with gradient checkpointing (noted in the JSON).
- `ee`: eetune's own tuning step, `eetune.train.tune.train_step`, on a run set up by the library's
  named steps (`_check_run`, `_load_for_tuning`, `_setup`, `_seed`, as tests/test_tune.py's
  test_named_steps_compose_to_tune drives them) from the random model saved as bf16 safetensors
  and exits converted as `eetune convert` does: `--dtype bf16` (frozen backbone weights in bf16,
  heads in fp32 with bf16 autocast), the paper's LM loss (`--distill 0`, so the backbone is
  loaded and run only up to the deepest exit), the chunked exit loss (the default `--loss-chunk`).

Per configuration: 2 warm-up steps, then `--steps` timed steps (synchronised on CUDA), the
median step time; peak memory over those steps (CUDA: `max_memory_allocated` after
`reset_peak_memory_stats`; CPU: peak RSS, VmHWM reset through /proc/self/clear_refs) minus the
memory held before the configuration's model existed. The two run one after the other, everything
of the first freed in between. The ratios ee/full are checked against the targets (step time
<= 0.25, peak memory <= 0.5). Prints one JSON line and writes it to
benchmarks/results/gpu_tune-<tag>.json (tag: the GPU's name, e.g. nvidia-h200, or cpu).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "src"))
sys.path.insert(0, str(ROOT))

from engine_trace import SHAPES as LLAMA_SHAPES  # noqa: E402
from load_memory import proc_status_mb  # noqa: E402
from plan_check import reset_peak as reset_peak_rss  # noqa: E402

SHAPES = {**LLAMA_SHAPES,
          "tiny": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=512, exits=(1, 2), tie_word_embeddings=True)}
WARMUP = 2  # untimed steps per configuration (allocator, kernels and optimizer state settle)
TARGETS = {"step_time_ratio": 0.25, "peak_memory_ratio": 0.5}  # issue 8 item 4: ee / full at most
FULL_LR, BETAS, CLIP = 1e-5, (0.9, 0.95), 1.0  # tune's betas and clip; the lr does not change the timing


# --- the model, its tokenizer, the data ------------------------------------------------------
def llama_config(shape: str, seq_len: int):
    from transformers import LlamaConfig

    spec = dict(SHAPES[shape])
    spec.pop("exits")
    v = spec["vocab_size"]
    return LlamaConfig(**spec, max_position_embeddings=max(4096, seq_len), initializer_range=0.02,
                       bos_token_id=None, eos_token_id=v - 1, pad_token_id=None, use_cache=False)


def build_model(config, device: torch.device, dtype: torch.dtype):
    """Random weights of `config`, created on `device` itself (no CPU copy of a big model)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over the whole vocabulary: `w<i>` is token i, `[EOS]` the last id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size - 1)}
    vocab["[EOS]"] = vocab_size - 1
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]")


def prepare(work: Path, config, exits: tuple[int, ...], args, device: torch.device) -> tuple[Path, Path]:
    """Not measured: the random model saved as bf16 safetensors with its tokenizer, its exits
    converted as `eetune convert` does (on the CPU, loaded up to the deepest exit), and a text
    file of random tokens holding exactly the blocks the EE steps take. Returns (exits, data)."""
    from transformers.utils import logging as hf_logging

    from eetune import EarlyExitModel, load_backbone

    hf_logging.disable_progress_bar()  # save_pretrained's shard bar
    model_dir = work / "model"
    model = build_model(config, device, torch.bfloat16)
    model.save_pretrained(model_dir)  # transformers 5 always writes safetensors (no safe_serialization flag)
    del model
    free(device)
    if not (model_dir / "model.safetensors").is_file() and not (model_dir / "model.safetensors.index.json").is_file():
        raise SystemExit(f"save_pretrained wrote no safetensors: {sorted(p.name for p in model_dir.iterdir())}")
    word_tokenizer(config.vocab_size).save_pretrained(model_dir)
    also = (config.num_hidden_layers - 1,) if args.arch == "layer" else ()  # a `layer` exit copies the last layer
    bb = load_backbone(str(model_dir), dtype="fp32", up_to_layer=max(exits), also_layers=also)
    EarlyExitModel.convert(bb, exits, arch=args.arch, output_embedding=args.embedding).save_pretrained(work / "exits")
    del bb
    gc.collect()
    # One document of n_blocks x seq_len words; packing appends EOS, so it fills exactly n_blocks blocks.
    n_tokens = args.batch_size * (WARMUP + args.steps) * args.seq_len
    ids = torch.randint(0, config.vocab_size - 1, (n_tokens,), generator=torch.Generator().manual_seed(1))
    data = work / "data.txt"
    data.write_text(" ".join(f"w{i}" for i in ids.tolist()))
    return work / "exits", data


# --- measuring -------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_mb(device: torch.device) -> float:
    """What is held now: CUDA tensors (the caching allocator's count), or the process's RSS."""
    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else proc_status_mb("VmRSS")


def reset_peak(device: torch.device) -> bool:
    """Start a new peak; False where it cannot be reset (a CPU without a writable clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        reset_peak_rss()  # VmHWM := VmRSS
    except OSError:
        return False
    return True


def peak_mb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else proc_status_mb("VmHWM")


def measure_steps(step, device: torch.device, steps: int, start_mb: float) -> dict:
    """WARMUP + `steps` calls of `step()`; the times of the last `steps` and the peak memory over
    all of them (the optimizer state appears in the first), less `start_mb`."""
    held = memory_mb(device)
    peak_known = reset_peak(device)
    times = []
    for i in range(WARMUP + steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        if i >= WARMUP:
            times.append(time.perf_counter() - t)
    peak = peak_mb(device) if peak_known else None  # None: the peak could not be reset, so it is not this run's
    return {"step_s": statistics.median(times), "step_s_all": [round(x, 5) for x in times],
            "peak_mb": None if peak is None else round(peak - start_mb, 1),
            "peak_raw_mb": None if peak is None else round(peak, 1), "start_mb": round(start_mb, 1),
            "held_before_steps_mb": round(held - start_mb, 1)}


def is_oom(e: BaseException) -> bool:
    from eetune.train.tune import _out_of_memory
    return _out_of_memory(e)


# --- the two configurations --------------------------------------------------------------------
def full_steps(config, args, device: torch.device, checkpointing: bool) -> dict:
    """Full fine-tuning: every weight trainable in fp32, bf16 autocast, HF's own LM loss."""
    start = memory_mb(device)
    model = build_model(config, device, torch.float32)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=FULL_LR, betas=BETAS, eps=1e-8, weight_decay=0.0)
    gen = torch.Generator().manual_seed(2)
    blocks = iter(torch.randint(0, config.vocab_size, (WARMUP + args.steps, args.batch_size, args.seq_len),
                                generator=gen))
    last = {}

    def step():
        ids = next(blocks).to(device)  # host to device, as tune's step does
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        last["loss"] = loss.detach()

    r = measure_steps(step, device, args.steps, start)
    r.update(trainable_params=sum(p.numel() for p in params), last_loss=float(last["loss"]),
             gradient_checkpointing=checkpointing, attention=model.config._attn_implementation)
    return r


def run_full(config, args, device: torch.device) -> tuple[dict | None, list[str]]:
    """`full_steps` as asked; out of memory, once more with gradient checkpointing (same batch).
    Returns (the measurement or None, notes)."""
    notes = []
    for checkpointing in (False, True):
        error = None
        try:
            return full_steps(config, args, device, checkpointing), notes
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            error = str(e).splitlines()[0][:200]
        free(device)  # outside the except block: the traceback (and the model it holds) is gone
        notes.append(f"full fine-tuning {'with' if checkpointing else 'without'} gradient checkpointing at "
                     f"{args.batch_size} x {args.seq_len}: out of memory ({error})")
        if not checkpointing:
            notes.append("retried with gradient checkpointing (same batch): its step recomputes each layer's "
                         "forward, so the full step time below is that of a slower, smaller-memory baseline")
    return None, notes


def run_ee(exits_dir: Path, data: Path, work: Path, args, device: torch.device) -> dict:
    """eetune's tuning step: the run set up by the library's named steps, `train_step` timed."""
    from eetune.train import tune as T

    start = memory_mb(device)
    n_blocks = args.batch_size * (WARMUP + args.steps)
    cfg = T.TuneConfig(data=str(data), steps=WARMUP + args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                       dtype="bf16", distill=0.0, val_blocks=0, max_blocks=n_blocks, progress=False)
    out = work / "tuned"
    cfg, exit_config, train_dir = T._check_run(exits_dir, out, cfg)
    model = T._load_for_tuning(exits_dir, exit_config, cfg, None, device, 0)
    run = T._setup(model, exits_dir, out, train_dir, exit_config, cfg, 1, 0, device, caller_backbone=False)
    if run.train.shape[0] != n_blocks:
        raise SystemExit(f"the data gave {run.train.shape[0]} training blocks, not {n_blocks}")
    T._seed(run)
    rows = []
    r = measure_steps(lambda: rows.append(T.train_step(run)), device, args.steps, start)
    r.update(trainable_params=sum(p.numel() for _, p in run.named),
             last_loss_per_exit={str(k): rows[-1][f"loss_{k}"] for k in run.layers},  # mean CE of each exit
             trunk_layers_loaded=run.trunk_layers_loaded, trunk_layers_held=run.trunk_layers_held,
             loss_chunk=cfg.loss_chunk, distill=cfg.distill, dtype=cfg.dtype,
             library_step_s=statistics.median(row["step_s"] for row in rows[WARMUP:]))
    return r


# --- the record --------------------------------------------------------------------------------
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import transformers

    import eetune
    m = {"device": device.type, "gpu": None, "cpu": cpu_name(), "cpus": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
         "float32_matmul_precision": torch.get_float32_matmul_precision(),  # "highest": no TF32 for fp32 matmuls
         "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
         "eetune": eetune.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        m.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    return m


def default_tag(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def ratio(a, b):
    return None if a is None or b is None else round(a / b, 4)


def summarise(args, device, tag, exits, config, full, ee, notes, wall_s) -> dict:
    step_ratio = ratio(ee["step_s"], full and full["step_s"])
    mem_ratio = ratio(ee["peak_mb"], full and full["peak_mb"])
    if device.type == "cpu":
        notes.append("CPU: peak memory is peak RSS above the RSS before the configuration's model was built; "
                     "memory the allocator kept from earlier phases can be reused, so it is rough (smoke run)")
    notes.append("ee step = eetune.train.tune.train_step: host-to-device copy of the batch, frozen bf16 trunk to the "
                 "deepest exit under no_grad, heads + chunked exit losses (fused gradients), backward into the "
                 "heads, clip, AdamW; excluded: set-up (load, data, optimizer creation), validation, logging, "
                 "checkpoints, writing the tuned exits")
    return {
        "benchmark": "gpu_tune", "issue": "8 item 4", "tag": tag, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine_info(device),
        "settings": {"shape": args.shape, "num_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
                     "vocab_size": config.vocab_size, "exits": list(exits), "arch": args.arch,
                     "output_embedding": args.embedding, "batch_size": args.batch_size, "seq_len": args.seq_len,
                     "tokens_per_step": args.batch_size * args.seq_len, "warmup_steps": WARMUP,
                     "timed_steps": args.steps, "weights": "random (seed 0), built on the device",
                     "data": "random tokens through a word-level tokenizer of the vocabulary",
                     "optimizer": f"AdamW betas {list(BETAS)}, eps 1e-8, weight decay 0, clip {CLIP}",
                     "precision_full": "fp32 parameters, gradients and AdamW state; bf16 autocast; HF loss "
                                       "(labels=) on the whole logits, upcast to fp32 by HF",
                     "precision_ee": "eetune --dtype bf16: frozen backbone weights in bf16, heads fp32 (parameters, "
                                     "gradients, AdamW state), bf16 autocast; --distill 0, chunked exit loss"},
        "full": full, "ee": ee,
        "ratios": {"step_time": step_ratio, "peak_memory": mem_ratio},
        "targets": TARGETS,
        "met": {"step_time": None if step_ratio is None else step_ratio <= TARGETS["step_time_ratio"],
                "peak_memory": None if mem_ratio is None else mem_ratio <= TARGETS["peak_memory_ratio"]},
        "notes": notes, "wall_s": round(wall_s, 1),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5, help=f"timed steps per configuration, after {WARMUP} warm-ups")
    ap.add_argument("--exits", default=None, help="exit layers, 1-based, e.g. 4,8 (default: the shape's)")
    ap.add_argument("--arch", default="mlp", choices=["embedding", "norm", "mlp", "layer"])
    ap.add_argument("--embedding", default="shared", choices=["shared", "copy"], help="exits' output embedding")
    ap.add_argument("--tag", default=None, help="results file tag (default: the GPU's name, or cpu)")
    ap.add_argument("--out", default=None, help="results file (default: benchmarks/results/gpu_tune-<tag>.json)")
    args = ap.parse_args(argv)
    if min(args.steps, args.batch_size, args.seq_len) < 1 or args.seq_len < 2:
        ap.error("--steps and --batch-size must be >= 1, --seq-len >= 2")
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    exits = tuple(int(x) for x in args.exits.split(",")) if args.exits else tuple(SHAPES[args.shape]["exits"])
    tag = args.tag or default_tag(device)
    t0 = time.perf_counter()
    config = llama_config(args.shape, args.seq_len)
    with tempfile.TemporaryDirectory(prefix="gpu_tune-") as tmp:
        work = Path(tmp)
        os.environ["EETUNE_CACHE"] = str(work / "cache")  # the token cache stays in the temporary directory
        exits_dir, data = prepare(work, config, exits, args, device)
        full, notes = run_full(config, args, device)
        free(device)
        ee = run_ee(exits_dir, data, work, args, device)
    free(device)
    record = summarise(args, device, tag, exits, config, full, ee, notes, time.perf_counter() - t0)
    line = json.dumps(record, sort_keys=True)
    print(line, flush=True)
    from eetune.fsio import atomic_write_text
    out = Path(args.out) if args.out else ROOT / "results" / f"gpu_tune-{tag}.json"
    atomic_write_text(out, json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}", file=sys.stderr)

if __name__ == "__main__":
    main()

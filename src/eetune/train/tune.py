"""EE-Tuning stage 2: tune only the exit heads, the backbone frozen.

    eetune tune runs/exits --data default --steps 200 --lr 1e-3 --warmup 10 --out runs/tuned
    torchrun --nproc_per_node 2 -m eetune.cli tune runs/exits --data default --out runs/tuned [--fsdp]
    eetune tune runs/tuned --out runs/gated --gates-only     # gates on tuned heads (heads copied as they are)

    from eetune.train.tune import TuneConfig, tune
    summary = tune("runs/exits", "runs/tuned", TuneConfig(data="default", steps=200, lr=1e-3))

`tune` reads as the recipe: check the settings, start the processes, take the locks, load the
model, `_setup` (data, parallel wrapping, optimizer), `_resume`, then the loop of `train_step`
with validation, logging and checkpoints, and `_finish`; the state they share is a `TuneRun`.
Per optimizer step `train_step` takes a global batch of token blocks (each rank its slice of
it), runs the trunk (`trunk`) in eval mode under `no_grad` up to the deepest exit (layers past it are not even kept in memory, unless `--distill` needs the final
distribution), or reads the trunk's hidden states from a `--cache-hidden` directory; computes
`sum_i w_i * CE_i` over the exits (optionally token-wise dynamic weights, optionally KL to the
final layer); back-propagates into the heads only; clips; steps AdamW with warm-up and decay.

Everything a run writes besides the final exits directory lives in its training directory
(default `OUT.train/`): `log.csv` (TensorBoard events under `tb/` when installed) and
`checkpoints/step-NNNNNNN/` with heads, optimizer state and RNG state as safetensors plus a JSON
state file, published by renaming a finished temporary directory and then atomically replacing
`checkpoints/latest.json`. `--resume` continues bit-exactly: the data order and learning rate
are functions of the step number, and the optimizer and RNG states are restored. The settings
that shape the trajectory must match the checkpoint's; --steps/--tokens may change, the
learning-rate schedule then following the new length from the checkpoint's step on (a note
says so; the summary records it under `schedule_changes`).

Modes: every training step runs the heads in train mode (dropout on where heads have it: a
`layer` exit copies a block, a GPT-2 `mlp` exit its MLP), validation and gate fitting in eval
mode with the previous mode put back, so a validation never changes the training after it; the
backbone stays in eval mode. Progress: a bar on a terminal; where stderr is not a terminal, a
status line every 30 s (`StatusLines`: step/total, loss, tokens/s, ETA), the gates' too.

Validation (the end, and every `--eval-every` steps) reports each exit's CE and its top-1
agreement with the final layer on the held-out blocks, both logged. `--select agreement` (the
default) or `ce` writes the heads of the best validation rather than the last step's (kept in
memory and in checkpoints, so a resumed run selects alike); the summary records both.

Restricted-vocabulary heads (eetune.model.heads: K token ids + OTHER) tune like full ones: the
targets are mapped to the heads' classes (outside K: OTHER), distillation folds the final
layer's distribution onto them (eetune.train.losses), and validation's agreement maps the exit's
top-1 back to a token id (OTHER never agrees). `--exit-vocab K` restricts heads that are not
restricted yet, before the first step, to the K ids most frequent in the training blocks
(`restrict_exit_vocab`; deterministic, so a resumed run restricts alike); heads restricted to
another K are refused (convert again).

Gates (eetune.train.gates): `--gates` fits a gate per exit to the heads just tuned, `--gates-only`
(`tune_gates`) to the heads of the input directory without training them; both on
`--gate-tokens` tokens of the training blocks, reported on the held-out blocks. Every written
directory also ranks the vocabulary by frequency in its training blocks (`rank_vocabulary`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from eetune.model.config import WEIGHTS_NAME, ExitConfig
from eetune.errors import EETuneError, Interrupted
from eetune.progress import StatusLines, progress_display  # noqa: F401 (StatusLines: the lines it prints)

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


@dataclass
class TuneConfig:
    """Every setting of a tuning run. Each field's comment is also its `eetune tune --help` text
    (eetune.flags generates the flags from these fields)."""
    data: str = "default"  # training text: default (BoolQ training passages), a .txt/.jsonl/.json/.parquet/.csv
    #                        file or a folder of .txt (JSONL rows: text, instruction/response, prompt/completion or
    #                        messages); generated:N[:SOURCE] samples N tokens from the model itself (SOURCE:
    #                        default = BoolQ training questions and passages, or a file of prompts); mix sources
    #                        with weights: default:0.3,generated:200000:0.7
    steps: int | None = None  # optimizer steps (default: from --tokens, else one epoch of the training blocks)
    tokens: int | None = None  # training tokens to see (instead of --steps)
    seq_len: int = 512  # tokens per block
    batch_size: int = 8  # blocks per micro-batch on each process
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = batch-size x grad-accum x processes
    lr: float = 1e-4  # peak learning rate (the paper's scripts: 1e-4)
    min_lr_ratio: float = 0.1  # the decay ends at lr x this (the paper: 1e-4 -> 1e-5)
    warmup: int = 0  # linear learning-rate warm-up steps
    decay: str = "linear"  # learning-rate schedule after the warm-up
    weight_decay: float = 0.0  # AdamW decoupled weight decay (matrices only; norms and biases never)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas, as beta1,beta2 (the paper's scripts: 0.9,0.95)
    clip: float = 1.0  # max global gradient norm (0: no clipping)
    dtype: str = "fp32"  # compute: fp32, or bf16 (backbone weights and autocast; heads kept in fp32)
    seed: int = 0  # data order (and anything random)
    loss_weights: tuple[float, ...] | None = None  # per-exit loss weights w_i, e.g. 1,0.5 (default: all 1)
    loss_weights_start: tuple[float, ...] | None = None  # loss weights at step 0, ramped linearly to --loss-weights
    loss_weights_warmup: int = 0  # steps of that ramp (0: no ramp)
    loss_chunk: int = 256  # tokens per chunk of the exit losses (eetune.train.losses: the tokens x vocabulary logits
    #                        are never held whole, their gradients computed in the same pass); 0: whole logits
    dynamic_weights: bool = False  # scale each token's loss by the exit's detached max-softmax probability (the
    #                                paper's dynamic weighting)
    distill: float | None = None  # ALPHA: loss = (1 - ALPHA) CE + ALPHA KL(final layer || exit); needs the full
    #                               forward. Default 1 (the best measured recipe, benchmarks/recipes.py: more
    #                               agreement with the final layer per tuning token), 0 with --cache-hidden; 0 is
    #                               the paper's LM loss, whose trunk stops at the deepest exit. With
    #                               --cache-hidden and ALPHA > 0 the cache holds the final layer's states too
    val_blocks: int = 8  # held-out validation blocks (whole documents never trained on; 0: none)
    max_blocks: int | None = None  # cap on the training blocks read from the source
    eval_every: int = 0  # validate every N steps (0: at the end only)
    select: str = "agreement"  # heads to write: the best validated by mean top-1 agreement with the final layer,
    #                            or by mean CE (candidates: every --eval-every validation and the last step), or
    #                            the last step's
    save_every: int = 0  # checkpoint every N steps (0: never, not even at the end)
    resume: bool = False  # continue from the latest checkpoint of --train-dir: the settings that shape the training
    #                       must be its own, but --steps/--tokens may change (the learning-rate schedule then
    #                       follows the new length; a line says so)
    train_dir: str | None = None  # logs and checkpoints (default: OUT.train)
    cache_hidden: str | None = None  # directory of a memory-mapped cache of the trunk's hidden states at the exits
    #                                  (later epochs and other head configurations on the same exits skip the
    #                                  backbone), and with --distill > 0 the final layer's normed states
    cache_dtype: str = "bf16"  # storage dtype of the cached hidden states
    fsdp: bool = False  # under torchrun: FSDP2 over the backbone layers and the heads (default: DDP)
    progress: bool = True  # progress bar (process 0, on a terminal); where stderr is not a terminal, a status line
    #                        (step/total, loss, tokens/s, ETA) every 30 s instead, which this does not stop:
    #                        EETUNE_PROGRESS_INTERVAL=off does (=SECONDS sets the interval)
    gates: bool = False  # after tuning the heads, fit a gate per exit to them (labels: exit top-1 == final
    #                      top-1; held-out report in exit_config.json); one process, not under torchrun
    gates_only: bool = False  # train no heads: fit gates to the heads of DIR as they are, heads copied unchanged
    gen_temperature: float = 0.8  # generated data: sampling temperature (eetune.train.selfdata)
    gen_top_p: float = 0.95  # generated data: nucleus mass
    gen_max_new_tokens: int = 256  # generated data: continuation length cap per prompt
    gen_batch_size: int = 16  # generated data: prompts decoded together
    gate_tokens: int = 16384  # training tokens for the gates, whole blocks of --seq-len (16384: about a minute
    #                           on a 2-core CPU for SmolLM2-135M: full forward + 3 vocabulary projections)
    exit_vocab: str | None = None  # K: restrict full-vocabulary heads, before the first step, to the K token ids
    #                                most frequent in the training blocks plus one OTHER class for the rest (the
    #                                K rows of each head's projection, a fresh OTHER row; e.g. 4096 or 4k, `all`:
    #                                no restriction); heads restricted already must have this K (convert again for
    #                                another)

    # Values a string setting may take (also the flags' choices).
    CHOICES = {"decay": ("linear", "cosine", "constant"), "dtype": ("fp32", "bf16"),
               "select": ("agreement", "ce", "last"), "cache_dtype": ("bf16", "fp16")}

    # Settings that only head training uses (refused with gates_only).
    HEAD_ONLY = ("steps", "tokens", "grad_accum", "lr", "min_lr_ratio", "warmup", "decay", "weight_decay", "betas",
                 "clip", "select", "loss_weights", "loss_weights_start", "loss_weights_warmup", "loss_chunk", "dynamic_weights",
                 "distill", "exit_vocab",
                 "eval_every", "save_every", "resume", "train_dir", "cache_hidden", "cache_dtype", "fsdp")

    # Settings that must match for --resume to continue the same trajectory.
    TRAJECTORY = ("data", "seq_len", "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "decay",
                  "weight_decay", "betas", "clip", "dtype", "seed", "loss_weights", "loss_weights_start",
                  "loss_weights_warmup", "dynamic_weights", "distill", "val_blocks", "max_blocks", "cache_dtype",
                  "gen_temperature", "gen_top_p", "gen_max_new_tokens", "gen_batch_size", "select", "loss_chunk")


# --- small pieces the loop uses ------------------------------------------------------------
def lr_at(step: int, total: int, cfg: TuneConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up, then decay."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if cfg.decay == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.decay == "cosine":
        return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
    return cfg.lr - (cfg.lr - floor) * progress


def loss_weights_at(step: int, cfg: TuneConfig, n: int) -> list[float]:
    target = list(cfg.loss_weights or [1.0] * n)
    if not cfg.loss_weights_warmup or cfg.loss_weights_start is None:
        return target
    f = min(1.0, step / cfg.loss_weights_warmup)
    return [s + (t - s) * f for s, t in zip(cfg.loss_weights_start, target)]


def block_indices(step: int, micro: int, rank: int, world: int, cfg: TuneConfig, n: int, perms: dict) -> list[int]:
    """Training blocks of (step, micro-batch, rank). Sample i of the endless stream is block
    perm_e[i mod n] of epoch e = i // n; a step takes the next global batch of samples, each
    rank a contiguous slice of it, so any split over ranks and micro-batches sees the same set."""
    G = cfg.batch_size * cfg.grad_accum * world
    start = step * G + micro * cfg.batch_size * world + rank * cfg.batch_size
    out = []
    for i in range(start, start + cfg.batch_size):
        e = i // n
        if e not in perms:
            perms[e] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + e)).tolist()
        out.append(perms[e][i % n])
    return out


def exit_loss(logits: torch.Tensor, ids: torch.Tensor, dynamic: bool, final_logits: torch.Tensor | None,
              alpha: float, fold_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, plain mean next-token CE) of one exit on one micro-batch: its
    logits (B, T, C), the blocks `ids` (B, T) as its classes (a restricted head's: `classes_of`),
    the final layer's logits (B, T, V) for distillation, folded onto the classes of a head
    restricted to `fold_ids` (eetune.train.losses.fold_log_probs). `dynamic`: the paper's
    token-wise weighting by the exit's own detached confidence."""
    from eetune.train.losses import fold_log_probs, logits_loss

    lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    ref = None
    if alpha > 0:
        ref = fold_log_probs(final_logits[:, :-1].float().reshape(-1, final_logits.shape[-1]), fold_ids)
    return logits_loss(lg, targets, ref, alpha, dynamic)


class _Heads(nn.Module):
    """The exit heads as one module (the unit DDP replicates and FSDP shards), computing their
    losses inside `forward` so that every parameter is used where FSDP has it gathered.

    `chunk > 0` computes each exit's loss `chunk` tokens at a time (eetune.train.losses: the tokens x
    vocabulary logits are never held whole); `chunk == 0` is the plain path through whole
    logits and `exit_loss`."""

    def __init__(self, heads: nn.ModuleList, chunk: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.heads = heads
        self.chunk, self.dtype = chunk, dtype

    def forward(self, hiddens: list[torch.Tensor], ctx, ids: torch.Tensor, final_h: torch.Tensor | None = None,
                alpha: float = 0.0, dynamic: bool = False, final_top1: torch.Tensor | None = None,
                evaluate: bool = False) -> list[tuple]:
        """Per exit: (loss to back-propagate, mean CE) for the blocks `ids` whose trunk hidden
        states at the exits are `hiddens` (`final_h`: the final layer's normed hidden states, for
        distillation); with `evaluate`, (summed CE, positions whose top-1 equals `final_top1`)."""
        from eetune.train.losses import chunked_eval, chunked_exit_loss

        adapter = self.heads[0].adapter
        final_bias, softcap = getattr(adapter.lm_head, "bias", None), adapter.logit_softcap
        n_targets = ids[:, 1:].numel()
        if self.chunk == 0:
            final_logits = adapter.logits(final_h) if final_h is not None and alpha > 0 else None
        else:
            flat_final = final_h[:, :-1].reshape(-1, final_h.shape[-1]) if final_h is not None else None
        out = []
        for head, h in zip(self.heads, hiddens):
            # A restricted head (K ids + OTHER): its classes as targets, the final distribution
            # folded onto them, its own projection and bias (head.projection(): OTHER's is trained).
            classes, fold = head.classes_of(ids), head.vocab_ids
            if self.chunk == 0:
                lg = head(h, ctx)
                if evaluate:
                    agree = ((head.tokens_of(lg[:, :-1].argmax(-1)) == final_top1).sum().item()
                             if final_top1 is not None else 0)
                    out.append((exit_loss(lg, classes, False, None, 0.0)[1].item() * n_targets, agree))
                else:
                    out.append(exit_loss(lg, classes, dynamic, final_logits, alpha, fold))
                continue
            x = head.transform(h, ctx)[:, :-1]
            x = x.reshape(-1, x.shape[-1])
            w, b = head.projection()
            targets = classes[:, 1:].reshape(-1)
            if evaluate:
                ref = final_top1.reshape(-1) if final_top1 is not None else None
                out.append(chunked_eval(x, w, b, targets, ref, softcap, self.chunk, self.dtype, fold))
            else:
                out.append(chunked_exit_loss(x, w, b, targets, flat_final, adapter.lm_head.weight, final_bias,
                                             softcap, alpha, dynamic, self.chunk, self.dtype, fold))
        return out


def _full(t: torch.Tensor) -> torch.Tensor:
    """A full tensor on the CPU (gathers an FSDP2 shard: a collective, every rank calls it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu().contiguous()


def _like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref` (sharded the same way when `ref` is an FSDP2 DTensor)."""
    if hasattr(ref, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(ref.dtype), ref.device_mesh, ref.placements)
    return full.to(device=ref.device, dtype=ref.dtype)


def _save_json_atomic(path: Path, data) -> None:
    from eetune.fsio import atomic_write_json
    atomic_write_json(path, data)


def latest_checkpoint(train_dir: Path) -> Path | None:
    p = train_dir / CHECKPOINTS / LATEST
    if not p.is_file():
        return None
    d = train_dir / CHECKPOINTS / json.loads(p.read_text())["checkpoint"]
    return d if (d / "state.json").is_file() else None


def save_checkpoint(train_dir: Path, step: int, named_params: list, opt, state: dict, rank: int,
                    best: dict | None = None) -> Path | None:
    """Write checkpoint `step` (heads, AdamW state, RNG, JSON state, and the best validated heads
    so far when `--select` keeps them) and publish it atomically: a temporary directory renamed
    to step-N, then latest.json replaced. Keeps the newest two."""
    heads = {name: _full(p) for name, p in named_params}
    optim = {}
    for name, p in named_params:
        for key, v in opt.state.get(p, {}).items():
            optim[f"{name}/{key}"] = _full(v) if torch.is_tensor(v) else torch.tensor(v)
    if rank != 0:
        return None
    from eetune.fsio import replace_dir, staging_dir

    root = train_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    final = root / name
    tmp = staging_dir(final)  # also removes what a killed earlier run left half-written
    try:
        save_file(heads, str(tmp / "heads.safetensors"))
        save_file(optim, str(tmp / "optimizer.safetensors"))
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(tmp / "rng.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        replace_dir(tmp, final)  # every file synced before latest.json points at it
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        import errno
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            before = latest_checkpoint(train_dir)
            raise EETuneError(f"no space left on the device writing checkpoint {name} in {root}: "
                              + (f"the previous checkpoint {before.name} is intact; " if before else "")
                              + "free some space, then run the same command with --resume") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _save_json_atomic(root / LATEST, {"checkpoint": name, "step": step})
    keep = sorted(p for p in root.glob("step-*") if p.is_dir())[-2:]
    for p in root.iterdir():
        if p.is_dir() and p not in keep:
            shutil.rmtree(p, ignore_errors=True)
    return final


FINAL = "final"  # the hidden-state cache's name for the final layer's normed states (distillation's teacher)


class HiddenCache:
    """Trunk hidden states at the exit layers for every training and validation block, stored
    memory-mapped as 16-bit floats: `meta.json`, one `h<k>.bin` (N, T, H) per exit layer (and
    `hfinal.bin`, the final layer's normed states, for distillation) and `filled.bin` (one byte per
    block, set after its states are written). Valid for one backbone, one block set and its exit
    layers; any head configuration on those exits can reuse it, and one with the final layer's
    states serves LM-loss runs too."""

    def __init__(self, directory: Path, layers, n_blocks: int, seq_len: int, hidden: int, dtype: str,
                 key: dict, rank: int, world: int):
        self.dir, self.layers = Path(directory), tuple(layers)
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        shape = (n_blocks, seq_len, hidden)
        meta_path = self.dir / "meta.json"
        meta = {"key": key, "layers": list(self.layers), "shape": list(shape), "dtype": dtype}
        if meta_path.is_file():
            try:
                have = json.loads(meta_path.read_text())
                have["key"], have["shape"], have["dtype"], have["layers"]  # noqa: B018 - all present
            except (ValueError, KeyError, TypeError):
                raise EETuneError(f"--cache-hidden {directory}: {meta_path.name} is damaged: delete the directory "
                                  f"(it is rebuilt) or give a new one") from None
            if have["key"] != key or have["shape"] != list(shape) or have["dtype"] != dtype \
                    or not set(self.layers) - {FINAL} <= set(have["layers"]):
                raise EETuneError(f"--cache-hidden {directory} holds hidden states of other data, backbone, exits "
                                  f"or dtype: give a new directory for this run")
            if FINAL in self.layers and FINAL not in have["layers"]:
                raise EETuneError(f"--cache-hidden {directory} holds no final-layer states (it was built by a "
                                  f"--distill 0 run): give a new directory for this --distill run")
            self.layers = tuple(have["layers"])
        elif rank == 0:
            if self.dir.exists() and any(self.dir.iterdir()):
                raise EETuneError(f"--cache-hidden {directory} exists and is not a hidden-state cache: "
                                  f"give a new or empty directory")
            self.dir.mkdir(parents=True, exist_ok=True)
            for k in self.layers:
                np.memmap(self.dir / f"h{k}.bin", dtype=np.int16, mode="w+", shape=shape).flush()
            np.memmap(self.dir / "filled.bin", dtype=np.uint8, mode="w+", shape=(n_blocks,)).flush()
            _save_json_atomic(meta_path, meta)
        if world > 1:
            torch.distributed.barrier()
        # numpy would silently extend a truncated file with zeros (and serve them as hidden states)
        sizes = {self.dir / f"h{k}.bin": math.prod(shape) * 2 for k in self.layers}
        sizes[self.dir / "filled.bin"] = n_blocks
        for path, size in sizes.items():
            have_size = path.stat().st_size if path.is_file() else None
            if have_size != size:
                raise EETuneError(f"--cache-hidden {directory} is damaged ({path.name}: "
                                  f"{'missing' if have_size is None else f'{have_size:,} bytes, not {size:,}'}): "
                                  f"delete the directory (it is rebuilt) or give a new one")
        try:
            self.h = {k: np.memmap(self.dir / f"h{k}.bin", dtype=np.int16, mode="r+", shape=shape)
                      for k in self.layers}
            self.filled = np.memmap(self.dir / "filled.bin", dtype=np.uint8, mode="r+", shape=(n_blocks,))
        except (OSError, ValueError) as e:  # a missing or truncated state file
            raise EETuneError(f"--cache-hidden {directory} is damaged ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:80]}): delete the directory (it is rebuilt) or give a "
                              f"new one") from None

    def complete(self, indices) -> bool:
        return bool(self.filled[np.asarray(indices)].all())

    def read(self, indices, layers) -> list[torch.Tensor]:
        idx = np.asarray(indices)
        return [torch.from_numpy(np.ascontiguousarray(self.h[k][idx])).view(self.dtype).float() for k in layers]

    def write(self, indices, layers, hiddens) -> list[torch.Tensor]:
        """Store hidden states; returns them rounded as stored (what the heads then see, so a
        block gives the same inputs whether computed now or read later)."""
        idx = np.asarray(indices)
        out = []
        for k, h in zip(layers, hiddens):
            r = h.detach().to(self.dtype).cpu()
            self.h[k][idx] = r.view(torch.int16).numpy()
            out.append(r.float().to(h.device))
        self.filled[idx] = 1
        return out

    def flush(self) -> None:
        for m in self.h.values():
            m.flush()
        self.filled.flush()


def log_fields(layers) -> list[str]:
    """The columns of log.csv (validation columns stay empty on steps without validation)."""
    return (["step", "tokens", "lr", "loss", *[f"loss_{k}" for k in layers], "grad_norm", "step_s",
             "tokens_per_s", "elapsed_s", *[f"val_{k}" for k in layers], *[f"val_agree_{k}" for k in layers]])


def selection_score(select: str, val_loss: dict, val_agree: dict) -> float:
    """What `--select` maximises: the mean top-1 agreement with the final layer over the exits,
    or minus their mean validation CE."""
    if select == "ce":
        return -sum(val_loss.values()) / len(val_loss)
    return sum(val_agree.values()) / len(val_agree)


def _write_log(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Start log.csv (header and the rows kept from a resumed run), atomically."""
    from eetune.fsio import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    atomic_write(path, write)


def _append_log(path: Path, row: dict, fields: list[str]) -> None:
    """One step's row at the end of log.csv."""
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=fields, extrasaction="ignore").writerow(row)


def generation_settings(cfg: TuneConfig):
    """The `eetune.train.selfdata.GenSettings` of `generated:N` sources (seeded with the run's seed)."""
    from eetune.train.selfdata import GenSettings
    return GenSettings(temperature=cfg.gen_temperature, top_p=cfg.gen_top_p, max_new_tokens=cfg.gen_max_new_tokens,
                       batch_size=cfg.gen_batch_size, seed=cfg.seed)


def resolve_defaults(cfg: TuneConfig) -> TuneConfig:
    """`cfg` with its automatic settings made explicit: `distill=None` becomes 1.0 (distillation
    from the final layer: more top-1 agreement per tuning token than the LM loss in every
    measured recipe), or 0.0 with `cache_hidden` (the LM loss: the cache then holds the exits' states
    only, and its first pass stops at the deepest exit)."""
    if cfg.distill is None:
        cfg = dataclasses.replace(cfg, distill=0.0 if cfg.cache_hidden else 1.0)
    return cfg


def _check_config(cfg: TuneConfig, exit_layers) -> None:
    from eetune.train.data import uses_generated

    n = len(exit_layers)
    if uses_generated(cfg.data):  # refuses a malformed spec early
        generation_settings(cfg).check()
    for name in ("seq_len", "batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise EETuneError(f"--{name.replace('_', '-')} must be at least 1")
    if cfg.seq_len < 2:
        raise EETuneError("--seq-len must be at least 2")
    if cfg.steps is not None and cfg.tokens is not None:
        raise EETuneError("give --steps or --tokens, not both")
    if (cfg.steps is not None and cfg.steps < 1) or (cfg.tokens is not None and cfg.tokens < 1):
        raise EETuneError("--steps and --tokens must be positive")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr_ratio <= 1 or cfg.warmup < 0 or cfg.weight_decay < 0 or cfg.clip < 0:
        raise EETuneError("--lr must be > 0, --warmup/--weight-decay/--clip >= 0, min lr ratio in [0, 1]")
    for name, allowed in TuneConfig.CHOICES.items():
        if getattr(cfg, name) not in allowed:
            raise EETuneError(f"unknown --{name.replace('_', '-')} {getattr(cfg, name)!r}: use one of {', '.join(allowed)}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        raise EETuneError(f"--betas {cfg.betas}: give two numbers in [0, 1), e.g. 0.9,0.95")
    for name in ("loss_weights", "loss_weights_start"):
        w = getattr(cfg, name)
        if w is not None:
            if len(w) != n:
                raise EETuneError(f"--{name.replace('_', '-')} has {len(w)} values but there are {n} exits "
                                  f"(after layers {list(exit_layers)}): give one weight per exit")
            if any(not math.isfinite(x) or x < 0 for x in w) or not any(x > 0 for x in w) and name == "loss_weights":
                raise EETuneError(f"--{name.replace('_', '-')} must be finite, non-negative and not all zero")
    if cfg.loss_weights_start is not None and cfg.loss_weights_warmup < 1:
        raise EETuneError("starting loss weights need --loss-weights-warmup N (steps, >= 1)")
    if cfg.distill is not None and not 0 <= cfg.distill <= 1:
        raise EETuneError(f"--distill {cfg.distill} is outside [0, 1]")
    if cfg.loss_chunk < 0:
        raise EETuneError(f"--loss-chunk {cfg.loss_chunk}: give a number of tokens >= 1, or 0 for whole logits")
    if cfg.val_blocks < 0 or cfg.eval_every < 0 or cfg.save_every < 0:
        raise EETuneError("--val-blocks, --eval-every and --save-every must be >= 0")
    if cfg.gates and cfg.gates_only:
        raise EETuneError("give --gates (tune heads, then gates) or --gates-only (gates on the heads as they are), "
                          "not both")
    if cfg.gates_only:
        defaults = TuneConfig()
        given = [name for name in TuneConfig.HEAD_ONLY if getattr(cfg, name) != getattr(defaults, name)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise EETuneError(f"--gates-only trains no heads, so {flags} {'does' if len(given) == 1 else 'do'} not "
                              f"apply: drop {'it' if len(given) == 1 else 'them'}, or tune the heads and train gates "
                              f"in one run with --gates")
    if cfg.gates or cfg.gates_only:
        if cfg.gate_tokens < 1:
            raise EETuneError(f"--gate-tokens {cfg.gate_tokens}: give at least 1 (rounded up to whole blocks)")
        if cfg.val_blocks < 1:
            raise EETuneError("gates are reported on held-out blocks: give --val-blocks 1 or more")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise EETuneError("gates are trained in one process: tune the heads under torchrun without --gates, "
                              "then run `eetune tune OUT --gates-only` without torchrun")


CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx")  # where HF configs keep the context


def model_context(config) -> tuple[int, str] | None:
    """(the longest sequence the model was made for, the config field saying so), or None when
    its config names none."""
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, getattr(config, "attribute_map", {}).get(name, name)  # GPT-2: n_positions
    return None


def check_seq_len(seq_len: int, exit_config: ExitConfig, backbone=None) -> None:
    """Refuse a --seq-len longer than the model's context before anything loads (such blocks run
    past its position embeddings, or out of memory, long after the start). The context comes
    from the backbone when one is passed, else from the config of the exits' base model (no
    weights read)."""
    if backbone is not None:
        config, name = backbone.config, getattr(backbone, "source", "") or exit_config.base_model
    elif exit_config.base_model:
        from eetune.model.backbone import model_config
        config, name = model_config(exit_config.base_model, revision=exit_config.revision), exit_config.base_model
    else:
        return  # no model named: loading it is refused later
    context = model_context(config)
    if context is not None and seq_len > context[0]:
        raise EETuneError(f"--seq-len {seq_len} is longer than the context of {name or 'the model'} ({context[0]} "
                          f"tokens, its {context[1]}): give --seq-len {context[0]} or less")


def rank_vocabulary(blocks: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every token id of the vocabulary, most frequent in `blocks` first (ties by id): what
    `EarlyExitModel.vocab_by_frequency` holds (self-spec's restricted draft vocabulary)."""
    ids = blocks.reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise EETuneError(f"the data holds token ids outside the model's vocabulary of {vocab_size}: "
                          f"use the model's own tokenizer")
    counts = torch.bincount(ids, minlength=vocab_size)
    return torch.sort(-counts, stable=True).indices  # descending count; a stable sort keeps ties by id


def vocab_source(spec: str, data_info: dict, train: torch.Tensor) -> dict:
    """How a restricted vocabulary was ranked, as exit_config.json records it (`exit_vocab_source`):
    by "data" (text), "generated" (the model's own samples, `generated:N`) or a "mixture" of both,
    the data description and the number of training tokens counted."""
    from eetune.train.data import parse_data_spec

    gen = [p.generated is not None for p in parse_data_spec(spec) if p.weight > 0]
    ranked_by = "generated" if gen and all(gen) else "mixture" if any(gen) else "data"
    return {"ranked_by": ranked_by, "data": data_info.get("source", spec), "tokens": int(train.numel())}


def check_exit_vocab(spec, exit_config: ExitConfig, backbone=None) -> int | None:
    """`--exit-vocab SPEC` against the exits before anything loads: K (None: the full vocabulary,
    or no --exit-vocab), or a one-line refusal of a K that is not a token count of the model's
    vocabulary, or of heads already restricted to another K (convert again for that)."""
    from eetune.model.heads import parse_exit_vocab

    if spec is None:
        return None
    if backbone is not None:
        V = backbone.vocab_size
    elif exit_config.base_model:
        from eetune.model.backbone import model_config
        V = getattr(model_config(exit_config.base_model, revision=exit_config.revision), "vocab_size", None)
    else:
        V = None
    K = parse_exit_vocab(spec, V if isinstance(V, int) else 2 ** 62)
    have = exit_config.exit_vocab
    if have is not None and K != have:
        raise EETuneError(f"--exit-vocab {spec}: these heads are restricted to {have} tokens already; convert "
                          f"again (`eetune convert ... --exit-vocab K`, or --from-exits on full-vocabulary exits) to "
                          f"choose another vocabulary")
    return K


def restrict_exit_vocab(model, exit_config: ExitConfig, cfg: TuneConfig, train: torch.Tensor, data_info: dict,
                        rank: int = 0) -> ExitConfig:
    """`tune --exit-vocab K`: restrict the model's full-vocabulary heads to the K ids most frequent
    in the training blocks `train` plus OTHER (`EarlyExitModel.restrict_vocab`), with the ranking's
    source recorded. Heads restricted to K already stay as they are; to another K, refused.
    Returns the exits' configuration to write (K and its source; calibration dropped)."""
    from eetune.model.heads import parse_exit_vocab

    if cfg.exit_vocab is None:
        return exit_config
    V = model.backbone.vocab_size
    K = parse_exit_vocab(cfg.exit_vocab, V)
    if model.exit_vocab is not None or K is None:
        check_exit_vocab(cfg.exit_vocab, exit_config, model.backbone)  # same K (or `all` on full heads): nothing to do
        return exit_config
    ids = rank_vocabulary(train, V)[:K]
    # The heads train in fp32 whatever the backbone's dtype: restriction builds the new rows in the
    # LM head's dtype, so they are put back from the fp32 copies they were taken from.
    rows = {i: h.out.weight.detach().clone() for i, h in enumerate(model.heads) if h.output_embedding == "copy"}
    model.restrict_vocab(ids, vocab_source(cfg.data, data_info, train))
    model.heads.float()
    with torch.no_grad():
        for i, w in rows.items():
            model.heads[i].out.weight.copy_(w[ids.to(w.device)])
    if rank == 0:
        print(f"note: exit heads restricted to the {K} most frequent of {V} token ids of the training data plus "
              f"OTHER", file=sys.stderr, flush=True)
    return exit_config.replace(exit_vocab=model.config.exit_vocab, exit_vocab_source=model.config.exit_vocab_source,
                               calibration=None)


def rank_exit_vocab(model, spec: str, K: int, progress: bool = True) -> tuple[torch.Tensor, dict]:
    """(the K token ids most frequent in the training blocks of data `spec`, their source): the
    blocks `eetune tune --data SPEC` would train on with its default --seq-len, --val-blocks and
    generation settings (`convert --exit-vocab K --vocab-data SPEC`)."""
    from eetune.model.backbone import load_tokenizer
    from eetune.train.data import train_val_blocks
    from eetune.train.selfdata import generated_source

    d = TuneConfig(data=spec)
    train, _, info = train_val_blocks(spec, load_tokenizer(model.backbone), d.seq_len, d.val_blocks, d.max_blocks,
                                      seed=0, generated=generated_source(model, generation_settings(d)),
                                      progress=progress)
    model.free_decode_state()
    return rank_vocabulary(train, model.backbone.vocab_size)[:K], vocab_source(spec, info, train)


def _vocab_digest(model) -> str | None:
    """A digest of the heads' restricted vocabularies (None: every head has the full one)."""
    import hashlib

    if all(h.vocab_ids is None for h in model.heads):
        return None
    digest = hashlib.sha256()
    for h in model.heads:
        digest.update(b"-" if h.vocab_ids is None else h.vocab_ids.detach().cpu().to(torch.int64).numpy().tobytes())
    return digest.hexdigest()[:32]


def _persistent_buffers(module: nn.Module) -> dict:
    """The persistent buffers of `module` by state_dict name (a restricted head's vocab_ids), on the CPU."""
    out = {}
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().cpu().contiguous()
    return out


def gate_training_blocks(train: torch.Tensor, cfg: TuneConfig) -> torch.Tensor:
    """The training blocks the gates are fit on: `ceil(gate_tokens / seq_len)` of them (all if
    fewer), chosen by a permutation seeded with `cfg.seed`."""
    n = min(train.shape[0], math.ceil(cfg.gate_tokens / train.shape[1]))
    pick = torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return train[pick]


def _fit_gates(model, train: torch.Tensor, val: torch.Tensor, data_info: dict, cfg: TuneConfig,
               exits_dir: Path) -> dict:
    """Fit and attach the gates (eetune.train.gates.train_gates); the summary for exit_config.json."""
    from eetune.train.gates import train_gates

    blocks = gate_training_blocks(train, cfg)
    summary = train_gates(model, blocks, val, batch_size=cfg.batch_size, progress=cfg.progress, lines=True)
    return {"data": data_info, "gate_tokens_asked": cfg.gate_tokens, "seed": cfg.seed,
            "exits_from": _recorded_path(exits_dir), **summary}


def tune_gates(exits_dir: str | Path, out: str | Path, cfg: TuneConfig, backbone=None) -> dict:
    """`eetune tune DIR --out OUT --gates-only`: train no heads; fit a gate per exit of
    `exits_dir` on its heads as they are, and write `out` with the head tensors copied bit for
    bit, the new gates, the vocabulary ranked by frequency in the training blocks, and the
    gates' summary (held-out report included) in exit_config.json. Returns that summary."""
    from eetune.model.backbone import load_tokenizer
    from eetune.train.data import train_val_blocks
    from eetune.train.selfdata import generated_source
    from eetune.model.early_exit import GATE_PREFIX, VOCAB_KEY, EarlyExitModel, check_output_dir, write_exits_dir

    exits_dir, out = Path(exits_dir), Path(out)
    exit_config = ExitConfig.load(exits_dir)
    _check_config(cfg, exit_config.exit_layers)
    check_seq_len(cfg.seq_len, exit_config, backbone)
    check_output_dir(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = EarlyExitModel.from_pretrained(exits_dir, backbone=backbone, dtype=cfg.dtype, device=device)
    # The heads as stored, not as loaded (loading may cast them): copied unchanged.
    heads = {k: v for k, v in load_file(str(exits_dir / WEIGHTS_NAME)).items()
             if not (k.startswith(GATE_PREFIX) or k == VOCAB_KEY)}
    tokenizer = load_tokenizer(model.backbone)
    train, val, data_info = train_val_blocks(cfg.data, tokenizer, cfg.seq_len, cfg.val_blocks, cfg.max_blocks, seed=0,
                                             generated=generated_source(model, generation_settings(cfg)),
                                             progress=cfg.progress)
    model.vocab_by_frequency = rank_vocabulary(train, model.backbone.vocab_size)
    summary = _fit_gates(model, train, val, data_info, cfg, exits_dir)
    write_exits_dir(out, exit_config.replace(gates=summary), heads, model.extra_tensors())
    return summary


# --- the loop ------------------------------------------------------------------------------
def tune(exits_dir: str | Path, out: str | Path, cfg: TuneConfig, backbone=None) -> dict:
    """Tune the heads of `exits_dir` and write the tuned exits directory `out`. Returns the
    training summary (also recorded in out/exit_config.json). Under torchrun (WORLD_SIZE > 1)
    it runs data-parallel: DDP, or FSDP2 with `cfg.fsdp`.

    The written directory also ranks the vocabulary by frequency in the training blocks. Gates
    of `exits_dir` are dropped (they were fit to the old heads); with `cfg.gates` new ones are
    fit to the tuned heads (the returned summary then has their summary under "gates"), and
    `cfg.gates_only` trains no heads at all (`tune_gates`)."""
    if cfg.gates_only:
        return {"gates": tune_gates(exits_dir, out, cfg, backbone=backbone)}
    exits_dir, out = Path(exits_dir), Path(out)
    cfg, exit_config, train_dir = _check_run(exits_dir, out, cfg, backbone)  # before loading or writing anything
    world, rank, device, started_pg = _start_processes()
    locks, stop = [], None
    try:
        if rank == 0:
            locks = _take_locks(out, train_dir)
        resume_from = _checkpoint_to_resume(train_dir, cfg)
        model = _load_in_turns(exits_dir, exit_config, cfg, backbone, device, world, rank)
        run = _setup(model, exits_dir, out, train_dir, exit_config, cfg, world, rank, device,
                     caller_backbone=backbone is not None)
        if cfg.resume:
            _resume(run, resume_from)
        run.last_good = resume_from
        _open_log(run)
        _seed(run)
        stop = _stop_on_interrupt(world)
        bar = progress_display(run.total_steps, "tune", "step", bar=cfg.progress and rank == 0, lines=rank == 0,
                               initial=run.step)
        while run.step < run.total_steps:
            row = train_step(run)
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.step < run.total_steps and run.val.shape[0]:
                _validate_and_select(run, row)
            _log(run, row, bar)
            if cfg.save_every and (run.step % cfg.save_every == 0 or run.step == run.total_steps):
                _checkpoint(run)
            if stop["asked"]:  # Ctrl-C: the step is whole; save it and say how to go on
                bar.close()
                path = _checkpoint(run)
                raise Interrupted(f"stopped after step {run.step} of {run.total_steps}; checkpoint {path} written, "
                                  f"{out} not: run the same command with --resume to continue")
        bar.close()
        return _finish(run)
    finally:
        if stop is not None:
            stop["restore"]()
        for lock in locks:
            lock.release()
        if started_pg:
            torch.distributed.destroy_process_group()


@dataclass(eq=False)
class TuneRun:
    """What a tuning run holds while it trains: its settings, model, data, parallel wrappers and
    optimizer (from `_setup`), and its progress (`step` is the number of steps done)."""
    cfg: TuneConfig
    exits_dir: Path
    out: Path
    train_dir: Path
    exit_config: ExitConfig
    world: int
    rank: int
    device: torch.device
    model: nn.Module
    train: torch.Tensor  # training blocks (n, seq_len)
    val: torch.Tensor  # held-out blocks
    data_info: dict
    val_final: list  # the final layer's top-1 on the held-out blocks, per validation batch
    cache: HiddenCache | None
    heads_core: nn.Module  # the heads as one module
    heads_train: nn.Module  # what the step calls (DDP/FSDP-wrapped under torchrun)
    named: list  # (name, parameter) of the heads
    opt: torch.optim.Optimizer
    total_steps: int
    run_settings: dict  # what --resume checks
    trunk_layers_held: int  # decoder layers in memory while training
    trunk_layers_loaded: int  # decoder layers loaded at all (partial loading: up to the deepest exit)
    step: int = 0
    tokens_seen: int = 0
    prior_time: float = 0.0  # wall time of the steps before a resume
    t0: float = dataclasses.field(default_factory=time.time)
    best: dict | None = None  # --select: the best validation so far
    best_heads: dict | None = None  # and its heads (copies)
    last_good: Path | None = None  # the newest complete checkpoint
    train_loss: dict = dataclasses.field(default_factory=dict)
    val_loss: dict = dataclasses.field(default_factory=dict)
    val_agree: dict = dataclasses.field(default_factory=dict)
    perms: dict = dataclasses.field(default_factory=dict)  # data order per epoch (block_indices)
    rng: dict | None = None  # a resumed run's generator states, put back after seeding
    schedule_changes: list = dataclasses.field(default_factory=list)  # resumes with another --steps/--tokens
    tb: object = None  # TensorBoard writer (rank 0, when installed)

    @property
    def layers(self) -> tuple[int, ...]:
        return self.exit_config.exit_layers

    @property
    def global_batch(self) -> int:
        """Blocks per optimizer step, over every micro-batch and process."""
        return self.cfg.batch_size * self.cfg.grad_accum * self.world

    def autocast(self):
        if self.cfg.dtype == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def wall_time(self) -> float:
        return self.prior_time + time.time() - self.t0


# --- the steps of `tune`, named ------------------------------------------------------------
def _check_run(exits_dir: Path, out: Path, cfg: TuneConfig, backbone=None) -> tuple[TuneConfig, ExitConfig, Path]:
    """Everything that can be checked before loading or writing anything: (the settings with
    their defaults resolved, the exits' configuration, the training directory)."""
    from eetune.model.early_exit import check_output_dir

    cfg = resolve_defaults(cfg)
    exit_config = ExitConfig.load(exits_dir)  # refuses a directory that is not an exits directory
    _check_config(cfg, exit_config.exit_layers)
    check_seq_len(cfg.seq_len, exit_config, backbone)
    check_exit_vocab(cfg.exit_vocab, exit_config, backbone)
    check_output_dir(out)
    return cfg, exit_config, Path(cfg.train_dir) if cfg.train_dir else out.with_name(out.name + ".train")


def _checkpoint_to_resume(train_dir: Path, cfg: TuneConfig) -> Path | None:
    """The latest checkpoint of `train_dir`, which --resume needs and a fresh run must not find."""
    latest = latest_checkpoint(train_dir)
    if cfg.resume and latest is None:
        raise EETuneError(f"--resume: no checkpoint in {train_dir}/{CHECKPOINTS} to resume from "
                          f"(run without --resume, with --save-every N)")
    if not cfg.resume and latest is not None:
        raise EETuneError(f"{train_dir} holds checkpoints of an earlier run: pass --resume to continue it, or "
                          f"remove it / give another --train-dir")
    return latest


def _setup(model, exits_dir: Path, out: Path, train_dir: Path, exit_config: ExitConfig, cfg: TuneConfig,
           world: int, rank: int, device, caller_backbone: bool) -> TuneRun:
    """Data (packed blocks and a held-out slice of whole documents; rank 0 tokenises first), the
    final layer's held-out top-1, the hidden-state cache, the layers no step needs released,
    parallel wrapping and the optimizer."""
    from eetune.model.backbone import load_tokenizer
    from eetune.train.data import train_val_blocks
    from eetune.train.selfdata import generated_source
    from eetune.model.early_exit import ReleasedLayer

    layers = exit_config.exit_layers
    loaded = model.backbone.num_layers - model.backbone.released_count()  # before anything is released
    if world > 1 and rank != 0:
        torch.distributed.barrier()
    train, val, data_info = train_val_blocks(cfg.data, load_tokenizer(model.backbone), cfg.seq_len, cfg.val_blocks,
                                             cfg.max_blocks, seed=0,
                                             generated=generated_source(model, generation_settings(cfg)),
                                             progress=cfg.progress and rank == 0)
    if world > 1 and rank == 0:
        torch.distributed.barrier()
    model.free_decode_state()  # generated data (`generated:N`) may have left decoding graphs and caches
    n_train, bb = train.shape[0], model.backbone
    G = cfg.batch_size * cfg.grad_accum * world
    total_steps = cfg.steps or (math.ceil(cfg.tokens / (G * cfg.seq_len)) if cfg.tokens else math.ceil(n_train / G))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.dtype == "bf16" \
        else contextlib.nullcontext
    # While every layer is still loaded: what validation measures each exit's agreement against.
    val_final = _final_top1(bb, val, cfg.batch_size, device, autocast)
    cache = None
    if cfg.cache_hidden:
        key = {"backbone": exit_config.backbone_fingerprint, "compute_dtype": cfg.dtype,
               "blocks": _blocks_digest(torch.cat([train, val]))}
        cache = HiddenCache(Path(cfg.cache_hidden), (*layers, FINAL) if cfg.distill > 0 else layers,
                            n_train + val.shape[0], cfg.seq_len, bb.hidden_size, cfg.cache_dtype, key, rank, world)
    # Free the layers no step needs; gates need the final layer's top-1, and a backbone the
    # caller passed in is theirs, left whole (its unused layers still never run).
    if not cfg.gates and not caller_backbone:
        if cache is not None and cache.complete(range(n_train + val.shape[0])):
            model.release_unused_layers(0)  # every hidden state is on disk: no backbone layer needed
        elif cfg.distill == 0:
            model.release_unused_layers()
    held = sum(not isinstance(layer, ReleasedLayer) for layer in bb.layers)
    # --exit-vocab K on full-vocabulary heads: restricted now, before the optimizer exists (every
    # rank alike, and a resumed run as its first part: the ranking is a function of the data).
    exit_config = restrict_exit_vocab(model, exit_config, cfg, train, data_info, rank)
    heads_core, heads_train = _wrap_parallel(model, cfg, world, device)
    named, opt = _optimizer(model, cfg)
    run_settings = {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in dataclasses.asdict(cfg).items() if k in TuneConfig.TRAJECTORY}
    run_settings.update(world_size=world, exit_layers=list(layers), arch=exit_config.arch,
                        cache_hidden=bool(cfg.cache_hidden),  # cached inputs are rounded: another trajectory
                        # the heads' vocabulary (None: full): a checkpoint holds the parameters, not the ids
                        exit_vocab=model.exit_vocab, exit_vocab_ids=_vocab_digest(model))
    return TuneRun(cfg=cfg, exits_dir=exits_dir, out=out, train_dir=train_dir, exit_config=exit_config, world=world,
                   rank=rank, device=device, model=model, train=train, val=val, data_info=data_info,
                   val_final=val_final, cache=cache, heads_core=heads_core, heads_train=heads_train, named=named,
                   opt=opt, total_steps=total_steps, run_settings=run_settings, trunk_layers_held=held,
                   trunk_layers_loaded=loaded,
                   train_loss={k: float("nan") for k in layers})


def _resume(run: TuneRun, checkpoint: Path) -> None:
    """Heads, optimizer, RNG, best validation and counters from `checkpoint`."""
    state, rng, run.best_heads = _restore(checkpoint, run.run_settings, run.named, run.opt,
                                          run.device.type == "cuda")
    run.step, run.tokens_seen, run.prior_time = state["step"], state["tokens"], state["wall_time_s"]
    run.best = state.get("best")
    run.rng = rng
    run.schedule_changes = list(state.get("schedule_changes", []))
    if run.step >= run.total_steps:
        raise EETuneError(f"the checkpoint in {run.train_dir} is at step {run.step}, the run asks for "
                          f"{run.total_steps}: give more --steps/--tokens to continue tuning")
    before = state.get("total_steps")
    if before is not None and before != run.total_steps:
        # A changed length is what continuing a run usually means; the schedule is a function of
        # it, so say what happens to the learning rate rather than change it silently.
        run.schedule_changes.append({"step": run.step, "total_steps_before": before, "total_steps": run.total_steps})
        if run.rank == 0:
            print(resume_schedule_note(run.step, before, run.total_steps, run.cfg), file=sys.stderr, flush=True)


def resume_schedule_note(step: int, before: int, after: int, cfg: TuneConfig) -> str:
    """The line `--resume` prints when --steps/--tokens give the run another length than the
    checkpointed one had: the learning-rate schedule is one of the new length from here on."""
    note = (f"note: --resume with {after} steps in all where the checkpointed run had {before}: continuing from "
            f"step {step}, ")
    old_lr, new_lr = lr_at(min(step, before - 1), before, cfg), lr_at(step, after, cfg)
    if cfg.decay == "constant":
        return note + (f"the learning rate does not depend on the length (--decay constant): the run goes on as "
                       f"one of {after} steps would")
    return note + (f"the learning-rate schedule is now that of a {after}-step run ({cfg.decay} decay to "
                   f"{cfg.lr * cfg.min_lr_ratio:.3g} at step {after}): {new_lr:.3g} at step {step + 1}, where the "
                   f"{before}-step schedule {'had ended at' if step >= before else 'gave'} {old_lr:.3g}; steps 1-"
                   f"{step} keep the rates of the old schedule, so the heads differ from a fresh {after}-step run's")


def _seed(run: TuneRun) -> None:
    """Seed the run; a resumed run then puts back the generators' states of its checkpoint
    (`torch.manual_seed` seeds CUDA too, so both are restored after it)."""
    torch.manual_seed(run.cfg.seed)
    rng = run.rng
    if rng is not None:
        torch.set_rng_state(rng["torch_cpu"])
        if run.device.type == "cuda" and "torch_cuda" in rng:
            torch.cuda.set_rng_state(rng["torch_cuda"])


def _open_log(run: TuneRun) -> None:
    """Rank 0: the training directory, `log.csv` (a resumed run keeps its rows up to the
    checkpoint's step) and TensorBoard."""
    if run.rank != 0:
        return
    run.train_dir.mkdir(parents=True, exist_ok=True)
    log_path, rows = run.train_dir / "log.csv", []
    if run.cfg.resume and log_path.is_file():
        with open(log_path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= run.step]
    _write_log(log_path, rows, log_fields(run.layers))
    run.tb = _tensorboard(run.train_dir / "tb")


def trunk(run: TuneRun, ids: torch.Tensor, index: list[int]):
    """(hidden states after each exit layer, their layer context, the final layer's normed hidden
    states when distillation needs them, else None) for the blocks `index` (token ids `ids`): read from the
    hidden-state cache when it has them, else one frozen pass up to the deepest exit."""
    bb, layers, device = run.model.backbone, run.layers, run.device
    distill = run.cfg.distill > 0
    pos = torch.arange(ids.shape[1], device=device).expand(ids.shape[0], -1)
    if run.cache is not None and run.cache.complete(index):
        hiddens = [h.to(device) for h in run.cache.read(index, (*layers, FINAL) if distill else layers)]
        final_h = hiddens.pop() if distill else None
        return hiddens, bb.context(hiddens[0], pos), final_h
    with torch.no_grad(), run.autocast():
        h = bb.embed(ids, pos)
        ctx = bb.context(h, pos)
        hiddens, done = [], 0
        for k in layers:
            h = bb.run_layers(h, done, k, ctx)
            hiddens.append(h)
            done = k
        final_h = None
        if distill:
            final_h = bb.final_norm(bb.run_layers(h, done, bb.num_layers, ctx))
    if run.cache is not None:  # the states as stored (rounded), so a block's inputs never depend on the epoch
        if distill:
            *hiddens, final_h = run.cache.write(index, (*layers, FINAL), [*hiddens, final_h])
        else:
            hiddens = run.cache.write(index, layers, hiddens)
    return hiddens, ctx, final_h


def train_step(run: TuneRun) -> dict:
    """One optimizer step (step number `run.step`, 0-based): the global batch in micro-batches,
    the weighted exit losses back-propagated into the heads only, clipping, AdamW. Advances
    `run.step` and returns the step's log row. Out of memory and a non-finite loss or gradient
    stop the run with a one-line error naming the step and the last good checkpoint."""
    cfg, layers, step = run.cfg, run.layers, run.step
    t_step = time.time()
    # Every step in train mode (the heads' dropout, if they have any, on), whatever ran before it:
    # a fresh, a resumed and a validated run alike. The backbone stays in eval mode (frozen).
    run.heads_train.train()
    lr = lr_at(step, run.total_steps, cfg)
    for group in run.opt.param_groups:
        group["lr"] = lr
    weights = loss_weights_at(step, cfg, len(layers))
    step_ce = torch.zeros(len(layers), dtype=torch.float64)
    kept = f"the last good checkpoint is {run.last_good}" if run.last_good else "no checkpoint was written"
    try:
        for micro in range(cfg.grad_accum):
            index = block_indices(step, micro, run.rank, run.world, cfg, run.train.shape[0], run.perms)
            ids = run.train[index].to(run.device)
            hiddens, ctx, final_h = trunk(run, ids, index)
            last = micro == cfg.grad_accum - 1
            if run.world > 1 and cfg.fsdp:
                run.heads_core.set_requires_gradient_sync(last)
            sync = (run.heads_train.no_sync() if (run.world > 1 and not cfg.fsdp and not last)
                    else contextlib.nullcontext())
            with sync:
                with run.autocast():
                    losses = run.heads_train(hiddens, ctx, ids, final_h, cfg.distill, cfg.dynamic_weights)
                loss = 0.0
                for i, (li, ce) in enumerate(losses):
                    loss = loss + weights[i] * li
                    step_ce[i] += ce.double().cpu() / cfg.grad_accum
                (loss / cfg.grad_accum).backward()
                del losses, loss
    except (torch.OutOfMemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise EETuneError(f"out of memory at step {step + 1} with --batch-size {cfg.batch_size} x --seq-len "
                          f"{cfg.seq_len}: lower --batch-size and raise --grad-accum to keep the global batch "
                          f"(e.g. --batch-size {max(1, cfg.batch_size // 2)} --grad-accum "
                          f"{cfg.grad_accum * 2}); {kept}") from None
    if run.world > 1:
        torch.distributed.all_reduce(step_ce)
        step_ce /= run.world
    params = [p for _, p in run.named]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip if cfg.clip > 0 else math.inf)
    grad_norm = float(_full(grad_norm)) if torch.is_tensor(grad_norm) else float(grad_norm)
    if not (torch.isfinite(step_ce).all() and math.isfinite(grad_norm)):
        bad = [k for k, v in zip(layers, step_ce.tolist()) if not math.isfinite(v)] or ["gradient"]
        raise EETuneError(f"non-finite loss at step {step + 1} (exit {bad[0]}): stopped, {run.out} not written, "
                          f"{kept}; lower --lr or check the data, then --resume")
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.step += 1
    run.tokens_seen += run.global_batch * cfg.seq_len
    step_s = time.time() - t_step
    run.train_loss = dict(zip(layers, step_ce.tolist()))
    return {"step": run.step, "tokens": run.tokens_seen, "lr": lr,
            "loss": sum(w * v for w, v in zip(weights, step_ce.tolist())),
            **{f"loss_{k}": v for k, v in run.train_loss.items()}, "grad_norm": grad_norm, "step_s": step_s,
            "tokens_per_s": run.global_batch * cfg.seq_len / step_s, "elapsed_s": run.wall_time()}


def validate(run: TuneRun) -> tuple[dict[int, float], dict[int, float]]:
    """(mean next-token CE per exit, top-1 agreement of each exit with the final layer) on the
    held-out blocks; every rank runs all of them."""
    cfg, layers, val = run.cfg, run.layers, run.val
    n_train = run.train.shape[0]
    sums, agree = [0.0] * len(layers), [0] * len(layers)
    from eetune.model.early_exit import eval_mode
    # Eval mode (no dropout) for the heads, each module's previous mode put back after: a validation
    # never changes how the following training steps run (nor, so, a resumed run's heads).
    with torch.no_grad(), eval_mode(run.heads_train, run.model):
        for j, a in enumerate(range(0, val.shape[0], cfg.batch_size)):
            ids = val[a:a + cfg.batch_size].to(run.device)
            hiddens, ctx, _ = trunk(run, ids, list(range(n_train + a, n_train + a + ids.shape[0])))
            with run.autocast():
                results = run.heads_core(hiddens, ctx, ids, final_top1=run.val_final[j], evaluate=True)
            for i, (ce_sum, agreeing) in enumerate(results):
                sums[i] += ce_sum
                agree[i] += agreeing
    n_pred = val.shape[0] * (cfg.seq_len - 1)
    return ({k: s / n_pred for k, s in zip(layers, sums)},
            {k: a / n_pred for k, a in zip(layers, agree)})


def _validation(run: TuneRun) -> dict:
    """Validate now: the record --select compares (step, score, CE and agreement per exit)."""
    run.val_loss, run.val_agree = validate(run)
    return {"step": run.step, "score": selection_score(run.cfg.select, run.val_loss, run.val_agree),
            "val_loss": {str(k): v for k, v in run.val_loss.items()},
            "val_agreement": {str(k): v for k, v in run.val_agree.items()}}


def _validate_and_select(run: TuneRun, row: dict) -> None:
    """A validation during the run: logged in `row`; with --select agreement|ce, a copy of the
    heads is kept when it is the best so far (every rank decides alike: same validation)."""
    record = _validation(run)
    row.update({f"val_{k}": v for k, v in run.val_loss.items()})
    row.update({f"val_agree_{k}": v for k, v in run.val_agree.items()})
    if run.cfg.select != "last" and (run.best is None or record["score"] > run.best["score"]):
        run.best = record
        run.best_heads = {name: _full(p).clone() for name, p in run.named}  # a copy, not a view


def _log(run: TuneRun, row: dict, bar) -> None:
    """Rank 0: append the row to log.csv (and TensorBoard); advance the progress bar."""
    if run.rank == 0:
        _append_log(run.train_dir / "log.csv", row, log_fields(run.layers))
        if run.tb is not None:
            for key, v in row.items():
                if key != "step":
                    run.tb.add_scalar(key, v, run.step)
        bar.set_postfix({"loss": " ".join(f"{k}:{v:.3f}" for k, v in run.train_loss.items()),
                         "tok/s": f"{row['tokens_per_s']:,.0f}"}, refresh=False)
    bar.update(1)


def _checkpoint(run: TuneRun) -> Path | None:
    """Write checkpoint `run.step` (every rank joins; rank 0 writes) and return its path."""
    if run.cache is not None:
        run.cache.flush()
    state = {"step": run.step, "tokens": run.tokens_seen, "wall_time_s": run.wall_time(),
             "settings": run.run_settings, "total_steps": run.total_steps, "train_loss": run.train_loss,
             "best": run.best, "schedule_changes": run.schedule_changes}
    path = save_checkpoint(run.train_dir, run.step, run.named, run.opt, state, run.rank, run.best_heads)
    run.last_good = path or run.last_good
    if run.world > 1:
        torch.distributed.barrier()
    return path


def _finish(run: TuneRun) -> dict:
    """The final validation; with --select agreement|ce the best validated heads (the last
    step's included) replace the last ones; the summary; gates when asked; the tuned exits
    directory, written atomically by rank 0. Returns the summary."""
    from eetune.model.early_exit import write_exits_dir

    cfg, bb = run.cfg, run.model.backbone
    last = _validation(run) if run.val.shape[0] else None
    selected = last
    if cfg.select != "last" and run.best is not None and last is not None and run.best["score"] > last["score"]:
        selected = run.best
        with torch.no_grad():
            for name, p in run.named:
                p.copy_(_like(run.best_heads[name], p))
    summary = {"data": run.data_info, "steps": run.total_steps, "tokens": run.tokens_seen,
               "wall_time_s": round(run.wall_time(), 3),
               "train_loss": {str(k): v for k, v in run.train_loss.items()},
               "val_loss": {str(k): v for k, v in run.val_loss.items()},
               "val_agreement": {str(k): v for k, v in run.val_agree.items()},
               "select": cfg.select, "selected": selected, "last": last,
               "settings": run.run_settings, "world_size": run.world, "fsdp": bool(cfg.fsdp and run.world > 1),
               "cache_hidden": bool(cfg.cache_hidden), "trunk_layers_held": run.trunk_layers_held,
               "trunk_layers_loaded": run.trunk_layers_loaded,
               "exits_from": _recorded_path(run.exits_dir)}
    if run.schedule_changes:  # resumed with another --steps/--tokens: the schedule changed at those steps
        summary["schedule_changes"] = run.schedule_changes
    if run.exit_config.training:
        summary["previous"] = run.exit_config.training
    state = {name: _full(p) for name, p in run.named}  # every rank joins the gathers
    state.update(_persistent_buffers(run.model.heads))  # a restricted head's vocab_ids
    gates = None
    if run.rank == 0:
        run.model.vocab_by_frequency = rank_vocabulary(run.train, bb.vocab_size)
        if cfg.gates:  # one process (checked): fit to the heads just tuned
            gates = _fit_gates(run.model, run.train, run.val, run.data_info, cfg, run.exits_dir)
        write_exits_dir(run.out, run.exit_config.replace(training=summary, gates=gates), state,
                        run.model.extra_tensors())
        if run.tb is not None:
            run.tb.close()
    if run.world > 1:
        torch.distributed.barrier()
    return {**summary, "gates": gates} if gates else summary


def _start_processes() -> tuple[int, int, torch.device, bool]:
    """(world size, rank, device, whether we started the process group): one process, or one
    per rank under torchrun (gloo on the CPU, NCCL on GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    started = False
    if world > 1 and not torch.distributed.is_initialized():
        if use_cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
        started = True
    return world, rank, device, started


def _take_locks(out: Path, train_dir: Path) -> list:
    """One run per output and training directory: a pid lock beside each (eetune.fsio.PidLock)."""
    from eetune.fsio import PidLock

    locks = []
    try:
        for path, what, flag in ((out, "output directory", "--out"), (train_dir, "training directory",
                                                                        "--train-dir")):
            locks.append(PidLock(path.with_name(f".{path.name}.lock"), f"{what} {path}",
                                 f"wait for it to finish, or give another {flag}").acquire())
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def _load_in_turns(exits_dir: Path, exit_config: ExitConfig, cfg: TuneConfig, backbone, device, world: int,
                   rank: int):
    """`_load_for_tuning` on every rank; with --fsdp the ranks take turns (rank 0 first), so one
    host never has two ranks in the middle of loading. The weights are memory-mapped from the
    safetensors files, so ranks on one host share the page cache's single copy of them, and
    FSDP2 then keeps each rank's own shard (`_wrap_parallel`)."""
    if world == 1 or not cfg.fsdp:
        return _load_for_tuning(exits_dir, exit_config, cfg, backbone, device, rank)
    model = None
    for turn in range(world):
        if turn == rank:
            model = _load_for_tuning(exits_dir, exit_config, cfg, backbone, device, rank)
        torch.distributed.barrier()
    return model


def _load_for_tuning(exits_dir: Path, exit_config: ExitConfig, cfg: TuneConfig, backbone, device, rank: int):
    """The exits directory's model with its heads in fp32 as stored and trainable, gates dropped."""
    from eetune.model.early_exit import EarlyExitModel

    # Partial loading when no step needs the final layer: the backbone up to the deepest exit only.
    # Generated data (`generated:N`) is sampled from the whole model, so it needs every layer.
    from eetune.train.data import uses_generated
    partial = cfg.distill == 0 and not cfg.gates and not uses_generated(cfg.data)
    model = EarlyExitModel.from_pretrained(exits_dir, backbone=backbone, dtype=cfg.dtype, device=str(device),
                                           partial=partial)
    model.heads.float()
    # The stored heads at full precision: a bf16 backbone builds its copied modules in bf16,
    # and loading fp32 weights into those would round them before this cast back to fp32.
    stored = load_file(str(exits_dir / WEIGHTS_NAME))
    model.heads.load_state_dict({k: v for k, v in stored.items()
                                 if not (k.startswith("gate.") or k == "vocab_by_frequency")})
    if not any(p.requires_grad for p in model.heads.parameters()):  # e.g. embedding exits sharing the head
        raise EETuneError(f"the exits in {exits_dir} have no trainable parameters ({exit_config.arch} exits with "
                          f"a {exit_config.output_embedding} output embedding): convert again with "
                          f"--output-embedding copy or another --arch")
    if len(model.gates) and rank == 0:
        print(f"note: the gates of {exits_dir} were fit to its old heads and are dropped"
              + (" (new ones are trained after tuning)" if cfg.gates else " (add --gates to train new ones)"),
              file=sys.stderr)
    model.gates.clear()
    return model


@torch.no_grad()
def _final_top1(bb, val: torch.Tensor, batch_size: int, device, autocast) -> list[torch.Tensor]:
    """The final layer's top-1 at every position but the last of the held-out blocks, per batch:
    what validation measures each exit's agreement against (computed once). The held-out
    blocks go through the layers in memory, then through each layer that partial loading left
    out, read from disk one at a time and dropped (peak memory: one extra layer)."""
    positions = torch.arange(val.shape[1], device=device)
    first_missing = next((i for i in range(bb.num_layers) if not bb.is_loaded(i)), bb.num_layers)
    states = []
    with autocast():
        for a in range(0, val.shape[0], batch_size):
            ids = val[a:a + batch_size].to(device)
            pos = positions.expand(ids.shape[0], -1)
            h = bb.embed(ids, pos)
            ctx = bb.context(h, pos)
            states.append([bb.run_layers(h, 0, first_missing, ctx), ctx])
        for i in range(first_missing, bb.num_layers):
            layer = bb.layer_module(i)
            for state in states:
                state[0] = bb.call_layer(layer, i, state[0], state[1])
            del layer
        out = []
        for h, _ in states:  # the top-1 a few hundred positions at a time: no whole (batch, seq, vocab) logits
            x = bb.final_norm(h)[:, :-1]
            flat = x.reshape(-1, x.shape[-1])
            top = torch.cat([bb.logits(flat[a:a + 256]).argmax(-1) for a in range(0, flat.shape[0], 256)])
            out.append(top.reshape(x.shape[0], x.shape[1]))
        return out


def _wrap_parallel(model, cfg: TuneConfig, world: int, device) -> tuple[nn.Module, nn.Module]:
    """(the heads as one module, the module the loop calls): the same in one process; under
    torchrun DDP around the heads, or FSDP2 over every backbone layer that runs and the heads."""
    heads_core = _Heads(model.heads, cfg.loss_chunk, torch.bfloat16 if cfg.dtype == "bf16" else torch.float32)
    if world > 1 and cfg.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for layer in model.backbone.layers:
            if sum(p.numel() for p in layer.parameters()):
                # Each frozen layer is an FSDP root of its own, and a root keeps its all-gathered
                # weights after forward unless told otherwise (no backward would free them): every
                # rank would hold the whole trunk after the first step.
                fully_shard(layer, mesh=mesh, reshard_after_forward=True)
        fully_shard(heads_core, mesh=mesh)
        return heads_core, heads_core
    if world > 1:
        return heads_core, nn.parallel.DistributedDataParallel(
            heads_core, device_ids=[device.index] if device.type == "cuda" else None)
    return heads_core, heads_core


def _optimizer(model, cfg: TuneConfig) -> tuple[list, torch.optim.Optimizer]:
    """(named head parameters, AdamW over them: weight decay on matrices (and OTHER rows) only)."""
    named = list(model.heads.named_parameters())
    # A restricted head's OTHER row (other_weight, 1-D) is a row of its projection: decayed like the others.
    is_matrix = {n: p.ndim >= 2 or n.endswith("other_weight") for n, p in named}
    decay = [p for n, p in named if is_matrix[n]]
    no_decay = [p for n, p in named if not is_matrix[n]]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=1e-8)
    return named, opt


def _restore(checkpoint: Path, run_settings: dict, named: list, opt, use_cuda: bool) -> tuple[dict, dict, dict | None]:
    """Load a checkpoint into the heads and the optimizer and set the RNG state from it, refusing
    one whose run had other settings. Returns (its state, its RNG tensors, its best heads or None)."""
    state = json.loads((checkpoint / "state.json").read_text())
    changed = sorted(k for k in run_settings if state["settings"].get(k) != run_settings[k])
    if changed:
        what = "; ".join(f"{k}: {state['settings'].get(k)!r} in the checkpoint, {run_settings[k]!r} now"
                         for k in changed)
        raise EETuneError(f"--resume with settings that differ from the checkpointed run ({what}): give the "
                          f"checkpoint's, or start a new run (another --train-dir); --steps/--tokens are what a "
                          f"resumed run may change")
    heads_state = load_file(str(checkpoint / "heads.safetensors"))
    optim_state = load_file(str(checkpoint / "optimizer.safetensors"))
    with torch.no_grad():
        for name, p in named:
            p.copy_(_like(heads_state[name], p))
    for name, p in named:
        keys = [k.split("/", 1)[1] for k in optim_state if k.split("/", 1)[0] == name]
        opt.state[p] = {k: (optim_state[f"{name}/{k}"] if k == "step" else
                            _like(optim_state[f"{name}/{k}"], p)) for k in keys}
    rng = load_file(str(checkpoint / "rng.safetensors"))
    torch.set_rng_state(rng["torch_cpu"])
    if use_cuda and "torch_cuda" in rng:
        torch.cuda.set_rng_state(rng["torch_cuda"])
    best_heads = load_file(str(checkpoint / "best.safetensors")) if state.get("best") is not None else None
    return state, rng, best_heads


def _out_of_memory(e: BaseException) -> bool:
    """Whether an exception is an allocation failure (CUDA's OutOfMemoryError, or the CPU
    allocator's RuntimeError)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e).lower()
    return "out of memory" in text or "can't allocate memory" in text or "failed to allocate" in text


def _stop_on_interrupt(world: int) -> dict:
    """Turn the first Ctrl-C (SIGINT) of a one-process run into a request, `stop["asked"]`, that
    the loop honours at the end of the current step (a checkpoint, then `Interrupted`); a
    second Ctrl-C stops at once. `stop["restore"]()` puts the previous handler back."""
    import signal
    import threading

    stop = {"asked": False, "restore": lambda: None}
    if world > 1 or threading.current_thread() is not threading.main_thread():
        return stop  # torchrun owns the signals of its workers

    def ask(signum, frame):
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        print("\neetune: stopping after this step to write a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, ask)
    stop["restore"] = lambda: signal.signal(signal.SIGINT, previous)
    return stop


def _recorded_path(path: Path) -> str:
    """A path as the training summary records it: relative to the working directory when inside
    it (a shared exits directory carries no paths of the machine that made it), else as given."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _blocks_digest(blocks: torch.Tensor) -> str:
    import hashlib
    return hashlib.sha256(blocks.to(torch.int32).numpy().tobytes()).hexdigest()[:32]


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path))

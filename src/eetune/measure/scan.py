"""Exit-placement scan: where to put exits, and what they would buy, before tuning any.

`eetune scan MODEL` answers "after which layers should the exits go?" in a few minutes on a
CPU, without converting or tuning anything:

1. **One pass of the frozen backbone** over some tokens of the data (`--tokens`, whole blocks
   of `--seq-len`), keeping the hidden state after *every* layer (bf16 or fp32 in memory) and
   the final layer's top-1 prediction. The blocks are split into a fitting part and a held-out
   part (`--holdout`, by whole blocks; documents are shuffled first). By default a quarter of
   the blocks fit the heads (a norm head has only `hidden_size` parameters: two thousand tokens
   fit it about as well as four) and three quarters measure them, which is what the precision
   of the predicted agreement rests on. The last position of every block is dropped (it has no
   next token for `--loss ce`).
2. **Tiny heads after every layer at once**: a `norm` head per layer, i.e. one trainable copy
   of the model's final norm (RMSNorm / LayerNorm weight, initialised from the final norm)
   in front of the *frozen* vocabulary projection (the LM head). They are fitted together
   with a few epochs of AdamW on the fitting tokens (`fit_norm_heads`, a plain loop). The loss
   is `kl` (default): KL divergence to the final layer's distribution, i.e. distillation; or
   `ce`: next-token cross-entropy. KL is the default because what early exit needs is the
   *full model's* token (agreement with the final layer), which KL targets directly; it is also
   a dense target (the whole distribution, not one token id), so a few thousand tokens fit a
   head well, and it calibrates each head's confidence against the final layer. The last
   layer's head is not trained: it *is* the final norm, i.e. the model itself.
   On a CPU the vocabulary projection dominates (49,152 x 576 for SmolLM2-135M), so the
   projection runs in bf16 while fitting where the CPU has bf16 units (measuring runs in fp32),
   and the loss gradient with respect to the logits is written out (softmax - target) rather
   than left to autograd, which would take several more passes over (tokens x vocabulary).
   With `--exit-vocab K` (`ScanConfig.exit_vocab`) the heads are what `convert --exit-vocab K`
   builds: each projects onto the K rows of the frozen LM head of the K most frequent tokens of
   the fitting blocks (counted as `eetune tune` ranks them: `eetune.train.tune.rank_vocabulary`)
   plus a learned OTHER row (weight and bias per layer, from zero) for the rest of the
   vocabulary; `kl` then distils the final layer's distribution folded onto those K + 1 classes
   (the mass outside the K tokens is OTHER's), `ce` maps labels outside them to OTHER.
3. **Per-layer measurement on the held-out tokens**: top-1 agreement with the final layer and,
   per confidence threshold t, the confident share (max-softmax probability >= t) with the
   agreement among those tokens. With K-heads a token leaves at a layer only where OTHER does
   not win (as the engine decides), the top-1 is the class's token id, and OTHER never agrees.
4. **Predicted speedup of exit sets** (`simulate`): every set of 1, 2 (and 3) exits is
   simulated on the held-out tokens: a token leaves at the first exit of the set whose
   confidence reaches the threshold. Cost model, in layer-equivalents: leaving at exit k costs
   k layers + one head for every exit evaluated up to and including k + the KV recomputation of
   the L - k layers it skipped (never the LM head); a token that leaves nowhere pays all L
   layers + every exit of the set + the LM head; full depth is L layers + the LM head.
   Predicted speedup = full cost / mean cost; agreement = share of tokens whose emitted token
   is the full model's. The head cost is measured on this machine
   (`eetune.decode.policy.measure_costs`: one norm head, with `--exit-vocab K` a K-head whose own
   K + 1-row projection is timed, and the final norm + LM head vs one decoder layer, one token on
   a 64-token context), or given (`--head-cost N`: then both an exit head and the LM head cost N,
   as a norm head is the final norm + the LM head). The recomputation is measured with them: one
   more token in a layer's block costs (layer on 5 tokens - layer) / 4 per layer
   (`eetune.measure.evaluate.recompute_layers`: the skipped layers climb later with the next
   token that goes deeper); with `--head-cost` it is ignored. Since the cost is linear in the
   head cost, every set also gets its break-even head cost: the head cost below which it would
   beat full depth (what a cheaper head, e.g. a smaller `--exit-vocab`, must reach). Tuned heads
   (`eetune tune`, `--arch mlp`) usually beat these norm heads (the prediction is pessimistic
   by that much).
5. **Report** (`format_report`): the per-layer table, the best sets by predicted speedup among
   those reaching `--target-agreement` at `--threshold`, the best set at every threshold of the
   table, and a `suggested: eetune convert ...` line (flagged when even the best set is not
   predicted faster than full depth); `--json` writes everything (atomically), `--plot` a PNG
   (matplotlib, the `bench` extra; skipped with a note if it is missing).

For SmolLM2-135M the default scan (8,192 tokens of `default`) takes about three minutes on two
CPU cores: ~15 s backbone pass, ~65 s fitting, ~100 s measuring 6,120 held-out tokens at 30 layers.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from eetune.errors import EETuneError
from eetune.progress import progress_display, progress_iter

LOSSES = ("kl", "ce")
DEFAULT_THRESHOLDS = (0.5, 0.8, 0.9)
KV_NOTE = "KV recomputation cost is ignored (tokens that exit early skip the deeper layers' KV entries for free)"


def kv_note(costs: dict) -> str:
    """How the cost model counts the KV recomputation of the layers a token skips."""
    r = costs.get("recompute_per_layer")
    if r is None:
        return KV_NOTE
    return (f"KV recomputation counted: {r:.3f} layers per layer a token skips (it climbs later with the next token "
            f"that goes deeper, one token more in that block; measured)")


@dataclass
class ScanConfig:
    """The options of `eetune scan` (see the module docstring and `eetune scan --help`)."""

    data: str = "default"
    tokens: int = 8192  # total tokens read (fitting + held out), whole blocks of seq_len
    seq_len: int = 256
    batch_size: int = 8  # blocks per backbone batch
    holdout: float = 0.75  # share of the blocks held out for measuring (the heads need few tokens to fit)
    loss: str = "kl"
    epochs: int = 2
    lr: float = 5e-2
    fit_batch: int = 32  # tokens per optimizer step (every layer's head sees the same tokens)
    hidden_dtype: str = "bf16"  # hidden states kept in memory: bf16 or fp32
    thresholds: tuple = DEFAULT_THRESHOLDS
    threshold: float = 0.9
    target_agreement: float = 0.95
    head_cost: float | None = None  # layer-equivalents of one exit head (and of the LM head); None: measure
    max_exits: int = 3
    top: int = 5
    seed: int = 0
    progress: bool = True  # a bar on a terminal, status lines elsewhere (eetune.progress); False: nothing
    # K: the heads project onto the K most frequent tokens of the fitting data + a learned OTHER row
    # (what `convert --exit-vocab K` builds); an int, a spec such as "4k", or None / "all": the whole vocabulary
    exit_vocab: int | str | None = None

    def validate(self) -> None:
        """Refuse bad options before any slow work, one line each."""
        if self.tokens <= 0:
            raise EETuneError(f"--tokens {self.tokens}: give a positive number of tokens (default 8192)")
        if self.seq_len < 2:
            raise EETuneError(f"--seq-len {self.seq_len} is too short: give at least 2 tokens per block")
        if self.tokens < 2 * self.seq_len:
            raise EETuneError(f"--tokens {self.tokens} is less than two blocks of --seq-len {self.seq_len} (one to "
                              f"fit, one held out): raise --tokens or lower --seq-len")
        if self.batch_size < 1 or self.fit_batch < 1:
            raise EETuneError("--batch-size and --fit-batch must be >= 1")
        if not 0.0 < self.holdout < 1.0:
            raise EETuneError(f"--holdout {self.holdout}: give the held-out share of the blocks, in (0, 1)")
        if self.loss not in LOSSES:
            raise EETuneError(f"--loss {self.loss!r}: use kl or ce")
        if self.epochs < 0:
            raise EETuneError(f"--epochs {self.epochs}: give 0 or more")
        if not self.lr > 0:
            raise EETuneError(f"--lr {self.lr}: give a positive learning rate")
        if self.hidden_dtype not in ("bf16", "fp32"):
            raise EETuneError(f"--hidden-dtype {self.hidden_dtype!r}: use bf16 or fp32")
        for t in (*self.thresholds, self.threshold):
            if not 0.0 < t <= 1.0:
                raise EETuneError(f"threshold {t}: confidence thresholds are max-softmax probabilities in (0, 1]")
        if not 0.0 <= self.target_agreement <= 1.0:
            raise EETuneError(f"--target-agreement {self.target_agreement}: give a share in [0, 1]")
        if self.head_cost is not None and not (self.head_cost >= 0 and math.isfinite(self.head_cost)):
            raise EETuneError(f"--head-cost {self.head_cost}: give a number of layer-equivalents >= 0")
        if self.max_exits not in (1, 2, 3):
            raise EETuneError(f"--max-exits {self.max_exits}: give 1, 2 or 3")
        if self.top < 1:
            raise EETuneError(f"--top {self.top}: give at least 1")
        if self.exit_vocab is not None:
            from eetune.model.heads import parse_exit_vocab
            parse_exit_vocab(self.exit_vocab, sys.maxsize)  # 0, negative, not a number: one line (K > V: run_scan)


# --- data ----------------------------------------------------------------------------------
def scan_blocks(spec: str, tokenizer, tokens: int, seq_len: int, holdout: float,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(fit, held_out) blocks of `seq_len` token ids from `spec`: documents shuffled (fixed seed),
    joined with EOS, cut into at most `tokens // seq_len` blocks, the last `holdout` share of
    which (at least one block) is held out."""
    from eetune.train.data import tokenize_documents

    docs = tokenize_documents(spec, tokenizer)
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    want = tokens // seq_len
    eos = tokenizer.eos_token_id
    parts, total = [], 0
    for i in order:
        parts.append(docs[i])
        total += docs[i].numel()
        if eos is not None:
            parts.append(torch.tensor([eos], dtype=torch.long))
            total += 1
        if total >= want * seq_len:
            break
    n = min(want, total // seq_len)
    if n < 2:
        raise EETuneError(f"data {spec} has {total} tokens, fewer than two blocks of --seq-len {seq_len} (one to fit, "
                          f"one held out): give more text or a smaller --seq-len")
    blocks = torch.cat(parts)[: n * seq_len].view(n, seq_len)
    n_val = min(n - 1, max(1, round(n * holdout)))
    info = {"source": spec, "documents": len(docs), "blocks": n, "seq_len": seq_len,
            "fit_blocks": n - n_val, "held_out_blocks": n_val}
    return blocks[: n - n_val], blocks[n - n_val:], info


# --- 1. one pass of the backbone -----------------------------------------------------------
@torch.no_grad()
def collect_hidden(bb, blocks: torch.Tensor, batch_size: int = 8, hidden_dtype: torch.dtype = torch.bfloat16,
                   progress: bool = False, desc: str = "backbone") -> dict:
    """Run the frozen backbone over `blocks` (N, T) once, keeping every layer's output.

    Returns `hidden` (L, N*(T-1), H) in `hidden_dtype`: row k-1 is the residual stream after
    layer k at every position but each block's last; `final_hidden` (N*(T-1), H), the last
    layer's output in the backbone's dtype (the teacher is recomputed from it exactly);
    `final_top1` (N*(T-1),) the final layer's argmax; `targets` (N*(T-1),) the next tokens.
    """
    L, H = bb.num_layers, bb.hidden_size
    dev = next(bb.model.parameters()).device
    N, T = blocks.shape
    n = N * (T - 1)
    hidden = torch.empty(L, n, H, dtype=hidden_dtype, device=dev)
    final_hidden = torch.empty(n, H, dtype=next(bb.model.parameters()).dtype, device=dev)
    top1 = torch.empty(n, dtype=torch.long, device=dev)
    targets = blocks[:, 1:].reshape(-1).to(dev)
    row = 0
    for a in progress_iter(range(0, N, batch_size), desc, "batch", progress, leave=False):
        ids = blocks[a:a + batch_size].to(dev)
        B = ids.shape[0]
        positions = torch.arange(T, device=dev)[None].expand(B, T)
        h = bb.embed(ids, positions)
        ctx = bb.context(h, positions)
        m = B * (T - 1)
        for i in range(L):
            h = bb.run_layers(h, i, i + 1, ctx)
            hidden[i, row:row + m] = h[:, :-1].reshape(m, H)
        last = h[:, :-1].reshape(m, H)
        final_hidden[row:row + m] = last
        top1[row:row + m] = bb.logits(bb.final_norm(last)).argmax(-1)
        row += m
    return {"hidden": hidden, "final_hidden": final_hidden, "final_top1": top1, "targets": targets}


# --- 2. the heads and their fitting --------------------------------------------------------
class NormHeads(nn.Module):
    """One trainable copy of the backbone's final norm per layer (layer k's head is `norms[k-1]`),
    in front of the frozen LM head: layer k's logits = LM_head(norm_k(h_k)).

    With `vocab_ids` (K distinct token ids, `ScanConfig.exit_vocab`), every head projects onto
    those K rows of the frozen LM head (classes 0..K-1 in that order, as
    `eetune.model.heads.ExitHead` with `vocab_ids`) plus, when K < V, an OTHER class (class K)
    for the rest of the vocabulary: one learned row and bias per layer (`other_weight` (L, H),
    `other_bias` (L,), from zero), soft-capped like the others."""

    def __init__(self, bb, vocab_ids: torch.Tensor | None = None):
        super().__init__()
        self.norms = nn.ModuleList(copy.deepcopy(bb.final_norm) for _ in range(bb.num_layers))
        for p in self.norms.parameters():
            p.data = p.data.float()
        self.vocab_size = bb.vocab_size
        self.register_buffer("vocab_ids", None)
        self.register_parameter("other_weight", None)
        self.register_parameter("other_bias", None)
        if vocab_ids is not None:
            from eetune.model.heads import check_vocab_ids
            ids = check_vocab_ids(vocab_ids, bb.vocab_size).to(bb.lm_head.weight.device)
            self.register_buffer("vocab_ids", ids)
            if ids.numel() < bb.vocab_size:
                dev = bb.lm_head.weight.device
                self.other_weight = nn.Parameter(torch.zeros(bb.num_layers, bb.hidden_size, device=dev))
                self.other_bias = nn.Parameter(torch.zeros(bb.num_layers, device=dev))
        self.requires_grad_(True)

    @property
    def has_other(self) -> bool:
        return self.other_weight is not None

    @property
    def num_classes(self) -> int:
        """Width of the heads' logits: V, or K (+ 1 for OTHER)."""
        return self.vocab_size if self.vocab_ids is None else self.vocab_ids.numel() + int(self.has_other)

    def vocab_map(self) -> torch.Tensor:
        """(V,) token id -> class (K: OTHER); the identity without a restricted vocabulary."""
        ids = self.vocab_ids
        if ids is None:
            return torch.arange(self.vocab_size, device=self.norms[0].weight.device)
        vmap = torch.full((self.vocab_size,), ids.numel(), dtype=torch.long, device=ids.device)
        vmap[ids] = torch.arange(ids.numel(), device=ids.device)
        return vmap

    def projection(self, bb, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The frozen part of the projection in `dtype`: the LM head's weight and bias, or their K rows."""
        w = bb.lm_head.weight.detach()
        b = getattr(bb.lm_head, "bias", None)
        b = None if b is None else b.detach()
        if self.vocab_ids is not None:
            w = w[self.vocab_ids]
            b = None if b is None else b[self.vocab_ids]
        return w.to(dtype), None if b is None else b.to(dtype)

    def project(self, bb, layers: list[int], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """Logits (G, n, C) of normed states `x` (G, n, H) (fp32) of 1-based `layers`: `x` in `w`'s
        dtype through the frozen rows (`projection`), then each layer's OTHER logit (fp32, then
        that dtype), both soft-capped as the model does."""
        z = bb.logits(x.to(w.dtype), weight=w, bias=b)
        if not self.has_other:
            return z
        rows = torch.tensor([k - 1 for k in layers], device=x.device)
        other = torch.einsum("gnh,gh->gn", x.float(), self.other_weight[rows]) + self.other_bias[rows][:, None]
        cap = bb.logit_softcap
        if cap is not None:
            other = torch.tanh(other / cap) * cap
        return torch.cat([z, other.to(z.dtype)[..., None]], -1)

    def forward(self, layers: list[int], hidden: torch.Tensor) -> torch.Tensor:
        """Normed hidden states (len(layers), n, H) of 1-based `layers`; `hidden[j]` is layer layers[j]'s."""
        return torch.stack([self.norms[k - 1](hidden[j].float()) for j, k in enumerate(layers)])


def fold_teacher(probs: torch.Tensor, heads: NormHeads) -> torch.Tensor:
    """The final layer's distribution (n, V) over the heads' classes (n, C): the K tokens' own
    probabilities and, in OTHER, the mass of every other token. Unchanged without a restricted
    vocabulary."""
    if heads.vocab_ids is None:
        return probs
    folded = probs[:, heads.vocab_ids]
    if heads.has_other:
        outside = torch.ones(probs.shape[-1], dtype=probs.dtype, device=probs.device)
        outside[heads.vocab_ids] = 0
        folded = torch.cat([folded, (probs @ outside)[:, None]], -1)
    return folded


def _fast_projection_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware multiplies it natively (CUDA, or a CPU with bf16 units), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16
    try:
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    except (AttributeError, RuntimeError):
        return torch.float32


def loss_and_grad(logits: torch.Tensor, teacher_probs: torch.Tensor | None = None,
                  teacher_negent: torch.Tensor | None = None,
                  targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head mean loss (G,) and its gradient with respect to `logits` (G, n, V), which is
    overwritten (fp32). KL(teacher || softmax(logits)) when `teacher_probs` (n, V) is given
    (`teacher_negent` (n,) = sum p log p), else cross-entropy against `targets` (n,).
    Gradient of either: (softmax(logits) - target distribution) / n."""
    z = logits
    G, n, V = z.shape
    m = z.amax(-1, keepdim=True)
    z.sub_(m)
    if teacher_probs is not None:
        dot = torch.einsum("gnv,nv->gn", z, teacher_probs)  # sum_v p (z - m)
    else:
        dot = z.gather(-1, targets[None, :, None].expand(G, n, 1)).squeeze(-1)
    z.exp_()
    s = z.sum(-1, keepdim=True)
    loss = s.squeeze(-1).log() - dot  # cross-entropy: logsumexp(z) - <target, z>
    if teacher_negent is not None:
        loss = loss + teacher_negent
    z.div_(s)
    if teacher_probs is not None:
        z.sub_(teacher_probs)
    else:
        z.scatter_add_(-1, targets[None, :, None].expand(G, n, 1), torch.full((G, n, 1), -1.0, device=z.device))
    z.div_(n)
    return loss.mean(-1), z


@torch.no_grad()
def init_other_rows(bb, heads: NormHeads, collected: dict, idx: torch.Tensor, layers: list[int], sample: int = 64,
                    seed: int = 0) -> None:
    """Start each layer's OTHER logit where the frozen projection puts the rest of the
    vocabulary: its bias at the mean, over `sample` of the tokens `idx`, of the log-sum-exp of the
    (soft-capped) logits of the tokens outside the K, its row at zero. From zero (as `eetune tune`
    starts it) OTHER would take the few epochs of a scan just to climb to the logits' level."""
    dev = collected["hidden"].device
    pick = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed))[:sample]].to(dev)
    outside = torch.ones(bb.vocab_size, dtype=torch.bool, device=dev)
    outside[heads.vocab_ids.to(dev)] = False
    wdtype = bb.lm_head.weight.dtype
    for k in layers:
        z = bb.logits(heads([k], collected["hidden"][k - 1:k, pick]).to(wdtype))[0].float()
        heads.other_bias[k - 1] = z[:, outside].logsumexp(-1).mean()


def fit_norm_heads(bb, heads: NormHeads, collected: dict, idx: torch.Tensor, layers: list[int], loss: str = "kl",
                   epochs: int = 2, lr: float = 5e-2, batch: int = 32, seed: int = 0, progress: bool = False,
                   max_elements: int = 1 << 26) -> dict:
    """Fit the heads of 1-based `layers` on the tokens `idx` of `collected` (see `collect_hidden`):
    `epochs` passes of AdamW (no weight decay: it would pull the norm weights to zero) in
    shuffled batches of `batch` tokens. Each step runs every layer's head on the same tokens
    (in groups of layers so that a (layers x tokens x vocabulary) block stays under
    `max_elements`), computes the loss gradient with respect to the logits by hand and lets
    autograd take it back through the frozen projection and the norm. With a restricted
    vocabulary (`NormHeads(bb, vocab_ids)`) the loss is over the heads' K + 1 classes: `kl` to the
    final layer's distribution folded onto them (the mass outside the K tokens is OTHER's), `ce`
    with the labels outside them mapped to OTHER; the OTHER rows learn with the norms (their
    weight at lr / sqrt(hidden size)), starting where `init_other_rows` puts them when they are
    still at zero. Returns the per-layer mean loss of the last epoch."""
    if not layers or epochs == 0:
        return {"loss": {}, "steps": 0}
    if heads.has_other and not heads.other_weight.any() and not heads.other_bias.any():
        init_other_rows(bb, heads, collected, idx, layers, seed=seed)
    dev = collected["hidden"].device
    C = heads.num_classes
    pdtype = _fast_projection_dtype(dev)
    w, b = heads.projection(bb, pdtype)
    vmap = heads.vocab_map().to(dev) if heads.vocab_ids is not None else None
    group = max(1, min(len(layers), max_elements // max(1, batch * C)))
    params = [p for k in layers for p in heads.norms[k - 1].parameters()]
    groups = [{"params": params, "lr": lr}]
    if heads.has_other:  # OTHER's row moves its logit by ~lr * |x|_1 per step: scaled down by sqrt(H)
        groups += [{"params": [heads.other_weight], "lr": lr / math.sqrt(bb.hidden_size)},
                   {"params": [heads.other_bias], "lr": lr}]
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(idx.numel() / batch)
    last_epoch = torch.zeros(len(layers), dtype=torch.float64)
    bar = progress_display(epochs * steps_per_epoch, f"fit heads ({loss})", "step", bar=progress, lines=progress,
                           leave=False)
    for epoch in range(epochs):
        order = idx[torch.randperm(idx.numel(), generator=gen)]
        epoch_sum, epoch_n = torch.zeros(len(layers), dtype=torch.float64), 0
        for s in range(steps_per_epoch):
            tok = order[s * batch:(s + 1) * batch].to(dev)
            n = tok.numel()
            probs = negent = targets = None
            with torch.no_grad():
                if loss == "kl":  # the teacher: the final layer's distribution, in full precision
                    logp = torch.log_softmax(bb.logits(bb.final_norm(collected["final_hidden"][tok])).float(), -1)
                    if heads.vocab_ids is None:
                        probs = logp.exp()
                        negent = (probs * logp).sum(-1)
                    else:  # folded onto the heads' classes: the mass outside the K tokens is OTHER's
                        probs = fold_teacher(logp.exp(), heads)
                        negent = torch.xlogy(probs, probs).sum(-1)
                    del logp
                else:
                    targets = collected["targets"][tok]
                    if vmap is not None:
                        targets = vmap[targets]  # labels outside the K tokens: OTHER
            opt.zero_grad(set_to_none=True)
            for g0 in range(0, len(layers), group):
                ks = layers[g0:g0 + group]
                rows = torch.tensor([k - 1 for k in ks], device=dev)
                x = heads(ks, collected["hidden"][rows[:, None], tok[None, :]])  # (G, n, H), with autograd
                z = heads.project(bb, ks, x, w, b)  # frozen projection (+ OTHER, + soft-capping)
                with torch.no_grad():
                    lossv, gz = loss_and_grad(z.detach().float(), probs, negent, targets)
                z.backward(gz.to(z.dtype))
                epoch_sum[g0:g0 + len(ks)] += lossv.double().cpu() * n
                del z, gz, x
            opt.step()
            epoch_n += n
            bar.update(1)
        last_epoch = epoch_sum / max(1, epoch_n)
        bar.set_postfix(epoch=epoch + 1, loss=f"{last_epoch.mean().item():.3f}")
    bar.close()
    return {"loss": {k: float(v) for k, v in zip(layers, last_epoch.tolist())}, "steps": epochs * steps_per_epoch}


# --- 3. per-layer measurement ---------------------------------------------------------------
OTHER_CONF = -1.0  # the confidence `measure_heads` gives a position whose head's OTHER wins: it never exits


@torch.no_grad()
def measure_heads(bb, heads: NormHeads, collected: dict, idx: torch.Tensor, batch: int = 64,
                  progress: bool = False, max_elements: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's head on the tokens `idx`, in fp32: max-softmax confidence (L, n) and top-1
    agreement with the final layer (L, n) bool. Row k-1 is layer k. With a restricted vocabulary
    the confidence is over the K + 1 classes and the top-1 is the class's token id; where OTHER
    wins the token cannot leave at that layer (and never agrees): its confidence is `OTHER_CONF`
    (-1), below every threshold. The last layer's row is the model itself (its whole vocabulary),
    restricted or not."""
    L = bb.num_layers
    C = heads.num_classes
    dev = collected["hidden"].device
    restricted = heads.vocab_ids is not None
    group = max(1, min(L, max_elements // max(1, batch * C)))
    conf = torch.empty(L, idx.numel())
    agree = torch.empty(L, idx.numel(), dtype=torch.bool)
    wdtype = bb.lm_head.weight.dtype
    w, b = heads.projection(bb, wdtype)
    ids = heads.vocab_ids
    K = C - int(heads.has_other)
    chunks = range(0, idx.numel(), batch)

    def fill(rows: slice, cols: slice, z: torch.Tensor, ref: torch.Tensor, classes: torch.Tensor | None):
        mx, top = z.max(-1)
        # max-softmax probability = 1 / sum_v exp(z_v - max), in place over the big tensor
        c = z.sub_(mx[..., None]).exp_().sum(-1).reciprocal()
        if classes is not None:
            known = top < K
            tok = classes[top.clamp(max=K - 1)]
            c = torch.where(known, c, torch.full_like(c, OTHER_CONF))
            top = torch.where(known, tok, torch.full_like(tok, -1))
        conf[rows, cols] = c.cpu()
        agree[rows, cols] = (top == ref).cpu()

    for a in progress_iter(chunks, "measure", "batch", progress, leave=False):
        tok = idx[a:a + batch].to(dev)
        ref = collected["final_top1"][tok]
        cols = slice(a, a + tok.numel())
        top_layer = L - 1 if restricted else L  # restricted: the last layer (the model) apart, whole vocabulary
        for g0 in range(0, top_layer, group):
            ks = list(range(g0 + 1, min(top_layer, g0 + group) + 1))
            hid = collected["hidden"][g0:g0 + len(ks)][:, tok]
            if ks[-1] == L:  # the last layer exactly as the backbone ran it
                hid = hid.float()
                hid[-1] = collected["final_hidden"][tok].float()
            z = heads.project(bb, ks, heads(ks, hid), w, b).float()
            fill(slice(g0, g0 + len(ks)), cols, z, ref, ids)
        if restricted:
            z = bb.logits(heads([L], collected["final_hidden"][tok][None]).to(wdtype)).float()
            fill(slice(L - 1, L), cols, z, ref, None)
    return conf, agree


def layer_table(conf: torch.Tensor, agree: torch.Tensor, thresholds) -> list[dict]:
    """Per layer: agreement, and per threshold the confident share and the agreement among it;
    with restricted heads also `other_share`, the share of tokens whose top-1 is OTHER (they
    never leave there: `measure_heads` gives them confidence -1)."""
    rows = []
    for i in range(conf.shape[0]):
        c, g = conf[i], agree[i]
        per = []
        for t in thresholds:
            sel = c >= t
            cnt = int(sel.sum())
            per.append({"threshold": float(t), "share": cnt / c.numel(), "count": cnt,
                        "agreement": (int((sel & g).sum()) / cnt) if cnt else None})
        row = {"layer": i + 1, "agreement": float(g.float().mean()), "confident": per}
        if bool((c < 0).any()):
            row["other_share"] = float((c < 0).float().mean())
        rows.append(row)
    return rows


# --- 4. the speedup simulator --------------------------------------------------------------
def simulate(conf: torch.Tensor, agree: torch.Tensor, sets: torch.Tensor, threshold: float, head_cost: float,
             lm_head_cost: float, chunk_elements: int = 1 << 25, recompute: float = 0.0) -> dict:
    """Predicted speedup and agreement of exit sets on per-token confidences.

    `conf` (L, n) and `agree` (L, n) are per layer (row k-1 = layer k) and held-out token;
    `sets` (S, m) holds 1-based exit layers, ascending, m exits per set. A token leaves at the
    first exit whose confidence >= `threshold`: leaving at the j-th exit (1-based) at layer k
    costs k + j * head_cost + (L - k) * recompute (the KV recomputation of the layers it skipped,
    per layer; never the LM head); leaving nowhere costs L + m * head_cost + lm_head_cost; full
    depth L + lm_head_cost. Vectorised over sets (in chunks) and tokens. Returns tensors (S,):
    `speedup` (full / mean cost), `agreement` (emitted token == the full model's), `exit_share`
    (share of tokens leaving early), `mean_cost` (layer-equivalents per token), `heads_per_token`
    (exit heads evaluated per token) and `break_even_head_cost` (the head cost at which the set
    would be exactly as fast as full depth: it pays off below that)."""
    L, n = conf.shape
    S, m = sets.shape
    hit = conf >= threshold
    full = L + lm_head_cost
    keys = ("speedup", "agreement", "exit_share", "mean_cost", "heads_per_token", "break_even_head_cost")
    out = {k: torch.empty(S, dtype=torch.float64) for k in keys}
    step = max(1, chunk_elements // max(1, m * n))
    for a in range(0, S, step):
        ks = sets[a:a + step]
        c, g = hit[ks - 1], agree[ks - 1]  # (s, m, n)
        waiting = torch.ones(ks.shape[0], n, dtype=torch.bool)
        layers = torch.zeros(ks.shape[0], dtype=torch.float64)  # summed over tokens: layers run
        heads = torch.zeros(ks.shape[0], dtype=torch.float64)  # ... exit heads evaluated
        same = torch.zeros(ks.shape[0], dtype=torch.float64)  # ... tokens equal to the full model's
        for j in range(m):
            leave = (waiting & c[:, j]).sum(-1).double()
            layers += leave * (ks[:, j].double() + (L - ks[:, j]).double() * recompute)
            heads += leave * (j + 1)
            same += (waiting & c[:, j] & g[:, j]).sum(-1).double()
            waiting &= ~c[:, j]
        stay = waiting.sum(-1).double()
        layers += stay * (L + lm_head_cost)
        heads += stay * m
        same += stay
        mean_cost = (layers + heads * head_cost) / n
        sl = slice(a, a + ks.shape[0])
        out["mean_cost"][sl] = mean_cost
        out["speedup"][sl] = full / mean_cost
        out["agreement"][sl] = same / n
        out["exit_share"][sl] = 1.0 - stay / n
        out["heads_per_token"][sl] = heads / n
        out["break_even_head_cost"][sl] = (full - layers / n) / (heads / n)
    return out


def candidate_sets(num_layers: int, size: int) -> torch.Tensor:
    """Every ascending set of `size` exit layers among 1..L-1 (an exit at L is the model itself)."""
    combos = list(itertools.combinations(range(1, num_layers), size))
    return torch.tensor(combos, dtype=torch.long).view(len(combos), size)


def rank_sets(conf, agree, num_layers: int, threshold: float, target: float, head_cost: float, lm_head_cost: float,
              max_exits: int = 3, top: int = 5, max_work: float = 4e9, recompute: float = 0.0) -> dict:
    """Simulate every set of 1..max_exits exits at `threshold` (`recompute`: see `simulate`).
    `best`: the top sets by predicted speedup among those whose agreement >= `target` (if none
    reaches it: the most faithful sets instead); `most_promising`: the qualifying set with the
    highest break-even head cost (the one a cheaper exit head would make pay off first). Sizes
    whose sets x tokens exceed `max_work` are skipped (noted)."""
    n = conf.shape[1]
    rows, skipped, counts = [], [], {}
    for m in range(1, max_exits + 1):
        count = math.comb(num_layers - 1, m)
        if count == 0:
            continue
        if count * n * m > max_work:
            skipped.append(m)
            continue
        sets = candidate_sets(num_layers, m)
        r = {k: v.tolist() for k, v in simulate(conf, agree, sets, threshold, head_cost, lm_head_cost,
                                                recompute=recompute).items()}
        counts[m] = count
        for i, exits in enumerate(sets.tolist()):
            rows.append({"exits": exits, "speedup": r["speedup"][i], "agreement": r["agreement"][i],
                         "exit_share": r["exit_share"][i], "mean_cost_layers": r["mean_cost"][i],
                         "heads_per_token": r["heads_per_token"][i],
                         "break_even_head_cost": r["break_even_head_cost"][i]})
    ok = [r for r in rows if r["agreement"] >= target]
    if ok:
        pool = sorted(ok, key=lambda r: (-r["speedup"], -r["agreement"], len(r["exits"])))
    else:
        pool = sorted(rows, key=lambda r: (-r["agreement"], -r["speedup"], len(r["exits"])))
    promising = max(ok, key=lambda r: (r["break_even_head_cost"], r["agreement"]), default=None)
    return {"threshold": threshold, "target_agreement": target, "target_met": bool(ok), "best": pool[:max(top, 20)],
            "most_promising": promising, "sets_simulated": counts, "sizes_skipped": skipped, "qualifying": len(ok)}


# --- head cost ------------------------------------------------------------------------------
def measured_costs(bb, vocab_ids: torch.Tensor | None = None) -> dict:
    """One norm head and the final norm + LM head in layer-equivalents, timed by the decoding
    engine's own `measure_costs` (one token on a 64-token context, best of 5). With `vocab_ids`
    the head is restricted to those tokens + OTHER, as `convert --exit-vocab K` builds it, and
    its own projection is what is timed. `recompute_per_layer`: what one skipped layer's KV
    recomputation costs a token that exits early (`eetune.measure.evaluate.recompute_layers`)."""
    from eetune.decode.api import DecodeOptions
    from eetune.decode.policy import measure_costs
    from eetune.measure.evaluate import recompute_layers
    from eetune.model.early_exit import EarlyExitModel

    model = EarlyExitModel.convert(bb, [1], arch="norm", output_embedding="shared", exit_vocab_ids=vocab_ids)
    c = measure_costs(model, DecodeOptions())
    layer = float(c["layer"])
    h = c["heads"][1]
    if not layer > 0:
        raise EETuneError("could not time a decoder layer on this machine: give --head-cost N (layer-equivalents)")
    x5 = c.get("layer_x5")
    out = {"head_layers": (float(h["transform"]) + float(h["projection"])) / layer,
           "lm_head_layers": float(c["final"]) / layer, "layer_s": layer, "measured": True,
           "recompute_per_layer": recompute_layers({"layer_x5_layers": None if x5 is None else float(x5) / layer})}
    if vocab_ids is not None:
        out["exit_vocab"] = int(torch.as_tensor(vocab_ids).numel())
    return out


# --- the whole scan -------------------------------------------------------------------------
def run_scan(bb, tokenizer, cfg: ScanConfig, fit: torch.Tensor | None = None,
             held_out: torch.Tensor | None = None) -> dict:
    """The scan of a loaded backbone (see the module docstring); `fit`/`held_out` blocks may be
    given directly, else they are read from `cfg.data`. Returns a JSON-ready dict."""
    cfg.validate()
    L = bb.num_layers
    if L < 2:
        raise EETuneError(f"the model has {L} layer: an exit scan needs at least 2 layers")
    times = {}
    t0 = time.perf_counter()
    if fit is None or held_out is None:
        fit, held_out, data_info = scan_blocks(cfg.data, tokenizer, cfg.tokens, cfg.seq_len, cfg.holdout, cfg.seed)
    else:
        data_info = {"source": cfg.data, "fit_blocks": int(fit.shape[0]), "held_out_blocks": int(held_out.shape[0]),
                     "seq_len": int(fit.shape[1])}
    times["data_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    hdt = torch.bfloat16 if cfg.hidden_dtype == "bf16" else torch.float32
    blocks = torch.cat([fit, held_out])
    collected = collect_hidden(bb, blocks, cfg.batch_size, hdt, cfg.progress)
    per_block = blocks.shape[1] - 1
    n_fit = fit.shape[0] * per_block
    fit_idx = torch.arange(n_fit)
    val_idx = torch.arange(n_fit, blocks.shape[0] * per_block)
    times["backbone_s"] = time.perf_counter() - t0

    vocab_ids, vocab_info = None, None
    K = None
    if cfg.exit_vocab is not None:
        from eetune.model.heads import parse_exit_vocab
        K = parse_exit_vocab(cfg.exit_vocab, bb.vocab_size)
    if K is not None:  # the K most frequent tokens of the fitting data, counted as `eetune tune` ranks them
        from eetune.train.tune import rank_vocabulary
        vocab_ids = rank_vocabulary(fit, bb.vocab_size)[:K]
        counts = torch.bincount(fit.reshape(-1), minlength=bb.vocab_size)
        vocab_info = {"k": K, "ranked_by": "data", "data": "the scan's fitting blocks", "tokens": int(fit.numel()),
                      "seen": int((counts[vocab_ids] > 0).sum()),  # the rest: unseen ids, ranked by id
                      "coverage": float(counts[vocab_ids].sum()) / max(1, int(fit.numel())),
                      "held_out_coverage": float(torch.isin(held_out[:, 1:], vocab_ids).float().mean())}

    t0 = time.perf_counter()
    heads = NormHeads(bb, vocab_ids).to(collected["hidden"].device)
    fitted = fit_norm_heads(bb, heads, collected, fit_idx, list(range(1, L)), cfg.loss, cfg.epochs, cfg.lr,
                            cfg.fit_batch, cfg.seed, cfg.progress)
    times["fit_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    conf, agree = measure_heads(bb, heads, collected, val_idx, progress=cfg.progress)
    del collected
    thresholds = sorted(set(float(t) for t in (*cfg.thresholds, cfg.threshold)))
    table = layer_table(conf, agree, thresholds)
    times["measure_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if cfg.head_cost is None:
        costs = measured_costs(bb, vocab_ids)
    else:
        costs = {"head_layers": float(cfg.head_cost), "lm_head_layers": float(cfg.head_cost), "measured": False}
    recompute = float(costs.get("recompute_per_layer", 0.0))
    times["costs_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ranking = rank_sets(conf, agree, L, cfg.threshold, cfg.target_agreement, costs["head_layers"],
                        costs["lm_head_layers"], cfg.max_exits, cfg.top, recompute=recompute)
    by_threshold = []  # the best set at every threshold of the table, to help pick one
    for t in thresholds:
        r = ranking if t == cfg.threshold else rank_sets(conf, agree, L, t, cfg.target_agreement, costs["head_layers"],
                                                         costs["lm_head_layers"], cfg.max_exits, 1,
                                                         recompute=recompute)
        by_threshold.append({"threshold": t, "best": r["best"][0] if r["target_met"] else None,
                             "most_promising": r["most_promising"]})
    ranking["by_threshold"] = by_threshold
    times["simulate_s"] = time.perf_counter() - t0

    return {"model": getattr(bb, "source", ""), "num_layers": L, "hidden_size": bb.hidden_size,
            "vocab_size": bb.vocab_size, "data": data_info,
            "tokens": {"fit": int(fit_idx.numel()), "held_out": int(val_idx.numel())},
            "heads": {"arch": "norm", "loss": cfg.loss, "epochs": cfg.epochs, "lr": cfg.lr, "fit_batch": cfg.fit_batch,
                      "steps": fitted["steps"], "train_loss": {str(k): v for k, v in fitted["loss"].items()},
                      "hidden_dtype": cfg.hidden_dtype, "exit_vocab": K},
            "exit_vocab": vocab_info,
            "thresholds": thresholds, "layers": table, "costs": costs, "ranking": ranking,
            "note": kv_note(costs), "seconds": times, "machine": _machine()}


def _machine() -> dict:
    """Where a scan ran (its costs and times are this machine's)."""
    import os
    import platform

    import transformers

    from eetune.version import __version__
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "eetune": __version__,
            "threads": torch.get_num_threads()}


# --- 5. report ------------------------------------------------------------------------------
def suggestion(result: dict, model_arg: str) -> dict | None:
    """The exit set to convert with: the best one if it is predicted faster than full depth
    (`pays_off`), else the most promising qualifying one (highest break-even head cost); None if
    no set reaches the target agreement. `command` is the `eetune convert` line."""
    rk = result["ranking"]
    if not rk["target_met"]:
        return None
    pick = rk["best"][0] if rk["best"][0]["speedup"] > 1.0 else rk["most_promising"]
    exits = ",".join(str(k) for k in pick["exits"])
    K = (result.get("exit_vocab") or {}).get("k")
    vocab = f" --exit-vocab {K}" if K else ""
    return {"exits": pick["exits"], "pays_off": pick["speedup"] > 1.0, "speedup": pick["speedup"],
            "agreement": pick["agreement"], "break_even_head_cost": pick["break_even_head_cost"],
            "command": f"eetune convert --model {model_arg} --exits {exits} --arch norm{vocab} "
                       f"--out exits-{exits.replace(',', '-')}"}


def _set_row(b: dict) -> str:
    return (f"  {','.join(map(str, b['exits'])):<10} {b['speedup']:7.2f}x {b['agreement']:7.3f} "
            f"{b['exit_share']:10.1%} {b['mean_cost_layers']:10.2f} {b['break_even_head_cost']:10.2f}")


def format_report(result: dict, top: int = 5, model_arg: str | None = None) -> str:
    """The printed report: per-layer table, best exit sets, best set per threshold, suggestion."""
    ts = result["thresholds"]
    L = result["num_layers"]
    tok = result["tokens"]
    h = result["heads"]
    ev = result.get("exit_vocab")
    lines = [f"exit scan of {result['model']}: {L} layers; a norm head after every layer fit on {tok['fit']:,} tokens "
             f"({h['epochs']} epochs, loss {h['loss']}), measured on {tok['held_out']:,} held-out tokens of "
             f"{result['data']['source']}"]
    if ev:
        lines.append(f"heads restricted to the {ev['k']:,} most frequent tokens of the fitting data + OTHER "
                     f"(--exit-vocab {ev['k']}): they cover {ev['coverage']:.1%} of the fitting tokens and "
                     f"{ev['held_out_coverage']:.1%} of the held-out ones; a token leaves only where OTHER does not "
                     f"win")
        if ev.get("seen", ev["k"]) < ev["k"]:
            lines.append(f"note: only {ev['seen']:,} of the {ev['k']:,} tokens occur in the {ev['tokens']:,} fitting "
                         f"tokens (the rest are unseen ids, ranked by id): read more --tokens, or hold out less "
                         f"(--holdout), for a ranking like the one `eetune convert --exit-vocab` makes from more data")
    lines.append(f"{'layer':>5} {'agree':>6}" + "".join(f"  {'p>=' + format(t, 'g'):>7} {'(agree)':>7}" for t in ts))
    for r in result["layers"]:
        cells = "".join(f"  {c['share']:7.1%} " + (f"{c['agreement']:7.1%}" if c["agreement"] is not None
                                                    else f"{'-':>7}") for c in r["confident"])
        name = f"{r['layer']}" if r["layer"] < L else f"{r['layer']}*"
        other = f"  OTHER {r['other_share']:.1%}" if ev and "other_share" in r else ""
        lines.append(f"{name:>5} {r['agreement']:6.3f}{cells}{other}")
    lines.append("(agree = top-1 agreement with the final layer; p>=t = share of tokens whose max-softmax "
                 "probability reaches t" + (" and whose top-1 is not OTHER" if ev else "")
                 + ", (agree) = agreement among them; * = the final layer itself"
                 + ("; OTHER = share of tokens where OTHER wins" if ev else "") + ")")
    c = result["costs"]
    how = "measured on this machine" if c.get("measured") else "given by --head-cost"
    head = f"one exit head ({ev['k']:,} tokens + OTHER)" if ev else "one exit head"
    lines.append(f"cost model: {head} = {c['head_layers']:.2f} layers, LM head = {c['lm_head_layers']:.2f} "
                 f"layers ({how}; a token that exits early never pays it); full depth = "
                 f"{L + c['lm_head_layers']:.2f}; {result.get('note') or kv_note(c)}.")
    rk = result["ranking"]
    simulated = sum(rk["sets_simulated"].values())
    sizes = ", ".join(f"{n} of {m} exit{'s' if int(m) > 1 else ''}" for m, n in rk["sets_simulated"].items())
    if rk["sizes_skipped"]:
        sizes += f"; sets of {', '.join(map(str, rk['sizes_skipped']))} exits skipped: too many"
    if rk["target_met"]:
        lines.append(f"best exit sets at threshold {rk['threshold']:g} with agreement >= {rk['target_agreement']:g} "
                     f"({rk['qualifying']} of {simulated} simulated sets qualify: {sizes}):")
    else:
        lines.append(f"no exit set reaches agreement {rk['target_agreement']:g} at threshold {rk['threshold']:g} "
                     f"({simulated} simulated: {sizes}); the most faithful sets instead (raise --threshold or lower "
                     f"--target-agreement):")
    lines.append(f"  {'exits':<10} {'speedup':>8} {'agree':>7} {'exit early':>10} {'cost/token':>10} "
                 f"{'break-even':>10}")
    lines.extend(_set_row(b) for b in rk["best"][:top])
    lines.append("  (cost/token in layers; break-even = the head cost, in layers, below which the set beats full "
                 "depth)")
    if len(rk.get("by_threshold", [])) > 1:
        lines.append(f"best set per threshold (agreement >= {rk['target_agreement']:g}; "
                     f"the most promising one = highest break-even):")
        for e in rk["by_threshold"]:
            b, p = e["best"], e["most_promising"]
            if b is None:
                lines.append(f"  t={e['threshold']:<5g} none reaches the target agreement")
                continue
            more = "" if p is None or p["exits"] == b["exits"] else \
                f"; most promising {','.join(map(str, p['exits']))} (break-even {p['break_even_head_cost']:.2f})"
            lines.append(f"  t={e['threshold']:<5g} {','.join(map(str, b['exits']))}: {b['speedup']:.2f}x, agreement "
                         f"{b['agreement']:.3f}, break-even {b['break_even_head_cost']:.2f}{more}")
    s = result.get("suggested")
    if s is None and "suggested" not in result:
        s = suggestion(result, model_arg or result["model"])
    if s is None:
        lines.append(f"suggested: no exits: no set reaches agreement {rk['target_agreement']:g} at threshold "
                     f"{rk['threshold']:g} (try another --threshold or a lower --target-agreement)")
    elif s["pays_off"]:
        lines.append(f"suggested: {s['command']}")
    else:
        lines.append(f"suggested: {s['command']}  (not faster at the measured head cost of {c['head_layers']:.2f} "
                     f"layers: it pays off below {s['break_even_head_cost']:.2f} layers per exit head, e.g. with "
                     + ("a smaller --exit-vocab)" if ev else "a restricted-vocabulary head: scan again with "
                                                             "--exit-vocab K)"))
    return "\n".join(lines)


def write_json(result: dict, path: str) -> None:
    """Write `result` as JSON atomically (eetune.fsio)."""
    import json

    from eetune.fsio import atomic_write_text
    atomic_write_text(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def write_plot(result: dict, path: str, min_count: int = 20) -> bool:
    """Agreement and confident share per layer as a PNG; False if matplotlib is missing. The
    agreement among confident tokens is drawn only where at least `min_count` tokens are."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    layers = [r["layer"] for r in result["layers"]]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    ax.plot(layers, [r["agreement"] for r in result["layers"]], "k-o", ms=3, label="top-1 agreement with final")
    for i, t in enumerate(result["thresholds"]):
        cells = [r["confident"][i] for r in result["layers"]]
        line, = ax.plot(layers, [c["share"] for c in cells], "-", label=f"share p >= {t:g}")
        ax.plot(layers, [c["agreement"] if c["count"] >= min_count else float("nan") for c in cells], ":",
                color=line.get_color(), label=f"agreement | p >= {t:g}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("norm head after layer")
    ax.set_ylabel("share of held-out tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"exit scan: {result['model']} ({result['tokens']['held_out']:,} held-out tokens)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.text(1.01, 0.0, f"agreement | p >= t\nwhere >= {min_count} tokens", transform=ax.transAxes, fontsize=7,
            va="bottom")
    fig.tight_layout()
    from eetune.fsio import atomic_write
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return True

"""The readable reference decoder: the tests' oracle for `eetune.decode.engine`.

Plain functions over an `EarlyExitModel` and a per-layer `LayerCache` (layers may hold different
numbers of slots), one step at a time, a mask built per layer call, per-row Python where
self-speculation accepts, slots invalidated rather than reused. Slow and obvious on purpose; the
engine must give the same tokens and logits (within float tolerance) in every mode and family.

- `prefill`: the prompt through every layer (and through `layer` exits, to fill their caches).
- `early_exit_step`: one new token climbs the trunk; the first exit whose max-prob (or gate)
  reaches its threshold emits it. The layers above hold no keys/values for its position: those
  are filled by KV recomputation (pending tokens join the next token that climbs past them).
- `full_step`: every layer, no heads.
- `self_spec_round`: the draft exit proposes up to `draft_len` tokens, the layers above verify
  them in one pass, the longest agreeing prefix is kept plus the model's own next token (greedy),
  or the speculative-sampling rule decides (sampling).

Restricted-vocabulary heads (K token ids + OTHER): an exit's logits are over its own classes;
`exit_decision` turns them into what a decode uses: the logits over the vocabulary
(`head.to_vocab`: the K tokens at their ids, -inf elsewhere), the confidence (max-prob over all
classes, OTHER included, or the gate's) and whether the row may leave there at all (OTHER does
not win: `head.predict` gives a token, not -1). A row exits, or keeps drafting, only where both
hold; a draft is the best of the K tokens (greedy) or drawn from the vocabulary logits.

`reference_generate(model, prompts, opts)` is `eetune.decode.api.generate` with this loop.
"""

from __future__ import annotations

import torch

from eetune.model.backbone import LayerCache
from eetune.decode import DecodeOptions, choose, confidence, generate, sampling_probs, speculative_accept


def reference_generate(model, prompts, opts: DecodeOptions, on_tokens=None):
    """`generate` decoding with the reference loop instead of the engine."""
    return generate(model, prompts, opts, on_tokens=on_tokens, run=reference_run)


# --- engine state ---------------------------------------------------------------------------
class DecodeState:
    """Caches and bookkeeping of one batch being decoded."""

    def __init__(self, model, batch: int, device):
        self.model = model
        self.bb = model.backbone
        L = self.bb.num_layers
        self.cache = LayerCache(L)
        # `layer` exits attend over their own cache (slot num_layers - 1, the copied block's index).
        self.exit_caches = {h.layer: LayerCache(L) for h in model.heads if h.arch == "layer"}
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)  # position of the next token
        # KV recomputation: tokens whose upper layers are missing, as (depth, hidden, positions).
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.layer_token_passes = 0

    def run_layer(self, i: int, h: torch.Tensor, ctx) -> torch.Tensor:
        self.layer_token_passes += h.shape[0] * h.shape[1]
        return self.bb.call_layer(self.bb.layers[i], i, h, ctx, self.cache, i)

    def exit_logits(self, layer: int, h: torch.Tensor, ctx, last_only: bool = True) -> torch.Tensor:
        """Logits of exit `layer` for the last position of `h`, over the head's classes (B, C)
        (a `layer` exit first runs its block over every position of `h`, filling its own cache)."""
        head = self.model.head(layer)
        if head.arch == "layer":
            z = head.transform(h, ctx, self.exit_caches[layer])
            return head.project(z[:, -1])
        return head(h[:, -1])

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.bb.logits(self.bb.final_norm(h))


def prefill(state: DecodeState, ids: torch.Tensor, positions: torch.Tensor, exits_wanted, opts):
    """Run the (left-padded) prompts through every layer. Returns the full-depth logits of the
    last position and each wanted exit's decision there, {layer: (logits (B, V), confidence
    (B,), may leave (B,))} (`exit_decision`; evaluating a `layer` exit also fills its own cache
    over the prompt)."""
    bb = state.bb
    h = bb.embed(ids, positions)
    ctx = bb.context(h, positions)
    exits = {}
    for i in range(bb.num_layers + 1):
        if i in exits_wanted:
            exits[i] = exit_decision(state, i, h, state.exit_logits(i, h, ctx), opts)
        if i == bb.num_layers:
            break
        h = state.run_layer(i, h, ctx)
    state.next_pos = positions[:, -1] + 1
    return state.final_logits(h[:, -1]), exits


def exit_confidence(state: DecodeState, layer: int, h: torch.Tensor, logits: torch.Tensor, opts) -> torch.Tensor:
    """Confidence of exit `layer` at the last position: its gate's probability on the exit's
    input hidden state (`gate`), else the max-prob of its logits (over all of the head's
    classes: a restricted head's OTHER too)."""
    if opts.confidence == "gate":
        return state.model.gate(layer)(h[:, -1])
    conf = confidence(logits, opts.confidence)
    return conf


def exit_decision(state: DecodeState, layer: int, h: torch.Tensor, logits: torch.Tensor, opts):
    """What exit `layer`'s logits (B, C) at the last position mean for decoding: (the logits
    over the vocabulary (B, V), the confidence (B,), whether a row may leave here (B,): the
    head's top-1 is a token, not OTHER)."""
    head = state.model.head(layer)
    _, token = head.predict(logits)
    return head.to_vocab(logits), exit_confidence(state, layer, h, logits, opts), token != -1


def full_step(state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
    """One token per row through every layer; full-depth logits (B, V)."""
    bb = state.bb
    pos = state.next_pos[:, None]
    h = bb.embed(tokens[:, None], pos)
    ctx = bb.context(h, pos)
    for i in range(bb.num_layers):
        h = state.run_layer(i, h, ctx)
    state.next_pos = state.next_pos + 1
    return state.final_logits(h[:, -1])


def early_exit_step(state: DecodeState, tokens: torch.Tensor, opts: DecodeOptions, settled: torch.Tensor):
    """One token per row climbs until every row not yet `settled` has found a confident exit.

    Returns (logits used (B, V), exit layer per row (B,), confidence per row (B,)). Rows in
    `settled` (finished rows) never hold the batch back. The climbing token stops at the exit
    where the last row decided; it then waits in `state.pending` for its upper layers.
    """
    bb, model = state.bb, state.model
    L = bb.num_layers
    B = tokens.shape[0]
    pos = state.next_pos[:, None]
    h = bb.embed(tokens[:, None], pos)
    ctx = bb.context(h, pos)
    decided = settled.clone()
    out_logits = torch.zeros(B, bb.vocab_size, dtype=h.dtype, device=h.device)
    out_layer = torch.full((B,), L, dtype=torch.long, device=h.device)
    out_conf = torch.full((B,), float("nan"), device=h.device)
    exit_set = set(model.exit_layers)
    state.next_pos = state.next_pos + 1
    for i in range(L + 1):
        if i in exit_set:
            logits, conf, may = exit_decision(state, i, h, state.exit_logits(i, h, ctx), opts)
            take = ~decided & may & (conf >= opts.exit_thresholds[i])
            out_logits[take], out_layer[take], out_conf[take] = logits[take], i, conf[take]
            decided |= take
            if bool(decided.all()):
                if i < L:  # after the last layer every layer holds its keys and values
                    state.pending.append((i, h, ctx.positions))
                return out_logits, out_layer, out_conf
        if i == L:
            break
        joiners = [p for p in state.pending if p[0] == i]
        if joiners:  # KV recomputation: earlier exited tokens climb on with this one
            state.pending = [p for p in state.pending if p[0] != i]
            h = torch.cat([p[1] for p in joiners] + [h], dim=1)
            ctx = bb.context(h, torch.cat([p[2] for p in joiners] + [ctx.positions], dim=1))
        h = state.run_layer(i, h, ctx)
    rest = ~decided
    out_logits[rest] = state.final_logits(h[:, -1])[rest]
    return out_logits, out_layer, out_conf


def context_draft(state: DecodeState, d: int, h: torch.Tensor, ctx, extra: torch.Tensor, opts):
    """`--draft-context`: restricted draft exit d's decision over its K tokens, the prompts'
    tokens `extra` outside them (the LM head's rows applied to the exit's normed hidden state)
    and OTHER, written out whole: (logits over the vocabulary, confidence over every class,
    whether the top class is a token)."""
    bb, head = state.bb, state.model.head(d)
    z = head.transform(h, ctx, state.exit_caches[d]) if head.arch == "layer" else head.transform(h)
    z = z[:, -1]
    own = head.project(z)  # (B, K + 1): K tokens, then OTHER
    lm_b = getattr(bb.lm_head, "bias", None)
    added = bb.logits(z, bb.lm_head.weight[extra], None if lm_b is None else lm_b[extra])
    classes = torch.cat([own[:, :-1], added, own[:, -1:]], -1)
    conf = exit_confidence(state, d, h, classes, opts)
    may = classes.argmax(-1) != classes.shape[-1] - 1
    vocab = torch.full((classes.shape[0], bb.vocab_size), float("-inf"), dtype=classes.dtype, device=classes.device)
    vocab[:, torch.cat([head.vocab_ids.to(extra.device), extra])] = classes[:, :-1]
    return vocab, conf, may


def self_spec_round(state: DecodeState, tokens: torch.Tensor, opts: DecodeOptions, settled: torch.Tensor,
                    gen: torch.Generator | None, n_draft: int | None = None):
    """Draft with the draft exit, verify with the layers above it.

    `tokens` (B,) is each row's newest token, not yet seen by any layer. At most `n_draft`
    (default `opts.draft_len`) tokens are drafted. With `opts.draft_vocab` the draft exit's
    logits outside the K most frequent tuning tokens are masked out. Returns, per row, the
    list of emitted tokens (accepted drafts, then the model's own token) and how many of them
    were accepted drafts. Rejected drafts' slots are invalidated in every cache. A restricted
    draft head proposes only while OTHER does not win.
    """
    bb, model = state.bb, state.model
    d = opts.draft_exit or max(model.exit_layers)
    B = tokens.shape[0]
    n0 = state.next_pos.clone()
    hs, drafts, q_probs = [], [], []
    proposing = ~settled
    n_prop = torch.zeros(B, dtype=torch.long, device=tokens.device)
    cur = tokens
    head = model.head(d)
    n_draft = opts.draft_len if n_draft is None else n_draft
    keep = None
    if opts.draft_vocab:
        keep = torch.zeros(bb.vocab_size, dtype=torch.bool, device=tokens.device)
        keep[model.vocab_by_frequency[:opts.draft_vocab]] = True
    for step in range(n_draft + 1):
        pos = state.next_pos[:, None]
        h = bb.embed(cur[:, None], pos)
        ctx = bb.context(h, pos)
        for i in range(d):
            h = state.run_layer(i, h, ctx)
        state.next_pos = state.next_pos + 1
        hs.append((h, ctx.positions))
        if step == n_draft:
            if head.arch == "layer":  # its own cache must hold every position that may be accepted
                head.transform(h, ctx, state.exit_caches[d])
            break
        extra = getattr(state, "draft_extra", None)
        if extra is not None and head.has_other and extra.numel():  # --draft-context
            logits, conf, may = context_draft(state, d, h, ctx, extra, opts)
        else:
            logits = state.exit_logits(d, h, ctx)
            if keep is not None:  # an unrestricted head (generate refuses --draft-vocab with a restricted one)
                logits = logits.masked_fill(~keep, float("-inf"))
            logits, conf, may = exit_decision(state, d, h, logits, opts)
        proposing = proposing & may & (conf >= opts.exit_thresholds[d])
        if not bool(proposing.any()):
            break
        if opts.temperature == 0:
            nxt = logits.argmax(-1)
        else:
            q = sampling_probs(logits, opts)
            nxt = torch.multinomial(q, 1, generator=gen).squeeze(-1)
            q_probs.append(q)
        n_prop += proposing.long()
        drafts.append(nxt)
        cur = nxt
    m = len(drafts)
    # Verify: every drafted position through the layers above the draft exit, in one pass.
    h = torch.cat([x[0] for x in hs], dim=1)  # (B, m + 1, H) hidden states after layer d
    vpos = torch.cat([x[1] for x in hs], dim=1)
    ctx = bb.context(h, vpos)
    for i in range(d, bb.num_layers):
        h = state.run_layer(i, h, ctx)
    final = state.final_logits(h)  # (B, m + 1, V)
    emitted, n_acc = [], []
    for b in range(B):
        mb = int(n_prop[b])
        row, acc = [], 0
        if opts.temperature == 0:
            target = final[b].argmax(-1)
            while acc < mb and int(drafts[acc][b]) == int(target[acc]):
                row.append(int(drafts[acc][b]))
                acc += 1
            row.append(int(target[acc]))
        else:
            row = speculative_accept(sampling_probs(final[b], opts), [q[b] for q in q_probs[:mb]],
                                     [int(x[b]) for x in drafts[:mb]], gen)
            acc = len(row) - 1
        emitted.append(row)
        n_acc.append(acc)
    # Keep the slots of the accepted positions (n0 .. n0 + acc), drop the rest in every cache.
    last_valid = n0 + torch.tensor(n_acc, device=n0.device)
    for i in range(bb.num_layers):
        state.cache.invalidate_after(i, last_valid)
    for c in state.exit_caches.values():
        c.invalidate_after(bb.num_layers - 1, last_valid)
    state.next_pos = last_valid + 1
    return emitted, n_acc, m, int(n_prop.sum())


# --- the entry point ------------------------------------------------------------------------
def reference_run(model, ids, pad, opts, emitter, gen, device, policy=None) -> dict:
    """The reference decoding loop (this module's functions, one step at a time), with
    `eetune.decode.engine.run`'s signature and statistics."""
    bb = model.backbone
    T = ids.shape[1]
    pos = (torch.arange(T, device=device)[None, :] - torch.tensor(pad, device=device)[:, None]).clamp(min=-1)
    result = {"rounds": 0, "drafted": 0, "accepted": 0, "policy": None, "round_log": [], "max_pending": 0,
              "record_seconds": 0.0}
    B, L = ids.shape[0], bb.num_layers
    draft_exit = opts.draft_exit or max(model.exit_layers)
    done = emitter.done
    state = DecodeState(model, B, device)
    if opts.mode == "self-spec" and opts.draft_context and model.head(draft_exit).has_other:
        prompt_tokens = torch.unique(torch.cat([ids[b, p:] for b, p in enumerate(pad)]))
        head = model.head(draft_exit)
        state.draft_extra = prompt_tokens[~torch.isin(prompt_tokens, head.vocab_ids.to(prompt_tokens.device))]
    use_exits = opts.mode == "early-exit"
    if use_exits:
        wanted = set(model.exit_layers)
    elif opts.mode == "self-spec":  # a `layer` drafter attends over its own cache: fill it
        wanted = {draft_exit} if model.head(draft_exit).arch == "layer" else set()
    else:
        wanted = set()
    final, exits = prefill(state, ids, pos, wanted, opts)
    state.layer_token_passes = 0  # count the decoding phase only
    # The first token: same rule as every later one.
    logits, layer, conf = final, torch.full((B,), L, device=device), torch.full((B,), float("nan"), device=device)
    if use_exits:
        decided = torch.zeros(B, dtype=torch.bool, device=device)
        logits = final.clone()
        conf = conf.clone()
        for k in model.exit_layers:
            lg, c, may = exits[k]
            take = ~decided & may & (c >= opts.exit_thresholds[k])
            logits[take], layer[take], conf[take] = lg[take], k, c[take]
            decided |= take
    if opts.record_logits:
        emitter.step_logits.append((0, layer.clone(), logits.clone()))
    tok = choose(logits, opts, gen)
    emitter.emit_step(tok, layer, conf)
    step = 1
    while not emitter.all_done():
        if opts.mode == "full":
            logits = full_step(state, tok)
            tok = choose(logits, opts, gen)
            layer = torch.full((B,), L, device=device)
            if opts.record_logits:
                emitter.step_logits.append((step, layer, logits.clone()))
            emitter.emit_step(tok, layer, torch.full((B,), float("nan"), device=device))
        elif opts.mode == "early-exit":
            logits, layer, conf = early_exit_step(state, tok, opts, done)
            tok = choose(logits, opts, gen)
            if opts.record_logits:
                emitter.step_logits.append((step, layer.clone(), logits.clone()))
            emitter.emit_step(tok, layer, conf)
            result["max_pending"] = max(result["max_pending"], len(state.pending))
        else:
            n_draft = min(opts.draft_len, emitter.max_remaining() - 1)  # never draft past what is asked
            emitted, n_acc, m, proposed = self_spec_round(state, tok, opts, done, gen, n_draft)
            accepted = sum(a for a, live in zip(n_acc, emitter.live()) if live)
            result["rounds"] += 1
            result["drafted"] += proposed
            result["accepted"] += accepted
            result["round_log"].append((proposed, accepted))
            tok = emitter.emit_round(emitted, draft_exit, L)
        step += 1
    result["layer_token_passes"] = state.layer_token_passes
    return result

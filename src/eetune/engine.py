"""The lean decoding engine: the same three modes as `decode.py`, with the hot path kept lean.

`decode.py` is the readable reference (a mask built per layer call, per-row Python when
self-speculation accepts, slots invalidated rather than reused). This module computes the same
tokens and logits (tested against it, every mode and family, batches included) but:

- **One static cache** (`StaticCache`): per layer, key/value buffers preallocated for the whole
  request. Every row's valid slots are a prefix in position order (slot `s` of row `b` holds
  position `s - pad[b]`), so keys need no position table, and a self-spec round's rejected slots
  are simply written over by the next round: the cache grows only with accepted tokens. Rows
  that accepted fewer drafts than the leading row are `behind[b]` slots back and write that much
  lower, per row.
- **Geometry once per step** (`Step`): token positions, rotary tables and the additive masks
  (one per distinct sliding window) are built once per step for the widest query block of the
  step and sliced for each layer: in every step the query blocks of all layers end at the same
  slot, so a layer with fewer queries (KV recomputation joins tokens on the way up) uses the
  last rows of the same tensors. At batch 1 without padding a one-token step needs no mask.
- **Host reads**: one per exit decision stage (did every row decide? with a gate prefilter or
  a screen, also: does any row go on to the full projection?), one per self-spec round (how many
  drafts each row kept) and per draft step (does any row still propose?), and the emitted tokens
  once per step. Choices between rows use `torch.where`, never boolean-mask assignment.
- **Gates** (`--confidence gate`): the exit's probe runs first; its MLP and vocabulary
  projection run only if the gate fires for some row, so a token that does not leave pays one
  dot product at that exit. A `layer` exit still runs its block (its own cache must stay full).
- **Screened max-prob** (`screen_vocab=K`): an exit's max-prob is first taken over the K most
  frequent tokens only (a 1/12 of the projection for K = 4096 of 49,152); the full projection
  runs only for rows whose screened value reaches the threshold.
- **Gate prefilter** (`gate_filter=T`, with max-prob): the gate runs first and the exit head
  only for rows whose gate reaches T; the exit decision stays max-prob's.
- **Draft vocabulary** (`draft_vocab=K`): the draft exit projects onto the K most frequent
  tokens of the tuning data only; verification by the full model keeps self-spec lossless.
- **Draft policy** (`draft_exit="auto"`): `DraftPolicy` picks the draft exit and length per round
  from costs measured once per model and the acceptance observed so far.

`run(model, ids, pad, opts, emitter, gen)` is called by `decode.generate`, which owns the
options, the prompt checks and the per-row bookkeeping shared with the reference engine.
"""

from __future__ import annotations

import math
import sys
import time

import torch

from .backbone import LayerContext


# --- the cache ------------------------------------------------------------------------------
class StaticCache:
    """Per-layer key/value buffers of fixed capacity, written in place (gpt-fast's KVCache,
    with a per-layer fill level because layers above an exit lag behind).

    `n[i]` is how many slots layer i has written (the same for every row, except that rows in
    `behind` write `behind[b]` slots lower: the self-spec rows that accepted fewer drafts).
    HF attention modules call `update(k, v, layer_idx)` and attend over what it returns; the
    engine's masks hide any slot a row does not own."""

    def __init__(self, num_layers: int, batch: int, capacity: int, device):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.n = [0] * num_layers
        self.batch, self.capacity = batch, capacity
        self.behind: torch.Tensor | None = None  # (B,) slots each row lags, None when no row lags
        self.arange = torch.arange(capacity, device=device)

    def update(self, key, value, layer_idx, cache_kwargs=None):
        i, n, q = layer_idx, self.n[layer_idx], key.shape[2]
        if n + q > self.capacity:
            raise RuntimeError(f"static cache overflow at layer {i}: {n} + {q} > {self.capacity}")
        if self.k[i] is None:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.k[i] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.v[i] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        if self.behind is None:
            self.k[i][:, :, n:n + q] = key
            self.v[i][:, :, n:n + q] = value
        else:  # per-row write offsets: scatter along the slot dimension
            idx = (n - self.behind)[:, None] + self.arange[:q]  # (B, q)
            idx = idx[:, None, :, None].expand(key.shape[0], key.shape[1], q, key.shape[3])
            self.k[i].scatter_(2, idx, key)
            self.v[i].scatter_(2, idx, value)
        self.n[i] = n + q
        return self.k[i][:, :, :n + q], self.v[i][:, :, :n + q]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n[layer_idx]

    def is_compileable(self) -> bool:  # pragma: no cover - HF introspection only
        return False


# --- per-step geometry ----------------------------------------------------------------------
class Step:
    """Positions, rotary tables and masks of one step, for query blocks that all end at slot
    `end - 1` and hold at most `qmax` tokens; `get(q)` slices them for a block of q tokens."""

    def __init__(self, eng: "Engine", end: int, qmax: int, like: torch.Tensor):
        self.eng, self.end, self.qmax = eng, end, qmax
        slots = end - qmax + eng.cache.arange[:qmax]  # (qmax,) uniform slots
        q_slots = slots[None, :].expand(eng.B, qmax)
        if eng.cache.behind is not None:
            q_slots = q_slots - eng.cache.behind[:, None]
        self.positions = q_slots - eng.pad[:, None]  # (B, qmax); < 0 only for padding
        ctx = eng.bb.context(like, self.positions)
        self.rope = ctx.rope
        self.position_ids = self.positions.clamp(min=0)
        self.masks = {}
        trivial = qmax == 1 and eng.no_pad and eng.cache.behind is None
        for w in eng.windows:
            if trivial and (w is None or end <= w):
                self.masks[w] = None  # one query that may see every key: no mask at all
                continue
            k = eng.cache.arange[:end]
            allowed = (k[None, None, :] <= q_slots[:, :, None]) & (k[None, None, :] >= eng.pad[:, None, None])
            if w is not None:
                allowed &= (q_slots[:, :, None] - k[None, None, :]) < w
            self.masks[w] = torch.zeros(allowed.shape, dtype=eng.dtype, device=allowed.device).masked_fill_(
                ~allowed, torch.finfo(eng.dtype).min)[:, None]
        self._memo: dict[int, tuple] = {}

    def get(self, q: int):
        hit = self._memo.get(q)
        if hit is None:
            rope = None if self.rope is None else {t: (c[:, -q:], s[:, -q:]) for t, (c, s) in self.rope.items()}
            ctx = LayerContext(self.positions[:, -q:], rope, self.position_ids[:, -q:])
            masks = {w: (None if m is None else m[:, :, -q:]) for w, m in self.masks.items()}
            hit = self._memo[q] = (ctx, masks)
        return hit


# --- the draft policy -----------------------------------------------------------------------
def measure_costs(model, opts) -> dict:
    """Seconds for one token through one decoder layer and through the final norm + LM head, as
    they cost while decoding: the layer cost is a whole trunk pass (every layer's weights
    streamed from memory, as in a real step) divided by the number of layers, the LM head cost a
    whole step minus the trunk. Also a 5-token block (verification), each exit's transform, and
    its projection. Measured once per model (cached on it) on a 64-token context, best of 5."""
    cached = getattr(model, "_eetune_costs", None)
    if cached is not None:
        return cached
    bb = model.backbone
    dev = next(bb.model.parameters()).device
    L, T = bb.num_layers, 64
    eng = Engine(model, opts, 1, T, [0], dev, capacity=T + 8)
    ids = (torch.arange(T, device=dev)[None] * 7919) % bb.vocab_size
    eng.prefill(ids, False, torch.zeros(1, dtype=torch.bool, device=dev))

    def timeit(fn, reps: int = 5) -> float:
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        return best

    def trunk(q: int, head: bool):
        step = Step(eng, T + q, q, eng.like)
        x = bb.embed(ids[:, :q], step.positions)

        def fn():
            h = x
            for i in range(L):
                eng.cache.n[i] = T
                h = eng.layer(i, h, step)
            if head:
                eng.final_logits(h)
        return fn

    t1, t1h = timeit(trunk(1, False)), timeit(trunk(1, True))
    t5, t5h = timeit(trunk(5, False)), timeit(trunk(5, True))
    x1 = bb.embed(ids[:, -1:], torch.zeros(1, 1, dtype=torch.long, device=dev))[:, -1]
    costs = {"layer": t1 / L, "layer_x5": t5 / L, "final": max(t1h - t1, 0.0), "final_x5": max(t5h - t5, 0.0),
             "num_layers": L, "heads": {}}
    for head in model.heads:
        # a `layer` exit's block costs about one decoder layer; the others are timed
        branch = costs["layer"] if head.arch == "layer" else timeit(lambda: head.transform(x1))
        costs["heads"][head.layer] = {"transform": branch, "projection": costs["final"]}
    model._eetune_costs = costs
    return costs


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def policy_candidates(model) -> list[int]:
    """Exits `--draft-exit auto` may draft with."""
    L = model.backbone.num_layers
    cands = [k for k in model.exit_layers if k < L] or [max(model.exit_layers)]
    return cands[-1:] if model.config.arch == "layer" else cands


class DraftPolicy:
    """`--draft-exit auto`: choose the draft exit d and the draft length n of each round.

    A round drafts n tokens through layers 1..d (and one more token, the last, through the same
    layers), projects each draft with exit d's head, and verifies n + 1 tokens through layers
    d+1..L and the LM head. With a per-draft acceptance rate a (drafts are accepted in order,
    the first rejection ends the round), the round emits 1 + a + a^2 + ... + a^n tokens. So:

        cost(d, n)    = (n + 1) * d * c_layer + n * c_head(d) + (L - d) * c_layer(n + 1) + c_final(n + 1)
        emitted(d, n) = (1 - a_d^(n + 1)) / (1 - a_d)
        pick (d, n) maximising emitted / (cost * s[n > 0]), n in 0..draft_len (n = 0: a full step)

    s[drafting] and s[full step] calibrate the model against the clock: each is a running mean
    (weight 0.2) of measured ÷ modelled seconds of the rounds of that kind so far.

    c_layer(q) and c_final(q) for a block of q tokens are interpolated between the measured
    costs of 1 and 5 tokens. a_d starts from a prior worth 8 drafts (the exit's held-out top-1
    agreement with the final layer when `tune --gates` reported it, else 0.2 + 0.4 d / L), then
    follows the drafts exit d has had accepted so far in this request. When no draft pays, a
    plain full step is taken, and every 16 such rounds one token is drafted to keep measuring.
    Candidates are the exits below the last layer (`layer` exits: the deepest only, since
    each would need its own cache filled on every round).
    """

    PRIOR_WEIGHT = 8.0

    def __init__(self, model, costs: dict, draft_len: int, draft_vocab: int | None, verbose: bool = False):
        self.model, self.costs, self.draft_len, self.verbose = model, costs, draft_len, verbose
        L = costs["num_layers"]
        self.L = L
        V = model.backbone.vocab_size
        self.head_cost = {}
        for k, c in costs["heads"].items():
            proj = c["projection"] * ((draft_vocab / V) if draft_vocab else 1.0)
            self.head_cost[k] = c["transform"] + proj
        report = ((model.config.gates or {}).get("report") or {}).get("exits", {})
        self.prior = {k: float(report.get(str(k), {}).get("agreement", 0.2 + 0.4 * k / L))
                      for k in policy_candidates(model)}
        self.stats = {k: [0, 0] for k in self.prior}  # accepted, drafted
        self.rounds_without_drafts = 0
        # Calibration: measured ÷ modelled seconds of rounds with drafts and of plain full steps
        # (per-round work the model leaves out: embedding, step set-up, host reads, bookkeeping).
        self.scale = {True: 1.0, False: 1.0}

    def _block(self, one: float, five: float, q: int) -> float:
        return one + (five - one) * (q - 1) / 4.0

    def rate(self, d: int) -> float:
        acc, drafted = self.stats[d]
        w = self.PRIOR_WEIGHT
        return min(0.99, (self.prior[d] * w + acc) / (w + drafted))

    def cost(self, d: int, n: int) -> float:
        c = self.costs
        return ((n + 1) * d * c["layer"] + n * self.head_cost[d]
                + (self.L - d) * self._block(c["layer"], c["layer_x5"], n + 1)
                + self._block(c["final"], c["final_x5"], n + 1))

    def emitted(self, d: int, n: int) -> float:
        a = self.rate(d)
        return (1 - a ** (n + 1)) / (1 - a)

    PROBE_EVERY = 16  # rounds without drafting after which one draft is tried (acceptance drifts)

    def choose(self, max_n: int) -> tuple[int, int]:
        best, pick = -1.0, (max(self.prior) if self.prior else self.L, 0)
        for d in self.prior:
            for n in range(0, min(self.draft_len, max_n) + 1):
                v = self.emitted(d, n) / (self.cost(d, n) * self.scale[n > 0])
                if v > best:
                    best, pick = v, (d, n)
        if pick[1] == 0 and max_n >= 1:
            self.rounds_without_drafts += 1
            if self.rounds_without_drafts >= self.PROBE_EVERY:  # probe the exit closest to paying
                self.rounds_without_drafts = 0
                d = max(self.prior, key=lambda e: self.emitted(e, 1) / self.cost(e, 1))
                return d, 1
        else:
            self.rounds_without_drafts = 0
        return pick

    def observe(self, d: int, accepted: int, drafted: int, n: int | None = None, seconds: float | None = None) -> None:
        """Record a round: drafts accepted of those proposed by exit d; with `n` (the draft length
        asked) and `seconds` (its wall time), update the calibration of that kind of round."""
        self.stats[d][0] += accepted
        self.stats[d][1] += drafted
        if n is not None and seconds is not None:
            ratio = seconds / self.cost(d, n)
            self.scale[n > 0] = 0.8 * self.scale[n > 0] + 0.2 * ratio

    def describe(self) -> str:
        c = self.costs
        full = self.L * c["layer"] + c["final"]
        lines = [f"draft policy: layer {c['layer'] * 1e3:.3f} ms/token (x5 block {c['layer_x5'] * 1e3:.3f}), "
                 f"LM head {c['final'] * 1e3:.3f} ms, full token ~{full * 1e3:.2f} ms; measured/modelled "
                 f"time: drafting rounds {self.scale[True]:.2f}, full steps {self.scale[False]:.2f}"]
        for d in self.prior:
            n = min(self.draft_len, 8)
            best = max(range(n + 1), key=lambda m: self.emitted(d, m) / (self.cost(d, m) * self.scale[m > 0]))
            speed = (self.emitted(d, best) * full * self.scale[False]) / (self.cost(d, best) * self.scale[best > 0])
            lines.append(f"  exit {d}: head {self.head_cost[d] * 1e3:.3f} ms ({self.head_cost[d] / c['layer']:.1f} "
                         f"layers), acceptance {self.rate(d):.2f} ({self.stats[d][0]}/{self.stats[d][1]}), best n "
                         f"{best}: expected speedup {speed:.2f}x")
        return "\n".join(lines)


# --- the engine -----------------------------------------------------------------------------
class Engine:
    """State of one batch being decoded by the lean engine."""

    def __init__(self, model, opts, B: int, T: int, pad: list[int], device, capacity: int):
        self.model, self.opts = model, opts
        self.bb = bb = model.backbone
        self.L = L = bb.num_layers
        self.B, self.device = B, device
        self.dtype = next(bb.model.parameters()).dtype
        self.cache = StaticCache(L, B, capacity, device)
        self.exit_caches = {h.layer: StaticCache(L, B, capacity, device) for h in model.heads if h.arch == "layer"}
        self.pad = torch.tensor(pad, dtype=torch.long, device=device)
        self.no_pad = not any(pad)
        self.win = [bb.layer_window(i) for i in range(L)]
        self.windows = sorted(set(self.win) | ({bb.layer_window(L - 1)} if self.exit_caches else set()),
                              key=lambda w: -1 if w is None else w)
        self.slot = T  # uniform slot of the next token (rows `behind` use a lower one)
        self.behind_host = [0] * B  # host copy of cache.behind
        self.pending: list[tuple[int, torch.Tensor]] = []  # (depth, hidden) of exited tokens, oldest first
        self.passes = 0
        self.exit_set = set(model.exit_layers)
        self.gate_mode = opts.confidence == "gate"
        self._rows: dict = {}  # (exit, K) -> (weight, bias) rows of the K most frequent tokens
        self.replay = None
        self.like = torch.empty(0, dtype=self.dtype, device=device)  # dtype/device for rotary tables

    # layers and heads ------------------------------------------------------------------------
    def layer(self, i: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        ctx, masks = step.get(h.shape[1])
        self.passes += h.shape[0] * h.shape[1]
        out = self.bb._call(self.bb.layers[i], i, h, ctx, masks[self.win[i]], self.cache)
        return out[0] if isinstance(out, tuple) else out

    def head_hidden(self, k: int, h: torch.Tensor, step: Step) -> torch.Tensor:
        """Exit k's hidden state before its projection, at the last position of `h`. A `layer`
        exit runs its block over every position of `h` (its own cache takes them all)."""
        head = self.model.head(k)
        if head.arch == "layer":
            ctx, masks = step.get(h.shape[1])
            last = self.L - 1
            out = self.bb._call(head.block, last, h, ctx, masks[self.bb.layer_window(last)], self.exit_caches[k])
            out = out[0] if isinstance(out, tuple) else out
            return head.norm(out[:, -1])
        return head.transform(h[:, -1])

    def project(self, k: int, z: torch.Tensor, weight=None, bias=None) -> torch.Tensor:
        """Exit k's logits; `weight`/`bias`: rows of a restricted vocabulary instead."""
        if weight is None:
            return self.bb.logits(z, self.model.head(k).out_weight())
        return self.bb.logits(z, weight, bias)

    def vocab_rows(self, k: int, K: int) -> tuple:
        """Exit k's output-projection rows (and bias) of the K most frequent tuning tokens,
        sliced once per request: the screen's and the draft's restricted vocabulary."""
        if (k, K) not in self._rows:
            ids = self.model.vocab_by_frequency[:K]
            b = getattr(self.bb.lm_head, "bias", None)
            self._rows[(k, K)] = (self.model.head(k).out_weight()[ids], None if b is None else b[ids])
        return self._rows[(k, K)]

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.bb.logits(self.bb.final_norm(h))

    # the exit decision -----------------------------------------------------------------------
    def decide(self, k: int, h: torch.Tensor, step: Step, st: dict) -> bool:
        """Evaluate exit k for the newest token of `h`; rows not yet decided that are confident
        take its logits. Returns True when every row has decided (one host read)."""
        from .decode import confidence
        opts, decided = self.opts, st["decided"]
        forced = None if self.replay is None else self.replay_at(st["index"])
        head = self.model.head(k)
        if self.gate_mode:
            if head.arch == "layer":
                z = self.head_hidden(k, h, step)
            g = self.model.gate(k)(h[:, -1])
            fire = ~decided & (g >= opts.exit_thresholds[k])
            if forced is not None:
                fire = ~decided & (forced == k)
            any_fire, all_done = torch.stack([fire.any(), (decided | fire).all()]).tolist()
            if any_fire:
                if head.arch != "layer":
                    z = self.head_hidden(k, h, step)
                logits = self.project(k, z)
                self._take(st, fire, logits, k, g)
            st["decided"] = decided | fire
            return bool(all_done)
        cand = None
        if opts.gate_filter is not None and head.arch != "layer":
            # Prefilter: only rows whose gate reaches gate_filter run the exit head at all.
            cand = ~decided & (self.model.gate(k)(h[:, -1]) >= opts.gate_filter)
            if forced is not None:
                cand = ~decided & (forced == k)
            any_cand, all_done = torch.stack([cand.any(), decided.all()]).tolist()
            if not any_cand:
                return bool(all_done)
        z = self.head_hidden(k, h, step)
        passing = cand
        if opts.screen_vocab:
            # Screen: max-prob over the K most frequent tokens first. When the final layer's pick
            # is among them this over-estimates the full max-prob, so a row that fails the screen
            # would have failed the full test; only rows that pass pay the full projection.
            small = self.project(k, z, *self.vocab_rows(k, opts.screen_vocab))
            passing = ~decided & (small.float().softmax(-1).amax(-1) >= opts.exit_thresholds[k])
            if cand is not None:
                passing = passing & cand
            if forced is not None:
                passing = ~decided & (forced == k)
            any_pass, all_done = torch.stack([passing.any(), decided.all()]).tolist()
            if not any_pass:
                return bool(all_done)
        logits = self.project(k, z)
        conf = confidence(logits, opts.confidence)
        take = ~decided & (conf >= opts.exit_thresholds[k])
        if passing is not None:
            take = take & passing
        if forced is not None:
            take = ~decided & (forced == k)
        self._take(st, take, logits, k, conf)
        st["decided"] = decided | take
        return bool(st["decided"].all())

    def _take(self, st: dict, take: torch.Tensor, logits: torch.Tensor, k: int, conf: torch.Tensor) -> None:
        st["logits"] = torch.where(take[:, None], logits.to(st["logits"].dtype), st["logits"])
        st["layer"] = torch.where(take, k, st["layer"])
        st["conf"] = torch.where(take, conf.float(), st["conf"])

    def replay_at(self, index: int) -> int:
        trace = self.replay
        return trace[index] if index < len(trace) else self.L

    def new_step_state(self, index: int, settled: torch.Tensor) -> dict:
        B, V = self.B, self.bb.vocab_size
        return {"decided": settled.clone(), "index": index,
                "logits": torch.zeros(B, V, dtype=self.dtype, device=self.device),
                "layer": torch.full((B,), self.L, dtype=torch.long, device=self.device),
                "conf": torch.full((B,), float("nan"), device=self.device)}

    # prefill and the three step kinds --------------------------------------------------------
    def prefill(self, ids: torch.Tensor, decide_exits: bool, settled: torch.Tensor, draft_fill=()):
        """The prompts through every layer. With `decide_exits`, the first new token's exit
        decision is made on the way (the climb never stops: the prompt must fill every layer).
        `draft_fill`: `layer` exits whose own cache must take the prompt (self-spec drafters)."""
        T = ids.shape[1]
        step = Step(self, T, T, self.like)
        h = self.bb.embed(ids, step.positions)
        st = self.new_step_state(0, settled)
        all_done = False
        for i in range(self.L + 1):
            if i in self.exit_set:
                if decide_exits and not all_done:
                    all_done = self.decide(i, h, step, st)
                elif i in draft_fill or (decide_exits and self.model.head(i).arch == "layer"):
                    self.head_hidden(i, h, step)  # a `layer` exit's own cache takes the prompt
            if i == self.L:
                break
            h = self.layer(i, h, step)
        final = self.final_logits(h[:, -1])
        st["logits"] = torch.where(st["decided"][:, None] & ~settled[:, None], st["logits"], final)
        if not decide_exits:
            st["logits"] = final
        return st

    def full_step(self, tok: torch.Tensor) -> torch.Tensor:
        step = Step(self, self.slot + 1, 1, self.like)
        h = self.bb.embed(tok[:, None], step.positions)
        for i in range(self.L):
            h = self.layer(i, h, step)
        self.slot += 1
        return self.final_logits(h[:, -1])

    def early_exit_step(self, tok: torch.Tensor, index: int, settled: torch.Tensor) -> dict:
        """One token climbs until every unsettled row has decided; see decode.early_exit_step."""
        n_pending = sum(p[1].shape[1] for p in self.pending)
        step = Step(self, self.slot + 1, n_pending + 1, self.like)
        h = self.bb.embed(tok[:, None], step.positions[:, -1:])
        self.slot += 1
        st = self.new_step_state(index, settled)
        waiting, self.pending = self.pending, []
        for i in range(self.L + 1):
            if i in self.exit_set and self.decide(i, h, step, st):
                self.pending = waiting + [(i, h)]
                return st
            if i == self.L:
                break
            j = len(waiting)
            while j > 0 and waiting[j - 1][0] == i:
                j -= 1
            if j < len(waiting):  # KV recomputation: exited tokens climb on with this one
                h = torch.cat([p[1] for p in waiting[j:]] + [h], dim=1)
                waiting = waiting[:j]
            h = self.layer(i, h, step)
        final = self.final_logits(h[:, -1])
        st["logits"] = torch.where(st["decided"][:, None], st["logits"], final.to(st["logits"].dtype))
        return st

    def self_spec_round(self, tok: torch.Tensor, settled: torch.Tensor, d: int, n_draft: int, gen,
                        draft_weight=None, draft_bias=None, draft_ids=None, round_index: int = 0,
                        live: list[bool] | None = None):
        """Draft up to `n_draft` tokens with exit d, verify them with layers d+1..L; returns
        (emitted tokens per row, accepted drafts per row, drafts proposed in total). `live`: the
        host's copy of which rows are unfinished (`~settled`)."""
        from .decode import confidence, sampling_probs
        opts, B, L = self.opts, self.B, self.L
        head = self.model.head(d)
        gate = self.model.gate(d) if self.gate_mode else None
        forced = None
        if self.replay is not None:  # benchmarks: (drafted, accepted) of a recorded round
            forced = self.replay[round_index] if round_index < len(self.replay) else (0, 0)
        slot0 = self.slot
        hs, drafts, q_probs = [], [], []
        proposing = ~settled
        n_prop = torch.zeros(B, dtype=torch.long, device=self.device)
        cur = tok
        for t in range(n_draft + 1):
            step = Step(self, slot0 + t + 1, 1, self.like)
            h = self.bb.embed(cur[:, None], step.positions)
            for i in range(d):
                h = self.layer(i, h, step)
            hs.append(h)
            if t == n_draft:
                if head.arch == "layer":  # its own cache must hold every position that may be accepted
                    self.head_hidden(d, h, step)
                break
            z = self.head_hidden(d, h, step) if head.arch == "layer" else None
            if gate is not None:
                g = gate(h[:, -1])
                proposing = proposing & (g >= opts.exit_thresholds[d])
                if forced is not None:  # the recorded decision replaces the gate's, as with max-prob
                    proposing = ~settled & (t < forced[0])
                if not bool(proposing.any()):
                    break
                if z is None:
                    z = self.head_hidden(d, h, step)
                logits = self.project(d, z, draft_weight, draft_bias)
            else:
                if z is None:
                    z = self.head_hidden(d, h, step)
                logits = self.project(d, z, draft_weight, draft_bias)
                conf = confidence(logits, opts.confidence, self.bb.vocab_size)  # logits may cover the draft vocab
                proposing = proposing & (conf >= opts.exit_thresholds[d])
                if forced is not None:
                    proposing = ~settled & (t < forced[0])
                if not bool(proposing.any()):
                    break
            if opts.temperature == 0:
                nxt = logits.argmax(-1)
                if draft_ids is not None:
                    nxt = draft_ids[nxt]
            else:
                q = sampling_probs(logits, opts)
                if draft_ids is not None:  # back to vocabulary order (0 outside the draft vocabulary)
                    q = torch.zeros(B, self.bb.vocab_size, dtype=q.dtype, device=q.device).scatter_(
                        1, draft_ids.expand(B, -1), q)
                nxt = torch.multinomial(q, 1, generator=gen).squeeze(-1)
                q_probs.append(q)
            n_prop = n_prop + proposing.long()
            drafts.append(nxt)
            cur = nxt
        m = len(drafts)
        # Verify: all m + 1 positions through the layers above d, in one pass.
        h = torch.cat(hs, dim=1)
        step = Step(self, slot0 + m + 1, m + 1, self.like)
        for i in range(d, L):
            h = self.layer(i, h, step)
        final = self.final_logits(h)  # (B, m + 1, V)
        emitted, acc_l, n_prop_l = self.accept(final, final.argmax(-1) if opts.temperature == 0 else None, drafts,
                                                n_prop, q_probs, forced, gen)
        self.keep_slots(slot0, acc_l, settled, live)
        return emitted, acc_l, sum(n_prop_l)


    def accept(self, final, target, drafts: list, n_prop, q_probs: list, forced, gen):
        """A verified round's outcome per row: (emitted tokens, accepted drafts, drafts proposed).
        Greedy (`target`: the full model's argmax at every verified position): the longest prefix
        of drafts equal to it, then its next token, with one host read; sampling: the
        speculative-sampling rule, as in the reference engine."""
        from .decode import sampling_probs, speculative_accept
        opts, B, m = self.opts, self.B, len(drafts)
        if target is not None:
            if m:
                D = torch.stack(drafts, 1)
                ok = (D == target[:, :m]) & (torch.arange(m, device=self.device)[None] < n_prop[:, None])
                if forced is not None:
                    ok = torch.arange(m, device=self.device)[None].expand(B, m) < min(forced[1], m)
                    target = torch.cat([D, target[:, m:]], 1)  # replay: the accepted drafts stand
                acc = ok.long().cumprod(-1).sum(-1)
            else:
                acc = torch.zeros(B, dtype=torch.long, device=self.device)
            flat = torch.cat([acc, target.reshape(-1), n_prop]).tolist()  # the round's one host read
            acc_l, tg, n_prop_l = flat[:B], flat[B:B + B * (m + 1)], flat[B + B * (m + 1):]
            return [tg[b * (m + 1): b * (m + 1) + acc_l[b] + 1] for b in range(B)], acc_l, n_prop_l
        n_prop_l = n_prop.tolist()
        D = [x.tolist() for x in drafts]
        emitted, acc_l = [], []
        for b in range(B):
            mb = n_prop_l[b]
            row = speculative_accept(sampling_probs(final[b], opts), [q[b] for q in q_probs[:mb]],
                                     [D[i][b] for i in range(mb)], gen)
            emitted.append(row)
            acc_l.append(len(row) - 1)
        return emitted, acc_l, n_prop_l

    def keep_slots(self, slot0: int, acc_l: list[int], settled, live) -> None:
        """Cache bookkeeping after a round: each row keeps its slots up to its last accepted draft
        (rejected slots are reused); finished rows keep no new slots (their outputs are unused).
        Rows that kept fewer than the leading row lag `behind[b]` slots."""
        behind = self.behind_host
        if live is None:
            live = (~settled).tolist()
        valid = [slot0 - behind[b] + (acc_l[b] + 1 if live[b] else 0) for b in range(self.B)]
        self.slot = max(valid)
        new_behind = [self.slot - v for v in valid]
        self.set_behind(new_behind)
        self.behind_host = new_behind

    def set_behind(self, behind: list[int]) -> None:
        bt = torch.tensor(behind, device=self.device) if any(behind) else None
        for c in [self.cache, *self.exit_caches.values()]:
            c.n = [self.slot if x > 0 else x for x in c.n]
            c.behind = bt

def run(model, ids: torch.Tensor, pad: list[int], opts, emitter, gen, device, engine_class=None) -> dict:
    """Decode the left-padded prompts `ids` with the lean engine (or `engine_class`, a subclass
    such as graphs.GraphEngine), feeding `emitter` (decode.py's per-row bookkeeping). Returns
    engine statistics."""
    from .decode import choose
    B, T = ids.shape
    bb = model.backbone
    L = bb.num_layers
    auto = opts.draft_exit == "auto"
    draft_exit = None if auto else (opts.draft_exit or max(model.exit_layers))
    # A batch row may accept up to draft_len tokens past its own need (the round drafts for the
    # neediest row) and lead the uniform slot count by that much while others catch up.
    capacity = T + opts.max_new_tokens + 2 * opts.draft_len + 4
    eng = (engine_class or Engine)(model, opts, B, T, pad, device, capacity)
    eng.replay = opts.replay
    stats = {"drafted": 0, "accepted": 0, "rounds": 0, "policy": None, "round_log": []}
    record = opts.record_logits
    done = emitter.done

    if opts.mode == "early-exit":
        st = eng.prefill(ids, True, done)
    else:
        fill = set()
        if opts.mode == "self-spec":
            cands = policy_candidates(model) if auto else [draft_exit]
            fill = {k for k in cands if model.head(k).arch == "layer"}
        st = eng.prefill(ids, False, done, draft_fill=fill)
    eng.passes = 0  # count the decoding phase only
    tok = choose(st["logits"], opts, gen)
    if record:
        emitter.step_logits.append((0, st["layer"].clone(), st["logits"].clone()))
    emitter.emit_step(tok, st["layer"], st["conf"])

    if opts.mode == "self-spec":
        draft_weight = draft_bias = draft_ids = None
        if opts.draft_vocab:
            draft_ids = model.vocab_by_frequency[:opts.draft_vocab]
        policy = None
        if auto:
            policy = DraftPolicy(model, measure_costs(model, opts), opts.draft_len, opts.draft_vocab, opts.verbose)
            stats["policy"] = policy
        rnd = 0
        while not emitter.all_done():
            left = emitter.max_remaining()
            if policy is not None:
                d, n = policy.choose(left - 1)
            else:
                d, n = draft_exit, min(opts.draft_len, left - 1)
            if draft_ids is not None:
                draft_weight, draft_bias = eng.vocab_rows(d, opts.draft_vocab)
            live = emitter.live()
            t_round = time.perf_counter()
            emitted, acc, proposed = eng.self_spec_round(tok, done.clone(), d, n, gen, draft_weight, draft_bias,
                                                         draft_ids, rnd, live)
            rnd += 1
            stats["rounds"] += 1
            stats["drafted"] += proposed
            accepted = sum(a for b, a in enumerate(acc) if live[b])
            stats["accepted"] += accepted
            stats["round_log"].append((proposed, accepted))
            if policy is not None:  # the round's host read has synchronised: the clock is honest
                policy.observe(d, accepted, proposed, n, time.perf_counter() - t_round)
            tok = emitter.emit_round(emitted, d, L)
        if policy is not None and opts.verbose:
            print(policy.describe(), file=sys.stderr)
    else:
        index = 1
        while not emitter.all_done():
            if opts.mode == "full":
                logits = eng.full_step(tok)
                layer = torch.full((B,), L, device=device)
                conf = torch.full((B,), float("nan"), device=device)
            else:
                st = eng.early_exit_step(tok, index, done.clone())
                logits, layer, conf = st["logits"], st["layer"], st["conf"]
            tok = choose(logits, opts, gen)
            if record:
                emitter.step_logits.append((index, layer.clone(), logits.clone()))
            emitter.emit_step(tok, layer, conf)
            index += 1
    stats["layer_token_passes"] = eng.passes
    return stats

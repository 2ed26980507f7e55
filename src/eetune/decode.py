"""The decoding engine: full, early-exit (with KV recomputation) and self-speculative decoding.

Plain functions over an `EarlyExitModel` and a per-layer `LayerCache` (layers may hold different
numbers of slots), in the spirit of gpt-fast:

- `prefill`: the prompt through every layer (and through `layer` exits, to fill their caches).
- `early_exit_step`: one new token climbs the trunk; at each exit its confidence (max-prob,
  margin or entropy) is compared with that exit's threshold (one for all exits, per exit, or the
  calibrated default: `resolve_thresholds`) and the first confident exit emits it. The
  token then stops: the layers above hold no keys/values for its position. Those are filled by
  **KV recomputation**: pending tokens wait, each with its hidden state at the depth where it
  stopped, and join the next token that climbs past that depth, in one batched pass. Because
  the trunk's hidden states depend only on the tokens (never on exit decisions), every logit
  equals that of a cache-free pass over the whole sequence.
- `full_step`: the baseline, every layer, no heads.
- `self_spec_round`: the draft exit proposes up to `draft_len` tokens (stopping when its
  confidence falls below the threshold), the layers above it verify all of them in one pass
  reusing the drafted tokens' shallow keys/values, the longest agreeing prefix is kept plus the
  model's own next token. Greedy: identical to `full`. Sampling: the speculative-sampling
  acceptance rule (accept with min(1, p/q), else resample from max(0, p - q)), so the output
  follows the full model's distribution.

Batches of prompts of different lengths are left-padded; padding slots carry position -1 and
are masked. `generate()` is the entry point; it returns token ids, text and per-token
statistics (exit layer, confidence, drafted/accepted counts).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .backbone import LayerCache
from .errors import EETuneError

MODES = ("full", "early-exit", "self-spec")
CONFIDENCES = ("max-prob", "margin", "entropy", "gate")
ENGINES = ("auto", "lean", "graphs", "reference")


@dataclass
class DecodeOptions:
    """How to decode. Each field's comment is also its `eetune generate --help` text (eetune.flags)."""
    mode: str = "full"  # decoding mode: full depth, lossy early exit by confidence, or lossless self-speculation
    max_new_tokens: int = 128  # tokens to generate per prompt (at most)
    threshold: float | None = None  # exit (early-exit) or keep drafting (self-spec) when confidence >= this; > 1
    #                                 never exits early. Default: in early-exit mode the threshold(s) `eetune
    #                                 calibrate` stored in the exits directory for this --confidence, else 0.9
    #                                 (resolved by decode.resolve_thresholds)
    confidence: str = "max-prob"  # confidence measure: max-prob (the paper), margin (top1 - top2), entropy
    #                               (1 - H/log V), or gate: the exits' learned gates (`tune --gates`), which skip
    #                               an exit's head unless it fires
    draft_len: int = 4  # self-spec: most tokens drafted per round
    draft_exit: int | str | None = None  # self-spec: the exit layer that drafts (default: the deepest), or auto (a
    #                                      cost model picks the exit and draft length per round)
    draft_vocab: int | None = None  # self-spec: draft over the K most frequent tokens of the tuning data only
    #                                 (still lossless)
    screen_vocab: int | None = None  # early-exit, max-prob: take each exit's max-prob over the K most frequent
    #                                  tuning tokens first and run the full vocabulary projection only if that
    #                                  reaches the threshold
    gate_filter: float | None = None  # early-exit, max-prob: run an exit's head only where its gate (`tune
    #                                   --gates`) reaches T
    engine: str = "auto"  # decoding engine: auto (graphs on a GPU, lean elsewhere and with --draft-exit auto), lean
    #                       (eetune.engine), graphs (eetune.graphs: static caches and CUDA graphs per segment
    #                       between exits; on a CPU the same code runs unrecorded) or the slow, obvious reference
    compile: bool = False  # graphs engine: fuse each recorded segment's kernels with torch.compile first (the first
    #                        call of each segment compiles it: seconds to minutes)
    verbose: bool = False  # print the --draft-exit auto cost model's figures
    replay: tuple | None = None  # benchmarks only: forced exit layer per token (early-exit) or
    #                              (drafted, accepted) per round (self-spec), for engine timing
    temperature: float = 0.0  # 0: greedy; > 0: sampling at this temperature
    top_k: int = 0  # sampling: keep the k most likely tokens (0: all)
    top_p: float = 1.0  # sampling: nucleus mass
    seed: int | None = None  # sampling seed (reproducible output)
    eos_token_ids: tuple[int, ...] = ()  # generation of a row stops after one of these
    record_logits: bool = False  # keep the logits used at every step (tests, analysis)
    exit_thresholds: dict | None = None  # a threshold per exit layer instead of one --threshold, e.g. 10:0.95,20:0.9
    #                                      (as `eetune calibrate --per-exit` finds them; from Python {10: 0.95, 20: 0.9})

    # Values a string setting may take (also the flags' choices).
    CHOICES = {"mode": MODES, "confidence": CONFIDENCES, "engine": ENGINES}

    def validate(self, model) -> None:
        if self.mode not in MODES:
            raise EETuneError(f"unknown mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.confidence not in CONFIDENCES:
            raise EETuneError(f"unknown confidence {self.confidence!r}: use one of {', '.join(CONFIDENCES)}")
        if self.threshold is not None and not _valid_threshold(self.threshold):
            raise EETuneError(f"threshold {self.threshold} is outside [0, inf): give e.g. 0.9 (> 1 never exits early)")
        if self.exit_thresholds is not None:
            if self.threshold is not None:
                raise EETuneError("give either a threshold or per-exit thresholds (exit_thresholds), not both")
            try:
                keys = {int(k) for k in self.exit_thresholds} if isinstance(self.exit_thresholds, dict) else None
            except (TypeError, ValueError):
                keys = None
            if keys != set(model.exit_layers) or len(self.exit_thresholds) != len(keys):
                raise EETuneError(f"exit_thresholds must give a threshold for each exit layer "
                                  f"{list(model.exit_layers)}, e.g. {{{model.exit_layers[0]}: 0.9, ...}}")
            bad = {k: t for k, t in self.exit_thresholds.items() if not _valid_threshold(t)}
            if bad:
                raise EETuneError(f"exit thresholds {bad} are outside [0, inf): give e.g. 0.9 (> 1 never exits early)")
        if self.max_new_tokens < 1:
            raise EETuneError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.draft_len < 1:
            raise EETuneError(f"--draft-len must be at least 1 (got {self.draft_len})")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise EETuneError("sampling options out of range: temperature >= 0, 0 < top-p <= 1, top-k >= 0")
        if self.draft_exit is not None and self.draft_exit != "auto" and self.draft_exit not in model.exit_layers:
            raise EETuneError(f"draft exit {self.draft_exit!r} is not one of the exits {list(model.exit_layers)}: "
                              f"give one of them or 'auto'")
        if self.engine not in ENGINES:
            raise EETuneError(f"unknown engine {self.engine!r}: use one of {', '.join(ENGINES)}")
        if self.compile and self.engine not in ("graphs", "auto"):
            raise EETuneError("--compile works with --engine graphs only")
        if self.compile and self.draft_exit == "auto":
            raise EETuneError("--compile needs the graphs engine; --draft-exit auto runs the lean engine: give one")
        if self.draft_exit == "auto" and self.engine not in ("lean", "auto"):
            raise EETuneError("--draft-exit auto needs the lean engine (its cost model times the lean engine)")
        if self.confidence == "gate" and not model.has_gates:
            raise EETuneError("--confidence gate: these exits have no gates; train them with `eetune tune DIR "
                              "--out OUT --gates-only`, or use --confidence max-prob")
        if self.gate_filter is not None:
            if not (isinstance(self.gate_filter, (int, float)) and self.gate_filter >= 0
                    and not math.isnan(self.gate_filter)):
                raise EETuneError(f"--gate-filter {self.gate_filter} is outside [0, inf): give e.g. 0.5")
            if self.confidence != "max-prob":
                raise EETuneError(f"--gate-filter works with --confidence max-prob only (got {self.confidence})")
            if not model.has_gates:
                raise EETuneError("--gate-filter: these exits have no gates; train them with `eetune tune DIR "
                                  "--out OUT --gates-only`")
            if model.config.arch == "layer":
                raise EETuneError("--gate-filter cannot skip a `layer` exit (its block must fill its own cache)")
        if self.screen_vocab is not None and self.confidence != "max-prob":
            raise EETuneError(f"--screen-vocab works with --confidence max-prob only (got {self.confidence})")
        for flag, k in (("--draft-vocab", self.draft_vocab), ("--screen-vocab", self.screen_vocab)):
            if k is None:
                continue
            V = model.backbone.vocab_size
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
                raise EETuneError(f"{flag} {k} is outside 1..{V} (the vocabulary size): "
                                  f"give e.g. 4096, or leave it out to use the whole vocabulary")
            if model.vocab_by_frequency is None:
                raise EETuneError(f"{flag} needs the token frequencies of the tuning data, which these exits "
                                  "do not record: re-run `eetune tune` (or `eetune tune DIR --out OUT --gates-only`)")


DEFAULT_THRESHOLD = 0.9  # the threshold when none is given and no calibration applies


def _valid_threshold(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 and not math.isnan(t)


def resolve_thresholds(opts: DecodeOptions, model) -> tuple[DecodeOptions, str]:
    """The one place where a decode's exit thresholds are decided (`generate` calls it for both
    engines, which then read `exit_thresholds[k]` only). In order:

    1. `threshold` given: it, at every exit ("given");
    2. `exit_thresholds` given: those ("given");
    3. early-exit mode and the exits directory holds an `eetune calibrate` result for this
       `confidence`, measured on these heads (and gates): its threshold(s) ("calibrated"; a
       calibration of other heads, e.g. carried over by `eetune tune --out`, is not used);
    4. otherwise DEFAULT_THRESHOLD (0.9) at every exit ("default").

    Self-speculation never takes a calibrated threshold (its output does not depend on it; the
    calibration trades agreement for speed in early-exit only). Returns a copy of `opts` whose
    `exit_thresholds` holds every exit's threshold (and `threshold` None), and where they came
    from."""
    import dataclasses

    layers = model.exit_layers
    if opts.threshold is not None:
        chosen, source = {k: float(opts.threshold) for k in layers}, "given"
    elif opts.exit_thresholds is not None:
        chosen, source = {int(k): float(t) for k, t in opts.exit_thresholds.items()}, "given"
    else:
        chosen, source = None, "default"
        if opts.mode == "early-exit":
            from .calibrate import calibrated_thresholds
            chosen, source = calibrated_thresholds(model, opts.confidence)
        if chosen is None:
            chosen = {k: DEFAULT_THRESHOLD for k in layers}
    return dataclasses.replace(opts, threshold=None, exit_thresholds=chosen), source


@dataclass
class TokenStat:
    token: int
    exit_layer: int  # layer whose head produced it (num_layers for the full model)
    confidence: float  # confidence at that exit (nan for `full`)
    drafted: bool = False  # self-spec: token was a draft that verification accepted


@dataclass
class RowResult:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    tokens: list[TokenStat] = field(default_factory=list)
    text: str | None = None
    finished_by: str = "length"  # length | eos | stop


@dataclass
class Generation:
    rows: list[RowResult]
    mode: str
    seconds: float
    num_layers: int
    layer_token_passes: int = 0  # sum over layer calls of tokens processed (incl. recomputation, verification)
    drafted: int = 0  # self-spec: tokens proposed
    accepted: int = 0  # self-spec: proposals accepted
    rounds: int = 0  # self-spec: draft/verify rounds
    step_logits: list = field(default_factory=list)  # record_logits: (step, exit layer per row, logits (B, V))
    policy: object = None  # draft_exit="auto": the engine.DraftPolicy with its measured costs and acceptance
    round_log: list = field(default_factory=list)  # self-spec, lean engine: (drafted, accepted) per round
    thresholds: dict = field(default_factory=dict)  # the threshold used at each exit layer (resolve_thresholds)
    engine: str = ""  # the engine that ran (resolve_engine)
    threshold_source: str = ""  # given | calibrated | default (with why, when a stored calibration was not used)

    @property
    def new_tokens(self) -> int:
        return sum(len(r.ids) for r in self.rows)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def mean_layers_per_token(self) -> float:
        """Mean depth at which generated tokens were produced (num_layers for `full`)."""
        n = self.new_tokens
        return sum(t.exit_layer for r in self.rows for t in r.tokens) / n if n else float("nan")

    @property
    def layer_passes_per_token(self) -> float:
        """Decoder-layer token passes per generated token, recomputation and verification included."""
        return self.layer_token_passes / self.new_tokens if self.new_tokens else float("nan")

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    def summary(self) -> dict:
        return {"mode": self.mode, "new_tokens": self.new_tokens, "seconds": round(self.seconds, 4),
                "tokens_per_s": round(self.tokens_per_s, 3), "mean_layers_per_token": self.mean_layers_per_token,
                "layer_passes_per_token": self.layer_passes_per_token, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": self.acceptance_rate, "rounds": self.rounds, "num_layers": self.num_layers,
                "thresholds": {str(k): t for k, t in self.thresholds.items()},
                "threshold_source": self.threshold_source}


# --- confidence and token choice ------------------------------------------------------------
def confidence(logits: torch.Tensor, kind: str, vocab_size: int | None = None) -> torch.Tensor:
    """Per-row confidence in [0, 1] of a (B, V) logits tensor. `vocab_size`: the whole vocabulary's
    size when `logits` cover a restricted one (entropy is normalised by log of the whole
    vocabulary, as for logits masked to -inf outside the restriction)."""
    probs = logits.float().softmax(-1)
    if kind == "max-prob":
        return probs.amax(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    return 1.0 - ent / math.log(vocab_size or probs.shape[-1])


def sampling_probs(logits: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p."""
    x = logits.float() / opts.temperature
    if opts.top_k:
        kth = x.topk(min(opts.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if opts.top_p < 1.0:
        sorted_p, idx = probs.sort(-1, descending=True)
        cum = sorted_p.cumsum(-1)
        drop = (cum - sorted_p) >= opts.top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def choose(logits: torch.Tensor, opts: DecodeOptions, gen: torch.Generator | None) -> torch.Tensor:
    if opts.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, opts), 1, generator=gen).squeeze(-1)


def speculative_accept(p: torch.Tensor, q: list[torch.Tensor], drafts: list[int],
                       gen: torch.Generator | None) -> list[int]:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) for one row.

    `p` (m + 1, V): the full model's distributions after each verified position; `q[i]` (V,):
    the draft distribution draft i was sampled from. Draft i is kept with probability
    min(1, p_i(x)/q_i(x)); at the first rejection a token is drawn from max(0, p_i - q_i)
    (renormalised); if all are kept, one more is drawn from p_m. The emitted tokens are then
    distributed exactly as if drawn from p one at a time. Returns accepted drafts + 1 token.
    """
    out = []
    for i, tok in enumerate(drafts):
        r = torch.rand((), generator=gen, device=p.device)
        if r < torch.clamp(p[i, tok] / q[i][tok], max=1.0):
            out.append(tok)
            continue
        resid = (p[i] - q[i]).clamp_min(0)
        total = resid.sum()
        dist = resid / total if total > 0 else p[i]
        out.append(int(torch.multinomial(dist, 1, generator=gen)))
        return out
    out.append(int(torch.multinomial(p[len(drafts)], 1, generator=gen)))
    return out


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
        """Logits of exit `layer` for the last position of `h` (a `layer` exit first runs its
        block over every position of `h`, filling its own cache)."""
        head = self.model.head(layer)
        if head.arch == "layer":
            z = head.transform(h, ctx, self.exit_caches[layer])
            return self.bb.logits(z[:, -1], head.out_weight())
        return head(h[:, -1])

    def final_logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.bb.logits(self.bb.final_norm(h))


def prefill(state: DecodeState, ids: torch.Tensor, positions: torch.Tensor, exits_wanted=(), opts=None):
    """Run the (left-padded) prompts through every layer. Returns the full-depth logits of the
    last position and each wanted exit's logits and confidence there, {layer: ((B, V), (B,))}
    (evaluating a `layer` exit also fills its own cache over the prompt)."""
    bb = state.bb
    h = bb.embed(ids, positions)
    ctx = bb.context(h, positions)
    exits = {}
    for i in range(bb.num_layers + 1):
        if i in exits_wanted:
            logits = state.exit_logits(i, h, ctx)
            exits[i] = (logits, None if opts is None else exit_confidence(state, i, h, logits, opts))
        if i == bb.num_layers:
            break
        h = state.run_layer(i, h, ctx)
    state.next_pos = positions[:, -1] + 1
    return state.final_logits(h[:, -1]), exits


def exit_confidence(state: DecodeState, layer: int, h: torch.Tensor, logits: torch.Tensor, opts) -> torch.Tensor:
    """Confidence of exit `layer` at the last position: its gate's probability on the exit's
    input hidden state (`gate`), else a function of its logits."""
    if opts.confidence == "gate":
        return state.model.gate(layer)(h[:, -1])
    conf = confidence(logits, opts.confidence)
    if opts.gate_filter is not None and opts.mode == "early-exit":  # the gate prefilter must pass too
        conf = conf.masked_fill(state.model.gate(layer)(h[:, -1]) < opts.gate_filter, -1.0)
    if opts.screen_vocab and opts.mode == "early-exit":  # the screen must pass too: max-prob over the K most frequent tokens
        keep = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        keep[state.model.vocab_by_frequency[:opts.screen_vocab]] = True
        screened = confidence(logits.masked_fill(~keep, float("-inf")), "max-prob")
        conf = torch.minimum(conf, screened)
    return conf


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
            logits = state.exit_logits(i, h, ctx)
            conf = exit_confidence(state, i, h, logits, opts)
            take = ~decided & (conf >= opts.exit_thresholds[i])
            out_logits[take], out_layer[take], out_conf[take] = logits[take], i, conf[take]
            decided |= take
            if bool(decided.all()):
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


def self_spec_round(state: DecodeState, tokens: torch.Tensor, opts: DecodeOptions, settled: torch.Tensor,
                    gen: torch.Generator | None, n_draft: int | None = None):
    """Draft with the draft exit, verify with the layers above it.

    `tokens` (B,) is each row's newest token, not yet seen by any layer. At most `n_draft`
    (default `opts.draft_len`) tokens are drafted. With `opts.draft_vocab` the draft exit's
    logits outside the K most frequent tuning tokens are masked out. Returns, per row, the
    list of emitted tokens (accepted drafts, then the model's own token) and how many of them
    were accepted drafts. Rejected drafts' slots are invalidated in every cache.
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
        logits = state.exit_logits(d, h, ctx)
        if keep is not None:
            logits = logits.masked_fill(~keep, float("-inf"))
        proposing = proposing & (exit_confidence(state, d, h, logits, opts) >= opts.exit_thresholds[d])
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
def _left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long, device=device)
    pos = torch.full((len(prompts), T), -1, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long, device=device)
        pos[b, T - len(p):] = torch.arange(len(p), device=device)
    return ids, pos


class Emitter:
    """Per-row bookkeeping shared by both engines: appends emitted tokens and their statistics,
    stops a row at EOS, at `max_new_tokens`, or when the streaming callback says so."""

    def __init__(self, prompts, opts: DecodeOptions, device, on_tokens=None):
        self.rows = [RowResult(prompt_ids=list(p)) for p in prompts]
        self.done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self._done = [False] * len(prompts)  # host copy: the engines read it without a sync
        self.eos = set(opts.eos_token_ids)
        self.max_new = opts.max_new_tokens
        self.on_tokens = on_tokens
        self.step_logits: list = []

    def _finish(self, b: int, why: str | None = None) -> None:
        if why:
            self.rows[b].finished_by = why
        self._done[b] = True
        self.done[b] = True

    def emit(self, b: int, toks: list[int], stats: list[TokenStat]) -> None:
        if self._done[b]:
            return
        r = self.rows[b]
        out, out_stats = [], []
        for tok, st in zip(toks, stats):
            r.ids.append(tok)
            r.tokens.append(st)
            out.append(tok)
            out_stats.append(st)
            if tok in self.eos:
                self._finish(b, "eos")
                break
            if len(r.ids) >= self.max_new:
                self._finish(b)
                break
        if self.on_tokens is not None and out:
            if self.on_tokens(b, out, out_stats) is False:  # the caller (stop strings) ends this row
                self._finish(b, "stop")

    def emit_step(self, tok: torch.Tensor, layer: torch.Tensor, conf: torch.Tensor) -> None:
        """One token per row (one host read for all three)."""
        B = tok.shape[0]
        flat = torch.cat([tok.double(), layer.double(), conf.double()]).tolist()
        for b in range(B):
            t = int(flat[b])
            self.emit(b, [t], [TokenStat(t, int(flat[B + b]), flat[2 * B + b])])

    def emit_round(self, emitted: list[list[int]], draft_exit: int, num_layers: int) -> torch.Tensor:
        """A self-spec round's tokens per row (accepted drafts, then the model's own token);
        returns each row's newest token, the next round's input."""
        for b, toks in enumerate(emitted):
            stats = [TokenStat(t, draft_exit, float("nan"), drafted=True) for t in toks[:-1]]
            stats.append(TokenStat(toks[-1], num_layers, float("nan")))
            self.emit(b, toks, stats)
        return torch.tensor([row[-1] for row in emitted], device=self.done.device)

    def all_done(self) -> bool:
        return all(self._done)

    def live(self) -> list[bool]:
        return [not d for d in self._done]

    def max_remaining(self) -> int:
        """Most tokens any unfinished row still needs."""
        return max((self.max_new - len(r.ids) for r, d in zip(self.rows, self._done) if not d), default=0)


def resolve_engine(opts: DecodeOptions, device) -> str:
    """The engine `opts.engine` names; `auto`: the graph engine on a GPU (or when --compile asks
    for it), the lean engine elsewhere and for --draft-exit auto (whose cost model times it)."""
    if opts.engine != "auto":
        return opts.engine
    if opts.draft_exit == "auto":
        return "lean"
    return "graphs" if torch.device(device).type == "cuda" or opts.compile else "lean"


@torch.no_grad()
def generate(model, prompts: list[list[int]], opts: DecodeOptions, on_tokens=None) -> Generation:
    """Decode every prompt (lists of token ids) with `opts`; `on_tokens(row, tokens, stats)` is
    called as tokens are emitted (streaming; returning False ends that row). Runs the lean
    engine (`engine.py`), the graph engine (`graphs.py`) or the reference engine as `opts.engine`
    says (`auto`: see `resolve_engine`). Returns a `Generation` with ids and statistics."""
    opts.validate(model)
    opts, threshold_source = resolve_thresholds(opts, model)
    if not prompts or any(len(p) == 0 for p in prompts):
        raise EETuneError("empty prompt: give at least one token of text")
    bb = model.backbone
    limit = getattr(bb.config, "max_position_embeddings", None) or getattr(bb.config, "n_positions", None)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + opts.max_new_tokens > limit:
        raise EETuneError(f"prompt of {longest} tokens + {opts.max_new_tokens} new tokens exceeds the model's context "
                          f"of {limit}: shorten the prompt or lower --max-new-tokens")
    device = next(bb.model.parameters()).device
    L = bb.num_layers
    gen = None
    if opts.temperature > 0:
        gen = torch.Generator(device=device)
        if opts.seed is not None:
            gen.manual_seed(opts.seed)
        else:
            gen.seed()  # a fresh nondeterministic seed for this generator only; the global RNG is untouched
    emitter = Emitter(prompts, opts, device, on_tokens)
    result = Generation(rows=emitter.rows, mode=opts.mode, seconds=0.0, num_layers=L,
                        thresholds=dict(opts.exit_thresholds), threshold_source=threshold_source)
    if opts.draft_exit == "auto":  # the policy's costs: measured once per loaded model, outside the timing
        from .engine import measure_costs
        measure_costs(model, opts)
    t0 = time.perf_counter()
    ids, pos = _left_pad(prompts, 0, device)
    result.engine = name = resolve_engine(opts, device)
    if name in ("lean", "graphs"):
        from . import engine
        engine_class = None
        if name == "graphs":
            from .graphs import GraphEngine as engine_class
        pad = [ids.shape[1] - len(p) for p in prompts]
        stats = engine.run(model, ids, pad, opts, emitter, gen, device, engine_class)
        result.rounds, result.drafted, result.accepted = stats["rounds"], stats["drafted"], stats["accepted"]
        result.layer_token_passes = stats["layer_token_passes"]
        result.policy = stats["policy"]
        result.round_log = stats["round_log"]
    else:
        _reference_loop(model, ids, pos, opts, emitter, gen, device, result)
    result.seconds = time.perf_counter() - t0
    result.step_logits = emitter.step_logits
    return result


def _reference_loop(model, ids, pos, opts, emitter, gen, device, result) -> None:
    """The reference engine's decoding loop (this module's functions, one step at a time)."""
    bb = model.backbone
    B, L = ids.shape[0], bb.num_layers
    draft_exit = opts.draft_exit or max(model.exit_layers)
    done = emitter.done
    state = DecodeState(model, B, device)
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
            lg, c = exits[k]
            take = ~decided & (c >= opts.exit_thresholds[k])
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
        else:
            n_draft = min(opts.draft_len, emitter.max_remaining() - 1)  # never draft past what is asked
            emitted, n_acc, m, proposed = self_spec_round(state, tok, opts, done, gen, n_draft)
            result.rounds += 1
            result.drafted += proposed
            result.accepted += sum(a for a, live in zip(n_acc, emitter.live()) if live)
            tok = emitter.emit_round(emitted, draft_exit, L)
        step += 1
    result.layer_token_passes = state.layer_token_passes


def end_token_ids(model, tokenizer) -> tuple[int, ...]:
    """Every token id that ends a generation: the model config's EOS id(s) and the tokenizer's."""
    eos = set()
    for src in (getattr(model.backbone.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            eos.add(src)
        elif isinstance(src, (list, tuple)):
            eos.update(src)
    return tuple(sorted(eos))


def chat_prompt_ids(tokenizer, text: str) -> list[int]:
    """Token ids of one user turn through the tokenizer's chat template, ready for the reply."""
    x = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    return list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x)


def generate_text(model, tokenizer, prompts: list[str], opts: DecodeOptions, chat: bool = False,
                  stop: tuple[str, ...] = (), on_text=None) -> Generation:
    """Text in, text out: tokenise (optionally through the chat template), decode, cut at stop
    strings. `on_text(row, piece, stat)` streams each row's text, one token's piece at a time."""
    if not prompts or any(not p.strip() for p in prompts):
        raise EETuneError("empty prompt: give some text")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise EETuneError("--chat needs a tokenizer with a chat template; this model has none: drop --chat")
        ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    else:
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    if not opts.eos_token_ids:
        opts = DecodeOptions(**{**opts.__dict__, "eos_token_ids": end_token_ids(model, tokenizer)})
    streams = [TextStream(tokenizer, stop) for _ in prompts]

    def on_tokens(b, toks, stats):
        for tok, st in zip(toks, stats):
            piece, stopped = streams[b].push(tok)
            if on_text is not None and piece:
                on_text(b, piece, st)
            if stopped:
                return False
        return True

    result = generate(model, ids, opts, on_tokens=on_tokens)
    for b, r in enumerate(result.rows):
        if r.finished_by == "stop":
            r.text = streams[b].shown
        else:
            r.text = tokenizer.decode(r.ids, skip_special_tokens=True)
            rest = streams[b].finish(r.text)  # a held-back incomplete character, if any
            if on_text is not None and rest and r.tokens:
                on_text(b, rest, r.tokens[-1])
    return result


class TextStream:
    """Turns one row's tokens into text pieces as they come. The text so far is decoded whole
    (tokens do not map one to one onto characters) and cut at the first stop string; a trailing
    U+FFFD (a multi-byte character whose remaining bytes are in the next token) and a tail that
    could begin a stop string are held back until settled, so the pieces add up to the
    returned text."""

    def __init__(self, tokenizer, stop=()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.shown = ""

    def push(self, tok: int) -> tuple[str, bool]:
        """Add a token; returns (new text to show, whether a stop string was reached)."""
        self.ids.append(tok)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.stop if s in text), default=-1)
        if cut >= 0:
            text = text[:cut]
        else:
            text = text.rstrip("\ufffd")  # incomplete character: wait for its next token
            hold = 0  # a tail that may be the start of a stop string: wait too
            for s in self.stop:
                hold = max([hold] + [k for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])])
            text = text[:len(text) - hold]
        piece = text[len(self.shown):] if text.startswith(self.shown) else ""
        if text.startswith(self.shown) or cut >= 0:
            self.shown = text
        return piece, cut >= 0

    def finish(self, final: str) -> str:
        """The part of the final text not shown yet."""
        rest = final[len(self.shown):] if final.startswith(self.shown) else ""
        self.shown = final
        return rest


def custom_generate_fn(model, options: dict):
    """Build the `custom_generate` callable behind `EarlyExitModel.as_custom_generate`."""

    def decoding_loop(hf_model, input_ids, logits_processor=None, stopping_criteria=None,
                      generation_config=None, **model_kwargs):
        if hf_model is not model.backbone.model:
            raise EETuneError("custom_generate was built for another model: call the backbone's own generate()")
        gc = generation_config
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            prompts = [row.tolist() for row in input_ids]
        else:
            prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        eos = gc.eos_token_id
        eos = () if eos is None else ((eos,) if isinstance(eos, int) else tuple(int(e) for e in eos))
        opts = dict(options)
        opts.setdefault("max_new_tokens", gc.max_new_tokens or 20)
        if gc.do_sample:
            opts.setdefault("temperature", gc.temperature or 1.0)
            opts.setdefault("top_k", gc.top_k or 0)
            opts.setdefault("top_p", gc.top_p or 1.0)
        opts.setdefault("eos_token_ids", eos)
        result = generate(model, prompts, DecodeOptions(**opts))
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
        width = max(len(r.ids) for r in result.rows)
        new = torch.full((len(prompts), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for b, r in enumerate(result.rows):
            new[b, :len(r.ids)] = torch.tensor(r.ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)

    return decoding_loop

"""The generate API: options, thresholds, per-row bookkeeping, text in and out, streaming, and
Hugging Face `custom_generate`. The engine that runs the layers is `eetune.decode.engine`; the
decision rules are `eetune.decode.rules`.

- `DecodeOptions`: mode (`full`, `early-exit`, `self-spec`), thresholds, confidence (max-prob or
  the exits' gates), draft length, draft exit (or `auto`), draft vocabulary, sampling.
  `resolve_thresholds` decides a decode's exit thresholds (given, calibrated or default).
- `generate(model, prompts, opts)`: token ids in; left-pads the prompts, runs the engine, and
  returns a `Generation` with ids and per-token statistics (exit layer, confidence,
  drafted/accepted). Text prompts with `tokenizer=` (and `DecodeOptions` fields as keywords)
  go through `generate_text`: stop strings, streaming (`TextStream`), the chat template on
  request.
- `custom_generate(model, **options)`: a callable for the backbone's own HF `generate(...,
  custom_generate=...)`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from eetune.decode.engine import run as engine_run
from eetune.decode.policy import DraftPolicy, measure_costs, policy_candidates
from eetune.decode.rules import CONFIDENCES
from eetune.errors import EETuneError
from eetune.model.early_exit import calibrated_thresholds, eval_mode

MODES = ("full", "early-exit", "self-spec")


@dataclass
class DecodeOptions:
    """How to decode. Each field's comment is also its `eetune generate --help` text (eetune.flags)."""
    mode: str = "full"  # decoding mode: full depth, lossy early exit by confidence, or lossless self-speculation
    max_new_tokens: int = 128  # tokens to generate per prompt (at most)
    threshold: float | None = None  # exit (early-exit) or keep drafting (self-spec) when confidence >= this; > 1
    #                                 never exits early. Default: in early-exit mode the threshold(s) `eetune
    #                                 calibrate` stored in the exits directory for this --confidence, else 0.9
    confidence: str = "max-prob"  # confidence measure: max-prob (the paper: the exit's top softmax probability),
    #                               or gate: the exits' learned gates (`tune --gates`), which skip an exit's head
    #                               unless it fires
    draft_len: int = 4  # self-spec: most tokens drafted per round
    draft_exit: int | str | None = None  # self-spec: the exit layer that drafts (default: the deepest), or auto (a
    #                                      cost model picks the exit and draft length per round)
    draft_vocab: int | None = None  # self-spec: draft over the K most frequent tokens of the tuning data only
    #                                 (still lossless)
    draft_context: bool = False  # self-spec with a restricted-vocabulary draft exit (--exit-vocab): it may also
    #                              propose the prompts' tokens outside its K (their LM-head rows: the names and rare
    #                              words that summaries and answers copy); still lossless
    compile: bool = False  # fuse each segment with torch.compile before recording it (a GPU; the first call of each
    #                        segment compiles it: seconds to minutes)
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
    CHOICES = {"mode": MODES, "confidence": CONFIDENCES}

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
        if self.confidence == "gate" and not model.has_gates:
            raise EETuneError("--confidence gate: these exits have no gates; train them with `eetune tune DIR "
                              "--out OUT --gates-only`, or use --confidence max-prob")
        if self.draft_context and self.mode == "self-spec" and \
                not any(h.has_other for h in _draft_heads(model, self.draft_exit)):
            raise EETuneError("--draft-context adds the prompts' tokens to a restricted draft vocabulary, and this "
                              "draft exit projects onto the whole vocabulary: drop it, or convert with --exit-vocab K")
        for flag, k in (("--draft-vocab", self.draft_vocab),):
            if k is None:
                continue
            V = model.backbone.vocab_size
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= V:
                raise EETuneError(f"{flag} {k} is outside 1..{V} (the vocabulary size): "
                                  f"give e.g. 4096, or leave it out to use the whole vocabulary")
            restricted = [h for h in _draft_heads(model, self.draft_exit) if h.restricted]
            if restricted:
                raise EETuneError(f"{flag} {k}: the draft exit's head is already restricted to "
                                  f"{restricted[0].vocab_ids.numel()} tokens (the exits' --exit-vocab): drop {flag}")
            if model.vocab_by_frequency is None:
                raise EETuneError(f"{flag} needs the token frequencies of the tuning data, which these exits "
                                  "do not record: re-run `eetune tune` (or `eetune tune DIR --out OUT --gates-only`)")


def _draft_heads(model, draft_exit) -> list:
    """The heads a self-spec decode may draft with: the given exit's, the deepest (None), or the
    `auto` policy's candidates."""
    if draft_exit == "auto":
        return [model.head(k) for k in policy_candidates(model)]
    return [model.head(draft_exit if draft_exit is not None else max(model.exit_layers))]


DEFAULT_THRESHOLD = 0.9  # the threshold when none is given and no calibration applies


def _valid_threshold(t) -> bool:
    return isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0 and not math.isnan(t)


def resolve_thresholds(opts: DecodeOptions, model) -> tuple[DecodeOptions, str]:
    """The one place where a decode's exit thresholds are decided (`generate` calls it; the
    engine then reads `exit_thresholds[k]` only). In order:

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
    policy: object = None  # draft_exit="auto": the eetune.decode.policy.DraftPolicy with its measured costs and acceptance
    round_log: list = field(default_factory=list)  # self-spec: (drafted, accepted) per round
    thresholds: dict = field(default_factory=dict)  # the threshold used at each exit layer (resolve_thresholds)
    engine: str = ""  # how the engine ran: "cuda-graphs" (segments recorded) or "eager"
    max_pending: int = 0  # early-exit: most exited tokens waiting for KV recomputation at once
    record_seconds: float = 0.0  # CUDA graph recording during this call (not counted in `seconds`)
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


def generate(model, prompts, opts: DecodeOptions | None = None, *, tokenizer=None, chat: bool = False, stop=(),
             on_text=None, on_tokens=None, run=None, **options) -> Generation:
    """Decode with early exits. `prompts`: lists of token ids, or a string or list of strings
    (with `tokenizer`; `chat=True` puts each through the chat template, `stop` strings end a
    row, `on_text(row, piece, stat)` streams text). The settings are `opts` or, instead,
    `DecodeOptions` fields as keywords: mode ("full", "early-exit", "self-spec"), threshold,
    confidence, draft_len, draft_exit, draft_vocab, max_new_tokens, temperature, top_k, top_p,
    seed, eos_token_ids. The exit heads run in eval mode (no dropout), the caller's mode put back
    after. Returns a `Generation` (ids, text, per-token exit layer and confidence, speed)."""
    if opts is None:
        opts = DecodeOptions(**options)
    elif options:
        raise EETuneError(f"give DecodeOptions or keyword options, not both (got {', '.join(sorted(options))})")
    if isinstance(prompts, str):
        prompts = [prompts]
    with eval_mode(model):
        if prompts and isinstance(prompts[0], str):
            if tokenizer is None:
                raise EETuneError("text prompts need a tokenizer: pass tokenizer= (eetune.load_tokenizer(backbone))")
            return generate_text(model, tokenizer, list(prompts), opts, chat=chat, stop=tuple(stop), on_text=on_text,
                                 run=run)
        return generate_ids(model, [list(p) for p in prompts], opts, on_tokens=on_tokens, run=run)


@torch.no_grad()
def generate_ids(model, prompts: list[list[int]], opts: DecodeOptions, on_tokens=None, run=None) -> Generation:
    """Decode every prompt (lists of token ids) with `opts`; `on_tokens(row, tokens, stats)` is
    called as tokens are emitted (streaming; returning False ends that row). Runs `eetune.decode.engine`
    (`run`: another function of its signature, e.g. the tests' reference decoder). Returns a
    `Generation` with ids and statistics."""
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
    policy = None
    if opts.draft_exit == "auto":  # its costs: measured once per loaded model, outside the timing
        setting = (opts.threshold, str(opts.exit_thresholds), opts.confidence, opts.draft_len, opts.draft_vocab,
                   opts.draft_context, opts.temperature > 0, len(prompts))
        memory = model.__dict__.setdefault("_eetune_policy_memory", {}).setdefault(setting, {})
        policy = DraftPolicy(model, measure_costs(model, opts), opts.draft_len, opts.draft_vocab, opts.verbose,
                             memory=memory)
    t0 = time.perf_counter()
    ids, _ = _left_pad(prompts, 0, device)
    pad = [ids.shape[1] - len(p) for p in prompts]
    stats = (run or engine_run)(model, ids, pad, opts, emitter, gen, device, policy=policy)
    result.engine = "cuda-graphs" if device.type == "cuda" else "eager"
    result.rounds, result.drafted, result.accepted = stats["rounds"], stats["drafted"], stats["accepted"]
    result.layer_token_passes = stats["layer_token_passes"]
    result.policy = stats["policy"]
    if policy is not None:
        policy.remember()  # the next request with this setting starts from what this one learnt
    result.round_log = stats["round_log"]
    result.max_pending = stats["max_pending"]
    result.record_seconds = stats["record_seconds"]
    result.seconds = time.perf_counter() - t0 - result.record_seconds  # graph recording is not decoding
    result.step_logits = emitter.step_logits
    return result


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
                  stop: tuple[str, ...] = (), on_text=None, run=None) -> Generation:
    """Text in, text out: tokenise, decode, cut at stop strings. `on_text(row, piece, stat)`
    streams each row's text, one token's piece at a time.

    `chat=False` (the default, as `eetune generate` without --chat and `eetune.generate`):
    plain completion, each prompt tokenised as text to be continued, right for base models and for
    prompts such as "The capital of France is". `chat=True` (`eetune generate --chat`): each prompt
    becomes one user turn of the tokenizer's chat template, as instruct models expect for questions
    and instructions; a tokenizer without a template refuses it."""
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

    result = generate_ids(model, ids, opts, on_tokens=on_tokens, run=run)
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


def custom_generate(model, **options):
    """A callable for Hugging Face's `generate(..., custom_generate=callable)` on the backbone's
    own model: its `generate` then decodes through eetune's engine. `max_new_tokens` (or
    `max_length`), `do_sample`, `temperature`, `top_k`, `top_p` and `eos_token_id` come from the
    generation config; `options` (DecodeOptions fields: mode, threshold, ...) from here and take
    precedence. Settings the engine cannot apply (repetition_penalty, no_repeat_ngram_size,
    stop_strings, ...) raise an EETuneError when generate() runs. Returns prompt + new ids,
    right-padded."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(DecodeOptions)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise EETuneError(f"unknown custom_generate option(s) {', '.join(unknown)}: give DecodeOptions fields "
                          f"(e.g. mode, threshold, draft_len); generation settings go to generate() itself")
    return custom_generate_fn(model, options)


def custom_generate_fn(model, options: dict):
    """Build the `custom_generate` callable behind `custom_generate`.

    Hugging Face's `generate()` calls it with the logits processors and stopping criteria it built
    from the generation config (and those passed in). The ones eetune's engine honours are
    translated into `DecodeOptions`: the temperature / top-k / top-p warpers (sampling; in greedy
    decoding they cannot change the argmax), `MaxLengthCriteria` (new tokens = max_length - the
    padded prompt width, as HF counts them) and `EosTokenCriteria`. Anything else (repetition
    penalty, n-gram blocking, bad words, min length, stop strings, max time, beam search, ...) is
    refused with an `EETuneError` rather than silently dropped. `options` (from
    `custom_generate`) take precedence over what the generation config says."""

    # The settings behind each Hugging Face logits processor / stopping criterion that eetune's engine
    # cannot apply, with the value that turns it off (what a refusal tells the user to pass).
    settings = {
        "RepetitionPenaltyLogitsProcessor": ("repetition_penalty", "1.0"),
        "EncoderRepetitionPenaltyLogitsProcessor": ("encoder_repetition_penalty", "1.0"),
        "NoRepeatNGramLogitsProcessor": ("no_repeat_ngram_size", "0"),
        "EncoderNoRepeatNGramLogitsProcessor": ("encoder_no_repeat_ngram_size", "0"),
        "NoBadWordsLogitsProcessor": ("bad_words_ids", "None"),
        "SequenceBiasLogitsProcessor": ("sequence_bias", "None"),
        "MinLengthLogitsProcessor": ("min_length", "0"),
        "MinNewTokensLengthLogitsProcessor": ("min_new_tokens", "None"),
        "PrefixConstrainedLogitsProcessor": ("prefix_allowed_tokens_fn", "None"),
        "ForcedBOSTokenLogitsProcessor": ("forced_bos_token_id", "None"),
        "ForcedEOSTokenLogitsProcessor": ("forced_eos_token_id", "None"),
        "InfNanRemoveLogitsProcessor": ("remove_invalid_values", "False"),
        "ExponentialDecayLengthPenalty": ("exponential_decay_length_penalty", "None"),
        "SuppressTokensLogitsProcessor": ("suppress_tokens", "None"),
        "SuppressTokensAtBeginLogitsProcessor": ("begin_suppress_tokens", "None"),
        "UnbatchedClassifierFreeGuidanceLogitsProcessor": ("guidance_scale", "None"),
        "ClassifierFreeGuidanceLogitsProcessor": ("guidance_scale", "None"),
        "MinPLogitsWarper": ("min_p", "None"),
        "TypicalLogitsWarper": ("typical_p", "1.0"),
        "EpsilonLogitsWarper": ("epsilon_cutoff", "0.0"),
        "EtaLogitsWarper": ("eta_cutoff", "0.0"),
        "TopHLogitsWarper": ("top_h", "None"),
        "LogitNormalization": ("renormalize_logits", "False"),
        "WatermarkLogitsProcessor": ("watermarking_config", "None"),
        "SynthIDTextWatermarkLogitsProcessor": ("watermarking_config", "None"),
        "MaxTimeCriteria": ("max_time", "None"),
        "StopStringCriteria": ("stop_strings", "None"),
        "ConfidenceCriteria": ("assistant_confidence_threshold", "None"),
    }

    def refusal(obj, gc, kind: str) -> EETuneError:
        name = type(obj).__name__
        setting, off = settings.get(name, (None, None))
        if name == "MinLengthLogitsProcessor" and gc.min_new_tokens:  # HF turns min_new_tokens into both
            setting, off = settings["MinNewTokensLengthLogitsProcessor"]
        if setting is None:
            return EETuneError(f"the {kind} {name} is not supported by eetune's custom_generate (its engine applies "
                               f"only temperature, top_k, top_p, max length and EOS): drop it, or call generate() "
                               f"without custom_generate (the full model)")
        return EETuneError(f"{setting} is not supported by eetune's custom_generate: drop it (pass {setting}={off} if "
                           f"the model's generation config sets it), or call generate() without custom_generate "
                           f"(the full model)")

    def decoding_loop(hf_model, input_ids, logits_processor=None, stopping_criteria=None,
                      generation_config=None, **model_kwargs):
        if hf_model is not model.backbone.model:
            raise EETuneError("custom_generate was built for another model: call the backbone's own generate()")
        gc = generation_config if generation_config is not None else hf_model.generation_config
        if (gc.num_beams or 1) > 1:
            raise EETuneError(f"num_beams={gc.num_beams} is not supported by eetune's custom_generate: drop it "
                              f"(pass num_beams=1), or call generate() without custom_generate (the full model)")
        if gc.return_dict_in_generate:
            raise EETuneError("return_dict_in_generate is not supported by eetune's custom_generate (it returns the "
                              "token ids only): drop it, or call generate() without custom_generate (the full model)")
        sampling = bool(gc.do_sample)
        warp = {}  # what the temperature / top-k / top-p warpers ask for
        for proc in logits_processor or ():
            name = type(proc).__name__
            if name == "TemperatureLogitsWarper":
                warp["temperature"] = float(proc.temperature)
            elif name == "TopKLogitsWarper":
                warp["top_k"] = int(proc.top_k)
            elif name == "TopPLogitsWarper":
                warp["top_p"] = float(proc.top_p)
            elif name == "MinLengthLogitsProcessor" and proc.min_length <= input_ids.shape[1]:
                pass  # the prompt is already that long: it never acts
            else:
                raise refusal(proc, gc, "logits processor")
        max_length, eos = None, None
        if stopping_criteria is None:  # called directly, not through generate(): the config says
            max_length = gc.max_length
            e = gc.eos_token_id
            eos = () if e is None else ((int(e),) if isinstance(e, int) else tuple(int(x) for x in e))
        else:
            for crit in stopping_criteria:
                name = type(crit).__name__
                if name == "MaxLengthCriteria":
                    m = int(crit.max_length)
                    max_length = m if max_length is None else min(max_length, m)
                elif name == "EosTokenCriteria":
                    e = crit.eos_token_id
                    ids = e.flatten().tolist() if isinstance(e, torch.Tensor) else ([e] if isinstance(e, int) else e)
                    eos = tuple(sorted(set(eos or ()) | {int(x) for x in ids}))
                else:
                    raise refusal(crit, gc, "stopping criterion")
            eos = eos or ()
        mask = model_kwargs.get("attention_mask")
        if mask is None:
            prompts = [row.tolist() for row in input_ids]
        else:
            prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        opts = dict(options)
        if max_length is not None:  # HF sets it from max_new_tokens too; it counts the padded batch width
            new_tokens = max(1, max_length - input_ids.shape[1])
        elif gc.max_new_tokens is not None:
            new_tokens = gc.max_new_tokens
        else:
            new_tokens = 20  # HF's default
        opts.setdefault("max_new_tokens", new_tokens)
        if sampling:
            opts.setdefault("temperature", warp.get("temperature", 1.0))
            opts.setdefault("top_k", warp.get("top_k", 0))
            opts.setdefault("top_p", warp.get("top_p", 1.0))
            if "seed" not in opts:  # torch.manual_seed makes it reproducible, as with HF sampling
                opts["seed"] = int(torch.randint(0, 2 ** 62, (), device="cpu"))
        opts.setdefault("eos_token_ids", eos)
        result = generate(model, prompts, DecodeOptions(**opts))
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos[0] if eos else 0)
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        pad = int(pad.flatten()[0]) if isinstance(pad, torch.Tensor) else int(pad)
        width = max(len(r.ids) for r in result.rows)
        new = torch.full((len(prompts), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for b, r in enumerate(result.rows):
            new[b, :len(r.ids)] = torch.tensor(r.ids, dtype=input_ids.dtype)
        return torch.cat([input_ids, new], dim=1)

    return decoding_loop

"""The decoding engine: full, early-exit (with KV recomputation) and self-speculative decoding
over static caches, one static-shape function per span of layers between exits, recorded as a
CUDA graph on a GPU and run directly on a CPU.

`eetune.decode.api.generate` owns the options, the prompt checks and the per-row bookkeeping (`Emitter`);
`run(model, ids, pad, opts, emitter, gen, device)` decodes one batch with this engine. The slow,
obvious reference that the tests hold it against lives in `tests/reference.py`.

- **Segments.** A step runs the layers between consecutive exits as *segments*: layers lo..hi-1
  on a block of tokens, optionally followed by the final norm + LM head, or by the decision of
  the exit at hi (its gate, or its head and max-prob; for a self-spec draft, the draft head and
  its greedy token). So a token pays one segment call and **one host read** per exit it
  reaches, and the full-depth step is one segment. A self-spec round is one draft segment per
  draft and one verification segment (layers d+1..L and the LM head over every position).
- **Static caches** (`KVCache`): per layer, key/value buffers of a fixed capacity, written at
  the slots of the current block (`index`, a device tensor). Every row's valid slots are a
  prefix in position order; padding slots are masked. Self-spec rows that accepted fewer drafts
  than the leading row write `behind[b]` slots lower, and a round's rejected slots are written
  over by the next round: the cache grows only with accepted tokens.
- **KV recomputation**: a token that leaves at exit k leaves layers above k without its keys and
  values; it waits (`pending`, with its hidden state at k) and joins the next token that climbs
  past k, in one batched pass. A token that leaves at an exit after the last layer has every
  layer's keys and values and never waits.
- **On a GPU** each segment is recorded once as a CUDA graph per token-count bucket (1, 2, 4 …
  64; joins are padded after the real tokens; larger blocks run unrecorded), attending over the
  whole cache under a mask, its geometry (slots, positions, rotary tables, masks) computed
  inside the graph from two device scalars. `compile=True` fuses each segment with
  `torch.compile` before recording it. Graph recording time is counted apart
  (`stats["record_seconds"]`), never in a decode's timing.
- **On a CPU** nothing is recorded: the same functions run on the block's exact token count and
  attend over the slots written so far only (`STATIC_ON_CPU = True` runs the GPU's bucketed,
  whole-cache shapes instead; the tests use it to check them without a GPU).
- **State per geometry** (`DecodeState`: caches, static inputs, graphs) is kept on the model
  for reuse across requests, at most `MAX_STATES` geometries (batch size, capacity bucket),
  (`model.decode_state`), least recently used dropped first; `model.free_decode_state()` drops
  them all (also done when layers are released or tuning starts).
- **Restricted-vocabulary heads** (`head.restricted`: K token ids + OTHER, `--exit-vocab K`):
  a row takes exit k only when the head's top-1 is not OTHER and its confidence (max-prob over
  all K + 1 classes, or the gate's) clears the threshold; in gate mode such a head's logits are
  computed in the decision too (they are cheap) for the OTHER test. A row that takes the exit
  chooses from `head.to_vocab(logits)` (the K tokens at their ids) and never pays the LM head.
  A restricted draft head proposes only while OTHER does not win; its greedy draft is
  `vocab_ids[argmax]`, its sampling distribution is over the vocabulary (zero outside K).
  Every exit head is projected with `head.projection()` (weight and bias); on static shapes a
  restricted head's projection is read from copies in the state (`DecodeState.proj`), whose
  addresses stay for the graphs and whose contents are refreshed per request when the head
  changed (as the `--draft-vocab` rows are).
- **Draft context** (`draft_context=True`, self-spec with a restricted draft head): the draft
  head's classes become its K tokens, then the batch's prompt tokens outside K (their LM-head
  rows: names and rare words that answers copy), then OTHER, for this request
  (`set_draft_context`). On static shapes the added rows live in one buffer per exit, grown in
  steps of `CONTEXT_STEP` rows to the most a request has needed, the rest rows whose logits are -inf.
- **The draft policy** (`draft_exit="auto"`, `eetune.decode.policy`) picks the draft exit and
  length of each round; `run` asks it and reports each round's outcome back.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections import OrderedDict

import torch

from eetune.decode.rules import choose, confidence, not_other, sampling_probs, speculative_accept
from eetune.model.backbone import LayerContext
from eetune.model.rows import few_rows

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # token counts segments are recorded for (GPU)
CAPACITY_STEP = 256  # cache capacity is rounded up to a multiple of this (states and graphs are reused)
MAX_STATES = 4  # geometries (batch size, capacity) whose caches and graphs are kept on the model
CONTEXT_STEP = 64  # static shapes: the --draft-context buffer grows by this many rows
STATIC_ON_CPU = False  # tests: run the GPU's bucketed whole-cache shapes on a CPU too (unrecorded)


def bucket(q: int) -> int | None:
    """The smallest recorded token count that holds q tokens (None: run unrecorded)."""
    for b in BUCKETS:
        if q <= b:
            return b
    return None


# --- the cache ------------------------------------------------------------------------------
class KVCache:
    """Per-layer key/value buffers of fixed capacity (gpt-fast's KVCache). HF attention modules
    call `update(k, v, layer_idx)`; the keys are written at the slots in `index` (B, Q), or from
    slot `at` on when every row writes the same slots, and the call attends over the first `kv`
    slots (None: all of them, the static shape a graph needs). The caller's mask hides every
    slot a query must not see, so stale slots never matter."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.index: torch.Tensor | None = None
        self.at: int | None = None
        self.kv: int | None = None

    def update(self, key, value, layer_idx, cache_kwargs=None):
        i = layer_idx
        if i not in self.k:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.k[i] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.v[i] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        if self.at is not None:
            q = key.shape[2]
            self.k[i][:, :, self.at:self.at + q] = key
            self.v[i][:, :, self.at:self.at + q] = value
        else:
            idx = self.index[:, None, :, None].expand(key.shape)
            self.k[i].scatter_(2, idx, key)
            self.v[i].scatter_(2, idx, value)
        if self.kv is None:
            return self.k[i], self.v[i]
        return self.k[i][:, :, :self.kv], self.v[i][:, :, :self.kv]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def is_compileable(self) -> bool:  # pragma: no cover - HF introspection only
        return False


# --- recorded functions and the state they read ---------------------------------------------
class Graph:
    """`fn()` (reading static inputs, returning a dict of tensors) recorded as a CUDA graph on
    its first call, replayed on later ones; unrecorded (called directly) when `capture` is off
    or recording fails. `seconds`: the time recording took."""

    def __init__(self, fn, capture: bool):
        self.fn, self.graph, self.out, self.seconds = fn, None, None, 0.0
        if capture:
            t0 = time.perf_counter()
            try:
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # warm-up (same inputs: writes the same cache slots)
                    fn()
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self.out = fn()
                self.graph = graph
            except Exception as err:  # a module that reads the device (a host sync) cannot be recorded
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                warnings.warn(f"eetune: CUDA graph capture failed ({type(err).__name__}: {err}); "
                              f"running this segment without a graph")
                self.graph, self.out = None, None
            self.seconds = time.perf_counter() - t0

    def __call__(self) -> dict:
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


class DecodeState:
    """What the segments of one geometry (batch size, cache capacity) read and write: caches,
    static inputs and the recorded graphs. Kept on the model between requests."""

    def __init__(self, model, B: int, capacity: int, device):
        self.B, self.capacity = B, capacity
        self.cache = KVCache(capacity)
        self.exit_caches = {h.layer: KVCache(capacity) for h in model.heads if h.arch == "layer"}
        self.arange = torch.arange(capacity, device=device)
        self.pad = torch.zeros(B, dtype=torch.long, device=device)
        self.behind = torch.zeros(B, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # uniform slot of the block's first token
        self.last = torch.zeros(1, dtype=torch.long, device=device)  # index of the block's last real token
        self.decided = torch.zeros(B, dtype=torch.bool, device=device)
        self.force = torch.full((B,), -1, dtype=torch.long, device=device)  # replayed decision, -1: none
        self.thr = {k: torch.zeros((), dtype=torch.float32, device=device) for k in model.exit_layers}
        self.inputs: dict = {}
        self.graphs: dict = {}
        self.rows: dict = {}  # (exit, K) -> output rows of the K most frequent tokens, refreshed per request
        self.vocab: torch.Tensor | None = None  # the model's vocab_by_frequency, copied in per request
        # exit -> a restricted head's projection as the graphs read it: {"w", "b", "ids"} (static copies, refreshed
        # in place per request) and "src" (what they were copied from, with its version: unchanged heads copy nothing)
        self.proj: dict = {}
        self.context: dict = {}  # exit -> its --draft-context projection {"w", "b", "ids"} (static copies, grown)

    def buffer(self, name, shape, dtype, device) -> torch.Tensor:
        t = self.inputs.get((name, shape))
        if t is None:
            t = self.inputs[(name, shape)] = torch.zeros(shape, dtype=dtype, device=device)
        return t


def _modules(model) -> list:
    """Every module a segment may run: backbone layers, final norm, embeddings, heads, gates."""
    bb = model.backbone
    return [*bb.layers, bb.final_norm, bb.lm_head, bb.model.get_input_embeddings(), *model.heads,
            *(model.gate(k) for k in model.exit_layers)]


def _modules_key(model, device, dtype) -> tuple:
    """Graphs hold the addresses of the tensors they read: other modules (heads replaced, layers
    released) or parameters stored anew (`.to()`, loading) need new states. The states keep the
    modules themselves alive, so an id is never reused while it is compared."""
    mods = _modules(model)
    ptrs = tuple(p.data_ptr() for m in mods if m is not None for p in m.parameters())
    return (str(device), dtype, tuple(model.exit_layers), tuple(id(m) for m in mods), ptrs)


def decode_state(model, B: int, capacity: int, device, dtype) -> DecodeState:
    """The state of this geometry, kept on the model (at most MAX_STATES, least recently used
    dropped first; all dropped when the model's modules or parameters changed)."""
    key = _modules_key(model, device, dtype)
    states = model.decode_state
    if states is None or states["key"] != key:
        model.free_decode_state()
        states = model.decode_state = {"key": key, "modules": _modules(model), "by_geometry": OrderedDict()}
    by_geo = states["by_geometry"]
    st = by_geo.get((B, capacity))
    if st is None:
        while len(by_geo) >= MAX_STATES:
            by_geo.popitem(last=False)
        st = by_geo[(B, capacity)] = DecodeState(model, B, capacity, device)
    by_geo.move_to_end((B, capacity))
    return st


# --- the engine -----------------------------------------------------------------------------
class Engine:
    """State of one batch being decoded (see the module docstring)."""

    def __init__(self, model, opts, B: int, T: int, pad: list[int], device, capacity: int):
        self.model, self.opts = model, opts
        self.bb = bb = model.backbone
        self.L = L = bb.num_layers
        self.B, self.device = B, device
        self.dtype = next(bb.model.parameters()).dtype
        self.capture = device.type == "cuda" and torch.cuda.is_available()
        self.static = self.capture or STATIC_ON_CPU or opts.compile  # bucketed whole-cache shapes
        capacity = -(-(capacity + BUCKETS[-1]) // CAPACITY_STEP) * CAPACITY_STEP  # room for padded writes
        self.gs = gs = decode_state(model, B, capacity, device, self.dtype)
        self.cache, self.exit_caches = gs.cache, gs.exit_caches
        self.pad_host = list(pad)
        gs.pad.copy_(torch.tensor(pad, dtype=torch.long))
        gs.behind.zero_()
        gs.force.fill_(-1)
        for k, t in gs.thr.items():
            t.fill_(float(opts.exit_thresholds[k]) if opts.exit_thresholds else 2.0)
        self.win = [bb.layer_window(i) for i in range(L)]
        self.slot = T  # uniform slot of the next token (rows `behind` use a lower one)
        self.behind_host = [0] * B  # host copy of gs.behind
        self.pending: list[tuple[int, torch.Tensor]] = []  # (depth, hidden) of exited tokens, oldest first
        self.passes = 0
        self.exit_set = set(model.exit_layers)
        if opts.mode == "early-exit" and opts.replay is None and opts.exit_thresholds:
            # An exit whose threshold is above 1 never fires (both confidences are probabilities): it is
            # not asked, so it costs nothing; with every threshold above 1 the climb is `full`'s.
            self.exit_set = {k for k in self.exit_set if float(opts.exit_thresholds[k]) <= 1.0}
        self.gate_mode = opts.confidence == "gate"
        self.H = bb.hidden_size
        self.variant = (opts.confidence, opts.draft_vocab, opts.compile)  # what recorded functions depend on
        self.replay = None
        self.record_seconds = 0.0
        self._plan: tuple[int, int] | None = None  # (end, widest block) of the step under way (unrecorded)
        self._memo: dict | None = None  # its geometry
        self.like = torch.empty(0, dtype=self.dtype, device=device)  # dtype/device for rotary tables
        self.draft_ext: dict = {}  # exit -> (W, b, ids, real rows) of its --draft-context projection
        self._refresh_vocab()

    def set_draft_context(self, ids: torch.Tensor, exits) -> None:
        """`--draft-context`: each restricted draft head among `exits` also proposes the tokens of
        the prompts `ids` (B, T; left padding included, pad ids are the model's own tokens) that
        are outside its K: classes K tokens, then those tokens (the LM head's rows and bias), then
        OTHER. Static shapes read them from one state buffer per exit (graphs keep addresses),
        padded with zero rows of bias -inf past this request's rows."""
        lm_w = self.bb.lm_head.weight
        lm_b = getattr(self.bb.lm_head, "bias", None)
        toks = None
        for d in exits:
            head = self.model.head(d)
            if not head.has_other:
                continue
            if toks is None:
                real = torch.cat([ids[b, p:] for b, p in enumerate(self.pad_host)]).to(lm_w.device)
                toks = torch.unique(real)
            w, b, kids = self._proj(d)
            K = kids.numel()
            extra = toks[head.vocab_map().to(toks.device)[toks] == K]
            E = extra.numel()
            if E == 0:
                continue
            ew = lm_w.detach()[extra].to(w.dtype)
            eb = torch.zeros(E, dtype=b.dtype, device=b.device) if lm_b is None else lm_b.detach()[extra].to(b.dtype)
            ext_ids = torch.cat([kids, extra.to(kids.device)])
            if not self.static:
                self.draft_ext[d] = (torch.cat([w[:K], ew, w[K:]]), torch.cat([b[:K], eb, b[K:]]), ext_ids, K + E)
                continue
            # One buffer per exit, grown (in CONTEXT_STEP rows) to the most added rows a request has had:
            # rows past this request's E are padding (zero, bias -inf: they never win or count).
            e = self.gs.context.get(d)
            if e is None or e["ids"].numel() < K + E:
                P = -(-E // CONTEXT_STEP) * CONTEXT_STEP
                if e is not None:  # the draft graphs of the smaller buffer read addresses that go now
                    old = e["w"].shape[0]
                    self.gs.graphs = {k: g for k, g in self.gs.graphs.items()
                                      if not (k[0] == "seg" and k[5] == ("draft", d) and k[-1] == old)}
                e = self.gs.context[d] = {"w": torch.zeros(K + P + 1, w.shape[1], dtype=w.dtype, device=w.device),
                                          "b": torch.zeros(K + P + 1, dtype=b.dtype, device=b.device),
                                          "ids": torch.zeros(K + P, dtype=kids.dtype, device=kids.device)}
            P = e["ids"].numel() - K
            for name, own, added, padding in (("w", w, ew, 0.0), ("b", b, eb, float("-inf"))):
                e[name][:K].copy_(own[:K])
                e[name][K:K + E].copy_(added)
                e[name][K + E:K + P].fill_(padding)
                e[name][-1].copy_(own[K])  # OTHER
            e["ids"][:K + E].copy_(ext_ids)
            e["ids"][K + E:].fill_(int(kids[0]))  # never chosen: their logits are -inf
            self.draft_ext[d] = (e["w"], e["b"], e["ids"], K + E)

    def draft_to_vocab(self, d: int, logits: torch.Tensor) -> torch.Tensor:
        """Draft exit d's logits over the whole vocabulary for sampling: its tokens' logits at their
        ids (with --draft-context the prompt tokens' too), -inf elsewhere (OTHER is not a token)."""
        ext = self.draft_ext.get(d)
        if ext is None:
            return self.model.head(d).to_vocab(logits)
        _, _, ids, n = ext
        out = torch.full((*logits.shape[:-1], self.bb.vocab_size), float("-inf"), dtype=logits.dtype,
                         device=logits.device)
        return out.index_copy_(-1, ids[:n], logits[..., :n])

    # --- geometry and segments ---------------------------------------------------------------
    def _windows(self, lo: int, hi: int, exit_block: bool) -> list:
        ws = {self.win[i] for i in range(lo, hi)}
        if exit_block:
            ws.add(self.bb.layer_window(self.L - 1))
        return sorted(ws, key=lambda w: -1 if w is None else w)

    def _geometry(self, Q: int, like: torch.Tensor, windows, kv: int | None) -> tuple:
        """Slots, layer context and masks of a block of Q queries starting at `gs.start`, over
        the first `kv` cache slots (None: the whole cache)."""
        if kv is not None and self._plan is not None and self._plan[0] == kv and Q <= self._plan[1]:
            return self._planned_geometry(Q, like, windows)
        gs = self.gs
        qs = gs.start + gs.arange[:Q][None, :] - gs.behind[:, None]  # (B, Q) slots written
        # Padding queries (after the real ones) take the last real position: rotary scalings that
        # look at the largest position (dynamic, longrope) must see the real tokens' only.
        positions = torch.minimum(qs, qs[:, :1] + gs.last) - gs.pad[:, None]
        ctx = self.bb.context(like, positions)
        ctx = LayerContext(positions, ctx.rope, positions.clamp(min=0))
        k = gs.arange if kv is None else gs.arange[:kv]
        # One query that may see every written key needs no mask (not even a window's, while the
        # keys fit in it): batch 1 decoding on a CPU.
        trivial = kv is not None and Q == 1 and not any(self.pad_host) and not any(self.behind_host)
        allowed, masks = None, {}
        for w in windows:
            if trivial and (w is None or kv <= w):
                masks[w] = None
                continue
            if allowed is None:
                allowed = (k[None, None, :] <= qs[:, :, None]) & (k[None, None, :] >= gs.pad[:, None, None])
            a = allowed if w is None else allowed & ((qs[:, :, None] - k[None, None, :]) < w)
            masks[w] = torch.zeros(a.shape, dtype=self.dtype, device=a.device).masked_fill_(
                ~a, torch.finfo(self.dtype).min)[:, None]
        return qs, ctx, masks

    def _planned_geometry(self, Q: int, like: torch.Tensor, windows) -> tuple:
        """Unrecorded segments of one step (prefill, or an early-exit step whose pending tokens
        join on the way up) all end at the same slot: their geometry is computed once, for the
        widest block the step can have (`_plan` = (end, widest)), and each block takes its last Q
        rows (the lean engine's way: one rotary table and one mask per window per step)."""
        m = self._memo
        if m is None or m["plan"] != self._plan:
            end, qmax = self._plan
            gs = self.gs
            qs = (end - qmax) + gs.arange[:qmax][None, :] - gs.behind[:, None]
            positions = qs - gs.pad[:, None]
            rope = self.bb.context(like, positions).rope
            m = self._memo = {"plan": self._plan, "qs": qs, "positions": positions, "rope": rope,
                              "ids": positions.clamp(min=0), "masks": {}}
        end, qmax = self._plan
        trivial = Q == 1 and qmax == 1 and not any(self.pad_host) and not any(self.behind_host)
        masks = {}
        for w in windows:
            if trivial and (w is None or end <= w):
                masks[w] = None
                continue
            if w not in m["masks"]:
                qs, k = m["qs"], self.gs.arange[:end]
                a = (k[None, None, :] <= qs[:, :, None]) & (k[None, None, :] >= self.gs.pad[:, None, None])
                if w is not None:
                    a &= (qs[:, :, None] - k[None, None, :]) < w
                m["masks"][w] = torch.zeros(a.shape, dtype=self.dtype, device=a.device).masked_fill_(
                    ~a, torch.finfo(self.dtype).min)[:, None]
            masks[w] = m["masks"][w][:, :, -Q:]
        rope = None if m["rope"] is None else {t: (c[:, -Q:], s_[:, -Q:]) for t, (c, s_) in m["rope"].items()}
        ctx = LayerContext(m["positions"][:, -Q:], rope, m["ids"][:, -Q:])
        return m["qs"][:, -Q:], ctx, masks

    def _run_layers(self, lo, hi, h, ctx, masks):
        for i in range(lo, hi):
            out = self.bb._call(self.bb.layers[i], i, h, ctx, masks[self.win[i]], self.cache)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _exit_block(self, k: int, h, ctx, masks):
        """A `layer` exit's block over the whole query block (its own cache takes every position)."""
        last = self.L - 1
        out = self.bb._call(self.model.head(k).block, last, h, ctx, masks[self.bb.layer_window(last)],
                            self.exit_caches[k])
        return out[0] if isinstance(out, tuple) else out

    def _segment_fn(self, lo: int, hi: int, x: torch.Tensor, Q: int, final: str | None, dec: tuple | None,
                    kv: int | None = None, at: int | None = None):
        """The function of one segment: embed (lo == 0) or take hidden states `x`, run layers
        lo..hi-1, then optionally the final norm + LM head (`final`: "last" or "all") or the
        decision `dec` = (kind, exit) at layer hi: ("gate", k), ("head", k) for an exit head and
        its confidence, ("draft", k) for a self-spec draft, ("block", k) for a `layer` exit's
        block alone. `kv`/`at`: see KVCache (unrecorded calls only)."""
        gs, bb = self.gs, self.bb
        exit_k = dec[1] if dec else None
        block = exit_k is not None and self.model.head(exit_k).arch == "layer"

        def fn():
            like = x if lo > 0 else self.like
            qs, ctx, masks = self._geometry(Q, like, self._windows(lo, hi, block), kv)
            for c in (self.cache, *self.exit_caches.values()):
                c.index, c.at, c.kv = qs, at, kv
            h = bb.embed(x, ctx.positions) if lo == 0 else x
            h = self._run_layers(lo, hi, h, ctx, masks)
            out = {"h": h, "h_last": h[:, Q - 1] if kv is not None else h.index_select(1, gs.last)[:, 0]}
            if final == "last":
                out["logits"] = bb.logits(bb.final_norm(out["h_last"]))
            elif final == "all":
                out["logits"] = bb.logits(bb.final_norm(h))
                out["target"] = out["logits"].argmax(-1)
            if dec is not None:
                kind, k = dec
                z = None
                if block:
                    blk = self._exit_block(k, h, ctx, masks)
                    z = out["z"] = self.model.head(k).norm(
                        blk[:, Q - 1] if kv is not None else blk.index_select(1, gs.last)[:, 0])
                if kind != "block":
                    out.update(self._decision(kind, k, out["h_last"], z))
            return out
        return fn

    def segment(self, lo: int, hi: int, x: torch.Tensor, end: int, final=None, dec=None,
                exact: bool = False, prefill: bool = False) -> dict:
        """Run layers lo..hi-1 on the block `x` (ids if lo == 0, else hidden states) whose last
        token has uniform slot end - 1. With static shapes, replays (recording on first use) the
        segment for x's bucket (`exact`: exactly x's token count, no padding; `prefill`: never
        recorded); otherwise runs it directly over the slots written so far."""
        gs = self.gs
        q = x.shape[1]
        gs.start.fill_(end - q)
        gs.last.fill_(q - 1)
        self.passes += self.B * q * (hi - lo)
        Q = None if prefill else (q if exact else bucket(q))
        if not self.static or Q is None:  # unrecorded, unpadded, over the slots written so far
            at = end - q if not any(self.behind_host) else None
            return self._segment_fn(lo, hi, x, q, final, dec, kv=end, at=at)()
        ext = self.draft_ext.get(dec[1]) if dec is not None and dec[0] == "draft" else None
        key = ("seg", lo, hi, Q, final, dec, self.variant, None if ext is None else ext[0].shape[0])
        shape = (self.B, Q) if lo == 0 else (self.B, Q, self.H)
        buf = gs.buffer("ids" if lo == 0 else "h", shape, x.dtype, x.device)
        buf[:, :q].copy_(x)
        g = gs.graphs.get(key)
        if g is None:
            fn = self._segment_fn(lo, hi, buf, Q, final, dec)
            if self.opts.compile:  # inductor fuses the elementwise kernels; the graph records the result
                import torch._dynamo
                torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
                fn = torch.compile(fn, dynamic=False)
            g = gs.graphs[key] = Graph(fn, self.capture)
            self.record_seconds += g.seconds
        return g()

    def set_behind(self, behind: list[int]) -> None:
        if behind != self.behind_host:
            self.gs.behind.copy_(torch.tensor(behind))

    # --- decisions ---------------------------------------------------------------------------
    def _decision(self, kind: str, k: int, h_last, z) -> dict:
        """Exit k's decision for the newest token, inside the segment: which undecided rows take
        the exit (`take`), and flags = [any row takes, every row has decided] for the host."""
        gs, head = self.gs, self.model.head(k)
        if kind == "draft":
            return self._draft(k, h_last, z)
        out, logits = {}, None
        if kind == "head" or head.has_other:  # a gate's decision needs a restricted head's logits too (OTHER)
            if z is None:
                z = head.transform(h_last)
            w, b, _ = self._proj(k)
            logits = out["logits"] = self.bb.logits(z, w, b)  # (B, C): the head's classes
        conf = self.model.gate(k)(h_last) if kind == "gate" else confidence(logits, self.opts.confidence)
        take = ~gs.decided & (conf >= gs.thr[k])
        if head.has_other:  # a row leaves only with a token: where OTHER wins it goes deeper
            take = take & not_other(logits, head.num_classes - 1)
        take = torch.where(gs.force >= 0, ~gs.decided & (gs.force == k), take)
        out.update(conf=conf, take=take, flags=torch.stack([take.any(), (gs.decided | take).all()]))
        return out

    def _draft(self, d: int, h_last, z) -> dict:
        """A self-spec draft at exit d: proposing rows, the greedy draft and the logits (the
        head's classes, or the draft vocabulary's K tokens). A restricted head proposes only
        where OTHER does not win; its greedy draft is its best token (vocab_ids[argmax] over
        the K tokens: rows that stop proposing still feed a real token to the next draft)."""
        gs, opts, head = self.gs, self.opts, self.model.head(d)
        if z is None:
            z = head.transform(h_last)
        if opts.draft_vocab:  # an unrestricted head (api refuses --draft-vocab with a restricted one)
            w, b = self._static_rows(d, opts.draft_vocab)
            ids = gs.vocab[:opts.draft_vocab]
        elif d in self.draft_ext:  # --draft-context: K tokens, the prompts' other tokens, OTHER
            w, b, ids, _ = self.draft_ext[d]
        else:
            w, b, ids = self._proj(d)
        logits = self.bb.logits(z, w, b)
        conf = self.model.gate(d)(h_last) if self.gate_mode else confidence(logits, opts.confidence,
                                                                             self.bb.vocab_size)
        propose = ~gs.decided & (conf >= gs.thr[d])  # gs.decided: rows that stopped proposing
        if head.has_other:
            propose = propose & not_other(logits, logits.shape[-1] - 1)
        nxt = (logits[:, :-1] if head.has_other else logits).argmax(-1)
        if ids is not None:
            nxt = ids[nxt]
        return {"logits": logits, "propose": propose, "next": nxt, "flags": propose.any()[None]}

    def _proj(self, k: int) -> tuple:
        """(W (C, H), bias (C,) or None, vocab_ids (K,) or None) of exit k's projection as a
        segment reads it: an unrestricted head's are parameters (the head's copy or the LM head,
        whose addresses stay); a restricted head's are built from its rows and OTHER row, so on
        static shapes (recorded graphs read addresses) they are the state's copies."""
        head = self.model.head(k)
        if not head.restricted:
            w, b = head.projection()
            return w, b, None
        if not self.static:
            w, b = head.projection()
            return w, b, head.vocab_ids
        e = self.gs.proj[k]
        return e["w"], e["b"], e["ids"]

    def _refresh_proj(self) -> None:
        """Static shapes: every restricted head's projection copied into tensors whose addresses
        stay (made once per state), rewritten in place when the head changed since (a tensor it
        is built from replaced or written in place: `projection()` returns a new tensor then)."""
        if not self.static:
            return
        for head in self.model.heads:
            if not head.restricted:
                continue
            w, b = head.projection()
            src = tuple(None if t is None else (t, t._version) for t in (w, b, head.vocab_ids))
            e = self.gs.proj.get(head.layer)
            if e is None:
                self.gs.proj[head.layer] = {"w": w.detach().clone(), "b": None if b is None else b.detach().clone(),
                                            "ids": head.vocab_ids.clone(), "src": src}
                continue
            same = all((a is None and c is None) or (a is not None and c is not None and a[0] is c[0] and a[1] == c[1])
                       for a, c in zip(e["src"], src))
            if not same:
                e["w"].copy_(w)
                if b is not None:
                    e["b"].copy_(b)
                e["ids"].copy_(head.vocab_ids)
                e["src"] = src

    def _rows_now(self, k: int, K: int) -> tuple:
        ids = self.model.vocab_by_frequency[:K]
        w, b = self.model.head(k).projection()
        return w[ids], None if b is None else b[ids]

    def _static_rows(self, k: int, K: int) -> tuple:
        """Exit k's output rows of the K most frequent tokens, in tensors whose address stays (graphs
        read them); `_refresh_vocab` rewrites them in place at every request."""
        if (k, K) not in self.gs.rows:
            self.gs.rows[(k, K)] = tuple(None if t is None else t.clone() for t in self._rows_now(k, K))
        return self.gs.rows[(k, K)]

    def _refresh_vocab(self) -> None:
        """The token ranking or the heads may have changed since the state was made."""
        self._refresh_proj()
        gs, ranking = self.gs, self.model.vocab_by_frequency
        if ranking is None:
            return
        if gs.vocab is None or gs.vocab.shape != ranking.shape:
            gs.vocab = ranking.to(self.device).clone()
            gs.graphs = {k: g for k, g in gs.graphs.items() if not (isinstance(k[-1], tuple) and k[-1][1])}
        else:
            gs.vocab.copy_(ranking)
        for (k, K), (w, b) in gs.rows.items():
            w_now, b_now = self._rows_now(k, K)
            w.copy_(w_now)
            if b is not None:
                b.copy_(b_now)

    def _head_logits(self, k: int, z_given: bool, h_last) -> torch.Tensor:
        """Exit k's logits for the newest token (after a gate fired): its transform (unless `z`
        is given: a `layer` exit's normed block output) and projection, recorded on a GPU."""
        gs, head = self.gs, self.model.head(k)
        if not self.static:
            w, b, _ = self._proj(k)
            return self.bb.logits(h_last if z_given else head.transform(h_last), w, b)
        buf = gs.buffer(("head-in", k, z_given), (self.B, self.H), h_last.dtype, h_last.device)
        buf.copy_(h_last)
        key = ("head", k, z_given, self.variant)
        g = gs.graphs.get(key)
        if g is None:
            def fn():
                z = buf if z_given else head.transform(buf)
                w, b, _ = self._proj(k)
                return {"logits": self.bb.logits(z, w, b)}
            g = gs.graphs[key] = Graph(fn, self.capture)
            self.record_seconds += g.seconds
        return g()["logits"]

    def _take(self, st: dict, take: torch.Tensor, logits: torch.Tensor, k: int, conf: torch.Tensor) -> None:
        st["logits"] = torch.where(take[:, None], logits.to(st["logits"].dtype), st["logits"])
        st["layer"] = torch.where(take, k, st["layer"])
        st["conf"] = torch.where(take, conf.float(), st["conf"])

    def decide(self, k: int, out: dict, st: dict) -> bool:
        """Read exit k's decision (one host read); rows that take it get its logits over the
        vocabulary (`to_vocab`: a restricted head's K tokens at their ids). Returns True when
        every row has decided."""
        any_take, all_done = out["flags"].tolist()
        if any_take:
            take = out["take"]
            logits = out.get("logits")  # head mode, or a restricted head's logits in gate mode
            if logits is None:  # a gate fired: now the head's logits
                z = out.get("z")
                logits = self._head_logits(k, z is not None, z if z is not None else out["h_last"])
            self._take(st, take, self.model.head(k).to_vocab(logits), k, out["conf"])
            self.gs.decided |= take
        return bool(all_done)

    def _dec(self, k: int):
        """The decision a segment ending at exit k makes."""
        if k not in self.exit_set:
            return None
        return ("gate" if self.gate_mode else "head", k)

    def _force(self, index: int) -> None:
        """Benchmarks: the recorded exit of this token (early-exit replays only)."""
        if self.replay is not None and self.opts.mode == "early-exit":
            trace = self.replay
            self.gs.force.fill_(trace[index] if index < len(trace) else self.L)

    def new_step_state(self, settled: torch.Tensor) -> dict:
        B, V = self.B, self.bb.vocab_size
        self.gs.decided.copy_(settled)
        return {"decided": self.gs.decided,
                "logits": torch.zeros(B, V, dtype=self.dtype, device=self.device),
                "layer": torch.full((B,), self.L, dtype=torch.long, device=self.device),
                "conf": torch.full((B,), float("nan"), device=self.device)}

    # --- prefill and the three step kinds ----------------------------------------------------
    def _points(self) -> list[tuple[int, int]]:
        pts = sorted({0, self.L} | {k for k in self.exit_set if k < self.L})
        return list(zip(pts[:-1], pts[1:]))

    def _top(self, h, end: int, decide: bool, st: dict | None) -> bool:
        """An exit after the last layer: a `layer` exit's block (its cache takes the block), and
        with `decide` its decision on the final hidden states (unrecorded). Returns all-decided."""
        k = self.L
        block = self.model.head(k).arch == "layer"
        if not block and not decide:
            return False
        gs = self.gs
        gs.start.fill_(end - h.shape[1])
        gs.last.fill_(h.shape[1] - 1)
        out = self._segment_fn(k, k, h, h.shape[1], None, ("block", k) if block else None, kv=end)()
        if not decide:
            return False
        out.update(self._decision("gate" if self.gate_mode else "head", k, out["h_last"], out.get("z")))
        return self.decide(k, out, st)

    def prefill(self, ids, decide_exits: bool, settled, draft_fill=()) -> dict:
        """The prompts through every layer. With `decide_exits`, the first new token's exit
        decision is made on the way (the climb never stops: the prompt must fill every layer).
        `draft_fill`: `layer` exits whose own cache must take the prompt (self-spec drafters)."""
        T = ids.shape[1]
        st = self.new_step_state(settled)
        self._force(0)
        self._plan = (T, T)
        x, all_done = ids, False
        for lo, hi in self._points():
            dec = None
            if hi in self.exit_set and hi < self.L:
                if decide_exits and not all_done:
                    dec = self._dec(hi)
                elif hi in draft_fill or (decide_exits and self.model.head(hi).arch == "layer"):
                    dec = ("block", hi)
            out = self.segment(lo, hi, x, T, dec=dec, prefill=True)
            x = out["h"]
            if dec is not None and dec[0] != "block":
                all_done = self.decide(hi, out, st)
        if self.L in self.exit_set:
            self._top(x, T, decide_exits and not all_done, st)
        self._plan = None
        final = self.bb.logits(self.bb.final_norm(x[:, -1]))
        st["logits"] = torch.where(st["decided"][:, None] & ~settled[:, None], st["logits"], final)
        if not decide_exits:
            st["logits"] = final
        return st

    def full_step(self, tok: torch.Tensor) -> torch.Tensor:
        self.slot += 1
        return self.segment(0, self.L, tok[:, None], self.slot, final="last")["logits"]

    def early_exit_step(self, tok: torch.Tensor, index: int, settled: torch.Tensor) -> dict:
        """One token climbs until every unsettled row has decided; pending exited tokens join it
        on the way (KV recomputation)."""
        self.slot += 1
        end = self.slot
        st = self.new_step_state(settled)
        self._force(index)
        waiting, self.pending = self.pending, []
        self._plan = (end, 1 + sum(p[1].shape[1] for p in waiting))
        x = tok[:, None]
        points = self._points()
        out = {}
        for n, (lo, hi) in enumerate(points):
            j = len(waiting)
            while j > 0 and waiting[j - 1][0] == lo:
                j -= 1
            if j < len(waiting):  # KV recomputation: exited tokens climb on with this one
                x = torch.cat([p[1] for p in waiting[j:]] + [x], dim=1)
                waiting = waiting[:j]
            top = hi == self.L and n == len(points) - 1
            final = "last" if top and self.L not in self.exit_set else None
            out = self.segment(lo, hi, x, end, final=final, dec=None if top else self._dec(hi))
            x = out["h"][:, :x.shape[1]]
            if not top and self.decide(hi, out, st):
                self.pending = waiting + [(hi, x.clone())]  # the whole block stops here
                self._plan = None
                return st
        if self.L in self.exit_set:
            done = self._top(x, end, True, st)
            self._plan = None
            if done:
                return st  # every layer holds these tokens' keys and values: nothing waits
            final = self.bb.logits(self.bb.final_norm(x[:, -1]))
        else:
            final = out["logits"]
        self._plan = None
        st["logits"] = torch.where(st["decided"][:, None], st["logits"], final.to(st["logits"].dtype))
        return st

    def self_spec_round(self, tok, settled, d: int, n_draft: int, gen, round_index: int = 0, live=None):
        """Draft up to `n_draft` tokens with exit d (one draft segment each: layers 1..d with the
        draft head, one host read: does any row still propose?), verify them with layers d+1..L
        in one segment; returns (emitted tokens per row, accepted drafts per row, drafts
        proposed in total). `live`: the host's copy of which rows are unfinished."""
        opts, B, L, gs = self.opts, self.B, self.L, self.gs
        head = self.model.head(d)
        if n_draft == 0 and B == 1 and self.replay is None and head.arch != "layer":
            # Nothing to draft: `full`'s step, one segment and its token read once. The round below
            # (draft segment, host read, verify segment, slot bookkeeping) leaves the same caches and
            # token at a cost a fast CPU notices (1.12x a full step). Sampling draws the token as the
            # round's acceptance would (the same draws from the generator). Batches keep the round for
            # the slot bookkeeping, a `layer` exit for its own cache.
            logits = self.full_step(tok)
            if opts.temperature == 0:
                return [[int(logits.argmax(-1)[0])]], [0], 0
            no_drafts = torch.zeros(1, dtype=torch.long, device=self.device)
            emitted, acc_l, _ = self.accept(logits[:, None], None, [], no_drafts, [], None, gen)
            return emitted, acc_l, 0
        forced = None
        if self.replay is not None:  # benchmarks: (drafted, accepted) of a recorded round
            forced = self.replay[round_index] if round_index < len(self.replay) else (0, 0)
        draft_ids = gs.vocab[:opts.draft_vocab] if opts.draft_vocab else None
        slot0 = self.slot
        vbuf = gs.buffer("verify", (B, opts.draft_len + 1, self.H), self.dtype, self.device)
        gs.decided.copy_(settled)  # rows that do not propose
        drafts, q_probs = [], []
        n_prop = torch.zeros(B, dtype=torch.long, device=self.device)
        cur = tok
        m = 0
        for t in range(n_draft + 1):
            last = t == n_draft
            dec = ("block", d) if last and head.arch == "layer" else (None if last else ("draft", d))
            out = self.segment(0, d, cur[:, None], slot0 + t + 1, dec=dec)
            vbuf[:, t].copy_(out["h_last"])
            if last:
                break
            if forced is not None:
                out["flags"].item()  # the host read real decoding makes, then the recorded decision
                propose = ~settled & (t < forced[0])
                any_p = t < forced[0]
            else:
                propose = out["propose"].clone()
                any_p = bool(out["flags"].item())
            if not any_p:
                break
            gs.decided |= ~propose
            if opts.temperature == 0:
                nxt = out["next"].clone()
            else:
                q = sampling_probs(self.draft_to_vocab(d, out["logits"]), opts)  # a restricted head: 0 outside K
                if draft_ids is not None:  # back to vocabulary order (0 outside the draft vocabulary)
                    q = torch.zeros(B, self.bb.vocab_size, dtype=q.dtype, device=q.device).scatter_(
                        1, draft_ids.expand(B, -1), q)
                nxt = torch.multinomial(q, 1, generator=gen).squeeze(-1)
                q_probs.append(q)
            n_prop = n_prop + propose.long()
            drafts.append(nxt)
            cur = nxt
            m += 1
        out = self.segment(d, L, vbuf[:, :m + 1], slot0 + m + 1, final="all", exact=True)
        emitted, acc_l, n_prop_l = self.accept(out["logits"], out["target"] if opts.temperature == 0 else None,
                                                drafts, n_prop, q_probs, forced, gen)
        self.keep_slots(slot0, acc_l, settled, live)
        return emitted, acc_l, sum(n_prop_l)

    def accept(self, final, target, drafts: list, n_prop, q_probs: list, forced, gen):
        """A verified round's outcome per row: (emitted tokens, accepted drafts, drafts proposed).
        Greedy (`target`: the full model's argmax at every verified position): the longest prefix
        of drafts equal to it, then its next token, with one host read; sampling: the
        speculative-sampling rule (`decode.speculative_accept`)."""
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


def run(model, ids: torch.Tensor, pad: list[int], opts, emitter, gen, device, policy=None) -> dict:
    """Decode the left-padded prompts `ids` (`pad[b]` padding tokens in row b), feeding `emitter`
    (the generate API's per-row bookkeeping). `policy`: a `DraftPolicy` (eetune.decode.policy)
    when `opts.draft_exit` is "auto". Returns engine statistics. On the CPU the backbone's
    few-row products run as `eetune.model.rows` computes them (faster there, same values)."""
    with few_rows(model):
        return _run(model, ids, pad, opts, emitter, gen, device, policy)


def _run(model, ids: torch.Tensor, pad: list[int], opts, emitter, gen, device, policy) -> dict:
    B, T = ids.shape
    L = model.backbone.num_layers
    auto = opts.draft_exit == "auto"
    draft_exit = None if auto else (opts.draft_exit or max(model.exit_layers))
    # A batch row may accept up to draft_len tokens past its own need (the round drafts for the
    # neediest row) and lead the uniform slot count by that much while others catch up.
    capacity = T + opts.max_new_tokens + 2 * opts.draft_len + 4
    eng = Engine(model, opts, B, T, pad, device, capacity)
    eng.replay = opts.replay
    if opts.mode == "self-spec" and opts.draft_context:
        eng.set_draft_context(ids, policy.candidates() if auto else [draft_exit])
    stats = {"drafted": 0, "accepted": 0, "rounds": 0, "policy": None, "round_log": [], "max_pending": 0}
    record = opts.record_logits
    done = emitter.done

    if opts.mode == "early-exit":
        st = eng.prefill(ids, True, done)
    else:
        fill = set()
        if opts.mode == "self-spec":
            cands = policy.candidates() if auto else [draft_exit]
            fill = {k for k in cands if model.head(k).arch == "layer"}
        st = eng.prefill(ids, False, done, draft_fill=fill)
    eng.passes = 0  # count the decoding phase only
    tok = choose(st["logits"], opts, gen)
    if record:
        emitter.step_logits.append((0, st["layer"].clone(), st["logits"].clone()))
    emitter.emit_step(tok, st["layer"], st["conf"])

    if opts.mode == "self-spec":
        stats["policy"] = policy
        rnd = 0
        while not emitter.all_done():
            left = emitter.max_remaining()
            if policy is not None:
                d, n = policy.choose(left - 1)
            else:
                d, n = draft_exit, min(opts.draft_len, left - 1)
            live = emitter.live()
            t_round = time.perf_counter()
            emitted, acc, proposed = eng.self_spec_round(tok, done.clone(), d, n, gen, rnd, live)
            rnd += 1
            stats["rounds"] += 1
            stats["drafted"] += proposed
            accepted = sum(a for b, a in enumerate(acc) if live[b])
            stats["accepted"] += accepted
            stats["round_log"].append((proposed, accepted))
            if policy is not None:  # the round's host read has synchronised: the clock is honest
                reached = sum(min(a + 1, n) for b, a in enumerate(acc) if live[b])
                policy.observe(d, accepted, proposed, reached, n, time.perf_counter() - t_round)
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
                stats["max_pending"] = max(stats["max_pending"], len(eng.pending))
            tok = choose(logits, opts, gen)
            if record:
                emitter.step_logits.append((index, layer.clone(), logits.clone()))
            emitter.emit_step(tok, layer, conf)
            index += 1
    stats["layer_token_passes"] = eng.passes
    stats["record_seconds"] = eng.record_seconds
    return stats

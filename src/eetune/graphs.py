"""The CUDA fast path: static shapes, then CUDA graphs per segment between exits (`--engine graphs`).

At batch 1 on a GPU both HF eager decoding and the lean engine (`engine.py`) are bound by
kernel launches: a 7B layer is about forty small kernels, each costing the host more time to
launch than the GPU takes to run it. This engine makes every launch-heavy piece of a step a
static-shape function and records it once as a CUDA graph, so a step costs a handful of graph
replays instead of thousands of launches:

- **One segment per span between exits** (layers before the first exit, between exits, after
  the last), recorded for the span's token count. In early-exit mode the segment that ends at an
  exit also computes that exit's decision (the gate, or the exit head and its confidence), so a
  token pays one replay and **one host read** per exit it reaches. The full-depth step is one
  graph; a self-spec round is one drafting graph per draft and one verification graph.
- **Static caches** (`GraphCache`): per layer, key/value buffers of a fixed capacity (rounded up
  to a multiple of 256 so later requests reuse the graphs), written at slots given by a device
  tensor and attended in full with a mask that hides every slot a query may not see. Geometry
  (positions, rotary tables, masks) is computed inside the graph from the first slot, so the
  host only writes two scalars per replay.
- **KV recomputation** joins pending exited tokens to a deeper one; a segment is recorded for
  token-count buckets 1, 2, 4 ... 64, the real tokens first, the padding after them (padding
  queries write keys at slots no real query can see yet, and their outputs are dropped).
  Larger joins run the same function uncaptured.
- The graphs, the caches and the small state tensors they read (padding, per-row lag, decided
  rows, thresholds, forced decisions) live on the model (`GraphState`), one geometry (batch size,
  capacity) at a time; a new request writes its values into them.

`compile=True` (`--compile`) first fuses each segment's kernels with `torch.compile` (inductor),
then records the compiled segment: a HF decoder layer is about forty kernels eager, a dozen
fused. Each segment and bucket compiles on its first use (seconds to minutes).

On a CPU nothing is captured: the same static-shape functions run directly, which is how the
test suite checks this engine against the reference engine. The options that need per-row work
outside a graph (`screen_vocab`, `gate_filter`, sampling) take the same decisions uncaptured.
`decode.py` stays the readable reference; `engine.py` the lean eager engine this one extends.
"""

from __future__ import annotations

import warnings

import torch

from .backbone import LayerContext
from .engine import Engine

BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # token counts segments are recorded for
CAPACITY_STEP = 256  # cache capacity is rounded up to a multiple of this (graphs are reused)


def bucket(q: int) -> int | None:
    """The smallest recorded token count that holds q tokens (None: run uncaptured)."""
    for b in BUCKETS:
        if q <= b:
            return b
    return None


class GraphCache:
    """Per-layer key/value buffers of fixed capacity. `update` writes the keys of the current
    call at the slots in `index` (B, Q) and returns the whole buffers (static shapes); the
    caller's mask hides every slot a query must not see, so stale slots never matter."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.index: torch.Tensor | None = None

    def update(self, key, value, layer_idx, cache_kwargs=None):
        i = layer_idx
        if i not in self.k:
            shape = (key.shape[0], key.shape[1], self.capacity, key.shape[3])
            self.k[i] = torch.zeros(shape, dtype=key.dtype, device=key.device)
            self.v[i] = torch.zeros(shape, dtype=value.dtype, device=value.device)
        idx = self.index[:, None, :, None].expand(key.shape)
        self.k[i].scatter_(2, idx, key)
        self.v[i].scatter_(2, idx, value)
        return self.k[i], self.v[i]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def is_compileable(self) -> bool:  # pragma: no cover - HF introspection only
        return False


class Graph:
    """`fn()` (reading static inputs, returning a dict of tensors) recorded as a CUDA graph on
    its first call, replayed on later ones; on a CPU, or if recording fails, called directly."""

    def __init__(self, fn, capture: bool):
        self.fn, self.graph, self.out = fn, None, None
        if capture:
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

    def __call__(self) -> dict:
        if self.graph is None:
            return self.fn()
        self.graph.replay()
        return self.out


class GraphState:
    """What the graphs of one geometry (batch size, cache capacity) read and write: caches,
    static inputs and the recorded graphs. Kept on the model between requests."""

    def __init__(self, model, B: int, capacity: int, device, dtype):
        self.key = state_key(model, B, capacity, device, dtype)
        self.B, self.capacity = B, capacity
        self.cache = GraphCache(capacity)
        self.exit_caches = {h.layer: GraphCache(capacity) for h in model.heads if h.arch == "layer"}
        self.arange = torch.arange(capacity, device=device)
        self.pad = torch.zeros(B, dtype=torch.long, device=device)
        self.behind = torch.zeros(B, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)  # uniform slot of the first token
        self.last = torch.zeros(1, dtype=torch.long, device=device)  # index of the last real token
        self.decided = torch.zeros(B, dtype=torch.bool, device=device)
        self.force = torch.full((B,), -1, dtype=torch.long, device=device)  # replayed decision, -1: none
        self.thr = {k: torch.zeros((), dtype=torch.float32, device=device) for k in model.exit_layers}
        self.inputs: dict = {}
        self.graphs: dict = {}
        self.rows: dict = {}  # (exit, K) -> output rows of the K most frequent tokens, refreshed per request
        self.vocab: torch.Tensor | None = None  # the model's vocab_by_frequency, copied in per request

    def buffer(self, name, shape, dtype, device) -> torch.Tensor:
        t = self.inputs.get((name, shape))
        if t is None:
            t = self.inputs[(name, shape)] = torch.zeros(shape, dtype=dtype, device=device)
        return t


def _modules(model) -> list:
    """Every module a recorded function may run: backbone layers, final norm, embeddings, heads, gates."""
    bb = model.backbone
    return [*bb.layers, bb.final_norm, bb.lm_head, bb.model.get_input_embeddings(), *model.heads,
            *(model.gate(k) for k in model.exit_layers)]


def state_key(model, B: int, capacity: int, device, dtype) -> tuple:
    """Graphs hold the addresses of the tensors they read: other modules (heads replaced, layers
    released) or parameters stored anew (`.to()`, loading) need new graphs. The state keeps the
    modules themselves alive, so an id is never reused while it is compared."""
    mods = _modules(model)
    ptrs = tuple(p.data_ptr() for m in mods if m is not None for p in m.parameters())
    return (B, capacity, str(device), dtype, tuple(model.exit_layers), tuple(id(m) for m in mods), ptrs)


def graph_state(model, B: int, capacity: int, device, dtype) -> GraphState:
    key = state_key(model, B, capacity, device, dtype)
    st = getattr(model, "_eetune_graphs", None)
    if st is None or st.key != key:
        free_graph_state(model)  # the old geometry's buffers first
        st = model._eetune_graphs = GraphState(model, B, capacity, device, dtype)
        st.modules = _modules(model)
    return st


def free_graph_state(model) -> None:
    """Drop the recorded graphs and their static caches (before training, after releasing layers)."""
    if getattr(model, "_eetune_graphs", None) is not None:
        model._eetune_graphs = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class Seg:
    """What a decision needs from the segment call that reached it (replaces engine.Step)."""

    def __init__(self, end: int, q: int, out: dict):
        self.end, self.q, self.out = end, q, out


class GraphEngine(Engine):
    """The lean engine's three step kinds over recorded segments (see the module docstring)."""

    def __init__(self, model, opts, B, T, pad, device, capacity):
        super().__init__(model, opts, B, T, pad, device, capacity)
        capacity = -(-(capacity + BUCKETS[-1]) // CAPACITY_STEP) * CAPACITY_STEP  # room for padded writes
        self.gs = gs = graph_state(model, B, capacity, device, self.dtype)
        self.cache, self.exit_caches = gs.cache, gs.exit_caches
        gs.pad.copy_(self.pad)
        gs.behind.zero_()
        gs.force.fill_(-1)
        for k, t in gs.thr.items():
            t.fill_(float(opts.exit_thresholds[k]) if opts.exit_thresholds else 2.0)
        self.capture = device.type == "cuda" and torch.cuda.is_available()
        self.kind = opts.confidence
        # Decisions fused into the segment graphs; the options that need per-row work outside a
        # graph decide with the lean engine's code (uncaptured heads).
        self.fused = opts.screen_vocab is None and opts.gate_filter is None
        self.H = model.backbone.hidden_size
        self.variant = (opts.confidence, opts.draft_vocab, opts.compile)  # what the recorded functions depend on
        self._refresh_vocab()

    # --- geometry and segments ---------------------------------------------------------------
    def _windows(self, lo: int, hi: int, exit_block: bool) -> list:
        ws = {self.win[i] for i in range(lo, hi)}
        if exit_block:
            ws.add(self.bb.layer_window(self.L - 1))
        return sorted(ws, key=lambda w: -1 if w is None else w)

    def _geometry(self, Q: int, like: torch.Tensor, windows) -> tuple:
        """Slots, layer context and masks of a block of Q queries starting at `gs.start`."""
        gs = self.gs
        qs = gs.start + gs.arange[:Q][None, :] - gs.behind[:, None]  # (B, Q) slots written
        # Padding queries (after the real ones) take the last real position: rotary scalings that
        # look at the largest position (dynamic, longrope) must see the real tokens' only.
        positions = torch.minimum(qs, qs[:, :1] + gs.last) - gs.pad[:, None]
        ctx = self.bb.context(like, positions)
        ctx = LayerContext(positions, ctx.rope, positions.clamp(min=0))
        k = gs.arange
        allowed = (k[None, None, :] <= qs[:, :, None]) & (k[None, None, :] >= gs.pad[:, None, None])
        masks = {}
        for w in windows:
            a = allowed if w is None else allowed & ((qs[:, :, None] - k[None, None, :]) < w)
            masks[w] = torch.zeros(a.shape, dtype=self.dtype, device=a.device).masked_fill_(
                ~a, torch.finfo(self.dtype).min)[:, None]
        return qs, ctx, masks

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

    def _segment_fn(self, lo: int, hi: int, x: torch.Tensor, Q: int, final: str | None, dec: tuple | None):
        """The function one segment records: embed (lo == 0) or take hidden states `x`, run layers
        lo..hi-1, then optionally the final norm + LM head (`final`: "last" or "all") or the
        decision `dec` = (kind, exit) at layer hi: ("gate", k), ("head", k) for an exit head and
        its confidence, ("draft", k) for a self-spec draft, ("block", k) for a `layer` exit's
        block alone."""
        gs, bb = self.gs, self.bb
        exit_k = dec[1] if dec else None
        block = exit_k is not None and self.model.head(exit_k).arch == "layer"

        def fn():
            like = x if lo > 0 else self.like
            qs, ctx, masks = self._geometry(Q, like, self._windows(lo, hi, block))
            self.cache.index = qs
            for c in self.exit_caches.values():
                c.index = qs
            h = bb.embed(x, ctx.positions) if lo == 0 else x
            h = self._run_layers(lo, hi, h, ctx, masks)
            out = {"h": h, "h_last": h.index_select(1, gs.last)[:, 0]}
            if final == "last":
                out["logits"] = bb.logits(bb.final_norm(out["h_last"]))
            elif final == "all":
                out["logits"] = bb.logits(bb.final_norm(h))
                out["target"] = out["logits"].argmax(-1)
            if dec is not None:
                kind, k = dec
                z = None
                if block:
                    z = self.model.head(k).norm(self._exit_block(k, h, ctx, masks).index_select(1, gs.last)[:, 0])
                    out["z"] = z
                if kind != "block":
                    out.update(self._decision(kind, k, out["h_last"], z))
            return out
        return fn

    def _decision(self, kind: str, k: int, h_last, z) -> dict:
        """Exit k's decision for the newest token, inside the graph: which undecided rows take
        the exit (`take`), and flags = [any row takes, every row has decided] for the host."""
        from .decode import confidence
        gs, opts, head = self.gs, self.opts, self.model.head(k)
        if kind == "draft":
            return self._draft(k, h_last, z)
        if kind == "gate":
            conf = self.model.gate(k)(h_last)
            out = {}
        else:
            if z is None:
                z = head.transform(h_last)
            logits = self.bb.logits(z, head.out_weight())
            conf = confidence(logits, opts.confidence)
            out = {"logits": logits}
        take = ~gs.decided & (conf >= gs.thr[k])
        take = torch.where(gs.force >= 0, ~gs.decided & (gs.force == k), take)
        out.update(conf=conf, take=take, flags=torch.stack([take.any(), (gs.decided | take).all()]))
        return out

    def _draft(self, d: int, h_last, z) -> dict:
        """A self-spec draft at exit d: proposing rows, the greedy draft and the logits."""
        from .decode import confidence
        gs, opts, head = self.gs, self.opts, self.model.head(d)
        if z is None:
            z = head.transform(h_last)
        w, b = (head.out_weight(), "head") if not opts.draft_vocab else self._static_rows(d, opts.draft_vocab)
        logits = self.bb.logits(z, w, b)
        conf = self.model.gate(d)(h_last) if self.gate_mode else confidence(logits, opts.confidence,
                                                                             self.bb.vocab_size)
        propose = ~gs.decided & (conf >= gs.thr[d])  # gs.decided: rows that stopped proposing
        nxt = logits.argmax(-1)
        if opts.draft_vocab:
            nxt = self.gs.vocab[:opts.draft_vocab][nxt]
        return {"logits": logits, "propose": propose, "next": nxt, "flags": propose.any()[None]}

    def _rows_now(self, k: int, K: int) -> tuple:
        ids = self.model.vocab_by_frequency[:K]
        b = getattr(self.bb.lm_head, "bias", None)
        return self.model.head(k).out_weight()[ids], None if b is None else b[ids]

    def _static_rows(self, k: int, K: int) -> tuple:
        """Exit k's output rows of the K most frequent tokens, in tensors whose address stays (graphs
        read them); `_refresh_vocab` rewrites them in place at every request."""
        if (k, K) not in self.gs.rows:
            self.gs.rows[(k, K)] = tuple(None if t is None else t.clone() for t in self._rows_now(k, K))
        return self.gs.rows[(k, K)]

    def _refresh_vocab(self) -> None:
        """The token ranking or the heads may have changed since the graphs were recorded."""
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

    def vocab_rows(self, k: int, K: int) -> tuple:
        return self._static_rows(k, K)

    def segment(self, lo: int, hi: int, x: torch.Tensor, end: int, final=None, dec=None,
                exact: bool = False, prefill: bool = False) -> dict:
        """Run layers lo..hi-1 on the block `x` (ids if lo == 0, else hidden states) whose last
        token has uniform slot end - 1. Replays (recording on first use) the segment for x's
        bucket; `exact`: record exactly x's token count (no padding), `prefill`: never record."""
        gs = self.gs
        q = x.shape[1]
        Q = None if prefill else (q if exact else bucket(q))
        gs.start.fill_(end - q)
        gs.last.fill_(q - 1)
        self.passes += self.B * q * (hi - lo)
        if Q is None:  # uncaptured, unpadded
            return self._segment_fn(lo, hi, x, q, final, dec)()
        key = ("seg", lo, hi, Q, final, dec, self.variant)
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
        return g()

    def set_behind(self, behind: list[int]) -> None:
        if behind != self.behind_host:
            self.gs.behind.copy_(torch.tensor(behind))

    def _head_graph(self, k: int, z_given: bool, h_last) -> torch.Tensor:
        """Exit k's logits for the newest token (after a gate fired): its transform (unless `z`
        is given: a `layer` exit's normed block output) and projection, recorded."""
        gs = self.gs
        buf = gs.buffer(("head-in", k, z_given), (self.B, self.H), h_last.dtype, h_last.device)
        buf.copy_(h_last)
        key = ("head", k, z_given, self.variant)
        g = gs.graphs.get(key)
        if g is None:
            head = self.model.head(k)

            def fn():
                z = buf if z_given else head.transform(buf)
                return {"logits": self.bb.logits(z, head.out_weight())}
            g = gs.graphs[key] = Graph(fn, self.capture)
        return g()["logits"]

    # --- decisions ---------------------------------------------------------------------------
    def decide_fused(self, k: int, out: dict, st: dict) -> bool:
        """Read exit k's in-graph decision (one host read); rows that take it get its logits."""
        any_take, all_done = out["flags"].tolist()
        if any_take:
            take = out["take"]
            if self.gate_mode:
                z = out.get("z")
                logits = self._head_graph(k, z is not None, out["z"] if z is not None else out["h_last"])
            else:
                logits = out["logits"]
            self._take(st, take, logits, k, out["conf"])
            self.gs.decided |= take
        return bool(all_done)

    def head_hidden(self, k: int, h: torch.Tensor, step) -> torch.Tensor:
        """For the lean engine's uncaptured decisions: exit k's hidden state at the last position.
        A `layer` exit's block was already run by the segment (its output is in `step.out`)."""
        if self.model.head(k).arch == "layer":
            return step.out["z"]
        return self.model.head(k).transform(h[:, -1])

    def _dec(self, k: int):
        """The decision a segment ending at exit k records."""
        if k not in self.exit_set:
            return None
        if not self.fused:
            return ("block", k) if self.model.head(k).arch == "layer" else None
        return ("gate" if self.gate_mode else "head", k)

    def _decide(self, k: int, out: dict, h: torch.Tensor, end: int, st: dict) -> bool:
        if self.fused:
            return self.decide_fused(k, out, st)
        st["decided"] = self.gs.decided.clone()
        done = super().decide(k, h, Seg(end, h.shape[1], out), st)
        self.gs.decided.copy_(st["decided"])
        return done

    def _force(self, index: int) -> None:
        """Benchmarks: the recorded exit of this token (early-exit replays only)."""
        if self.replay is not None and self.opts.mode == "early-exit":
            self.gs.force.fill_(self.replay_at(index))

    def new_step_state(self, index: int, settled: torch.Tensor) -> dict:
        st = super().new_step_state(index, settled)
        self.gs.decided.copy_(settled)
        st["decided"] = self.gs.decided
        return st

    # --- prefill and the three step kinds ----------------------------------------------------
    def _points(self, upto: int | None = None) -> list[tuple[int, int]]:
        top = self.L if upto is None else upto
        pts = sorted({0, top} | {k for k in self.exit_set if k < top})
        return list(zip(pts[:-1], pts[1:]))

    def prefill(self, ids, decide_exits, settled, draft_fill=()):
        T = ids.shape[1]
        st = self.new_step_state(0, settled)
        self._force(0)
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
            if decide_exits and not all_done and hi in self.exit_set and hi < self.L:
                all_done = self._decide(hi, out, x, T, st)
        if self.L in self.exit_set:
            if decide_exits and not all_done:
                self._decide_at_top(x, T, st)
            elif self.L in draft_fill or (decide_exits and self.model.head(self.L).arch == "layer"):
                self._top_block(x, T)  # a `layer` exit's own cache takes the prompt
        final = self.final_logits(x[:, -1])
        st["logits"] = torch.where(st["decided"][:, None] & ~settled[:, None], st["logits"], final)
        if not decide_exits:
            st["logits"] = final
        return st

    def _top_block(self, h, end) -> dict:
        """Run the block of a `layer` exit placed after the last layer (uncaptured)."""
        gs = self.gs
        gs.start.fill_(end - h.shape[1])
        gs.last.fill_(h.shape[1] - 1)
        return self._segment_fn(self.L, self.L, h, h.shape[1], None, ("block", self.L))()

    def _decide_at_top(self, h, end, st) -> bool:
        """An exit after the last layer: its decision runs on the final hidden states."""
        k = self.L
        if self.fused and self.model.head(k).arch != "layer":
            out = {"h_last": h[:, -1]}
            out.update(self._decision("gate" if self.gate_mode else "head", k, h[:, -1], None))
            return self.decide_fused(k, out, st)
        # a `layer` exit at the top (or unfused options): the lean engine's code, block uncaptured
        gs = self.gs
        out = self._top_block(h, end) if self.model.head(k).arch == "layer" else {}
        st["decided"] = gs.decided.clone()
        done = Engine.decide(self, k, h, Seg(end, h.shape[1], out), st)
        gs.decided.copy_(st["decided"])
        return done

    def full_step(self, tok: torch.Tensor) -> torch.Tensor:
        self.slot += 1
        return self.segment(0, self.L, tok[:, None], self.slot, final="last")["logits"]

    def early_exit_step(self, tok: torch.Tensor, index: int, settled: torch.Tensor) -> dict:
        self.slot += 1
        end = self.slot
        st = self.new_step_state(index, settled)
        self._force(index)
        waiting, self.pending = self.pending, []
        x = tok[:, None]
        points = self._points()
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
            if not top and self._decide(hi, out, x, end, st):
                self.pending = waiting + [(hi, x.clone())]  # the whole block stops here
                return st
        if self.L in self.exit_set:
            if self._decide_at_top(x, end, st):
                self.pending = waiting + [(self.L, x.clone())]
                return st
            final = self.final_logits(x[:, -1])
        else:
            final = out["logits"]
        st["logits"] = torch.where(st["decided"][:, None], st["logits"], final.to(st["logits"].dtype))
        return st

    def self_spec_round(self, tok, settled, d, n_draft, gen, draft_weight=None, draft_bias=None, draft_ids=None,
                        round_index=0, live=None):
        """As the lean engine's round, over recorded segments: each draft is one replay of layers
        1..d with the draft head fused in (one host read: does any row still propose?), the
        verification one replay of layers d+1..L with the LM head over every position."""
        from .decode import sampling_probs
        opts, B, L, gs = self.opts, self.B, self.L, self.gs
        head = self.model.head(d)
        forced = None
        if self.replay is not None:
            forced = self.replay[round_index] if round_index < len(self.replay) else (0, 0)
        slot0 = self.slot
        vbuf = gs.buffer("verify", (B, self.opts.draft_len + 1, self.H), self.dtype, self.device)
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
                q = sampling_probs(out["logits"], opts)
                if draft_ids is not None:
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

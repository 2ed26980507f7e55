"""The draft policy and cost measurement: what a decoder layer, the LM head and each exit head
cost on this machine (`measure_costs`, timed with the engine itself), and `DraftPolicy`, which
picks the draft exit and draft length of each self-speculation round from those costs and the
acceptance observed so far (`draft_exit="auto"`). `eetune.measure` (evaluate, calibrate, scan)
reads the same costs.
"""

from __future__ import annotations

import math
import time

import torch

from eetune.decode.engine import Engine, Graph
from eetune.model.rows import few_rows


def measure_costs(model, opts) -> dict:
    """Seconds for one token through one decoder layer and through the final norm + LM head, as
    they cost while decoding with this engine: the layer cost is a whole trunk pass (every
    layer's weights streamed from memory, as in a real step) divided by the number of layers,
    the final norm + LM head cost a whole step minus the trunk, and never less than timed alone.
    Also a 5-token block (verification), each exit's transform, and its projection: the head's
    own (what `head.project` computes on its transform's output: K + 1 rows for a
    restricted-vocabulary head, the whole vocabulary otherwise), timed as the engine's decisions
    run it (its weights as the engine reads them, recorded on a GPU), never assumed to be the LM
    head's. Measured once per model (cached on it) on a 64-token context, best of 5 (on a GPU the segments are recorded first, outside the timing).

    The projection is timed in place too (a segment ending in the exit's decision against the same
    segment without it): a small head that stays in the caches when timed alone is read from memory
    in a real step, after the layers' weights have passed through the caches.

    Returns {"layer", "layer_x5", "final", "final_x5" (seconds), "num_layers", "heads": {exit:
    {"transform", "projection", "projection_alone" (seconds), "classes" (the head's output width C:
    V, or K + 1)}}}."""
    cached = getattr(model, "_eetune_costs", None)
    if cached is not None:
        return cached
    with torch.no_grad(), few_rows(model):  # as the engine decodes (eetune.model.rows on a CPU)
        costs = _measure(model, opts)
    model._eetune_costs = costs
    return costs


def _measure(model, opts) -> dict:
    bb = model.backbone
    dev = next(bb.model.parameters()).device
    L, T = bb.num_layers, 64
    eng = Engine(model, opts, 1, T, [0], dev, capacity=T + 8)
    ids = (torch.arange(T, device=dev)[None] * 7919) % bb.vocab_size
    eng.prefill(ids, False, torch.zeros(1, dtype=torch.bool, device=dev))

    def timeit(fn, reps: int = 5) -> float:
        fn()  # warm-up (records the segment on a GPU)
        _sync(dev)
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            _sync(dev)
            best = min(best, time.perf_counter() - t0)
        return best

    def timeit_pair(fa, fb, reps: int = 5) -> tuple[float, float]:
        """Best times of two functions timed in alternation, so that their difference (a cost
        measured as "with" less "without") does not take in a change of the machine's speed
        between two separate timings."""
        fa(), fb()
        _sync(dev)
        best = [math.inf, math.inf]
        for _ in range(reps):
            for i, fn in enumerate((fa, fb)):
                t0 = time.perf_counter()
                fn()
                _sync(dev)
                best[i] = min(best[i], time.perf_counter() - t0)
        return best[0], best[1]

    def trunk(q: int, head: bool):
        x = ids[:, :q]
        return lambda: eng.segment(0, L, x, T + q, final="all" if head else None, exact=True)

    t1, t1h = timeit_pair(trunk(1, False), trunk(1, True))
    t5, t5h = timeit_pair(trunk(5, False), trunk(5, True))
    x5 = bb.embed(ids[:, -5:], torch.zeros(1, 5, dtype=torch.long, device=dev))
    x1 = x5[:, -1]
    # The final norm + LM head is the step with it less the step without; never less than timed alone
    # (a noisy machine's difference of two timings once came out at 1/70 of the head's own time).
    f1, f5 = (timeit(lambda x=x: bb.logits(bb.final_norm(x))) for x in (x1, x5))
    costs = {"layer": t1 / L, "layer_x5": t5 / L, "final": max(t1h - t1, f1), "final_x5": max(t5h - t5, f5),
             "num_layers": L, "heads": {}}
    for head in model.heads:
        # a `layer` exit's block costs about one decoder layer; the others are timed
        branch = costs["layer"] if head.arch == "layer" else timeit(lambda: head.transform(x1))
        z = head.norm(x1) if head.arch == "layer" else head.transform(x1)  # what the projection reads
        alone = _projection_seconds(eng, head, z, timeit)
        k = head.layer
        if k < L and head.arch != "layer":
            # In place, as a decode step meets it: the layers before it have just streamed their weights
            # through the caches, so a head small enough to stay cached when timed alone (a restricted
            # one) is read from memory here. The exit's whole decision (transform, projection,
            # confidence) is the segment with the decision minus the segment without; the projection
            # is that less the transform, and never less than when timed alone.
            x = ids[:, -1:]
            with_dec, plain = timeit_pair(lambda: eng.segment(0, k, x, T + 1, dec=("head", k), exact=True),
                                          lambda: eng.segment(0, k, x, T + 1, exact=True), reps=9)
            projection = max(alone, with_dec - plain - branch)
        else:
            projection = alone
        costs["heads"][k] = {"transform": branch, "projection": projection, "projection_alone": alone,
                             "classes": head.num_classes}
    return costs


def _projection_seconds(eng, head, z, timeit) -> float:
    """Seconds of exit `head`'s projection of one token's `z`, as the engine's decisions run it
    (the projection the engine reads, recorded as a CUDA graph on a GPU)."""
    buf = z.detach().clone()
    graph = Graph(lambda: {"logits": eng.bb.logits(buf, *eng._proj(head.layer)[:2])}, eng.capture)
    eng.record_seconds += graph.seconds
    return timeit(graph)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def policy_candidates(model) -> list[int]:
    """Exits `--draft-exit auto` may draft with: those below the last layer, and an exit after the
    last layer whose head is restricted (K tokens + OTHER: its drafts run the whole trunk but save
    the LM head, which pays where the head is a large part of a token, as on Gemma-3)."""
    L = model.backbone.num_layers
    cands = [k for k in model.exit_layers if k < L or (k == L and model.head(k).restricted)]
    cands = cands or [max(model.exit_layers)]
    return cands[-1:] if model.config.arch == "layer" else cands


class DraftPolicy:
    """`--draft-exit auto`: choose the draft exit d and the draft length n of each round.

    A round drafts n tokens through layers 1..d (and one more token, the last, through the same
    layers), projects each draft with exit d's head, and verifies n + 1 tokens through layers
    d+1..L and the LM head. With a per-draft acceptance rate a (drafts are accepted in order,
    the first rejection ends the round), the round emits 1 + a + a^2 + ... + a^n tokens. So:

        cost(d, n)    = (n + 1) * d * c_layer + n * c_head(d) + c_block(d)
                        + (L - d) * c_layer(n + 1) + c_final(n + 1)
        emitted(d, n) = (1 - a_d^(n + 1)) / (1 - a_d)
        pick (d, n) maximising emitted / (cost * s[n > 0]), n in 0..draft_len (n = 0: a full step)

    s[drafting] and s[full step] calibrate the model against the clock: each is a running mean
    (weight 0.2) of measured ÷ modelled seconds of the rounds of that kind so far.

    c_head(d) is exit d's transform and its projection as measured (`measure_costs`: a
    restricted-vocabulary head's own K + 1 rows; with `--draft-vocab K` an unrestricted
    head's measured projection scaled by K / V), paid once per draft; c_block(d) is a `layer`
    exit's block once more, for the round's last token (its cache must hold it; 0 for the
    other architectures).
    c_layer(q) and c_final(q) for a block of q tokens are interpolated between the measured
    costs of 1 and 5 tokens. a_d starts from a prior worth 8 drafts (the exit's held-out top-1
    agreement with the final layer when `tune --gates` reported it, else 0.2 + 0.4 d / L), then
    follows what exit d's draft positions have given so far in this request: accepted drafts over
    the positions reached (a round asked for n drafts reaches min(accepted + 1, n) positions). A
    position whose draft the exit declines to propose (its confidence below the threshold) counts
    as a miss, as a rejected draft does: the round has paid for that draft segment and emits one
    token, like a full step that cost more. When no draft pays, a plain full step is taken, and
    after 16 such rounds one token is drafted to keep measuring; each probe that gets nothing
    accepted doubles that interval (up to 256), one that does resets it.

    With a `memory` (a dict the caller keeps per model and per decoding setting: threshold,
    confidence, draft length and vocabulary, sampling, batch size), a request starts where the
    last one ended: its prior is the last request's final acceptance (still worth 8 drafts), and
    the clock calibration and probe interval carry over. Without it every request relearns, and
    a request of a hundred tokens spends a good part of them unlearning a prior the threshold
    makes optimistic (SmolLM2 on a fast CPU: about 34 rounds per request drafting at an exit
    that declined almost every draft).
    Candidates are the exits below the last layer and a restricted exit after it (`layer` exits:
    the deepest only, since each would need its own cache filled on every round).
    """

    PRIOR_WEIGHT = 8.0

    def candidates(self) -> list[int]:
        return list(self.prior)

    def __init__(self, model, costs: dict, draft_len: int, draft_vocab: int | None, verbose: bool = False,
                 memory: dict | None = None):
        self.model, self.costs, self.draft_len, self.verbose = model, costs, draft_len, verbose
        L = costs["num_layers"]
        self.L = L
        V = model.backbone.vocab_size
        self.head_cost, self.block_cost = {}, {}
        for k, c in costs["heads"].items():
            proj = c["projection"] * ((draft_vocab / V) if draft_vocab else 1.0)
            self.head_cost[k] = c["transform"] + proj
            # a `layer` exit's block also takes the round's last token (its cache must hold it)
            self.block_cost[k] = c["transform"] if model.head(k).arch == "layer" else 0.0
        report = ((model.config.gates or {}).get("report") or {}).get("exits", {})
        self.prior = {k: float(report.get(str(k), {}).get("agreement", 0.2 + 0.4 * k / L))
                      for k in policy_candidates(model)}
        self.stats = {k: [0, 0, 0] for k in self.prior}  # accepted, drafted (proposed), positions reached
        self.rounds_without_drafts = 0
        self.probe_every, self.probing = self.PROBE_EVERY, False
        # Calibration: measured ÷ modelled seconds of rounds with drafts and of plain full steps
        # (per-round work the model leaves out: embedding, step set-up, host reads, bookkeeping).
        self.scale = {True: 1.0, False: 1.0}
        self.memory = memory
        if memory:
            self.prior.update({k: r for k, r in memory["rate"].items() if k in self.prior})
            self.scale = dict(memory["scale"])
            self.probe_every = memory["probe_every"]

    def remember(self) -> None:
        """Leave this request's final acceptance, clock calibration and probe interval in the
        memory the next request with the same setting starts from."""
        if self.memory is not None:
            self.memory.update(rate={k: self.rate(k) for k in self.prior}, scale=dict(self.scale),
                               probe_every=self.probe_every)

    def _block(self, one: float, five: float, q: int) -> float:
        return one + (five - one) * (q - 1) / 4.0

    def rate(self, d: int) -> float:
        acc, _, reached = self.stats[d]
        w = self.PRIOR_WEIGHT
        return min(0.99, (self.prior[d] * w + acc) / (w + reached))

    def cost(self, d: int, n: int) -> float:
        c = self.costs
        return ((n + 1) * d * c["layer"] + n * self.head_cost[d] + self.block_cost[d]
                + (self.L - d) * self._block(c["layer"], c["layer_x5"], n + 1)
                + self._block(c["final"], c["final_x5"], n + 1))

    def emitted(self, d: int, n: int) -> float:
        a = self.rate(d)
        return (1 - a ** (n + 1)) / (1 - a)

    PROBE_EVERY = 16  # rounds without drafting after which one draft is tried (acceptance drifts)
    PROBE_EVERY_MAX = 256  # ... doubled by each probe that gets nothing accepted, up to this

    def choose(self, max_n: int) -> tuple[int, int]:
        best, pick = -1.0, (max(self.prior) if self.prior else self.L, 0)
        for d in self.prior:
            for n in range(0, min(self.draft_len, max_n) + 1):
                v = self.emitted(d, n) / (self.cost(d, n) * self.scale[n > 0])
                if v > best:
                    best, pick = v, (d, n)
        self.probing = False
        if pick[1] == 0 and max_n >= 1:
            self.rounds_without_drafts += 1
            if self.rounds_without_drafts >= self.probe_every:  # probe the exit closest to paying
                self.rounds_without_drafts, self.probing = 0, True
                d = max(self.prior, key=lambda e: self.emitted(e, 1) / self.cost(e, 1))
                return d, 1
        else:
            self.rounds_without_drafts = 0
        return pick

    def observe(self, d: int, accepted: int, drafted: int, reached: int, n: int | None = None,
                seconds: float | None = None) -> None:
        """Record a round of exit d: drafts accepted, drafts proposed, and draft positions reached
        (summed over the batch's live rows, each min(its accepted + 1, n)); with `n` (the draft
        length asked) and `seconds` (its wall time), update the calibration of that kind of round."""
        self.stats[d][0] += accepted
        self.stats[d][1] += drafted
        self.stats[d][2] += reached
        if self.probing:
            self.probe_every = self.PROBE_EVERY if accepted else min(2 * self.probe_every, self.PROBE_EVERY_MAX)
            self.probing = False
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
                         f"layers), acceptance {self.rate(d):.2f} ({self.stats[d][0]} accepted / {self.stats[d][2]} draft "
                         f"positions, {self.stats[d][1]} proposed), best n "
                         f"{best}: expected speedup {speed:.2f}x")
        return "\n".join(lines)

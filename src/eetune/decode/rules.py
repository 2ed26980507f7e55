"""Decision rules: how a token is chosen and whether an exit or a draft is trusted.

- `confidence`: an exit's max softmax probability (the paper's rule); `gate` confidences come
  from the exits' gates (`eetune.model.gates`), computed by the engine. A restricted-vocabulary
  head's (K tokens + OTHER) confidence is its max-prob over all K + 1 classes, and a token
  leaves there only where OTHER does not win (`not_other`).
- `sampling_probs`: the distribution a token is drawn from (temperature, then top-k, then top-p);
  `choose`: greedy argmax or a draw from it.
- `speculative_accept`: the speculative-sampling acceptance rule of self-speculation.

Plain functions on tensors, used by the engine and by the tests' reference decoder alike.
"""

from __future__ import annotations

import torch

from eetune.errors import EETuneError

CONFIDENCES = ("max-prob", "gate")


def confidence(logits: torch.Tensor, kind: str = "max-prob", vocab_size: int | None = None) -> torch.Tensor:
    """Per-row max softmax probability of a (B, C) logits tensor (the paper's confidence; `gate`
    confidences come from the exits' gates, not from logits). For a restricted head C = K + 1
    and the max is over every class, OTHER included. `vocab_size` is accepted for draft-vocabulary
    logits and changes nothing: max-prob over K tokens is the max-prob of logits masked to -inf
    outside them."""
    if kind != "max-prob":
        raise EETuneError(f"confidence {kind!r} is not computed from logits: use max-prob")
    return logits.float().softmax(-1).amax(-1)


def not_other(logits: torch.Tensor, other: int | None) -> torch.Tensor:
    """Rows (...,) of a restricted head's logits (..., C) whose top-1 is a token, not the OTHER
    class at index `other` (None: the head has no OTHER, every row qualifies). A tie with OTHER
    goes to the token (argmax takes the first maximum; OTHER is the last class)."""
    if other is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    return logits.argmax(-1) != other


TOP_P_CANDIDATES = 1024  # top-p looks among this many most likely tokens first (a full sort only if it must)


def sampling_probs(logits: torch.Tensor, opts: DecodeOptions) -> torch.Tensor:
    """The distribution tokens are drawn from: temperature, then top-k, then top-p.

    Top-p keeps the smallest prefix of the tokens sorted by probability whose mass reaches
    `top_p`. That prefix lies among the `TOP_P_CANDIDATES` most likely tokens whenever their mass
    reaches `top_p` (every token after them has at least that much before it), so those are
    taken with `topk` and the whole vocabulary is sorted only when some row's candidates fall
    short: a full sort of a 262k vocabulary costs twice Gemma-3's LM head on a CPU. The result is
    the full sort's (tests/test_rules.py keeps that as the reference). On a GPU every token is
    taken (`topk` of the whole vocabulary: a sort)."""
    x = logits.float() / opts.temperature
    if opts.top_k:
        kth = x.topk(min(opts.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = x.softmax(-1)
    if opts.top_p < 1.0:
        # on a CPU only: the check reads a value back, which a GPU (whose sort is fast) would wait for
        n = min(TOP_P_CANDIDATES, probs.shape[-1]) if probs.device.type == "cpu" else probs.shape[-1]
        sorted_p, idx = probs.topk(n, dim=-1)  # sorted, largest first
        cum = sorted_p.cumsum(-1)
        if n < probs.shape[-1] and not bool((cum[..., -1] >= opts.top_p).all()):
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

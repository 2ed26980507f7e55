"""Evaluation: how good each exit is, measured against the data and against the full model.

`exit_metrics` runs teacher-forced over token blocks and reports, per exit: next-token
cross-entropy, top-1 agreement with the final layer's prediction, and the share of tokens whose
max-softmax probability reaches 0.9 (with the agreement among those: how often a confident
early exit would have emitted the full model's token). The final layer's cross-entropy is
reported alongside as the floor. `format_gate_report` prints the held-out report of learned
exit gates (`eetune.gates.gate_report`) beside the max-prob confidence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@torch.no_grad()
def exit_metrics(model, blocks: torch.Tensor, batch_size: int = 8, confident: float = 0.9,
                 progress: bool = True) -> dict:
    """Per-exit metrics over `blocks` (N, T) of token ids. Returns
    {"exits": {k: {"ce", "agreement", "confident_share", "confident_agreement"}}, "final_ce", "tokens"}."""
    sums = {k: {"ce": 0.0, "agree": 0, "conf": 0, "conf_agree": 0} for k in model.exit_layers}
    final_ce, tokens = 0.0, 0
    batches = range(0, blocks.shape[0], batch_size)
    for a in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        ids = blocks[a:a + batch_size]
        out = model(ids, final=True)
        targets = ids[:, 1:].reshape(-1)
        final = out.final_logits[:, :-1].float().reshape(-1, out.final_logits.shape[-1])
        final_ce += F.cross_entropy(final, targets, reduction="sum").item()
        final_pred = final.argmax(-1)
        tokens += targets.numel()
        for k, logits in out.exit_logits.items():
            lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            s = sums[k]
            s["ce"] += F.cross_entropy(lg, targets, reduction="sum").item()
            pred = lg.argmax(-1)
            s["agree"] += (pred == final_pred).sum().item()
            conf = lg.softmax(-1).amax(-1) >= confident
            s["conf"] += conf.sum().item()
            s["conf_agree"] += ((pred == final_pred) & conf).sum().item()
    exits = {}
    for k, s in sums.items():
        exits[k] = {"ce": s["ce"] / tokens, "agreement": s["agree"] / tokens,
                    "confident_share": s["conf"] / tokens,
                    "confident_agreement": (s["conf_agree"] / s["conf"]) if s["conf"] else float("nan")}
    return {"exits": exits, "final_ce": final_ce / tokens, "tokens": tokens, "confident_threshold": confident}


def format_metrics(metrics: dict) -> str:
    """A plain-text table of `exit_metrics` output."""
    thr = metrics["confident_threshold"]
    lines = [f"{'exit':>8} {'CE':>7} {'agree':>7} {f'p>={thr:g}':>8} {'(agree)':>8}"]
    for k, m in metrics["exits"].items():
        lines.append(f"{'layer ' + str(k):>8} {m['ce']:7.3f} {m['agreement']:7.3f} {m['confident_share']:8.1%} "
                     f"{m['confident_agreement']:8.1%}")
    lines.append(f"{'final':>8} {metrics['final_ce']:7.3f} {1.0:7.3f}")
    lines.append(f"({metrics['tokens']} held-out tokens; CE = next-token cross-entropy in nats; agree = top-1 "
                 f"agreement with the final layer)")
    return "\n".join(lines)


def format_gate_report(report: dict, indent: str = "") -> str:
    """A plain-text table of `eetune.gates.gate_report` output: per exit and threshold, the
    gate's coverage and precision beside those of the exit's max-softmax confidence."""
    def pct(x):
        return f"{x:7.1%}" if x is not None else f"{'-':>7}"

    lines = [f"gates vs max-prob on {report['tokens']:,} held-out tokens (coverage = share of tokens with "
             f"confidence >= t; precision = top-1 agreement with the final layer among them)"]
    for k, e in report["exits"].items():
        gated = "" if e.get("has_gate", True) else "  (no gate)"
        lines.append(f"exit after layer {k}: agreement {e['agreement']:.3f} on all tokens{gated}")
        lines.append(f"  {'t':>5}  {'gate cov':>8} {'prec':>7}  {'max-prob cov':>12} {'prec':>7}")
        for i, t in enumerate(report["thresholds"]):
            g, m = e["gate"], e["max_prob"]
            lines.append(f"  {t:>5g}  {pct(g['coverage'][i]):>8} {pct(g['precision'][i])}  "
                         f"{pct(m['coverage'][i]):>12} {pct(m['precision'][i])}")
    return "\n".join(indent + line for line in lines)


# --- generation quality ---------------------------------------------------------------------
def _words(text: str) -> list[str]:
    import re
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: list, b: list) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 (longest common subsequence of lower-cased alphanumeric words; the
    summary-level variant of Lin 2004 without stemming)."""
    c, r = _words(candidate), _words(reference)
    if not c or not r:
        return 0.0
    lcs = _lcs(c, r)
    if lcs == 0:
        return 0.0
    p, q = lcs / len(c), lcs / len(r)
    return 2 * p * q / (p + q)


def token_agreement(ids: list[int], ref_ids: list[int]) -> float:
    """Share of positions holding the same token in both generations (over the longer one)."""
    if not ref_ids:
        return 1.0 if not ids else 0.0
    same = sum(1 for a, b in zip(ids, ref_ids) if a == b)
    return same / max(len(ref_ids), len(ids))

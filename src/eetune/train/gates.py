"""Fitting gates: learned exit decisions (CALM's "early-exit classifier", for decoder LMs).

A gate is a linear probe on an exit's *input* hidden state (the trunk's hidden state after
layer k) that predicts whether the exit's top-1 token equals the final layer's top-1 token. For a
restricted-vocabulary head (K token ids + OTHER) the top-1 is mapped back to a token id
(`ExitHead.predict`): where OTHER wins the exit knows no token, and the position is a negative.
Decoding with `--confidence gate` evaluates the gate first and runs the exit's head (its MLP and
its vocabulary projection) only when the gate fires, so a token that does not leave pays one
dot product at that exit instead of a 49,152-row matrix product.

The probe reads the hidden state divided by its root mean square (no learned scale): the
residual stream of many models carries a few huge coordinates and a norm that grows with
depth, which a raw linear probe would have to fight. On a fixed input this is still a linear
function of the direction of `h`; the gate's output is `sigmoid(w . h/rms(h) + b)`.

Training (`train_gates`, behind `eetune tune --gates` and `--gates-only`) keeps backbone and
heads frozen and fits the probes by logistic regression on labels from the final layer;
`gate_report` measures them on held-out blocks against the exit's own max-softmax confidence.

    from eetune.train.gates import train_gates, gate_report
    summary = train_gates(model, train_blocks, val_blocks)   # attaches model.gates
    report = gate_report(model, other_blocks)                 # coverage / precision per threshold
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from eetune.model.gates import ExitGate
from eetune.progress import progress_display


# --- training and reporting ------------------------------------------------------------------
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _autocast(model):
    """bf16 autocast when the backbone is bf16 (heads may be kept in fp32), else nothing."""
    dtype = next(model.backbone.model.parameters()).dtype
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(next(model.backbone.model.parameters()).device.type, dtype=dtype)


def _progress(total: int, desc: str, unit: str, progress: bool, lines: bool | None):
    """A tqdm bar on a terminal (`progress`), or where stderr is not a terminal and `lines`
    (None: as `progress`), a status line every ~30 s with an ETA (eetune.progress.progress_display)."""
    return progress_display(total, desc, unit, bar=progress, lines=progress if lines is None else lines)


def _exit_batches(model, blocks: torch.Tensor, batch_size: int, desc: str, progress: bool,
                  lines: bool | None = None):
    """Teacher-forced full-depth passes over `blocks`, one batch at a time. Yields, per batch,
    {exit layer: (input hidden state (n, H), exit logits (n, C))} and the final layer's top-1
    (n,), for every position but the last of each block (n = batch * (T - 1)). C is the head's
    class count (V, or K + OTHER for a restricted head: `model.head(k).predict` reads them)."""
    dev = next(model.backbone.model.parameters()).device
    starts = range(0, blocks.shape[0], batch_size)
    bar = _progress(len(starts), desc, "batch", progress, lines)
    t0, tokens = time.monotonic(), 0
    try:
        for a in starts:
            ids = blocks[a:a + batch_size].to(dev)
            with torch.no_grad(), _autocast(model):
                out = model(ids, final=True, return_hidden=True)
            final_top1 = out.final_logits[:, :-1].argmax(-1).reshape(-1)
            per_exit = {}
            for k in model.exit_layers:
                h = out.exit_hidden[k][:, :-1]
                lg = out.exit_logits[k][:, :-1]
                per_exit[k] = (h.reshape(-1, h.shape[-1]), lg.reshape(-1, lg.shape[-1]))
            del out
            yield per_exit, final_top1
            tokens += ids.numel()
            bar.set_postfix({"tok/s": f"{tokens / max(time.monotonic() - t0, 1e-9):,.0f}"}, refresh=False)
            bar.update(1)
    finally:
        bar.close()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 300, l2: float = 1e-2) -> tuple:
    """Logistic regression of labels `y` (n,) in {0, 1} on features `x` (n, d): full-batch
    L-BFGS on the mean binary cross-entropy + l2/2 * |w|^2, fitted on standardised features
    (each column to mean 0, std 1, which keeps the problem well conditioned) and folded back,
    so that `x @ w + b` is the logit. Returns (w, b, final mean cross-entropy, iterations)."""
    x, y = x.float(), y.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    base = y.mean().clamp(1e-4, 1 - 1e-4)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.log(base / (1 - base)).reshape(1).requires_grad_(True)  # start at the base rate
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        ce = F.binary_cross_entropy_with_logits(z @ w + b, y).item()
        w_x = w / std
        b_x = b - (w * mean / std).sum()
    return w_x.detach(), b_x.detach(), ce, int(opt.state[w].get("n_iter", 0))


def train_gates(model, blocks: torch.Tensor, val_blocks: torch.Tensor, batch_size: int = 8, steps: int = 300,
                l2: float = 1e-2, thresholds=THRESHOLDS, progress: bool = True, lines: bool | None = None) -> dict:
    """Fit a gate per exit of `model` and attach them (`model.set_gates`). Backbone and heads are
    frozen: one full-depth pass over `blocks` (N, T) collects, for every exit k and every
    position but the last of a block, the features of the exit's input hidden state and the
    label "exit k's top-1 == the final layer's top-1"; each gate is then a logistic regression
    on those (`fit_logistic`). Returns a summary: tokens, seconds, per-exit training cross-
    entropy and label rate, and `gate_report` on `val_blocks`. The heads run in eval mode (no
    dropout), the model's previous mode put back after. `progress`: tqdm bars on a terminal;
    `lines`: where stderr is not a terminal, a status line every ~30 s with an ETA instead (None:
    when `progress`; `eetune tune` passes True, whatever its --no-progress)."""
    from eetune.model.early_exit import eval_mode

    t0 = time.time()
    with eval_mode(model):
        feats = {k: [] for k in model.exit_layers}
        labels = {k: [] for k in model.exit_layers}
        for per_exit, final_top1 in _exit_batches(model, blocks, batch_size, "gate features", progress, lines):
            for k, (h, lg) in per_exit.items():
                feats[k].append(ExitGate.features(h).cpu())
                # the head's top-1 token (a restricted head's mapped id; -1 where OTHER wins: a negative)
                labels[k].append((model.head(k).predict(lg)[1] == final_top1).cpu())
        collect_s = time.time() - t0
        dev = next(model.backbone.model.parameters()).device
        gates, fits = {}, {}
        bar = _progress(len(model.exit_layers), "gate fit", "exit", progress, lines)
        for k in model.exit_layers:
            x, y = torch.cat(feats[k]), torch.cat(labels[k])
            feats[k] = labels[k] = None  # free as we go
            w, b, ce, iters = fit_logistic(x, y, steps=steps, l2=l2)
            gate = ExitGate(x.shape[1], device=dev)
            with torch.no_grad():
                gate.weight.copy_(w)
                gate.bias.copy_(b)
            gate.requires_grad_(False)
            gate.eval()
            gates[k] = gate
            fits[str(k)] = {"label_rate": y.float().mean().item(), "train_ce": ce, "lbfgs_iterations": iters}
            bar.update(1)
        bar.close()
        model.set_gates(gates)
        fit_s = time.time() - t0 - collect_s
        report = gate_report(model, val_blocks, thresholds, batch_size=batch_size, progress=progress, lines=lines)
    return {"tokens": int(blocks.shape[0] * (blocks.shape[1] - 1)), "blocks": int(blocks.shape[0]),
            "seq_len": int(blocks.shape[1]), "fit": fits, "steps": steps, "l2": l2,
            "collect_s": round(collect_s, 3), "fit_s": round(fit_s, 3), "seconds": round(time.time() - t0, 3),
            "report": report}


@torch.no_grad()
def gate_report(model, blocks: torch.Tensor, thresholds=THRESHOLDS, batch_size: int = 8,
                progress: bool = False, lines: bool | None = None) -> dict:
    """How well each exit's gate picks the tokens on which the exit agrees with the final
    layer, against the max-softmax confidence of the exit itself, on held-out `blocks` (the
    last position of each block is left out). Per exit and threshold t: `coverage`, the share
    of tokens whose gate probability (max-prob) is >= t, and `precision`, the top-1 agreement
    with the final layer among them (None where no token is covered). A restricted head's token
    never leaves where OTHER wins (its top-1 is no token), whatever the confidence. Lists follow
    `thresholds`; `agreement` is the exit's overall agreement rate, `tokens` the token count.
    The heads run in eval mode, the model's previous mode put back after."""
    from eetune.model.early_exit import eval_mode

    with eval_mode(model):
        return _gate_report(model, blocks, thresholds, batch_size, progress, lines)


def _gate_report(model, blocks: torch.Tensor, thresholds, batch_size: int, progress: bool,
                 lines: bool | None) -> dict:
    thresholds = [float(t) for t in thresholds]
    t = torch.tensor(thresholds)
    counts = {k: {"agree": 0, "gate_n": torch.zeros(len(t)), "gate_ok": torch.zeros(len(t)),
                  "prob_n": torch.zeros(len(t)), "prob_ok": torch.zeros(len(t))} for k in model.exit_layers}
    tokens = 0
    for per_exit, final_top1 in _exit_batches(model, blocks, batch_size, "gate report", progress, lines):
        tokens += final_top1.numel()
        for k, (h, lg) in per_exit.items():
            c = counts[k]
            lg = lg.float()
            top1 = model.head(k).tokens_of(lg.argmax(-1))  # a restricted head's token id; OTHER -> -1
            ok = (top1 == final_top1).cpu()
            can = (top1 >= 0).cpu()  # OTHER did not win: the token may leave here
            max_prob = torch.exp(lg.amax(-1) - torch.logsumexp(lg, -1)).cpu()  # over every class, OTHER too
            gate = model.gate(k)
            gate_prob = gate(h).cpu() if gate is not None else torch.zeros_like(max_prob)
            c["agree"] += int(ok.sum())
            for name, p in (("gate", gate_prob), ("prob", max_prob)):
                hit = (p[None, :] >= t[:, None]) & can[None, :]  # (thresholds, n)
                c[f"{name}_n"] += hit.sum(1)
                c[f"{name}_ok"] += (hit & ok[None, :]).sum(1)
    exits = {}
    for k, c in counts.items():
        row = {"agreement": c["agree"] / max(tokens, 1), "has_gate": model.gate(k) is not None}
        for name, key in (("gate", "gate"), ("max_prob", "prob")):
            n, good = c[f"{key}_n"].tolist(), c[f"{key}_ok"].tolist()
            row[name] = {"coverage": [x / max(tokens, 1) for x in n],
                         "precision": [g / x if x else None for g, x in zip(good, n)],
                         "count": [int(x) for x in n]}
        exits[str(k)] = row
    return {"thresholds": thresholds, "tokens": tokens, "exits": exits}

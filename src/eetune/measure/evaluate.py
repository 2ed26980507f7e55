"""Evaluation: how good each exit is, measured against the data and against the full model.

`exit_metrics` runs teacher-forced over token blocks and reports, per exit: next-token
cross-entropy, top-1 agreement with the final layer's prediction, and the share of tokens whose
max-softmax probability reaches 0.9 (with the agreement among those: how often a confident
early exit would have emitted the full model's token). The final layer's cross-entropy is
reported alongside as the floor. `format_gate_report` prints the held-out report of learned
exit gates (`eetune.train.gates.gate_report`) beside the max-prob confidence.

**Restricted-vocabulary heads** (`convert --exit-vocab K`: logits over K tokens + OTHER) are
read through the head itself (`ExitHead.predict`): an exit's top-1 is its argmax class mapped to
its token id, and where OTHER wins the exit has no token (it never agrees with the final layer,
and the token never leaves there). Its confidence is the max softmax probability over all its
classes, OTHER included. Its cross-entropy is over its own classes, the labels outside its K
tokens mapped to OTHER (`ce_over` says which, per exit; not comparable with the final layer's
CE over the whole vocabulary), and `other_share` is the share of positions where OTHER wins.

The same single pass also yields each exit's *exit profile* (`metrics["profile"]`): for every
threshold t of `PROFILE_THRESHOLDS`, the share of tokens that would leave at that exit (max-prob
>= t and, for a restricted head, OTHER not winning) and the top-1 agreement with the final layer
among them (None where no token would leave). This curve, with what an exit costs, decides
early-exit speed and quality. `exit_costs` measures that cost on the model's device with
`eetune.decode.policy.measure_costs`, in layer-equivalents (an exit's transform + its own
projection, timed as it is: K + 1 rows for a restricted head, divided by one decoder layer; the
LM head likewise). `profile_speedups` turns both into the predicted speedup of early exit with
each exit alone: a token that leaves at exit k pays layers 1..k and the exit's head, never the
final LM head (plus the KV recomputation of the layers it skipped, which climbs later with the
next token: `recompute_layers`), a token that does not pays the whole model and the exit's head.
`format_profile` prints the profile, `plot_profile` draws it (matplotlib, optional), and
`store_profile` records it in the exits directory's exit_config.json as
`training["exit_profile"]`, replacing the file atomically:

    metrics = exit_metrics(model, blocks)            # metrics["profile"]: the curves
    profile = {**metrics["profile"], "costs": exit_costs(model), "measured_on": {...}}
    profile["speedup"] = profile_speedups(profile)  # optional: format_profile computes it too
    print(format_profile(profile)); plot_profile(profile, "exit_profile.png")
    store_profile("runs/exits", profile)             # ExitConfig.load(...).training["exit_profile"]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from eetune.errors import EETuneError
from eetune.progress import progress_iter

# max-prob thresholds of the exit profile (share of tokens exiting, agreement among them)
PROFILE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def _check_thresholds(thresholds) -> list[float]:
    try:
        ts = sorted({float(t) for t in thresholds})
    except (TypeError, ValueError):
        raise EETuneError(f"profile thresholds {thresholds!r} are not numbers: give e.g. 0.5,0.9") from None
    if not ts or any(not 0.0 <= t <= 1.0 for t in ts):
        raise EETuneError(f"profile thresholds {list(thresholds)} must be a non-empty list of probabilities in "
                          f"[0, 1]: give e.g. 0.5,0.9,0.99")
    return ts


def ce_classes(head) -> str:
    """What an exit's cross-entropy is over: `vocabulary` (V classes), or for a restricted head
    `K tokens + OTHER` (labels outside them mapped to OTHER; K = V: `K tokens`, a permutation)."""
    if not getattr(head, "restricted", False):
        return "vocabulary"
    K = int(head.vocab_ids.numel())
    return f"{K} tokens + OTHER" if head.has_other else f"{K} tokens"


@torch.no_grad()
def exit_metrics(model, blocks: torch.Tensor, batch_size: int = 8, confident: float = 0.9,
                 progress: bool = True, thresholds=PROFILE_THRESHOLDS) -> dict:
    """Per-exit metrics over `blocks` (N, T) of token ids, in one teacher-forced pass. Returns
    {"exits": {k: {"ce", "ce_over", "agreement", "other_share", "confident_share",
    "confident_agreement"}}, "final_ce", "tokens", "confident_threshold", "exit_vocab", "profile"};
    "profile" is {"thresholds" (ascending), "tokens", "exit_vocab", "exits": {str(k): {"share",
    "agreement", "count", "other_share"}}}, lists following the thresholds: the share of tokens
    that would leave at the exit (max-softmax probability >= t, and OTHER not the top-1 of a
    restricted head), the top-1 agreement with the final layer among them (None where there are
    none) and their number. A restricted head's top-1 is its token (`ExitHead.predict`); OTHER
    never agrees. `ce` of a restricted head is over its classes (`ce_over`). `progress`: a bar on a
    terminal, status lines elsewhere (`eetune.progress`); False: nothing."""
    ts = _check_thresholds(thresholds)
    t_vec = torch.tensor(ts, dtype=torch.float32)
    dev = next(model.backbone.model.parameters()).device
    sums = {k: {"ce": 0.0, "agree": 0, "other": 0, "conf": 0, "conf_agree": 0,
                "n": torch.zeros(len(ts), dtype=torch.long), "ok": torch.zeros(len(ts), dtype=torch.long)}
            for k in model.exit_layers}
    final_ce, tokens = 0.0, 0
    batches = range(0, blocks.shape[0], batch_size)
    for a in progress_iter(batches, "evaluate", "batch", progress):
        ids = blocks[a:a + batch_size].to(dev)
        out = model(ids, final=True)
        targets = ids[:, 1:].reshape(-1)
        final = out.final_logits[:, :-1].float().reshape(-1, out.final_logits.shape[-1])
        final_ce += F.cross_entropy(final, targets, reduction="sum").item()
        final_pred = final.argmax(-1)
        tokens += targets.numel()
        for k, logits in out.exit_logits.items():
            head = model.head(k)
            lg = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            s = sums[k]
            s["ce"] += F.cross_entropy(lg, head.classes_of(targets), reduction="sum").item()
            max_prob, top = head.predict(lg)  # top: the token id, -1 where OTHER wins
            agree = top == final_pred
            known = top >= 0
            s["agree"] += agree.sum().item()
            s["other"] += (~known).sum().item()
            conf = (max_prob >= confident) & known
            s["conf"] += conf.sum().item()
            s["conf_agree"] += (agree & conf).sum().item()
            hit = (max_prob.cpu()[None, :] >= t_vec[:, None]) & known.cpu()[None, :]  # (thresholds, tokens)
            s["n"] += hit.sum(1)
            s["ok"] += (hit & agree.cpu()[None, :]).sum(1)
    exits, profile = {}, {}
    for k, s in sums.items():
        exits[k] = {"ce": s["ce"] / tokens, "ce_over": ce_classes(model.head(k)), "agreement": s["agree"] / tokens,
                    "other_share": s["other"] / tokens, "confident_share": s["conf"] / tokens,
                    "confident_agreement": (s["conf_agree"] / s["conf"]) if s["conf"] else float("nan")}
        n, ok = s["n"].tolist(), s["ok"].tolist()
        profile[str(k)] = {"share": [c / tokens for c in n], "agreement": [g / c if c else None for g, c in zip(ok, n)],
                           "count": n, "other_share": s["other"] / tokens}
    vocab = getattr(model, "exit_vocab", None)
    return {"exits": exits, "final_ce": final_ce / tokens, "tokens": tokens, "confident_threshold": confident,
            "exit_vocab": vocab,
            "profile": {"thresholds": ts, "tokens": tokens, "exit_vocab": vocab, "exits": profile}}


def exit_costs(model, opts=None) -> dict:
    """What each exit costs, measured on the model's device by `eetune.decode.policy.measure_costs`
    (one token on a 64-token context, best of 5; cached on the model) and expressed in
    layer-equivalents: per exit, `transform_layers` (its transform: norm / MLP / block),
    `projection_layers` (its own output projection as the engine runs it: V rows, or K + OTHER
    for a restricted head) divided by the cost of one decoder layer, `layers`, their sum: the
    price of asking the exit. `lm_head_layers` is the final norm + LM head in layers, `layer_s`
    one layer in seconds, `layer_x5_layers` one layer on a block of 5 tokens in single-token
    layers (what the KV recomputation of skipped layers costs: `recompute_layers`);
    `exit_vocab` the heads' K (None: the whole vocabulary) and `vocab_size` V."""
    from eetune.decode.api import DecodeOptions
    from eetune.decode.policy import measure_costs

    c = measure_costs(model, opts if opts is not None else DecodeOptions())
    layer = float(c["layer"])

    def in_layers(seconds):
        return float(seconds) / layer if layer > 0 and math.isfinite(seconds) else None

    exits = {}
    for k, h in c["heads"].items():
        tr, pr = in_layers(h["transform"]), in_layers(h["projection"])
        exits[str(k)] = {"transform_layers": tr, "projection_layers": pr,
                         "layers": None if tr is None or pr is None else tr + pr}
    p = next(model.backbone.model.parameters())
    x5 = c.get("layer_x5")
    return {"layer_s": layer, "lm_head_layers": in_layers(c["final"]), "num_layers": int(c["num_layers"]),
            "layer_x5_layers": None if x5 is None else in_layers(x5),
            "exit_vocab": getattr(model, "exit_vocab", None), "vocab_size": int(model.backbone.vocab_size),
            "device": str(p.device), "dtype": str(p.dtype).replace("torch.", ""), "exits": exits}


def recompute_layers(costs: dict) -> float:
    """What one skipped layer costs a token that left early, in layer-equivalents: its keys and
    values are recomputed later, batched with the next token that climbs past that exit, so it
    costs what one more token adds to a layer's block: (layer on 5 tokens - layer) / 4, from the
    measured `layer_x5_layers` (0 when it was not measured), held to [0, 1] (one token more never
    costs more than a whole layer: beyond that the timing was disturbed)."""
    x5 = costs.get("layer_x5_layers")
    if x5 is None or not math.isfinite(x5):
        return 0.0
    return min(1.0, max(0.0, (float(x5) - 1.0) / 4.0))


def profile_speedups(profile: dict) -> dict | None:
    """The predicted speedup of early exit with one exit alone, per exit and threshold, from the
    profile's shares and its measured `costs` (None without them): full depth costs L layers +
    the LM head; a token that leaves at exit k costs k layers + the exit's head (transform +
    its own projection) + the recomputation of the L - k layers it skipped (`recompute_layers`),
    never the final LM head; a token that does not leave costs L layers + the exit's head + the
    LM head. Returns {str(k): [speedup per threshold]} (None where a cost is unknown)."""
    costs = profile.get("costs") or {}
    lm, L = costs.get("lm_head_layers"), costs.get("num_layers")
    if lm is None or L is None or not math.isfinite(lm):
        return None
    delta = recompute_layers(costs)
    full = L + lm
    out = {}
    for k, e in profile["exits"].items():
        head = ((costs.get("exits") or {}).get(k) or {}).get("layers")
        if head is None or not math.isfinite(head):
            out[k] = [None] * len(e["share"])
            continue
        kk = int(k)
        leave = kk + head + max(0, L - kk) * delta
        stay = L + head + lm
        out[k] = [full / (s * leave + (1 - s) * stay) for s in e["share"]]
    return out


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
    restricted = {k: m for k, m in metrics["exits"].items() if m.get("ce_over", "vocabulary") != "vocabulary"}
    if restricted:
        over = sorted({m["ce_over"] for m in restricted.values()})
        lines.append(f"(restricted exit heads: their CE is over their own classes ({'; '.join(over)}; labels outside "
                     f"the tokens count as OTHER), not comparable with the final layer's; their top-1 is a token only "
                     f"where OTHER does not win, which it does at "
                     + ", ".join(f"layer {k} {m.get('other_share', 0.0):.1%}" for k, m in restricted.items())
                     + " of the tokens: there the exit never agrees and no token leaves)")
    return "\n".join(lines)


def format_gate_report(report: dict, indent: str = "") -> str:
    """A plain-text table of `eetune.train.gates.gate_report` output: per exit and threshold, the
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


def format_profile(profile: dict, per_table: int = 4) -> str:
    """A plain-text table of an exit profile: a row per threshold, a share and an agreement
    column per exit (at most `per_table` exits side by side), and each exit's cost."""
    ts, costs = profile["thresholds"], profile.get("costs") or {}

    def pct(x):
        return f"{x:7.1%}" if x is not None else f"{'-':>7}"

    def layers(x):
        return f"{x:.2f}" if x is not None else "?"

    K = profile.get("exit_vocab") or costs.get("exit_vocab")
    lines = [f"exit profile on {profile['tokens']:,} held-out tokens: share = tokens whose max-prob is >= t (they "
             f"would exit)" + (f" and whose top-1 is not OTHER (heads restricted to {K:,} tokens + OTHER)" if K else "")
             + ",", "agree = top-1 agreement with the final layer among them"]
    keys = list(profile["exits"])
    for g in range(0, len(keys), per_table):
        group = keys[g:g + per_table]
        lines.append(f"{'':>6}" + "".join(f"  {'layer ' + k:>15}" for k in group))
        lines.append(f"{'t':>6}" + "".join(f"  {'share':>7} {'agree':>7}" for _ in group))
        for i, t in enumerate(ts):
            lines.append(f"{t:>6g}" + "".join(f"  {pct(profile['exits'][k]['share'][i])} "
                                              f"{pct(profile['exits'][k]['agreement'][i])}" for k in group))
        if costs.get("exits"):
            lines.append(f"{'cost':>6}" + "".join(
                f"  {layers(costs['exits'].get(k, {}).get('layers')) + ' layers':>15}" for k in group))
    if costs:
        lines.append("cost = the exit's transform + its own projection" + (f" ({K:,} tokens + OTHER)" if K else "")
                     + f" in decoder-layer equivalents, measured on {costs.get('device', '?')} "
                     f"{costs.get('dtype', '')}:")
        lines.append(f"one layer = {costs['layer_s'] * 1e3:.3g} ms per token; the final norm + LM head = "
                     f"{layers(costs.get('lm_head_layers'))} layers")
    speed = profile.get("speedup") or profile_speedups(profile)
    if speed:
        def times(x):
            return f"{x:.2f}x" if x is not None else "-"

        lines.append("predicted speedup of early exit with one exit alone (a token leaving at exit k pays layers "
                     "1..k, its head" + (f" and {recompute_layers(costs):.3f} layers per skipped layer of KV "
                                         f"recomputation" if recompute_layers(costs) else "")
                     + ", never the LM head; the others pay the whole model and the head):")
        for g in range(0, len(keys), per_table):
            group = keys[g:g + per_table]
            lines.append(f"{'t':>6}" + "".join(f"  {'layer ' + k:>15}" for k in group))
            for i, t in enumerate(ts):
                lines.append(f"{t:>6g}" + "".join(f"  {times((speed.get(k) or [None] * len(ts))[i]):>15}"
                                                  for k in group))
    return "\n".join(lines)


LABEL_RINGS = 8  # offsets tried per label: right/left of the point, above/below, this many steps out


def place_labels(ax, labels, fontsize: float = 7) -> list:
    """Annotate points of `ax` so that no two labels overlap, nor a label a labelled point: each
    (text, (x, y), colour) of `labels` goes to the first offset, in points, whose text box meets
    none of those boxes: above right, above left, below right, below left of its point, then one
    line further out each time (after `LABEL_RINGS` lines it stays at the last). Call it once the axes' limits and
    layout are final (the boxes are measured in display space). Returns the annotations."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    slots = [(dx, dy) for r in range(LABEL_RINGS) for dy in (3 + 11 * r, -11 - 11 * r) for dx in (4, -4)]
    pad = 3 * ax.figure.dpi / 72  # nor are the labelled points themselves (3 points around each)
    anchors = [ax.transData.transform(xy) for _, xy, _ in labels]
    boxes = [Bbox.from_extents(x - pad, y - pad, x + pad, y + pad) for x, y in anchors]
    out = []
    for text, xy, colour in labels:
        for dx, dy in slots:
            ann = ax.annotate(text, xy, textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                              color=colour, ha="left" if dx > 0 else "right", annotation_clip=False)
            box = ann.get_window_extent(renderer)
            if not any(box.overlaps(b) for b in boxes) or (dx, dy) == slots[-1]:
                break
            ann.remove()
        boxes.append(box)
        out.append(ann)
    return out


def profile_figure(profile: dict, title: str | None = None):
    """The exit profile as a matplotlib Figure (Agg canvas): x the share of tokens exiting, y the
    agreement among them, one curve per exit, every threshold marked, some labelled (labels of
    coinciding points stacked, not overlapping: `place_labels`). None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    ts = profile["thresholds"]
    label_at = {ts[0], ts[-1]} | {t for t in ts if t in (0.5, 0.9)}
    costs = (profile.get("costs") or {}).get("exits") or {}
    fig = Figure(figsize=(7, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = []
    for k, e in profile["exits"].items():
        pts = [(s, a, t) for s, a, t in zip(e["share"], e["agreement"], ts) if a is not None]
        cost = (costs.get(k) or {}).get("layers")
        label = f"exit after layer {k}" + (f" ({cost:.2f} layers)" if cost is not None else "")
        if not pts:
            ax.plot([], [], marker="o", label=label + ": no token exits")
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=4, label=label)
        labels += [(f"{t:g}", (s, a), line.get_color()) for s, a, t in pts if t in label_at]
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("share of tokens exiting (max-prob >= t" + (", top-1 not OTHER)" if profile.get("exit_vocab")
                                                             else ")"))
    ax.set_ylabel("top-1 agreement with the final layer among them")
    ax.set_title(title or f"exit profile ({profile['tokens']:,} tokens)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.text(0.01, 0.005, f"points: max-prob thresholds t = {', '.join(f'{t:g}' for t in ts)} (right to left)",
             fontsize=7, color="0.35")
    fig.tight_layout()
    place_labels(ax, labels)
    return fig


def plot_profile(profile: dict, path: str | Path, title: str | None = None) -> bool:
    """Draw the exit profile (`profile_figure`) as a PNG at `path`. Returns False, drawing
    nothing, when matplotlib is not installed (`pip install 'eetune[bench]'`)."""
    fig = profile_figure(profile, title)
    if fig is None:
        return False
    fig.savefig(str(path), format="png")
    return True


def json_safe(obj):
    """`obj` with every NaN/inf float replaced by None (valid JSON), tuples as lists, keys as str."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def store_profile(directory: str | Path, profile: dict) -> Path:
    """Record `profile` in `directory`/exit_config.json as `training["exit_profile"]` (creating
    `training` if the directory has none; other keys are kept as they are). The file is
    replaced atomically: a temporary file in the same directory is written, flushed, synced and
    renamed over it. NaN is stored as null. Returns the path written."""
    from eetune.model.config import CONFIG_NAME, ExitConfig
    from eetune.fsio import atomic_write_json

    path = Path(directory) / CONFIG_NAME
    ExitConfig.load(directory)  # an exits directory with a readable config, or a one-line error
    data = json.loads(path.read_text())
    training = data.get("training")
    if training is None:
        training = {}
    if not isinstance(training, dict):
        raise EETuneError(f"{path}: 'training' is not an object: fix or remove it, or pass --no-store")
    data["training"] = {**training, "exit_profile": json_safe(profile)}
    atomic_write_json(path, data)
    return path


def blocks_digest(blocks: torch.Tensor) -> str:
    """A short fingerprint of evaluation blocks (which tokens a profile was measured on): the
    first 16 hex digits of the SHA-256 of their int32 token ids."""
    import hashlib
    return hashlib.sha256(blocks.to(torch.int32).cpu().numpy().tobytes()).hexdigest()[:16]


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

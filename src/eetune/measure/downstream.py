"""Downstream evaluation (`eetune eval`): task quality against decoding speed, with confidence intervals.

    eetune eval runs/tuned --tasks boolq,xsum --out runs/eval --limit 200
    eetune eval runs/tuned --tasks ppl,boolq,mmlu,narrativeqa,xsum --thresholds 1,0.9,0.8,0.6,0.4,0.2 --out runs/eval

Tasks (items from the embedded default data, eetune.model.defaults; none of it is tuning text):
- `ppl`: teacher-forced cross-entropy, perplexity and top-1 agreement with the final layer of every
  exit and of the final layer, on held-out text (`--ppl-data`, default BoolQ dev passages).
- `xsum`: one-sentence summary of a BBC article; ROUGE-L and ROUGE-Lsum F1 (the `rouge-score`
  package, Porter stemming; Lsum splits sentences on newlines) against the reference summary.
- `boolq`: a yes/no question about a Wikipedia passage; accuracy.
- `mmlu`: a multiple-choice question with options A-D; accuracy.
- `narrativeqa`: a question about a story summary; token F1 (SQuAD rules), best over the references.

Prompting is zero-shot: each item becomes one user turn of the tokenizer's chat template when it
has one (instruct models expect it), plain text otherwise; passages and articles are cut to
`--max-context` tokens. The prompts and answer-extraction rules are the `TASKS` below. Every
setting decodes greedily: `full`, `early-exit` at each of `--thresholds` (max-prob confidence by
default; `calibrated`: the per-exit thresholds `eetune calibrate` stored) and `self-spec` (lossless: its quality must equal `full`'s, item for item). Every setting's
reply is cut by the same rule (`cut_reply`): leading white space is dropped, then the reply ends
before the task's first stop string, so "\\nThe answer...\\nMore" is scored as "The answer..." and a
reply of white space only as "".

Quality and speed are measured apart. Quality: every item (default 200 per task, `--limit`) in
every setting, batched; each setting's mean score with a bootstrap 95% interval, and its paired
bootstrap 95% interval of the difference from `full` (the same items resampled for both). Speed
(`run_task_speed`): at batch 1, after one untimed warm-up generation per setting, in interleaved
rounds (one `--speed-items` item per round, cycling, through every setting, the order rotating)
until every setting has timed at least `speed_min_tokens` decode tokens (default 256) and every
speed item was used. A generation's decode time runs from its first token to its last (prefill and
the first token excluded, CUDA graph recording subtracted), so every setting's tokens/s, `full`'s
included, is decode tokens / decode seconds, and the speedup is the ratio of two measured speeds;
the mean exit layer (over every generated token) and the decoder-layer passes per decode token come
from the same runs.

Outputs in `--out` (written to a temporary directory, then published whole): `results.json`,
`results.csv`, one PNG per task (score against speedup, error bars, `full` marked) and
`report.html` (self-contained: tables, plots, the exit profile when `eetune evaluate` stored one,
a sample generation coloured by exit layer, configuration and versions).
"""

from __future__ import annotations

import base64
import csv
import html
import json
import math
import re
import string
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eetune.errors import EETuneError
from eetune.progress import progress_display

TASK_NAMES = ("ppl", "xsum", "boolq", "mmlu", "narrativeqa")
DEFAULT_THRESHOLDS = (1.0, 0.9, 0.8, 0.6, 0.4, 0.2)
DEFAULT_SPEED_MIN_TOKENS = 256  # decode tokens timed per setting and task, at least
WARMUP_RUNS = 1  # untimed generations per setting before the speed runs


# --- answer extraction and metrics (documented rules, tested on hand-computed values) -----------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and the articles a/an/the removed, white
    space collapsed."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 between a prediction and one reference, after `normalize_answer`."""
    p, r = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def extract_yes_no(text: str) -> bool | None:
    """The first yes/no (or true/false) word of a reply, as a bool; None when there is none."""
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in ("yes", "true"):
            return True
        if word in ("no", "false"):
            return False
    return None


def extract_choice(text: str, letters: str = "ABCD") -> str | None:
    """The option a reply picks: the first standalone capital letter A-D (so "B", "B.", "(B)",
    "Answer: B" all read B); None when there is none."""
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)
    return m.group(1) if m else None


def cut_reply(text: str, stops) -> str:
    """The part of a reply that is scored, the same for every setting: leading white space is
    dropped (it is not content), then the text ends before the first of the `stops` strings;
    white space around the result is stripped. A reply of white space only is ""."""
    text = text.lstrip()
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


class Rouge:
    """ROUGE-L and ROUGE-Lsum F1 from the `rouge-score` package (Porter stemming)."""

    def __init__(self):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            raise EETuneError("the xsum task needs the rouge-score package: pip install 'eetune[eval]'") from None
        self.scorer = rouge_scorer.RougeScorer(["rougeL", "rougeLsum"], use_stemmer=True)

    def __call__(self, prediction: str, reference: str) -> dict[str, float]:
        s = self.scorer.score(reference, prediction)
        return {"rougeL": s["rougeL"].fmeasure, "rougeLsum": s["rougeLsum"].fmeasure}


# --- tasks --------------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    data_file: str  # eetune.model.defaults data file
    metric: str  # the score reported (and compared with `full`)
    max_new_tokens: int
    stop: tuple[str, ...]
    instruction: str  # the user turn; {fields} are filled from the item
    long_fields: tuple[str, ...]  # fields cut to --max-context tokens


TASKS = {
    "xsum": Task("xsum", "xsum_test.jsonl", "rougeL", 48, ("\n",),
                 "Summarize the following article in one sentence.\n\n{document}", ("document",)),
    "boolq": Task("boolq", "boolq_dev.jsonl", "accuracy", 4, ("\n",),
                  "{passage}\n\nQuestion: {question}?\nAnswer with yes or no.", ("passage",)),
    "mmlu": Task("mmlu", "mmlu_test.jsonl", "accuracy", 4, ("\n",),
                 "{question}\n\n{options}\n\nAnswer with the letter of the correct option.", ("question",)),
    "narrativeqa": Task("narrativeqa", "narrativeqa_test.jsonl", "f1", 24, ("\n",),
                        "{passage}\n\nQuestion: {question}\nAnswer in a few words.", ("passage",)),
}


def score_item(task: str, prediction: str, item: dict, rouge: Rouge | None = None) -> dict[str, float]:
    """The metrics of one reply to one item (the task's `metric` among them)."""
    if task == "xsum":
        return rouge(prediction, item["summary"])
    if task == "boolq":
        return {"accuracy": float(extract_yes_no(prediction) == item["answer"])}
    if task == "mmlu":
        return {"accuracy": float(extract_choice(prediction) == item["answer"])}
    if task == "narrativeqa":
        return {"f1": max(token_f1(prediction, ref) for ref in item["answers"])}
    raise EETuneError(f"unknown task {task!r}")


def load_items(task: str, limit: int, seed: int = 0) -> list[dict]:
    """`limit` items of a task: a fixed random sample (seeded) of the task's data file."""
    from eetune.model.defaults import default_data_file

    path = default_data_file(TASKS[task].data_file)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]  # not
    # splitlines(): it also splits at U+2028 inside JSON strings
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[:limit]]


def _cut(tokenizer, text: str, max_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens]).rstrip() + " ..."


def prompt_ids(tokenizer, task: str, item: dict, max_context: int, chat: bool) -> list[int]:
    from eetune.decode.api import chat_prompt_ids

    t = TASKS[task]
    fields = {k: (_cut(tokenizer, str(v), max_context) if k in t.long_fields else v) for k, v in item.items()}
    text = t.instruction.format(**fields)
    if chat:
        return chat_prompt_ids(tokenizer, text)
    return tokenizer(text + "\n", add_special_tokens=True)["input_ids"]


# --- settings -----------------------------------------------------------------------------------
@dataclass
class Setting:
    name: str  # full | early-exit@T | self-spec
    options: dict  # DecodeOptions fields


def settings_for(thresholds, confidence: str = "max-prob", self_spec: bool = True,
                 calibrated: dict | None = None) -> list[Setting]:
    """full, early exit at each threshold (the entry "calibrated": at the per-exit thresholds
    `calibrated` {exit layer: t}, the stored calibration's) and self-spec."""
    out = [Setting("full", {"mode": "full"})]
    for t in thresholds:
        if t == "calibrated":
            if calibrated is None:
                raise EETuneError("--thresholds calibrated: these exits hold no calibration for these heads and this "
                                  "confidence: run `eetune calibrate DIR` first, or give numbers")
            out.append(Setting("early-exit@calibrated", {"mode": "early-exit", "confidence": confidence,
                                                         "exit_thresholds": dict(calibrated)}))
        else:
            out.append(Setting(f"early-exit@{t:g}", {"mode": "early-exit", "threshold": float(t),
                                                     "confidence": confidence}))
    if self_spec:
        out.append(Setting("self-spec", {"mode": "self-spec"}))
    return out


def parse_thresholds(spec: str) -> tuple:
    """Comma-separated thresholds; the word `calibrated` stands for the exits directory's stored
    calibration (its per-exit thresholds)."""
    try:
        ts = tuple("calibrated" if x.strip().lower() == "calibrated" else float(x) for x in spec.split(",")
                   if x.strip())
    except ValueError:
        raise EETuneError(f"--thresholds {spec!r}: give comma-separated numbers or `calibrated`, e.g. "
                          f"1,0.9,calibrated") from None
    ts = tuple(dict.fromkeys(ts))
    if not ts or any(t != "calibrated" and (not (t >= 0) or math.isinf(t)) for t in ts):
        raise EETuneError(f"--thresholds {spec!r}: give non-negative finite numbers, e.g. 1,0.9,0.8")
    return ts


def parse_tasks(spec: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in spec.split(",") if t.strip())
    bad = [t for t in tasks if t not in TASK_NAMES]
    if not tasks or bad:
        raise EETuneError(f"unknown task {bad[0] if bad else spec!r}: use some of {', '.join(TASK_NAMES)}")
    return tuple(dict.fromkeys(tasks))


# --- statistics ---------------------------------------------------------------------------------
def bootstrap_ci(values, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return (float("nan"), float("nan"))
    idx = np.random.default_rng(seed).integers(0, len(v), size=(reps, len(v)))
    means = v[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap_ci(a, b, reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a - b), resampling the items (pairs) together."""
    return bootstrap_ci(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), reps, seed)


# --- running ------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    tasks: tuple[str, ...] = ("boolq", "xsum")
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    confidence: str = "max-prob"
    limit: int = 200  # quality items per task
    speed_items: int = 8  # items per task timed at batch 1
    speed_min_tokens: int = field(default_factory=lambda: DEFAULT_SPEED_MIN_TOKENS)  # decode tokens per setting
    batch_size: int = 16
    max_context: int = 384  # tokens of a passage or article kept in the prompt
    self_spec: bool = True
    ppl_data: str = "default-dev"
    ppl_blocks: int = 16
    seq_len: int = 256
    seed: int = 0
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        parse_tasks(",".join(self.tasks))
        if self.limit < 1:
            raise EETuneError(f"--limit {self.limit}: give at least 1 item per task")
        if self.speed_items < 0 or self.speed_min_tokens < 0 or self.batch_size < 1 or self.max_context < 16 \
                or self.ppl_blocks < 1 or self.seq_len < 2:
            raise EETuneError("--speed-items >= 0, --speed-min-tokens >= 0, --batch-size >= 1, --max-context >= 16, "
                              "--ppl-blocks >= 1 and --seq-len >= 2")


def _options(model, tok, setting: Setting, task: Task):
    from eetune.decode.api import DecodeOptions, end_token_ids

    return DecodeOptions(max_new_tokens=task.max_new_tokens, eos_token_ids=tuple(end_token_ids(model, tok)),
                         **setting.options)


def _decode(model, tok, prompts: list[list[int]], setting: Setting, task: Task):
    """Generate for `prompts` in one setting: the Generation and each reply cut by `cut_reply`."""
    from eetune.decode.api import generate

    gen = generate(model, prompts, _options(model, tok, setting, task))
    return gen, [cut_reply(tok.decode(row.ids, skip_special_tokens=True), task.stop) for row in gen.rows]


def timed_generation(model, tok, prompt: list[int], setting: Setting, task: Task) -> dict:
    """One generation at batch 1, timed over its decoding phase: from the first token's emission
    (prefill and the first token are behind it) to the last, less any CUDA graph recording.
    Returns {"tokens": all generated, "decode_tokens": those after the first, "decode_seconds",
    "layers": the sum of every generated token's exit layer, "passes": decoder-layer token passes
    of the decoding phase}."""
    from eetune.decode.api import generate

    first = []

    def on_tokens(row, tokens, stats):
        if not first:
            first.append(time.perf_counter())

    gen = generate(model, [prompt], _options(model, tok, setting, task), on_tokens=on_tokens)
    end = time.perf_counter()
    n = gen.new_tokens
    seconds = max(end - first[0] - float(getattr(gen, "record_seconds", 0.0) or 0.0), 0.0) if first else 0.0
    return {"tokens": n, "decode_tokens": max(n - 1, 0), "decode_seconds": seconds,
            "layers": gen.mean_layers_per_token * n if n else 0.0,
            "passes": gen.layer_token_passes}


def run_task_quality(model, tok, task: str, items: list[dict], settings: list[Setting], cfg: EvalConfig,
                     chat: bool) -> dict:
    """Every item in every setting, batched: replies and per-item metrics."""
    t = TASKS[task]
    rouge = Rouge() if task == "xsum" else None
    prompts = [prompt_ids(tok, task, it, cfg.max_context, chat) for it in items]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths batch together
    out = {}
    bar = progress_display(len(settings) * len(items), f"{task} quality", "item", bar=cfg.progress,
                           lines=cfg.progress)
    for s in settings:
        replies = [None] * len(items)
        for a in range(0, len(order), cfg.batch_size):
            idx = order[a:a + cfg.batch_size]
            _, texts = _decode(model, tok, [prompts[i] for i in idx], s, t)
            for i, text in zip(idx, texts):
                replies[i] = text
            bar.update(len(idx))
        metrics = [score_item(task, r, it, rouge) for r, it in zip(replies, items)]
        out[s.name] = {"replies": replies, "metrics": metrics}
    bar.close()
    return out


def speed_rounds_estimate(rounds: int, items: int, cap: int, min_tokens: int, least: int) -> int:
    """The rounds `run_task_speed` will run, estimated after `rounds` of them in which the
    setting with the fewest decode tokens timed `least`: at least `items`, at most `cap`, and
    enough to reach `min_tokens` at the rate so far (`cap` when nothing was timed yet)."""
    if least >= min_tokens:
        return max(rounds, items)
    if least <= 0 or rounds <= 0:
        return cap if rounds else items
    return min(cap, max(items, rounds + math.ceil((min_tokens - least) * rounds / least)))


def run_task_speed(model, tok, task: str, items: list[dict], settings: list[Setting], cfg: EvalConfig,
                   chat: bool) -> dict:
    """Decoding speed of every setting at batch 1 on the first `speed_items` items. Each setting
    first runs `WARMUP_RUNS` untimed generations; then rounds follow, one item per round (cycling
    through the items), through every setting in an order rotating from round to round so that
    drifts of the machine fall on all of them, until every item was used and every setting has
    timed at least `cfg.speed_min_tokens` decode tokens (at most max(items, speed_min_tokens)
    rounds: a setting whose replies end at their first token cannot get there). Speed = decode
    tokens / decode seconds (`timed_generation`) for every setting alike; speedup = a setting's
    speed / `full`'s. Returns {"settings": {name: row}, "items", "rounds", "warmup_runs",
    "min_tokens"}; {} without speed items."""
    t = TASKS[task]
    subset = items[:cfg.speed_items]
    if not subset:
        return {}
    prompts = [prompt_ids(tok, task, it, cfg.max_context, chat) for it in subset]
    for s in settings:
        for _ in range(WARMUP_RUNS):
            timed_generation(model, tok, prompts[0], s, t)
    acc = {s.name: {"tokens": 0, "decode_tokens": 0, "decode_seconds": 0.0, "layers": 0.0, "passes": 0.0,
                    "runs": 0} for s in settings}
    cap = max(len(subset), cfg.speed_min_tokens)
    rounds = 0
    # runs: the number of rounds is known only as they go (an estimate, from the tokens so far)
    bar = progress_display(len(subset) * len(settings), f"{task} speed", "run", bar=cfg.progress,
                           lines=cfg.progress)
    while rounds < len(subset) or (rounds < cap and min(a["decode_tokens"] for a in acc.values())
                                   < cfg.speed_min_tokens):
        p = prompts[rounds % len(prompts)]
        for k in range(len(settings)):
            s = settings[(rounds + k) % len(settings)]
            run = timed_generation(model, tok, p, s, t)
            a = acc[s.name]
            for key in ("tokens", "decode_tokens", "decode_seconds", "layers", "passes"):
                a[key] += run[key]
            a["runs"] += 1
            bar.update(1)
        rounds += 1
        bar.total = len(settings) * speed_rounds_estimate(rounds, len(subset), cap, cfg.speed_min_tokens,
                                                          min(a["decode_tokens"] for a in acc.values()))
    bar.close()
    out = {}
    for name, a in acc.items():
        n = max(a["tokens"], 1)
        out[name] = {"tokens": a["tokens"], "decode_tokens": a["decode_tokens"], "seconds": a["decode_seconds"],
                     "runs": a["runs"], "warmup_runs": WARMUP_RUNS,
                     "tokens_per_s": a["decode_tokens"] / a["decode_seconds"] if a["decode_seconds"] > 0
                     else float("nan"),
                     "mean_exit_layer": a["layers"] / n,
                     "layer_passes_per_token": a["passes"] / a["decode_tokens"] if a["decode_tokens"] else float("nan")}
    full = out.get("full", {}).get("tokens_per_s")
    for v in out.values():
        v["speedup"] = v["tokens_per_s"] / full if full and math.isfinite(full) else float("nan")
    return {"settings": out, "items": len(subset), "rounds": rounds, "warmup_runs": WARMUP_RUNS,
            "min_tokens": cfg.speed_min_tokens}


SPEED_METHOD = ("tokens/s = decode tokens / decode seconds at batch 1 (decode: after the first token, so prefill "
                "is excluded), after {warmup} untimed warm-up run per setting; {items} items in {rounds} "
                "interleaved rounds, at least {min_tokens} decode tokens per setting")


def speed_note(info: dict | None, speed_items: int = 0) -> str:
    """How a task's speed was measured, in one line (for the tables and the report). Results
    written before the timing was recorded (no `speed` entry) but with `speed_items` timed say so."""
    if not info:
        if speed_items:
            return (f"tokens/s at batch 1 on {speed_items} items; these results do not record how the timing "
                    f"was done (warm-up, rounds)")
        return "speed not measured (no speed items)"
    return SPEED_METHOD.format(warmup=info.get("warmup_runs", "?"), items=info.get("items", "?"),
                               rounds=info.get("rounds", "?"), min_tokens=info.get("min_tokens", "?"))


def run_ppl(model, tok, cfg: EvalConfig) -> dict:
    from eetune.train.data import load_texts, pack_blocks
    from eetune.measure.evaluate import exit_metrics

    blocks = pack_blocks(tok, load_texts(cfg.ppl_data), cfg.seq_len, cfg.ppl_blocks)
    m = exit_metrics(model, blocks, batch_size=8, progress=cfg.progress)
    rows = {f"exit {k}": {"ce": v["ce"], "perplexity": math.exp(min(v["ce"], 700)), "agreement": v["agreement"]}
            for k, v in m["exits"].items()}
    rows["final"] = {"ce": m["final_ce"], "perplexity": math.exp(m["final_ce"]), "agreement": 1.0}
    return {"data": cfg.ppl_data, "tokens": m["tokens"], "blocks": int(blocks.shape[0]), "seq_len": cfg.seq_len,
            "rows": rows}


def summarize(task: str, quality: dict, speed: dict) -> list[dict]:
    """One row per setting: score with its interval, difference from `full` with its paired
    interval, other metrics, and the speed figures."""
    metric = TASKS[task].metric
    full = [m[metric] for m in quality["full"]["metrics"]]
    rows = []
    for name, q in quality.items():
        vals = [m[metric] for m in q["metrics"]]
        lo, hi = bootstrap_ci(vals)
        dlo, dhi = paired_bootstrap_ci(vals, full)
        row = {"task": task, "setting": name, "metric": metric, "n": len(vals), "score": float(np.mean(vals)),
               "ci_low": lo, "ci_high": hi, "diff_vs_full": float(np.mean(vals) - np.mean(full)),
               "diff_ci_low": dlo, "diff_ci_high": dhi,
               "same_reply_as_full": float(np.mean([a == b for a, b in zip(q["replies"],
                                                                           quality["full"]["replies"])]))}
        for other in q["metrics"][0]:
            if other != metric:
                row[other] = float(np.mean([m[other] for m in q["metrics"]]))
        sp = (speed.get("settings") or {}).get(name, {})
        row.update({k: sp.get(k) for k in ("tokens_per_s", "speedup", "mean_exit_layer", "layer_passes_per_token")})
        row.update({"speed_tokens": sp.get("decode_tokens"), "speed_seconds": sp.get("seconds"),
                    "speed_runs": sp.get("runs"), "speed_warmup_runs": sp.get("warmup_runs")})
        rows.append(row)
    return rows


def pick_sample_item(replies: dict[str, list[str]], setting: str) -> int:
    """The item the report's sample generation shows: the first whose scored replies have visible
    text in every setting, else the first whose reply in `setting` has, else item 0."""
    n = len(replies[setting])
    for i in range(n):
        if all(r[i].strip() for r in replies.values()):
            return i
    return next((i for i in range(n) if replies[setting][i].strip()), 0)


def sample_generation(model, tok, task: str, item: dict, setting: Setting, cfg: EvalConfig, chat: bool,
                      index: int = 0) -> dict:
    """One reply with the exit layer of every token (for the report's coloured sample), the item's
    index among the task's items and the scored reply (`cut_reply`)."""
    from eetune.decode.api import generate

    t = TASKS[task]
    gen = generate(model, [prompt_ids(tok, task, item, cfg.max_context, chat)], _options(model, tok, setting, t))
    row = gen.rows[0]
    return {"task": task, "setting": setting.name, "item_index": index,
            "reply": cut_reply(tok.decode(row.ids, skip_special_tokens=True), t.stop),
            "tokens": [{"text": tok.decode([s.token]), "exit_layer": s.exit_layer} for s in row.tokens]}


def run_eval(model, tok, cfg: EvalConfig) -> dict:
    """Every task of `cfg`: the results dict that `write_outputs` writes."""
    cfg.validate()
    chat = getattr(tok, "chat_template", None) is not None
    calibrated = None
    if "calibrated" in cfg.thresholds:
        from eetune.model.early_exit import calibrated_thresholds
        calibrated, _ = calibrated_thresholds(model, cfg.confidence)
    settings = settings_for(cfg.thresholds, cfg.confidence, cfg.self_spec, calibrated)
    results = {"tasks": {}, "settings": [s.name for s in settings], "chat_template": chat}
    mid = [s for s in settings if s.options.get("mode") == "early-exit"]
    pick = mid[len(mid) // 2] if mid else settings[0]  # the sample's setting
    sample_from = None
    for task in cfg.tasks:
        if task == "ppl":
            results["tasks"]["ppl"] = run_ppl(model, tok, cfg)
            continue
        items = load_items(task, cfg.limit, cfg.seed)
        quality = run_task_quality(model, tok, task, items, settings, cfg, chat)
        speed = run_task_speed(model, tok, task, items, settings, cfg, chat)
        results["tasks"][task] = {"rows": summarize(task, quality, speed), "n": len(items),
                                  "speed_items": min(cfg.speed_items, len(items)),
                                  "speed": {k: v for k, v in speed.items() if k != "settings"},
                                  "examples": [{"item": {k: (v if not isinstance(v, str) else v[:300])
                                                         for k, v in items[i].items()},
                                                "replies": {name: q["replies"][i] for name, q in quality.items()}}
                                               for i in range(min(3, len(items)))],
                                  "per_item": {name: [m[TASKS[task].metric] for m in q["metrics"]]
                                               for name, q in quality.items()}}
        if sample_from is None:
            i = pick_sample_item({name: q["replies"] for name, q in quality.items()}, pick.name)
            sample_from = (task, items[i], i)
    if sample_from is not None:
        task, item, i = sample_from
        results["sample"] = sample_generation(model, tok, task, item, pick, cfg, chat, index=i)
    return results


# --- outputs ------------------------------------------------------------------------------------
CSV_FIELDS = ("task", "setting", "metric", "n", "score", "ci_low", "ci_high", "diff_vs_full", "diff_ci_low",
              "diff_ci_high", "same_reply_as_full", "tokens_per_s", "speedup", "mean_exit_layer",
              "layer_passes_per_token", "speed_tokens", "speed_seconds", "speed_runs", "speed_warmup_runs")


def task_figure(rows: list[dict], title: str):
    """Score against speedup as a matplotlib Figure (Agg canvas): one point per setting with its
    95% interval, `full` marked; each point labelled with its setting, labels of points that
    coincide stacked, not overlapping (`eetune.measure.evaluate.place_labels`). None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from eetune.measure.evaluate import place_labels

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    labels = []
    for r in rows:
        x = r.get("speedup")
        if x is None or not math.isfinite(x):
            continue
        is_full = r["setting"] == "full"
        colour = "black" if is_full else ("tab:green" if r["setting"] == "self-spec" else "tab:blue")
        ax.errorbar([x], [r["score"]], yerr=[[r["score"] - r["ci_low"]], [r["ci_high"] - r["score"]]],
                    fmt="s" if is_full else "o", color=colour, capsize=3)
        labels.append((r["setting"].replace("early-exit@", "t="), (x, r["score"]), colour))
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.margins(x=0.15, y=0.12)
    ax.set_xlabel("speedup over full (decode tokens/s, batch 1)")
    ax.set_ylabel(f"{rows[0]['metric']} (95% CI)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    place_labels(ax, labels, fontsize=8)
    return fig


def plot_task(task: str, rows: list[dict], path: Path, title: str) -> bool:
    """`task_figure` as a PNG at `path`; False, drawing nothing, without matplotlib."""
    fig = task_figure(rows, title)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True


def _fmt(v, digits=3):
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v)


def format_tables(results: dict) -> str:
    """Plain-text tables of every task (what `eetune eval` prints)."""
    lines = []
    for task, r in results["tasks"].items():
        if task == "ppl":
            lines.append(f"ppl ({r['tokens']:,} tokens of {r['data']})")
            lines.append(f"  {'':<10} {'CE':>7} {'ppl':>10} {'agreement':>9}")
            for name, v in r["rows"].items():
                lines.append(f"  {name:<10} {v['ce']:>7.3f} {v['perplexity']:>10.1f} {v['agreement']:>9.3f}")
            continue
        rows = r["rows"]
        lines.append(f"{task} ({rows[0]['metric']}, n={r['n']}; speed on {r['speed_items']} items at batch 1)")
        lines.append(f"  {speed_note(r.get('speed'), r.get('speed_items', 0))}")
        lines.append(f"  {'setting':<16} {'score':>6} {'95% CI':>15} {'diff vs full':>13} {'95% CI':>17} "
                     f"{'tok/s':>7} {'speedup':>7} {'timed tok':>9} {'exit layer':>10}")
        for row in rows:
            lines.append(f"  {row['setting']:<16} {row['score']:>6.3f} "
                         f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}] {row['diff_vs_full']:>+13.3f} "
                         f"[{row['diff_ci_low']:+.3f}, {row['diff_ci_high']:+.3f}] {_fmt(row['tokens_per_s'], 1):>7} "
                         f"{_fmt(row['speedup'], 2):>7} {_fmt(row.get('speed_tokens')):>9} "
                         f"{_fmt(row['mean_exit_layer'], 1):>10}")
    return "\n".join(lines)


def visible_token(text: str) -> str:
    """A token as the report's sample shows it: one of white space only is drawn visibly (a line
    break as "↵" and the break, a space as "·", a tab as "→"), so no token is an empty box."""
    if text.strip():
        return text
    return text.replace(" ", "·").replace("\t", "→").replace("\r", "").replace("\n", "↵\n") or "∅"


EXIT_HTML_COLOURS = ["#2ca02c", "#17becf", "#bcbd22", "#9467bd", "#1f77b4", "#98df8a", "#9edae5", "#dbdb8d"]


def report_html(results: dict, images: dict[str, bytes], profile_png: bytes | None) -> str:
    """A self-contained HTML report (images inline)."""
    esc = html.escape
    meta = results["meta"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>eetune eval: {esc(meta['exits'])}</title>",
             "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}"
             "pre{background:#f7f7f7;padding:8px;overflow-x:auto}.tok{padding:0 1px;border-radius:2px}</style>",
             "</head><body>", f"<h1>eetune eval: {esc(meta['exits'])}</h1>",
             f"<p>{esc(meta['model'])}, exits after layers {esc(str(meta['exit_layers']))} of {meta['num_layers']} "
             f"({esc(meta['arch'])}); {esc(meta['date'])} on {esc(meta['machine'])}.</p>"]
    for task, r in results["tasks"].items():
        parts.append(f"<h2>{esc(task)}</h2>")
        if task == "ppl":
            parts.append(f"<p>{r['tokens']:,} tokens of {esc(r['data'])}, teacher-forced.</p><table><tr><th></th>"
                         "<th>CE</th><th>perplexity</th><th>top-1 agreement with the final layer</th></tr>")
            for name, v in r["rows"].items():
                parts.append(f"<tr><td>{esc(name)}</td><td>{v['ce']:.3f}</td><td>{v['perplexity']:.1f}</td>"
                             f"<td>{v['agreement']:.3f}</td></tr>")
            parts.append("</table>")
            continue
        rows = r["rows"]
        parts.append(f"<p>{esc(rows[0]['metric'])} on n = {r['n']} items (95% bootstrap intervals; the difference "
                     f"from full is a paired bootstrap). Speed: {esc(speed_note(r.get('speed'), r.get('speed_items', 0)))}.</p>")
        parts.append("<table><tr><th>setting</th><th>score</th><th>95% CI</th><th>diff vs full</th><th>95% CI</th>"
                     "<th>same reply as full</th><th>tokens/s</th><th>speedup</th><th>decode tokens timed</th>"
                     "<th>mean exit layer</th><th>layer passes / token</th></tr>")
        for row in rows:
            parts.append(f"<tr><td>{esc(row['setting'])}</td><td>{row['score']:.3f}</td>"
                         f"<td>[{row['ci_low']:.3f}, {row['ci_high']:.3f}]</td><td>{row['diff_vs_full']:+.3f}</td>"
                         f"<td>[{row['diff_ci_low']:+.3f}, {row['diff_ci_high']:+.3f}]</td>"
                         f"<td>{row['same_reply_as_full']:.2f}</td><td>{_fmt(row['tokens_per_s'], 1)}</td>"
                         f"<td>{_fmt(row['speedup'], 2)}</td><td>{_fmt(row.get('speed_tokens'))}</td>"
                         f"<td>{_fmt(row['mean_exit_layer'], 1)}</td>"
                         f"<td>{_fmt(row['layer_passes_per_token'], 1)}</td></tr>")
        parts.append("</table>")
        if task in images:
            parts.append(f"<img alt='{esc(task)}: score against speedup' "
                         f"src='data:image/png;base64,{base64.b64encode(images[task]).decode()}'>")
    sample = results.get("sample")
    if sample:
        layers = sorted({t["exit_layer"] for t in sample["tokens"]})
        colour = {k: EXIT_HTML_COLOURS[i % len(EXIT_HTML_COLOURS)] for i, k in enumerate(meta["exit_layers"])}
        item = f", item {sample['item_index']}" if "item_index" in sample else ""
        parts.append(f"<h2>A sample generation ({esc(sample['task'])}{item}, {esc(sample['setting'])})</h2><p>")
        parts.append(" ".join(f"<span class='tok' style='background:{colour.get(k, '#eee')}'>exit {k}</span>"
                              if k in colour else f"<span class='tok' style='background:#eee'>final layer {k}</span>"
                              for k in layers) + "</p>")
        if not "".join(t["text"] for t in sample["tokens"]).strip():
            parts.append("<p><em>(blank reply: the model generated only white space)</em></p>")
        parts.append("<pre>")
        for t in sample["tokens"]:
            bg = colour.get(t["exit_layer"], "transparent")
            parts.append(f"<span class='tok' style='background:{bg}' title='layer {t['exit_layer']}'>"
                         f"{esc(visible_token(t['text']))}</span>")
        parts.append("</pre>")
        if "reply" in sample:
            parts.append(f"<p>Scored reply: {esc(sample['reply']) if sample['reply'] else '<em>(blank reply)</em>'}"
                         "</p>")
    if profile_png:
        parts.append("<h2>Exit profile (stored by <code>eetune evaluate</code>)</h2>"
                     f"<img alt='exit profile' src='data:image/png;base64,{base64.b64encode(profile_png).decode()}'>")
    parts.append("<h2>Configuration</h2><pre>" + esc(json.dumps({"config": results["config"], "meta": meta},
                                                                 indent=2, sort_keys=True, default=str)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_outputs(results: dict, out: Path, model) -> Path:
    """results.json, results.csv, a PNG per task and report.html, published as one directory."""
    from eetune.measure.evaluate import json_safe, plot_profile
    from eetune.fsio import replace_dir, staging_dir

    tmp = staging_dir(out)
    try:
        images = {}
        for task, r in results["tasks"].items():
            if task == "ppl":
                continue
            png = tmp / f"{task}.png"
            if plot_task(task, r["rows"], png, f"{task}: {r['rows'][0]['metric']} vs speedup "
                                               f"(n={r['n']}, {results['meta']['exits']})"):
                images[task] = png.read_bytes()
        profile_png = None
        prof = (model.config.training or {}).get("exit_profile")
        if prof and plot_profile(prof, tmp / "exit_profile.png", title="exit profile (eetune evaluate)"):
            profile_png = (tmp / "exit_profile.png").read_bytes()
        (tmp / "results.json").write_text(json.dumps(json_safe(results), indent=2, sort_keys=True) + "\n")
        with open(tmp / "results.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            w.writeheader()
            for task, r in results["tasks"].items():
                for row in r.get("rows", []) if task != "ppl" else []:
                    w.writerow({k: row.get(k) for k in CSV_FIELDS})
        (tmp / "report.html").write_text(report_html(results, images, profile_png), encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def machine_meta(model, exits_dir) -> dict:
    import os
    import platform

    import transformers

    from eetune.version import __version__
    c = model.config
    return {"exits": str(exits_dir), "model": c.base_model, "exit_layers": list(c.exit_layers),
            "num_layers": c.num_layers, "arch": c.arch, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
                       + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "torch": torch.__version__, "transformers": transformers.__version__, "eetune": __version__,
            "threads": torch.get_num_threads()}

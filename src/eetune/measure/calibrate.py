"""Calibration: the early-exit threshold that keeps decoding faithful to the full model.

An early-exit threshold trades speed for fidelity, and how much depends on the exits, the text
and the confidence measure, so a fixed 0.9 is rarely the right one. CALM (Schuster et al. 2022)
states the remedy, calibrating the threshold on held-out data against a target, but ships no
code; this module does it for eetune's exits, behind `eetune calibrate DIR --target-agreement
0.95`:

1. **Per-token facts** (`token_table`): held-out text (default `default-dev`, BoolQ dev passages;
   any data spec `eetune evaluate` takes) is packed into blocks and split into a calibration part
   and a separate test part of whole blocks. The model runs teacher-forced once per block (the
   full-depth pass `eetune.train.gates` uses for its features), which gives, for every token and exit,
   the exit's confidence (`eetune.decode.api.confidence` of its logits; with `gate`, its gate's
   probability) and whether the exit's top-1 equals the final layer's top-1.
2. **The engine's decision rule, simulated** (`outcomes`, `simulate`): the first exit, shallowest
   first, whose confidence >= its threshold emits its own top-1; otherwise the final layer's.
   A restricted-vocabulary head (`convert --exit-vocab K`: K tokens + OTHER) takes a token only
   where OTHER does not win: `token_table` gives those positions a confidence of -1, so they
   never count as exiting at any threshold, and its top-1 is its mapped token id.
   On a teacher-forced prefix this is exactly what the decoding engines decide given that
   prefix: KV recomputation keeps every hidden state equal to that of a cache-free pass. Token
   agreement = share of tokens whose emitted token is the final layer's top-1.
   **On the model's own text** (`continuation_parts`, `eetune calibrate --continue-tokens N`):
   a model is surer of its own continuations than of human text, so thresholds and predicted
   speedup from passages can be far from what decoding sees (Gemma-3-270M: 22% of BoolQ-passage
   tokens clear its calibrated thresholds, 64% of its own summaries' tokens). Instead, prompts
   (`continuation_prompts`) are continued greedily for N tokens in `full` mode, and the table
   counts only the continuation's tokens after the first (which the prefill emits at full depth):
   the text a greedy decode of those prompts produces, as long as its exits agree.
3. **Cost model** (`cost_model`), in decoder-layer equivalents measured on this machine by
   `eetune.measure.evaluate.exit_costs` (each figure the median of 3 measurements), checked
   against what `Engine.early_exit_step` runs: a token that leaves at exit k costs k layers plus
   every exit head evaluated on the way (max-prob: each exit passed costs its transform and its
   own projection, K + OTHER rows for a restricted head, timed as it is; gate: a passed exit
   costs nothing but its block for `layer` exits, since the head runs only when the gate fires,
   and the gate's dot product is counted as free; a restricted head with OTHER runs its cheap
   projection in the decision, so it costs its whole head), never the final LM head, plus the
   KV recomputation of the L - k layers it skipped: those climb later in one block with the
   next token that goes deeper, one token more in that block, which costs
   (layer on 5 tokens - layer) / 4 per layer (`evaluate.recompute_layers`, from the measured
   `layer_x5_layers`). A token that leaves nowhere costs all L layers, those heads and the
   final norm + LM head. Every token also pays the decode step's own cost outside the layers and
   heads (embedding, set-up, choosing and emitting the token: `step_overhead_layers`, measured by
   `measured_costs` with the engine in `full` mode; 0 when not measured), which early exit does
   not save, and every exit asked pays its decision's own cost besides its head (the segment
   boundary, reading the decision back to the host: `decision_overhead_layers`, measured by
   `measured_costs` as what an early-exit decode that never exits costs beyond the layers, the
   heads, the LM head and the step); both 0 when not measured. Full depth costs L + the LM head
   + the step's own cost; predicted speedup = full cost / mean cost. An exit whose threshold is
   above 1 (`NEVER`) can never fire, and the engine does not ask it: it costs nothing, and with
   every exit at `NEVER` early exit decodes as `full` does (predicted speedup 1.0), so the search
   below never settles on a setting it predicts to be slower than `full`. On a fast CPU, with these
   two and alternated timings (`eetune.decode.policy.measure_costs`), the prediction for
   Gemma-3-270M went from +17.9% to +4.8% of the realized speedup. With max-prob the costs do
   not change which single threshold is chosen (a lower
   threshold only ever moves a token to a shallower, cheaper outcome, so the fastest threshold
   meeting the target is the lowest one); they decide per-exit and gate thresholds and the
   predicted speedup.
4. **Search** (`search_global`, `search_per_exit`): over `GRID` (0 .. 0.89 by 0.01, 0.900 ..
   0.989 by 0.001, 0.9900 .. 0.9999 by 0.0001, 1.0, and `NEVER` = 1.01: never exit), the one
   threshold for every exit that meets the target agreement on the calibration part at the
   highest predicted speedup (ties: the higher agreement, then the higher threshold); with
   `per_exit`, a threshold per exit by coordinate search from there (an exit at a time over the
   grid, the others fixed, while the predicted speedup rises). Never exiting always meets the
   target, so there always is an answer; when it is the only one, the result says so
   (`never_exits`) and early exit is slower than `--mode full` there. The agreement and
   predicted speedup of the chosen thresholds are then measured on the test part.
5. **Stored** (`store_calibration`) in the exits directory's exit_config.json under
   `calibration` (atomically), with the target, confidence, thresholds, both parts' results,
   data, cost model and a digest of the heads (and gates) it was measured on. From then on
   `eetune generate` and `eetune.generate` in early-exit mode use it when no threshold is
   given and the confidence measure matches (`calibrated_thresholds`, called by
   `eetune.decode.api.resolve_thresholds`); heads changed since (e.g. `eetune tune --out`, which
   carries the config over) leave it unused.

    from eetune.measure.calibrate import calibrate, calibration_blocks, store_calibration
    calib, test, data = calibration_blocks(tokenizer, "default-dev", seq_len=256, calib=8, test=8)
    result = calibrate(model, calib, test, target=0.95)        # {"thresholds": {10: ..., 20: ...}, ...}
    store_calibration("runs/exits", {**result, "data": data})  # ExitConfig.load(...).calibration
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from eetune.errors import EETuneError
from eetune.model.early_exit import calibrated_thresholds, heads_digest  # noqa: F401 (the stored calibration is read there)

NEVER = 1.01  # a threshold no confidence reaches: never exit early
OTHER_CONF = -1.0  # the confidence `token_table` gives a position whose restricted head's OTHER wins: never exits
GRID = tuple(float(x) for x in np.round(np.concatenate([
    np.arange(0, 90) / 100, np.arange(900, 990) / 1000, np.arange(9900, 10000) / 10000, [1.0, NEVER]]), 6))


# --- settings ---------------------------------------------------------------------------------
def check_settings(target, confidence: str = "max-prob", calib_blocks: int = 8, test_blocks: int = 8,
                   seq_len: int = 256, batch_size: int = 4) -> None:
    """One-line errors for settings calibration cannot use (before anything slow happens)."""
    from eetune.decode.rules import CONFIDENCES

    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise EETuneError(f"--target-agreement {target} is outside (0, 1]: give the share of tokens that must equal "
                          f"the full model's, e.g. 0.95")
    if confidence not in CONFIDENCES:
        raise EETuneError(f"unknown confidence {confidence!r}: use one of {', '.join(CONFIDENCES)}")
    for flag, n, least in (("--calib-blocks", calib_blocks, 1), ("--test-blocks", test_blocks, 1),
                           ("--seq-len", seq_len, 2), ("--batch-size", batch_size, 1)):
        if isinstance(n, bool) or not isinstance(n, int) or n < least:
            raise EETuneError(f"{flag} {n} must be an integer >= {least}")


def continuation_prompts(tokenizer, spec: str, chat: bool = False) -> list[list[int]]:
    """Prompt token ids for calibrating on the model's own continuations. `default-dev` (and
    `default`): the held-out BoolQ dev passages (the training ones) with their questions, as the
    four requests of `generated:` data (`eetune.train.selfdata.boolq_prompts`: user turns of the
    chat template where the tokenizer has one); any other source: each of its texts is one
    prompt, as plain text, or with `chat` one user turn of the chat template. Prompts longer than
    `selfdata.MAX_PROMPT_TOKENS` are left out."""
    from eetune.model import defaults
    from eetune.train import selfdata
    from eetune.train.data import load_texts

    if spec in ("default-dev", "default"):
        name = "boolq_dev_passages.jsonl" if spec == "default-dev" else "boolq_train_prompts.jsonl"
        rows = [json.loads(line) for line in defaults.default_data_file(name).read_text(encoding="utf-8").splitlines()
                if line.strip()]
        prompts = selfdata.boolq_prompts(tokenizer, [{"question": r["question"], "passage": r.get("passage", r.get(
            "text"))} for r in rows])
    else:
        if chat and not getattr(tokenizer, "chat_template", None):
            raise EETuneError("--chat: this tokenizer has no chat template: leave --chat out (plain prompts)")
        from eetune.decode.api import chat_prompt_ids
        prompts = [chat_prompt_ids(tokenizer, t) if chat else tokenizer(t, add_special_tokens=True)["input_ids"]
                   for t in load_texts(spec)]
    return [list(p) for p in prompts if 0 < len(p) <= selfdata.MAX_PROMPT_TOKENS]


def check_continue_tokens(n) -> None:
    """One line for a `--continue-tokens` that is not an integer >= 2 (0 = off is the caller's)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise EETuneError(f"--continue-tokens {n} must be an integer >= 2 (the first new token comes from the "
                          f"prefill at full depth and is not counted), or 0 for teacher-forced text")


def continuation_parts(model, tokenizer, spec: str, calib: int, test: int, max_new_tokens: int, chat: bool = False,
                       batch_size: int = 8, progress: bool = False) -> tuple:
    """The first `calib` + `test` prompts of `continuation_prompts(spec)` continued greedily in
    `full` mode for up to `max_new_tokens` tokens (batched; stopping at the end-of-sequence
    tokens). Returns (calibration pairs, test pairs, a description to store); a pair is (prompt
    ids, continuation ids), and what calibration counts of it is the continuation's tokens after
    the first (`continuation_table`)."""
    from eetune.decode.api import DecodeOptions, end_token_ids, generate
    from eetune.progress import progress_display

    check_continue_tokens(max_new_tokens)
    prompts = continuation_prompts(tokenizer, spec, chat)
    need = calib + test
    if len(prompts) < need:
        raise EETuneError(f"data {spec} gives {len(prompts)} usable prompts, fewer than --calib-blocks {calib} + "
                          f"--test-blocks {test} (prompts, with --continue-tokens): ask for fewer or give more")
    prompts = prompts[:need]
    eos = end_token_ids(model, tokenizer)
    pairs = []
    bar = progress_display(need, "continue", "prompt", bar=progress, lines=progress)
    try:
        for a in range(0, need, batch_size):
            chunk = prompts[a:a + batch_size]
            with torch.no_grad():
                g = generate(model, chunk, DecodeOptions(mode="full", max_new_tokens=max_new_tokens, eos_token_ids=eos))
            pairs += [(p, list(r.ids)) for p, r in zip(chunk, g.rows)]
            bar.update(len(chunk))
    finally:
        bar.close()
    c, t = pairs[:calib], pairs[calib:]
    counted = [sum(max(0, len(n) - 1) for _, n in part) for part in (c, t)]
    if not all(counted):
        raise EETuneError(f"the model ended its continuations of {spec} at once: nothing to calibrate on; give other "
                          f"prompts (or leave --continue-tokens out: teacher-forced text)")
    info = {"source": spec, "continuations": True, "max_new_tokens": max_new_tokens, "chat": bool(chat),
            "calib_blocks": calib, "test_blocks": test, "calib_tokens": counted[0], "test_tokens": counted[1],
            "calib_digest": _pairs_digest(c), "test_digest": _pairs_digest(t)}
    return c, t, info


def _pairs_digest(pairs) -> str:
    """As `evaluate.blocks_digest`: the first 16 hex digits of a SHA-256 of the pairs' int32 ids."""
    h = hashlib.sha256()
    for p, n in pairs:
        h.update(np.asarray(p, dtype=np.int32).tobytes() + b"|" + np.asarray(n, dtype=np.int32).tobytes() + b"#")
    return h.hexdigest()[:16]


def calibration_blocks(tokenizer, spec: str, seq_len: int, calib: int, test: int) -> tuple:
    """The data `spec` (as `eetune evaluate --data` takes it) packed into blocks of `seq_len`
    tokens: the first `calib` blocks for calibration, the next `test` for the test part (whole
    blocks, no block in both). Returns (calib blocks, test blocks, a description to store)."""
    from eetune.train.data import load_texts, pack_blocks
    from eetune.measure.evaluate import blocks_digest

    blocks = pack_blocks(tokenizer, load_texts(spec), seq_len, calib + test)
    if blocks.shape[0] < calib + test:
        raise EETuneError(f"data {spec} gives {blocks.shape[0]} blocks of {seq_len} tokens, fewer than --calib-blocks "
                          f"{calib} + --test-blocks {test}: ask for fewer blocks, a smaller --seq-len, or more text")
    c, t = blocks[:calib], blocks[calib:calib + test]
    info = {"source": spec, "seq_len": seq_len, "calib_blocks": calib, "test_blocks": test,
            "calib_tokens": int(c.shape[0] * (seq_len - 1)), "test_tokens": int(t.shape[0] * (seq_len - 1)),
            "calib_digest": blocks_digest(c), "test_digest": blocks_digest(t)}
    return c, t, info


# --- 1. per-token facts -----------------------------------------------------------------------
@torch.no_grad()
def token_table(model, blocks: torch.Tensor, confidence: str = "max-prob", batch_size: int = 4,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced over `blocks` (N, T), every position but each block's last: per exit
    (rows, shallowest first) and token, the confidence (E, n) float32 (`gate`: the gate's
    probability on the exit's input hidden state) and whether the exit's top-1 equals the final
    layer's top-1 (E, n) bool. A restricted-vocabulary head's top-1 is its token
    (`ExitHead.predict`); where its OTHER class wins, the token cannot leave there (the engine
    requires OTHER not to win) and never agrees: its confidence is set to `OTHER_CONF` (-1), below
    every threshold, so no threshold counts it as exiting."""
    from eetune.decode.rules import confidence as conf_of
    from eetune.train.gates import _exit_batches

    if confidence == "gate" and not model.has_gates:
        raise EETuneError("--confidence gate: these exits have no gates; train them with `eetune tune DIR --out OUT "
                          "--gates-only`, or use --confidence max-prob")
    model.eval()
    layers = model.exit_layers
    confs, agrees = [], []
    for per_exit, final_top1 in _exit_batches(model, blocks, batch_size, "calibrate", progress):
        c, a = [], []
        for k in layers:
            h, lg = per_exit[k]
            head = model.head(k)
            cf = (model.gate(k)(h) if confidence == "gate" else conf_of(lg, confidence)).float()
            top = head.predict(lg)[1]  # token ids; -1 where OTHER wins
            c.append(torch.where(top >= 0, cf, torch.full_like(cf, OTHER_CONF)).cpu())
            a.append((top == final_top1).cpu())
        confs.append(torch.stack(c))
        agrees.append(torch.stack(a))
    return torch.cat(confs, 1), torch.cat(agrees, 1)


def continuation_table(model, pairs, confidence: str = "max-prob",
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_table` of (prompt, continuation) pairs, counting only the continuation's tokens after
    the first: teacher forced over prompt + continuation, position len(prompt) + j - 1 predicts
    continuation token j (j >= 1; token 0 comes from the prefill)."""
    from eetune.progress import progress_display

    confs, agrees = [], []
    bar = progress_display(len(pairs), "calibrate", "prompt", bar=progress, lines=progress)
    try:
        for prompt, new in pairs:
            if len(new) >= 2:
                conf, agree = token_table(model, torch.tensor([list(prompt) + list(new)]), confidence, batch_size=1)
                lo, hi = len(prompt), len(prompt) + len(new) - 1
                confs.append(conf[:, lo:hi])
                agrees.append(agree[:, lo:hi])
            bar.update(1)
    finally:
        bar.close()
    E = len(model.exit_layers)
    if not confs:
        return torch.zeros(E, 0), torch.zeros(E, 0, dtype=torch.bool)
    return torch.cat(confs, 1), torch.cat(agrees, 1)


def part_table(model, part, confidence: str = "max-prob", batch_size: int = 4, progress: bool = False) -> tuple:
    """The table of a calibration or test part: blocks (a tensor, `token_table`) or (prompt,
    continuation) pairs (`continuation_table`)."""
    if isinstance(part, torch.Tensor):
        return token_table(model, part, confidence, batch_size, progress)
    return continuation_table(model, part, confidence, progress)


# --- 2. the decision rule and 3. its cost -------------------------------------------------------
def cost_model(model, confidence: str = "max-prob", costs: dict | None = None) -> dict:
    """Costs in decoder-layer equivalents of the decisions `simulate` counts, as the engine
    (`eetune.decode.engine.Engine.early_exit_step`) spends them. `costs`: what
    `eetune.measure.evaluate.exit_costs(model)` returns (when None: `measured_costs`, its median
    of 3 measurements). An exit asked costs its transform and its own projection (K + OTHER rows
    for a restricted head, as measured); a token that leaves at exit k pays layers 1..k and the
    heads it asked on the way, never the final LM head, plus the recomputation of the L - k layers
    it skipped (`recompute`: its keys and values climb later in one block with the next token that
    goes deeper, one token more in that block: `evaluate.recompute_layers` per layer, 0 when the
    costs do not have `layer_x5_layers`); a token that leaves nowhere pays all L layers, every
    head and the final norm + LM head. With `gate` a passed exit costs nothing (its head runs only
    when the gate fires; the gate's dot product is counted as free), but a `layer` exit's block
    always runs (its cache), and a head with an OTHER class runs its projection in the decision
    (the token leaves only where OTHER does not win), so it costs its whole head.
    Returns {"num_layers", "exit_layers", "lm_head_layers", "full_layers" (L + LM head), "leave"
    and "pass" (per exit, shallowest first: what the exit costs when a token leaves there / when
    it goes on), "recompute" (per exit: the recomputation a token leaving there costs),
    "recompute_per_layer", "step_overhead_layers" (what every decoded token costs besides its
    layers and heads: `costs["step_overhead_layers"]`, 0 when absent), "decision_overhead_layers"
    (what asking an exit costs besides its head, in every "leave" and "pass": `costs[
    "decision_overhead_layers"]`, 0 when absent), "outcome" (per exit, then
    the final layer: a token's whole cost when it is emitted there, the step's own included),
    "exit_vocab" (K or None) and "measured" (the costs used)}."""
    from eetune.measure.evaluate import recompute_layers

    c = measured_costs(model) if costs is None else costs
    L, lm = int(c["num_layers"]), c.get("lm_head_layers")

    def measured(name):
        v = c.get(name)
        return float(v) if v is not None and math.isfinite(v) and v > 0 else 0.0
    step, decision = measured("step_overhead_layers"), measured("decision_overhead_layers")
    delta = recompute_layers(c)
    leave, passing, recompute = [], [], []
    for k in model.exit_layers:
        e = (c.get("exits") or {}).get(str(k)) or {}
        whole, transform = e.get("layers"), e.get("transform_layers")
        if whole is None or lm is None or not all(math.isfinite(x) for x in (whole, lm)):
            raise EETuneError(f"the cost of exit {k} or of the LM head could not be measured on this machine: "
                              f"calibration needs them (see `eetune evaluate`)")
        head = model.head(k)
        leave.append(float(whole) + decision)
        recompute.append(max(0, L - k) * delta)
        if confidence != "gate" or getattr(head, "has_other", False):
            passing.append(float(whole) + decision)
        else:  # the head runs only when the gate fires; a `layer` exit's block always runs (its cache)
            passing.append((float(transform or 0.0) if head.arch == "layer" else 0.0) + decision)
    cost = {"num_layers": L, "exit_layers": list(model.exit_layers), "lm_head_layers": float(lm),
            "full_layers": L + float(lm) + step, "leave": leave, "pass": passing, "recompute": recompute,
            "recompute_per_layer": delta, "step_overhead_layers": step, "decision_overhead_layers": decision}
    cost["outcome"] = outcome_costs(cost, [True] * len(leave))
    return {**cost, "exit_vocab": getattr(model, "exit_vocab", None), "measured": c}


def outcome_costs(cost: dict, asked) -> list[float]:
    """A token's whole cost in layers when it is emitted at each exit (shallowest first), then at
    the final layer, when only the exits `asked` (one bool per exit) make a decision: an exit
    whose threshold is above 1 never fires, and the engine does not ask it (no head, no
    decision cost); a token emitted at an exit not asked costs nothing here (it cannot happen)."""
    L, step = cost["num_layers"], cost["step_overhead_layers"]
    outcome, climbed = [], 0.0
    for j, k in enumerate(cost["exit_layers"]):
        outcome.append(k + climbed + cost["leave"][j] + cost["recompute"][j] + step if asked[j] else 0.0)
        climbed += cost["pass"][j] if asked[j] else 0.0
    outcome.append(L + climbed + cost["lm_head_layers"] + step)
    return outcome


def decode_token_seconds(model, tokens: int = 32, context: int = 64, mode: str = "full", reps: int = 3) -> float:
    """Seconds per token of a greedy decode with the engine, after the first token: (a decode of
    `tokens` + 1 new tokens - a decode of 1) / `tokens`, each the best of `reps` decodes, on a
    `context`-token prompt. `mode` "full", or "early-exit" with every exit asked and none taken.
    (Single decodes of 16 tokens put SmolLM2's step anywhere between 27 and 36 layers on a noisy
    CPU, and the step and decision costs are differences of such figures.)"""
    from eetune.decode.api import DecodeOptions, generate_ids

    V, L = model.backbone.vocab_size, model.backbone.num_layers
    prompt = [(i * 7919 + 11) % V for i in range(context)]

    def seconds(n):
        # every exit asked and none taken: decisions replayed as "the final layer" (a threshold above
        # 1 would not ask them at all)
        kw = {"replay": (L,) * (n + 1)} if mode == "early-exit" else {}
        opts = DecodeOptions(mode=mode, max_new_tokens=n, **kw)
        return generate_ids(model, [prompt], opts).seconds

    seconds(2)  # warm-up
    long = min(seconds(tokens + 1) for _ in range(reps))
    short = min(seconds(1) for _ in range(reps))
    return max(0.0, (long - short) / tokens)


def measured_costs(model, repeats: int = 3) -> dict:
    """`eetune.measure.evaluate.exit_costs(model)` measured `repeats` times afresh, each figure the median
    of its measurements (`repeats` recorded): one measurement on a busy machine can be far off,
    and the LM head's cost is a difference of two timings. The model's cached costs (which
    `--draft-exit auto` uses) are left as they were, or the last measurement when there were none.
    Also `decode_token_layers`, a whole `full` decode step (`decode_token_seconds`) in layers,
    and `step_overhead_layers`, what that step costs beyond its L layers and LM head (never
    below 0): the part of every token that early exit does not save; `never_token_layers`, an
    early-exit step that asks every exit and takes none, and `decision_overhead_layers`, what it
    costs beyond the full step and the exits' heads, per exit asked (never below 0). Each repeat
    times its decodes right after its layer and heads, and these four are the medians of the
    repeats' own ratios."""
    import statistics

    from eetune.measure.evaluate import exit_costs

    saved = getattr(model, "_eetune_costs", None)
    runs, pairs = [], []
    for _ in range(repeats):
        model._eetune_costs = None  # measure_costs caches on the model: measure afresh
        runs.append(exit_costs(model))
        # the decode steps right after the layer they are counted in, so that a change of the
        # machine's speed between repeats does not enter their ratio (each repeat its own ratio)
        pairs.append((decode_token_seconds(model), decode_token_seconds(model, mode="early-exit")))
    if saved is not None:
        model._eetune_costs = saved

    def median(values):
        return None if any(v is None for v in values) else float(statistics.median(values))

    out = {**runs[-1], "layer_s": median([r["layer_s"] for r in runs]),
           "lm_head_layers": median([r["lm_head_layers"] for r in runs]), "repeats": repeats, "exits": {}}
    if "layer_x5_layers" in runs[-1]:
        out["layer_x5_layers"] = median([r.get("layer_x5_layers") for r in runs])
    for k in runs[-1]["exits"]:
        tr = median([r["exits"][k]["transform_layers"] for r in runs])
        pr = median([r["exits"][k]["projection_layers"] for r in runs])
        out["exits"][k] = {"transform_layers": tr, "projection_layers": pr,
                           "layers": None if tr is None or pr is None else tr + pr}
    L = out["num_layers"]
    per_rep = []  # (full step, never step, step overhead, decision overhead) in layers, per repeat
    for r, (token, never) in zip(runs, pairs):
        layer, lm = r["layer_s"], r["lm_head_layers"]
        if not (token and layer and lm is not None):
            continue
        heads = [e["layers"] for e in r["exits"].values()]
        dec = ((never - token) / layer - sum(heads)) / len(heads) if never and heads and None not in heads else None
        per_rep.append((token / layer, never / layer if never else None, token / layer - L - lm, dec))
    if per_rep:
        out["decode_token_layers"] = median([p[0] for p in per_rep])
        out["step_overhead_layers"] = max(0.0, median([p[2] for p in per_rep]))
        if all(p[1] is not None and p[3] is not None for p in per_rep):
            out["never_token_layers"] = median([p[1] for p in per_rep])
            out["decision_overhead_layers"] = max(0.0, median([p[3] for p in per_rep]))
    return out


def outcomes(conf: torch.Tensor, thresholds) -> torch.Tensor:
    """Where each token is emitted: (n,) index of the first exit (rows of `conf` (E, n),
    shallowest first) whose confidence >= its threshold, E where none is (the final layer).
    Thresholds are compared in float32, as the engines compare a float32 confidence."""
    t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1, 1)
    miss = (conf.float() < t).int()
    return miss.cumprod(0).sum(0)  # leading misses = the first hit's index


def simulate(conf: torch.Tensor, agree: torch.Tensor, thresholds, cost: dict) -> dict:
    """Early exit at `thresholds` (one per exit, or one for all) on per-token confidences `conf`
    (E, n) and agreements `agree` (E, n): "agreement" (share of tokens whose emitted token is the
    final layer's top-1), "exit_share" (per exit: share of tokens emitted there), "mean_cost"
    (layer-equivalents per token), "speedup" (full-depth cost / mean cost), "tokens"."""
    E, n = conf.shape
    t = torch.as_tensor(thresholds, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        t = t.expand(E)
    where = outcomes(conf, t)
    right = torch.cat([agree, torch.ones(1, n, dtype=torch.bool)]).gather(0, where[None]).squeeze(0)
    counts = torch.bincount(where, minlength=E + 1).double()
    outcome = outcome_costs(cost, (t <= 1).tolist())  # exits above 1 are not asked (engine.run)
    mean_cost = float(counts @ torch.tensor(outcome, dtype=torch.float64)) / n
    return {"agreement": int(right.sum()) / n, "speedup": cost["full_layers"] / mean_cost, "mean_cost": mean_cost,
            "exit_share": {int(k): float(c) / n for k, c in zip(cost["exit_layers"], counts[:E])}, "tokens": n}


# --- 4. search ----------------------------------------------------------------------------------
def _meets(stats: dict, target: float) -> bool:
    return stats["agreement"] >= target - 1e-12


def search_global(conf, agree, cost: dict, target: float, grid=GRID) -> tuple[float, dict]:
    """The grid threshold (the same at every exit) that meets `target` agreement at the highest
    predicted speedup; ties: the higher agreement, then the higher threshold. `NEVER` is
    always in the search (it always meets the target). Returns (threshold, its simulate stats)."""
    best = None
    for t in sorted(set(grid) | {NEVER}):
        s = simulate(conf, agree, t, cost)
        if _meets(s, target):
            key = (s["speedup"], s["agreement"], t)
            if best is None or key > best[0]:
                best = (key, t, s)
    return best[1], best[2]


def search_per_exit(conf, agree, cost: dict, target: float, start, grid=GRID,
                    max_sweeps: int = 50) -> tuple[list[float], dict]:
    """Coordinate search from `start` (thresholds per exit that meet `target`, e.g. the global
    answer): one exit at a time, its threshold set to the grid value that meets the target at
    the highest predicted speedup with the others fixed, moved only when that beats the current
    (speedup, agreement); sweeps over the exits until none moves. Returns (thresholds per exit,
    their simulate stats): a point no single exit's threshold can improve."""
    values = sorted(set(grid) | {NEVER})
    cur = [float(x) for x in start]
    s = simulate(conf, agree, cur, cost)
    if not _meets(s, target):
        raise ValueError("the starting thresholds do not meet the target")
    for _ in range(max_sweeps):
        moved = False
        for j in range(len(cur)):
            best = None
            for v in values:
                cand = cur[:j] + [v] + cur[j + 1:]
                cs = simulate(conf, agree, cand, cost)
                if _meets(cs, target) and (best is None or (cs["speedup"], cs["agreement"], v) > best[0]):
                    best = ((cs["speedup"], cs["agreement"], v), cand, cs)
            if best is not None and (best[2]["speedup"], best[2]["agreement"]) > (s["speedup"], s["agreement"]):
                cur, s, moved = best[1], best[2], True
        if not moved:
            break
    return cur, s


def calibrate(model, calib_blocks: torch.Tensor, test_blocks: torch.Tensor, target: float,
              confidence: str = "max-prob", per_exit: bool = False, batch_size: int = 4, progress: bool = False,
              costs: dict | None = None, grid=GRID) -> dict:
    """Choose early-exit threshold(s) meeting `target` token agreement with the full model on
    `calib_blocks` at the highest predicted speedup, and measure them on `test_blocks` (blocks
    (N, T), or (prompt, continuation) pairs from `continuation_parts`).
    `costs`: `exit_costs(model)` (measured when None). Returns the calibration record (JSON-ready
    but for its int keys; `store_calibration` stores it): target, confidence, per_exit,
    `threshold` (the global one, None with per_exit), `thresholds` {exit layer: t},
    `never_exits`, `calib_agreement`, `test_agreement`, `predicted_speedup` (on the test part),
    per part "calib" / "test" (simulate stats), `global` (the global answer, for comparison),
    `cost_model`, `grid`, `heads_digest`."""
    from eetune.version import __version__

    blocks = isinstance(calib_blocks, torch.Tensor)
    check_settings(target, confidence, len(calib_blocks), len(test_blocks),
                   int(calib_blocks.shape[1]) if blocks else 2, batch_size)
    if confidence == "gate" and not model.has_gates:
        raise EETuneError("--confidence gate: these exits have no gates; train them with `eetune tune DIR --out OUT "
                          "--gates-only`, or use --confidence max-prob")
    cost = cost_model(model, confidence, costs)
    conf_c, agree_c = part_table(model, calib_blocks, confidence, batch_size, progress)
    conf_t, agree_t = part_table(model, test_blocks, confidence, batch_size, progress)
    t_global, s_global = search_global(conf_c, agree_c, cost, target, grid)
    thresholds, s_calib = [t_global] * len(model.exit_layers), s_global
    if per_exit:
        thresholds, s_calib = search_per_exit(conf_c, agree_c, cost, target, thresholds, grid)
    s_test = simulate(conf_t, agree_t, thresholds, cost)
    never = all(t > 1 for t in thresholds)
    values = sorted(set(grid) | {NEVER})
    grid_desc = {"points": len(values), "min": values[0],
                 "max_below_one": max((g for g in values if g < 1), default=None),
                 "finest_step": min((round(b - a, 6) for a, b in zip(values, values[1:])), default=None),
                 "never": NEVER}
    return {"target_agreement": float(target), "confidence": confidence, "per_exit": bool(per_exit),
            "threshold": None if per_exit else t_global,
            "thresholds": {k: t for k, t in zip(model.exit_layers, thresholds)}, "never_exits": never,
            "calib_agreement": s_calib["agreement"], "test_agreement": s_test["agreement"],
            "predicted_speedup": s_test["speedup"], "calib": s_calib, "test": s_test,
            "global": {"threshold": t_global, **s_global},
            "cost_model": {k: v for k, v in cost.items()}, "grid": grid_desc,
            "heads_digest": heads_digest(model, gates=confidence == "gate"), "eetune_version": __version__}


# --- 5. stored, and used ----------------------------------------------------------------------
def store_calibration(directory: str | Path, calibration: dict) -> Path:
    """Record `calibration` in `directory`/exit_config.json under `calibration` (replacing an
    earlier one; every other key kept as it is), atomically (temporary file, fsync, rename).
    Returns the path written."""
    from eetune.model.config import CONFIG_NAME, ExitConfig
    from eetune.measure.evaluate import json_safe
    from eetune.fsio import atomic_write_json

    path = Path(directory) / CONFIG_NAME
    ExitConfig.load(directory)  # an exits directory with a readable config, or a one-line error
    data = json.loads(path.read_text())
    data["calibration"] = json_safe(calibration)
    ExitConfig.from_dict(data)  # still a valid config
    atomic_write_json(path, data)
    return path


def describe_thresholds(thresholds: dict) -> str:
    """`0.93` when every exit has the same threshold, else `10: 0.99, 20: 0.95`."""
    values = set(thresholds.values())
    if len(values) == 1:
        return f"{values.pop():g}"
    return ", ".join(f"{k}: {t:g}" for k, t in sorted(thresholds.items(), key=lambda kv: int(kv[0])))


def format_calibration(cal: dict, directory: str | None = None) -> str:
    """A plain-text report of a calibration record."""
    def shares(s):
        return ", ".join(f"layer {k} {v:.1%}" for k, v in s["exit_share"].items())

    d, cm = cal.get("data") or {}, cal["cost_model"]
    lines = [f"calibration{' of ' + directory if directory else ''}: --confidence {cal['confidence']}, target "
             f"agreement {cal['target_agreement']:g} (share of tokens equal to the full model's top-1, teacher-forced)"]
    if d.get("continuations"):
        lines.append(f"  data: the model's own greedy continuations (up to {d['max_new_tokens']} tokens) of "
                     f"{d['calib_blocks']} calibration + {d['test_blocks']} test prompts from {d['source']}"
                     f"{' (chat)' if d.get('chat') else ''}: {d['calib_tokens']:,} + {d['test_tokens']:,} tokens "
                     f"counted, the prompts' own and each continuation's first left out")
    elif d:
        lines.append(f"  data: {d['source']}, {d['calib_blocks']} calibration + {d['test_blocks']} test blocks of "
                     f"{d['seq_len']} tokens ({d['calib_tokens']:,} + {d['test_tokens']:,} tokens)")
    which = "per exit" if cal["per_exit"] else "at every exit"
    lines.append(f"  threshold {which}: {describe_thresholds(cal['thresholds'])}"
                 + (f"  (one global threshold: {cal['global']['threshold']:g}, predicted speedup "
                    f"{cal['global']['speedup']:.2f}x on the calibration part)" if cal["per_exit"] else ""))
    for name, part in (("calibration part", cal["calib"]), ("test part", cal["test"])):
        lines.append(f"  {name + ':':<18} agreement {part['agreement']:.3f} (target {cal['target_agreement']:g}), "
                     f"exit early: {shares(part)}; predicted speedup {part['speedup']:.2f}x")
    m = cm.get("measured") or {}
    K = cm.get("exit_vocab")
    lines.append(f"  cost model: decoder-layer equivalents measured on {m.get('device', '?')} {m.get('dtype', '')}: "
                 + ", ".join(f"exit {k} {c:.2f}" for k, c in zip(cm["exit_layers"], cm["leave"]))
                 + (f" (heads of {K:,} tokens + OTHER)" if K else "")
                 + f", LM head {cm['lm_head_layers']:.2f} (never paid by a token that exits early); full depth "
                 f"{cm['full_layers']:.2f} per token"
                 + (f"; KV recomputation {cm['recompute_per_layer']:.3f} per skipped layer"
                    if cm.get("recompute_per_layer") else ""))
    if cal["never_exits"]:
        lines.append(f"  every exit at {NEVER:g} (never exits): no threshold below 1 both meets the target and is "
                     "predicted to beat --mode full on the calibration part; early exit at these thresholds asks no "
                     "exit and decodes as --mode full; lower the target or tune better exits")
    elif cal["predicted_speedup"] < 1:
        lines.append("  note: at this target early exit is predicted to be slower than --mode full on this machine "
                     "(its heads cost more than the layers it skips)")
    return "\n".join(lines)

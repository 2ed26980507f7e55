"""`eetune calibrate`: the simulated exit rule and cost against brute force, the search against
every grid point, the stored calibration and its use as generate's default, per-exit thresholds
in both engines, a real decode at the calibrated threshold replayed against the prediction, and
bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch
from conftest import L, V, peaky_backbone, save_peaky_model_dir
from test_engine import PROMPTS, assert_same, gated, ids_of
from test_engine import pair as both
from reference import reference_generate
from tune_helpers import one_thread  # noqa: F401 - tiny models run fastest on one thread

from eetune.model.backbone import load_tokenizer
from eetune.measure.calibrate import (GRID, NEVER, calibrate, calibrated_thresholds, calibration_blocks, cost_model,
                              heads_digest, outcomes, search_global, search_per_exit, simulate, token_table)
from eetune.cli import main
from eetune.model.config import CONFIG_NAME, ExitConfig
from eetune.decode import DEFAULT_THRESHOLD, DecodeOptions, generate
from eetune.errors import EETuneError
from eetune.measure.evaluate import json_safe
from eetune.model.early_exit import EarlyExitModel

# A made-up measured cost model (what evaluate.exit_costs returns), so that the search is deterministic.
COSTS = {"num_layers": L, "lm_head_layers": 0.4, "layer_s": 1e-3, "device": "cpu", "dtype": "float32",
         "exits": {"1": {"transform_layers": 0.1, "projection_layers": 0.4, "layers": 0.5},
                   "2": {"transform_layers": 0.3, "projection_layers": 0.4, "layers": 0.7},
                   "3": {"transform_layers": 0.1, "projection_layers": 0.4, "layers": 0.5}}}


def _model(layers=(1, 3), arch="mlp", family="llama"):
    return EarlyExitModel.convert(peaky_backbone(family), list(layers), arch=arch)


def _random_table(E=3, n=400, seed=0, lattice=True):
    """Random confidences (on a lattice of 0.05 steps, so that some equal a threshold exactly)
    and agreements that are likelier where the confidence is high."""
    g = torch.Generator().manual_seed(seed)
    conf = torch.rand(E, n, generator=g)
    if lattice:
        conf = (conf * 20).floor() / 20
    agree = torch.rand(E, n, generator=g) < 0.2 + 0.8 * conf
    return conf.float(), agree


def _brute(conf, agree, thresholds, layers, leave, passing, lm, L_=L):
    """The rule and its cost one token at a time in plain Python (float32 comparisons); an exit
    whose threshold is above 1 is not asked and costs nothing."""
    E, n = conf.shape
    same, cost, where = 0, 0.0, []
    for i in range(n):
        spent, out = 0.0, None
        for j in range(E):
            if thresholds[j] > 1:
                continue
            if np.float32(conf[j, i].item()) >= np.float32(thresholds[j]):
                out = j
                spent += layers[j] + leave[j]
                break
            spent += passing[j]
        if out is None:
            spent += L_ + lm
            same += 1
            where.append(E)
        else:
            same += bool(agree[out, i])
            where.append(out)
        cost += spent
    return where, same / n, cost / n


@pytest.mark.parametrize("confidence,arch", [("max-prob", "mlp"), ("gate", "mlp"), ("gate", "layer")])
def test_rule_and_cost_match_brute_force(confidence, arch):
    model = _model((1, 2, 3), arch=arch)
    cost = cost_model(model, confidence, COSTS)
    leave = [COSTS["exits"][str(k)]["layers"] for k in (1, 2, 3)]
    if confidence == "gate":  # a passed gate costs nothing, but a `layer` exit's block always runs
        passing = [COSTS["exits"][str(k)]["transform_layers"] if arch == "layer" else 0.0 for k in (1, 2, 3)]
    else:
        passing = leave
    assert cost["leave"] == leave and cost["pass"] == passing and cost["full_layers"] == L + 0.4
    conf, agree = _random_table()
    r = np.random.default_rng(0)
    for trial in range(6):
        ts = [float(x) for x in r.choice([0.0, 0.25, 0.5, 0.55, 0.8, 0.95, 1.0, NEVER], size=3)]
        where, agreement, mean_cost = _brute(conf, agree, ts, [1, 2, 3], leave, passing, 0.4)
        assert outcomes(conf, ts).tolist() == where
        s = simulate(conf, agree, ts, cost)
        assert s["agreement"] == pytest.approx(agreement) and s["mean_cost"] == pytest.approx(mean_cost)
        assert s["speedup"] == pytest.approx((L + 0.4) / mean_cost)
        assert s["exit_share"] == {k: pytest.approx(where.count(j) / conf.shape[1]) for j, k in enumerate((1, 2, 3))}
    # one threshold is every exit's; above 1 nobody exits and agreement is perfect
    assert simulate(conf, agree, 0.5, cost) == simulate(conf, agree, [0.5] * 3, cost)
    s = simulate(conf, agree, NEVER, cost)
    assert s["agreement"] == 1.0 and sum(s["exit_share"].values()) == 0.0
    assert s["speedup"] == 1.0  # no exit asked: `full`'s cost


def test_global_search_is_the_fastest_grid_point_meeting_the_target():
    model = _model((1, 2, 3))
    cost = cost_model(model, "max-prob", COSTS)
    conf, agree = _random_table(seed=1, lattice=False)
    for target in (0.5, 0.7, 0.8, 0.9):
        t, s = search_global(conf, agree, cost, target)
        assert s == simulate(conf, agree, t, cost) and s["agreement"] >= target
        every = [(g, simulate(conf, agree, g, cost)) for g in GRID]
        fastest = max(x["speedup"] for _, x in every if x["agreement"] >= target)
        assert s["speedup"] == fastest
        ties = [g for g, x in every if x["agreement"] >= target and x["speedup"] == fastest]
        assert t == max(ties)  # among equally fast thresholds: the most conservative
    # unreachable except by never exiting: no exit ever agrees
    t, s = search_global(conf, torch.zeros_like(agree), cost, 1.0)
    assert t == NEVER and s["agreement"] == 1.0 and s["speedup"] == 1.0


def test_search_never_settles_on_a_setting_slower_than_full():
    """Exits whose heads cost more than the layers they save: thresholds below 1 meet the target
    but are predicted slower than `full`, so the search keeps every exit at NEVER (not asked by the
    engine: `full`'s cost, speedup 1.0). It used to charge NEVER every head too and pick the least
    slow threshold: a calibrated setting slower than `full`."""
    model = _model((1, 2, 3))
    dear = {**COSTS, "exits": {k: {"transform_layers": 1.0, "projection_layers": 9.0, "layers": 10.0}
                               for k in ("1", "2", "3")}}
    cost = cost_model(model, "max-prob", dear)
    conf, agree = _random_table(seed=1, lattice=False)
    assert any(simulate(conf, agree, g, cost)["agreement"] >= 0.7 for g in GRID if g < 1)
    t, s = search_global(conf, agree, cost, 0.7)
    assert t == NEVER and s["speedup"] == 1.0
    ts, s = search_per_exit(conf, agree, cost, 0.7, [t] * 3)
    assert ts == [NEVER] * 3 and s["speedup"] == 1.0
    # one cheap exit pays: it alone is asked, the others stay at NEVER
    mixed = {**dear, "exits": {**dear["exits"], "2": {"transform_layers": 0.0, "projection_layers": 0.01,
                                                      "layers": 0.01}}}
    cost = cost_model(model, "max-prob", mixed)
    ts, s = search_per_exit(conf, agree, cost, 0.5, [NEVER] * 3)
    assert ts[0] == NEVER and ts[2] == NEVER and ts[1] < 1 and s["speedup"] > 1.0


def test_per_exit_search_is_a_coordinate_optimum_at_least_as_fast():
    model = _model((1, 2, 3))
    cost = cost_model(model, "max-prob", COSTS)
    conf, agree = _random_table(seed=2, lattice=False)
    grid = tuple(np.round(np.linspace(0, 1, 41), 4)) + (NEVER,)
    target = 0.8
    t0, s0 = search_global(conf, agree, cost, target, grid)
    ts, s = search_per_exit(conf, agree, cost, target, [t0] * 3, grid)
    assert s == simulate(conf, agree, ts, cost) and s["agreement"] >= target and s["speedup"] >= s0["speedup"]
    assert len(set(ts)) > 1  # here the exits do want different thresholds
    for j in range(3):  # no single exit's threshold does better
        for g in grid:
            c = simulate(conf, agree, ts[:j] + [g] + ts[j + 1:], cost)
            assert c["agreement"] < target or (c["speedup"], c["agreement"]) <= (s["speedup"], s["agreement"])


# --- the CLI, the stored record, and generate's default ---------------------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    src = save_peaky_model_dir(root / "tiny")
    r = np.random.default_rng(0)
    text = root / "held-out.txt"
    text.write_text(" ".join(f"w{x}" for x in r.integers(0, 96, size=400)))
    out = root / "exits"
    assert main(["convert", "--model", str(src), "--exits", "1,3", "--arch", "mlp", "--out", str(out)]) == 0
    return out, text


@pytest.fixture
def cheap_exits(monkeypatch):
    """Calibrate's measured costs as on a machine where an exit pays (a tenth of a layer, as a
    restricted-vocabulary head on a real model): on the tiny test model an exit head costs about
    as much as the layers it skips, and calibrate rightly keeps every exit at NEVER there."""
    from eetune.measure import calibrate as cal
    real = cal.measured_costs

    def cheap(model, repeats: int = 3):
        c = real(model, repeats=1)
        c["exits"] = {k: {"transform_layers": 0.05, "projection_layers": 0.05, "layers": 0.1} for k in c["exits"]}
        c["decision_overhead_layers"] = 0.0
        return c
    monkeypatch.setattr(cal, "measured_costs", cheap)


ARGS = ["--seq-len", "16", "--calib-blocks", "4", "--test-blocks", "3", "--target-agreement", "0.8"]


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def _calibrate(out, text, capsys, *extra):
    capsys.readouterr()
    assert main(["calibrate", str(out), "--data", str(text), *ARGS, "--json", *extra]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), cap.err


@pytest.mark.usefixtures("cheap_exits")
def test_calibrate_stores_a_record_that_round_trips(world, capsys):
    out, text = world
    before = _snapshot(out)
    rec, err = _calibrate(out, text, capsys, "--no-store")  # --no-store: the directory is left as it was
    assert _snapshot(out) == before and "stored" not in err
    rec, err = _calibrate(out, text, capsys)
    assert "stored in" in err
    assert ExitConfig.load(out).calibration == rec == json_safe(rec)
    json.loads((out / CONFIG_NAME).read_text(), parse_constant=lambda c: pytest.fail(f"{c} stored"))
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_NAME, "exit_heads.safetensors"]  # no temporary left
    assert (out / "exit_heads.safetensors").read_bytes() == before["exit_heads.safetensors"]
    assert rec["target_agreement"] == 0.8 and rec["confidence"] == "max-prob" and not rec["per_exit"]
    assert main(["info", str(out)]) == 0  # `info` shows the stored calibration
    shown = capsys.readouterr().out
    assert "calibration" in shown and f"threshold {rec['threshold']}" in shown and "target agreement 0.8" in shown
    t = rec["threshold"]
    assert rec["thresholds"] == {"1": t, "3": t} and t in GRID and not rec["never_exits"]
    assert rec["calib_agreement"] == rec["calib"]["agreement"] >= 0.8
    assert rec["test_agreement"] == rec["test"]["agreement"] and rec["predicted_speedup"] == rec["test"]["speedup"]
    d = rec["data"]
    assert d["calib_blocks"] == 4 and d["test_blocks"] == 3 and d["seq_len"] == 16 and d["source"] == str(text)
    assert d["calib_tokens"] == 4 * 15 and d["test_tokens"] == 3 * 15 and d["calib_digest"] != d["test_digest"]
    cm = rec["cost_model"]
    assert cm["exit_layers"] == [1, 3] and cm["full_layers"] == pytest.approx(L + cm["lm_head_layers"] + cm["step_overhead_layers"])
    assert set(cm["measured"]["exits"]) == {"1", "3"} and rec["heads_digest"].startswith("sha256:")
    # the table: the same numbers, said in words
    assert main(["calibrate", str(out), "--data", str(text), *ARGS, "--no-store"]) == 0
    printed = capsys.readouterr().out
    assert f"threshold at every exit: {t:g}" in printed and "test part" in printed and "predicted speedup" in printed


def _gen_json(out, *argv):
    assert main(["generate", str(out), "--prompt", "w5 w17 w33 w2 w9", "--max-new-tokens", "16", "--json",
                 *argv]) == 0


def test_generate_uses_the_calibration_unless_a_threshold_is_given(world, capsys):
    out, text = world
    rec, _ = _calibrate(out, text, capsys, "--per-exit")
    stored = {int(k): v for k, v in rec["thresholds"].items()}
    _gen_json(out)
    default = json.loads(capsys.readouterr().out)
    assert default["summary"]["threshold_source"] == "calibrated"
    assert default["summary"]["thresholds"] == rec["thresholds"]
    layers = [t["exit_layer"] for t in default["rows"][0]["tokens"]]
    # the same decode with the calibrated thresholds given explicitly (the API's per-exit option)
    model = EarlyExitModel.from_pretrained(out)
    tok = load_tokenizer(model.backbone)
    g = generate(model, ["w5 w17 w33 w2 w9"], tokenizer=tok, mode="early-exit", exit_thresholds=stored,
                       max_new_tokens=16)
    assert g.threshold_source == "given" and g.thresholds == stored
    assert [t.exit_layer for t in g.rows[0].tokens] == layers and g.rows[0].ids == default["rows"][0]["ids"]
    # an explicit --threshold wins: > 1 never exits
    _gen_json(out, "--threshold", "2")
    given = json.loads(capsys.readouterr().out)
    assert given["summary"]["threshold_source"] == "given" and set(given["summary"]["thresholds"].values()) == {2.0}
    assert {t["exit_layer"] for t in given["rows"][0]["tokens"]} == {L}
    _gen_json(out, "--exit-thresholds", "1:2,3:0")  # per exit from the command line: never at 1, always at 3
    per_exit = json.loads(capsys.readouterr().out)
    assert per_exit["summary"]["thresholds"] == {"1": 2.0, "3": 0.0}
    assert {t["exit_layer"] for t in per_exit["rows"][0]["tokens"]} == {3}
    # another confidence measure (gates, which these exits lack: refused), or self-speculation: 0.9 as before
    _gen_json(out, "--mode", "self-spec")
    assert json.loads(capsys.readouterr().out)["summary"]["threshold_source"] == "default"
    # the summary line says which threshold was used
    assert main(["generate", str(out), "--prompt", "w5 w17", "--max-new-tokens", "4"]) == 0
    assert "(calibrated)]" in capsys.readouterr().err


def test_a_calibration_of_other_heads_is_not_used(world, capsys):
    out, text = world
    _calibrate(out, text, capsys)
    model = EarlyExitModel.from_pretrained(out)
    assert calibrated_thresholds(model, "max-prob")[1] == "calibrated"
    assert DecodeOptions().threshold is None
    with torch.no_grad():
        model.heads[0].out.weight[0, 0] += 1.0  # the heads changed in place (as tuning would)
    chosen, source = calibrated_thresholds(model, "max-prob")
    assert chosen is None and "other heads" in source
    g = generate(model, [PROMPTS[0]], DecodeOptions(mode="early-exit", max_new_tokens=3))
    assert g.thresholds == {1: DEFAULT_THRESHOLD, 3: DEFAULT_THRESHOLD} and "other heads" in g.threshold_source
    # the digest ignores the dtype the heads were loaded in
    fresh = EarlyExitModel.from_pretrained(out)
    assert heads_digest(fresh) == ExitConfig.load(out).calibration["heads_digest"]
    assert heads_digest(fresh.to(torch.bfloat16)) == heads_digest(EarlyExitModel.from_pretrained(out))


@pytest.mark.usefixtures("cheap_exits")
def test_calibrated_decode_agrees_as_predicted(world, capsys):
    """The prediction, replayed with the engine at the calibrated (default) threshold:
    (1) every prefix of the calibration blocks decoded for one token: the engine's exit and
    token equal the simulated ones, so its agreement with `--mode full` is the stored
    calibration agreement; (2) a free-running decode: the teacher-forced table of the text it
    produced predicts each of its steps (KV recomputation included)."""
    out, text = world
    rec, _ = _calibrate(out, text, capsys, "--per-exit")
    model = EarlyExitModel.from_pretrained(out)
    stored = {int(k): v for k, v in rec["thresholds"].items()}
    calib, _, _ = calibration_blocks(load_tokenizer(model.backbone), str(text), 16, 4, 3)
    conf, agree = token_table(model, calib)
    where = outcomes(conf, [stored[1], stored[3]])
    near = (conf - torch.tensor([[stored[1]], [stored[3]]])).abs().lt(1e-5).any(0)  # float ties: not judged
    exit_of = [1, 3, L]
    same, checked, n = 0, 0, 0
    for b in range(calib.shape[0]):
        for p in range(calib.shape[1] - 1):
            prompt = calib[b, :p + 1].tolist()
            ee = generate(model, [prompt], DecodeOptions(mode="early-exit", max_new_tokens=1))
            full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=1))
            assert ee.threshold_source == "calibrated"
            same += ee.rows[0].ids == full.rows[0].ids
            if not near[n]:
                assert ee.rows[0].tokens[0].exit_layer == exit_of[int(where[n])], (b, p)
                checked += 1
            n += 1
    assert n == conf.shape[1] and checked >= n - 2
    assert abs(same / n - rec["calib_agreement"]) <= (n - checked) / n
    assert 0 < sum(int(w) < 2 for w in where) < n  # exits happen, and not everywhere: a meaningful check

    prompt = calib[0, :5].tolist()
    ee = generate(model, [prompt], DecodeOptions(mode="early-exit", max_new_tokens=40))
    gen_ids = ee.rows[0].ids
    conf, agree = token_table(model, torch.tensor([prompt + gen_ids]))
    P = len(prompt)
    where = outcomes(conf, [stored[1], stored[3]])[P - 1:]
    near = (conf - torch.tensor([[stored[1]], [stored[3]]])).abs().lt(1e-5).any(0)[P - 1:]
    engine_layers = [t.exit_layer for t in ee.rows[0].tokens]
    assert len(engine_layers) == len(where) == 40
    mismatch = [i for i in range(40) if not near[i] and engine_layers[i] != exit_of[int(where[i])]]
    assert not mismatch and len(set(engine_layers)) > 1


# --- per-exit thresholds in both engines ------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_exit_thresholds_lean_equals_reference(family):
    model = EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 3], arch="mlp")
    for th in ({1: 0.9, 3: 0.4}, {1: 0.5, 3: 0.95}):
        lean, ref = both(model, PROMPTS, mode="early-exit", exit_thresholds=th, max_new_tokens=24)
        assert_same(lean, ref)
        assert lean.thresholds == ref.thresholds == th
        lean, ref = both(model, PROMPTS, mode="self-spec", exit_thresholds=th, draft_len=3, max_new_tokens=16)
        assert ids_of(lean) == ids_of(ref)
    for gen in (generate, reference_generate):  # the exit's own threshold decides there
        only3 = gen(model, PROMPTS, DecodeOptions(mode="early-exit", exit_thresholds={1: NEVER, 3: 0.0},
                                                  max_new_tokens=8))
        assert {t.exit_layer for r in only3.rows for t in r.tokens} == {3}
        only1 = gen(model, PROMPTS, DecodeOptions(mode="early-exit", exit_thresholds={1: 0.0, 3: NEVER},
                                                  max_new_tokens=8))
        assert {t.exit_layer for r in only1.rows for t in r.tokens} == {1}
    gm = gated(EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 3], arch="mlp"))
    assert_same(*both(gm, PROMPTS, mode="early-exit", confidence="gate", exit_thresholds={1: 0.7, 3: 0.5},
                      max_new_tokens=20))


@pytest.mark.parametrize("kw,match", [({"exit_thresholds": {1: 0.5}}, "a threshold for each exit"),
                                      ({"exit_thresholds": {1: 0.5, 3: -1.0}}, "outside"),
                                      ({"exit_thresholds": {1: 0.5, 3: 0.5}, "threshold": 0.5}, "not both")])
def test_per_exit_thresholds_bad(kw, match):
    with pytest.raises(EETuneError, match=match):
        generate(_model(), [PROMPTS[0]], DecodeOptions(mode="early-exit", max_new_tokens=2, **kw))


@pytest.mark.parametrize("argv,match", [
    (["--exit-thresholds", "1:0.5"], "a threshold for each exit layer [1, 3]"),
    (["--exit-thresholds", "1:0.5,3"], "give exit layer:threshold pairs"),
    (["--exit-thresholds", "1:0.5,3:0.5", "--threshold", "0.5"], "not both"),
])
def test_generate_bad_exit_thresholds(world, capsys, argv, match):
    out, _ = world
    capsys.readouterr()
    try:
        code = main(["generate", str(out), "--prompt", "w1 w2", "--max-new-tokens", "2", *argv])
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_calibrate_gates_in_memory():
    model = gated(_model(), bias=0.5)
    g = torch.Generator().manual_seed(3)
    blocks = torch.randint(0, V, (5, 12), generator=g)
    rec = calibrate(model, blocks[:3], blocks[3:], 0.6, confidence="gate", costs=COSTS)
    conf, agree = token_table(model, blocks[:3], "gate")
    assert rec["calib"] == simulate(conf, agree, list(rec["thresholds"].values()), cost_model(model, "gate", COSTS))
    assert rec["calib_agreement"] >= 0.6 and rec["cost_model"]["pass"] == [0.0, 0.0]
    with pytest.raises(EETuneError, match="no gates"):
        calibrate(_model(), blocks[:3], blocks[3:], 0.6, confidence="gate", costs=COSTS)
    with pytest.raises(EETuneError, match=r"outside \(0, 1\]"):
        calibrate(model, blocks[:3], blocks[3:], 1.5, costs=COSTS)


# --- bad input ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,match", [
    (["--target-agreement", "0"], "outside (0, 1]"),
    (["--target-agreement", "1.01"], "outside (0, 1]"),
    (["--target-agreement", "nan"], "outside (0, 1]"),
    (["--confidence", "vibes"], "invalid choice: 'vibes'"),
    (["--confidence", "gate"], "no gates"),
    (["--calib-blocks", "0"], "--calib-blocks 0 must be an integer >= 1"),
    (["--test-blocks", "-2"], "--test-blocks -2 must be an integer >= 1"),
    (["--seq-len", "1"], "--seq-len 1 must be an integer >= 2"),
    (["--calib-blocks", "40", "--test-blocks", "30"], "fewer than --calib-blocks 40 + --test-blocks 30"),
    (["unwritable"], "is not writable; pass --no-store"),
    (["not-exits"], "is not an exits directory"),
])
def test_calibrate_bad_input(world, capsys, monkeypatch, argv, match):
    out, text = world
    target = out
    if argv == ["unwritable"]:
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, m, *a, **k: False if str(p) == str(out) else real(p, m, *a, **k))
        argv = []
    elif argv == ["not-exits"]:
        target, argv = text.parent, []
    before = _snapshot(out)
    capsys.readouterr()
    try:
        code = main(["calibrate", str(target), "--data", str(text), "--seq-len", "16", *argv])
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err
    assert _snapshot(out) == before


def test_grid_is_fine_and_ends_in_never():
    assert GRID[0] == 0.0 and GRID[-1] == NEVER > 1 and 1.0 in GRID and list(GRID) == sorted(GRID)
    assert {0.5, 0.9, 0.95, 0.99, 0.999, 0.9999} <= set(GRID)
    assert all(math.isfinite(g) for g in GRID)


def test_measured_costs_are_medians_and_leave_the_cache(monkeypatch):
    from eetune.measure import evaluate
    from eetune.measure.calibrate import measured_costs
    lm = iter([0.0, 12.5, 2.0])  # a busy machine: one measurement far off either way
    seen = []

    def fake(model):
        seen.append(getattr(model, "_eetune_costs", "unset"))
        x = next(lm)
        return {**COSTS, "lm_head_layers": x,
                "exits": {"1": {"transform_layers": x, "projection_layers": 1.0, "layers": x + 1.0}}}

    monkeypatch.setattr(evaluate, "exit_costs", fake)
    model = _model((1,))
    model._eetune_costs = "cached"
    c = measured_costs(model)
    assert seen == [None] * 3 and model._eetune_costs == "cached" and c["repeats"] == 3
    assert c["lm_head_layers"] == 2.0 and c["exits"]["1"] == {"transform_layers": 2.0, "projection_layers": 1.0,
                                                              "layers": 3.0}
    # a whole decode step, timed with the engine, and what it costs beyond the layers and the LM head;
    # an early-exit step asking the one exit and taking nothing, beyond the full step and the head
    assert c["decode_token_layers"] > 0 and c["step_overhead_layers"] == pytest.approx(
        max(0.0, c["decode_token_layers"] - L - 2.0))
    assert c["never_token_layers"] > 0 and c["decision_overhead_layers"] == pytest.approx(
        max(0.0, c["never_token_layers"] - c["decode_token_layers"] - 3.0))


def test_the_decode_steps_own_cost_enters_every_outcome():
    """Every token pays the step's own cost (`step_overhead_layers`), wherever it is emitted: the
    outcomes and full depth rise by it, and the predicted speedup is (full + s) / (mean + s)."""
    model = _model((1, 2, 3))
    base = cost_model(model, "max-prob", COSTS)
    more = cost_model(model, "max-prob", {**COSTS, "step_overhead_layers": 1.5})
    assert base["step_overhead_layers"] == 0.0 and more["step_overhead_layers"] == 1.5
    assert more["outcome"] == pytest.approx([o + 1.5 for o in base["outcome"]])
    assert more["full_layers"] == pytest.approx(L + 0.4 + 1.5)
    conf, agree = _random_table()
    a, b = simulate(conf, agree, 0.5, base), simulate(conf, agree, 0.5, more)
    assert b["mean_cost"] == pytest.approx(a["mean_cost"] + 1.5)
    assert b["speedup"] == pytest.approx((L + 0.4 + 1.5) / (a["mean_cost"] + 1.5)) and b["speedup"] < a["speedup"]
    for bad in (None, float("nan"), -2.0):  # unmeasured, or a disturbed timing: nothing added
        assert cost_model(model, "max-prob", {**COSTS, "step_overhead_layers": bad})["outcome"] == base["outcome"]



@pytest.mark.parametrize("confidence", ["max-prob", "gate"])
def test_each_exit_asked_pays_its_decision(confidence):
    """`decision_overhead_layers` (what asking an exit costs besides its head) is in every exit's
    "leave" and "pass", so a token emitted at exit j pays it j + 1 times and one that climbs to the
    top pays it once per exit."""
    model = _model((1, 2, 3))
    base = cost_model(model, confidence, COSTS)
    more = cost_model(model, confidence, {**COSTS, "decision_overhead_layers": 0.25})
    assert more["decision_overhead_layers"] == 0.25
    assert more["leave"] == pytest.approx([x + 0.25 for x in base["leave"]])
    assert more["pass"] == pytest.approx([x + 0.25 for x in base["pass"]])
    assert more["outcome"] == pytest.approx([o + 0.25 * n for o, n in zip(base["outcome"], (1, 2, 3, 3))])
    assert more["full_layers"] == base["full_layers"]  # `full` asks no exit


def test_decode_token_seconds_is_a_full_decode_step():
    from eetune.measure.calibrate import decode_token_seconds
    model = _model((1, 3))
    t = decode_token_seconds(model, tokens=4, context=8)
    assert 0 < t < 5.0


# --- restricted-vocabulary exit heads (K tokens + OTHER) ---------------------------------------
from conftest import H  # noqa: E402

from eetune.measure.calibrate import OTHER_CONF  # noqa: E402


@torch.no_grad()
def _restricted(K=40, layers=(1, 3), seed=0, blocks=None):
    """Exits restricted to K random token ids + OTHER: the first exit's OTHER wins everywhere (a
    huge OTHER bias), the deepest's at about half the positions of `blocks` (a random OTHER row,
    its bias at the median margin of the best token over it)."""
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:K]
    model = EarlyExitModel.convert(peaky_backbone("llama"), list(layers), arch="mlp", exit_vocab_ids=ids)
    blocks = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(seed)) if blocks is None else blocks
    first, last = model.head(layers[0]), model.head(layers[-1])
    first.other_bias.fill_(1e4)
    out = model(blocks, return_hidden=True)
    z = last.transform(out.exit_hidden[layers[-1]])
    last.other_weight.copy_(torch.randn(H, generator=torch.Generator().manual_seed(seed + 1)))
    margin = out.exit_logits[layers[-1]][..., :K].amax(-1) - z @ last.other_weight
    last.other_bias.fill_(float(margin[:, :-1].median()))
    return model, ids, blocks


@torch.no_grad()
def test_token_table_never_lets_a_token_leave_where_other_wins():
    model, ids, blocks = _restricted()
    conf, agree = token_table(model, blocks)
    out = model(blocks, final=True)
    final_top1 = out.final_logits[:, :-1].argmax(-1).reshape(-1)
    for j, k in enumerate(model.exit_layers):
        lg = out.exit_logits[k][:, :-1].reshape(-1, 41).double()
        cls = lg.argmax(-1)
        other = cls == 40
        token = torch.where(other, -1, ids[cls.clamp(max=39)])
        assert torch.equal(agree[j], token == final_top1)
        assert bool((conf[j][other] == OTHER_CONF).all())
        torch.testing.assert_close(conf[j][~other], lg.softmax(-1).amax(-1)[~other].float())
    assert bool((conf[0] == OTHER_CONF).all()) and not agree[0].any()  # exit 1: OTHER everywhere
    share_other = float((conf[1] == OTHER_CONF).float().mean())
    assert 0.2 < share_other < 0.8
    # even at threshold 0 no token leaves where OTHER wins: exit 1 takes none, exit 3 only its own tokens
    cost = cost_model(model, "max-prob", {**COSTS, "exits": {"1": COSTS["exits"]["1"], "3": COSTS["exits"]["3"]}})
    s = simulate(conf, agree, 0.0, cost)
    assert s["exit_share"][1] == 0.0 and s["exit_share"][3] == pytest.approx(1 - share_other)
    assert outcomes(conf, [0.0, 0.0]).tolist() == [2 if o else 1 for o in (conf[1] == OTHER_CONF).tolist()]


@torch.no_grad()
def test_exit_vocab_of_every_token_calibrates_as_unrestricted():
    """K = V (a permutation of every id, no OTHER) gives the unrestricted table and thresholds."""
    bb = peaky_backbone("llama")
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    full = EarlyExitModel.convert(bb, [1, 3], arch="mlp")
    same = EarlyExitModel.convert(bb, [1, 3], arch="mlp", exit_vocab_ids=perm)
    g = torch.Generator().manual_seed(5)
    calib, test = torch.randint(0, V, (4, 16), generator=g), torch.randint(0, V, (3, 16), generator=g)
    c1, a1 = token_table(full, calib)
    c2, a2 = token_table(same, calib)
    assert torch.equal(a1, a2) and (c2 >= 0).all()
    torch.testing.assert_close(c1, c2, atol=1e-6, rtol=1e-6)
    costs = {**COSTS, "exits": {"1": COSTS["exits"]["1"], "3": COSTS["exits"]["3"]}}
    r1 = calibrate(full, calib, test, 0.8, costs=costs, grid=tuple(np.round(np.linspace(0, 1, 21), 4)) + (NEVER,))
    r2 = calibrate(same, calib, test, 0.8, costs=costs, grid=tuple(np.round(np.linspace(0, 1, 21), 4)) + (NEVER,))
    assert r1["thresholds"] == r2["thresholds"] and r1["test"] == r2["test"] and r1["calib"] == r2["calib"]
    assert r2["cost_model"]["exit_vocab"] == V and r1["cost_model"]["exit_vocab"] is None


@pytest.mark.parametrize("confidence", ["max-prob", "gate"])
def test_cost_model_restricted_heads_and_kv_recomputation(confidence):
    """A token leaving at exit k pays k layers, the heads it asked (a restricted head with OTHER is
    asked in gate mode too: the engine computes its logits in the decision) and the recomputation
    of the L - k layers it skipped, never the LM head; leaving nowhere pays L, every head, the LM
    head. Against the brute-force rule."""
    model, _, _ = _restricted(layers=(1, 2, 3))
    costs = {**COSTS, "layer_x5_layers": 1.8}  # one token more in a layer's block: 0.2 layers
    cost = cost_model(model, confidence, costs)
    leave = [COSTS["exits"][str(k)]["layers"] for k in (1, 2, 3)]
    assert cost["leave"] == leave and cost["pass"] == leave  # with OTHER the head runs in a gate's decision too
    assert cost["recompute_per_layer"] == pytest.approx(0.2)
    assert cost["recompute"] == pytest.approx([3 * 0.2, 2 * 0.2, 1 * 0.2])
    assert cost["outcome"] == pytest.approx([1 + 0.5 + 0.6, 2 + 0.5 + 0.7 + 0.4, 3 + 1.2 + 0.5 + 0.2,
                                             L + 1.7 + 0.4])
    conf, agree = _random_table()
    for ts in ([0.5, 0.5, 0.5], [0.9, 0.25, 0.0], [NEVER, 0.55, 0.8]):
        where, agreement, mean_cost = _brute(conf, agree, ts, [1, 2, 3],
                                             [x + r for x, r in zip(leave, cost["recompute"])], leave, 0.4)
        s = simulate(conf, agree, ts, cost)
        assert s["agreement"] == pytest.approx(agreement) and s["mean_cost"] == pytest.approx(mean_cost)
    # K = V (no OTHER): a gate's passed head costs nothing again
    perm = EarlyExitModel.convert(peaky_backbone("llama"), [1, 2, 3], arch="mlp",
                                  exit_vocab_ids=torch.randperm(V, generator=torch.Generator().manual_seed(1)))
    c = cost_model(perm, confidence, COSTS)
    assert c["pass"] == ([0.0] * 3 if confidence == "gate" else leave) and c["recompute"] == [0.0] * 3


@torch.no_grad()
def test_restricted_early_exit_decode_is_the_simulated_rule():
    """The engine at given thresholds, one token after every prefix: it leaves where the simulated
    rule says (never where OTHER wins), with the restricted head's own mapped token."""
    blocks = torch.randint(0, V, (2, 14), generator=torch.Generator().manual_seed(9))
    model, ids, _ = _restricted(blocks=blocks)
    th = {1: 0.0, 3: 0.3}
    conf, agree = token_table(model, blocks)
    where = outcomes(conf, [th[1], th[3]])
    near = (conf - torch.tensor([[th[1]], [th[3]]])).abs().lt(1e-5).any(0)
    exit_of = [1, 3, L]
    out = model(blocks, final=True)
    n, checked, left = 0, 0, 0
    for b in range(blocks.shape[0]):
        for p in range(blocks.shape[1] - 1):
            ee = generate(model, [blocks[b, :p + 1].tolist()],
                          DecodeOptions(mode="early-exit", exit_thresholds=th, max_new_tokens=1))
            t = ee.rows[0].tokens[0]
            if not near[n]:
                assert t.exit_layer == exit_of[int(where[n])], (b, p)
                if t.exit_layer == 3:  # the head's own token, mapped to its id
                    assert ee.rows[0].ids[0] == int(ids[out.exit_logits[3][b, p, :40].argmax()])
                    left += 1
                checked += 1
            n += 1
    assert checked >= n - 2 and 0 < left < n


# --- calibrating on the model's own continuations ---------------------------------------------------
def _prompts_file(root, n=6, seed=2):
    r = np.random.default_rng(seed)
    path = root / f"prompts-{seed}.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(f"w{x}" for x in r.integers(1, 90, size=6 + i))}) + "\n"
                            for i in range(n)))
    return path


def test_continuation_table_counts_the_greedy_continuation_as_the_engine_decides_it(world):
    """Reference, one prefix at a time: the continuations are batch-1 greedy `full` decodes, so
    the final layer's top-1 at a counted position is the next continuation token; each exit's
    confidence and top-1 there are what early-exit decoding reports when the decision is forced
    to that exit (threshold 0 there, never before it)."""
    from eetune.measure.calibrate import continuation_parts, continuation_table

    out, text = world
    model = EarlyExitModel.from_pretrained(out)
    tok = load_tokenizer(model.backbone)
    calib, test, info = continuation_parts(model, tok, str(_prompts_file(out.parent)), 2, 1, 9, batch_size=2)
    assert len(calib) == 2 and len(test) == 1
    assert info["continuations"] and info["calib_tokens"] == sum(len(n) - 1 for _, n in calib)
    assert info["test_tokens"] == len(test[0][1]) - 1 and info["calib_digest"] != info["test_digest"]
    conf, agree = continuation_table(model, calib)
    assert conf.shape == agree.shape == (2, info["calib_tokens"])
    col, exits_hit = 0, set()
    for prompt, new in calib:
        alone = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=9, eos_token_ids=(V - 1,)))
        assert alone.rows[0].ids == new  # batched = batch 1 = greedy full
        for j in range(1, len(new)):
            for e, k in enumerate((1, 3)):
                forced = {1: 0.0 if k == 1 else NEVER, 3: 0.0}
                g = generate(model, [prompt + new[:j]], DecodeOptions(mode="early-exit", exit_thresholds=forced,
                                                                      max_new_tokens=1))
                t = g.rows[0].tokens[0]
                assert t.exit_layer == k
                assert conf[e, col].item() == pytest.approx(t.confidence, abs=1e-5)
                assert bool(agree[e, col]) == (t.token == new[j])
                exits_hit.add((k, bool(agree[e, col])))
            col += 1
    assert col == conf.shape[1] and len(exits_hit) >= 3  # agreeing and disagreeing exits both seen


def test_calibrate_on_continuations_stores_and_reports_them(world, capsys):
    out, _ = world
    prompts = _prompts_file(out.parent)
    capsys.readouterr()
    assert main(["calibrate", str(out), "--data", str(prompts), "--continue-tokens", "10", "--calib-blocks", "3",
                 "--test-blocks", "2", "--target-agreement", "0.8", "--json", "--no-store"]) == 0
    rec = json.loads(capsys.readouterr().out)
    d = rec["data"]
    assert d["continuations"] and d["max_new_tokens"] == 10 and not d["chat"] and d["source"] == str(prompts)
    assert d["calib_blocks"] == 3 and d["test_blocks"] == 2 and 0 < d["calib_tokens"] <= 3 * 9
    assert rec["calib"]["tokens"] == d["calib_tokens"] and rec["test"]["tokens"] == d["test_tokens"]
    assert rec["calib_agreement"] >= 0.8 and rec["thresholds"]["1"] in GRID
    assert main(["calibrate", str(out), "--data", str(prompts), "--continue-tokens", "10", "--calib-blocks", "3",
                 "--test-blocks", "2", "--target-agreement", "0.8", "--no-store"]) == 0
    assert "own greedy continuations (up to 10 tokens) of 3 calibration + 2 test prompts" in capsys.readouterr().out


def test_default_dev_prompts_are_requests_about_held_out_passages(world, monkeypatch, tmp_path):
    from eetune.measure.calibrate import continuation_prompts
    from eetune.model import defaults

    rows = [{"text": f"w{i} w{i + 1} w{i + 2}", "question": f"w{i + 3} w{i + 4}", "answer": True} for i in range(1, 6)]
    (tmp_path / "boolq_dev_passages.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(defaults, "default_data_file", lambda name: tmp_path / name)
    tok = load_tokenizer(EarlyExitModel.from_pretrained(world[0]).backbone)
    prompts = continuation_prompts(tok, "default-dev")
    words = [tok.decode(p).split() for p in prompts]
    assert len(prompts) == 5
    assert words[0][:3] == ["w1", "w2", "w3"] and "w5" in words[0]  # passage, then its question
    assert words[2] == ["w0", "w7", "w0"]  # the question alone, "W6 w7?" ("W6" and "?" are unknown: w0)
    assert words[3] == ["w4", "w5", "w6"]  # the passage's opening as plain text


@pytest.mark.parametrize("argv, match", [
    (["--continue-tokens", "1"], "--continue-tokens 1 must be an integer >= 2"),
    (["--continue-tokens", "-3"], "--continue-tokens -3 must be an integer >= 2"),
    (["--chat"], "--chat applies to the prompts of --continue-tokens"),
    (["--continue-tokens", "8", "--chat"], "no chat template"),
    (["--continue-tokens", "8", "--calib-blocks", "40"], "usable prompts, fewer than --calib-blocks 40"),
])
def test_calibrate_on_continuations_bad_input(world, capsys, argv, match):
    out, _ = world
    before = _snapshot(out)
    capsys.readouterr()
    code = main(["calibrate", str(out), "--data", str(_prompts_file(out.parent)), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err
    assert _snapshot(out) == before

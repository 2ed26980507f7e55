"""Evaluation: generation-quality metrics used by the decode benchmark, and the exit profile
(share of tokens exiting vs agreement per max-prob threshold, exit costs in layers) checked against
a slow reference, stored in exit_config.json, plotted, and driven by `eetune evaluate`."""

import functools
import math
import json
import sys

import numpy as np
import pytest
import torch
from conftest import V, peaky_backbone, save_peaky_model_dir, tiny_backbone

from eetune.cli import main
from eetune.model.config import CONFIG_NAME, ExitConfig
from eetune.errors import EETuneError
from eetune.measure.evaluate import (PROFILE_THRESHOLDS, exit_costs, exit_metrics, format_profile, json_safe, plot_profile,
                             profile_figure, rouge_l, store_profile, token_agreement)
from eetune.model.early_exit import EarlyExitModel, write_exits_dir


def test_rouge_l_known_values():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 words: P = R = 5/6
    assert rouge_l("The cat sat on the mat.", "the cat lay on the mat") == pytest.approx(5 / 6)
    # candidate of 2 words fully inside a 4-word reference: P = 1, R = 0.5, F = 2/3
    assert rouge_l("cat mat", "the cat on mat") == pytest.approx(2 / 3)
    assert rouge_l("identical words here", "Identical, words here!") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("x y", "a b") == 0.0


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 9, 3, 4], [1, 2, 3, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5
    assert token_agreement([], []) == 1.0


# --- the exit profile -----------------------------------------------------------------------

def _model(peaky: bool = True, layers=(1, 3)):
    bb = peaky_backbone("llama") if peaky else tiny_backbone("llama")
    return EarlyExitModel.convert(bb, layers, arch="mlp")


@functools.lru_cache(maxsize=None)
def _shared_model(peaky: bool = True):
    """One model per kind for the tests that only read it (its measured costs are cached on it)."""
    return _model(peaky)


def _blocks(n: int = 5, t: int = 12, seed: int = 0):
    return torch.randint(0, V, (n, t), generator=torch.Generator().manual_seed(seed))


def _reference_profile(model, blocks, thresholds):
    """The slow, obvious profile: full logits of one block at a time, then plain Python over
    every (exit, position) with a float64 softmax."""
    maxp = {k: [] for k in model.exit_layers}
    agree = {k: [] for k in model.exit_layers}
    for i in range(blocks.shape[0]):
        out = model(blocks[i:i + 1], final=True)
        final = out.final_logits[0].double().numpy()
        for k in model.exit_layers:
            lg = out.exit_logits[k][0].double().numpy()
            for pos in range(blocks.shape[1] - 1):  # the last position predicts nothing
                row = lg[pos]
                e = np.exp(row - row.max())
                maxp[k].append(float((e / e.sum()).max()))
                agree[k].append(int(np.argmax(row)) == int(np.argmax(final[pos])))
    ref = {}
    for k in model.exit_layers:
        n = len(maxp[k])
        share, agreement, count = [], [], []
        for t in thresholds:
            chosen = [a for p, a in zip(maxp[k], agree[k]) if p >= t]
            count.append(len(chosen))
            share.append(len(chosen) / n)
            agreement.append(sum(chosen) / len(chosen) if chosen else None)
        ref[str(k)] = {"share": share, "agreement": agreement, "count": count}
    # guard against float32-vs-float64 ties: no probability sits on a threshold
    assert all(abs(p - t) > 1e-5 for ps in maxp.values() for p in ps for t in thresholds)
    return ref, n


@torch.no_grad()
@pytest.mark.parametrize("thresholds", [PROFILE_THRESHOLDS, (0.97, 0.05, 0.5, 0.3)])
def test_exit_profile_matches_reference(thresholds):
    model, blocks = _model(), _blocks()
    m = exit_metrics(model, blocks, batch_size=2, progress=False, thresholds=thresholds)  # 2 does not divide 5
    prof = m["profile"]
    assert prof["thresholds"] == sorted(thresholds)
    ref, n = _reference_profile(model, blocks, prof["thresholds"])
    assert prof["tokens"] == m["tokens"] == n == 5 * 11
    assert set(prof["exits"]) == set(ref) == {"1", "3"}
    for k, r in ref.items():
        got = prof["exits"][k]
        assert got["count"] == r["count"]
        assert got["share"] == pytest.approx(r["share"])
        for a, b in zip(got["agreement"], r["agreement"]):
            assert (a is None and b is None) or a == pytest.approx(b)
    # the curve is non-trivial here: some tokens exit at a high threshold, not all at a low one
    assert any(0 < s < 1 for e in prof["exits"].values() for s in e["share"])
    if 0.9 in prof["thresholds"]:  # the metrics table's confident share is the same count
        i = prof["thresholds"].index(0.9)
        for k, e in m["exits"].items():
            assert e["confident_share"] == pytest.approx(prof["exits"][str(k)]["share"][i])


@torch.no_grad()
@pytest.mark.parametrize("peaky", [True, False])
def test_exit_profile_monotone_and_none_when_nobody_exits(peaky):
    m = exit_metrics(_model(peaky), _blocks(4, 16, seed=1), progress=False)
    prof = m["profile"]
    assert prof["thresholds"] == list(PROFILE_THRESHOLDS)
    for e in prof["exits"].values():
        assert all(a >= b for a, b in zip(e["share"], e["share"][1:]))  # share non-increasing in t
        assert all(a >= b for a, b in zip(e["count"], e["count"][1:]))
        assert all(0.0 <= s <= 1.0 for s in e["share"])
        for c, a in zip(e["count"], e["agreement"]):
            assert (a is None) == (c == 0) and (a is None or 0.0 <= a <= 1.0)
    if not peaky:  # a random, flat model: no token is 99% sure at any exit
        assert all(e["agreement"][-1] is None and e["share"][-1] == 0.0 for e in prof["exits"].values())


@pytest.mark.parametrize("bad", [[], [1.5], [-0.1, 0.5], ["x"]])
def test_exit_profile_bad_thresholds(bad):
    with pytest.raises(EETuneError, match="thresholds"):
        exit_metrics(_model(), _blocks(1, 4), progress=False, thresholds=bad)


def test_exit_costs_in_layers():
    model = _model()
    c = exit_costs(model)
    assert set(c["exits"]) == {"1", "3"} and c["num_layers"] == 4 and c["layer_s"] > 0
    assert c["device"] == "cpu" and c["dtype"] == "float32"
    for e in c["exits"].values():
        assert e["transform_layers"] > 0 and e["projection_layers"] >= 0 and e["layers"] > 0
    assert c["lm_head_layers"] >= 0
    assert exit_costs(model) == c  # measured once per model


def test_exit_costs_arithmetic_by_hand(monkeypatch):
    """Seconds from `measure_costs` (stubbed with round numbers) into layer-equivalents."""
    import eetune.decode.policy as policy
    timed = {"layer": 0.002, "final": 0.003, "num_layers": 4,
             "heads": {1: {"transform": 0.001, "projection": 0.003},
                       3: {"transform": 0.0005, "projection": float("nan")}}}
    monkeypatch.setattr(policy, "measure_costs", lambda model, opts: timed)
    c = exit_costs(_shared_model())
    assert c["layer_s"] == 0.002 and c["num_layers"] == 4
    assert c["lm_head_layers"] == pytest.approx(1.5)  # 3 ms / 2 ms
    assert c["exits"]["1"] == pytest.approx({"transform_layers": 0.5, "projection_layers": 1.5, "layers": 2.0})
    assert c["exits"]["3"] == {"transform_layers": pytest.approx(0.25), "projection_layers": None, "layers": None}
    timed["layer"] = 0.0  # no layer time: nothing can be expressed in layers
    c = exit_costs(_shared_model())
    assert c["lm_head_layers"] is None and c["exits"]["1"] == {"transform_layers": None, "projection_layers": None,
                                                                "layers": None}


def _profile(model):
    prof = exit_metrics(model, _blocks(), progress=False)["profile"]
    return {**prof, "costs": exit_costs(model), "measured_on": {"data": "x.txt", "seq_len": 12, "blocks": 5}}


def _no_nan(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in stored JSON")
    return json.loads(text, parse_constant=refuse)


@torch.no_grad()
def test_store_profile_round_trip_and_atomic(tmp_path):
    model = _shared_model()
    d = tmp_path / "exits"
    model.save_pretrained(d)
    heads = (d / "exit_heads.safetensors").read_bytes()
    prof = _profile(model)
    prof["costs"]["lm_head_layers"] = float("nan")  # stored as null
    assert ExitConfig.load(d).training is None
    assert store_profile(d, prof) == d / CONFIG_NAME
    stored = ExitConfig.load(d).training["exit_profile"]  # training created for it
    assert stored == json_safe(prof) and stored["costs"]["lm_head_layers"] is None
    assert stored["exits"]["3"]["share"] == prof["exits"]["3"]["share"]
    assert _no_nan((d / CONFIG_NAME).read_text())["training"] == {"exit_profile": stored}
    assert sorted(p.name for p in d.iterdir()) == [CONFIG_NAME, "exit_heads.safetensors"]  # no temporary left
    assert (d / "exit_heads.safetensors").read_bytes() == heads
    assert EarlyExitModel.from_pretrained(d, backbone=model.backbone).config.training["exit_profile"] == stored


def test_store_profile_keeps_training_summary(tmp_path):
    model = _shared_model()
    d = tmp_path / "exits"
    write_exits_dir(d, model.config.replace(training={"steps": 3, "data": {"source": "t.txt"}}),
                    model.heads.state_dict())
    (d / CONFIG_NAME).chmod(0o640)
    prof = _profile(model)
    store_profile(d, prof)
    store_profile(d, prof)  # again: replaced, not nested
    t = ExitConfig.load(d).training
    assert t["steps"] == 3 and t["data"] == {"source": "t.txt"} and t["exit_profile"] == json_safe(prof)
    assert (d / CONFIG_NAME).stat().st_mode & 0o777 == 0o640
    with pytest.raises(EETuneError, match="not an exits directory"):
        store_profile(tmp_path / "nothing", prof)


def test_format_profile_table():
    model = _shared_model(peaky=False)
    prof = _profile(model)
    text = format_profile(prof)
    lines = text.splitlines()
    assert "layer 1" in text and "layer 3" in text and "share" in text and "agree" in text
    for t in PROFILE_THRESHOLDS:
        assert any(line.split() and line.split()[0] == f"{t:g}" for line in lines), t
    row99 = next(line for line in lines if line.split()[0] == "0.99")
    assert row99.split()[1:] == ["0.0%", "-", "0.0%", "-"]  # nobody exits, agreement undefined
    assert "cost" in text and "layers" in text


def test_plot_profile_png_and_missing_matplotlib(tmp_path, monkeypatch):
    prof = _profile(_shared_model())
    assert plot_profile(prof, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert plot_profile(prof, tmp_path / "q.png") is False and not (tmp_path / "q.png").exists()


def test_plot_profile_labels_of_coinciding_points_do_not_overlap(tmp_path):
    """Two exits with the same curve: their threshold labels sit on the same points, stacked apart."""
    same = {"share": [0.9, 0.5, 0.2, 0.05], "agreement": [0.6, 0.8, 0.9, 0.99], "count": [18, 10, 4, 1]}
    prof = {"thresholds": [0.1, 0.5, 0.9, 0.99], "tokens": 20, "exits": {"1": same, "3": dict(same)}}
    fig = profile_figure(prof)
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    texts = fig.axes[0].texts
    assert sorted(t.get_text() for t in texts) == sorted(["0.1", "0.5", "0.9", "0.99"] * 2)
    boxes = [t.get_window_extent(r) for t in texts]
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
    assert plot_profile(prof, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size > 1000


# --- `eetune evaluate` with the profile --------------------------------------------------------
@pytest.fixture
def exits_dir(tmp_path):
    src = save_peaky_model_dir(tmp_path / "tiny")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(i * 7) % 96}" for i in range(400)))
    out = tmp_path / "exits"
    assert main(["convert", "--model", str(src), "--exits", "1,3", "--arch", "mlp", "--out", str(out)]) == 0
    return out, text


def _snapshot(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_cli_evaluate_profile_stored_plotted(exits_dir, capsys):
    out, text = exits_dir
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(text), "--seq-len", "16", "--max-blocks", "4", "--json"]) == 0
    cap = capsys.readouterr()
    m = json.loads(cap.out)
    assert set(m["exits"]) == {"1", "3"}  # the metrics as before, the profile beside them
    prof = m["profile"]
    assert prof["thresholds"] == list(PROFILE_THRESHOLDS) and prof["tokens"] == 4 * 15
    assert set(prof["costs"]["exits"]) == {"1", "3"} and prof["costs"]["lm_head_layers"] >= 0  # a difference of timings
    on = prof["measured_on"]
    assert on["seq_len"] == 16 and on["blocks"] == 4 and on["tokens"] == 60 and on["data"].endswith("eval.txt")
    assert (out / "exit_profile.png").read_bytes()[:4] == b"\x89PNG"
    assert "exit profile plot" in cap.err and "stored in" in cap.err
    cfg_text = (out / CONFIG_NAME).read_text()
    assert ExitConfig.load(out).training == {"exit_profile": prof}
    _no_nan(cfg_text)

    # --no-store: the exits directory is left byte for byte as it was (no PNG written into it)
    (out / "exit_profile.png").unlink()
    before = _snapshot(out)
    assert main(["evaluate", str(out), "--data", str(text), "--seq-len", "16", "--max-blocks", "2",
                 "--no-store"]) == 0
    printed = capsys.readouterr().out
    assert _snapshot(out) == before
    assert "exit profile on 30 held-out tokens" in printed and "cost" in printed
    assert "0.95" in printed and "stored" not in printed

    # --no-store --plot elsewhere; --no-plot writes no PNG but stores
    png = out.parent / "elsewhere.png"
    assert main(["evaluate", str(out), "--data", str(text), "--seq-len", "16", "--max-blocks", "2", "--no-store",
                 "--plot", str(png)]) == 0
    assert png.is_file() and _snapshot(out) == before
    assert main(["evaluate", str(out), "--data", str(text), "--seq-len", "8", "--max-blocks", "2", "--no-plot"]) == 0
    assert sorted(_snapshot(out)) == [CONFIG_NAME, "exit_heads.safetensors"]
    assert ExitConfig.load(out).training["exit_profile"]["measured_on"]["seq_len"] == 8


def test_cli_evaluate_without_matplotlib_and_bad_plot_path(exits_dir, capsys, monkeypatch):
    out, text = exits_dir
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(text), "--seq-len", "16", "--max-blocks", "2"]) == 0
    skipped = [line for line in capsys.readouterr().out.splitlines() if "plot skipped" in line]
    assert len(skipped) == 1 and "pip install 'eetune[bench]'" in skipped[0]
    assert not (out / "exit_profile.png").exists() and "exit_profile" in ExitConfig.load(out).training

    before = _snapshot(out)
    assert main(["evaluate", str(out), "--data", str(text), "--plot", str(out.parent / "no" / "p.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--no-plot" in err
    assert _snapshot(out) == before


# --- restricted-vocabulary exit heads (K tokens + OTHER) ---------------------------------------
from conftest import H  # noqa: E402

from eetune.measure.evaluate import format_metrics, profile_speedups, recompute_layers  # noqa: E402


@torch.no_grad()
def _restricted(K: int = 40, seed: int = 0):
    """Exits 1 and 3 restricted to K random token ids + OTHER, on 5 blocks: exit 1's OTHER wins
    everywhere (a huge OTHER bias); exit 3's at about half the positions (a random OTHER row, its
    bias at the median margin of the best token over it)."""
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:K]
    model = EarlyExitModel.convert(peaky_backbone("llama"), (1, 3), arch="mlp", exit_vocab_ids=ids)
    blocks = _blocks()
    h1, h3 = model.head(1), model.head(3)
    h1.other_bias.fill_(1e4)
    out = model(blocks, return_hidden=True)
    z = h3.transform(out.exit_hidden[3])
    h3.other_weight.copy_(torch.randn(H, generator=torch.Generator().manual_seed(seed + 1)))
    margin = out.exit_logits[3][..., :K].amax(-1) - z @ h3.other_weight
    h3.other_bias.fill_(float(margin[:, :-1].median()))
    return model, ids, blocks


def _reference_restricted(model, blocks, thresholds):
    """Slow and plain: per exit and position, a float64 softmax over the head's classes, the
    class mapped to its token id by hand (OTHER: none), CE with labels mapped to classes."""
    ref = {}
    for k in model.exit_layers:
        ids = model.head(k).vocab_ids.tolist()
        K = len(ids)
        conf, token, agree, ce = [], [], [], 0.0
        for i in range(blocks.shape[0]):
            out = model(blocks[i:i + 1], final=True)
            final = out.final_logits[0].double().numpy()
            lg = out.exit_logits[k][0].double().numpy()
            for pos in range(blocks.shape[1] - 1):
                e = np.exp(lg[pos] - lg[pos].max())
                p = e / e.sum()
                logp = lg[pos] - lg[pos].max() - math.log(e.sum())
                c = int(np.argmax(p))
                tok = ids[c] if c < K else None
                conf.append(float(p.max()))
                token.append(tok)
                agree.append(tok is not None and tok == int(np.argmax(final[pos])))
                label = int(blocks[i, pos + 1])
                ce -= logp[ids.index(label)] if label in ids else logp[K]
        n = len(conf)
        count = [sum(1 for c, t in zip(conf, token) if t is not None and c >= th) for th in thresholds]
        ok = [sum(1 for c, t, a in zip(conf, token, agree) if t is not None and c >= th and a) for th in thresholds]
        naive = [sum(1 for c in conf if c >= th) for th in thresholds]  # what ignoring OTHER would count
        ref[str(k)] = {"count": count, "ok": ok, "agreement": sum(agree) / n, "ce": ce / n, "naive": naive,
                       "other_share": sum(t is None for t in token) / n}
        assert all(abs(c - th) > 1e-5 for c in conf for th in thresholds)  # no float ties on a threshold
    return ref


@torch.no_grad()
def test_restricted_exit_profile_matches_reference_and_other_never_exits():
    model, ids, blocks = _restricted()
    ts = (0.05, 0.2, 0.5, 0.9)
    m = exit_metrics(model, blocks, batch_size=2, progress=False, thresholds=ts)
    ref = _reference_restricted(model, blocks, ts)
    for k, r in ref.items():
        e, p = m["exits"][int(k)], m["profile"]["exits"][k]
        assert p["count"] == r["count"]
        assert [a for a in p["agreement"]] == [(g / c if c else None) for g, c in zip(r["ok"], r["count"])]
        assert e["agreement"] == pytest.approx(r["agreement"]) and e["ce"] == pytest.approx(r["ce"], rel=1e-5)
        assert e["other_share"] == pytest.approx(r["other_share"]) == p["other_share"]
        assert e["ce_over"] == "40 tokens + OTHER"
    # exit 1: OTHER wins everywhere: no agreement, nobody exits, at any threshold
    assert ref["1"]["other_share"] == 1.0 and m["exits"][1]["agreement"] == 0.0
    assert m["profile"]["exits"]["1"]["count"] == [0] * len(ts)
    assert all(a is None for a in m["profile"]["exits"]["1"]["agreement"])
    assert m["exits"][1]["confident_share"] == 0.0
    # exit 3: OTHER wins at some positions, and counting them would change the profile
    assert 0.2 < ref["3"]["other_share"] < 0.8
    assert ref["3"]["naive"][0] > ref["3"]["count"][0] > 0
    assert m["exit_vocab"] == m["profile"]["exit_vocab"] == 40
    text = format_metrics(m)
    assert "40 tokens + OTHER" in text and "layer 1 100.0%" in text
    assert "not OTHER" in format_profile({**m["profile"]})


@torch.no_grad()
def test_exit_vocab_of_every_token_is_the_unrestricted_profile():
    """K = V (a permutation of every id, no OTHER) gives what the unrestricted heads give."""
    bb = peaky_backbone("llama")
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    full = EarlyExitModel.convert(bb, (1, 3), arch="mlp")
    same = EarlyExitModel.convert(bb, (1, 3), arch="mlp", exit_vocab_ids=perm)
    assert not same.head(1).has_other and same.head(1).num_classes == V
    blocks = _blocks(4, 16, seed=2)
    a = exit_metrics(full, blocks, progress=False)
    b = exit_metrics(same, blocks, progress=False)
    for k in (1, 3):
        assert b["exits"][k]["agreement"] == a["exits"][k]["agreement"]
        assert b["exits"][k]["ce"] == pytest.approx(a["exits"][k]["ce"], rel=1e-6)
        assert b["exits"][k]["other_share"] == 0.0 and a["exits"][k]["ce_over"] == "vocabulary"
        pa, pb = a["profile"]["exits"][str(k)], b["profile"]["exits"][str(k)]
        assert pa["count"] == pb["count"] and pa["agreement"] == pb["agreement"]
    assert any(0 < s < 1 for e in a["profile"]["exits"].values() for s in e["share"])  # a non-trivial profile


def test_profile_speedups_by_hand(monkeypatch):
    """One exit alone: a token leaving at exit k pays k layers + the head + the KV recomputation
    of the L - k layers it skipped, never the LM head; the others pay L + head + LM head."""
    import eetune.decode.policy as policy
    timed = {"layer": 0.002, "layer_x5": 0.0036, "final": 0.004, "num_layers": 4,
             "heads": {1: {"transform": 0.001, "projection": 0.0002}, 3: {"transform": 0.001, "projection": 0.0002}}}
    monkeypatch.setattr(policy, "measure_costs", lambda model, opts: timed)
    model, _, _ = _restricted()
    costs = exit_costs(model)
    assert costs["exit_vocab"] == 40 and costs["vocab_size"] == V
    assert costs["layer_x5_layers"] == pytest.approx(1.8) and recompute_layers(costs) == pytest.approx(0.2)
    assert costs["exits"]["1"]["projection_layers"] == pytest.approx(0.1)  # the head's own projection, as timed
    prof = {"thresholds": [0.5, 0.9], "tokens": 10, "costs": costs,
            "exits": {"1": {"share": [0.5, 0.0], "agreement": [1.0, None], "count": [5, 0]},
                      "3": {"share": [1.0, 0.2], "agreement": [1.0, 1.0], "count": [10, 2]}}}
    sp = profile_speedups(prof)
    full, head, lm = 4 + 2.0, 0.6, 2.0
    assert sp["1"][0] == pytest.approx(full / (0.5 * (1 + head + 3 * 0.2) + 0.5 * (4 + head + lm)))
    assert sp["1"][1] == pytest.approx(full / (4 + head + lm))  # nobody leaves: slower than full
    assert sp["3"][0] == pytest.approx(full / (3 + head + 0.2))
    assert sp["3"][1] == pytest.approx(full / (0.2 * (3 + head + 0.2) + 0.8 * (4 + head + lm)))
    text = format_profile(prof)
    assert "predicted speedup" in text and f"{sp['3'][0]:.2f}x" in text and "40 tokens + OTHER" in text
    assert profile_speedups({**prof, "costs": None}) is None

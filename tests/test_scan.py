"""The exit-placement scan (`eetune scan`): batched all-layer measurement against a slow per-layer
reference, the last layer's norm head is the model, the loss gradient, the speedup simulator
against a plain loop, and the CLI end to end and on bad input."""

import json
import math

import pytest
import torch
from conftest import FAMILIES, L, V, save_peaky_model_dir, tiny_backbone

from eetune.measure import scan as S
from eetune.cli import main
from eetune.errors import EETuneError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is fastest, and immune to other jobs on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _random_heads(bb, seed=1):
    """Norm heads with perturbed weights (and biases) below the last layer, so that every layer's
    head differs; the last layer's stays the final norm (as in a scan)."""
    heads = S.NormHeads(bb)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.norms[:-1].parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return heads


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_batched_scan_equals_per_layer_reference(family):
    bb = tiny_backbone(family)
    blocks = torch.randint(0, V, (5, 12), generator=torch.Generator().manual_seed(0))
    col = S.collect_hidden(bb, blocks, batch_size=2, hidden_dtype=torch.float32)
    heads = _random_heads(bb)
    idx = torch.arange(col["targets"].numel())
    conf, agree = S.measure_heads(bb, heads, col, idx, batch=7, max_elements=3 * 7 * V)  # several layer groups

    # slow, obvious reference: the HF forward block by block, every layer's head token by token, in float64
    ref_conf, ref_agree, n = torch.zeros(L, idx.numel()), torch.zeros(L, idx.numel(), dtype=torch.bool), 0
    with torch.no_grad():
        for row in blocks:
            out = bb.model(row[None], output_hidden_states=True)
            final_top1 = out.logits[0].argmax(-1)
            for t in range(blocks.shape[1] - 1):
                for k in range(1, L + 1):
                    if k < L:
                        h = out.hidden_states[k][0, t]  # after layer k (HF's last entry is already normed)
                        logits = bb.logits(heads.norms[k - 1](h)).double()
                    else:
                        logits = out.logits[0, t].double()
                    probs = logits.softmax(-1)
                    ref_conf[k - 1, n] = probs.max()
                    ref_agree[k - 1, n] = bool(probs.argmax() == final_top1[t])
                n += 1
    assert torch.equal(col["targets"], blocks[:, 1:].reshape(-1))
    torch.testing.assert_close(conf, ref_conf, atol=1e-4, rtol=1e-4)
    assert (agree == ref_agree).float().mean() >= 0.99  # argmax near-ties may flip in float32
    table = S.layer_table(conf, agree, [0.5, 0.9])
    ref_table = S.layer_table(ref_conf, ref_agree, [0.5, 0.9])
    for a, b in zip(table, ref_table):
        assert a["agreement"] == pytest.approx(b["agreement"], abs=0.02)
        for ca, cb in zip(a["confident"], b["confident"]):
            assert ca["share"] == pytest.approx(cb["share"], abs=0.02)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16])
def test_last_layer_norm_head_is_the_final_layer(family, hidden_dtype):
    bb = tiny_backbone(family)
    blocks = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(2))
    col = S.collect_hidden(bb, blocks, batch_size=2, hidden_dtype=hidden_dtype)
    conf, agree = S.measure_heads(bb, S.NormHeads(bb), col, torch.arange(col["targets"].numel()))
    assert bool(agree[L - 1].all())  # agreement 1.0 before any training
    with torch.no_grad():
        final = torch.stack([bb.model(b[None]).logits[0, :-1] for b in blocks]).reshape(-1, V)
    torch.testing.assert_close(conf[L - 1], final.softmax(-1).amax(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_loss_and_grad_matches_autograd(kind):
    g = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(4, 6, 50, generator=g)).requires_grad_(True)
    t_logits = 3 * torch.randn(6, 50, generator=g)
    targets = torch.randint(0, 50, (6,), generator=g)
    logq = z.log_softmax(-1)
    if kind == "kl":
        logp = t_logits.log_softmax(-1)
        per = (logp.exp() * (logp - logq)).sum(-1).mean(-1)
        loss, grad = S.loss_and_grad(z.detach().clone(), logp.exp(), (logp.exp() * logp).sum(-1))
    else:
        per = -logq.gather(-1, targets[None, :, None].expand(4, 6, 1)).squeeze(-1).mean(-1)
        loss, grad = S.loss_and_grad(z.detach().clone(), targets=targets)
    per.sum().backward()
    torch.testing.assert_close(loss, per.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, z.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_fitting_lowers_the_loss_and_leaves_the_last_layer(loss):
    bb = tiny_backbone("llama")
    blocks = torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(4))
    col = S.collect_hidden(bb, blocks, hidden_dtype=torch.float32)
    heads = S.NormHeads(bb)
    last = heads.norms[L - 1].weight.detach().clone()
    idx = torch.arange(col["targets"].numel())
    first = S.fit_norm_heads(bb, heads, col, idx, list(range(1, L)), loss, epochs=1, lr=1e-2, batch=16)
    later = S.fit_norm_heads(bb, heads, col, idx, list(range(1, L)), loss, epochs=3, lr=1e-2, batch=16)
    assert sum(later["loss"].values()) < sum(first["loss"].values())
    assert torch.equal(heads.norms[L - 1].weight, last)


def _loop_simulate(conf, agree, exits, t, head_cost, lm_cost):
    """Plain Python reference of `simulate` for one exit set."""
    L, n = conf.shape
    total_cost, same, early, heads = 0.0, 0, 0, 0
    for i in range(n):
        for j, k in enumerate(exits):
            if conf[k - 1, i] >= t:
                total_cost += k + (j + 1) * head_cost
                heads += j + 1
                same += int(agree[k - 1, i])
                early += 1
                break
        else:
            total_cost += L + len(exits) * head_cost + lm_cost
            heads += len(exits)
            same += 1
    mean = total_cost / n
    # break-even: the head cost c at which mean cost (linear in c) equals full depth
    break_even = (L + lm_cost - (mean - heads / n * head_cost)) / (heads / n)
    return (L + lm_cost) / mean, same / n, early / n, mean, heads / n, break_even


def test_simulator_equals_python_loop():
    g = torch.Generator().manual_seed(5)
    layers, n = 9, 40
    conf = torch.rand(layers, n, generator=g) ** 0.5
    agree = torch.rand(layers, n, generator=g) < 0.7
    for size in (1, 2, 3):
        sets = S.candidate_sets(layers, size)
        for t, hc, lm in ((0.9, 2.5, 3.0), (0.5, 0.0, 0.7)):
            r = S.simulate(conf, agree, sets, t, hc, lm, chunk_elements=size * n * 11)  # several chunks
            for i, exits in enumerate(sets.tolist()):
                sp, ag, ex, mc, hp, be = _loop_simulate(conf, agree, exits, t, hc, lm)
                assert r["speedup"][i].item() == pytest.approx(sp, rel=1e-12)
                assert r["agreement"][i].item() == pytest.approx(ag, rel=1e-12)
                assert r["exit_share"][i].item() == pytest.approx(ex, rel=1e-12)
                assert r["mean_cost"][i].item() == pytest.approx(mc, rel=1e-12)
                assert r["heads_per_token"][i].item() == pytest.approx(hp, rel=1e-12)
                assert r["break_even_head_cost"][i].item() == pytest.approx(be, rel=1e-9, abs=1e-12)
                # at the break-even head cost the set is exactly as fast as full depth
                at = S.simulate(conf, agree, sets[i:i + 1], t, be, lm)
                assert at["speedup"].item() == pytest.approx(1.0, rel=1e-9)


def test_rank_sets_filters_by_agreement_and_sorts_by_speedup():
    g = torch.Generator().manual_seed(6)
    conf = torch.rand(8, 60, generator=g)
    agree = torch.rand(8, 60, generator=g) < torch.linspace(0.3, 1.0, 8)[:, None]
    r = S.rank_sets(conf, agree, 8, 0.7, 0.8, 1.0, 1.0, max_exits=3, top=5)
    assert r["sets_simulated"] == {1: 7, 2: math.comb(7, 2), 3: math.comb(7, 3)}
    assert r["target_met"] and all(b["agreement"] >= 0.8 for b in r["best"])
    speeds = [b["speedup"] for b in r["best"]]
    assert speeds == sorted(speeds, reverse=True)
    best_be = max(b["break_even_head_cost"] for b in r["best"])
    assert r["most_promising"]["break_even_head_cost"] >= best_be
    none = S.rank_sets(conf, agree, 8, 0.7, 1.01, 1.0, 1.0, max_exits=2)
    assert not none["target_met"] and none["best"] and none["most_promising"] is None  # the most faithful instead
    ags = [b["agreement"] for b in none["best"]]
    assert ags == sorted(ags, reverse=True)


# --- the CLI -------------------------------------------------------------------------------
@pytest.fixture
def scan_model(tmp_path, monkeypatch):
    """A tiny Llama directory with a peaked LM head (confident tokens exist) and a word tokenizer,
    and a JSONL file of 30 random 40-word documents."""
    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "cache"))
    model_dir = save_peaky_model_dir(tmp_path / "tiny-llama")
    data = tmp_path / "text.jsonl"
    g = torch.Generator().manual_seed(7)
    with open(data, "w") as f:
        for _ in range(30):
            words = torch.randint(0, V - 1, (40,), generator=g).tolist()
            f.write(json.dumps({"text": " ".join(f"w{i}" for i in words)}) + "\n")
    return model_dir, data


def test_cli_scan_end_to_end(scan_model, tmp_path, capsys):
    model, data = scan_model
    out, png = tmp_path / "scan.json", tmp_path / "scan.png"
    assert main(["scan", str(model), "--data", str(data), "--tokens", "640", "--seq-len", "32", "--epochs", "1",
                 "--loss", "ce", "--json", str(out), "--plot", str(png), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "KV recomputation counted: " in text and "\nsuggested: " in text
    r = json.loads(out.read_text())
    assert r["heads"]["loss"] == "ce" and r["num_layers"] == L and len(r["layers"]) == L
    assert r["layers"][-1]["agreement"] == 1.0
    assert r["tokens"] == {"fit": 5 * 31, "held_out": 15 * 31}
    assert r["costs"]["measured"] and r["costs"]["head_layers"] > 0 and 0 <= r["costs"]["recompute_per_layer"] <= 1
    assert r["exit_vocab"] is None and r["heads"]["exit_vocab"] is None
    assert r["ranking"]["sets_simulated"] == {"1": 3, "2": 3, "3": 1}
    assert r["suggested"] is None or f"suggested: {r['suggested']['command']}" in text  # pays off? timing-dependent
    assert [e["threshold"] for e in r["ranking"]["by_threshold"]] == [0.5, 0.8, 0.9]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".scan*"))  # no temporary files left behind


def test_cli_scan_given_head_cost_no_plot(scan_model, tmp_path, capsys, monkeypatch):
    model, data = scan_model
    monkeypatch.chdir(tmp_path)
    assert main(["scan", str(model), "--data", str(data), "--tokens", "640", "--seq-len", "32",
                 "--head-cost", "0.25", "--max-exits", "2", "--threshold", "0.5", "--target-agreement", "0.5",
                 "--no-plot", "--no-progress", "--json", "r.json"]) == 0
    text = capsys.readouterr().out
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["costs"] == {"head_layers": 0.25, "lm_head_layers": 0.25, "measured": False}
    assert r["heads"]["loss"] == "kl" and "3" not in r["ranking"]["sets_simulated"]
    best = r["ranking"]["best"][0]
    assert best["speedup"] > 1 and best["agreement"] >= 0.5
    exits = ",".join(map(str, best["exits"]))
    command = f"eetune convert --model {model} --exits {exits} --arch norm --out exits-{exits.replace(',', '-')}"
    assert r["suggested"]["command"] == command and r["suggested"]["pays_off"]
    assert f"suggested: {command}" in text.splitlines()
    assert not (tmp_path / "scan.png").exists()


def test_cli_scan_without_matplotlib_skips_the_plot(scan_model, tmp_path, capsys, monkeypatch):
    import sys
    model, data = scan_model
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    png = tmp_path / "p.png"
    assert main(["scan", str(model), "--data", str(data), "--tokens", "256", "--seq-len", "32", "--epochs", "0",
                 "--head-cost", "1", "--plot", str(png), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("plot skipped: matplotlib is not installed") for line in lines) == 1
    assert not png.exists()


def _bad(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:") and match in err, err


@pytest.mark.parametrize("extra,match", [
    (["--tokens", "0"], "--tokens 0"),
    (["--tokens", "-5"], "--tokens -5"),
    (["--tokens", "40"], "less than two blocks"),
    (["--seq-len", "1"], "--seq-len 1"),
    (["--threshold", "1.5"], "threshold 1.5"),
    (["--thresholds", "0.5,x"], "--thresholds"),
    (["--holdout", "1"], "--holdout 1"),
    (["--head-cost", "-1"], "--head-cost -1"),
    (["--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["--tokens", "100000", "--seq-len", "2000"], "fewer than two blocks"),  # data too small
    (["--device", "nonsense"], "not a torch device"),
])
def test_cli_scan_bad_input(scan_model, tmp_path, capsys, extra, match):
    model, data = scan_model
    _bad(["scan", str(model), "--data", str(data), "--seq-len", "32", "--no-plot", "--no-progress", *extra],
         capsys, match)


def test_cli_scan_bad_model_and_data(scan_model, tmp_path, capsys):
    model, data = scan_model
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    _bad(["scan", str(bert), "--no-plot"], capsys, "unsupported architecture")
    _bad(["scan", str(tmp_path / "missing"), "--no-plot"], capsys, "model path not found")
    _bad(["scan", str(model), "--data", str(tmp_path / "none.jsonl"), "--no-plot"], capsys, "data not found")


# --- restricted-vocabulary heads (`--exit-vocab K`: K tokens + OTHER) ---------------------------------
def test_fold_teacher_sums_to_one_and_other_is_the_outside_mass():
    bb = tiny_backbone("llama")
    ids = torch.tensor([5, 0, 17])
    heads = S.NormHeads(bb, ids)
    probs = torch.softmax(torch.randn(4, V, generator=torch.Generator().manual_seed(0)), -1).double()
    f = S.fold_teacher(probs, heads)
    assert f.shape == (4, 4)
    torch.testing.assert_close(f[:, :3], probs[:, [5, 0, 17]])
    outside = [i for i in range(V) if i not in (5, 0, 17)]
    torch.testing.assert_close(f[:, 3], probs[:, outside].sum(-1))
    torch.testing.assert_close(f.sum(-1), torch.ones(4, dtype=torch.float64))
    perm = S.NormHeads(bb, torch.randperm(V))  # K = V: no OTHER, a permutation
    assert not perm.has_other and perm.num_classes == V
    torch.testing.assert_close(S.fold_teacher(probs, perm), probs[:, perm.vocab_ids])


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_restricted_measure_equals_per_token_reference(family):
    """K-heads (K rows of the LM head + a learned OTHER row per layer), token by token in float64:
    confidence over the K + 1 classes, the class's token id, and where OTHER wins no exit."""
    bb = tiny_backbone(family)
    blocks = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    col = S.collect_hidden(bb, blocks, batch_size=2, hidden_dtype=torch.float32)
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(1))[:30]
    heads = S.NormHeads(bb, ids)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        heads.other_weight.copy_(torch.randn(heads.other_weight.shape, generator=g))
        heads.other_bias.fill_(1.0)
    idx = torch.arange(col["targets"].numel())
    conf, agree = S.measure_heads(bb, heads, col, idx, batch=7, max_elements=2 * 7 * 31)  # several layer groups
    assert conf.shape == (L, idx.numel())
    cap = bb.logit_softcap
    others = 0
    with torch.no_grad():
        for n in range(idx.numel()):
            for k in range(1, L):
                z = heads.norms[k - 1](col["hidden"][k - 1, n]).double()
                lg = torch.cat([z @ bb.lm_head.weight[ids].double().T,
                                (z @ heads.other_weight[k - 1].double() + heads.other_bias[k - 1].double())[None]])
                if cap is not None:
                    lg = torch.tanh(lg / cap) * cap
                p = lg.softmax(-1)
                c = int(p.argmax())
                if c == 30:
                    others += 1
                    assert conf[k - 1, n] == S.OTHER_CONF and not agree[k - 1, n]
                else:
                    assert conf[k - 1, n].item() == pytest.approx(p.max().item(), abs=1e-5)
                    assert bool(agree[k - 1, n]) == (int(ids[c]) == int(col["final_top1"][n]))
    assert 0 < others < (L - 1) * idx.numel()  # OTHER wins somewhere, not everywhere
    assert bool(agree[L - 1].all()) and (conf[L - 1] > 0).all()  # the last row is the model itself
    table = S.layer_table(conf, agree, [0.01])
    assert all(r["confident"][0]["count"] == int((conf[r["layer"] - 1] >= 0.01).sum()) for r in table)
    assert sum(r.get("other_share", 0.0) for r in table) * idx.numel() == pytest.approx(others)


def test_exit_vocab_of_every_token_scans_as_unrestricted():
    """K = V (a permutation of every id): the same fit, confidences and agreement."""
    bb = tiny_backbone("llama")
    blocks = torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(4))
    col = S.collect_hidden(bb, blocks, hidden_dtype=torch.float32)
    idx = torch.arange(col["targets"].numel())
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    out = []
    for vocab in (None, perm):
        heads = S.NormHeads(bb, vocab)
        fit = S.fit_norm_heads(bb, heads, col, idx, list(range(1, L)), "kl", epochs=1, lr=1e-2, batch=16)
        out.append((fit, *S.measure_heads(bb, heads, col, idx)))
    (f1, c1, a1), (f2, c2, a2) = out
    assert f1["loss"] == pytest.approx(f2["loss"], rel=1e-5)
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=1e-5)
    assert (a1 == a2).float().mean() >= 0.99


@pytest.mark.parametrize("loss", ["kl", "ce"])
def test_restricted_fitting_lowers_the_loss_and_learns_other(loss):
    bb = tiny_backbone("llama")
    blocks = torch.randint(0, V, (6, 16), generator=torch.Generator().manual_seed(4))
    col = S.collect_hidden(bb, blocks, hidden_dtype=torch.float32)
    from eetune.train.tune import rank_vocabulary
    heads = S.NormHeads(bb, rank_vocabulary(blocks, V)[:20])
    idx = torch.arange(col["targets"].numel())
    first = S.fit_norm_heads(bb, heads, col, idx, list(range(1, L)), loss, epochs=1, lr=1e-2, batch=16)
    later = S.fit_norm_heads(bb, heads, col, idx, list(range(1, L)), loss, epochs=3, lr=1e-2, batch=16)
    assert sum(later["loss"].values()) < sum(first["loss"].values())
    assert bool((heads.other_weight[:L - 1].abs().sum(-1) > 0).all()) and heads.other_bias[:L - 1].ne(0).all()
    assert not heads.other_weight[L - 1].any()  # the last layer's head is the model: not trained


def test_simulator_counts_kv_recomputation():
    """Leaving at layer k also costs (L - k) * recompute: against the plain loop plus that term."""
    g = torch.Generator().manual_seed(8)
    layers, n = 7, 30
    conf = torch.rand(layers, n, generator=g) ** 0.5
    agree = torch.rand(layers, n, generator=g) < 0.7
    sets = S.candidate_sets(layers, 2)
    r = S.simulate(conf, agree, sets, 0.6, 0.4, 1.5, recompute=0.25)
    for i, exits in enumerate(sets.tolist()):
        total = 0.0
        for t in range(n):
            for j, k in enumerate(exits):
                if conf[k - 1, t] >= 0.6:
                    total += k + (j + 1) * 0.4 + (layers - k) * 0.25
                    break
            else:
                total += layers + 2 * 0.4 + 1.5
        assert r["mean_cost"][i].item() == pytest.approx(total / n, rel=1e-12)
        at = S.simulate(conf, agree, sets[i:i + 1], 0.6, r["break_even_head_cost"][i].item(), 1.5, recompute=0.25)
        assert at["speedup"].item() == pytest.approx(1.0, rel=1e-9)


def test_run_scan_with_exit_vocab(monkeypatch):
    """`ScanConfig(exit_vocab=K)`: heads of the K most frequent fitting tokens + OTHER, their own
    measured cost, the suggestion carries --exit-vocab K; bad K in one line."""
    bb = tiny_backbone("llama")
    with torch.no_grad():
        bb.lm_head.weight.mul_(6.0)
    g = torch.Generator().manual_seed(3)
    fit, held = torch.randint(0, 40, (4, 32), generator=g), torch.randint(0, 40, (8, 32), generator=g)
    seen = {}
    real = S.measured_costs

    def spy(bb_, vocab_ids=None):
        seen["ids"] = vocab_ids
        return real(bb_, vocab_ids)

    monkeypatch.setattr(S, "measured_costs", spy)
    cfg = S.ScanConfig(data="given", epochs=1, threshold=0.5, target_agreement=0.0, exit_vocab="16", progress=False)
    r = S.run_scan(bb, None, cfg, fit, held)
    from eetune.train.tune import rank_vocabulary
    assert torch.equal(seen["ids"], rank_vocabulary(fit, V)[:16])
    assert r["exit_vocab"]["k"] == 16 and r["heads"]["exit_vocab"] == 16 and r["costs"]["exit_vocab"] == 16
    assert 0 < r["exit_vocab"]["coverage"] <= 1 and r["costs"]["measured"] and r["exit_vocab"]["seen"] == 16
    assert any("other_share" in row for row in r["layers"][:-1])
    s = S.suggestion(r, "m")
    assert s is not None and "--exit-vocab 16 " in s["command"]
    text = S.format_report(r, model_arg="m")
    assert "16 most frequent tokens" in text and "one exit head (16 tokens + OTHER)" in text
    many = S.run_scan(bb, None, S.ScanConfig(data="given", epochs=0, head_cost=1.0, exit_vocab=60, progress=False),
                      fit, held)  # more tokens than the fitting blocks hold (ids 0..39)
    assert many["exit_vocab"]["seen"] == len(set(fit.reshape(-1).tolist())) < 60
    assert "unseen ids" in S.format_report(many, model_arg="m")
    for bad, match in (("0", "at least 1"), ("x", "not a number")):
        with pytest.raises(EETuneError, match=match):
            S.ScanConfig(exit_vocab=bad).validate()
    with pytest.raises(EETuneError, match="larger than the model's vocabulary"):
        S.run_scan(bb, None, S.ScanConfig(data="given", epochs=0, head_cost=1.0, exit_vocab=V + 1, progress=False),
                   fit, held)

"""Gates (eetune.train.gates): the logistic fit, gates that learn on a tiny model built so that they
can, the held-out report against a manual count, save/load of gates and the ranked vocabulary,
and `eetune tune --gates / --gates-only`, `info`, `evaluate` on tiny random models."""

import json

import pytest
import torch

from conftest import peaky_backbone
from eetune.model.backbone import load_backbone, load_tokenizer
from eetune.cli import main
from eetune.train.data import train_val_blocks
from eetune.model.gates import ExitGate
from eetune.train.gates import fit_logistic, gate_report, train_gates
from eetune.model.early_exit import EarlyExitModel

from tune_helpers import make_world, one_thread  # noqa: F401 (autouse fixture)
from tune_helpers import head_tensors as heads_only

TUNE = ["--seq-len", "32", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("gates"))




def ranked_by_hand(world, seq_len=32, val_blocks=8):
    """The vocabulary ranked by a manual bincount of the training blocks tune uses."""
    tok = load_tokenizer(load_backbone(str(world["model"])))
    train, _, _ = train_val_blocks(str(world["docs"]), tok, seq_len, val_blocks)
    counts = torch.bincount(train.flatten(), minlength=97).tolist()
    return sorted(range(97), key=lambda i: (-counts[i], i)), counts


# --- the fit --------------------------------------------------------------------------------
def test_fit_logistic_recovers_a_separating_direction():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=g) * torch.linspace(0.1, 30, 16)  # badly scaled columns
    u = torch.randn(16, generator=g)
    y = (x @ u / x.std(0).mean() + 0.3 > 0).long()
    w, b, ce, iters = fit_logistic(x, y)
    assert 0 < iters <= 300 and ce < 0.25  # the mild L2 keeps separable data from a zero loss
    # the folded weights act on the raw features: x @ w + b is the logit
    assert ((torch.sigmoid(x @ w + b) >= 0.5).long() == y).float().mean() > 0.98
    # no signal in the features: the fit stays at the base rate
    w0, b0, _, _ = fit_logistic(torch.randn(2000, 16, generator=g), y)
    assert torch.sigmoid(b0).item() == pytest.approx(y.float().mean().item(), abs=0.05)


# --- gates learn ----------------------------------------------------------------------------
def context_free_model(seed: int = 0):
    """A tiny peaked Llama with attention switched off (o_proj = 0): the hidden state of a
    position is a function of its token alone, so whether exit 3 agrees with the final layer is
    a function of the token too, and on 24 tokens in 32 dimensions any such labelling is
    linearly separable. A gate that learns from the right features and labels reaches
    precision 1; one fit to misaligned labels (another position's) or not fit at all does not."""
    bb = peaky_backbone("llama", seed=seed)
    with torch.no_grad():
        for layer in bb.layers:
            layer.self_attn.o_proj.weight.zero_()
    model = EarlyExitModel.convert(bb, (1, 3), arch="norm")
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randperm(97, generator=g)[:24]
    train = tokens[torch.randint(0, 24, (32, 32), generator=g)]
    val = tokens[torch.randint(0, 24, (16, 32), generator=g)]
    return model, train, val


@pytest.mark.parametrize("seed", [0, 3])
def test_gates_learn_when_the_exit_is_predictably_right(seed):
    model, train, val = context_free_model(seed)
    s = train_gates(model, train, val, progress=False)
    assert model.has_gates and set(s["fit"]) == {"1", "3"}
    assert s["tokens"] == 32 * 31 and s["blocks"] == 32 and s["seconds"] > 0
    r = s["report"]
    assert r["tokens"] == 16 * 31
    e = r["exits"]["3"]
    i = r["thresholds"].index(0.9)
    base = e["agreement"]
    assert 0.15 < base < 0.85  # neither label is trivial
    assert e["gate"]["coverage"][i] >= 0.1
    assert e["gate"]["precision"][i] >= 0.95 > base + 0.1


def test_gate_report_matches_a_manual_count():
    model, train, val = context_free_model(0)
    torch.manual_seed(0)
    gates = {}
    for k in model.exit_layers:  # random gates spread over (0, 1)
        gates[k] = ExitGate(model.backbone.hidden_size)
        with torch.no_grad():
            gates[k].weight.normal_(0, 1.0)
    model.set_gates(gates)
    thresholds = (0.3, 0.5, 0.9)
    r = gate_report(model, val, thresholds, batch_size=5)
    with torch.no_grad():
        out = model(val, final=True, return_hidden=True)
    final = out.final_logits[:, :-1].argmax(-1).flatten()
    assert r["tokens"] == final.numel() and r["thresholds"] == list(thresholds)
    for k in model.exit_layers:
        lg = out.exit_logits[k][:, :-1].reshape(-1, 97)
        ok = lg.argmax(-1) == final
        conf = {"gate": gates[k](out.exit_hidden[k][:, :-1]).flatten(), "max_prob": lg.softmax(-1).amax(-1)}
        e = r["exits"][str(k)]
        assert e["agreement"] == pytest.approx(ok.float().mean().item())
        for name, p in conf.items():
            for i, t in enumerate(thresholds):
                hit = p >= t
                assert e[name]["count"][i] == int(hit.sum())
                assert e[name]["coverage"][i] == pytest.approx(hit.float().mean().item())
                want = ok[hit].float().mean().item() if hit.any() else None
                assert e[name]["precision"][i] == (pytest.approx(want) if want is not None else None)
    assert any(0 < c < 1 for c in r["exits"]["3"]["gate"]["coverage"])


# --- save / load ----------------------------------------------------------------------------
def test_gates_and_vocab_round_trip(tmp_path):
    model, train, val = context_free_model(0)
    train_gates(model, train, val, progress=False)
    model.vocab_by_frequency = torch.randperm(97)
    model.save_pretrained(tmp_path / "x")
    back = EarlyExitModel.from_pretrained(tmp_path / "x", backbone=model.backbone)
    assert back.has_gates and torch.equal(back.vocab_by_frequency, model.vocab_by_frequency)
    h = torch.randn(5, model.backbone.hidden_size) * 10
    for k in model.exit_layers:
        assert torch.equal(back.gate(k).weight, model.gate(k).weight)
        assert torch.equal(back.gate(k).bias, model.gate(k).bias)
        assert torch.equal(back.gate(k)(h), model.gate(k)(h))
    # the report of the loaded model is the same
    assert gate_report(back, val) == gate_report(model, val)


# --- eetune tune --gates-only / --gates ------------------------------------------------------
def test_tune_gates_only_keeps_heads_bit_identical(world, tmp_path, capsys):
    out = tmp_path / "gated"
    assert main(["tune", str(world["mlp"]), "--data", str(world["docs"]), "--out", str(out), *TUNE,
                 "--gates-only", "--gate-tokens", "1000"]) == 0
    printed = capsys.readouterr().out
    assert "gates for exits after layers [1, 3] fit on" in printed and "max-prob cov" in printed
    before, after = heads_only(world["mlp"]), heads_only(out)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    cfg_in = json.loads((world["mlp"] / "exit_config.json").read_text())
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["training"] == cfg_in["training"]  # no head training recorded
    g = cfg["gates"]
    assert g["blocks"] == 32 and g["tokens"] == 32 * 31  # 1000 tokens -> 32 whole blocks of 32
    assert g["data"]["source"] == str(world["docs"]) and g["report"]["tokens"] > 0
    assert set(g["report"]["exits"]) == {"1", "3"}
    model = EarlyExitModel.from_pretrained(out)
    assert model.has_gates
    assert model.vocab_by_frequency.tolist() == ranked_by_hand(world)[0]
    # the gated directory decodes with every cheap-decision option (the whole pipeline, CLI to engine)
    capsys.readouterr()
    base = ["generate", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "6", "--json"]
    assert main(base + ["--mode", "full"]) == 0
    full = json.loads(capsys.readouterr().out)["rows"][0]["ids"]
    for extra in (["--mode", "early-exit", "--confidence", "gate", "--threshold", "1.01"],
                  ["--mode", "self-spec", "--draft-vocab", "20", "--threshold", "0"],
                  ["--mode", "self-spec", "--confidence", "gate", "--threshold", "0.2"],
                  ["--mode", "self-spec", "--draft-exit", "auto", "--verbose"]):
        assert main(base + extra) == 0, extra
        captured = capsys.readouterr()
        assert json.loads(captured.out)["rows"][0]["ids"] == full, extra
    assert "draft policy" in captured.err


def test_tune_records_vocab_and_drops_old_gates(world, tmp_path, capsys):
    gated = tmp_path / "gated"
    assert main(["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(gated), *TUNE,
                 "--gates-only", "--gate-tokens", "256"]) == 0
    capsys.readouterr()
    # re-tuning the heads drops the gates (they were fit to the old heads), with a note
    out = tmp_path / "retuned"
    assert main(["tune", str(gated), "--data", str(world["docs"]), "--out", str(out), *TUNE, "--steps", "2",
                 "--lr", "1e-2"]) == 0
    err = capsys.readouterr().err
    assert "gates of" in err and "dropped" in err
    model = EarlyExitModel.from_pretrained(out)
    assert len(model.gates) == 0 and model.config.gates is None
    order, counts = ranked_by_hand(world)
    assert model.vocab_by_frequency.tolist() == order
    assert len(order) == 97 and counts[order[0]] == max(counts)
    assert [counts[i] for i in order] == sorted(counts, reverse=True)


def test_tune_with_gates_fits_them_to_the_tuned_heads(world, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["tune", str(world["mlp"]), "--data", str(world["docs"]), "--out", str(out), *TUNE, "--steps", "3",
                 "--lr", "1e-2", "--gates", "--gate-tokens", "320"]) == 0
    printed = capsys.readouterr().out
    assert "3 steps" in printed and "gates for exits after layers [1, 3]" in printed
    cfg = json.loads((out / "exit_config.json").read_text())
    assert cfg["training"]["steps"] == 3 and cfg["training"]["trunk_layers_held"] == 4
    assert cfg["gates"]["blocks"] == 10
    model = EarlyExitModel.from_pretrained(out)
    assert model.has_gates and model.vocab_by_frequency.numel() == 97
    # the report in the config is the report of these heads and gates on the held-out blocks
    tok = load_tokenizer(model.backbone)
    _, val, _ = train_val_blocks(str(world["docs"]), tok, 32, 8)
    again = gate_report(model, val)
    assert again["exits"]["3"]["gate"]["count"] == cfg["gates"]["report"]["exits"]["3"]["gate"]["count"]


# --- bad input: one line, exit code 2, nothing written --------------------------------------
@pytest.mark.parametrize("extra,match", [
    (["--gates-only", "--distill", "0.5"], "--gates-only trains no heads, so --distill does not apply"),
    (["--gates-only", "--steps", "3"], "--steps does not apply"),
    (["--gates", "--gate-tokens", "0"], "--gate-tokens 0"),
    (["--gates-only", "--gate-tokens", "-5"], "--gate-tokens -5"),
    (["--gates-only", "--val-blocks", "0"], "held-out blocks"),
    (["--gates", "--gates-only"], "not allowed with argument"),
])
def test_bad_gate_input(world, tmp_path, capsys, extra, match):
    out = tmp_path / "out"
    argv = ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(out), *TUNE, *extra]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:") and match in err, err
    assert not out.exists() and not (tmp_path / "out.train").exists()


def test_gates_under_torchrun_refused(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(tmp_path / "o"), *TUNE,
                 "--gates"]) == 2
    assert "one process" in capsys.readouterr().err


# --- info and evaluate show them ------------------------------------------------------------
def test_info_and_evaluate_show_gates(world, tmp_path, capsys):
    out = tmp_path / "gated"
    assert main(["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(out), *TUNE,
                 "--gates-only", "--gate-tokens", "256"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "exits after layers [1, 3] (fit on 248 tokens" in text
    assert "97 token ids" in text and "max-prob cov" in text and "exit after layer 3" in text
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gates"]["exits"] == [1, 3] and info["ranked_vocab_size"] == 97
    assert info["gates"]["report"]["thresholds"] == [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99]
    # an untouched directory has neither
    assert main(["info", str(world["norm"]), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["gates"]["exits"] == [] and plain["ranked_vocab_size"] is None
    # evaluate adds the gate report
    text_file = tmp_path / "eval.txt"
    text_file.write_text(" ".join(f"w{(i * 7) % 96}" for i in range(200)))
    assert main(["evaluate", str(out), "--data", str(text_file), "--seq-len", "32", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["gates"]["tokens"] == m["tokens"] and set(m["gates"]["exits"]) == {"1", "3"}
    assert main(["evaluate", str(out), "--data", str(text_file), "--seq-len", "32"]) == 0
    assert "gates vs max-prob" in capsys.readouterr().out


def test_gates_fit_on_heads_in_eval_mode_and_put_the_mode_back(gpt2_dropout_backbone):
    """Gate features and the report come from the heads in eval mode (no dropout: a GPT-2 `layer`
    exit has some); regression: `train_gates` left the model in eval mode afterwards."""
    model = EarlyExitModel.convert(gpt2_dropout_backbone, [1, 3], arch="layer")
    model.train()
    seen = []
    for m in model.heads.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, a, o: seen.append(mod.training))
    g = torch.Generator().manual_seed(0)
    blocks, val = torch.randint(0, 97, (4, 12), generator=g), torch.randint(0, 97, (2, 12), generator=g)
    train_gates(model, blocks, val, batch_size=2, progress=False)
    assert seen and not any(seen)
    assert all(m.training for m in model.heads.modules()) and not gpt2_dropout_backbone.model.training
    seen.clear()
    gate_report(model, val, batch_size=2)
    assert seen and not any(seen) and all(m.training for m in model.heads.modules())


# --- restricted-vocabulary heads: the mapped top-1, OTHER a negative ---------------------------------
def test_gate_labels_and_report_use_the_mapped_top1_where_other_is_a_negative():
    """A head restricted to K ids + OTHER: a position's label is "the head's top-1 token (vocab_ids
    of its top class) equals the final layer's", so a position where OTHER wins is a negative,
    and in the report such a position never leaves, whatever its confidence."""
    model, train, val = context_free_model(0)
    with torch.no_grad():
        final = model(train, final=True).final_logits[:, :-1].argmax(-1).flatten()
    common = torch.bincount(final, minlength=97).argsort(descending=True)
    keep = torch.cat([common[:6], torch.tensor([i for i in range(97) if i not in common[:6].tolist()][:10])])
    model.restrict_vocab(keep[torch.randperm(16, generator=torch.Generator().manual_seed(0))])
    with torch.no_grad():
        for k in model.exit_layers:  # OTHER wins at about half the positions
            lg = model(train, return_hidden=False).exit_logits[k][..., :16]
            model.head(k).other_bias.fill_(lg.amax(-1).median().item())

    def manual(blocks):
        with torch.no_grad():
            out = model(blocks, final=True)
        ref = out.final_logits[:, :-1].argmax(-1).flatten()
        rows = {}
        for k in model.exit_layers:
            lg = out.exit_logits[k][:, :-1].reshape(-1, 17)
            tok = model.head(k).tokens_of(lg.argmax(-1))
            rows[k] = (tok == ref, tok >= 0, lg.softmax(-1).amax(-1), lg.argmax(-1) == ref)
        return rows

    s = train_gates(model, train, val, progress=False)
    for k, (ok, can, _, naive) in manual(train).items():
        assert 0.2 < can.float().mean() < 0.8 and ok.any()
        assert not ok.equal(naive)  # class indices read as token ids would label other positions
        assert s["fit"][str(k)]["label_rate"] == pytest.approx(ok.float().mean().item())
    r = s["report"]
    for k, (ok, can, conf, _) in manual(val).items():
        e = r["exits"][str(k)]
        assert e["agreement"] == pytest.approx(ok.float().mean().item())
        for i, t in enumerate(r["thresholds"]):
            hit = (conf >= t) & can
            assert e["max_prob"]["count"][i] == int(hit.sum())
            want = ok[hit].float().mean().item() if hit.any() else None
            assert e["max_prob"]["precision"][i] == (pytest.approx(want) if want is not None else None)

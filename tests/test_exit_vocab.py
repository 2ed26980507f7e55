"""Restricted-vocabulary exit heads (issue 18) in tuning and on the command line: K = V reproduces
the full heads through real `tune` steps, labels outside K train OTHER, an exits directory of
K-heads round-trips and one whose ids do not fit the model is refused, `--exit-vocab` is checked
in one line, `convert --exit-vocab` / `--from-exits` and `tune --exit-vocab` record where the ids
came from, and a resumed run sees the same restricted heads. Tiny random models (tests/conftest.py)."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from eetune.cli import main
from eetune.errors import EETuneError
from eetune.model.backbone import load_backbone, load_tokenizer
from eetune.model.config import ExitConfig
from eetune.model.early_exit import EarlyExitModel, write_exits_dir
from eetune.train.data import train_val_blocks
from eetune.train.tune import TuneConfig, _Heads, rank_vocabulary, tune, vocab_source

from tune_helpers import ENV, make_world, one_thread  # noqa: F401 (autouse fixture)
from tune_helpers import head_tensors as heads

V = 97
BASE = ["--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", "--distill", "0.5", "--no-progress"]
SOURCE = {"ranked_by": "data", "data": "by hand", "tokens": 0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("kheads"))


def cfg(world, **kw):
    base = dict(data=str(world["docs"]), seq_len=32, batch_size=4, lr=1e-2, distill=0.5, val_blocks=2,
                select="last", progress=False)
    return TuneConfig(**{**base, **kw})


def bad(argv, capsys, match):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:") and match in err, err


def training_blocks(world, seq_len=32):
    """The training blocks `tune --data DOCS --seq-len N` trains on (default --val-blocks)."""
    tok = load_tokenizer(load_backbone(str(world["model"])))
    return train_val_blocks(str(world["docs"]), tok, seq_len, TuneConfig.val_blocks)[0]


def trunk_states(bb, ids, layers=(1, 3)):
    pos = torch.arange(ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        h = bb.embed(ids, pos)
        ctx = bb.context(h, pos)
        out, done = [], 0
        for k in layers:
            h = bb.run_layers(h, done, k, ctx)
            out.append(h)
            done = k
    return out, ctx


# --- K = V: today's heads, permuted --------------------------------------------------------
@pytest.mark.parametrize("chunk", [0, 7])
@pytest.mark.parametrize("emb", ["copy", "shared"])
def test_k_equal_to_the_vocabulary_reproduces_the_full_heads(world, tmp_path, emb, chunk):
    """Heads restricted to a permutation of all V ids give the same logits (mapped back) as the
    full heads, and after a few real tuning steps (distillation and CE, fixed seed) the same
    weights, permuted, and the same validation."""
    bb = load_backbone(str(world["model"]))
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    full = EarlyExitModel.convert(bb, (1, 3), arch="norm", output_embedding=emb)
    kv = EarlyExitModel.convert(bb, (1, 3), arch="norm", output_embedding=emb, exit_vocab_ids=perm,
                                exit_vocab_source=SOURCE)
    assert kv.exit_vocab == V and all(h.num_classes == V and not h.has_other for h in kv.heads)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = full(ids), kv(ids)
    for k in (1, 3):
        assert torch.allclose(kv.head(k).to_vocab(b.exit_logits[k]), a.exit_logits[k], atol=1e-5)
    full.save_pretrained(tmp_path / "full")
    kv.save_pretrained(tmp_path / "kv")

    c = cfg(world, steps=3, loss_chunk=chunk)
    s_full = tune(tmp_path / "full", tmp_path / "full-t", c)
    s_kv = tune(tmp_path / "kv", tmp_path / "kv-t", c)
    A, B = heads(tmp_path / "full-t"), heads(tmp_path / "kv-t")
    start = heads(tmp_path / "full")
    assert set(B) == set(A) | {"0.vocab_ids", "1.vocab_ids"}
    assert torch.equal(B["0.vocab_ids"], perm) and torch.equal(B["1.vocab_ids"], perm)
    moved = 0.0
    for key, want in A.items():
        got = B[key]
        if key.endswith("out.weight"):
            want = want[perm]
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (key, (got - want).abs().max())
        moved = max(moved, (A[key] - start[key]).abs().max().item())
    assert moved > 1e-3  # they trained
    assert s_kv["val_agreement"] == s_full["val_agreement"]
    for k, v in s_full["val_loss"].items():
        assert s_kv["val_loss"][k] == pytest.approx(v, rel=1e-5)
    tuned_full = EarlyExitModel.from_pretrained(tmp_path / "full-t")
    tuned_kv = EarlyExitModel.from_pretrained(tmp_path / "kv-t")
    with torch.no_grad():
        a, b = tuned_full(ids), tuned_kv(ids)
    for k in (1, 3):
        assert torch.allclose(tuned_kv.head(k).to_vocab(b.exit_logits[k]), a.exit_logits[k], rtol=1e-4, atol=1e-4)


# --- the LM loss and agreement of K < V heads -------------------------------------------------
@pytest.mark.parametrize("chunk", [0, 7])
def test_lm_loss_maps_labels_outside_k_to_other_and_trains_the_other_row(world, chunk):
    bb = load_backbone(str(world["model"]))
    keep = torch.arange(10, 26)  # K = 16 of 97
    model = EarlyExitModel.convert(bb, (1, 3), arch="norm", exit_vocab_ids=keep, exit_vocab_source=SOURCE)
    with torch.no_grad():
        for h in model.heads:
            h.other_weight.normal_(0, 0.1)
            h.other_bias.fill_(0.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, V, (2, 12), generator=g), torch.randint(10, 26, (2, 12), generator=g)])
    hiddens, ctx = trunk_states(bb, ids)
    targets = ids[:, 1:].reshape(-1)
    inside = (targets >= 10) & (targets < 26)
    assert inside.any() and (~inside).any()
    mapped = torch.where(inside, targets - 10, torch.full_like(targets, 16))
    out = _Heads(model.heads, chunk)(hiddens, ctx, ids)
    for head, h, (loss, ce) in zip(model.heads, hiddens, out):
        lg = head(h, ctx)[:, :-1].reshape(-1, 17)
        want = F.cross_entropy(lg, mapped)
        assert torch.allclose(ce, want, rtol=1e-5) and torch.allclose(loss, want, rtol=1e-5)
    sum(loss for loss, _ in out).backward()
    for head in model.heads:
        assert head.other_bias.grad.abs().item() > 0 and head.other_weight.grad.abs().max().item() > 0

    # validation's agreement: the top-1 class mapped back to its token id; OTHER never agrees
    with torch.no_grad():
        top = [head(h, ctx)[:, :-1].argmax(-1) for head, h in zip(model.heads, hiddens)]
        reference = top[0].clone()  # class indices read as token ids: only mapped ids may agree
        res = _Heads(model.heads, chunk)(hiddens, ctx, ids, final_top1=reference, evaluate=True)
    for head, t, (_, agree) in zip(model.heads, top, res):
        assert agree == int((head.tokens_of(t) == reference).sum())


# --- the exits directory -----------------------------------------------------------------------
@pytest.mark.parametrize("emb", ["copy", "shared"])
def test_k_head_exits_directory_round_trip(world, tmp_path, emb):
    bb = load_backbone(str(world["model"]))
    keep = torch.tensor([5, 3, 90, 0, 17, 42, 61, 7])
    model = EarlyExitModel.convert(bb, (1, 3), arch="mlp", output_embedding=emb, exit_vocab_ids=keep,
                                   exit_vocab_source=SOURCE)
    with torch.no_grad():
        for h in model.heads:
            h.other_weight.normal_(0, 0.1)
            h.other_bias.fill_(0.3)
    model.save_pretrained(tmp_path / "k")
    stored = load_file(str(tmp_path / "k" / "exit_heads.safetensors"))
    assert stored["0.vocab_ids"].dtype == torch.int64 and torch.equal(stored["1.vocab_ids"], keep)
    assert stored["0.other_weight"].shape == (32,) and stored["0.other_bias"].tolist() == [pytest.approx(0.3)]
    assert ("0.out.weight" in stored) == (emb == "copy")
    back = EarlyExitModel.from_pretrained(tmp_path / "k", backbone=bb)
    assert back.exit_vocab == 8 and back.config.exit_vocab_source == SOURCE
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        a, b = model(ids), back(ids)
    for k in (1, 3):
        assert b.exit_logits[k].shape[-1] == 9 and torch.equal(a.exit_logits[k], b.exit_logits[k])
        assert torch.equal(back.head(k).vocab_ids, keep)


def test_exits_whose_ids_do_not_fit_the_model_are_refused_in_one_line(world, tmp_path, capsys):
    bb = load_backbone(str(world["model"]))
    EarlyExitModel.convert(bb, (1, 3), arch="norm", exit_vocab_ids=torch.arange(8),
                           exit_vocab_source=SOURCE).save_pretrained(tmp_path / "k")
    state = load_file(str(tmp_path / "k" / "exit_heads.safetensors"))
    state["1.vocab_ids"] = torch.tensor([0, 1, 2, 3, 4, 5, 6, V + 3])  # an id of a bigger vocabulary
    write_exits_dir(tmp_path / "bad", ExitConfig.load(tmp_path / "k"), state)
    with pytest.raises(EETuneError, match="outside this model's vocabulary of 97"):
        EarlyExitModel.from_pretrained(tmp_path / "bad", backbone=bb)
    bad(["info", tmp_path / "bad"], capsys, "outside this model's vocabulary")
    bad(["tune", tmp_path / "bad", "--data", world["docs"], *BASE, "--steps", "1", "--out", tmp_path / "t"], capsys,
        "outside this model's vocabulary")
    assert not (tmp_path / "t").exists() and not (tmp_path / "t.train").exists()


# --- --exit-vocab on the command line --------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [("0", "must be at least 1"), ("abc", "is not a number"),
                                        ("10000000", "larger than the model's vocabulary of 97")])
def test_a_bad_exit_vocab_is_one_line_with_code_2_and_writes_nothing(world, tmp_path, capsys, spec, match):
    out = tmp_path / "out"
    bad(["convert", "--model", world["model"], "--exits", "1,3", "--exit-vocab", spec, "--out", out], capsys, match)
    bad(["convert", "--from-exits", world["norm"], "--exit-vocab", spec, "--out", out], capsys, match)
    bad(["tune", world["norm"], "--data", world["docs"], *BASE, "--steps", "1", "--exit-vocab", spec, "--out", out],
        capsys, match)
    assert list(tmp_path.iterdir()) == []
    # (that the console script turns main()'s 2 and its one line into the process's exit status and
    # stderr, `python -m eetune.cli` paying ~10 s of imports, is tests/test_plan.py's
    # test_bad_input_from_the_console: the same main(), the same EETuneError path)


def test_convert_with_exit_vocab_then_tune_records_the_vocabulary(world, tmp_path, capsys):
    conv = tmp_path / "k16"
    assert main(["convert", "--model", str(world["model"]), "--exits", "1,3", "--arch", "mlp", "--exit-vocab", "16",
                 "--vocab-data", str(world["docs"]), "--out", str(conv)]) == 0
    assert "restricted to the 16 of 97 token ids" in capsys.readouterr().out
    c = json.loads((conv / "exit_config.json").read_text())
    blocks = training_blocks(world, seq_len=TuneConfig.seq_len)  # tune's default blocks of the same data
    assert c["exit_vocab"] == 16
    assert c["exit_vocab_source"] == {"ranked_by": "data", "data": str(world["docs"]), "tokens": blocks.numel()}
    ids = load_file(str(conv / "exit_heads.safetensors"))["0.vocab_ids"]
    assert torch.equal(ids, rank_vocabulary(blocks, V)[:16])
    assert main(["info", str(conv)]) == 0
    assert "16 of 97 token ids + OTHER (ranked by data" in capsys.readouterr().out

    tuned = tmp_path / "tuned"
    assert main(["tune", str(conv), "--data", str(world["docs"]), *BASE, "--steps", "3", "--out", str(tuned)]) == 0
    t = json.loads((tuned / "exit_config.json").read_text())
    assert t["exit_vocab"] == 16 and t["exit_vocab_source"] == c["exit_vocab_source"]
    assert t["training"]["steps"] == 3
    before, after = heads(conv), heads(tuned)
    assert before.keys() == after.keys() and torch.equal(after["1.vocab_ids"], ids)
    assert after["0.other_weight"].abs().max() > 0 and after["1.other_bias"].abs().max() > 0  # OTHER trained
    model = EarlyExitModel.from_pretrained(tuned)
    assert model.exit_vocab == 16 and all(h.num_classes == 17 for h in model.heads)

    # --exit-vocab again: the same K is nothing to do; another K is refused (convert again)
    capsys.readouterr()
    assert main(["tune", str(conv), "--data", str(world["docs"]), *BASE, "--steps", "1", "--exit-vocab", "16",
                 "--out", str(tmp_path / "same")]) == 0
    assert torch.equal(heads(tmp_path / "same")["0.vocab_ids"], ids)
    bad(["tune", conv, "--data", world["docs"], *BASE, "--steps", "1", "--exit-vocab", "8", "--out",
         tmp_path / "other"], capsys, "convert again")
    bad(["tune", conv, "--data", world["docs"], *BASE, "--steps", "1", "--exit-vocab", "all", "--out",
         tmp_path / "other"], capsys, "convert again")
    assert not (tmp_path / "other").exists()


def test_tune_exit_vocab_restricts_full_heads_from_the_training_data_and_resumes(world, tmp_path, capsys):
    """`tune --exit-vocab K` on full-vocabulary exits: the K ids most frequent in the training
    blocks, before the first step; a run stopped at a checkpoint and resumed ends with the heads of
    an uninterrupted one (the restriction is the same); resuming without --exit-vocab is refused."""
    args = ["tune", str(world["mlp"]), "--data", str(world["docs"]), *BASE, "--exit-vocab", "20", "--decay",
            "constant", "--save-every", "1"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main([*args, "--steps", "4", "--out", str(ref)]) == 0
    assert "restricted to the 20 most frequent of 97" in capsys.readouterr().err
    c = json.loads((ref / "exit_config.json").read_text())
    blocks = training_blocks(world)
    assert c["exit_vocab"] == 20
    assert c["exit_vocab_source"] == {"ranked_by": "data", "data": str(world["docs"]), "tokens": blocks.numel()}
    assert c["exit_vocab_source"]["tokens"] == c["training"]["data"]["train_blocks"] * 32
    r = heads(ref)
    assert torch.equal(r["0.vocab_ids"], rank_vocabulary(blocks, V)[:20]) and r["0.out.weight"].shape == (20, 32)

    assert main([*args, "--steps", "2", "--out", str(out)]) == 0
    assert main([*args, "--steps", "4", "--resume", "--out", str(out)]) == 0
    o = heads(out)
    assert o.keys() == r.keys() and all(torch.equal(o[k], r[k]) for k in r)
    plain = [a for a in args if a not in ("--exit-vocab", "20")]
    capsys.readouterr()
    bad([*plain, "--steps", "5", "--resume", "--out", tmp_path / "again", "--train-dir", tmp_path / "out.train"],
        capsys, "exit_vocab")


def test_convert_from_exits_restricts_tuned_full_heads(world, tmp_path, capsys):
    """Already tuned full-vocabulary exits become K-heads: each head's K rows (as tuned), a fresh
    OTHER row, its transform kept; then they tune."""
    tuned = tmp_path / "tuned"
    tune(world["mlp"], tuned, cfg(world, steps=2))
    k8 = tmp_path / "k8"
    assert main(["convert", "--from-exits", str(tuned), "--exit-vocab", "8", "--vocab-data", str(world["docs"]),
                 "--out", str(k8)]) == 0
    before, after = heads(tuned), heads(k8)
    ids = after["0.vocab_ids"]
    assert torch.equal(ids, rank_vocabulary(training_blocks(world, TuneConfig.seq_len), V)[:8])
    for key, v in before.items():
        want = v[ids] if key.endswith("out.weight") else v
        assert torch.equal(after[key], want), key
    assert not after["0.other_weight"].any() and not after["1.other_bias"].any()
    c, c0 = json.loads((k8 / "exit_config.json").read_text()), json.loads((tuned / "exit_config.json").read_text())
    assert c["exit_vocab"] == 8 and c["exit_vocab_source"]["ranked_by"] == "data"
    assert c["training"] == c0["training"]  # the tuning record is kept
    assert main(["tune", str(k8), "--data", str(world["docs"]), *BASE, "--steps", "2", "--out",
                 str(tmp_path / "k8-tuned")]) == 0
    capsys.readouterr()
    bad(["convert", "--from-exits", k8, "--exit-vocab", "4", "--out", tmp_path / "x"], capsys, "already")
    bad(["convert", "--from-exits", tuned, "--exit-vocab", "4", "--arch", "norm", "--out", tmp_path / "x"], capsys,
        "--arch")
    bad(["convert", "--from-exits", tuned, "--out", tmp_path / "x"], capsys, "--exit-vocab")
    bad(["convert", "--model", world["model"], "--exits", "1", "--vocab-data", world["docs"], "--out",
         tmp_path / "x"], capsys, "--exit-vocab")
    assert not (tmp_path / "x").exists()


def test_the_ranking_source_names_text_generated_data_or_a_mixture():
    t = torch.zeros(3, 4, dtype=torch.long)
    assert vocab_source("default", {"source": "default"}, t) == {"ranked_by": "data", "data": "default", "tokens": 12}
    assert vocab_source("generated:1000", {"source": "generated:1000:default"}, t)["ranked_by"] == "generated"
    assert vocab_source("default:0.3,generated:2000:0.7", {"source": "x"}, t)["ranked_by"] == "mixture"
    assert vocab_source("default:1,generated:2000:0", {"source": "x"}, t)["ranked_by"] == "data"  # weight 0: unused


# --- FSDP under torchrun ------------------------------------------------------------------------
def test_fsdp_two_ranks_tune_k_heads_like_one_process(world, tmp_path):
    import socket

    bb = load_backbone(str(world["model"]))
    EarlyExitModel.convert(bb, (1, 3), arch="mlp", exit_vocab_ids=torch.arange(3, 19),
                           exit_vocab_source=SOURCE).save_pretrained(tmp_path / "k")
    one = tmp_path / "one"
    tune(tmp_path / "k", one, cfg(world, steps=4, distill=0.0, select="agreement", val_blocks=8))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "eetune.cli", "tune", str(tmp_path / "k"), "--data", str(world["docs"]), "--seq-len", "32",
           "--batch-size", "2", "--lr", "1e-2", "--steps", "4", "--distill", "0", "--no-progress", "--fsdp",
           "--out", str(two)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, start = heads(one), heads(two), heads(tmp_path / "k")
    assert a.keys() == b.keys() and torch.equal(b["0.vocab_ids"], torch.arange(3, 19))
    assert max((a[k] - b[k]).abs().max().item() for k in a if k.endswith(("weight", "bias"))) <= 1e-5
    assert (b["1.other_weight"] - start["1.other_weight"]).abs().max() > 1e-4


def test_restriction_happens_before_the_optimizer_and_keeps_fp32_rows_under_bf16(world, tmp_path, capsys):
    """`tune --exit-vocab K --dtype bf16`: the heads are restricted in set-up, before the optimizer is
    built (it holds the OTHER rows), and the K rows are the stored fp32 rows, not rounded to bf16."""
    from eetune.train import tune as T

    c, exit_config, train_dir = T._check_run(world["mlp"], tmp_path / "out", cfg(world, steps=1, dtype="bf16",
                                                                                  exit_vocab="12"))
    model = T._load_for_tuning(world["mlp"], exit_config, c, None, torch.device("cpu"), 0)
    run = T._setup(model, world["mlp"], tmp_path / "out", train_dir, exit_config, c, 1, 0, torch.device("cpu"),
                   caller_backbone=False)
    ids = rank_vocabulary(run.train, V)[:12]
    assert run.exit_config.exit_vocab == 12 and run.exit_config.exit_vocab_source["ranked_by"] == "data"
    stored = heads(world["mlp"])
    for i, head in enumerate(model.heads):
        assert torch.equal(head.vocab_ids, ids) and head.out.weight.dtype == torch.float32
        assert torch.equal(head.out.weight, stored[f"{i}.out.weight"][ids])
    in_opt = {id(p) for g in run.opt.param_groups for p in g["params"]}
    assert all(id(h.other_weight) in in_opt and id(h.other_bias) in in_opt for h in model.heads)
    assert run.run_settings["exit_vocab"] == 12 and run.run_settings["exit_vocab_ids"]
    capsys.readouterr()
    assert main(["info", str(world["mlp"])]) == 0
    assert "exit vocabulary        the whole vocabulary" in capsys.readouterr().out

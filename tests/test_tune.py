"""Tuning (eetune.train.tune): frozen backbone, exact resume after SIGKILL, DDP / FSDP2 under torchrun,
the hidden-state cache, losses and schedules, bad input. Tiny random models; the real default
model is behind the `realmodel` marker."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from eetune.model.backbone import load_backbone
from eetune.cli import main
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel, ReleasedLayer
from eetune.train.tune import TuneConfig, block_indices, exit_loss, loss_weights_at, lr_at, tune

from tune_helpers import ENV, make_world, run_cli, one_thread  # noqa: F401 (autouse fixture)
from tune_helpers import head_tensors as heads

BASE = ["--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", "--distill", "0", "--no-progress"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("tune"))




def cfg(world, **kw):
    base = dict(data=str(world["docs"]), seq_len=32, batch_size=4, lr=1e-2, distill=0.0, progress=False)
    return TuneConfig(**{**base, **kw})


# --- what must show: the backbone is untouched, only heads are optimised ---------------------
def test_backbone_bit_identical_no_grad_and_only_heads_in_optimizer(world, tmp_path, monkeypatch):
    bb = load_backbone(str(world["model"]))
    before = {k: v.clone() for k, v in bb.model.state_dict().items()}
    layer4 = bb.layers[3]
    seen = []

    class Recording(torch.optim.AdamW):
        def __init__(self, params, **kw):
            params = list(params)
            seen.extend(p for g in params for p in g["params"])
            super().__init__(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    ran = []
    layer4.register_forward_pre_hook(lambda m, a: ran.append(1))
    summary = tune(world["mlp"], tmp_path / "out", cfg(world, steps=5), backbone=bb)
    assert summary["steps"] == 5
    # the layer past the deepest exit (3) never ran on a training block: only once over the held-out
    # blocks, for the final layer's top-1 that validation compares with; a backbone the caller
    # passed in is left whole (regression: tune() used to release its layers); everything bit-identical
    assert len(ran) == math.ceil(summary["data"]["val_blocks"] / 4)
    assert bb.layers[3] is layer4 and not any(isinstance(x, ReleasedLayer) for x in bb.layers)
    after = bb.model.state_dict()
    assert set(after) == set(before)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    assert all(p.grad is None and not p.requires_grad for p in bb.model.parameters())
    assert all(p.grad is None for p in layer4.parameters())
    # the optimizer holds exactly the head parameters: none of the backbone's
    backbone_ids = {id(p) for p in bb.model.parameters()} | {id(p) for p in layer4.parameters()}
    assert seen and all(id(p) not in backbone_ids for p in seen)
    fresh = EarlyExitModel.convert(load_backbone(str(world["model"])), (1, 3), arch="mlp")
    assert sum(p.numel() for p in seen) == fresh.parameter_counts()["trainable"]
    # and the heads did move
    tuned, untuned = heads(tmp_path / "out"), heads(world["mlp"])
    assert any(not torch.equal(tuned[k], untuned[k]) for k in tuned)


# SIGKILL then --resume (identical heads, one log row per step): tests/test_faults.py kills runs at
# many random points, checkpoint writes included.


# --- what must show: 2 ranks under torchrun == 1 process with the same global batch ---------
# FSDP here, DDP below through two launchers at a c10d rendezvous (eetune's code is the same for
# one node or two: torchrun owns the rendezvous).
@pytest.mark.parametrize("mode", ["fsdp"])
def test_torchrun_two_ranks_match_one_process(world, tmp_path, mode):
    one = tmp_path / "one"
    tune(world["mlp"], one, cfg(world, steps=6, grad_accum=1, batch_size=4))
    two = tmp_path / "two"
    import socket
    with socket.socket() as s:  # a port free now (a fixed one may still be held by an earlier run)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(port), "-m", "eetune.cli", "tune", str(world["mlp"]),
           "--data", str(world["docs"]), "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--steps", "6",
           "--distill", "0", "--no-progress", "--out", str(two)] + (["--fsdp"] if mode == "fsdp" else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b, start = heads(one), heads(two), heads(world["mlp"])
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-3  # they trained
    summary = json.loads((two / "exit_config.json").read_text())["training"]
    assert summary["world_size"] == 2 and summary["fsdp"] == (mode == "fsdp")
    assert summary["trunk_layers_loaded"] == 3  # partial loading: layer 4 of 4 never loaded on either rank


def test_bf16_run_starts_from_the_stored_fp32_heads(world, tmp_path):
    """Regression (issue 11): with --dtype bf16 the heads were built in bf16, so loading the saved
    fp32 heads rounded them before they were cast back to fp32. At lr 1e-30 (an update far below
    any weight's last bit) the output must equal the input bit for bit."""
    tune(world["norm"], tmp_path / "out", cfg(world, steps=1, lr=1e-30, dtype="bf16"))
    a, b = heads(world["norm"]), heads(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accum_matches_bigger_batch(world, tmp_path):
    tune(world["norm"], tmp_path / "a", cfg(world, steps=4, batch_size=4))
    tune(world["norm"], tmp_path / "b", cfg(world, steps=4, batch_size=2, grad_accum=2))
    a, b = heads(tmp_path / "a"), heads(tmp_path / "b")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


# --- economy: hidden-state cache ------------------------------------------------------------
def test_cache_hidden_serves_later_runs_without_backbone(world, tmp_path):
    cache = tmp_path / "cache"
    first = tune(world["mlp"], tmp_path / "a", cfg(world, steps=40, cache_hidden=str(cache)))  # > 1 epoch
    assert first["trunk_layers_held"] == 3 and (cache / "meta.json").is_file()
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["layers"] == [1, 3] and meta["dtype"] == "bf16"
    # same run again: every block is cached, so no backbone layer is held at all, same result
    again = tune(world["mlp"], tmp_path / "b", cfg(world, steps=40, cache_hidden=str(cache)))
    assert again["trunk_layers_held"] == 0
    a, b = heads(tmp_path / "a"), heads(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again["val_loss"] == first["val_loss"]
    # another head configuration on the same exits reuses the cache too
    other = tune(world["norm"], tmp_path / "c", cfg(world, steps=3, cache_hidden=str(cache)))
    assert other["trunk_layers_held"] == 0
    # cached states are the trunk's, rounded to bf16
    bb = load_backbone(str(world["model"]))
    from eetune.train.data import train_val_blocks
    from eetune.model.backbone import load_tokenizer
    train, _, _ = train_val_blocks(str(world["docs"]), load_tokenizer(bb), 32, 8)
    h = EarlyExitModel.convert(bb, (1, 3), arch="norm")(train[:2], return_hidden=True).exit_hidden[3]
    from eetune.train.tune import HiddenCache
    c = HiddenCache(cache, (1, 3), meta["shape"][0], 32, bb.hidden_size, "bf16", meta["key"], 0, 1)
    assert torch.equal(c.read([0, 1], (3,))[0], h.to(torch.bfloat16).float())


def test_cache_hidden_refuses_other_data(world, tmp_path):
    cache = tmp_path / "cache"
    tune(world["norm"], tmp_path / "a", cfg(world, steps=1, cache_hidden=str(cache)))
    with pytest.raises(EETuneError, match="other data"):
        tune(world["norm"], tmp_path / "b", cfg(world, steps=1, seq_len=16, cache_hidden=str(cache)))


def test_cache_hidden_with_distill_holds_the_final_layer_and_serves_later_runs(world, tmp_path):
    """Regression: --distill with --cache-hidden was refused (a cached run had no final layer), so
    comparing head configurations at equal tokens could only use the LM loss. The cache now keeps
    the final layer's normed states too: the teacher of later runs, which hold no backbone layer."""
    cache = tmp_path / "cache"
    first = tune(world["norm"], tmp_path / "a", cfg(world, steps=40, distill=1.0, cache_hidden=str(cache)))
    assert first["trunk_layers_held"] == 4 and first["settings"]["distill"] == 1.0
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["layers"] == [1, 3, "final"]
    again = tune(world["norm"], tmp_path / "b", cfg(world, steps=40, distill=1.0, cache_hidden=str(cache)))
    assert again["trunk_layers_held"] == 0
    a, b = heads(tmp_path / "a"), heads(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a) and again["val_loss"] == first["val_loss"]
    # an LM-loss run reuses it (the exits' states are there)
    assert tune(world["norm"], tmp_path / "c", cfg(world, steps=3, cache_hidden=str(cache)))["trunk_layers_held"] == 0
    # the cached teacher is the final layer: its logits are the model's own, up to bf16 rounding
    from eetune.model.backbone import load_tokenizer
    from eetune.train.data import train_val_blocks
    from eetune.train.tune import FINAL, HiddenCache
    bb = load_backbone(str(world["model"]))
    train, _, _ = train_val_blocks(str(world["docs"]), load_tokenizer(bb), 32, 8)
    c = HiddenCache(cache, (1, 3, FINAL), meta["shape"][0], 32, bb.hidden_size, "bf16", meta["key"], 0, 1)
    with torch.no_grad():
        want = bb.model(train[:2]).logits
        got = EarlyExitModel.convert(bb, (1, 3), arch="norm").heads[0].adapter.logits(c.read([0, 1], (FINAL,))[0])
    assert (got - want).abs().max() <= 0.02 * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.95


def test_a_cache_without_the_final_layer_is_refused_for_distill_in_one_line(world, tmp_path):
    cache = tmp_path / "cache"
    tune(world["norm"], tmp_path / "a", cfg(world, steps=1, cache_hidden=str(cache)))  # LM loss: exits only
    with pytest.raises(EETuneError, match="holds no final-layer states .* give a new directory"):
        tune(world["norm"], tmp_path / "b", cfg(world, steps=1, distill=1.0, cache_hidden=str(cache)))


def test_distill_keeps_the_full_trunk_and_trains(world, tmp_path):
    s = tune(world["norm"], tmp_path / "d", cfg(world, steps=3, distill=0.5))
    assert s["trunk_layers_held"] == 4 and all(math.isfinite(v) for v in s["val_loss"].values())


# --- losses and schedules -------------------------------------------------------------------
def test_exit_loss_plain_dynamic_and_distill():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    final = torch.randn(2, 5, 7)
    lg, t = logits[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(lg, t, reduction="none")
    loss, plain = exit_loss(logits, ids, False, None, 0.0)
    assert torch.allclose(loss, ce.mean()) and torch.allclose(plain, ce.mean())
    dyn, _ = exit_loss(logits, ids, True, None, 0.0)
    assert torch.allclose(dyn, (lg.softmax(-1).amax(-1) * ce).mean())
    dis, _ = exit_loss(logits, ids, False, final, 0.25)
    p = final[:, :-1].reshape(-1, 7).softmax(-1)
    kl = (p * (p.log() - lg.log_softmax(-1))).sum(-1).mean()
    assert torch.allclose(dis, 0.75 * ce.mean() + 0.25 * kl, atol=1e-6)
    # dynamic weights do not send gradient through the confidence
    x = logits.clone().requires_grad_(True)
    exit_loss(x, ids, True, None, 0.0)[0].backward()
    conf = lg.softmax(-1).amax(-1).detach()
    y = logits.clone().requires_grad_(True)
    (conf * torch.nn.functional.cross_entropy(y[:, :-1].reshape(-1, 7), t, reduction="none")).mean().backward()
    assert torch.allclose(x.grad, y.grad)


def test_schedules_and_data_order():
    c = TuneConfig(lr=1.0, warmup=4, min_lr_ratio=0.1, decay="linear")
    assert [lr_at(s, 14, c) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(14, 14, c) == pytest.approx(0.1) and lr_at(9, 14, c) == pytest.approx(0.55)
    assert lr_at(100, 14, TuneConfig(lr=2.0, decay="constant")) == 2.0
    w = TuneConfig(loss_weights=(1.0, 2.0), loss_weights_start=(0.0, 0.0), loss_weights_warmup=4)
    assert loss_weights_at(0, w, 2) == [0.0, 0.0] and loss_weights_at(2, w, 2) == [0.5, 1.0]
    assert loss_weights_at(9, w, 2) == [1.0, 2.0]
    # every block once per epoch; ranks x micro-batches partition the global batch
    c = TuneConfig(batch_size=2, grad_accum=2)
    perms = {}
    epoch = sorted(i for s in range(5) for m in range(2) for r in range(2) for i in block_indices(s, m, r, 2, c, 40, perms))
    assert epoch == list(range(40))
    one = [i for m in range(2) for i in block_indices(3, m, 0, 1, TuneConfig(batch_size=4, grad_accum=2), 40, {})]
    two = [i for m in range(2) for r in range(2) for i in block_indices(3, m, r, 2, c, 40, {})]
    assert sorted(one) == sorted(two)


# --- bad input: one line, code 2, nothing half-written --------------------------------------
def _bad(capsys, argv, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:") and match in err, err
    return err


def _nothing_written(tmp_path, *keep):
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


@pytest.mark.parametrize("case,match", [
    ("missing", "data not found"), ("empty", "is empty"), ("short", "fewer than one block"),
    ("weights", "has 3 values but there are 2 exits"), ("notexits", "is not an exits directory"),
    ("latin1", "line 1 is not UTF-8 (byte 0xe9"), ("binary", "holds NUL bytes"),
])
def test_bad_input(world, tmp_path, capsys, case, match):
    data, exits, extra = str(world["docs"]), str(world["norm"]), []
    if case == "missing":
        data = str(tmp_path / "nope.txt")
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
        data = str(tmp_path / "empty.jsonl")
    elif case == "short":
        (tmp_path / "short.txt").write_text("w1 w2 w3")
        data = str(tmp_path / "short.txt")
    elif case == "latin1":  # regression: a traceback
        (tmp_path / "latin1.jsonl").write_bytes('{"text": "w1 \u00e9"}\n'.encode("latin-1"))
        data = str(tmp_path / "latin1.jsonl")
    elif case == "binary":  # regression: trained on silently
        (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
        data = str(tmp_path / "binary.txt")
    elif case == "weights":
        extra = ["--loss-weights", "1,1,1"]
    elif case == "notexits":
        (tmp_path / "plain").mkdir()
        exits = str(tmp_path / "plain")
    before = sorted(p.name for p in tmp_path.iterdir())
    _bad(capsys, ["tune", exits, "--data", data, "--out", str(tmp_path / "out"), *BASE, "--steps", "2", *extra],
         match)
    _nothing_written(tmp_path, *before)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path, capsys):
    err = _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(tmp_path / "out"),
                        "--seq-len", "32", "--batch-size", "4", "--lr", "1e30", "--clip", "0", "--steps", "10",
                        "--save-every", "1", "--no-progress"], "non-finite loss at step")
    step = int(err.split("non-finite loss at step ")[1].split()[0])
    assert step >= 2 and "step-" in err
    assert not (tmp_path / "out").exists()
    ckpt = tmp_path / "out.train" / "checkpoints"
    latest = json.loads((ckpt / "latest.json").read_text())
    assert latest["step"] == step - 1
    good = load_file(str(ckpt / latest["checkpoint"] / "heads.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporary left


def test_resume_refusals(world, tmp_path, capsys):
    out = str(tmp_path / "out")
    _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps", "2",
                  "--resume"], "no checkpoint")
    assert main(["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps", "2",
                 "--save-every", "1"]) == 0
    capsys.readouterr()
    _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps", "4"],
         "pass --resume")
    err = _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps",
                        "4", "--resume", "--lr", "0.5"], "settings that differ")
    assert "(lr: 0.01 in the checkpoint, 0.5 now)" in err  # the difference named, and the fix
    # regression (issue 11): cached (bf16-rounded) inputs and the compute dtype change the trajectory
    _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps", "4",
                  "--resume", "--cache-hidden", str(tmp_path / "hc")], "(cache_hidden: False in the checkpoint")
    _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps", "4",
                  "--resume", "--dtype", "bf16"], "(dtype: 'fp32' in the checkpoint, 'bf16' now)")
    # continued tuning: more steps from the checkpoint
    assert main(["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", out, *BASE, "--steps", "4",
                 "--save-every", "1", "--resume"]) == 0
    assert json.loads((tmp_path / "out" / "exit_config.json").read_text())["training"]["steps"] == 4


def test_hidden_cache_is_keyed_by_compute_dtype(world, tmp_path, capsys):
    """Regression (issue 11): hidden states computed in fp32 were served to a bf16 run."""
    hc = str(tmp_path / "hc")
    assert main(["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(tmp_path / "a"), *BASE,
                 "--steps", "1", "--cache-hidden", hc]) == 0
    capsys.readouterr()
    _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(tmp_path / "b"), *BASE,
                  "--steps", "1", "--cache-hidden", hc, "--dtype", "bf16"], "holds hidden states of other")


def test_training_summary_and_log(world, tmp_path, monkeypatch):
    import eetune.train.tune as tune_mod
    rewrites = []
    real = tune_mod._write_log
    monkeypatch.setattr(tune_mod, "_write_log", lambda *a: rewrites.append(1) or real(*a))
    s = tune(world["mlp"], tmp_path / "out", cfg(world, steps=30, eval_every=10))
    assert len(rewrites) == 1  # regression (issue 11): log.csv was rewritten whole at every step
    written = json.loads((tmp_path / "out" / "exit_config.json").read_text())["training"]
    assert written["tokens"] == 30 * 4 * 32 and written["wall_time_s"] > 0
    assert set(written["train_loss"]) == set(written["val_loss"]) == {"1", "3"}
    assert written["data"]["source"] == str(world["docs"]) and written["data"]["val_blocks"] >= 1
    rows = (tmp_path / "out.train" / "log.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert {"step", "tokens", "lr", "loss_1", "loss_3", "grad_norm", "tokens_per_s", "val_1", "val_3"} <= set(header)
    assert len(rows) == 31
    table = list(csv.DictReader(rows))
    assert [r["step"] for r in table] == [str(i) for i in range(1, 31)]
    assert table[9]["val_1"] and not table[10]["val_1"]  # validation every 10 steps (not the last: at the end)
    # tuning lowered validation CE below the untuned heads' (learnable data)
    untuned = tune(world["mlp"], tmp_path / "zero", cfg(world, steps=1, lr=1e-12))
    assert all(s["val_loss"][k] < untuned["val_loss"][k] for k in s["val_loss"])
    # the tuned directory loads and its info shows the summary
    model = EarlyExitModel.from_pretrained(tmp_path / "out")
    assert model.config.training["steps"] == 30


# --- the real default model -----------------------------------------------------------------
@pytest.mark.realmodel
def test_tuning_lowers_every_exit_val_ce_on_default_model(tmp_path):
    from eetune.train.data import train_val_blocks  # noqa: F401 - the default data must be present
    torch.set_num_threads(os.cpu_count() or 1)
    src = tmp_path / "untuned"
    assert main(["convert", "--model", "smollm2-135m", "--exits", "10,20", "--arch", "mlp",
                 "--output-embedding", "shared", "--out", str(src)]) == 0
    # 3 steps (~3 s each on 2 cores) take the untuned exits' held-out CE from 21.0 / 20.2 to 18.5 / 16.7
    # (6 steps: 16.8 / 14.3): each drop clears the 1-nat bar by 1.5 nats or more
    c = TuneConfig(data="default", steps=3, seq_len=128, batch_size=4, lr=2e-3, warmup=2, val_blocks=4, distill=0.0,
                   progress=False)
    before = tune(src, tmp_path / "zero", TuneConfig(**{**c.__dict__, "steps": 1, "lr": 1e-12, "warmup": 0}))
    after = tune(src, tmp_path / "tuned", c)
    for k in ("10", "20"):
        assert after["val_loss"][k] < before["val_loss"][k] - 1.0, (before["val_loss"], after["val_loss"])


# --- best checkpoint (issue 9) ----------------------------------------------------------------
def _logged_scores(train_dir, layers=("1", "3")):
    rows = list(csv.DictReader(open(train_dir / "log.csv")))
    ce = {int(r["step"]): -sum(float(r[f"val_{k}"]) for k in layers) / len(layers) for r in rows if r["val_1"]}
    agree = {int(r["step"]): sum(float(r[f"val_agree_{k}"]) for k in layers) / len(layers) for r in rows if r["val_1"]}
    return ce, agree


OVERSHOOT = dict(steps=8, eval_every=1, lr=0.3, decay="constant", warmup=0)  # too high a rate: validation bounces


def test_select_writes_the_heads_of_the_best_validation(world, tmp_path):
    s = tune(world["norm"], tmp_path / "best", cfg(world, select="ce", **OVERSHOOT))
    ce, _ = _logged_scores(tmp_path / "best.train")
    ce[8] = s["last"]["score"]
    best_step = max(sorted(ce), key=lambda k: ce[k])  # the first of equal scores
    assert s["selected"]["step"] == best_step < 8, ce  # an earlier step validated better than the last
    # those heads are what a run stopped at that step writes (a constant rate: the same trajectory)
    ref = tune(world["norm"], tmp_path / "ref", cfg(world, select="last", **{**OVERSHOOT, "steps": best_step,
                                                                             "eval_every": 0}))
    a, b = heads(tmp_path / "best"), heads(tmp_path / "ref")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ref["selected"]["step"] == best_step
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["info", str(tmp_path / "best")]) == 0
    assert f"(step {best_step}, best by ce)" in buf.getvalue() and "8 steps" in buf.getvalue()
    # --select last writes the last step's heads; agreement picks the best logged agreement
    last = tune(world["norm"], tmp_path / "last", cfg(world, select="last", **OVERSHOOT))
    assert last["selected"]["step"] == 8
    by_agree = tune(world["norm"], tmp_path / "agree", cfg(world, select="agreement", **OVERSHOOT))
    _, agree = _logged_scores(tmp_path / "agree.train")
    agree[8] = by_agree["last"]["score"]
    assert by_agree["selected"]["score"] == max(agree.values())
    assert all(0 <= v <= 1 for v in agree.values())


def test_resume_keeps_the_best_heads_of_the_checkpointed_part(world, tmp_path):
    kw = {**OVERSHOOT, "select": "ce", "save_every": 3}
    whole = tune(world["norm"], tmp_path / "whole", cfg(world, **kw))
    tune(world["norm"], tmp_path / "part", cfg(world, **{**kw, "steps": 3}))
    resumed = tune(world["norm"], tmp_path / "part", cfg(world, **{**kw, "resume": True}))
    assert resumed["selected"] == whole["selected"]
    a, b = heads(tmp_path / "part"), heads(tmp_path / "whole")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_default_recipe_distills_unless_hidden_states_are_cached(world, tmp_path):
    """The default of `tune` is the best measured recipe (benchmarks/recipes.py): distillation
    from the final layer (alpha 1), which needs the full trunk; a --cache-hidden run (which never
    computes the final layer) falls back to the LM loss."""
    from eetune.train.tune import resolve_defaults
    assert resolve_defaults(TuneConfig()).distill == 1.0
    assert resolve_defaults(TuneConfig(cache_hidden="x")).distill == 0.0
    assert resolve_defaults(TuneConfig(distill=0.25)).distill == 0.25
    s = tune(world["norm"], tmp_path / "d", cfg(world, steps=2, distill=None))
    assert s["settings"]["distill"] == 1.0 and s["trunk_layers_held"] == 4
    s = tune(world["norm"], tmp_path / "c", cfg(world, steps=2, distill=None, cache_hidden=str(tmp_path / "hc")))
    assert s["settings"]["distill"] == 0.0


# --- two "nodes" through torchrun's own rendezvous (issue 11) -----------------------------------
@pytest.mark.parametrize("mode", ["ddp"])
def test_two_nodes_through_c10d_rendezvous_match_one_process(world, tmp_path, mode):
    """Two torchrun launchers (--nnodes 2, one process each) meet at a c10d rendezvous on
    localhost, as two machines would; the heads equal one process's with the same global batch."""
    import socket

    one = tmp_path / "one"
    tune(world["mlp"], one, cfg(world, steps=6, batch_size=4))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", f"eetune-{mode}",
              "-m", "eetune.cli", "tune", str(world["mlp"]), "--data", str(world["docs"]), "--seq-len", "32",
              "--batch-size", "2", "--lr", "1e-2", "--steps", "6", "--distill", "0", "--no-progress",
              "--out", str(two)] + (["--fsdp"] if mode == "fsdp" else [])
    nodes = [subprocess.Popen(launch, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [n.communicate(timeout=300)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(e[-2000:] for e in errs)
    a, b = heads(one), heads(two)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    summary = json.loads((two / "exit_config.json").read_text())["training"]
    assert summary["world_size"] == 2 and summary["fsdp"] == (mode == "fsdp")


# --- the loop's named steps compose to `tune` ------------------------------------------------
def test_named_steps_compose_to_tune(world, tmp_path):
    """`tune` is the recipe of its named steps: driving them by hand (set-up, three train steps,
    a validation, finish) gives bit-identical heads and the same logged losses."""
    from eetune.train import tune as T

    c = cfg(world, steps=3, val_blocks=2, select="last")
    ref = tune(world["mlp"], tmp_path / "ref", c)

    out = tmp_path / "manual"
    c2, exit_config, train_dir = T._check_run(world["mlp"], out, c)
    model = T._load_for_tuning(world["mlp"], exit_config, c2, None, torch.device("cpu"), 0)
    run = T._setup(model, world["mlp"], out, train_dir, exit_config, c2, 1, 0, torch.device("cpu"),
                   caller_backbone=False)
    assert run.total_steps == 3 and run.step == 0 and run.trunk_layers_held == 3  # layer 4 released
    T._seed(run)
    rows = [T.train_step(run) for _ in range(3)]
    assert [r["step"] for r in rows] == [1, 2, 3] and run.tokens_seen == 3 * 4 * 32
    assert all(math.isfinite(r["loss"]) for r in rows)
    summary = T._finish(run)
    assert summary["train_loss"] == ref["train_loss"] and summary["val_loss"] == ref["val_loss"]
    a, b = heads(tmp_path / "ref"), heads(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the chunked exit loss in the loop (eetune.train.losses) ----------------------------------------
@pytest.mark.parametrize("kw", [dict(distill=0.0), dict(distill=1.0), dict(distill=0.5, dynamic_weights=True),
                                dict(distill=1.0, dtype="bf16")])
def test_chunked_losses_tune_like_whole_logits(world, tmp_path, kw):
    """Small chunks (7 tokens) against whole logits (--loss-chunk 0): the same training, heads
    within float tolerance (bf16: within bf16 tolerance), validation alike."""
    whole = tune(world["mlp"], tmp_path / "whole", cfg(world, steps=4, val_blocks=2, loss_chunk=0, **kw))
    chunked = tune(world["mlp"], tmp_path / "chunked", cfg(world, steps=4, val_blocks=2, loss_chunk=7, **kw))
    a, b = heads(tmp_path / "whole"), heads(tmp_path / "chunked")
    tol = 2e-2 if kw.get("dtype") == "bf16" else 1e-4
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= tol * max(1.0, a[k].abs().max().item()), k
    for k, v in whole["val_loss"].items():
        assert abs(chunked["val_loss"][k] - v) <= (2e-2 if kw.get("dtype") == "bf16" else 1e-4) * v
    if kw.get("dtype") != "bf16":
        assert chunked["val_agreement"] == whole["val_agreement"]


# --- train/eval mode of heads with dropout (GPT-2 keeping its default dropout) ---------------------
@pytest.fixture(scope="module")
def gpt2_world(tmp_path_factory):
    """A tiny GPT-2 with dropout 0.1 (conftest.tiny_gpt2_with_dropout) saved with a tokenizer, the
    documents, and `layer` exits after layers 1 and 3 (each a copy of a GPT-2 block: dropout)."""
    from conftest import tiny_gpt2_with_dropout
    from tune_helpers import make_docs, make_tokenizer

    root = tmp_path_factory.mktemp("gpt2")
    model_dir = root / "tiny-gpt2-dropout"
    tiny_gpt2_with_dropout().save_pretrained(model_dir)
    make_tokenizer(model_dir)
    exits = root / "exits-layer"
    EarlyExitModel.convert(load_backbone(str(model_dir)), (1, 3), arch="layer").save_pretrained(exits)
    return {"model": model_dir, "docs": make_docs(root / "docs"), "layer": exits}


def gpt2_cfg(world, **kw):
    base = dict(data=str(world["docs"]), seq_len=32, batch_size=4, lr=1e-2, distill=0.0, progress=False,
                val_blocks=2, select="last")
    return TuneConfig(**{**base, **kw})


class StopAt(dict):
    """What `_stop_on_interrupt` returns, asking to stop (as a Ctrl-C would) after step `n`: the
    loop reads stop["asked"] once per step."""

    def __init__(self, n):
        super().__init__(asked=False, restore=lambda: None)
        self.n, self.reads = n, 0

    def __getitem__(self, key):
        if key == "asked":
            self.reads += 1
            return self.reads >= self.n
        return super().__getitem__(key)


def test_training_steps_run_the_heads_in_train_mode_and_validation_in_eval_mode(gpt2_world, tmp_path):
    """Regression: the heads' mode was left to chance (a loaded `layer` exit's block in eval mode,
    `validate` switching everything to train mode after it), so dropout came on only after the
    first validation. Every step now runs the heads in train mode, validation in eval mode with
    the previous mode put back; the backbone stays in eval mode throughout."""
    from eetune.train import tune as T

    out = tmp_path / "out"
    c, exit_config, train_dir = T._check_run(gpt2_world["layer"], out, gpt2_cfg(gpt2_world, steps=3))
    model = T._load_for_tuning(gpt2_world["layer"], exit_config, c, None, torch.device("cpu"), 0)
    heads_seen, trunk_seen = [], []
    head_drops = [m for m in model.heads.modules() if isinstance(m, torch.nn.Dropout)]
    assert head_drops and all(m.p == 0.1 for m in head_drops)
    for m in head_drops:
        m.register_forward_hook(lambda mod, a, o: heads_seen.append(mod.training))
    for m in model.backbone.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.register_forward_hook(lambda mod, a, o: trunk_seen.append(mod.training))
    run = T._setup(model, gpt2_world["layer"], out, train_dir, exit_config, c, 1, 0, torch.device("cpu"),
                   caller_backbone=False)
    T._seed(run)
    T.train_step(run)
    assert heads_seen and all(heads_seen), "the first step ran the heads without dropout"
    heads_seen.clear()
    T.validate(run)
    assert heads_seen and not any(heads_seen), "validation ran the heads with dropout"
    assert all(m.training for m in model.heads.modules())  # put back as it was
    model.heads.eval()  # whatever a caller did in between, a step trains in train mode
    heads_seen.clear()
    T.train_step(run)
    assert heads_seen and all(heads_seen)
    assert trunk_seen and not any(trunk_seen) and not model.backbone.model.training


def test_gpt2_dropout_heads_resume_like_an_uninterrupted_run(gpt2_world, tmp_path, monkeypatch, capsys):
    """Regression: a GPT-2 run resumed from a checkpoint differed (by 0.021) from an uninterrupted
    one, since a validation switched the heads' dropout on and a resumed process started with it
    off. Now validations do not change the training (the same heads with and without them), and
    a run stopped after step 3 and resumed equals the uninterrupted one bit for bit."""
    import eetune.train.tune as tune_mod
    from eetune.errors import Interrupted

    layer = gpt2_world["layer"]
    quiet = tmp_path / "quiet"
    tune(layer, quiet, gpt2_cfg(gpt2_world, steps=6))
    validated = tmp_path / "validated"
    tune(layer, validated, gpt2_cfg(gpt2_world, steps=6, eval_every=2))
    a, b, start = heads(quiet), heads(validated), heads(layer)
    assert all(torch.equal(a[k], b[k]) for k in a), "a validation changed the following training steps"
    assert any(not torch.equal(a[k], start[k]) for k in a)

    resumed = tmp_path / "resumed"
    with monkeypatch.context() as m:
        m.setattr(tune_mod, "_stop_on_interrupt", lambda world: StopAt(3))
        with pytest.raises(Interrupted, match="after step 3 of 6"):
            tune(layer, resumed, gpt2_cfg(gpt2_world, steps=6, eval_every=2))
    capsys.readouterr()
    tune(layer, resumed, gpt2_cfg(gpt2_world, steps=6, eval_every=2, resume=True))
    assert "note: --resume" not in capsys.readouterr().err  # the same length: nothing to say
    r = heads(resumed)
    assert r.keys() == b.keys() and all(torch.equal(r[k], b[k]) for k in r), \
        max((r[k] - b[k]).abs().max().item() for k in r)


# --- --resume with another --steps: accepted, and said what happens to the schedule -----------
def test_resume_with_more_steps_says_how_the_schedule_changes(world, tmp_path, capsys):
    """Regression: a changed --steps on --resume was accepted silently, although the learning-rate
    schedule is a function of it. It is still accepted (extending a run is the common wish), with
    one line saying so and what the rate does; the summary records it."""
    out = tmp_path / "out"
    args = ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(out), *BASE, "--save-every", "1",
            "--warmup", "1"]
    assert main([*args, "--steps", "2"]) == 0
    capsys.readouterr()
    assert main([*args, "--steps", "4", "--resume"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "note: --resume" in line]
    assert len(notes) == 1, notes
    c = TuneConfig(lr=1e-2, warmup=1)
    new_lr, old_lr = lr_at(2, 4, c), lr_at(1, 2, c)
    assert (f"--resume with 4 steps in all where the checkpointed run had 2: continuing from step 2" in notes[0]
            and "that of a 4-step run" in notes[0] and f"{new_lr:.3g} at step 3" in notes[0]
            and f"had ended at {old_lr:.3g}" in notes[0]), notes[0]
    rows = list(csv.DictReader(open(tmp_path / "out.train" / "log.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([lr_at(0, 2, c), lr_at(1, 2, c), lr_at(2, 4, c),
                                                            lr_at(3, 4, c)])
    summary = json.loads((out / "exit_config.json").read_text())["training"]
    assert summary["steps"] == 4
    assert summary["schedule_changes"] == [{"step": 2, "total_steps_before": 2, "total_steps": 4}]


# --- --seq-len beyond the model's context: refused before anything loads ----------------------
def test_seq_len_beyond_the_model_context_is_refused_up_front(world, gpt2_world, tmp_path, capsys, monkeypatch):
    """Regression: --seq-len past the model's context (max_position_embeddings / n_positions) was
    accepted and ran out of memory after 46 s. Now one line, before any weights load."""
    import eetune.train.tune as tune_mod

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(tune_mod, "_load_in_turns", no_loading)
    monkeypatch.setattr(EarlyExitModel, "from_pretrained", no_loading)
    before = sorted(p.name for p in tmp_path.iterdir())
    err = _bad(capsys, ["tune", str(world["norm"]), "--data", str(world["docs"]), "--out", str(tmp_path / "out"),
                        *BASE, "--steps", "1", "--seq-len", "257"], "--seq-len 257 is longer than the context of")
    assert "(256 tokens, its max_position_embeddings): give --seq-len 256 or less" in err
    _nothing_written(tmp_path, *before)
    # GPT-2's field, a backbone passed in, and --gates-only alike
    with pytest.raises(EETuneError, match=r"\(256 tokens, its n_positions\): give --seq-len 256 or less"):
        tune(gpt2_world["layer"], tmp_path / "a", gpt2_cfg(gpt2_world, steps=1, seq_len=300),
             backbone=load_backbone(str(gpt2_world["model"])))
    with pytest.raises(EETuneError, match="--seq-len 1024 is longer than the context"):
        tune(world["norm"], tmp_path / "b", TuneConfig(data=str(world["docs"]), seq_len=1024, gates_only=True,
                                                       progress=False))
    _nothing_written(tmp_path, *before)


# --- progress away from a terminal: status lines with an ETA -------------------------------------
def test_status_lines_with_an_eta_when_stderr_is_not_a_terminal(world, tmp_path, capsys, monkeypatch):
    """Regression: away from a terminal (a log, a pipe) `tune` printed nothing for minutes (gate
    fitting on 16k tokens: ~10 minutes). Now a status line every ~30 s (here every step) for the
    training and the gate fitting, with step/total, loss, tokens/s and an ETA."""
    monkeypatch.setenv("EETUNE_PROGRESS_INTERVAL", "0")
    # what the CLI runs when stderr is not a terminal (its progress bar is off)
    assert main(["tune", str(world["mlp"]), "--data", str(world["docs"]), "--out", str(tmp_path / "out"),
                 "--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", "--distill", "0", "--steps", "3",
                 "--gates", "--gate-tokens", "96"]) == 0
    err = capsys.readouterr().err.splitlines()
    steps = [line for line in err if line.startswith("tune: step ")]
    assert [line.split(",")[0] for line in steps] == ["tune: step 1/3 (33%)", "tune: step 2/3 (67%)",
                                                      "tune: step 3/3 (100%)"], err
    for line in steps:
        assert "loss 1:" in line and " 3:" in line and " tok/s" in line and "elapsed " in line and "ETA " in line, line
    assert "ETA 0s" in steps[-1]
    gates = [line for line in err if line.startswith("gate features: batch ")]
    assert gates and all("tok/s" in line and "ETA " in line for line in gates), err
    assert any(line.startswith("gate fit: exit 2/2") for line in err) and any(
        line.startswith("gate report: batch") for line in err)
    # on a terminal: the progress bar, no status lines
    monkeypatch.setattr("eetune.progress._is_terminal", lambda stream: True)
    tune(world["norm"], tmp_path / "tty", cfg(world, steps=2, progress=True))
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("tune: step")]


def test_status_lines_every_interval_with_the_eta_of_the_steps_so_far(monkeypatch, capsys):
    from eetune import progress as T

    now = [100.0]
    lines = T.StatusLines(10, "tune", "step", interval=30.0, initial=2, clock=lambda: now[0])  # resumed at step 2
    lines.set_postfix({"loss": "1:2.500", "tok/s": "1,234"})
    now[0] = 110.0
    lines.update()  # 10 s: too soon
    assert capsys.readouterr().err == ""
    now[0] = 131.0
    lines.update()  # step 4, 31 s for 2 steps: 6 left take 93 s
    assert capsys.readouterr().err == ("tune: step 4/10 (40%), loss 1:2.500, 1,234 tok/s, elapsed 31s, "
                                       "ETA 1m33s\n")
    now[0] = 140.0
    lines.update()
    lines.close()  # a last line once any was printed
    assert capsys.readouterr().err.endswith("step 5/10 (50%), loss 1:2.500, 1,234 tok/s, elapsed 40s, stopped\n")
    monkeypatch.setenv("EETUNE_PROGRESS_INTERVAL", "off")
    assert T.progress_interval() is None
    monkeypatch.setenv("EETUNE_PROGRESS_INTERVAL", "soon")
    with pytest.raises(EETuneError, match="EETUNE_PROGRESS_INTERVAL"):
        T.progress_interval()

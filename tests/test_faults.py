"""Faults: interrupted and concurrent tuning (issue 11). What the user sees, what is on disk."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from eetune import fsio
from eetune.errors import EETuneError
from eetune.train.tune import TuneConfig, tune

from tune_helpers import ENV, make_world, one_thread  # noqa: F401 (autouse fixture)
from tune_helpers import head_tensors as heads

ARGS = ["--seq-len", "32", "--batch-size", "4", "--lr", "1e-2", "--no-progress"]
DEAD_PID = 2 ** 22 + 12345  # above the default pid_max: no such process


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("faults"))


def cfg(world, **kw):
    return TuneConfig(**{**dict(data=str(world["docs"]), seq_len=32, batch_size=4, lr=1e-2, progress=False), **kw})


def test_ctrl_c_writes_a_checkpoint_and_says_how_to_resume(world, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "eetune.cli", "tune", str(world["mlp"]), "--data", str(world["docs"]), *ARGS,
           "--decay", "constant", "--steps", "3000", "--out", str(out)]  # constant: lr independent of --steps
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out.train" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > 3:  # a few steps done
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert "stopped after step" in line and "--resume" in line
    latest = json.loads((tmp_path / "out.train" / "checkpoints" / "latest.json").read_text())
    assert 3 <= latest["step"] < 3000 and not out.exists()
    assert not list(tmp_path.glob(".*.lock"))  # locks released
    # resuming to a few more steps equals an uninterrupted run of that length (in this process: the
    # interrupted run was the command line's, the resume need not pay its imports again)
    from eetune.cli import main
    steps = latest["step"] + 2
    assert main([*cmd[3:-4], "--steps", str(steps), "--out", str(out), "--resume"]) == 0
    ref = tune(world["mlp"], tmp_path / "ref", cfg(world, steps=steps, decay="constant"))
    a, b = heads(out), heads(tmp_path / "ref")
    assert ref["steps"] == steps and all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_tune_into_a_held_directory_is_refused(world, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "out"
        (tmp_path / ".out.lock").write_text(f"{holder.pid}\n")
        with pytest.raises(EETuneError, match=rf"in use by another eetune process \(pid {holder.pid}"):
            tune(world["norm"], out, cfg(world, steps=1))
        (tmp_path / ".out.lock").unlink()
        (tmp_path / ".out.train.lock").write_text(f"{holder.pid}\n")  # the training directory, too
        with pytest.raises(EETuneError, match="training directory"):
            tune(world["norm"], out, cfg(world, steps=1))
        assert not out.exists() and (tmp_path / ".out.train.lock").read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(world, tmp_path, capsys):
    (tmp_path / ".out.lock").write_text(f"{DEAD_PID}\n")
    tune(world["norm"], tmp_path / "out", cfg(world, steps=1))
    assert "taking over the stale lock" in capsys.readouterr().err
    assert (tmp_path / "out" / "exit_config.json").is_file() and not list(tmp_path.glob(".*.lock"))


def test_pid_lock_is_exclusive_and_released(tmp_path):
    lock = fsio.PidLock(tmp_path / "x.lock", "thing", "wait").acquire()
    assert (tmp_path / "x.lock").read_text().strip() == str(os.getpid())
    lock.release()
    assert not (tmp_path / "x.lock").exists()


# --- corrupt or foreign files: one line naming the file and the problem, exit code 2 -------------
def _flip_data(d):
    p = d / "exit_heads.safetensors"
    b = bytearray(p.read_bytes())
    b[-100] ^= 0xFF  # inside the last tensor's bytes
    p.write_bytes(bytes(b))


def _flip_header(d):
    p = d / "exit_heads.safetensors"
    b = bytearray(p.read_bytes())
    b[20] ^= 0x5A
    p.write_bytes(bytes(b))


def _edit_tensors(fn):
    def edit(d):
        from safetensors.torch import load_file, save_file
        t = load_file(str(d / "exit_heads.safetensors"))
        fn(t)
        save_file(t, str(d / "exit_heads.safetensors"))
    return edit


def _edit_config(fn):
    def edit(d):
        c = json.loads((d / "exit_config.json").read_text())
        fn(c)
        (d / "exit_config.json").write_text(json.dumps(c))
    return edit


def _first(t):
    return next(iter(t))


CORRUPT = {
    "truncated heads": (lambda d: (d / "exit_heads.safetensors").write_bytes(
        (d / "exit_heads.safetensors").read_bytes()[:300]), "unreadable"),
    "empty heads": (lambda d: (d / "exit_heads.safetensors").write_bytes(b""), "unreadable"),
    "bit flip in the data": (_flip_data, "checksum"),
    "bit flip in the header": (_flip_header, "unreadable"),
    "config not JSON": (lambda d: (d / "exit_config.json").write_text("{not json"), "not valid JSON"),
    "config a JSON list": (lambda d: (d / "exit_config.json").write_text("[1, 2]"), "not an object"),
    "config field of the wrong type": (_edit_config(lambda c: c.update(exit_layers="ten")), "wrong type"),
    "config field missing": (_edit_config(lambda c: c.pop("num_layers")), "missing required fields"),
    "exit layer beyond the model": (_edit_config(lambda c: c.update(exit_layers=[1, 99])), "beyond the model"),
    "exits of another backbone": (_edit_config(lambda c: c.update(backbone_fingerprint="sha256:" + "0" * 32)),
                                  "do not match the exits"),
    "head shape of another backbone": (_edit_tensors(lambda t: t.update({_first(t): t[_first(t)][..., :-1].clone()})),
                                       "has shape"),
    "a tensor missing": (_edit_tensors(lambda t: t.pop(_first(t))), "does not match its config"),
    "a foreign tensor": (_edit_tensors(lambda t: t.update(evil=torch.zeros(2))), "does not match its config"),
    "NaN in the heads": (_edit_tensors(lambda t: t[_first(t)].fill_(float("nan"))), "NaN"),
    "pickle instead of safetensors": (lambda d: ((d / "exit_heads.safetensors").unlink(),
                                                 (d / "exit_heads.bin").write_bytes(b"\x80\x04junk")),
                                      "no exit_heads.safetensors"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_exits_directory_is_one_line_with_code_2(world, tmp_path, capsys, case):
    import shutil

    from eetune.cli import main

    d = tmp_path / "exits"
    shutil.copytree(world["mlp"], d)
    damage, words = CORRUPT[case]
    damage(d)
    assert main(["info", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:") and words in err, err
    assert "Traceback" not in err


def test_corrupt_token_cache_is_rebuilt(world, tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from eetune.train import data

    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "cache"))
    tok = AutoTokenizer.from_pretrained(world["model"])
    first = data.tokenize_documents(str(world["docs"]), tok)
    (entry,) = (tmp_path / "cache" / "tokens").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:50])  # torn
    again = data.tokenize_documents(str(world["docs"]), tok)
    assert "unreadable" in capsys.readouterr().err
    assert [d.tolist() for d in again] == [d.tolist() for d in first]


def test_a_closed_pipe_is_not_a_traceback(world):
    """`eetune info DIR | head -1`: the reader leaves early; no traceback, status 0."""
    proc = subprocess.Popen([sys.executable, "-m", "eetune.cli", "info", str(world["mlp"])], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the process has written anything (it is still importing)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_debug_shows_the_traceback_behind_a_one_line_error(tmp_path, capsys):
    from eetune.cli import main

    assert main(["info", str(tmp_path / "nowhere")]) == 2
    plain = capsys.readouterr().err
    assert len(plain.strip().splitlines()) == 1 and "Traceback" not in plain
    assert main(["--debug", "info", str(tmp_path / "nowhere")]) == 2
    debug = capsys.readouterr().err
    assert "Traceback" in debug and debug.strip().splitlines()[-1] == plain.strip()


# --- SIGKILL at many random points, checkpoint writes included ----------------------------------
KILL_SEEDS = (0, 1)
KILLS_PER_SEED = 7  # 14 kill points in all


def _last_logged_step(log) -> int:
    try:
        last = log.read_text().splitlines()[-1].split(",")[0]
    except (OSError, IndexError):
        return 0
    return int(last) if last.isdigit() else 0


@pytest.mark.parametrize("seed", KILL_SEEDS)
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(world, tmp_path, seed):
    """Kill a run again and again at random moments (it checkpoints every 3 steps, so many kills
    land inside a checkpoint write); after each kill the latest checkpoint is whole, and the
    resumed run ends with the heads of a run never interrupted, its summary counts every step
    once, and its log has one row per step, none repeated.

    The runs are children of a server that imported eetune once (tests/forked.py): a
    `python -m eetune.cli` spends ~10 s importing on a 2-core machine, so kills timed from its
    start all landed in its imports. Most kills come a random number of steps (1-24) past the
    checkpoint the run resumed from, a random few milliseconds after that step's log row (inside
    the checkpoint write that follows every third step, or the next steps): kill points counted in
    steps, whatever the speed of the machine; one kill in four comes at a random moment of the
    run's start-up (lock, load, resume)."""
    import random

    from safetensors.torch import load_file

    import forked
    from eetune.cli import main
    from eetune.train.tune import latest_checkpoint

    rng = random.Random(seed)
    steps = 300
    out, train = tmp_path / "out", tmp_path / "out.train"
    log = train / "log.csv"
    cmd = ["tune", str(world["norm"]), "--data", str(world["docs"]), *ARGS, "--distill", "0", "--seed", str(seed),
           "--steps", str(steps), "--save-every", "3", "--out", str(out)]
    ctx = forked.context()
    kills, in_training, checkpoints = 0, 0, set()
    for _ in range(KILLS_PER_SEED):
        ck = latest_checkpoint(train)
        resume = ["--resume"] if ck is not None else []
        # the resumed run logs again from its checkpoint: it has trained once it logs past both
        from_step = max(int(ck.name.split("-")[1]) if ck is not None else 0, _last_logged_step(log))
        proc = ctx.Process(target=forked.cli_quietly, args=(cmd + resume,))
        proc.start()
        training = rng.random() >= 0.25
        if training:  # once a random number of steps are logged, a random moment of the next few
            target, deadline = from_step + rng.randint(1, 24), time.time() + 120
            while proc.is_alive() and _last_logged_step(log) < target and time.time() < deadline:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.03))  # the checkpoint written after a step divisible by 3, or steps
        else:  # a random moment of start-up: imports done, taking the lock, loading, resuming
            time.sleep(rng.uniform(0.0, 0.5))
        if not proc.is_alive():
            break  # it finished first: no kill point
        proc.kill()  # SIGKILL
        proc.join()
        kills += 1
        in_training += training and _last_logged_step(log) > from_step
        ck = latest_checkpoint(train)
        if ck is not None:  # the last complete checkpoint is whole and readable
            state = json.loads((ck / "state.json").read_text())
            assert state["step"] % 3 == 0 and load_file(str(ck / "heads.safetensors"))
            checkpoints.add(state["step"])
        assert not out.exists()
    print(f"seed {seed}: {kills} kills, {in_training} while training, checkpoints {sorted(checkpoints)}")
    assert kills >= 3, "the run finished before it could be killed often enough"
    assert in_training >= 3, "the kills did not land in training often enough"
    resume = ["--resume"] if latest_checkpoint(train) is not None else []
    assert main(cmd + resume) == 0
    ref = tmp_path / "ref"
    tune(world["norm"], ref, cfg(world, steps=steps, distill=0.0, seed=seed))
    a, b = heads(out), heads(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((out / "exit_config.json").read_text())["training"]
    assert summary["steps"] == steps and summary["tokens"] == steps * 4 * 32
    log = (train / "log.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in log[1:]] == list(range(1, steps + 1))  # one row per step, no repeats
    leftovers = [p.name for p in (train / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # a killed writer's staging directory or temporary file is cleaned by the next write


LATEST_TMP = re.compile(r"^\.latest\.json\.tmp-\d+-")  # what atomic_write names latest.json's next copy


def test_a_writer_killed_inside_an_atomic_write_leaves_nothing_once_the_file_is_written_again(tmp_path):
    import forked

    path = tmp_path / "latest.json"
    fsio.atomic_write_json(path, {"step": 3})
    assert forked.run(forked.killed_inside_atomic_write, str(path)) == -signal.SIGKILL
    assert json.loads(path.read_text()) == {"step": 3}  # the old content is whole
    assert [p.name for p in tmp_path.iterdir() if LATEST_TMP.match(p.name)]  # the killed writer's copy
    fsio.atomic_write_json(path, {"step": 6})  # the next checkpoint's write of the same file
    assert json.loads(path.read_text()) == {"step": 6}
    assert [p.name for p in tmp_path.iterdir()] == ["latest.json"]  # the killed writer's copy is gone


# --- resources ------------------------------------------------------------------------------------
def test_out_of_memory_suggests_grad_accum(world, tmp_path, monkeypatch):
    import eetune.train.losses as losses_mod

    calls = {"n": 0}
    real = losses_mod.chunked_exit_loss  # the default path (--loss-chunk 256)

    def oom(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:  # two steps of two exits go through
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)

    monkeypatch.setattr(losses_mod, "chunked_exit_loss", oom)
    with pytest.raises(EETuneError) as e:
        tune(world["norm"], tmp_path / "out", cfg(world, steps=5, batch_size=4, save_every=1, distill=0.0))
    msg = str(e.value)
    assert "out of memory at step 3" in msg and "--batch-size 2 --grad-accum 2" in msg and "step-0000002" in msg
    assert "\n" not in msg and not (tmp_path / "out").exists()


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(world, tmp_path, monkeypatch):
    import errno

    import eetune.train.tune as tune_mod
    from eetune.train.tune import latest_checkpoint

    real = tune_mod.save_file
    calls = {"n": 0}

    def full(tensors, path, *a, **k):
        if "optimizer" in str(path):
            calls["n"] += 1
            if calls["n"] == 3:  # the third checkpoint's second file
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(tune_mod, "save_file", full)
    with pytest.raises(EETuneError) as e:
        tune(world["norm"], tmp_path / "out", cfg(world, steps=5, save_every=1, distill=0.0))
    assert "no space left" in str(e.value) and "step-0000002 is intact" in str(e.value)
    ck = latest_checkpoint(tmp_path / "out.train")
    assert ck.name == "step-0000002" and (ck / "optimizer.safetensors").is_file()
    assert not [p for p in (tmp_path / "out.train" / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_tokenizer_bigger_than_the_models_vocabulary_is_refused(world, tmp_path, capsys):
    import shutil

    from conftest import word_tokenizer
    from eetune.cli import main

    model = tmp_path / "model"
    shutil.copytree(world["model"], model)
    word_tokenizer(vocab_size=150).save_pretrained(model)  # ids up to 149; the model has 97 rows
    assert main(["convert", "--model", str(model), "--exits", "1,3", "--arch", "norm", "--out",
                 str(tmp_path / "exits")]) == 0
    capsys.readouterr()
    assert main(["tune", str(tmp_path / "exits"), "--data", str(world["docs"]), "--out", str(tmp_path / "t"),
                 *ARGS, "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "150 tokens" in err and "vocabulary has 97" in err
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("damage", ["meta", "states"])
def test_a_damaged_hidden_cache_is_one_line(world, tmp_path, capsys, damage):
    from eetune.cli import main

    hc = tmp_path / "hc"
    args = ["tune", str(world["norm"]), "--data", str(world["docs"]), *ARGS, "--steps", "1", "--cache-hidden", str(hc)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    if damage == "meta":
        (hc / "meta.json").write_text("{torn")
    else:
        (hc / "h1.bin").write_bytes((hc / "h1.bin").read_bytes()[:100])
    assert main([*args, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is damaged" in err and str(hc) in err


# --- untrusted input --------------------------------------------------------------------------------
def test_pickled_model_weights_are_refused_unless_allowed(tmp_path, capsys):
    from conftest import tiny_model
    from eetune.cli import main

    model = tmp_path / "pickled"
    tiny_model("llama").save_pretrained(model)
    from safetensors.torch import load_file
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")  # a pickle
    (model / "model.safetensors").unlink()
    capsys.readouterr()
    assert main(["convert", "--model", str(model), "--exits", "1,3", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pickled weights" in err and "--allow-pickle" in err
    assert not (tmp_path / "a").exists()
    assert main(["convert", "--model", str(model), "--exits", "1,3", "--out", str(tmp_path / "b"),
                 "--allow-pickle"]) == 0


# --- a full disk or a forbidden path outside checkpoints: one line, nothing lost ---------------
def test_disk_full_writing_an_exits_directory_keeps_the_old_one(world, tmp_path, monkeypatch, capsys):
    import errno

    import eetune.model.early_exit as model_mod
    from eetune.cli import main

    out = tmp_path / "exits"
    assert main(["convert", "--model", str(world["model"]), "--exits", "1,3", "--arch", "norm", "--out",
                 str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()

    def full(tensors, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(model_mod, "save_file", full)
    code = main(["convert", "--model", str(world["model"]), "--exits", "2", "--arch", "mlp", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no space left on the device" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exits"]  # no staging debris


def test_disk_full_storing_the_exit_profile_keeps_the_old_config(world, tmp_path, monkeypatch, capsys):
    import errno
    import shutil

    import eetune.fsio as fsio
    from eetune.cli import main

    exits = tmp_path / "exits"
    shutil.copytree(world["norm"], exits)
    before = (exits / "exit_config.json").read_bytes()

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(fsio, "fsync_file", full)
    code = main(["evaluate", str(exits), "--data", str(world["docs"]), "--seq-len", "16", "--max-blocks", "2",
                 "--no-plot"])
    err = capsys.readouterr().err
    assert code == 2 and "no space left" in err and len(err.strip().splitlines()) == 1
    assert (exits / "exit_config.json").read_bytes() == before
    assert not [p for p in exits.iterdir() if p.name.startswith(".")]


def test_a_path_we_may_not_write_is_one_line(world, tmp_path, monkeypatch, capsys):
    import errno

    import eetune.fsio as fsio
    from eetune.cli import main

    def denied(path):  # what a folder of another user gives (this suite may run as root, who writes anywhere)
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(fsio, "staging_dir", denied)
    code = main(["convert", "--model", str(world["model"]), "--exits", "1", "--arch", "norm", "--out",
                 str(tmp_path / "exits")])
    err = capsys.readouterr().err
    assert code == 2 and "permission denied" in err and str(tmp_path / "exits") in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "exits").exists()

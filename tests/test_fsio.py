"""Crash-safe writes (eetune.fsio) and their use by the exits directory and checkpoints."""

import os
import stat

import pytest
import torch

from eetune import fsio
from eetune.model.early_exit import EarlyExitModel, write_exits_dir

from conftest import tiny_backbone

DEAD_PID = 2 ** 22 + 12345  # above the default pid_max: no such process


def test_atomic_write_keeps_mode_and_leaves_nothing_on_failure(tmp_path):
    p = tmp_path / "a.json"
    fsio.atomic_write_json(p, {"x": 1})
    assert p.read_text() == '{\n  "x": 1\n}\n'
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~fsio._umask()  # not mkstemp's 0600
    os.chmod(p, 0o640)
    fsio.atomic_write_text(p, "new")
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o640

    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fsio.atomic_write(p, boom)
    assert p.read_text() == "new" and sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]
    with pytest.raises(ValueError):
        fsio.atomic_write_json(p, {"x": float("nan")})  # not JSON
    assert p.read_text() == "new"


def test_replace_dir_swaps_without_a_gap(tmp_path, monkeypatch):
    """Regression (issue 11): replacing took two renames, with a moment in which the name
    held no directory, and a crash between them left `.old-PID` debris."""
    target = tmp_path / "exits"
    target.mkdir()
    (target / "f").write_text("old")
    new = fsio.staging_dir(target)
    (new / "f").write_text("new")
    renames = []
    real = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: renames.append((a, b)) or real(a, b))
    fsio.replace_dir(new, target)
    assert (target / "f").read_text() == "new"
    assert renames == []  # one atomic exchange, no rename pair
    assert sorted(x.name for x in tmp_path.iterdir()) == ["exits"]


def test_stale_leftovers_of_dead_writers_are_cleaned(tmp_path):
    target = tmp_path / "exits"
    for name in (f".exits.tmp-{DEAD_PID}-abc", f".exits.old-{DEAD_PID}", f".exits.tmp-{os.getpid()}-mine",
                 ".other.tmp-1-x"):
        (tmp_path / name).mkdir()
    removed = fsio.clean_stale(target)
    assert sorted(p.name for p in removed) == [f".exits.old-{DEAD_PID}", f".exits.tmp-{DEAD_PID}-abc"]
    assert sorted(x.name for x in tmp_path.iterdir()) == [f".exits.tmp-{os.getpid()}-mine", ".other.tmp-1-x"]


def test_exits_dir_write_cleans_a_crashed_write_and_replaces_atomically(tmp_path):
    model = EarlyExitModel.convert(tiny_backbone("llama"), exit_layers=(1, 3), arch="norm")
    out = tmp_path / "exits"
    model.save_pretrained(out)
    (tmp_path / f".exits.tmp-{DEAD_PID}-zz").mkdir()  # what a killed writer leaves
    (tmp_path / f".exits.old-{DEAD_PID}").mkdir()
    state = {k: torch.zeros_like(v) for k, v in model.heads.state_dict().items()}
    write_exits_dir(out, model.config, state)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["exits"]
    again = EarlyExitModel.from_pretrained(out, backbone=model.backbone)
    assert all(torch.count_nonzero(v) == 0 for v in again.heads.state_dict().values())


def test_checkpoint_write_cleans_a_killed_runs_half_written_checkpoint(tmp_path):
    from eetune.train.tune import latest_checkpoint, save_checkpoint

    root = tmp_path / "train" / "checkpoints"
    root.mkdir(parents=True)
    half = root / f".step-0000002.tmp-{DEAD_PID}-q"
    half.mkdir()
    (half / "heads.safetensors").write_bytes(b"torn")
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p])
    save_checkpoint(tmp_path / "train", 2, [("w", p)], opt, {"step": 2}, rank=0)
    assert not half.exists() and latest_checkpoint(tmp_path / "train").name == "step-0000002"

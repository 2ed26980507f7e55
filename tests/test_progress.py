"""Progress of the long verbs away from a terminal (eetune.progress): `eval`, `evaluate`, `calibrate`,
`scan`, the exit-vocabulary ranking of `convert` and generated data (`generated:N`) print status lines
when stderr is a log or a pipe, and nothing with --no-progress; StatusLines with an unknown total."""

import pytest

from conftest import make_peaky_exits
from eetune.cli import main
from eetune.progress import StatusLines, progress_display

from tune_helpers import one_thread  # noqa: F401


@pytest.fixture(scope="module")
def exits(tmp_path_factory):
    return make_peaky_exits(tmp_path_factory.mktemp("progress"))


@pytest.fixture
def every_step(monkeypatch):
    """A status line after every step (capsys: stderr is not a terminal)."""
    monkeypatch.setenv("EETUNE_PROGRESS_INTERVAL", "0")


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "cache"))


def _lines(err: str, prefix: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(prefix)]


EVAL = ["--tasks", "boolq", "--limit", "4", "--speed-items", "1", "--speed-min-tokens", "3", "--batch-size", "2",
        "--max-context", "32", "--thresholds", "0.5"]


def test_eval_prints_status_lines_away_from_a_terminal(exits, every_step, tmp_path, capsys):
    """Regression: `eetune eval ... > log 2>&1` wrote nothing to the log for minutes (the CLI turned
    progress off where stderr is not a terminal). Now status lines, as tuning has."""
    _, d, _ = exits
    assert main(["eval", str(d), *EVAL, "--out", str(tmp_path / "eval")]) == 0
    err = capsys.readouterr().err
    quality = _lines(err, "boolq quality: item ")
    # 3 settings (full, early-exit@0.5, self-spec) x 4 items, 2 at a time
    assert [line.split(",")[0] for line in quality] == [f"boolq quality: item {n}/12 ({100 * n / 12:.0f}%)"
                                                        for n in range(2, 13, 2)], err
    assert all("elapsed " in line and "ETA " in line for line in quality)
    speed = _lines(err, "boolq speed: run ")
    assert speed and speed[-1].split(",")[0].endswith("(100%)"), err  # the estimated total was reached
    # --no-progress: nothing
    assert main(["eval", str(d), *EVAL, "--out", str(tmp_path / "quiet"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not _lines(err, "boolq quality") and not _lines(err, "boolq speed"), err


def test_evaluate_and_calibrate_print_status_lines_away_from_a_terminal(exits, every_step, capsys):
    _, d, text = exits
    assert main(["evaluate", str(d), "--data", str(text), "--seq-len", "32", "--max-blocks", "4",
                 "--batch-size", "2", "--no-store"]) == 0
    lines = _lines(capsys.readouterr().err, "evaluate: batch ")
    assert [line.split(",")[0] for line in lines] == ["evaluate: batch 1/2 (50%)", "evaluate: batch 2/2 (100%)"]
    assert main(["calibrate", str(d), "--data", str(text), "--seq-len", "16", "--calib-blocks", "2",
                 "--test-blocks", "2", "--batch-size", "1", "--no-store"]) == 0
    lines = _lines(capsys.readouterr().err, "calibrate: batch ")
    assert [line.split(",")[0] for line in lines] == ["calibrate: batch 1/2 (50%)", "calibrate: batch 2/2 (100%)"] * 2


def test_scan_prints_status_lines_away_from_a_terminal_and_none_with_no_progress(exits, every_step, private_cache,
                                                                                 capsys):
    src, _, text = exits
    args = ["scan", str(src), "--data", str(text), "--tokens", "256", "--seq-len", "32", "--epochs", "1",
            "--loss", "ce", "--no-plot"]
    assert main(args) == 0
    err = capsys.readouterr().err
    for prefix in ("backbone: batch ", "fit heads (ce): step ", "measure: batch "):
        assert _lines(err, prefix), (prefix, err)
    assert main([*args, "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert not [line for line in err.splitlines() if ": batch " in line or ": step " in line], err


def test_generated_data_prints_status_lines_away_from_a_terminal(exits, every_step, private_cache, tmp_path,
                                                                 capsys):
    """`tune --data generated:N` generated its data without a word away from a terminal (the CLI
    turned its progress off there); `--no-progress` still shows none of it."""
    _, d, text = exits
    args = ["tune", str(d), "--data", f"generated:24:{text}", "--gen-max-new-tokens", "8", "--gen-batch-size", "4",
            "--seq-len", "16", "--batch-size", "2", "--val-blocks", "1", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "tuned")]) == 0
    lines = _lines(capsys.readouterr().err, "generate: tok ")
    assert lines and lines[-1].startswith("generate: tok 24/24 (100%)"), lines
    assert main([*args, "--out", str(tmp_path / "quiet"), "--no-progress",
                 "--gen-temperature", "0.7"]) == 0  # other settings: generated anew, not from the cache
    assert not _lines(capsys.readouterr().err, "generate: ")


def test_progress_display_forms(monkeypatch, capsys):
    from eetune.progress import progress_iter

    monkeypatch.setenv("EETUNE_PROGRESS_INTERVAL", "0")
    # away from a terminal: lines when progress is on, nothing when off
    assert list(progress_iter(range(3), "work", "item", progress=True)) == [0, 1, 2]
    assert [line.split(",")[0] for line in capsys.readouterr().err.splitlines()] == [
        "work: item 1/3 (33%)", "work: item 2/3 (67%)", "work: item 3/3 (100%)"]
    assert list(progress_iter(range(3), "work", "item", progress=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
    # on a terminal: a tqdm bar, kept or wiped as asked
    monkeypatch.setattr("eetune.progress._is_terminal", lambda stream: True)
    bar = progress_display(3, "work", "item", bar=True, lines=True, leave=False)
    assert not isinstance(bar, StatusLines) and bar.leave is False and not bar.disable
    bar.close()
    assert progress_display(3, "work", "item", bar=False, lines=False).disable


def test_status_lines_without_a_known_total():
    now = [0.0]
    for total in (None, 0):
        lines = StatusLines(total, "speed", "run", interval=0.0, clock=lambda: now[0])
        lines.set_postfix(epoch=2, loss="1.5")  # tqdm's keyword form
        now[0] += 5.0
        lines.update(3)
        assert lines.line(now[0]) == "speed: run 3, epoch 2, loss 1.5, elapsed 5s, ETA unknown"
        assert lines.line(now[0], done=True).endswith(", done")


def test_speed_rounds_estimate():
    from eetune.measure.downstream import speed_rounds_estimate

    # 4 items, at most 256 rounds, 100 decode tokens wanted
    assert speed_rounds_estimate(0, 4, 256, 100, 0) == 4  # nothing run yet: the items
    assert speed_rounds_estimate(2, 4, 256, 100, 0) == 256  # no decode token yet: the cap
    assert speed_rounds_estimate(2, 4, 256, 100, 10) == 20  # 5 a round: 18 more rounds
    assert speed_rounds_estimate(2, 4, 256, 100, 100) == 4  # enough tokens: the items still
    assert speed_rounds_estimate(6, 4, 256, 100, 120) == 6  # done
    assert speed_rounds_estimate(2, 4, 8, 100, 10) == 8  # capped

"""`eetune eval` (eetune.downstream): metrics against hand-computed values, the statistics, and the
whole verb on a tiny peaked model: outputs, self-spec = full item for item, bad input."""

import csv
import json

import numpy as np
import pytest

from conftest import save_peaky_model_dir
from eetune.cli import main
from eetune.downstream import (Rouge, bootstrap_ci, extract_choice, extract_yes_no, normalize_answer,
                               paired_bootstrap_ci, parse_tasks, parse_thresholds, score_item, token_f1)
from eetune.errors import EETuneError


# --- metrics: documented rules, hand-computed values ---------------------------------------------
def test_token_f1_by_squad_rules():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "cat sat" vs "cat sat down": 2 common, precision 1, recall 2/3 -> F1 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("", "") == 1.0 and token_f1("a", "cat") == 0.0  # "a" normalises to nothing
    # repeated words count as often as both have them: "a a b" vs "a b b" -> common {a:1, b:1}
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    item = {"answers": ["in Paris", "the French capital"]}
    assert score_item("narrativeqa", "Paris", item)["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)


@pytest.mark.parametrize("text,expected", [("Yes.", True), ("no, it is not", False), ("  True", True),
                                           ("The answer is no", False), ("maybe", None), ("", None),
                                           ("Nobody knows; yes", True)])
def test_yes_no_extraction(text, expected):
    assert extract_yes_no(text) is expected if expected is None else extract_yes_no(text) == expected


@pytest.mark.parametrize("text,expected", [("B", "B"), ("B. $0 $25000", "B"), ("(C)", "C"), ("Answer: D", "D"),
                                           ("I think A is right", "A"), ("none", None), ("Because", None)])
def test_choice_extraction(text, expected):
    assert extract_choice(text) == expected


def test_rouge_from_the_rouge_score_package():
    r = Rouge()
    # LCS of "the cat sat on the mat" / "the cat was on the mat" is 5 of 6 words each way
    s = r("the cat sat on the mat", "the cat was on the mat")
    assert s["rougeL"] == pytest.approx(5 / 6) and s["rougeLsum"] == pytest.approx(5 / 6)
    assert r("dogs running", "dog runs")["rougeL"] == pytest.approx(1.0)  # Porter stemming
    assert r("", "anything")["rougeL"] == 0.0


def test_bootstrap_intervals():
    rng = np.random.default_rng(1)
    v = rng.normal(0.5, 0.1, size=400)
    lo, hi = bootstrap_ci(v)
    assert lo < v.mean() < hi and hi - lo == pytest.approx(2 * 1.96 * 0.1 / 20, rel=0.2)
    assert paired_bootstrap_ci(v, v) == (0.0, 0.0)
    lo, hi = paired_bootstrap_ci(v + 0.05, v)  # a constant shift: no spread at all
    assert lo == pytest.approx(0.05) and hi == pytest.approx(0.05)


def test_parsing_refuses_in_one_line():
    assert parse_tasks("boolq, xsum,boolq") == ("boolq", "xsum")
    assert parse_thresholds("1,0.5") == (1.0, 0.5)
    for bad, fn in (("squad", parse_tasks), ("", parse_tasks), ("0.9,x", parse_thresholds), ("", parse_thresholds),
                    ("-1", parse_thresholds), ("inf", parse_thresholds)):
        with pytest.raises(EETuneError) as e:
            fn(bad)
        assert "\n" not in str(e.value)


# --- the verb -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exits(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    src = save_peaky_model_dir(root / "tiny")
    out = root / "exits"
    assert main(["convert", "--model", str(src), "--exits", "1,3", "--arch", "norm", "--out", str(out)]) == 0
    text = root / "text.txt"
    text.write_text(" ".join(f"w{(i * 7) % 96}" for i in range(600)))
    return out, text


def test_eval_writes_results_plots_and_report(exits, tmp_path, capsys):
    d, text = exits
    out = tmp_path / "eval"
    code = main(["eval", str(d), "--tasks", "ppl,boolq,xsum", "--out", str(out), "--limit", "10",
                 "--speed-items", "2", "--batch-size", "4", "--max-context", "32", "--thresholds", "1.5,0.5,0.1",
                 "--ppl-data", str(text), "--ppl-blocks", "2", "--seq-len", "32", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "boolq (accuracy, n=10" in printed and "early-exit@0.5" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"ppl", "boolq", "xsum"}
    assert set(res["tasks"]["ppl"]["rows"]) == {"exit 1", "exit 3", "final"}
    for task in ("boolq", "xsum"):
        rows = {r["setting"]: r for r in res["tasks"][task]["rows"]}
        assert list(rows) == ["full", "early-exit@1.5", "early-exit@0.5", "early-exit@0.1", "self-spec"]
        assert all(r["n"] == 10 for r in rows.values())
        # lossless modes: self-spec and a threshold no confidence reaches reply exactly as full
        for lossless in ("self-spec", "early-exit@1.5"):
            assert rows[lossless]["same_reply_as_full"] == 1.0 and rows[lossless]["diff_vs_full"] == 0.0
            assert rows[lossless]["diff_ci_low"] == 0.0 == rows[lossless]["diff_ci_high"]
        assert rows["full"]["speedup"] == 1.0 and rows["full"]["mean_exit_layer"] == 4.0
        assert rows["early-exit@0.1"]["mean_exit_layer"] < 4.0  # the peaked exits do exit at a low threshold
        assert rows["full"]["ci_low"] <= rows["full"]["score"] <= rows["full"]["ci_high"]
        assert (out / f"{task}.png").stat().st_size > 1000
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    report = (out / "report.html").read_text()
    assert "<h2>boolq</h2>" in report and "data:image/png;base64," in report and "exit 1" in report
    assert "A sample generation" in report
    # `eetune report` prints the same tables again from results.json
    assert main(["report", str(out)]) == 0
    again = capsys.readouterr().out
    assert "boolq (accuracy, n=10" in again and f"report: {out / 'report.html'}" in again
    assert main(["report", str(tmp_path)]) == 2 and "results.json" in capsys.readouterr().err


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "squad"], "unknown task"),
    (["--thresholds", "0.9,high"], "--thresholds"),
    (["--limit", "0"], "--limit"),
])
def test_bad_input_is_one_line_and_writes_nothing(exits, tmp_path, capsys, args, needle):
    d, _ = exits
    out = tmp_path / "eval"
    assert main(["eval", str(d), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_output_path_that_cannot_be_written_is_refused(exits, tmp_path, capsys):
    d, _ = exits
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out in (blocker, tmp_path / "missing" / "eval", tmp_path):  # a file; no parent; a foreign non-empty dir
        assert main(["eval", str(d), "--out", str(out), "--limit", "1"]) == 2
        err = capsys.readouterr().err
        assert "cannot write results" in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a directory" and not (tmp_path / "missing").exists()

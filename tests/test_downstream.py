"""`eetune eval` (eetune.measure.downstream): metrics against hand-computed values, the statistics, and the
whole verb on a tiny peaked model: outputs, self-spec = full item for item, bad input."""

import csv
import json

import numpy as np
import pytest

from conftest import make_peaky_exits, peaky_backbone, word_tokenizer
from eetune.cli import main
from eetune.decode import Generation, RowResult
from eetune.measure.downstream import (TASKS, EvalConfig, Rouge, _decode, bootstrap_ci, cut_reply, extract_choice,
                               extract_yes_no, load_items, normalize_answer, paired_bootstrap_ci, parse_tasks,
                               parse_thresholds, pick_sample_item, report_html, run_task_speed, score_item,
                               settings_for, task_figure, token_f1, visible_token)
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel


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


@pytest.mark.parametrize("raw,scored", [
    ("\nThe cat sat.\nMore text", "The cat sat."),  # a leading newline is not the end of the reply
    ("  \n\n  Paris\nQuestion: why", "Paris"),
    ("Paris\nQuestion: why", "Paris"),
    ("Paris", "Paris"),
    ("  yes  ", "yes"),
    ("\n \n\t", ""),  # white space only: an empty reply
    ("", ""),
])
def test_cut_reply_drops_leading_white_space_then_stops(raw, scored):
    assert cut_reply(raw, ("\n",)) == scored


def test_cut_reply_at_the_first_of_several_stops():
    assert cut_reply(" A. Paris ### B", ("###", ".")) == "A"
    assert cut_reply("###\nyes", ("###",)) == ""  # a reply that opens with a stop string is empty


def test_every_setting_scores_the_same_text_by_the_same_rule(monkeypatch):
    """The replies as `eval` scores them: hand-built raw replies through `_decode`, for every setting."""
    import eetune.decode.api as decode
    raw = {1: "\nThe cat sat on the mat.\nThe article then goes on", 2: "\n\n", 3: "The cat sat.\nMore"}
    monkeypatch.setattr(decode, "end_token_ids", lambda model, tok: (0,))
    monkeypatch.setattr(decode, "generate", lambda model, prompts, opts, on_tokens=None: Generation(
        rows=[RowResult(prompt_ids=p, ids=list(p)) for p in prompts], mode=opts.mode, seconds=1.0, num_layers=4))

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return raw[ids[0]]

    rouge = Rouge()
    for setting in settings_for((0.9,)):
        _, texts = _decode(None, Tok(), [[1], [2], [3]], setting, TASKS["xsum"])
        assert texts == ["The cat sat on the mat.", "", "The cat sat."], setting.name
        assert score_item("xsum", texts[0], {"summary": "the cat sat on the mat"}, rouge)["rougeL"] == 1.0
        assert score_item("narrativeqa", texts[1], {"answers": ["a cat"]})["f1"] == 0.0


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


def test_calibrated_thresholds_are_a_setting_of_their_own():
    """`--thresholds 0.9,calibrated` evaluates the stored per-exit calibration next to a fixed
    threshold; without a calibration of these heads it is refused in one line, not replaced by a
    default threshold."""
    assert parse_thresholds("0.9, Calibrated,0.9") == (0.9, "calibrated")
    settings = settings_for(parse_thresholds("0.9,calibrated"), calibrated={1: 0.7, 3: 0.95})
    assert [s.name for s in settings] == ["full", "early-exit@0.9", "early-exit@calibrated", "self-spec"]
    assert settings[2].options == {"mode": "early-exit", "confidence": "max-prob", "exit_thresholds": {1: 0.7, 3: 0.95}}
    with pytest.raises(EETuneError, match="eetune calibrate") as e:
        settings_for(("calibrated",), calibrated=None)
    assert "\n" not in str(e.value)
    # the options make a decode at exactly those thresholds
    from eetune.decode.api import DecodeOptions, resolve_thresholds
    model = EarlyExitModel.convert(peaky_backbone("llama"), (1, 3), arch="norm")
    opts, source = resolve_thresholds(DecodeOptions(**settings[2].options), model)
    assert opts.exit_thresholds == {1: 0.7, 3: 0.95} and source == "given"


# --- speed ----------------------------------------------------------------------------------------
def test_speed_is_warmed_up_then_measured_over_enough_decode_tokens(monkeypatch):
    import eetune.decode.api as decode
    model = EarlyExitModel.convert(peaky_backbone("llama"), (1, 3), arch="norm")
    tok = word_tokenizer()
    calls = []
    real = decode.generate

    def counting(model, prompts, opts, on_tokens=None):
        calls.append((opts.mode, opts.threshold))
        return real(model, prompts, opts, on_tokens=on_tokens)

    monkeypatch.setattr(decode, "generate", counting)
    settings = settings_for((0.1,))
    cfg = EvalConfig(tasks=("boolq",), speed_items=2, speed_min_tokens=10, max_context=32, progress=False)
    speed = run_task_speed(model, tok, "boolq", load_items("boolq", 3), settings, cfg, chat=False)
    assert speed["items"] == 2 and speed["warmup_runs"] == 1 and speed["min_tokens"] == 10
    # boolq replies are at most 4 tokens (3 after the first): one pass over 2 items is not enough
    assert speed["rounds"] >= 4
    # one untimed run per setting first, then `rounds` timed runs of every setting
    modes = [(s.options["mode"], s.options.get("threshold")) for s in settings]
    assert sorted(calls[:len(settings)], key=str) == sorted(modes, key=str)
    assert len(calls) == len(settings) * (1 + speed["rounds"])
    rows = speed["settings"]
    for name, r in rows.items():
        assert r["warmup_runs"] == 1 and r["runs"] == speed["rounds"]
        assert 10 <= r["decode_tokens"] == r["tokens"] - r["runs"]  # the first token of each run is not timed
        assert r["seconds"] > 0 and r["tokens_per_s"] == pytest.approx(r["decode_tokens"] / r["seconds"])
    full = rows["full"]["tokens_per_s"]
    assert 0 < full < float("inf")  # measured like the others
    assert rows["early-exit@0.1"]["speedup"] == pytest.approx(rows["early-exit@0.1"]["tokens_per_s"] / full)
    assert rows["full"]["layer_passes_per_token"] == pytest.approx(4.0)  # a decode token climbs the 4 layers
    assert rows["early-exit@0.1"]["mean_exit_layer"] < 4.0

    cfg = EvalConfig(tasks=("boolq",), speed_items=0, progress=False)
    assert run_task_speed(model, tok, "boolq", load_items("boolq", 3), settings, cfg, chat=False) == {}
    with pytest.raises(EETuneError):
        EvalConfig(speed_min_tokens=-1).validate()


# --- the report's sample and plots ------------------------------------------------------------------
def test_the_sample_item_has_visible_replies():
    replies = {"full": ["\n", "yes", "no"], "early-exit@0.5": ["", " ", "yes"]}
    assert pick_sample_item(replies, "early-exit@0.5") == 2  # the first with text in every setting
    assert pick_sample_item({"full": ["", "x"], "early-exit@0.5": ["yes", ""]}, "early-exit@0.5") == 0
    assert pick_sample_item({"full": ["x", "", "y"], "early-exit@0.5": ["", "no", ""]}, "early-exit@0.5") == 1
    assert pick_sample_item({"full": ["", " "], "early-exit@0.5": ["\n", ""]}, "early-exit@0.5") == 0


def _report(sample):
    meta = {"exits": "runs/x", "model": "tiny", "exit_layers": [1, 3], "num_layers": 4, "arch": "norm",
            "date": "today", "machine": "cpu"}
    return report_html({"tasks": {}, "meta": meta, "config": {}, "sample": sample}, {}, None)


def test_a_blank_sample_reply_is_said_so_and_white_space_is_visible():
    blank = {"task": "boolq", "setting": "early-exit@0.5", "item_index": 0, "reply": "",
             "tokens": [{"text": "\n", "exit_layer": 1}, {"text": "  ", "exit_layer": 3}]}
    page = _report(blank)
    assert "(blank reply" in page and "↵" in page and "··" in page
    assert "'>\n</span>" not in page and "'>  </span>" not in page  # no box holds only white space
    shown = {**blank, "reply": "Yes", "tokens": [{"text": "\n", "exit_layer": 1}, {"text": "Yes", "exit_layer": 4}]}
    page = _report(shown)
    assert "(blank reply" not in page and "Scored reply: Yes" in page and "item 0" in page
    assert visible_token("Yes") == "Yes" and visible_token(" \n") == "·↵\n" and visible_token("") == "∅"


def _text_boxes(fig):
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    return [t.get_window_extent(r) for t in fig.axes[0].texts]


def test_task_plot_labels_of_coinciding_points_do_not_overlap():
    def row(name, x, y):
        return {"setting": name, "metric": "accuracy", "speedup": x, "score": y, "ci_low": y - 0.1,
                "ci_high": y + 0.1}
    rows = [row("full", 1.0, 0.5), row("early-exit@1", 1.0, 0.5), row("early-exit@0.9", 1.0, 0.5),
            row("early-exit@0.8", 1.01, 0.5), row("self-spec", 1.0, 0.5), row("early-exit@0.2", 2.0, 0.3)]
    fig = task_figure(rows, "boolq")
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["full", "t=1", "t=0.9", "t=0.8", "self-spec", "t=0.2"]
    boxes = _text_boxes(fig)
    assert not [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]


# --- the verb -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exits(tmp_path_factory):
    _, out, text = make_peaky_exits(tmp_path_factory.mktemp("eval"))
    return out, text


def test_eval_writes_results_plots_and_report(exits, tmp_path, capsys, monkeypatch):
    d, text = exits
    monkeypatch.setattr("eetune.measure.downstream.DEFAULT_SPEED_MIN_TOKENS", 12)  # seconds, not minutes
    out = tmp_path / "eval"
    code = main(["eval", str(d), "--tasks", "ppl,boolq,xsum", "--out", str(out), "--limit", "10",
                 "--speed-items", "2", "--batch-size", "4", "--max-context", "32", "--thresholds", "1.5,0.5,0.1",
                 "--ppl-data", str(text), "--ppl-blocks", "2", "--seq-len", "32", "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "boolq (accuracy, n=10" in printed and "early-exit@0.5" in printed
    assert "1 untimed warm-up run per setting" in printed and "at least 12 decode tokens" in printed
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
        # speed: every setting's measured decode tokens / seconds, after a warm-up; speedup a ratio of two
        for r in rows.values():
            assert r["speed_warmup_runs"] == 1 and r["speed_tokens"] >= 12 and r["speed_seconds"] > 0
            assert r["tokens_per_s"] == pytest.approx(r["speed_tokens"] / r["speed_seconds"])
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / rows["full"]["tokens_per_s"])
        assert res["tasks"][task]["speed"] == {"items": 2, "rounds": res["tasks"][task]["speed"]["rounds"],
                                               "warmup_runs": 1, "min_tokens": 12}
        assert rows["full"]["mean_exit_layer"] == 4.0
        assert rows["early-exit@0.1"]["mean_exit_layer"] < 4.0  # the peaked exits do exit at a low threshold
        assert rows["full"]["ci_low"] <= rows["full"]["score"] <= rows["full"]["ci_high"]
        assert (out / f"{task}.png").stat().st_size > 1000
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 10
    report = (out / "report.html").read_text()
    assert "<h2>boolq</h2>" in report and "data:image/png;base64," in report and "exit 1" in report
    assert "A sample generation" in report and "untimed warm-up" in report
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


def test_tables_of_results_older_than_the_recorded_timing_do_not_say_speed_was_not_measured():
    """The committed GPU-tuned eval results (2026-11-27) time 4 items per task but predate the
    `speed` record; `eetune report` printed "speed not measured (no speed items)" over their
    tokens/s columns."""
    import json
    from pathlib import Path

    from eetune.measure.downstream import format_tables, report_html

    path = Path(__file__).resolve().parents[1] / "benchmarks/results/eval-smollm2-mlp-10-20-h100-cpu-xsum/results.json"
    results = json.loads(path.read_text())
    assert "speed" not in results["tasks"]["xsum"] and results["tasks"]["xsum"]["speed_items"] == 4
    for text in (format_tables(results), report_html(results, {}, None)):
        assert "not measured" not in text
        assert "tokens/s at batch 1 on 4 items" in text

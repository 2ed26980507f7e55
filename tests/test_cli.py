"""The `eetune` CLI: every verb's --help, convert/info/evaluate on a tiny model directory, and
bad input (one line, exit code 2, nothing written)."""

import json
import subprocess
import sys

import pytest
import torch

from eetune.cli import build_parser, main
from eetune.errors import EETuneError


def verbs():
    parser = build_parser()
    return sorted(parser._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("verb", verbs())
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert "usage: eetune " + verb in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "eetune.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout


def test_convert_info_evaluate(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "exits"
    assert main(["convert", "--model", str(tiny_model_dir), "--exits", "0.5,1.0", "--arch", "mlp",
                 "--output-embedding", "shared", "--out", str(out)]) == 0
    assert "exits after layers [2, 4] of 4" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["config"]["exit_layers"] == [2, 4] and info["config"]["arch"] == "mlp"
    assert info["parameters"]["trainable"] > 0 and info["parameters"]["frozen_backbone"] > 0
    assert main(["info", str(out)]) == 0
    assert "trainable (heads)" in capsys.readouterr().out


def test_evaluate_on_text_file(tiny_model_dir, tmp_path, capsys):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    # a word-level tokenizer inside the vocabulary of the tiny model
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[EOS]"] = 96
    tk = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="[EOS]").save_pretrained(tiny_model_dir)
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"w{(i * 7) % 96}" for i in range(400)))
    out = tmp_path / "exits"
    assert main(["convert", "--model", str(tiny_model_dir), "--exits", "1,3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(text), "--seq-len", "32", "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert set(m["exits"]) == {"1", "3"} and m["tokens"] == 12 * 31
    assert all(v["ce"] > 0 and 0 <= v["agreement"] <= 1 for v in m["exits"].values())


def _bad(argv, capsys, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:") and match in err, err


@pytest.mark.parametrize("exits,match", [("0", "exit layer 0 is invalid"), ("5", "beyond the model's depth"),
                                         ("2,2", "duplicate exit layers"), ("a", "cannot read exit layer")])
def test_convert_bad_exits(tiny_model_dir, tmp_path, capsys, exits, match):
    out = tmp_path / "exits"
    _bad(["convert", "--model", str(tiny_model_dir), "--exits", exits, "--out", str(out)], capsys, match)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["tiny-llama"]


def test_convert_unknown_arch_is_usage_error(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["convert", "--model", str(tiny_model_dir), "--exits", "1", "--arch", "attention",
              "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'attention'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_missing_model_path(tmp_path, capsys):
    _bad(["convert", "--model", str(tmp_path / "nope"), "--exits", "1", "--out", str(tmp_path / "x")], capsys,
         "not found")
    assert not (tmp_path / "x").exists()


def test_convert_refuses_foreign_output_dir(tiny_model_dir, tmp_path, capsys):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.txt").write_text("keep")
    _bad(["convert", "--model", str(tiny_model_dir), "--exits", "1", "--out", str(foreign)], capsys,
         "not an exits directory")
    assert [p.name for p in foreign.iterdir()] == ["a.txt"]


def test_convert_refuses_non_causal_model(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM
    BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32)).save_pretrained(tmp_path / "bert")
    _bad(["convert", "--model", str(tmp_path / "bert"), "--exits", "1", "--out", str(tmp_path / "x")], capsys,
         "unsupported architecture 'BertForMaskedLM'")


def test_hub_id_offline_fails_at_once(tmp_path, capsys, monkeypatch):
    import time
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    t = time.time()
    _bad(["convert", "--model", "someone/some-model", "--exits", "1", "--out", str(tmp_path / "x")], capsys,
         "unreachable (offline)")
    assert time.time() - t < 10


def test_info_on_non_exits_dir(tmp_path, capsys):
    _bad(["info", str(tmp_path)], capsys, "is not an exits directory")


@pytest.fixture
def tiny_exits(tiny_model_dir, tmp_path):
    from conftest import word_tokenizer
    word_tokenizer().save_pretrained(tiny_model_dir)
    out = tmp_path / "gen-exits"
    assert main(["convert", "--model", str(tiny_model_dir), "--exits", "1,3", "--arch", "mlp", "--out", str(out)]) == 0
    return out


def _generate_json(capsys, *argv):
    capsys.readouterr()
    assert main(["generate", *map(str, argv), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_self_spec_text_equals_full_and_counts_its_drafts(tmp_path, capsys):
    """Greedy self-speculation is lossless: the same text and ids as full decoding. On a peaky
    model drafts are accepted, and the counts agree with the per-token statistics."""
    from conftest import save_peaky_model_dir
    src = save_peaky_model_dir(tmp_path / "peaky")
    exits = tmp_path / "peaky-exits"
    assert main(["convert", "--model", str(src), "--exits", "3", "--arch", "norm", "--out", str(exits)]) == 0
    prompts = ["--prompt", "w1 w2 w3", "--prompt", "w5 w9"]
    spec = _generate_json(capsys, exits, *prompts, "--mode", "self-spec", "--threshold", "0.5", "--draft-len", "4",
                          "--max-new-tokens", "12")
    full = _generate_json(capsys, exits, *prompts, "--mode", "full", "--max-new-tokens", "12")
    assert [r["text"] for r in spec["rows"]] == [r["text"] for r in full["rows"]]
    assert [r["ids"] for r in spec["rows"]] == [r["ids"] for r in full["rows"]]
    assert all(r["text"] and len(r["ids"]) == 12 for r in full["rows"])
    s = spec["summary"]
    assert s["mode"] == "self-spec" and s["rounds"] > 0
    assert s["accepted"] > 0 and s["accepted"] == sum(t["drafted"] for r in spec["rows"] for t in r["tokens"])
    assert s["accepted"] <= s["drafted"] <= 4 * s["rounds"] * len(spec["rows"])


def test_generate_json_and_stream(tiny_exits, capsys):
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--mode", "full", "--max-new-tokens", "6"]) == 0
    full_text = capsys.readouterr().out.strip()
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--mode", "early-exit", "--threshold", "2",
                 "--max-new-tokens", "6", "--stream", "--show-exits"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == full_text and "\x1b[" not in captured.out  # not a terminal: plain text
    assert "mean exit layer 4.0 of 4" in captured.err
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--mode", "full", "--max-new-tokens", "6",
                 "--device", "cpu", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip() == full_text


@pytest.mark.parametrize("argv,match", [
    (["--prompt", " "], "empty prompt"),
    ([], "no prompt"),
    (["--prompt", "w1", "--threshold", "-1"], "outside [0, inf)"),
    (["--prompt", "w1", "--max-new-tokens", "0"], "at least 1"),
    (["--prompt", "w1", "--mode", "fast"], "invalid choice: 'fast'"),
    (["--prompt", "w1 " * 300], "exceeds the model's context"),
    (["--prompt", "a", "--prompt", "b", "--stream"], "exactly one prompt"),
    (["--prompt", "w1", "--mode", "self-spec", "--draft-vocab", "0"], "--draft-vocab 0 is outside 1..97"),
    (["--prompt", "w1", "--mode", "self-spec", "--draft-vocab", "1000"], "--draft-vocab 1000 is outside 1..97"),
    (["--prompt", "w1", "--confidence", "gate"], "no gates"),
    (["--prompt", "w1", "--mode", "self-spec", "--draft-exit", "2"], "not one of the exits"),
    (["--prompt", "w1", "--mode", "self-spec", "--draft-exit", "best"], "neither an exit layer nor 'auto'"),
    (["--prompt", "w1", "--gate-filter", "0.5"], "unrecognized arguments: --gate-filter"),
    (["--prompt", "w1", "--confidence", "entropy"], "invalid choice: 'entropy'"),
    (["--prompt", "w1", "--device", "tpu9"], "is not a torch device"),
    (["--prompt", "w1", "--engine", "lean"], "unrecognized arguments: --engine"),
] + ([] if torch.cuda.is_available() else [(["--prompt", "w1", "--device", "cuda"], "no CUDA device")]))
def test_generate_bad_input(tiny_exits, capsys, argv, match):
    capsys.readouterr()
    try:
        code = main(["generate", str(tiny_exits), *argv])
    except SystemExit as e:  # argparse-level errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err


def test_generate_with_an_exit_after_the_last_layer(tiny_model_dir, tmp_path, capsys):
    """Regression: `--exits 10,30` (an exit after the last layer) crashed early-exit generation
    with KeyError: 30."""
    from conftest import word_tokenizer
    word_tokenizer().save_pretrained(tiny_model_dir)
    out = tmp_path / "last-exits"
    assert main(["convert", "--model", str(tiny_model_dir), "--exits", "1,4", "--arch", "norm", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "w1 w2 w3", "--mode", "early-exit", "--threshold", "0.3",
                 "--max-new-tokens", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"][0]["ids"]) == 5


def test_convert_refuses_a_head_with_nothing_to_train(tiny_model_dir, tmp_path, capsys):
    """Regression (issue 11): `--arch embedding --output-embedding shared` was accepted and `tune`
    then died with a raw autograd RuntimeError."""
    out = tmp_path / "nothing"
    code = main(["convert", "--model", str(tiny_model_dir), "--exits", "1", "--arch", "embedding",
                 "--output-embedding", "shared", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no trainable parameters" in err and not out.exists()


def test_tune_refuses_exits_with_nothing_to_train(tiny_model_dir, tmp_path, capsys):
    """Exits directories written before the convert-time check still get a one-line error."""
    from eetune.model.config import ExitConfig
    from eetune.model.early_exit import write_exits_dir
    src = tmp_path / "old-exits"
    write_exits_dir(src, ExitConfig(exit_layers=(1,), num_layers=4, arch="embedding", output_embedding="shared",
                                    base_model=str(tiny_model_dir)), {})
    (tmp_path / "t.txt").write_text("w1 w2 w3 " * 50)
    code = main(["tune", str(src), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--seq-len", "32", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no trainable parameters" in err
    assert not (tmp_path / "out").exists()


def test_plain_completion_is_the_default_and_chat_is_asked_for():
    """Completion prompts ("The capital of France is") went through the chat template by default
    on the command line (not in Python): plain text is the default of both, --chat asks for it."""
    import inspect
    from types import SimpleNamespace

    from eetune.cli import empty_note, use_chat
    from eetune.decode import generate, generate_text
    from eetune.model.early_exit import EarlyExitModel
    with_template = SimpleNamespace(chat_template="{{ messages }}")
    without = SimpleNamespace(chat_template=None)
    assert use_chat(False, with_template) is False and use_chat(False, without) is False
    assert use_chat(True, with_template) is True
    assert build_parser().parse_args(["generate", "d", "--prompt", "x"]).chat is False
    assert build_parser().parse_args(["generate", "d", "--prompt", "x", "--chat"]).chat is True
    assert inspect.signature(generate_text).parameters["chat"].default is False
    assert inspect.signature(generate).parameters["chat"].default is False
    eos = SimpleNamespace(finished_by="eos")
    note = empty_note(0, 1, eos, chat=False)
    assert note.startswith("eetune: note: the prompt produced no text") and "add --chat" in note
    assert "--chat" not in empty_note(1, 2, eos, chat=True) and "prompt 2" in empty_note(1, 2, eos, chat=True)
    assert "--max-new-tokens" in empty_note(0, 1, SimpleNamespace(finished_by="length"), chat=True)


def test_generate_is_plain_completion_unless_chat(tiny_exits, capsys, monkeypatch):
    """With a tokenizer that has a chat template: no --chat gives the plain tokenisation (the same
    ids as the Python API's default); --chat wraps the prompt in the template."""
    from conftest import word_tokenizer
    import eetune.decode.api as decode
    from eetune.model.early_exit import EarlyExitModel
    tok_dir = json.loads((tiny_exits / "exit_config.json").read_text())["base_model"]
    tok = word_tokenizer()
    tok.chat_template = "{% for m in messages %}w90 {{ m['content'] }} w91 {% endfor %}"
    tok.save_pretrained(tok_dir)
    seen = []
    real = decode.generate_ids

    def spy(model, ids, opts, **kw):
        seen.append([list(x) for x in ids])
        return real(model, ids, opts, **kw)

    monkeypatch.setattr(decode, "generate_ids", spy)
    plain = _generate_json(capsys, tiny_exits, "--prompt", "w1 w2", "--mode", "full", "--max-new-tokens", "3")
    _generate_json(capsys, tiny_exits, "--prompt", "w1 w2", "--mode", "full", "--max-new-tokens", "3", "--chat")
    assert seen[0] == [[1, 2]] and seen[1] == [[90, 1, 2, 91]]
    model = EarlyExitModel.from_pretrained(tiny_exits)
    api = decode.generate(model, "w1 w2", tokenizer=tok, mode="full", max_new_tokens=3)
    assert seen[2] == [[1, 2]] and api.rows[0].ids == plain["rows"][0]["ids"]


def test_generate_refuses_a_prompt_file_that_is_not_utf8(tiny_exits, tmp_path, capsys):
    """A Latin-1 --prompt-file showed a UnicodeDecodeError traceback."""
    prompt = tmp_path / "latin1.txt"
    prompt.write_bytes("Le café est".encode("latin-1"))
    capsys.readouterr()
    _bad(["generate", str(tiny_exits), "--prompt-file", str(prompt)], capsys, f"prompt file {prompt} is not UTF-8")
    prompt.write_bytes("Le café est".encode("utf-8"))  # the same file as UTF-8 is read
    code = main(["generate", str(tiny_exits), "--prompt-file", str(prompt), "--max-new-tokens", "2", "--json"])
    assert code == 0 and json.loads(capsys.readouterr().out)["rows"][0]["prompt"] == "Le café est"


def test_convert_warns_about_an_exit_after_the_last_layer(tiny_model_dir, tmp_path, capsys):
    """`--exits 4` on a 4-layer model is allowed (it reproduces the final logits) but can never
    save anything: one warning line says so; an exit below the top gets none."""
    out = tmp_path / "top"
    assert main(["convert", "--model", str(tiny_model_dir), "--exits", "1,4", "--out", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("eetune: warning:")]
    assert len(warnings) == 1 and "after layer 4" in warnings[0] and "last layer" in warnings[0]
    assert "never save" in warnings[0] and json.loads((out / "exit_config.json").read_text())["exit_layers"] == [1, 4]
    assert main(["convert", "--model", str(tiny_model_dir), "--exits", "1,3", "--out", str(tmp_path / "below")]) == 0
    assert "warning" not in capsys.readouterr().err


# --- output paths are checked before any work -----------------------------------------------------
def _unwritable(tmp_path, where: str, name: str):
    """An output path nobody can create, root included: under a regular file, or in /proc."""
    if where == "proc":
        from pathlib import Path
        if not Path("/proc/self").is_dir():
            pytest.skip("no /proc")
        return Path("/proc") / name
    blocker = tmp_path / "afile"
    blocker.write_text("a file, not a folder")
    return blocker / name


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
@pytest.mark.parametrize("argv", [
    ["convert", "--model", "{model}", "--exits", "1", "--out", "{bad}"],
    ["scan", "{model}", "--json", "{bad}", "--no-plot"],
    ["scan", "{model}", "--plot", "{bad}"],
    ["evaluate", "{exits}", "--plot", "{bad}", "--no-store"],
    ["tune", "{exits}", "--out", "{bad}", "--steps", "1"],
    ["tune", "{exits}", "--out", "{ok}", "--train-dir", "{bad}", "--steps", "1"],
    ["tune", "{exits}", "--out", "{ok}", "--cache-hidden", "{bad}", "--distill", "0", "--steps", "1"],
    ["eval", "{exits}", "--out", "{bad}"],
    ["lm-eval", "--model_args", "exits={exits}", "--tasks", "x", "--output_path", "{bad}"],
], ids=["convert --out", "scan --json", "scan --plot", "evaluate --plot", "tune --out", "tune --train-dir",
        "tune --cache-hidden", "eval --out", "lm-eval --output_path"])
def test_an_unwritable_output_path_is_refused_before_any_work(tiny_exits, tiny_model_dir, tmp_path, capsys,
                                                               monkeypatch, argv, where):
    """`scan --json` into an unwritable folder failed after the whole scan (495 s), `evaluate
    --plot` after the evaluation: every output path is now tried before loading anything."""
    import importlib
    import types

    def boom(*a, **k):
        raise AssertionError("work started before the output path was checked")

    for module, name in [("eetune.model.backbone", "load_backbone"), ("eetune.model.backbone", "model_config"),
                         ("eetune.train.data", "load_texts"), ("eetune.train.tune", "tune"), ("eetune.measure.scan", "run_scan")]:
        monkeypatch.setattr(importlib.import_module(module), name, boom)
    monkeypatch.setattr(importlib.import_module("eetune.model.early_exit").EarlyExitModel, "from_pretrained", boom)
    monkeypatch.setitem(sys.modules, "eetune.measure.lmeval", types.SimpleNamespace(run_harness=boom))
    bad = _unwritable(tmp_path, where, "eetune-out.json" if "--json" in argv else "eetune-out")
    fill = {"{model}": str(tiny_model_dir), "{exits}": str(tiny_exits), "{bad}": str(bad), "{ok}": str(tmp_path / "ok")}
    argv = [fill.get(a, a.replace("{exits}", str(tiny_exits))) for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("eetune: error:"), err
    assert f"{bad} is not writable" in err, err
    assert not (tmp_path / "ok").exists()


def test_write_check_leaves_nothing_behind_and_allows_new_folders(tmp_path):
    from pathlib import Path

    from eetune.cli import check_writable
    check_writable(tmp_path / "new" / "deeper" / "out.json", "write --json")  # folders made later: fine
    check_writable(tmp_path, "store", kind="into")
    check_writable(tmp_path / "exits", "write --out", kind="dir")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(EETuneError, match="is a directory"):
        check_writable(tmp_path, "write --json")
    if Path("/proc/self").is_dir():  # root may write anywhere but there: the check creates a file, not os.access
        with pytest.raises(EETuneError, match=r"cannot store: /proc is not writable \(.*\); pass --no-store"):
            check_writable("/proc", "store", "pass --no-store", kind="into")


# --- help text ------------------------------------------------------------------------------------
def _internal_names() -> set[str]:
    """Module-level functions and classes of the eetune package whose names a user would not know
    (with an underscore: `resolve_thresholds`, `_check_run`, ...)."""
    import ast
    from pathlib import Path

    import eetune
    names = set()
    for f in Path(eetune.__file__).parent.glob("*.py"):
        for node in ast.parse(f.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and "_" in node.name.strip("_"):
                names.add(node.name)
    return names


@pytest.mark.parametrize("verb", verbs())
def test_help_text_is_clean(verb, capsys):
    """`eval --help` showed "95%%"; `evaluate --batch-size` had no help; `generate --threshold`
    named decode.resolve_thresholds."""
    import re
    from pathlib import Path

    import eetune
    sub = next(a for a in build_parser()._actions if a.dest == "verb").choices[verb]
    for a in sub._actions:
        assert isinstance(a.help, str) and a.help.strip() and a.help != "==SUPPRESS==", (verb, a.option_strings)
    own = sub.format_help()
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    shown = capsys.readouterr().out
    assert e.value.code == 0 and shown.startswith(own)  # lm-eval's own help follows its verb's
    assert "%%" not in own and "%(" not in own
    text = " ".join(own.split())  # words broken across lines joined again
    internal, modules = _internal_names(), {f.stem for f in Path(eetune.__file__).parent.glob("*.py")}
    for word in set(re.findall(r"[A-Za-z_][\w.]*", text)):
        parts = word.strip(".").split(".")
        if parts[-1] in ("json", "jsonl", "png", "safetensors", "csv", "html", "txt", "gguf", "parquet", "arrow"):
            continue  # a file name
        assert not any(p in internal for p in parts), (verb, word)  # a function or class name
        if parts[0] == "eetune":
            parts = parts[1:]
        assert not (len(parts) > 1 and parts[0] in modules), (verb, word)  # module.attribute: decode.resolve_...

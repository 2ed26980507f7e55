"""The `eetune` CLI: every verb's --help, convert/info/evaluate on a tiny model directory, and
bad input (one line, exit code 2, nothing written)."""

import json
import subprocess
import sys

import pytest
import torch

from eetune.cli import build_parser, main


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


def test_generate_json_and_stream(tiny_exits, capsys):
    capsys.readouterr()
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--prompt", "w4", "--mode", "self-spec",
                 "--threshold", "0", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 2 and all(len(r["ids"]) <= 6 for r in out["rows"])
    assert out["summary"]["mode"] == "self-spec" and out["summary"]["drafted"] >= 0
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--mode", "full", "--max-new-tokens", "6"]) == 0
    full_text = capsys.readouterr().out.strip()
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--mode", "early-exit", "--threshold", "2",
                 "--max-new-tokens", "6", "--stream", "--show-exits"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == full_text and "\x1b[" not in captured.out  # not a terminal: plain text
    assert "mean exit layer 4.0 of 4" in captured.err
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2 w3", "--mode", "full", "--max-new-tokens", "6",
                 "--engine", "graphs", "--device", "cpu", "--dtype", "fp32"]) == 0
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
    (["--prompt", "w1", "--gate-filter", "0.5"], "no gates"),
    (["--prompt", "w1", "--gate-filter", "-1"], "--gate-filter -1.0 is outside [0, inf)"),
    (["--prompt", "w1", "--screen-vocab", "0"], "--screen-vocab 0 is outside 1..97"),
    (["--prompt", "w1", "--device", "tpu9"], "is not a torch device"),
    (["--prompt", "w1", "--compile", "--engine", "lean"], "--compile works with --engine graphs only"),
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
    from eetune.config import ExitConfig
    from eetune.model import write_exits_dir
    src = tmp_path / "old-exits"
    write_exits_dir(src, ExitConfig(exit_layers=(1,), num_layers=4, arch="embedding", output_embedding="shared",
                                    base_model=str(tiny_model_dir)), {})
    (tmp_path / "t.txt").write_text("w1 w2 w3 " * 50)
    code = main(["tune", str(src), "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "no trainable parameters" in err
    assert not (tmp_path / "out").exists()


def test_chat_template_is_the_default_when_the_tokenizer_has_one():
    """Issue 11: `generate` on an instruct model without --chat often printed nothing."""
    from types import SimpleNamespace

    from eetune.cli import empty_note, use_chat
    with_template = SimpleNamespace(chat_template="{{ messages }}")
    without = SimpleNamespace(chat_template=None)
    assert use_chat(None, with_template) is True and use_chat(None, without) is False
    assert use_chat(False, with_template) is False and use_chat(True, without) is True
    eos = SimpleNamespace(finished_by="eos")
    note = empty_note(0, 1, eos, chat=False)
    assert note.startswith("eetune: note: the prompt produced no text") and "drop --no-chat" in note
    assert "--no-chat" not in empty_note(1, 2, eos, chat=True) and "prompt 2" in empty_note(1, 2, eos, chat=True)
    assert "--max-new-tokens" in empty_note(0, 1, SimpleNamespace(finished_by="length"), chat=True)


def test_generate_uses_the_chat_template_by_default(tiny_exits, capsys, monkeypatch):
    from eetune import decode
    seen = []
    real = decode.generate_text
    monkeypatch.setattr(decode, "generate_text", lambda *a, **k: seen.append(k.get("chat")) or real(*a, **k))
    tok_dir = json.loads((tiny_exits / "exit_config.json").read_text())["base_model"]
    from pathlib import Path
    cfg = Path(tok_dir) / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data["chat_template"] = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    cfg.write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2", "--max-new-tokens", "3", "--json"]) == 0
    assert main(["generate", str(tiny_exits), "--prompt", "w1 w2", "--max-new-tokens", "3", "--json",
                 "--no-chat"]) == 0
    assert seen == [True, False]

"""CLI flags generated from TuneConfig / DecodeOptions (eetune.flags): one place for defaults and help."""

from __future__ import annotations

import dataclasses

import pytest

from eetune.cli import build_parser, main
from eetune.decode import DecodeOptions
from eetune.flags import field_comments, from_args
from eetune.train.tune import TuneConfig

DECODE_INTERNAL = {"replay", "eos_token_ids", "record_logits"}  # not user settings: no flags


@dataclasses.dataclass
class _Toy:
    alpha: int = 1  # first line
    #                 and its continuation
    beta: str = "x"  # beta's own

    # A comment of its own, not beta's.
    gamma: bool = False


def test_field_comments_join_continuations_only():
    c = field_comments(_Toy)
    assert c["alpha"] == "first line and its continuation"
    assert c["beta"] == "beta's own"
    assert "gamma" not in c


def _actions(verb):
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return {a.dest: a for a in sub.choices[verb]._actions}


@pytest.mark.parametrize("verb,cls,skip,cli_defaults", [
    ("tune", TuneConfig, set(), {}),
    ("generate", DecodeOptions, DECODE_INTERNAL, {"mode": "early-exit"}),
])
def test_every_field_is_a_flag_with_its_default_choices_and_help(verb, cls, skip, cli_defaults):
    actions, comments = _actions(verb), field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            assert f.name not in actions
            continue
        a = actions[f.name]
        assert a.default == cli_defaults.get(f.name, f.default), f.name
        assert comments[f.name] and comments[f.name].split(":")[0] in a.help.replace("%%", "%"), f.name
        if f.name in getattr(cls, "CHOICES", {}):
            assert list(a.choices) == list(cls.CHOICES[f.name])


def test_parsed_defaults_build_the_dataclass_defaults():
    args = build_parser().parse_args(["tune", "d", "--out", "o"])
    assert from_args(TuneConfig, args) == TuneConfig()
    args = build_parser().parse_args(["generate", "d", "--prompt", "x"])
    assert from_args(DecodeOptions, args) == DecodeOptions(mode="early-exit")


def test_flags_reach_the_config():
    args = build_parser().parse_args(["tune", "d", "--out", "o", "--betas", "0.8,0.99", "--loss-weights", "1,0.5",
                                      "--no-progress", "--dynamic-weights", "--steps", "7", "--decay", "cosine"])
    cfg = from_args(TuneConfig, args)
    assert cfg.betas == (0.8, 0.99) and cfg.loss_weights == (1.0, 0.5) and cfg.progress is False
    assert cfg.dynamic_weights and cfg.steps == 7 and cfg.decay == "cosine"
    args = build_parser().parse_args(["generate", "d", "--draft-exit", "auto", "--draft-vocab", "64", "--top-k", "5"])
    opts = from_args(DecodeOptions, args)
    assert opts.draft_exit == "auto" and opts.draft_vocab == 64 and opts.top_k == 5


@pytest.mark.parametrize("argv,needle", [
    (["tune", "d", "--out", "o", "--loss-weights", "1,x"], "--loss-weights"),
    (["tune", "d", "--out", "o", "--decay", "step"], "--decay"),
    (["tune", "d", "--out", "o", "--steps", "3", "--tokens", "9"], "not allowed with"),
    (["tune", "d", "--out", "o", "--gates", "--gates-only"], "not allowed with"),
    (["generate", "d", "--confidence", "vibes"], "--confidence"),
])
def test_bad_flag_values_are_one_line_with_code_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_betas_are_checked_before_loading(tmp_path, capsys):
    from tune_helpers import make_world

    world = make_world(tmp_path)
    code = main(["tune", str(world["norm"]), "--out", str(tmp_path / "o"), "--betas", "0.9", "--no-progress"])
    assert code == 2 and "--betas" in capsys.readouterr().err and not (tmp_path / "o").exists()

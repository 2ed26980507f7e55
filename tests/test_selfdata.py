"""Self-generated tuning data (eetune.train.selfdata) and weighted data mixtures (eetune.train.data):
spec parsing and its errors, mixing proportions, generation against a direct decode, the
resumable cache, and `eetune tune` on a mixture."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from eetune.train import data
from eetune.train import selfdata
from eetune.decode import DecodeOptions, generate
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel
from eetune.train.selfdata import GenSettings

from conftest import tiny_backbone
from tune_helpers import make_docs, make_tokenizer, make_world, one_thread, run_cli  # noqa: F401


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def setup(tmp_path):
    make_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    docs = make_docs(tmp_path / "docs", n=12)
    model = EarlyExitModel.convert(tiny_backbone("llama"), exit_layers=(1, 3), arch="norm")
    return model, tok, str(docs)


# --- specs ------------------------------------------------------------------------------------
def test_parse_data_spec(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("w1 w2")
    P = data.DataPart
    assert data.parse_data_spec("default") == [P("default")]
    assert data.parse_data_spec("default:0.3,generated:2000:0.7") == [P("default", 0.3), P("generated", 0.7, 2000)]
    assert data.parse_data_spec("generated:5") == [P("generated", 1.0, 5, "default")]
    assert data.parse_data_spec(f"generated:5:{f}") == [P("generated", 1.0, 5, str(f))]
    assert data.parse_data_spec(f"generated:5:{f}:2") == [P("generated", 2.0, 5, str(f))]
    assert data.parse_data_spec(f"{f}:0.25, default") == [P(str(f), 0.25), P("default")]
    assert data.parse_data_spec("no/such/file.txt") == [P("no/such/file.txt")]  # refused when read


@pytest.mark.parametrize("spec, words", [
    ("generated:0", "positive"), ("generated:-5", "positive"), ("generated:abc", "whole number"),
    ("generated", "whole number"), ("generated:10:nosuchsource", "unknown source"),
    ("generated:10:default-dev", "evaluation"), ("default:abc", "not a number"), ("default:-1", ">= 0"),
    ("default:0,generated:10:0", "sum to 0"), ("default:0", "sum to 0"), ("default,,default", "empty part"),
    ("default:nan", "finite"),
])
def test_bad_specs_are_one_line_errors(spec, words):
    with pytest.raises(EETuneError) as e:
        data.parse_data_spec(spec)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_mix_blocks_proportions_and_repetition():
    a = torch.arange(40).view(20, 2)  # 20 blocks
    b = torch.arange(100, 108).view(4, 2)  # 4 blocks
    mixed, counts = data.mix_blocks([a, b], [0.25, 0.75], seed=3)
    assert counts == [6, 18] and mixed.shape == (24, 2)
    rows = [tuple(r.tolist()) for r in mixed]
    from_a = [r for r in rows if r[0] < 100]
    from_b = [r for r in rows if r[0] >= 100]
    assert len(from_a) == 6 and len(set(from_a)) == 6  # a sampled without repetition
    assert len(from_b) == 18 and set(from_b) == {tuple(r.tolist()) for r in b}  # b repeated, every block used
    for blocks in (from_a, from_b):
        assert all(any(torch.equal(torch.tensor(r), x) for x in (a if r[0] < 100 else b)) for r in blocks)
    assert data.mix_blocks([a, b], [1, 1], max_blocks=10)[1] == [5, 5]
    assert torch.equal(data.mix_blocks([a, b], [0.25, 0.75], seed=3)[0], mixed)  # deterministic


def test_mixture_splits_each_source_and_keeps_val_apart(setup, tmp_path):
    _, tok, _ = setup
    import random
    r = random.Random(0)  # random words: a 16-token window of one document appears in no other
    for name in ("one", "other"):
        (tmp_path / name).mkdir()
        for d in range(12):
            (tmp_path / name / f"{d}.txt").write_text(" ".join(f"w{r.randrange(96)}" for _ in range(60)))
    docs, other = tmp_path / "one", tmp_path / "other"
    train, val, info = data.train_val_blocks(f"{docs}:1,{other}:3", tok, seq_len=16, val_blocks=4)
    assert [p["weight"] for p in info["parts"]] == [1, 3]
    assert info["val_blocks"] == val.shape[0] == sum(p["val_blocks"] for p in info["parts"])
    assert sum(p["train_blocks_mixed"] for p in info["parts"]) == train.shape[0]
    c = [p["train_blocks_mixed"] for p in info["parts"]]
    assert abs(c[1] / sum(c) - 0.75) < 0.02
    val_rows = {tuple(r.tolist()) for r in val}
    assert not val_rows & {tuple(r.tolist()) for r in train}


def test_mixture_drops_documents_repeated_across_sources(setup, tmp_path):
    _, tok, docs = setup
    more = make_docs(tmp_path / "more", n=18)  # the same generator: the 12 documents of `docs`, then 6 new ones
    train, val, info = data.train_val_blocks(f"{docs}:1,{more}:1", tok, seq_len=16, val_blocks=2)
    assert info["parts"][0]["duplicates_removed"] == 0
    assert info["parts"][1]["duplicates_removed"] == 12 and info["parts"][1]["documents"] == 6
    assert info["duplicates_removed"] == 12


# --- generation -------------------------------------------------------------------------------
def test_generated_documents_match_a_direct_decode(setup):
    model, tok, docs = setup
    s = GenSettings(temperature=0.9, top_p=0.9, max_new_tokens=12, batch_size=4, seed=7)
    out = selfdata.generated_documents(model, tok, 30, docs, s, progress=False)
    prompts = selfdata.build_prompts(tok, docs, 7)
    assert len(out) % 4 == 0 and len(out) >= 4
    # chunk 0 by hand: the first 4 shuffled prompts, seed 7 * 1_000_003 + 0
    ref = generate(model, prompts[:4], DecodeOptions(mode="full", max_new_tokens=12, temperature=0.9, top_p=0.9,
                                                     seed=7 * 1_000_003, eos_token_ids=(tok.eos_token_id,)))
    for d, p, r in zip(out[:4], prompts[:4], ref.rows):
        assert d.tolist() == p + r.ids
    new = sum(len(d) for d in out) - sum(len(prompts[i % len(prompts)]) for i in range(len(out)))
    assert new >= 30 and new - 4 * 12 < 30  # stops after the chunk that reaches N
    assert all(len(p) <= selfdata.OPENING_TOKENS for p in prompts)


def test_generated_cache_is_used_and_interruption_resumes_exactly(setup, tmp_path, monkeypatch):
    model, tok, docs = setup
    s = GenSettings(max_new_tokens=8, batch_size=2, seed=1)
    full = selfdata.generated_documents(model, tok, 40, docs, s, progress=False)
    key = selfdata.cache_key(model, tok, selfdata.build_prompts(tok, docs, 1), 40, s)
    assert selfdata.cache_path(key).is_file() and not selfdata.cache_path(key).with_suffix(".parts").exists()

    # A second cache: interrupted after two chunks, then resumed.
    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "cache2"))
    calls = {"n": 0}
    import eetune.decode.api as dec
    original = dec.generate

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(dec, "generate", flaky)
    with pytest.raises(KeyboardInterrupt):
        selfdata.generated_documents(model, tok, 40, docs, s, progress=False)
    assert not selfdata.cache_path(key).is_file()  # no half-written entry
    parts = sorted(selfdata.cache_path(key).with_suffix(".parts").glob("*"))
    assert [p.name for p in parts] == ["part-000000.safetensors", "part-000001.safetensors"]
    monkeypatch.setattr(dec, "generate", original)
    calls["n"] = 0
    resumed = selfdata.generated_documents(model, tok, 40, docs, s, progress=False)
    assert [d.tolist() for d in resumed] == [d.tolist() for d in full]


def test_cache_key_covers_settings_and_model(setup):
    model, tok, docs = setup
    prompts = selfdata.build_prompts(tok, docs, 0)
    k = selfdata.cache_key(model, tok, prompts, 10, GenSettings())
    assert k != selfdata.cache_key(model, tok, prompts, 11, GenSettings())
    assert k != selfdata.cache_key(model, tok, prompts, 10, GenSettings(temperature=0.5))
    assert k != selfdata.cache_key(model, tok, prompts[1:], 10, GenSettings())
    other = EarlyExitModel.convert(tiny_backbone("llama", seed=1), exit_layers=(1, 3), arch="norm")
    assert k != selfdata.cache_key(other, tok, prompts, 10, GenSettings())


def test_generated_needs_the_model(setup):
    _, tok, docs = setup
    with pytest.raises(EETuneError, match="eetune tune"):
        data.train_val_blocks(f"generated:10:{docs}", tok, seq_len=16)


def test_bad_generation_settings(setup):
    model, tok, docs = setup
    for s in (GenSettings(temperature=0), GenSettings(top_p=0), GenSettings(max_new_tokens=0)):
        with pytest.raises(EETuneError):
            selfdata.generated_documents(model, tok, 10, docs, s, progress=False)


# --- through the CLI ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    """A tiny model, its documents and exits (tests/tune_helpers.py), shared by the command-line
    tests of this module: they read it, and write their output and data cache under their own
    tmp_path (the autouse `private_cache`)."""
    return make_world(tmp_path_factory.mktemp("selfdata-cli"))


def test_tune_on_a_mixture_with_generated_data(cli_world, tmp_path, capsys):
    from eetune.cli import main
    w = cli_world
    out = tmp_path / "tuned"
    code = main(["tune", str(w["norm"]), "--data", f"{w['docs']}:0.5,generated:200:{w['docs']}:0.5", "--out",
                 str(out), "--steps", "3", "--seq-len", "16", "--batch-size", "2", "--val-blocks", "2",
                 "--gen-max-new-tokens", "16", "--gen-batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "exit_config.json").read_text())["training"]
    parts = summary["data"]["parts"]
    assert [p["source"] for p in parts] == [str(w["docs"]), f"generated:200:{w['docs']}"]
    assert summary["settings"]["gen_max_new_tokens"] == 16
    assert list((tmp_path / "cache" / "generated").glob("*.safetensors"))


def test_tune_with_the_lm_loss_only_on_generated_data(cli_world, tmp_path, capsys):
    """`--distill 0` without gates loaded the backbone only up to the deepest exit, and then
    generating `generated:N` data failed with "backbone layer 4 is not loaded": sampling needs
    every layer."""
    from eetune.cli import main
    w = cli_world
    out = tmp_path / "tuned"
    code = main(["tune", str(w["norm"]), "--data", f"generated:64:{w['docs']}", "--distill", "0", "--out", str(out),
                 "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--val-blocks", "1",
                 "--gen-max-new-tokens", "16", "--gen-batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "exit_config.json").read_text())["training"]
    assert summary["data"]["source"] == f"generated:64:{w['docs']}", summary["data"]


@pytest.mark.parametrize("spec, words", [("generated:0", "positive"), ("default:abc", "not a number"),
                                         ("generated:10:nowhere", "unknown source")])
def test_tune_refuses_bad_data_specs(cli_world, tmp_path, capsys, spec, words):
    from eetune.cli import main
    w = cli_world
    code = main(["tune", str(w["norm"]), "--data", spec, "--out", str(tmp_path / "t"), "--steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "t").exists()

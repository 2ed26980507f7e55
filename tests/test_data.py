"""Data sources (eetune.train.data): text, JSONL text and instruction formats through the chat template,
HF `datasets` local files, the token cache, and the held-out validation split."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from eetune.train import data
from eetune.errors import EETuneError

from tune_helpers import make_docs, make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    make_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EETUNE_CACHE", str(tmp_path / "cache"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_text_and_instruction_formats(tmp_path, tok):
    spec = write_jsonl(tmp_path / "mixed.jsonl", [
        {"text": "w1 w2"},
        {"instruction": "w3", "input": "w4", "response": "w5"},
        {"prompt": "w6", "completion": "w7"},
        {"messages": [{"role": "user", "content": "w8"}, {"role": "assistant", "content": "w9"}]},
    ])
    texts = data.load_texts(spec, tok)
    assert texts[0] == "w1 w2"
    assert texts[1] == "user w3\n\nw4 [EOS] assistant w5 [EOS] "
    assert texts[2] == "user w6 [EOS] assistant w7 [EOS] "
    assert texts[3] == "user w8 [EOS] assistant w9 [EOS] "


def test_instruction_rows_need_a_chat_template(tmp_path, tok):
    spec = write_jsonl(tmp_path / "inst.jsonl", [{"prompt": "w1", "completion": "w2"}])
    with pytest.raises(EETuneError, match="needs a tokenizer"):
        data.load_texts(spec)
    bare = type(tok).from_pretrained(tok.name_or_path)
    bare.chat_template = None
    with pytest.raises(EETuneError, match="no chat template"):
        data.load_texts(spec, bare)
    with pytest.raises(EETuneError, match="row 1 has none of"):
        data.load_texts(write_jsonl(tmp_path / "odd.jsonl", [{"question": "?"}]), tok)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "json"])
def test_datasets_local_files(tmp_path, tok, fmt):
    pytest.importorskip("datasets")
    import pandas as pd
    df = pd.DataFrame({"prompt": ["w1 w2", "w3"], "completion": ["w4", "w5 w6"]})
    path = tmp_path / f"rows.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "parquet": lambda: df.to_parquet(path),
     "json": lambda: df.to_json(path, orient="records", lines=True)}[fmt]()
    assert data.load_texts(str(path), tok) == ["user w1 w2 [EOS] assistant w4 [EOS] ",
                                               "user w3 [EOS] assistant w5 w6 [EOS] "]


def test_token_cache_is_used_and_keyed_by_content(tmp_path, tok, monkeypatch):
    docs = make_docs(tmp_path / "docs", n=5)
    first = data.tokenize_documents(str(docs), tok)
    calls = []
    real = data.load_texts
    monkeypatch.setattr(data, "load_texts", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = data.tokenize_documents(str(docs), tok)
    assert not calls and len(again) == 5 and all(torch.equal(a, b) for a, b in zip(first, again))
    (docs / "000.txt").write_text("w5 w5 w5")
    changed = data.tokenize_documents(str(docs), tok)
    assert calls and changed[0].tolist() == [5, 5, 5]


def test_validation_split_holds_out_whole_documents(tmp_path, tok):
    import random
    r, docs = random.Random(1), tmp_path / "docs"
    docs.mkdir()
    for d in range(40):  # random words: an 8-gram identifies its document
        (docs / f"{d:03d}.txt").write_text(" ".join(f"w{r.randrange(96)}" for _ in range(r.randrange(50, 150))))
    train, val, info = data.train_val_blocks(str(docs), tok, 32, val_blocks=4)
    assert val.shape == (4, 32) and train.shape[1] == 32 and info["val_blocks"] == 4
    grams = lambda b: {tuple(r[i:i + 8].tolist()) for r in b for i in range(25) if 96 not in r[i:i + 8]}
    assert grams(val) and not grams(val) & grams(train)
    again = data.train_val_blocks(str(docs), tok, 32, val_blocks=4)
    assert torch.equal(again[0], train) and torch.equal(again[1], val)
    none = data.train_val_blocks(str(docs), tok, 32, val_blocks=0)[1]
    assert none.shape[0] == 0


def test_token_cache_key_covers_the_normalizer_and_merges():
    """Regression (issue 11): the token-cache key ignored the tokenizer's merges and normalizer,
    so a tokenizer with the same vocabulary but another normalizer reused stale token ids."""
    from tokenizers import normalizers

    from conftest import word_tokenizer
    plain, lowered = word_tokenizer(), word_tokenizer()
    lowered.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert plain.get_vocab() == lowered.get_vocab()
    assert data.tokenizer_key(plain) != data.tokenizer_key(lowered)
    assert data.tokenizer_key(plain) == data.tokenizer_key(word_tokenizer())


def test_duplicate_documents_do_not_leak_into_validation(tmp_path, tok):
    """Regression (issue 11): duplicates were not removed before the split, so copies of one
    document could sit on both sides of it."""
    import random
    r, docs = random.Random(2), tmp_path / "docs"
    docs.mkdir()
    twin = " ".join(f"w{90 + i % 5}" for i in range(60))  # w90..w94 occur only in this document
    for d in range(30):
        (docs / f"{d:03d}.txt").write_text(" ".join(f"w{r.randrange(80)}" for _ in range(r.randrange(50, 150))))
    for d in range(30, 45):
        (docs / f"{d:03d}.txt").write_text(twin)
    train, val, info = data.train_val_blocks(str(docs), tok, 32, val_blocks=4)
    ids = tok(twin, add_special_tokens=False)["input_ids"]
    in_val, in_train = bool((val == ids[0]).any()), bool((train == ids[0]).any())
    assert in_val != in_train  # on exactly one side
    assert info["duplicates_removed"] == 14 and info["documents"] == 31


@pytest.mark.parametrize("content,match", [("", "is empty"), ("w1 w2", "fewer than one block"),
                                           (" ".join(["w1"] * 40), "at least 64")])
def test_too_little_data(tmp_path, tok, content, match):
    (tmp_path / "d.txt").write_text(content)
    with pytest.raises(EETuneError, match=match):
        data.train_val_blocks(str(tmp_path / "d.txt"), tok, 32, val_blocks=2)


# --- encodings: one line naming the file, not a traceback or silent replacement characters -------
def test_jsonl_that_is_not_utf8_names_the_file_and_line(tmp_path, tok):
    """Regression: a Latin-1 line in a .jsonl file raised a UnicodeDecodeError traceback."""
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "w1 w2"}\n' + '{"text": "caf\u00e9 w3"}\n'.encode("latin-1"))
    with pytest.raises(EETuneError) as e:
        data.load_texts(str(path), tok)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and f"{path} line 2 is not UTF-8 (byte 0xe9 at column 14)" in msg
    assert "re-save the file as UTF-8" in msg
    # a byte-order mark at the start is fine
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + b'{"text": "w1 w2"}\n{"text": "w3"}\n')
    assert data.load_texts(str(bom), tok) == ["w1 w2", "w3"]


@pytest.mark.parametrize("content,match", [
    (bytes(range(256)) * 8, "holds NUL bytes"),  # binary
    ("w1 w2 w3\n".encode("utf-16"), "holds NUL bytes"),  # UTF-16 text
    (("caf\u00e9 na\u00efve w1 w2 " * 50).encode("latin-1"), "is not UTF-8 text: 100 of its 850 bytes are invalid"),
], ids=["binary", "utf16", "latin1"])
def test_txt_that_is_mostly_not_utf8_is_refused(tmp_path, tok, content, match):
    """Regression: binary or mis-encoded .txt data was tokenised silently, full of U+FFFD."""
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(EETuneError, match=match) as e:
        data.load_texts(str(path), tok)
    assert len(str(e.value).splitlines()) == 1 and str(path) in str(e.value) and "re-save it as UTF-8" in str(e.value)
    # in a folder of .txt files too, naming the file
    folder = tmp_path / "docs"
    make_docs(folder, n=3)
    (folder / "zz.txt").write_bytes(content)
    with pytest.raises(EETuneError, match=match) as e:
        data.load_texts(str(folder), tok)
    assert str(folder / "zz.txt") in str(e.value)


def test_txt_with_a_few_bad_bytes_is_read_with_a_warning(tmp_path, tok, capsys):
    path = tmp_path / "mostly.txt"
    path.write_bytes(b"w1 w2 w3 " * 100 + b"\nw4 \xe9 w5\n")  # 1 bad byte in 911
    texts = data.load_texts(str(path), tok)
    assert texts[0].endswith("w4 \ufffd w5\n")
    err = capsys.readouterr().err.strip()
    assert err == (f"eetune: warning: {path} has 1 byte that is not UTF-8 (first on line 2); read as replacement "
                   f"characters (re-save it as UTF-8 to keep them)")
    good = tmp_path / "good.txt"
    good.write_text("w1 \u00e9 w2", encoding="utf-8")
    assert data.load_texts(str(good), tok) == ["w1 \u00e9 w2"] and capsys.readouterr().err == ""

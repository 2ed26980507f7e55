"""`eetune export`: an exit as a standalone draft model (eetune.serve.export). Tiny random models of
every family (tests/conftest.py): the exported model's logits are the exit's, transformers' assisted
generation with it as the draft gives the plain greedy tokens, the GGUF loads back through
transformers with the same logits, and what cannot be exported exactly is refused in one line."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import V, tiny_backbone, peaky_backbone
from eetune.cli import main
from eetune.errors import EETuneError
from eetune.model.backbone import load_backbone
from eetune.model.early_exit import EarlyExitModel
from eetune.serve.export import export_draft


def _tuned(model, seed=1, scale=0.05):
    """Perturb every head weight (as tuning would): a copied head that still equals the backbone's
    modules would hide a wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.heads.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _ids(B=2, T=11, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def bpe_tokenizer_dir(path):
    """A byte-level BPE tokenizer over the tiny vocabulary (what --format gguf writes): `<s>`, `</s>`
    and 95 byte symbols, no merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())[:V - 2]
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return path


CASES = [(f, a, e) for f in ("llama", "qwen3", "gemma3", "gpt2")
         for a, e in (("norm", "shared"), ("mlp", "copy"), ("layer", "copy"))] + [
    ("gemma3", "mlp", "shared"), ("mistral", "mlp", "copy"), ("qwen2", "layer", "shared"), ("gemma", "norm", "copy"),
    ("gemma2", "mlp", "copy")]


@pytest.mark.parametrize("family,arch,emb", CASES)
def test_exported_model_has_the_exits_logits(family, arch, emb, tmp_path):
    """Saved and loaded back by plain `AutoModelForCausalLM.from_pretrained` (no custom code), the
    draft's logits equal the exit's in fp32, with windows shorter than the input (mistral, gemma2/3)."""
    bb = tiny_backbone(family)
    model = _tuned(EarlyExitModel.convert(bb, [2, 4], arch=arch, output_embedding=emb))
    k = 4 if arch == "layer" and family == "llama" else 2  # an exit after the last layer too
    res = export_draft(model, k, tmp_path / "draft")
    assert {"config.json", "generation_config.json", "model.safetensors"} <= set(os.listdir(tmp_path / "draft"))
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft", dtype=torch.float32, trust_remote_code=False)
    assert draft.config.num_hidden_layers == k + (arch != "norm") == res.num_layers
    assert draft.config.tie_word_embeddings == (emb == "shared" and bb.config.tie_word_embeddings)
    ids = _ids()
    with torch.no_grad():
        want = model(ids).exit_logits[k]
        got = draft(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    # the input embedding stays the backbone's even where the output projection is the exit's own
    assert torch.equal(draft.get_input_embeddings().weight, bb.model.get_input_embeddings().weight)


@pytest.mark.parametrize("family,arch", [("llama", "mlp"), ("gpt2", "layer")])
def test_assisted_generation_with_the_draft_is_the_plain_greedy_output(family, arch):
    """(Not Gemma-3: transformers 5.17's assisted generation fails on it once drafts are accepted and
    the sequence outgrows the sliding window, even with the model itself as the draft.)"""
    bb = peaky_backbone(family)
    model = _tuned(EarlyExitModel.convert(bb, [2], arch=arch), scale=0.02)
    from eetune.serve.export import draft_model
    draft = draft_model(model, 2)
    ids = _ids(1, 6, seed=3)
    plain = bb.model.generate(ids, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assisted = bb.model.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(plain, assisted)


@pytest.mark.parametrize("family,arch,gtype", [("llama", "mlp", "f32"), ("llama", "layer", "f16"),
                                               ("qwen2", "norm", "f32")])
def test_gguf_loads_back_through_transformers_with_the_exits_logits(family, arch, gtype, tmp_path):
    bb = tiny_backbone(family)
    bb.model_path = str(bpe_tokenizer_dir(tmp_path / "tok"))
    model = _tuned(EarlyExitModel.convert(bb, [2], arch=arch))
    export_draft(model, 2, tmp_path / "d.gguf", format="gguf", gguf_type=gtype)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="d.gguf", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).exit_logits[2]).abs().max().item()
    assert diff <= (1e-5 if gtype == "f32" else 5e-2)


def test_gguf_refuses_what_would_not_load_back_as_the_same_model(tmp_path):
    tok = str(bpe_tokenizer_dir(tmp_path / "tok"))
    for family, match in (("qwen3", "head_dim .* GGUF loader rebuilds"), ("gemma3", "layer_types"),
                          ("gpt2", "--format gguf writes"), ("mistral", "--format gguf writes")):
        bb = tiny_backbone(family)
        bb.model_path = tok
        model = EarlyExitModel.convert(bb, [2], arch="norm")
        with pytest.raises(EETuneError, match=match):
            export_draft(model, 2, tmp_path / f"{family}.gguf", format="gguf")
        assert not (tmp_path / f"{family}.gguf").exists()
    bb = tiny_backbone("llama")  # no tokenizer beside it
    with pytest.raises(EETuneError, match="tokenizer.json"):
        export_draft(EarlyExitModel.convert(bb, [2]), 2, tmp_path / "x.gguf", format="gguf")
    assert [p for p in os.listdir(tmp_path) if p != "tok"] == []  # nothing half-written


def test_restricted_heads_are_refused_unless_other_rows(tmp_path):
    bb = tiny_backbone("llama")
    model = EarlyExitModel.convert(bb, [2], arch="mlp")
    model.restrict_vocab(torch.arange(0, V, 3))
    head = model.head(2)
    with torch.no_grad():
        head.other_weight.normal_(0, 0.3)
        head.other_bias.fill_(0.2)
    with pytest.raises(EETuneError, match="OTHER class.*--other-rows"):
        export_draft(model, 2, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    export_draft(model, 2, tmp_path / "d", other_rows=True)
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    ids = _ids(4, 16)
    with torch.no_grad():
        logits = model(ids).exit_logits[2]
        got = draft(ids).logits.argmax(-1)
    _, want = head.predict(logits)
    known = want >= 0  # OTHER did not win: the draft proposes the head's token
    assert known.any() and (~known).any()
    assert torch.equal(got[known], want[known])
    with torch.no_grad():
        head.other_bias.fill_(-0.1)
    with pytest.raises(EETuneError, match="negative bias"):
        export_draft(model, 2, tmp_path / "e", other_rows=True)


def test_a_restriction_to_the_whole_vocabulary_exports_exactly(tmp_path):
    bb = tiny_backbone("gpt2")
    model = _tuned(EarlyExitModel.convert(bb, [3], arch="norm", output_embedding="shared"))
    model.restrict_vocab(torch.randperm(V, generator=torch.Generator().manual_seed(0)))
    export_draft(model, 3, tmp_path / "d")
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "d", dtype=torch.float32)
    ids = _ids()
    with torch.no_grad():
        want = model.head(3).to_vocab(model(ids).exit_logits[3])
        assert (draft(ids).logits - want).abs().max().item() <= 1e-5


def test_embedding_exits_are_refused_in_one_line(tmp_path):
    model = EarlyExitModel.convert(tiny_backbone("qwen2"), [2], arch="embedding")
    with pytest.raises(EETuneError, match="final norm") as e:
        export_draft(model, 2, tmp_path / "d")
    assert "\n" not in str(e.value)


def test_cli_export_and_its_refusals(tiny_model_dir, tmp_path, capsys):
    bb = load_backbone(str(tiny_model_dir))
    exits = tmp_path / "exits"
    _tuned(EarlyExitModel.convert(bb, [1, 3], arch="mlp")).save_pretrained(exits)
    out = tmp_path / "draft"
    assert main(["export", str(exits), "--exit", "3", "--out", str(out)]) == 0
    assert "mlp exit after layer 3 as a 4-layer" in capsys.readouterr().out
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    for argv, match in (
            (["export", str(exits), "--exit", "3", "--out", str(out)], "exists and is not empty.*--force"),
            (["export", str(exits), "--exit", "2", "--out", str(tmp_path / "n")], "no exit after layer 2"),
            (["export", str(tmp_path / "nope"), "--exit", "3", "--out", str(tmp_path / "n")], "not found"),
            (["export", str(exits), "--exit", "3", "--out", str(tmp_path / "n.gguf"), "--format", "gguf"],
             "tokenizer.json")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("eetune: error: ") and err.count("\n") == 1 and __import__("re").search(match, err), err
    assert not (tmp_path / "n").exists() and not (tmp_path / "n.gguf").exists()
    assert main(["export", str(exits), "--exit", "1", "--out", str(out), "--force"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    model = EarlyExitModel.from_pretrained(exits)
    model.restrict_vocab(torch.arange(10))
    model.save_pretrained(tmp_path / "k")
    assert main(["export", str(tmp_path / "k"), "--exit", "3", "--out", str(tmp_path / "n")]) == 2
    assert "--other-rows" in capsys.readouterr().err


@pytest.mark.realmodel
def test_real_mlp_exit_exports_with_its_logits(tmp_path):
    """The committed H100-tuned mlp exits of SmolLM2-135M: exit 20 as a 21-layer Llama."""
    from pathlib import Path

    from eetune.model.backbone import load_tokenizer
    exits = Path(__file__).resolve().parents[1] / "benchmarks" / "exits" / "smollm2-mlp-10-20-h100"
    model = EarlyExitModel.from_pretrained(exits, partial=True)
    res = export_draft(model, 20, tmp_path / "draft")
    assert res.num_layers == 21
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(tmp_path / "draft"))
    draft = AutoModelForCausalLM.from_pretrained(tmp_path / "draft", dtype=torch.float32)
    ids = load_tokenizer(model.backbone)(["The capital of France is"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(ids).exit_logits[20]
        got = draft(ids).logits
    assert (got - want).abs().max().item() <= 1e-4

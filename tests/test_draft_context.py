"""`--draft-context` (DecodeOptions.draft_context): a restricted draft head also proposes the
prompts' tokens outside its K. The engine against the reference decoder (tests/reference.py, which
writes the extended classes out whole), lossless against `full`, and the tokens it drafts."""

import pytest
import torch

from eetune.decode import DecodeOptions, engine, generate
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel

from conftest import V, peaky_backbone
from reference import reference_generate

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [60, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def ids_of(g):
    return [r.ids for r in g.rows]


def context_model(family, arch, exits=(1, 3), seed=0):
    """Exits restricted to every token but those of the prompts that `full` emits again (and a
    few others): without the prompts' tokens the draft head cannot propose what the model copies."""
    model = EarlyExitModel.convert(peaky_backbone(family, scale=8.0), list(exits), arch=arch,
                                   output_embedding="shared")
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=16))
    copied = {t for p, r in zip(PROMPTS, full.rows) for t in set(p) & set(r.ids)}
    assert copied, "the test needs a model that repeats some prompt tokens"
    g = torch.Generator().manual_seed(seed)
    others = [t for t in torch.randperm(V, generator=g).tolist() if t not in copied][:5]
    drop = copied | set(others)
    model.restrict_vocab(torch.tensor([t for t in torch.randperm(V, generator=g).tolist() if t not in drop]))
    return model, drop


@pytest.mark.parametrize("family,arch,shape", [("llama", "mlp", "eager"), ("qwen3", "norm", "eager"),
                                               ("gemma2", "norm", "static"), ("gemma3", "mlp", "static"),
                                               ("gpt2", "layer", "static")])
def test_draft_context_equals_reference_and_full(family, arch, shape, monkeypatch):
    """Batch 1 and a left-padded batch: the engine drafts, accepts and emits what the reference
    does, the text is `full`'s, and it drafts prompt tokens outside K (never other tokens outside
    K), accepting more than the same head without the prompts' tokens."""
    monkeypatch.setattr(engine, "STATIC_ON_CPU", shape == "static")
    model, drop = context_model(family, arch)
    vocab = set(model.heads[0].vocab_ids.tolist())
    for prompts in ([PROMPTS[0]], PROMPTS):
        kw = dict(mode="self-spec", threshold=0.0, draft_len=3, max_new_tokens=16)
        full = generate(model, prompts, DecodeOptions(mode="full", max_new_tokens=16))
        g = generate(model, prompts, DecodeOptions(**kw, draft_context=True))
        ref = reference_generate(model, prompts, DecodeOptions(**kw, draft_context=True))
        plain = generate(model, prompts, DecodeOptions(**kw))
        assert ids_of(g) == ids_of(ref) == ids_of(full) == ids_of(plain)
        assert (g.drafted, g.accepted) == (ref.drafted, ref.accepted)
        prompt_tokens = {t for p in prompts for t in p}
        drafted = {t.token for r in g.rows for t in r.tokens if t.drafted}
        assert drafted <= vocab | prompt_tokens
        assert drafted & drop, "no prompt token outside K was drafted"
        assert not {t.token for r in plain.rows for t in r.tokens if t.drafted} - vocab
        assert g.accepted > plain.accepted


def test_draft_context_sampling_equals_reference_with_seed():
    model, _ = context_model("qwen2", "mlp")
    kw = dict(mode="self-spec", threshold=0.2, draft_len=3, max_new_tokens=16, temperature=0.8, top_p=0.9, seed=3,
              draft_context=True)
    g = generate(model, PROMPTS, DecodeOptions(**kw))
    ref = reference_generate(model, PROMPTS, DecodeOptions(**kw))
    assert ids_of(g) == ids_of(ref) and (g.drafted, g.accepted) == (ref.drafted, ref.accepted)


def test_draft_context_needs_a_restricted_draft_head():
    model = EarlyExitModel.convert(peaky_backbone("llama"), [1, 3], arch="mlp", output_embedding="shared")
    with pytest.raises(EETuneError, match="--draft-context .* whole vocabulary"):
        generate(model, [PROMPTS[0]], DecodeOptions(mode="self-spec", draft_context=True, max_new_tokens=4))
    # other modes ignore it
    generate(model, [PROMPTS[0]], DecodeOptions(mode="full", draft_context=True, max_new_tokens=4))

"""The lean engine (engine.py) against the reference engine (decode.py): same tokens, same logits,
every mode and family, batches; gates, draft vocabulary, the draft policy; regression tests of
the decoding defects of issue 7."""

import pytest
import torch

from eetune.decode import DecodeOptions, confidence, generate
from eetune.errors import EETuneError
from eetune.gates import ExitGate
from eetune.model import EarlyExitModel

from conftest import FAMILIES, H, L, V, peaky_backbone

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [60, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def ids_of(gen):
    return [r.ids for r in gen.rows]


def both(model, prompts, **kw):
    opts = dict(kw, record_logits=True)
    lean = generate(model, prompts, DecodeOptions(engine="lean", **opts))
    ref = generate(model, prompts, DecodeOptions(engine="reference", **opts))
    return lean, ref


def assert_same(lean, ref, tol=1e-4):
    assert ids_of(lean) == ids_of(ref)
    assert [[t.exit_layer for t in r.tokens] for r in lean.rows] == [[t.exit_layer for t in r.tokens] for r in ref.rows]
    assert len(lean.step_logits) == len(ref.step_logits)
    for (s1, l1, x1), (s2, l2, x2) in zip(lean.step_logits, ref.step_logits):
        assert s1 == s2 and torch.equal(l1.long().cpu(), l2.long().cpu())
        assert (x1.float() - x2.float()).abs().max().item() <= tol, s1


def mixing_threshold(model, prompt, n=30, layer=1, q=0.5):
    """A max-prob threshold at a quantile of exit `layer`'s confidence along the full output."""
    full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=n)).rows[0].ids
    conf = confidence(model(torch.tensor([prompt + full])).exit_logits[layer][0, len(prompt):], "max-prob")
    return conf.quantile(q).item()


@pytest.mark.parametrize("family", FAMILIES)
def test_lean_equals_reference_every_mode(family):
    bb = peaky_backbone(family, scale=8.0)
    model = EarlyExitModel.convert(bb, [1, 3], arch="mlp")
    thr = mixing_threshold(model, PROMPTS[0])
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1 and a left-padded batch
        assert_same(*both(model, prompts, mode="full", max_new_tokens=20))
        lean, ref = both(model, prompts, mode="early-exit", threshold=thr, max_new_tokens=30)
        assert_same(lean, ref)
        assert {t.exit_layer for r in lean.rows for t in r.tokens} >= {1, L}  # exits mixed
        lean, ref = both(model, prompts, mode="self-spec", threshold=0.3, draft_len=3, max_new_tokens=20)
        assert ids_of(lean) == ids_of(ref) == ids_of(generate(model, prompts, DecodeOptions(mode="full",
                                                                                            max_new_tokens=20)))
        assert lean.drafted > 0


@pytest.mark.parametrize("arch", ["norm", "layer"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_lean_equals_reference_other_heads(family, arch):
    model = EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 2], arch=arch)
    thr = mixing_threshold(model, PROMPTS[2], q=0.4)
    assert_same(*both(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=24))
    lean, ref = both(model, PROMPTS, mode="self-spec", threshold=0.2, draft_len=4, max_new_tokens=16)
    assert ids_of(lean) == ids_of(ref)


def test_lean_sampling_equals_reference_with_seed():
    model = EarlyExitModel.convert(peaky_backbone("qwen2", scale=3.0), [1, 3], arch="mlp")
    for mode, kw in (("full", {}), ("early-exit", {"threshold": 0.5}), ("self-spec", {"threshold": 0.2})):
        lean, ref = both(model, PROMPTS, mode=mode, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=16, **kw)
        assert ids_of(lean) == ids_of(ref), mode


def gated(model, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    gates = {}
    for k in model.exit_layers:
        gate = ExitGate(H)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(H, generator=g))
            gate.bias.fill_(bias)
        gates[k] = gate
    model.set_gates(gates)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_gate_mode_lean_equals_reference(family):
    model = gated(EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 3], arch="mlp"))
    lean, ref = both(model, PROMPTS, mode="early-exit", confidence="gate", threshold=0.6, max_new_tokens=30)
    assert_same(lean, ref)
    layers = {t.exit_layer for r in lean.rows for t in r.tokens}
    assert len(layers) >= 2, layers  # the random gates fire sometimes, not always
    lean, ref = both(model, PROMPTS, mode="self-spec", confidence="gate", threshold=0.4, max_new_tokens=20)
    assert ids_of(lean) == ids_of(ref)


def test_gate_above_one_equals_full():
    model = gated(EarlyExitModel.convert(peaky_backbone("llama", scale=8.0), [1, 3], arch="mlp"), bias=50.0)
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20))
    for engine in ("lean", "reference"):
        g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", confidence="gate", threshold=1.01,
                                                   max_new_tokens=20, engine=engine))
        assert ids_of(g) == ids_of(full)
        assert all(t.exit_layer == L for r in g.rows for t in r.tokens)
    # the same gates at a threshold below their (saturated) output exit every token at exit 1
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", confidence="gate", threshold=0.99, max_new_tokens=5))
    assert all(t.exit_layer == 1 for r in g.rows for t in r.tokens)


def test_gate_skips_the_head_when_it_does_not_fire():
    """A gate that never fires must not run the exit's head (the point of gates)."""
    model = gated(EarlyExitModel.convert(peaky_backbone("llama"), [1, 3], arch="mlp"), bias=-50.0)
    calls = []
    for head in model.heads:
        head.register_forward_pre_hook(lambda m, a: calls.append(m.layer))
        for sub in head.mlp:
            sub.register_forward_pre_hook(lambda m, a: calls.append("mlp"))
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", confidence="gate", threshold=0.5,
                                               max_new_tokens=8))
    assert calls == [] and all(t.exit_layer == L for r in g.rows for t in r.tokens)


@pytest.mark.parametrize("engine", ["lean", "reference"])
def test_draft_vocab_self_spec_is_lossless(engine):
    model = EarlyExitModel.convert(peaky_backbone("qwen2", scale=8.0), [1, 3], arch="mlp")
    model.vocab_by_frequency = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20)))
    for k in (1, 10, 50, V):
        g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, draft_vocab=k, max_new_tokens=20,
                                                   engine=engine))
        assert ids_of(g) == full, k
    # drafts come only from the K kept tokens: with K = 1 every accepted draft is that token
    g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, draft_vocab=1, max_new_tokens=20))
    top = int(model.vocab_by_frequency[0])
    assert all(t.token == top for r in g.rows for t in r.tokens if t.drafted)


@pytest.mark.parametrize("conf", ["entropy", "margin", "max-prob"])
def test_draft_vocab_confidence_is_that_of_the_whole_vocabulary(conf):
    """Review finding: with a draft vocabulary the lean engine normalised the draft's entropy by
    log K, the reference engine (logits masked outside the K tokens) by log V: the same threshold
    proposed different drafts."""
    model = EarlyExitModel.convert(peaky_backbone("llama", scale=8.0), [1, 2, 3], arch="mlp")
    model.vocab_by_frequency = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    lean, ref = both(model, PROMPTS[:2], mode="self-spec", confidence=conf, threshold=0.8, draft_len=3, draft_exit=2,
                     draft_vocab=30, temperature=0.8, seed=1, max_new_tokens=38)
    assert ids_of(lean) == ids_of(ref) and lean.drafted == ref.drafted


def test_draft_vocab_lean_equals_reference_sampled():
    model = EarlyExitModel.convert(peaky_backbone("llama", scale=3.0), [2], arch="mlp")
    model.vocab_by_frequency = torch.arange(V).flip(0)
    lean, ref = both(model, PROMPTS, mode="self-spec", threshold=0.0, draft_vocab=30, temperature=1.0, seed=5,
                     max_new_tokens=16)
    assert ids_of(lean) == ids_of(ref)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_draft_exit_auto_is_lossless(family, capsys):
    model = EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 2, 3], arch="mlp")
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=24)))
    g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", draft_exit="auto", threshold=0.2,
                                               max_new_tokens=24, verbose=True))
    assert ids_of(g) == full
    err = capsys.readouterr().err
    assert "draft policy" in err and "exit 1" in err and "expected speedup" in err
    assert g.policy is not None and sum(s[1] for s in g.policy.stats.values()) == g.drafted


def test_self_spec_cache_keeps_no_holes():
    """Batch 1: after decoding, the cache holds exactly prompt + generated - 1 slots (the last
    token is never fed back), however many drafts were rejected on the way."""
    from eetune import engine as eng_mod
    model = EarlyExitModel.convert(peaky_backbone("llama", scale=8.0), [1, 2], arch="mlp")
    seen = {}
    orig = eng_mod.Engine.self_spec_round

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        seen["slot"], seen["n"] = self.slot, list(self.cache.n)
        return out
    eng_mod.Engine.self_spec_round = spy
    try:
        g = generate(model, [PROMPTS[0]], DecodeOptions(mode="self-spec", threshold=0.0, draft_len=4,
                                                        max_new_tokens=30))
    finally:
        eng_mod.Engine.self_spec_round = orig
    assert g.drafted > g.accepted > 0  # some drafts were rejected
    expect = len(PROMPTS[0]) + len(g.rows[0].ids) - 1
    assert seen["slot"] == expect and set(seen["n"]) == {expect}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_screened_max_prob(family):
    """The screen over the K most frequent tokens: with K = V it is max-prob itself; with a
    small K the lean engine (which skips the full projection when the screen fails) equals the
    reference (which computes everything and requires both tests to pass)."""
    model = EarlyExitModel.convert(peaky_backbone(family, scale=8.0), [1, 3], arch="mlp")
    full_rank = model(torch.tensor([PROMPTS[2]])).exit_logits[1][0].softmax(-1).sum(0)
    model.vocab_by_frequency = full_rank.argsort(descending=True)
    thr = mixing_threshold(model, PROMPTS[0])
    plain = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=thr, max_new_tokens=24))
    same = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=thr, max_new_tokens=24,
                                                  screen_vocab=V))
    assert ids_of(same) == ids_of(plain)
    for k in (8, 30):
        lean, ref = both(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=24, screen_vocab=k)
        assert_same(lean, ref)
        assert all(t.confidence >= thr for r in lean.rows for t in r.tokens if t.exit_layer < L)


def test_gate_filter():
    """max-prob behind a gate prefilter: a gate that always fires changes nothing, one that never
    fires skips every head, and the lean engine equals the reference in between."""
    model = EarlyExitModel.convert(peaky_backbone("llama", scale=8.0), [1, 3], arch="mlp")
    model.vocab_by_frequency = torch.arange(V)
    thr = mixing_threshold(model, PROMPTS[0])
    plain = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=thr, max_new_tokens=24))
    gated(model, bias=50.0)
    same = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=thr, gate_filter=0.5,
                                                  max_new_tokens=24))
    assert ids_of(same) == ids_of(plain)
    gated(model, seed=3)
    for screen in (None, 40):
        lean, ref = both(model, PROMPTS, mode="early-exit", threshold=thr, gate_filter=0.5, screen_vocab=screen,
                         max_new_tokens=24)
        assert_same(lean, ref)
    gated(model, bias=-50.0)
    calls = []
    for head in model.heads:
        head.register_forward_pre_hook(lambda m, a: calls.append(m.layer))
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=0.0, gate_filter=0.5, max_new_tokens=6))
    assert calls == [] and all(t.exit_layer == L for r in g.rows for t in r.tokens)


# --- regression tests of issue 7's defects ---------------------------------------------------
@pytest.mark.parametrize("engine", ["lean", "reference"])
def test_exit_after_last_layer_early_exit(engine):
    """`--exits 10,30` on a 30-layer model crashed early-exit decoding with KeyError: 30."""
    model = EarlyExitModel.convert(peaky_backbone("llama", scale=8.0), [1, L], arch="norm")
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=0.5, max_new_tokens=12, engine=engine))
    assert all(len(r.ids) == 12 for r in g.rows)
    # a norm/copy exit after the last layer reads what the final layer reads: every token not
    # taken at exit 1 is the full model's greedy token for its prefix
    layers = [t.exit_layer for r in g.rows for t in r.tokens]
    assert 1 in layers and L in layers
    for p, r in zip(PROMPTS, g.rows):
        out = model(torch.tensor([p + r.ids]), final=True)
        for i, t in enumerate(r.tokens):
            if t.exit_layer == L:
                assert t.token == int(out.final_logits[0, len(p) + i - 1].argmax())


def test_exit_after_last_layer_lean_equals_reference():
    model = EarlyExitModel.convert(peaky_backbone("llama", scale=8.0), [1, L], arch="mlp")
    assert_same(*both(model, PROMPTS, mode="early-exit", threshold=0.6, max_new_tokens=16))


@pytest.mark.parametrize("engine", ["lean", "reference"])
def test_unseeded_sampling_leaves_global_rng_alone(engine):
    model = EarlyExitModel.convert(peaky_backbone("llama"), [2])
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, [PROMPTS[0]], DecodeOptions(mode="full", temperature=1.0, max_new_tokens=4, engine=engine))
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("engine", ["lean", "reference"])
def test_self_spec_never_drafts_past_the_context(engine):
    """GPT-2 has a fixed number of positions: drafting must stop at the end of the request."""
    model = EarlyExitModel.convert(peaky_backbone("gpt2", scale=8.0), [1, 2], arch="mlp")
    limit = model.backbone.config.n_positions
    prompt = [(7 * i) % 90 + 1 for i in range(limit - 10)]
    g = generate(model, [prompt], DecodeOptions(mode="self-spec", threshold=0.0, draft_len=8, max_new_tokens=10,
                                                engine=engine))
    full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=10))
    assert ids_of(g) == ids_of(full)


@pytest.mark.parametrize("kw,msg", [
    ({"mode": "self-spec", "draft_vocab": 0}, "outside 1.."),
    ({"mode": "self-spec", "draft_vocab": V + 1}, "outside 1.."),
    ({"mode": "self-spec", "draft_vocab": 5}, "token frequencies"),
    ({"mode": "early-exit", "confidence": "gate"}, "no gates"),
    ({"mode": "self-spec", "draft_exit": "best"}, "not one of the exits"),
    ({"mode": "self-spec", "draft_exit": "auto", "engine": "reference"}, "lean engine"),
    ({"engine": "turbo"}, "unknown engine"),
    ({"mode": "early-exit", "screen_vocab": 0}, "outside 1.."),
    ({"mode": "early-exit", "screen_vocab": 4}, "token frequencies"),
    ({"mode": "early-exit", "screen_vocab": 4, "confidence": "margin"}, "max-prob only"),
    ({"mode": "early-exit", "gate_filter": 0.5}, "no gates")])
def test_bad_new_options(kw, msg):
    model = EarlyExitModel.convert(peaky_backbone("llama"), [2])
    with pytest.raises(EETuneError, match=msg):
        generate(model, [[1, 2]], DecodeOptions(**kw))

"""The engine (eetune.decode.engine) against the reference decoder (tests/reference.py): same tokens,
same exit layers, logits within float tolerance, every mode and family, batch 1 and left-padded
batches, gates, `layer` and `norm` exits, the draft vocabulary, the draft policy, replayed
decisions, restricted-vocabulary exit heads (K tokens + OTHER); and the regression tests of the
decoding defects found so far.

Every equality test runs both of the engine's shapes: `eager` (what a CPU runs: exact token
counts, attention over the slots written so far) and `static` (what a GPU records as CUDA
graphs: bucketed token counts padded after the real tokens, whole-cache attention under a mask;
run unrecorded here through `engine.STATIC_ON_CPU`). Where CUDA is present the same checks run on
the GPU with recorded graphs."""

import pytest
import torch

from eetune.decode import engine
from eetune.decode import DecodeOptions, confidence, generate
from eetune.errors import EETuneError
from eetune.model.gates import ExitGate
from eetune.model.early_exit import EarlyExitModel
from eetune.model.heads import ExitHead

from conftest import FAMILIES, H, L, V, peaky_backbone
from reference import reference_generate

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [60, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
BF16_TOL = 0.1  # bf16 logits of the engine vs the reference, same device (|logits| ~ 10)


@pytest.fixture(params=["eager", "static"])
def shape(request, monkeypatch):
    monkeypatch.setattr(engine, "STATIC_ON_CPU", request.param == "static")
    return request.param


def ids_of(gen):
    return [r.ids for r in gen.rows]


def model_on(family, exits=(1, 3), arch="mlp", device="cpu", dtype=torch.float32, scale=8.0, output_embedding="copy"):
    bb = peaky_backbone(family, scale=scale)
    bb.model.to(device=device, dtype=dtype)
    return EarlyExitModel.convert(bb, list(exits), arch=arch, output_embedding=output_embedding)


def kmodel(family, exits=(1, 3), arch="mlp", output_embedding="copy", drop=4, other=0.35, seed=0, **kw):
    """A model whose exit heads are restricted to all token ids but `drop` (in shuffled order),
    with an OTHER row that wins for some tokens: a random direction, and a bias (made large
    enough) so that OTHER wins at about `other` of the positions of the full model's output
    for PROMPTS[0] at each exit (teacher-forced). Where it wins the token must go deeper."""
    model = model_on(family, exits, arch=arch, output_embedding=output_embedding, **kw)
    bb = model.backbone
    full = generate(model, [PROMPTS[0]], DecodeOptions(mode="full", max_new_tokens=24)).rows[0].ids
    g = torch.Generator().manual_seed(seed)
    model.restrict_vocab(torch.randperm(V, generator=g)[drop:])
    cap = bb.logit_softcap
    with torch.no_grad():
        for head in model.heads:
            head.other_weight.copy_(torch.randn(H, generator=g) * bb.lm_head.weight.std().item())
        out = model(torch.tensor([PROMPTS[0] + full], device=bb.lm_head.weight.device))
        for head in model.heads:
            x = out.exit_logits[head.layer][0, len(PROMPTS[0]) - 1:].float()
            if cap:  # the margin before soft-capping (monotone: the same class wins)
                x = cap * torch.atanh((x / cap).clamp(-1 + 1e-6, 1 - 1e-6))
            margin = x[:, :-1].amax(-1) - x[:, -1]  # OTHER wins where its bias exceeds this
            head.other_bias.fill_(margin.quantile(other).item())
    return model


def pair(model, prompts, **kw):
    opts = dict(kw, record_logits=True)
    g = generate(model, prompts, DecodeOptions(**opts))
    opts.pop("compile", None)
    ref = reference_generate(model, prompts, DecodeOptions(**opts))
    return g, ref


def assert_same(g, ref, tol=1e-4):
    assert ids_of(g) == ids_of(ref)
    assert [[t.exit_layer for t in r.tokens] for r in g.rows] == [[t.exit_layer for t in r.tokens] for r in ref.rows]
    assert len(g.step_logits) == len(ref.step_logits)
    for (s1, l1, x1), (s2, l2, x2) in zip(g.step_logits, ref.step_logits):
        assert s1 == s2 and torch.equal(l1.long().cpu(), l2.long().cpu())
        x1, x2 = x1.float().cpu(), x2.float().cpu()
        # a restricted head's logits over the vocabulary are -inf outside its tokens, in both
        assert torch.equal(torch.isneginf(x1), torch.isneginf(x2)), s1
        finite = ~torch.isneginf(x1)
        assert (x1[finite] - x2[finite]).abs().max().item() <= tol, s1


def mixing_threshold(model, prompt, n=30, layer=1, q=0.5):
    """A max-prob threshold at a quantile of exit `layer`'s confidence along the full output."""
    full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=n)).rows[0].ids
    ids = torch.tensor([prompt + full], device=model.backbone.lm_head.weight.device)
    conf = confidence(model(ids).exit_logits[layer][0, len(prompt):], "max-prob")
    return conf.float().quantile(q).item()


def gated(model, seed=0, bias=0.0):
    g = torch.Generator().manual_seed(seed)
    dev = model.backbone.lm_head.weight.device
    gates = {}
    for k in model.exit_layers:
        gate = ExitGate(H, device=dev)
        with torch.no_grad():
            gate.weight.copy_(torch.randn(H, generator=g).to(dev))
            gate.bias.fill_(bias)
        gates[k] = gate
    model.set_gates(gates)
    return model


# Families whose geometry the static shape builds differently: rotary (llama), sliding windows
# (mistral; gemma2's alternate layers with soft-capping; gemma3's pattern with a local rotary) and
# learned positions (gpt2). qwen2, qwen3 and gemma differ from llama only inside their layers, which
# the static shape runs alike: they run eager only (every family still runs every mode).
STATIC_FAMILIES = ["llama", "mistral", "gemma2", "gemma3", "gpt2"]
EVERY_FAMILY_SOME_SHAPE = ([(f, "eager") for f in FAMILIES] +
                           [(f, "static") for f in STATIC_FAMILIES])


# --- the engine equals the reference ---------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family,shape", EVERY_FAMILY_SOME_SHAPE, indirect=["shape"])
def test_engine_equals_reference_every_mode(family, device, shape):
    model = model_on(family, device=device)
    thr = mixing_threshold(model, PROMPTS[0])
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1 and a left-padded batch
        full, ref = pair(model, prompts, mode="full", max_new_tokens=20)
        assert_same(full, ref)
        g, ref = pair(model, prompts, mode="early-exit", threshold=thr, max_new_tokens=30)
        assert_same(g, ref)
        assert {t.exit_layer for r in g.rows for t in r.tokens} >= {1, L}  # exits mixed
        g, ref = pair(model, prompts, mode="self-spec", threshold=0.3, draft_len=3, max_new_tokens=20)
        assert ids_of(g) == ids_of(ref) == ids_of(full)
        assert g.accepted > 0 and (g.drafted, g.accepted) == (ref.drafted, ref.accepted)


@pytest.mark.parametrize("arch", ["norm", "layer"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_engine_other_heads(family, arch, shape):
    model = model_on(family, (1, 2), arch=arch)
    thr = mixing_threshold(model, PROMPTS[2], q=0.4)
    assert_same(*pair(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=24))
    g, ref = pair(model, PROMPTS, mode="self-spec", threshold=0.2, draft_len=4, max_new_tokens=16)
    assert ids_of(g) == ids_of(ref) and g.drafted == ref.drafted


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_engine_gate_mode(family, shape):
    model = gated(model_on(family))
    g, ref = pair(model, PROMPTS, mode="early-exit", confidence="gate", threshold=0.6, max_new_tokens=30)
    assert_same(g, ref)
    assert len({t.exit_layer for r in g.rows for t in r.tokens}) >= 2  # the random gates fire sometimes
    g, ref = pair(model, PROMPTS, mode="self-spec", confidence="gate", threshold=0.4, max_new_tokens=20)
    assert ids_of(g) == ids_of(ref)


def test_engine_sampling_equals_reference_with_seed(shape):
    model = model_on("qwen2", scale=3.0)
    for mode, kw in (("full", {}), ("early-exit", {"threshold": 0.5}), ("self-spec", {"threshold": 0.2})):
        g, ref = pair(model, PROMPTS, mode=mode, temperature=0.8, top_p=0.9, seed=3, max_new_tokens=16, **kw)
        assert ids_of(g) == ids_of(ref), mode


def test_gate_above_one_equals_full():
    model = gated(model_on("llama"), bias=50.0)
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20))
    g, ref = pair(model, PROMPTS, mode="early-exit", confidence="gate", threshold=1.01, max_new_tokens=20)
    assert ids_of(g) == ids_of(ref) == ids_of(full)
    assert all(t.exit_layer == L for r in g.rows for t in r.tokens)
    # the same gates at a threshold below their (saturated) output exit every token at exit 1
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", confidence="gate", threshold=0.99, max_new_tokens=5))
    assert all(t.exit_layer == 1 for r in g.rows for t in r.tokens)


def test_gate_skips_the_head_when_it_does_not_fire(shape):
    """A gate that never fires must not run the exit's head (the point of gates)."""
    model = gated(model_on("llama"), bias=-50.0)
    calls = []
    for head in model.heads:
        head.register_forward_pre_hook(lambda m, a: calls.append(m.layer))
        for sub in head.mlp:
            sub.register_forward_pre_hook(lambda m, a: calls.append("mlp"))
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", confidence="gate", threshold=0.5, max_new_tokens=8))
    assert calls == [] and all(t.exit_layer == L for r in g.rows for t in r.tokens)


def test_draft_vocab_self_spec_is_lossless(shape):
    model = model_on("qwen2")
    model.vocab_by_frequency = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20)))
    for k in (1, 10, 50, V):
        g, ref = pair(model, PROMPTS, mode="self-spec", threshold=0.0, draft_vocab=k, max_new_tokens=20)
        assert ids_of(g) == ids_of(ref) == full, k
        assert g.drafted == ref.drafted and g.accepted == ref.accepted, k
    # drafts come only from the K kept tokens: with K = 1 every accepted draft is that token
    g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, draft_vocab=1, max_new_tokens=20))
    top = int(model.vocab_by_frequency[0])
    assert any(t.drafted for r in g.rows for t in r.tokens)
    assert all(t.token == top for r in g.rows for t in r.tokens if t.drafted)


def test_draft_vocab_sampled_equals_reference(shape):
    """Sampled drafts over a restricted vocabulary: the draft's max-prob is over the K tokens (as
    the reference's, whose logits are masked outside them), drafts and acceptance identical."""
    model = model_on("llama", (1, 2, 3))
    model.vocab_by_frequency = torch.randperm(V, generator=torch.Generator().manual_seed(1))
    g, ref = pair(model, PROMPTS[:2], mode="self-spec", threshold=0.8, draft_len=3, draft_exit=2, draft_vocab=30,
                  temperature=0.8, seed=1, max_new_tokens=38)
    assert ids_of(g) == ids_of(ref) and g.drafted == ref.drafted > 0


def test_a_new_token_ranking_reaches_the_kept_state(shape):
    """Review finding: the draft vocabulary rows were kept on the model and not refreshed when
    `vocab_by_frequency` changed (as `tune` re-ranks it) between requests."""
    model = model_on("qwen2")
    model.vocab_by_frequency = torch.arange(V).flip(0)
    draft = dict(mode="self-spec", threshold=0.0, draft_vocab=20, max_new_tokens=20, temperature=0.8, seed=3)
    assert_same(*pair(model, PROMPTS, **draft))
    model.vocab_by_frequency = torch.randperm(V, generator=torch.Generator().manual_seed(0))
    g, ref = pair(model, PROMPTS, **draft)
    assert_same(g, ref)
    assert g.drafted == ref.drafted


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_draft_exit_auto_is_lossless(family, capsys):
    model = model_on(family, (1, 2, 3))
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=24)))
    g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", draft_exit="auto", threshold=0.2,
                                               max_new_tokens=24, verbose=True))
    assert ids_of(g) == full
    err = capsys.readouterr().err
    assert "draft policy" in err and "exit 1" in err and "expected speedup" in err
    assert g.policy is not None and sum(s[1] for s in g.policy.stats.values()) == g.drafted


def test_replayed_decisions_are_taken_exactly(shape):
    """Benchmarks force exit decisions (early-exit) and rounds (self-spec): the engine takes
    exactly the recorded decisions, whatever the gates or confidences say."""
    model = gated(model_on("llama", (1, 2)))
    trace = (L, 1, 2, 1, 1, L, 2, L, 1, L, L, 1)
    for conf in ("gate", "max-prob"):
        kw = dict(mode="early-exit", confidence=conf, threshold=0.5, max_new_tokens=len(trace), replay=trace)
        g = generate(model, [PROMPTS[0]], DecodeOptions(**kw))
        assert [t.exit_layer for t in g.rows[0].tokens] == list(trace)
    rounds = ((3, 2), (3, 0), (3, 3), (2, 1))
    kw = dict(mode="self-spec", threshold=0.0, draft_len=3, draft_exit=2, max_new_tokens=12, replay=rounds)
    g = generate(model, [PROMPTS[0]], DecodeOptions(**kw))
    assert g.round_log[:4] == list(rounds)
    # gates that never fire: the recorded rounds still stand (review finding: the recorded
    # decision was ANDed with the gate's)
    gated(model, bias=-50.0)
    kw.update(confidence="gate", threshold=0.5)
    g2 = generate(model, [PROMPTS[0]], DecodeOptions(**kw))
    assert g2.round_log == g.round_log and ids_of(g2) == ids_of(g)


def test_joins_past_the_largest_bucket_run_unrecorded(monkeypatch):
    """KV recomputation joins more tokens than the largest recorded bucket: those segments run
    the same function unrecorded and unpadded, with the same result."""
    monkeypatch.setattr(engine, "STATIC_ON_CPU", True)
    monkeypatch.setattr(engine, "BUCKETS", (1, 2))
    model = model_on("llama", (1, 3))
    thr = mixing_threshold(model, PROMPTS[0], q=0.3)
    seen = []
    orig = engine.Engine._segment_fn

    def spy(self, lo, hi, x, Q, *a, **k):
        seen.append((Q, k.get("kv")))
        return orig(self, lo, hi, x, Q, *a, **k)
    monkeypatch.setattr(engine.Engine, "_segment_fn", spy)
    g, ref = pair(model, [PROMPTS[0]], mode="early-exit", threshold=thr, max_new_tokens=40)
    assert_same(g, ref)
    assert any(q > 2 and kv is not None for q, kv in seen[3:])  # some join ran past the buckets
    assert any(q == 2 and kv is None for q, kv in seen)  # and some ran in a padded bucket


def test_padding_queries_do_not_move_a_dynamic_rotary_scaling(shape):
    """Review finding: padding queries of a bucketed join carried positions past the last real
    token, and dynamic/longrope rotary scalings (which look at the largest position) changed
    the real tokens' rotations."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from conftest import COMMON
    from eetune.model.backbone import adapter_for
    cfg = LlamaConfig(**dict(COMMON, max_position_embeddings=40), rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    torch.manual_seed(0)
    bb = adapter_for(AutoModelForCausalLM.from_config(cfg).eval().requires_grad_(False))
    bb.source, bb.revision, bb.model_path = "tiny-dynamic-rope", None, None
    with torch.no_grad():
        bb.lm_head.weight.mul_(8.0)
    model = EarlyExitModel.convert(bb, [1, 3], arch="mlp")
    prompt = [(7 * i + 3) % V for i in range(28)]
    for thr in (0.3, 0.5, 0.7):
        assert_same(*pair(model, [prompt], mode="early-exit", threshold=thr, max_new_tokens=12))


def test_compiled_segments_equal_reference():
    """compile=True: each segment is fused by torch.compile before being recorded (on a CPU,
    inductor's C++ backend runs it unrecorded); same tokens and logits as the reference.

    One exit (after layer 2) and early exit at a threshold where tokens both leave there and go
    on to the last layer: two compiled segments, each a C++ compile of ~15 s on a cold inductor
    cache, cover what the compiled functions do (layers 0-1 from token ids with the exit's
    decision; layers 2-3 joining the skipped tokens' KV in a padded bucket, ending in the final
    logits). Every mode's segments are built by the same function and wrapped by the same
    torch.compile call; the modes themselves are compared eagerly in every family above."""
    model = model_on("llama", (2,))
    g, ref = pair(model, [PROMPTS[0]], max_new_tokens=10, compile=True, mode="early-exit",
                  threshold=mixing_threshold(model, PROMPTS[0], layer=2))
    assert_same(g, ref)
    assert {t.exit_layer for t in g.rows[0].tokens[1:]} == {2, L}  # both compiled segments ran


# --- restricted-vocabulary heads (K tokens + OTHER) ------------------------------------------
def exit_predictions(model, prompt, ids):
    """Cache-free, teacher-forced: for each generated token, {exit: (confidence, top-1 token id
    or -1 where OTHER wins)} of every exit at the position that predicts it."""
    out = model(torch.tensor([prompt + ids]))
    preds = []
    for i in range(len(ids)):
        pos = len(prompt) + i - 1
        preds.append({k: tuple(x.item() for x in model.head(k).predict(out.exit_logits[k][0, pos]))
                      for k in model.exit_layers})
    return preds


# K-heads: every family once, both shapes on llama (rotary) and gemma2 (soft-capped logits, windows);
# the other static-shape geometries (mistral, gemma3, gpt2) run static only.
K_FAMILY_SHAPES = ([(f, "eager") for f in ("llama", "qwen2", "qwen3", "gemma", "gemma2")] +
                   [(f, "static") for f in ("llama", "mistral", "gemma2", "gemma3", "gpt2")])


@pytest.mark.parametrize("family,shape", K_FAMILY_SHAPES, indirect=["shape"])
def test_restricted_heads_engine_equals_reference(family, shape):
    """K-heads in every family, batch 1 and a left-padded batch: full, early exit and self-spec
    equal the reference; tokens that leave early or are drafted are among the K ids; self-spec
    equals full."""
    model = kmodel(family)
    vocab = set(model.heads[0].vocab_ids.tolist())
    thr = mixing_threshold(model, PROMPTS[0])
    for prompts in ([PROMPTS[0]], PROMPTS):
        full, ref = pair(model, prompts, mode="full", max_new_tokens=16)
        assert_same(full, ref)
        g, ref = pair(model, prompts, mode="early-exit", threshold=thr, max_new_tokens=24)
        assert_same(g, ref)
        layers = {t.exit_layer for r in g.rows for t in r.tokens}
        assert len(layers) >= 2 and min(layers) < L  # exits mixed
        assert all(t.token in vocab for r in g.rows for t in r.tokens if t.exit_layer < L)
        g, ref = pair(model, prompts, mode="self-spec", threshold=0.3, draft_len=3, max_new_tokens=16)
        assert ids_of(g) == ids_of(ref) == ids_of(full)
        assert g.accepted > 0 and (g.drafted, g.accepted) == (ref.drafted, ref.accepted)
        assert all(t.token in vocab for r in g.rows for t in r.tokens if t.drafted)


@pytest.mark.parametrize("family,arch,emb,exits", [
    ("llama", "mlp", "copy", (1, 2)), ("gemma2", "norm", "shared", (1, 2)), ("gpt2", "layer", "copy", (1, 2)),
    ("qwen3", "mlp", "shared", (1, 3)), ("mistral", "norm", "copy", (1, L))])
def test_early_exit_never_emits_other(family, arch, emb, exits, shape):
    """A token leaves at an exit only where its top-1 is a token, not OTHER: checked against the
    cache-free exit predictions at every exit a token passed (OTHER won there, or it was not
    confident) and where it left (its top-1 token, one of the K ids). At threshold 0 every token
    would leave at the first exit but for OTHER: those where OTHER wins at every exit go deeper
    (exit layer L)."""
    model = kmodel(family, exits, arch=arch, output_embedding=emb)
    vocab = set(model.heads[0].vocab_ids.tolist())
    blocked = deeper = 0
    for thr in (0.0, mixing_threshold(model, PROMPTS[0], q=0.4)):
        g, ref = pair(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=24)
        assert_same(g, ref)
        for p, r in zip(PROMPTS, g.rows):
            for t, pred in zip(r.tokens, exit_predictions(model, p, r.ids)):
                for k in model.exit_layers:
                    if k >= t.exit_layer:
                        break
                    conf, tok = pred[k]
                    assert tok == -1 or conf < thr + 1e-5, (thr, k, t)
                    blocked += tok == -1 and conf >= thr
                if t.exit_layer < L:
                    conf, tok = pred[t.exit_layer]
                    assert tok == t.token and t.token in vocab and conf >= thr - 1e-5, (thr, t)
                if thr == 0.0 and all(pred[k][1] == -1 for k in model.exit_layers if k < L):
                    assert t.exit_layer == L
                    deeper += 1
        assert any(t.exit_layer < L for r in g.rows for t in r.tokens)
    assert blocked > 0 and deeper > 0  # OTHER won, confidently enough, and sent tokens deeper


def test_restricted_heads_gate_mode(shape):
    """Gate mode with K-heads: the head's logits are computed with the gate's decision, and a
    row whose gate fires still goes deeper where OTHER wins."""
    model = gated(kmodel("llama"))
    g, ref = pair(model, PROMPTS, mode="early-exit", confidence="gate", threshold=0.6, max_new_tokens=24)
    assert_same(g, ref)
    assert len({t.exit_layer for r in g.rows for t in r.tokens}) >= 2
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=16))
    g, ref = pair(model, PROMPTS, mode="self-spec", confidence="gate", threshold=0.4, max_new_tokens=16)
    assert ids_of(g) == ids_of(ref) == ids_of(full) and g.drafted == ref.drafted
    gated(model, bias=50.0)  # gates that always fire: every token leaves at the first exit OTHER does not win
    g, ref = pair(model, PROMPTS, mode="early-exit", confidence="gate", threshold=0.5, max_new_tokens=24)
    assert_same(g, ref)
    for p, r in zip(PROMPTS, g.rows):
        for t, pred in zip(r.tokens, exit_predictions(model, p, r.ids)):
            first = next((k for k in model.exit_layers if pred[k][1] != -1), L)
            assert t.exit_layer == first, t
            if first < L:
                assert t.token == pred[first][1]
    assert any(t.exit_layer != 1 for r in g.rows for t in r.tokens)


def test_k_equal_to_v_decodes_as_the_unrestricted_heads(shape):
    """K = V (a permutation of the vocabulary, no OTHER): every mode decodes exactly as the
    unrestricted heads: same tokens, exit layers, drafts and logits over the vocabulary."""
    base = gated(model_on("llama", (1, 2, 3)))
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))
    kv = gated(EarlyExitModel.convert(base.backbone, [1, 2, 3], arch="mlp", exit_vocab_ids=perm))
    assert all(h.restricted and not h.has_other and h.num_classes == V for h in kv.heads)
    thr = mixing_threshold(base, PROMPTS[0])
    for kw in ({"mode": "early-exit", "threshold": thr}, {"mode": "early-exit", "confidence": "gate", "threshold": 0.6},
               {"mode": "self-spec", "threshold": 0.3}, {"mode": "self-spec", "threshold": 0.2, "draft_exit": 2},
               {"mode": "self-spec", "confidence": "gate", "threshold": 0.4},
               {"mode": "early-exit", "threshold": 0.5, "temperature": 0.8, "top_k": 20, "seed": 1},
               {"mode": "self-spec", "threshold": 0.2, "temperature": 0.8, "top_p": 0.9, "seed": 2}):
        a = generate(base, PROMPTS, DecodeOptions(record_logits=True, max_new_tokens=16, **kw))
        b = generate(kv, PROMPTS, DecodeOptions(record_logits=True, max_new_tokens=16, **kw))
        assert_same(b, a, tol=1e-5)
        assert (b.drafted, b.accepted) == (a.drafted, a.accepted), kw
    assert_same(*pair(kv, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=16))


def test_restricted_heads_sampling_equals_reference(shape):
    """Sampling with K-heads: tokens that leave early are drawn over the K tokens only, drafts
    from the draft distribution over the vocabulary (zero outside K); same draws as the
    reference."""
    model = kmodel("qwen2", scale=3.0)
    vocab = set(model.heads[0].vocab_ids.tolist())
    for mode, kw in (("early-exit", {"threshold": 0.3, "top_k": 10}), ("self-spec", {"threshold": 0.2}),
                     ("self-spec", {"threshold": 0.5, "top_p": 0.8, "draft_exit": 1})):
        g, ref = pair(model, PROMPTS, mode=mode, temperature=0.8, seed=3, max_new_tokens=16, **kw)
        assert ids_of(g) == ids_of(ref), mode
        assert (g.drafted, g.accepted) == (ref.drafted, ref.accepted)
        assert all(t.token in vocab for r in g.rows for t in r.tokens if t.exit_layer < L or t.drafted)
        if mode == "early-exit":
            assert_same(g, ref)
            assert any(t.exit_layer < L for r in g.rows for t in r.tokens)
        else:
            assert g.drafted > 0


def test_a_changed_restricted_head_reaches_the_kept_state(shape):
    """A restricted head's projection is built from its rows and OTHER row: on static shapes the
    recorded functions read the state's copies of it, which a request refreshes when the head
    changed in place since (the kept state, same parameters, is reused)."""
    model = kmodel("llama")
    kw = dict(mode="early-exit", threshold=0.5, max_new_tokens=12)
    g, ref = pair(model, PROMPTS, **kw)
    assert_same(g, ref)
    assert any(t.exit_layer < L for r in g.rows for t in r.tokens)
    state = model.decode_state
    for head in model.heads:
        with torch.no_grad():
            head.other_bias.fill_(1e4)  # OTHER wins everywhere: nothing leaves early, nothing is drafted
    g, ref = pair(model, PROMPTS, **kw)
    assert_same(g, ref)
    assert model.decode_state is state
    assert all(t.exit_layer == L for r in g.rows for t in r.tokens)
    s = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, max_new_tokens=12))
    assert s.drafted == 0 and ids_of(s) == ids_of(g)
    for head in model.heads:
        with torch.no_grad():
            head.other_bias.zero_()
    g2, ref = pair(model, PROMPTS, **kw)
    assert_same(g2, ref)
    assert any(t.exit_layer < L for r in g2.rows for t in r.tokens)


def test_draft_exit_auto_with_k_heads_is_lossless():
    model = kmodel("llama", (1, 2, 3))
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=24)))
    g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", draft_exit="auto", threshold=0.2, max_new_tokens=24))
    assert ids_of(g) == full and g.drafted > 0


def test_draft_exit_auto_may_draft_after_the_last_layer_with_a_restricted_head():
    """A restricted exit after the last layer (Gemma-3's 16k draft head: the whole trunk, a cheap
    head) is one of auto's candidates; an unrestricted one is not (its drafts would cost a full
    step). Decoding stays `full`'s, batched and with --draft-context."""
    from eetune.decode.policy import policy_candidates
    assert policy_candidates(kmodel("llama", (1, L))) == [1, L]
    assert policy_candidates(model_on("llama", (1, L))) == [1]
    model = kmodel("llama", (1, L))
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=24)))
    for kw in ({}, {"draft_context": True}):
        g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", draft_exit="auto", threshold=0.2,
                                                   max_new_tokens=24, **kw))
        assert ids_of(g) == full and g.policy.candidates() == [1, L]
        one = generate(model, [PROMPTS[0]], DecodeOptions(mode="self-spec", draft_exit="auto", threshold=0.0,
                                                          max_new_tokens=24, **kw))
        assert one.rows[0].ids == full[0]


def test_draft_vocab_with_restricted_heads_is_refused():
    model = EarlyExitModel.convert(peaky_backbone("llama"), [1, 2], exit_vocab_ids=torch.arange(20))
    model.vocab_by_frequency = torch.arange(V)
    for draft_exit in (None, 1, "auto"):
        with pytest.raises(EETuneError, match="already restricted to 20 tokens") as err:
            generate(model, [[1, 2]], DecodeOptions(mode="self-spec", draft_vocab=5, draft_exit=draft_exit))
        assert "\n" not in str(err.value)


def test_costs_time_each_heads_own_projection(monkeypatch):
    """`measure_costs` times each exit's own projection (K + 1 rows for a K-head), not the LM
    head's; the draft policy charges it per draft."""
    from eetune.decode import policy
    model = EarlyExitModel.convert(peaky_backbone("llama"), [1, 2], exit_vocab_ids=torch.arange(10))
    widths = []
    orig = model.backbone.logits

    def spy(z, weight=None, bias="head"):
        widths.append(model.backbone.lm_head.weight.shape[0] if weight is None else weight.shape[0])
        return orig(z, weight, bias)
    monkeypatch.setattr(model.backbone, "logits", spy)
    costs = policy.measure_costs(model, DecodeOptions())
    assert {"layer", "layer_x5", "final", "final_x5", "num_layers", "heads"} <= set(costs)
    assert {k: h["classes"] for k, h in costs["heads"].items()} == {1: 11, 2: 11}
    # each head: its 11 rows projected alone (a warm-up and 5 timings), then in place, in the segment
    # ending in its decision (a warm-up and 9 timings); never the LM head's rows for an exit
    assert widths.count(11) == 2 * (6 + 10)
    assert all(h["projection"] >= h["projection_alone"] > 0 for h in costs["heads"].values())
    pol = policy.DraftPolicy(model, costs, 4, None)
    h = costs["heads"][1]
    assert pol.head_cost[1] == h["transform"] + h["projection"]
    assert pol.cost(1, 3) - pol.cost(1, 2) == pytest.approx(costs["layer"] + pol.head_cost[1] + (
        pol._block(costs["layer"], costs["layer_x5"], 4) - pol._block(costs["layer"], costs["layer_x5"], 3)) * (L - 1)
        + pol._block(costs["final"], costs["final_x5"], 4) - pol._block(costs["final"], costs["final_x5"], 3))


def _synthetic_policy(prior: float):
    """A draft policy over exits 1 and 2 of an L-layer model with cheap heads, on costs set by
    hand (no timing), whose prior acceptance makes drafting pay."""
    from eetune.decode import policy
    model = kmodel("llama", (1, 2))
    head = {"transform": 1e-5, "projection": 1e-5, "projection_alone": 1e-5, "classes": 11}
    costs = {"layer": 1e-3, "layer_x5": 1.2e-3, "final": 2e-3, "final_x5": 3e-3, "num_layers": L,
             "heads": {1: dict(head), 2: dict(head)}}
    pol = policy.DraftPolicy(model, costs, 4, None)
    pol.prior = {k: prior for k in pol.prior}
    return pol


def test_auto_policy_counts_declined_drafts_as_misses():
    """Regression (SmolLM2, fast CPU: `--draft-exit auto` 0.95x `full`): the policy learned its
    acceptance from proposed drafts only, so an exit whose confidence rarely clears the threshold
    kept its prior and was chosen round after round (215 of 313 rounds at exit 10, 14 drafts
    proposed), each round paying a draft segment and its head to emit one token."""
    pol = _synthetic_policy(0.9)
    d, n = pol.choose(4)
    assert n > 0
    for _ in range(40):  # every round: the exit declines its first draft position
        d, n = pol.choose(4)
        if n == 0:
            break
        pol.observe(d, 0, 0, 1, n, None)
    assert pol.choose(4)[1] == 0
    assert all(pol.rate(k) < 0.5 for k in (1, 2) if pol.stats[k][2])


def test_auto_policy_probes_less_while_probes_fail():
    """Without drafting, a probe of one draft runs after 16 plain rounds; each probe that gets
    nothing accepted doubles the wait (up to 256), one that does resets it."""
    pol = _synthetic_policy(0.01)
    picks = []
    for _ in range(1000):
        d, n = pol.choose(4)
        picks.append(n)
        pol.observe(d, 0, 0, min(1, n), n, None)
    probes = [i for i, n in enumerate(picks) if n]
    assert [b - a for a, b in zip(probes, probes[1:])] == [32, 64, 128, 256, 256]
    assert probes[0] == pol.PROBE_EVERY - 1
    d, n = pol.choose(4)
    while n == 0:
        pol.observe(d, 0, 0, 0, n, None)
        d, n = pol.choose(4)
    pol.observe(d, 1, 1, 1, n, None)  # a probe that is accepted: back to every 16 plain rounds
    assert pol.probe_every == pol.PROBE_EVERY


def test_auto_policy_carries_what_it_learnt_to_the_next_request():
    """A request with `--draft-exit auto` starts from the acceptance, clock calibration and probe
    interval the last request with the same setting ended with (one request of 100 tokens was
    too short to unlearn an optimistic prior); another setting starts afresh."""
    model = kmodel("llama", (1, 2, 3))
    kw = dict(mode="self-spec", draft_exit="auto", threshold=0.2, max_new_tokens=24)
    first = generate(model, [PROMPTS[0]], DecodeOptions(**kw))
    second = generate(model, [PROMPTS[0]], DecodeOptions(**kw))
    learnt = {k: first.policy.rate(k) for k in first.policy.prior}
    assert second.policy.prior == learnt and second.policy.memory is first.policy.memory
    again = type(first.policy)(model, first.policy.costs, 4, None, memory=second.policy.memory)
    assert again.scale == second.policy.scale and again.probe_every == second.policy.probe_every
    assert learnt != {k: 0.2 + 0.4 * k / L for k in learnt}  # it did learn something
    other = generate(model, [PROMPTS[0]], DecodeOptions(**{**kw, "threshold": 0.3}))
    assert other.policy.prior == {k: 0.2 + 0.4 * k / L for k in learnt}
    assert ids_of(second) == ids_of(first)


def test_exits_above_one_are_not_asked(monkeypatch):
    """An exit whose threshold is above 1 can never fire, and early exit does not ask it (no head,
    no decision, no host read): with every threshold above 1 it decodes as `full`, at `full`'s
    cost (calibrate's NEVER). A replayed trace still asks every exit (the decision-cost measurement)."""
    model = model_on("llama", (1, 3))
    asked = []
    orig = engine.Engine.decide

    def spy(self, k, out, st):
        asked.append(k)
        return orig(self, k, out, st)
    monkeypatch.setattr(engine.Engine, "decide", spy)
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=12)))
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=1.01, max_new_tokens=12))
    assert ids_of(g) == full and asked == [] and g.layer_token_passes == 3 * 11 * L
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", exit_thresholds={1: 1.01, 3: 0.2},
                                               max_new_tokens=12))
    assert asked and set(asked) == {3} and all(t.exit_layer in (3, L) for r in g.rows for t in r.tokens)
    ref = reference_generate(model, PROMPTS, DecodeOptions(mode="early-exit", exit_thresholds={1: 1.01, 3: 0.2},
                                                           max_new_tokens=12))
    assert ids_of(g) == ids_of(ref)
    asked.clear()
    generate(model, [PROMPTS[0]], DecodeOptions(mode="early-exit", threshold=1.01, max_new_tokens=4,
                                                replay=(L,) * 5))
    assert set(asked) == {1, 3}


# --- kept state ------------------------------------------------------------------------------
def test_state_is_kept_per_geometry_with_a_bound(monkeypatch):
    """Requests of the same geometry (batch size, capacity bucket) reuse one state (its caches
    and recorded functions) whatever their prompts; other geometries get their own, at most
    MAX_STATES, the least recently used dropped first."""
    monkeypatch.setattr(engine, "STATIC_ON_CPU", True)
    monkeypatch.setattr(engine, "MAX_STATES", 2)
    model = model_on("llama")
    kw = dict(mode="early-exit", threshold=0.5, max_new_tokens=10)
    assert_same(*pair(model, PROMPTS, **kw))
    states = model.decode_state["by_geometry"]
    first = states[(3, 256)]
    recorded = dict(first.graphs)
    assert recorded and all(k[0] in ("seg", "head") for k in recorded)
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7]]
    assert_same(*pair(model, prompts, **kw))
    assert states[(3, 256)] is first and all(first.graphs[k] is g for k, g in recorded.items())
    assert_same(*pair(model, [PROMPTS[0]], **kw))  # batch 1: a second geometry
    assert list(states) == [(3, 256), (1, 256)]
    assert_same(*pair(model, [PROMPTS[0]], max_new_tokens=200, mode="full"))  # a larger capacity bucket
    assert list(states) == [(1, 256), (1, 512)]


def test_state_follows_the_weights_and_is_freed():
    """Review findings: the state was keyed by module ids only (parameters stored anew kept stale
    graphs) and outlived `release_unused_layers` (graphs over freed layers, caches held while
    tuning)."""
    model = model_on("llama")
    kw = dict(mode="early-exit", threshold=0.5, max_new_tokens=10)
    assert_same(*pair(model, PROMPTS, **kw))
    state = model.decode_state
    proj = model.heads[0].mlp[-1].down_proj
    proj.weight = torch.nn.Parameter(proj.weight.detach() * 3.0, requires_grad=False)
    assert_same(*pair(model, PROMPTS, **kw))
    assert model.decode_state is not state
    model.heads[0] = type(model.heads[0])(model.backbone, 1, "norm", "copy", "shared")
    state = model.decode_state
    assert_same(*pair(model, PROMPTS, **kw))
    assert model.decode_state is not state
    model.free_decode_state()
    assert model.decode_state is None
    assert_same(*pair(model, PROMPTS, **kw))
    model.release_unused_layers()
    assert model.decode_state is None


def test_recorded_functions_never_read_the_device(monkeypatch):
    """A CUDA graph cannot record a host read (`.item()`, `.tolist()`, `bool(tensor)`): every
    function the engine records must run without one, in every mode, family and head kind."""
    monkeypatch.setattr(engine, "STATIC_ON_CPU", True)
    inside = []
    for name in ("item", "tolist", "__bool__"):
        orig = getattr(torch.Tensor, name)

        def guard(self, *a, _orig=orig, _name=name, **k):
            if inside:
                raise AssertionError(f"host read {_name} inside a recorded function")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, guard)
    orig_init = engine.Graph.__init__
    made = []

    def init(self, fn, capture):
        def watched():
            inside.append(1)
            try:
                return fn()
            finally:
                inside.pop()
        made.append(1)
        orig_init(self, watched, capture)
    monkeypatch.setattr(engine.Graph, "__init__", init)
    # A restricted head's projection is built from its rows and OTHER row: a graph would keep
    # reading the tensor it was recorded with. Recorded functions read the state's copies.
    orig_proj = ExitHead.projection

    def projection(self):
        if inside and self.restricted:
            raise AssertionError("a restricted head's projection built inside a recorded function")
        return orig_proj(self)
    monkeypatch.setattr(ExitHead, "projection", projection)
    models = [lambda f=f, a=a: model_on(f, (1, 2), arch=a)
              for f, a in (("llama", "mlp"), ("gemma3", "layer"), ("gpt2", "norm"), ("mistral", "mlp"))]
    models += [lambda: kmodel("llama", (1, 2)),
               lambda: kmodel("gemma3", (1, 2), arch="layer", output_embedding="shared")]
    for build in models:
        model = gated(build())
        for kw in ({"mode": "full"}, {"mode": "early-exit", "threshold": 0.5},
                   {"mode": "early-exit", "confidence": "gate", "threshold": 0.5},
                   {"mode": "self-spec", "threshold": 0.2}):
            n = len(made)
            generate(model, PROMPTS, DecodeOptions(max_new_tokens=12, **kw))
            assert len(made) > n or kw["mode"] != "full"  # each new mode records what it needs


def test_a_function_that_cannot_be_recorded_runs_unrecorded_with_a_warning():
    """Recording fails for a module that reads the device (a host sync); that segment then runs
    without a graph, with the same results, and says so. (On this CPU the recording itself
    fails, which exercises the same path.)"""
    calls = []

    def fn():
        calls.append(1)
        return {"x": torch.ones(2) * len(calls)}
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        g = engine.Graph(fn, capture=True)
    assert g.graph is None and torch.equal(g()["x"], torch.full((2,), float(len(calls))))


def test_self_spec_cache_holds_exactly_the_accepted_tokens(shape):
    """Batch 1: after decoding, the cache's first prompt + generated - 1 slots hold the keys a
    plain HF forward over that text computes (rejected drafts were written over), however many
    drafts were rejected on the way."""
    model = model_on("llama", (1, 2))
    seen = {}
    orig_round, orig_step = engine.Engine.self_spec_round, engine.Engine.full_step

    def spy(orig):  # after a round, or a round without drafts (the last one), which is `full`'s step
        def f(self, *a, **k):
            out = orig(self, *a, **k)
            seen["slot"], seen["cache"] = self.slot, self.cache
            seen["steps"] = seen.get("steps", 0) + (orig is orig_step)
            return out
        return f
    engine.Engine.self_spec_round, engine.Engine.full_step = spy(orig_round), spy(orig_step)
    try:
        g = generate(model, [PROMPTS[0]], DecodeOptions(mode="self-spec", threshold=0.0, draft_len=4,
                                                        max_new_tokens=30))
    finally:
        engine.Engine.self_spec_round, engine.Engine.full_step = orig_round, orig_step
    assert seen["steps"] >= 1  # the last token is a round without drafts
    assert g.drafted > g.accepted > 0  # some drafts were rejected
    text = PROMPTS[0] + g.rows[0].ids[:-1]
    assert seen["slot"] == len(text)
    pkv = model.backbone.model(torch.tensor([text]), use_cache=True).past_key_values
    for i in range(L):
        want = pkv.layers[i].keys
        got = seen["cache"].k[i][:, :, :len(text)]
        assert (got - want).abs().max().item() < 1e-4, i


# --- regression tests ------------------------------------------------------------------------
def test_exit_after_last_layer_early_exit(shape):
    """`--exits 10,30` on a 30-layer model crashed early-exit decoding with KeyError: 30."""
    model = model_on("llama", (1, L), arch="norm")
    g, ref = pair(model, PROMPTS, mode="early-exit", threshold=0.5, max_new_tokens=12)
    assert_same(g, ref)
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


@pytest.mark.parametrize("arch", ["mlp", "layer"])
def test_exit_after_last_layer_never_leaves_tokens_waiting(arch, shape):
    """Review finding: tokens that left at an exit after the last layer were kept for KV
    recomputation they could never join (199 waiting after 200 tokens, O(n^2) masks). They hold
    every layer's keys and values: nothing may wait for them."""
    model = model_on("llama", (L,), arch=arch)
    g, ref = pair(model, [PROMPTS[0]], mode="early-exit", threshold=0.0, max_new_tokens=40)
    assert_same(g, ref)
    assert all(t.exit_layer == L for t in g.rows[0].tokens)
    assert g.max_pending == 0 and ref.max_pending == 0
    model = model_on("llama", (1, L), arch=arch)
    g, ref = pair(model, PROMPTS, mode="early-exit", threshold=0.6, max_new_tokens=16)
    assert_same(g, ref)
    s, r = pair(model, PROMPTS, mode="self-spec", threshold=0.3, draft_exit=1, max_new_tokens=12)
    assert ids_of(s) == ids_of(r)


def test_batched_early_exit_with_many_waiting_tokens_on_sliding_windows(shape):
    """A batched run in which some rows hold 3 or more exited tokens waiting at once, joined in
    one KV-recomputation pass across a sliding window (Mistral, window 6) with left padding: the
    engine equals the reference and the reference's cache-free logits."""
    model = model_on("mistral", (1, 3))
    thr = mixing_threshold(model, PROMPTS[0], q=0.2)
    g, ref = pair(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=30)
    assert_same(g, ref)
    assert g.max_pending >= 3
    # every emitted token's logits equal a cache-free forward over the whole text at its exit
    for b, (p, r) in enumerate(zip(PROMPTS, g.rows)):
        out = model(torch.tensor([p + r.ids]), final=True)
        for i, t in enumerate(r.tokens):
            pos = len(p) + i - 1
            want = out.final_logits[0, pos] if t.exit_layer == L else out.exit_logits[t.exit_layer][0, pos]
            got = g.step_logits[i][2][b]
            assert (got.float() - want.float()).abs().max().item() < 1e-4, (b, i)


def test_unseeded_sampling_leaves_global_rng_alone():
    model = model_on("llama", (2,))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate(model, [PROMPTS[0]], DecodeOptions(mode="full", temperature=1.0, max_new_tokens=4))
    assert torch.equal(torch.rand(3), expected)


def test_self_spec_never_drafts_past_the_context(shape):
    """GPT-2 has a fixed number of positions: drafting must stop at the end of the request."""
    model = model_on("gpt2", (1, 2))
    limit = model.backbone.config.n_positions
    prompt = [(7 * i) % 90 + 1 for i in range(limit - 10)]
    g = generate(model, [prompt], DecodeOptions(mode="self-spec", threshold=0.0, draft_len=8, max_new_tokens=10))
    full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=10))
    assert ids_of(g) == ids_of(full)


@pytest.mark.parametrize("kw,msg", [
    ({"mode": "self-spec", "draft_vocab": 0}, "outside 1.."),
    ({"mode": "self-spec", "draft_vocab": V + 1}, "outside 1.."),
    ({"mode": "self-spec", "draft_vocab": 5}, "token frequencies"),
    ({"mode": "early-exit", "confidence": "gate"}, "no gates"),
    ({"mode": "early-exit", "confidence": "entropy"}, "unknown confidence"),
    ({"mode": "self-spec", "draft_exit": "best"}, "not one of the exits")])
def test_bad_options(kw, msg):
    model = model_on("llama", (2,))
    with pytest.raises(EETuneError, match=msg):
        generate(model, [[1, 2]], DecodeOptions(**kw))


# --- on a GPU --------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "gpt2"])
def test_engine_bf16_on_cuda(family):
    """bf16 on the GPU: the engine's logits stay within BF16_TOL of the reference's wherever both
    took the same path, and self-spec equals full token for token."""
    model = model_on(family, device="cuda", dtype=torch.bfloat16)
    for mode, kw in (("full", {}), ("early-exit", {"threshold": 0.5})):
        g, ref = pair(model, PROMPTS, mode=mode, max_new_tokens=16, **kw)
        n = 0
        for (s1, l1, x1), (s2, l2, x2) in zip(g.step_logits, ref.step_logits):
            if not torch.equal(l1, l2):
                break  # a near-tie decided differently: later steps no longer compare
            assert (x1.float() - x2.float()).abs().max().item() <= BF16_TOL, (mode, s1)
            n += 1
        assert n >= 4, mode
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=16))
    spec = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.2, max_new_tokens=16))
    assert ids_of(spec) == ids_of(full)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_segments_are_recorded_on_cuda():
    model = model_on("llama", device="cuda")
    g = generate(model, PROMPTS, DecodeOptions(mode="early-exit", threshold=0.5, max_new_tokens=8))
    graphs = [x for st in model.decode_state["by_geometry"].values() for x in st.graphs.values()]
    assert graphs and all(x.graph is not None for x in graphs)
    assert g.engine == "cuda-graphs" and g.record_seconds > 0


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_restricted_heads_on_cuda():
    """K-heads with recorded graphs (fp32): early exit (max-prob and gates) equals the reference,
    self-spec equals full, and a head changed in place between requests reaches the graphs
    (they read the state's copies of its projection, refreshed per request)."""
    model = gated(kmodel("llama", device="cuda"))
    thr = mixing_threshold(model, PROMPTS[0])
    g, ref = pair(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=16)
    assert_same(g, ref)
    assert any(t.exit_layer < L for r in g.rows for t in r.tokens)
    assert_same(*pair(model, PROMPTS, mode="early-exit", confidence="gate", threshold=0.6, max_new_tokens=16))
    full = generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=16))
    spec = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.2, max_new_tokens=16))
    assert ids_of(spec) == ids_of(full) and spec.drafted > 0
    graphs = [x for st in model.decode_state["by_geometry"].values() for x in st.graphs.values()]
    assert graphs and all(x.graph is not None for x in graphs)
    for head in model.heads:
        with torch.no_grad():
            head.other_bias.fill_(1e4)
    g, ref = pair(model, PROMPTS, mode="early-exit", threshold=thr, max_new_tokens=16)
    assert_same(g, ref)
    assert all(t.exit_layer == L for r in g.rows for t in r.tokens)
    spec = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, max_new_tokens=16))
    assert spec.drafted == 0 and ids_of(spec) == ids_of(full)


def test_a_self_spec_round_without_drafts_is_a_full_step(shape, monkeypatch):
    """Regression (`--draft-exit auto` 0.91x `full` on a fast CPU): a round that drafts nothing, at
    batch 1 and greedy, runs `full`'s one-segment step instead of the draft segment, host read and
    verify segment of a round (1.12x a full step there); the tokens stay `full`'s. Sampled, it draws
    as the round would (the same tokens from the same seed). Batches and `layer` draft exits keep
    the round (slot bookkeeping, the exit's cache)."""
    calls = {"n": 0}
    orig = engine.Engine.full_step

    def counted(self, *a, **k):
        calls["n"] += 1
        return orig(self, *a, **k)
    monkeypatch.setattr(engine.Engine, "full_step", counted)
    model = model_on("llama", (1, 2))
    kw = dict(mode="self-spec", threshold=0.3, draft_len=3, max_new_tokens=9)
    g = generate(model, [PROMPTS[0]], DecodeOptions(**kw))
    assert calls["n"] == 1  # the last token: no room left to draft
    calls["n"] = 0
    full = generate(model, [PROMPTS[0]], DecodeOptions(mode="full", max_new_tokens=9))
    assert calls["n"] == 8 and g.rows[0].ids == full.rows[0].ids
    calls["n"] = 0
    generate(model, PROMPTS[:2], DecodeOptions(**kw))
    assert calls["n"] == 0
    calls["n"] = 0
    for seed in range(8):  # sampled: the step's draws are the round's (the reference runs rounds)
        opts = DecodeOptions(**{**kw, "temperature": 0.8, "top_p": 0.9, "seed": seed, "max_new_tokens": 12})
        g = generate(model, [PROMPTS[0]], opts)
        assert g.rows[0].ids == reference_generate(model, [PROMPTS[0]], opts).rows[0].ids
    assert calls["n"] >= 2  # some of them ended on a round with no room to draft
    calls["n"] = 0
    generate(model_on("llama", (1, 2), arch="layer"), [PROMPTS[0]], DecodeOptions(**kw))
    assert calls["n"] == 0

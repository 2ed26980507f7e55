"""The decoding engine: exactness of full / early-exit / self-spec against HF generate, against a
cache-free reference, and against each other; batching; sampling; bad input."""

from collections import Counter

import pytest
import torch

from eetune.decode import DecodeOptions, confidence, generate, generate_text, speculative_accept
from eetune.errors import EETuneError
from eetune.model.early_exit import EarlyExitModel

from conftest import FAMILIES, L, V, peaky_backbone, word_tokenizer

PROMPTS = [[5, 17, 33, 2, 9, 41, 8], [60, 3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]


def ids_of(gen):
    return [r.ids for r in gen.rows]


def hf_greedy(bb, prompt, n):
    out = bb.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_full_early_exit_above_one_and_hf_generate_agree(family):
    bb = peaky_backbone(family)
    model = EarlyExitModel.convert(bb, [1, 3], arch="mlp")
    for p in PROMPTS:
        ref = hf_greedy(bb, p, 16)
        full = generate(model, [p], DecodeOptions(mode="full", max_new_tokens=16))
        ee = generate(model, [p], DecodeOptions(mode="early-exit", threshold=1.01, max_new_tokens=16))
        assert ids_of(full)[0] == ref
        assert ids_of(ee)[0] == ref
        assert all(t.exit_layer == L for t in ee.rows[0].tokens)


@pytest.mark.parametrize("arch", ["norm", "mlp", "layer"])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_early_exit_logits_equal_cache_free_reference(family, arch):
    """Every step's logits equal a from-scratch teacher-forced pass over the whole sequence under
    the same exit decisions, after many consecutive early exits (KV recomputation)."""
    bb = peaky_backbone(family)
    model = EarlyExitModel.convert(bb, [1, 2], arch=arch)
    prompt = PROMPTS[0]
    # a threshold at a quantile of exit 1's confidence along the full output, so that exits mix
    full = generate(model, [prompt], DecodeOptions(mode="full", max_new_tokens=40)).rows[0].ids
    conf = confidence(model(torch.tensor([prompt + full])).exit_logits[1][0, len(prompt):], "max-prob")
    for q in (0.5, 0.3, 0.7, 0.2, 0.8):
        thr = conf.quantile(q).item()
        gen = generate(model, [prompt], DecodeOptions(mode="early-exit", threshold=thr, max_new_tokens=40,
                                                      record_logits=True))
        layers = [t.exit_layer for t in gen.rows[0].tokens]
        if set(layers) >= {1, L}:
            break
    assert set(layers) >= {1, L} and len(layers) == 40, layers
    run = max(len(s) for s in "".join("e" if x < L else "f" for x in layers).split("f"))
    assert run >= 2  # consecutive early exits happened
    seq = list(prompt)
    for (step, layer, logits), tok in zip(gen.step_logits, gen.rows[0].ids):
        out = model(torch.tensor([seq]), final=True)
        k = int(layer[0])
        ref = out.final_logits[0, -1] if k == L else out.exit_logits[k][0, -1]
        assert (logits[0] - ref).abs().max().item() <= 1e-4, (step, k)
        seq.append(tok)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_spec_greedy_is_lossless(family):
    bb = peaky_backbone(family, scale=8.0)
    model = EarlyExitModel.convert(bb, [1, 2], arch="mlp")
    drafted = 0
    for p in PROMPTS[:2]:
        full = ids_of(generate(model, [p], DecodeOptions(mode="full", max_new_tokens=24)))
        for thr in (0.0, 0.5, 0.9):
            for n in (1, 4, 8):
                g = generate(model, [p], DecodeOptions(mode="self-spec", threshold=thr, draft_len=n, max_new_tokens=24))
                assert ids_of(g) == full, (thr, n)
                drafted += g.drafted
    assert drafted > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_self_spec_with_k_heads_is_lossless(family):
    """Restricted-vocabulary draft heads (K tokens + OTHER; here K leaves out the tokens the
    full model emits most, and OTHER's row is the most frequent one's): self-spec is identical
    to `full`, batched, whatever the threshold and draft length."""
    bb = peaky_backbone(family, scale=8.0)
    model = EarlyExitModel.convert(bb, [1, 2], arch="mlp")
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20)))
    common = [t for t, _ in Counter(t for r in full for t in r).most_common(2)]
    model = EarlyExitModel.convert(bb, [1, 2], arch="norm", output_embedding="shared",
                                   exit_vocab_ids=torch.tensor([t for t in range(V) if t not in common][::-1]))
    with torch.no_grad():
        for head in model.heads:
            head.other_weight.copy_(bb.lm_head.weight[common[0]])
    drafted = 0
    for thr in (0.0, 0.5):
        for n in (1, 4):
            g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=thr, draft_len=n, max_new_tokens=20))
            assert ids_of(g) == full, (thr, n)
            assert all(t.token not in common for r in g.rows for t in r.tokens if t.drafted)
            drafted += g.drafted
    assert drafted > 0


def test_self_spec_accepts_and_rejects():
    bb = peaky_backbone("qwen3", scale=6.0)
    model = EarlyExitModel.convert(bb, [3], arch="norm")
    g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, draft_len=4, max_new_tokens=30))
    assert 0 < g.accepted < g.drafted
    assert ids_of(g) == ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=30)))


@pytest.mark.parametrize("arch", ["layer", "mlp"])
def test_self_spec_with_each_draft_exit(arch):
    bb = peaky_backbone("qwen2", scale=8.0)
    model = EarlyExitModel.convert(bb, [1, 2, 3], arch=arch)
    full = ids_of(generate(model, PROMPTS, DecodeOptions(mode="full", max_new_tokens=20)))
    for d in (1, 2, 3):
        g = generate(model, PROMPTS, DecodeOptions(mode="self-spec", threshold=0.0, draft_exit=d, max_new_tokens=20))
        assert ids_of(g) == full


@pytest.mark.parametrize("mode,kw", [("full", {}), ("early-exit", {"threshold": 0.5}),
                                     ("self-spec", {"threshold": 0.3, "draft_len": 3})])
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_batch_equals_one_by_one(family, mode, kw):
    bb = peaky_backbone(family, scale=8.0)
    model = EarlyExitModel.convert(bb, [1, 2], arch="layer" if family == "llama" else "mlp")
    opts = dict(mode=mode, max_new_tokens=15, **kw)
    batch = ids_of(generate(model, PROMPTS, DecodeOptions(**opts)))
    single = [ids_of(generate(model, [p], DecodeOptions(**opts)))[0] for p in PROMPTS]
    assert batch == single


def test_sampling_is_reproducible_with_seed():
    bb = peaky_backbone("llama", scale=4.0)
    model = EarlyExitModel.convert(bb, [2], arch="norm")
    for mode in ("full", "early-exit", "self-spec"):
        o = DecodeOptions(mode=mode, temperature=0.8, top_k=20, top_p=0.95, seed=7, threshold=0.2, max_new_tokens=20)
        a, b = ids_of(generate(model, PROMPTS, o)), ids_of(generate(model, PROMPTS, o))
        assert a == b
        c = ids_of(generate(model, PROMPTS, DecodeOptions(**{**o.__dict__, "seed": 8})))
        assert c != a


def test_speculative_acceptance_rule_preserves_target_distribution():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[speculative_accept(p, [q], [d], g)[0]] += 1
    assert (counts / n - p[0]).abs().max().item() < 0.015


def test_eos_and_stop_strings():
    bb = peaky_backbone("llama", scale=8.0)
    model = EarlyExitModel.convert(bb, [2], arch="norm")
    free = generate(model, [PROMPTS[0]], DecodeOptions(mode="full", max_new_tokens=12)).rows[0].ids
    eos = free[4]
    g = generate(model, [PROMPTS[0]], DecodeOptions(mode="full", max_new_tokens=12, eos_token_ids=(eos,)))
    cut = free.index(eos)
    assert g.rows[0].ids == free[:cut + 1] and g.rows[0].finished_by == "eos"
    tok = word_tokenizer()
    text = tok.decode(free, skip_special_tokens=True)
    stop = text.split()[3]
    r = generate_text(model, tok, [" ".join(f"w{i}" for i in PROMPTS[0])],
                      DecodeOptions(mode="self-spec", threshold=0.0, max_new_tokens=12, eos_token_ids=(999,)),
                      stop=(stop,))
    assert stop not in r.rows[0].text and r.rows[0].finished_by == "stop"
    assert text.startswith(r.rows[0].text)


@pytest.mark.parametrize("kw,msg", [({"mode": "fast"}, "unknown mode"), ({"threshold": -0.1}, r"outside \[0, inf\)"),
                                    ({"threshold": float("nan")}, "outside"),
                                    ({"max_new_tokens": 0}, "at least 1"), ({"confidence": "vibes"}, "unknown confidence"),
                                    ({"mode": "self-spec", "draft_exit": 3}, "not one of the exits")])
def test_bad_options(kw, msg):
    model = EarlyExitModel.convert(peaky_backbone("llama"), [2])
    with pytest.raises(EETuneError, match=msg):
        generate(model, [[1, 2]], DecodeOptions(**kw))


def test_empty_and_too_long_prompts():
    model = EarlyExitModel.convert(peaky_backbone("llama"), [2])
    with pytest.raises(EETuneError, match="empty prompt"):
        generate(model, [[]], DecodeOptions())
    with pytest.raises(EETuneError, match="exceeds the model's context"):
        generate(model, [[1] * 250], DecodeOptions(max_new_tokens=10))


def test_streamed_pieces_add_up_to_the_text_across_multibyte_characters():
    """Regression (issue 11): when a token completed a multi-byte character, streaming dropped
    it (the text so far ended in U+FFFD, which the next decode replaced), so the coloured or
    streamed output differed from the returned text."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    from eetune.decode import TextStream
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["plain ascii words only"], vocab_size=260, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    text = "café → naïve 日本 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    stream = TextStream(tok)
    pieces = [stream.push(i)[0] for i in ids]
    assert "".join(pieces) + stream.finish(tok.decode(ids)) == text
    assert "\ufffd" not in "".join(pieces)
    stream = TextStream(tok, stop=("日本",))
    out = []
    for i in ids:
        piece, stopped = stream.push(i)
        out.append(piece)
        if stopped:
            break
    assert "".join(out) == stream.shown == "café → naïve "

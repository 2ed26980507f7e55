"""Hand-computed checks of the two sampling rules in eetune.decode.api: `sampling_probs`
(temperature, then top-k, then top-p on the renormalised result) and `speculative_accept`
(keep draft i with probability min(1, p_i(x)/q_i(x)); at the first rejection draw from
max(0, p_i - q_i) renormalised; if every draft is kept, draw one more from p_m)."""

import math

import pytest
import torch

from eetune.decode import DecodeOptions, sampling_probs, speculative_accept


def probs(logits, **kw):
    return sampling_probs(torch.tensor(logits, dtype=torch.float32), DecodeOptions(**kw))


def logits_of(p):
    """Logits whose softmax is `p` (zeros become -inf)."""
    return [math.log(x) if x > 0 else float("-inf") for x in p]


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=torch.float32)
    assert actual.shape == expected.shape
    assert torch.allclose(actual, expected, atol=atol), (actual.tolist(), expected.tolist())


# --- sampling_probs -----------------------------------------------------------------------------

def test_temperature_only():
    e = math.e
    close(probs([2.0, 0.0], temperature=2.0), [e / (e + 1), 1 / (e + 1)])  # logits / 2 = [1, 0]
    close(probs([2.0, 0.0], temperature=0.5), [math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)])


def test_top_k_keeps_the_k_largest_and_renormalises():
    e = math.e
    # logits [1, 3, 2, 0], k = 2: tokens 1 (3) and 2 (2) survive
    z = e ** 3 + e ** 2
    close(probs([1.0, 3.0, 2.0, 0.0], temperature=1.0, top_k=2), [0, e ** 3 / z, e ** 2 / z, 0])
    close(probs([1.0, 3.0, 2.0, 0.0], temperature=1.0, top_k=1), [0, 1, 0, 0])
    # k >= V: nothing removed
    z = e + e ** 3 + e ** 2 + 1
    close(probs([1.0, 3.0, 2.0, 0.0], temperature=1.0, top_k=10), [e / z, e ** 3 / z, e ** 2 / z, 1 / z])


def test_top_k_keeps_every_token_tied_with_the_kth():
    """The cut is `logit < k-th largest logit`, so ties with the k-th value all survive."""
    e = math.e
    z = e ** 3 + 2 * e ** 2
    close(probs([3.0, 2.0, 2.0, 0.0], temperature=1.0, top_k=2), [e ** 3 / z, e ** 2 / z, e ** 2 / z, 0])
    close(probs([1.0, 3.0, 2.0, 3.0, 0.0], temperature=1.0, top_k=2), [0, 0.5, 0, 0.5, 0])


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass():
    p = [0.5, 0.3, 0.15, 0.05]
    # cumulative mass before each (sorted) token: 0, .5, .8, .95; kept while that is < top_p
    close(probs(logits_of(p), temperature=1.0, top_p=0.7), [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    close(probs(logits_of(p), temperature=1.0, top_p=0.9), [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0])
    close(probs(logits_of(p), temperature=1.0, top_p=0.4), [1, 0, 0, 0])
    close(probs(logits_of(p), temperature=1.0, top_p=0.96), [0.5, 0.3, 0.15, 0.05])
    # the order of the vocabulary does not matter
    close(probs(logits_of([0.05, 0.3, 0.15, 0.5]), temperature=1.0, top_p=0.7), [0, 0.3 / 0.8, 0, 0.5 / 0.8])


def test_top_p_mass_reached_exactly_stops_there():
    """Four equal tokens (exactly 0.25 each): with top_p = 0.5 the first two sorted tokens reach
    it exactly, so the third (mass before it = 0.5 >= 0.5) is dropped. Just above 0.5 a third is
    kept. Which of the tied tokens survive is the sort's choice: only the multiset is fixed."""
    flat = [0.0, 0.0, 0.0, 0.0]
    for top_p, kept in ((0.25, 1), (0.26, 2), (0.5, 2), (0.5001, 3), (0.75, 3), (0.7501, 4)):
        out = probs(flat, temperature=1.0, top_p=top_p)
        assert sorted(out.tolist()) == pytest.approx([0.0] * (4 - kept) + [1 / kept] * kept, abs=1e-7), top_p
        assert out.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_top_p_tie_at_the_boundary_keeps_exactly_one_of_the_tied():
    """p = [0.4, 0.3, 0.3], top_p = 0.5: after 0.4 one 0.3 is needed; the other tied 0.3 has mass
    0.7 before it and goes. So exactly one of tokens 1 and 2 survives, at 0.3 / 0.7."""
    out = probs(logits_of([0.4, 0.3, 0.3]), temperature=1.0, top_p=0.5)
    assert out[0].item() == pytest.approx(0.4 / 0.7, abs=1e-6)
    assert sorted(out[1:].tolist()) == pytest.approx([0.0, 0.3 / 0.7], abs=1e-6)


def test_top_p_applies_to_the_top_k_renormalised_distribution():
    p = [0.4, 0.3, 0.2, 0.1]
    # top-p alone at 0.75: mass before = 0, .4, .7, .9 -> three tokens kept
    close(probs(logits_of(p), temperature=1.0, top_p=0.75), [0.4 / 0.9, 0.3 / 0.9, 0.2 / 0.9, 0])
    # top-k 3 first: [4/9, 3/9, 2/9]; mass before = 0, 4/9, 7/9 >= 0.75 -> two kept: [4/7, 3/7]
    close(probs(logits_of(p), temperature=1.0, top_k=3, top_p=0.75), [4 / 7, 3 / 7, 0, 0])


def test_temperature_then_top_p():
    # logits log([.5, .3, .15, .05]) at temperature 0.5 square the odds: [.25, .09, .0225, .0025] / .365
    p = [0.5, 0.3, 0.15, 0.05]
    sq = [x * x for x in p]
    z = sum(sq)
    close(probs(logits_of(p), temperature=0.5), [x / z for x in sq])
    # masses sorted: .6849, .2466, .0616, .0068; top_p 0.9 -> mass before the third is .9315 >= .9: two kept
    close(probs(logits_of(p), temperature=0.5, top_p=0.9), [0.25 / 0.34, 0.09 / 0.34, 0, 0])


def test_rows_are_independent():
    out = sampling_probs(torch.tensor([logits_of([0.5, 0.3, 0.15, 0.05]), [0.0, 0.0, 0.0, 0.0]]),
                         DecodeOptions(temperature=1.0, top_k=3, top_p=0.7))
    # row 0: top-3 = [.5, .3, .15] / .95; mass before = 0, .526, .842 -> two kept
    close(out[0], [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    # row 1: top-k 3 of four ties keeps all four (ties with the 3rd); then top_p .7: three of .25 kept
    assert sorted(out[1].tolist()) == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3], abs=1e-6)


# --- speculative_accept -------------------------------------------------------------------------

def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_drafts_with_p_at_least_q_are_always_kept_then_one_more_from_p_m():
    """p(x) >= q(x) for every draft: min(1, p/q) = 1 > any uniform draw. All three are kept and
    the extra token comes from p_3, which is one-hot on token 2."""
    p = t([0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.7, 0.0], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0])
    q = [torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor([0.1, 0.1, 0.5, 0.3]),
         torch.tensor([0.25, 0.25, 0.25, 0.25])]
    for seed in range(20):
        out = speculative_accept(p, q, [0, 2, 3], torch.Generator().manual_seed(seed))
        assert out == [0, 2, 3, 2]
        assert all(isinstance(x, int) for x in out)


def test_a_draft_p_gives_zero_is_always_rejected_and_the_residual_is_sampled():
    """Drafts 0 and 1 are kept for sure (p >= q); draft 2 (token 3) has p = 0: rejected for sure.
    The residual max(0, p_2 - q_2) = [0, 0.3, 0, 0] is one-hot on token 1 after renormalising, so
    that is the token emitted; the draft after the rejection (token 0) is never looked at."""
    p = t([0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.7, 0.0], [0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0],
          [1.0, 0.0, 0.0, 0.0])
    q = [torch.tensor([0.25, 0.25, 0.25, 0.25]), torch.tensor([0.1, 0.1, 0.5, 0.3]),
         torch.tensor([0.6, 0.1, 0.0, 0.3]), torch.tensor([1.0, 0.0, 0.0, 0.0])]
    for seed in range(20):
        out = speculative_accept(p, q, [0, 2, 3, 0], torch.Generator().manual_seed(seed))
        assert out == [0, 2, 1]  # 2 accepted drafts + the residual's token


def test_first_draft_rejected_gives_one_token():
    p = t([0.0, 0.2, 0.8], [1.0, 0.0, 0.0])
    q = [torch.tensor([0.5, 0.5, 0.0])]
    # residual max(0, [0, .2, .8] - [.5, .5, 0]) = [0, 0, .8] -> token 2
    for seed in range(10):
        assert speculative_accept(p, q, [0], torch.Generator().manual_seed(seed)) == [2]


def test_no_drafts_draws_from_p_0():
    assert speculative_accept(t([0.0, 1.0, 0.0]), [], [], torch.Generator().manual_seed(0)) == [1]


def test_a_partial_ratio_accepts_exactly_when_the_uniform_draw_is_below_it():
    """p(x)/q(x) = 0.2 / 0.4 = 0.5: kept iff the first uniform draw of the generator is < 0.5.
    Replaying the generator's first draw predicts every outcome; rejections draw from the
    residual max(0, p - q) = [0.5, 0, 0] (one-hot on token 0), acceptances then draw from p_1
    (one-hot on token 2)."""
    p = t([0.7, 0.2, 0.1], [0.0, 0.0, 1.0])
    q = [torch.tensor([0.2, 0.4, 0.4])]
    seen = set()
    for seed in range(40):
        r = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
        expected = [1, 2] if r < 0.5 else [0]
        assert speculative_accept(p, q, [1], torch.Generator().manual_seed(seed)) == expected, (seed, r)
        seen.add(len(expected))
    assert seen == {1, 2}  # both branches were exercised


def test_acceptance_stops_at_the_first_rejection_among_several_drafts():
    """Draft 0: ratio 1 (kept); draft 1: ratio 0.25 / 0.5 = 0.5 (a coin); draft 2: p = 0 (never).
    With the generator's draws r0, r1 (r0 is always below 1): r1 < 0.5 -> [d0, d1, residual of
    step 2 = token 0]; else [d0, residual of step 1 = token 2]."""
    p = t([0.0, 1.0, 0.0], [0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0])
    q = [torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.0, 0.5, 0.5])]
    # step 1 residual: max(0, [.25, .25, .5] - [.25, .5, .25]) = [0, 0, .25] -> token 2
    # step 2 residual: max(0, [.5, .5, 0] - [0, .5, .5]) = [.5, 0, 0] -> token 0
    seen = set()
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        torch.rand((), generator=g)  # r0: draft 0 is kept whatever it is
        r1 = torch.rand((), generator=g).item()
        expected = [1, 1, 0] if r1 < 0.5 else [1, 2]
        assert speculative_accept(p, q, [1, 1, 2], torch.Generator().manual_seed(seed)) == expected, seed
        seen.add(len(expected))
    assert seen == {2, 3}


# --- restricted-vocabulary heads ----------------------------------------------------------------

def test_not_other_is_the_top1_not_being_the_other_class():
    from eetune.decode.rules import not_other
    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [3.0, 1.0, 3.0], [0.0, 0.0, 0.0]])
    # OTHER is class 2: it wins in row 0 only (a tie goes to the token, the first maximum)
    assert not_other(logits, 2).tolist() == [False, True, True, True]
    assert not_other(logits, None).tolist() == [True] * 4  # no OTHER class: every row has a token


def test_sampling_over_a_restricted_vocabulary_is_zero_outside_it():
    """The draft distribution of a K-head: its K tokens' logits at their ids, -inf elsewhere
    (`ExitHead.to_vocab`). Temperature, top-k and top-p act as over the K tokens alone, and
    every other token has probability 0."""
    ids = torch.tensor([4, 1, 3])  # K = 3 of V = 6
    k_logits = torch.tensor([2.0, 0.5, 1.0])
    full = torch.full((6,), float("-inf")).index_copy_(0, ids, k_logits)
    for kw in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 2}, {"temperature": 1.3, "top_p": 0.8},
               {"temperature": 1.0, "top_k": 10}):
        p = probs(full.tolist(), **kw)
        want = torch.zeros(6).index_copy_(0, ids, probs(k_logits.tolist(), **kw))
        close(p, want.tolist())
        assert p[[0, 2, 5]].tolist() == [0.0, 0.0, 0.0]


def test_drafts_from_a_restricted_vocabulary_keep_the_target_distribution():
    """Self-spec with a K-head: q is zero outside the K tokens, so drafts come from K only, and
    the tokens outside K are reached through the residual max(0, p - q). Hand-computed: q = [1,
    0, 0, 0], p = [.1, .1, .4, .4]: the draft (token 0) is kept with probability .1, else the
    residual [0, .1, .4, .4] / .9 is drawn. Empirically, the emitted token follows p."""
    p = t([0.1, 0.1, 0.4, 0.4], [0.25, 0.25, 0.25, 0.25])
    q = [torch.tensor([1.0, 0.0, 0.0, 0.0])]
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        r = torch.rand((), generator=torch.Generator().manual_seed(seed)).item()
        out = speculative_accept(p, q, [0], g)
        assert (len(out) == 2) == (r < 0.1)
        if len(out) == 1:
            assert out[0] in (1, 2, 3)
    # a K = 2 draft distribution against a target with mass outside K
    g = torch.Generator().manual_seed(0)
    p = t([0.3, 0.1, 0.35, 0.25], [0.25, 0.25, 0.25, 0.25])
    q = torch.tensor([0.6, 0.4, 0.0, 0.0])
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g))
        counts[speculative_accept(p, [q], [d], g)[0]] += 1
    assert (counts / n - p[0]).abs().max().item() < 0.015


# --- top-p among the most likely tokens first, against the full sort ---------------------------------
def full_sort_top_p(logits, opts):
    """The slow, obvious top-p: sort the whole vocabulary (what sampling_probs did before it took
    the TOP_P_CANDIDATES most likely tokens first)."""
    x = logits.float() / opts.temperature
    if opts.top_k:
        kth = x.topk(min(opts.top_k, x.shape[-1]), dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    p = x.softmax(-1)
    sorted_p, idx = p.sort(-1, descending=True)
    cum = sorted_p.cumsum(-1)
    sorted_p = sorted_p.masked_fill((cum - sorted_p) >= opts.top_p, 0.0)
    p = torch.zeros_like(p).scatter(-1, idx, sorted_p)
    return p / p.sum(-1, keepdim=True)


@pytest.mark.parametrize("V,scale,top_p,temperature,top_k,path", [
    (262144, 6.0, 0.95, 0.8, 0, "candidates"),  # peaked: the nucleus lies among the candidates
    (262144, 0.5, 0.9, 1.0, 0, "sort"),  # flat: it reaches past them, the whole vocabulary is sorted
    (49152, 3.0, 0.5, 1.3, 0, "candidates"),
    (3000, 2.0, 0.99, 1.0, 2000, "sort"),  # top-k first, then top-p
    (3000, 4.0, 0.8, 1.0, 2000, "candidates"),
    (512, 1.0, 0.9, 1.0, 0, None),  # fewer tokens than candidates
])
def test_top_p_among_candidates_equals_the_full_sort(V, scale, top_p, temperature, top_k, path):
    from eetune.decode import rules
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(6, V, generator=g) * scale
    logits[0] *= 4  # one very peaked row among flatter ones
    opts = DecodeOptions(temperature=temperature, top_p=top_p, top_k=top_k)
    fast, ref = sampling_probs(logits, opts), full_sort_top_p(logits, opts)
    assert torch.equal(fast, ref)
    n = (ref > 0).sum(-1)
    if path == "sort":
        assert (n > rules.TOP_P_CANDIDATES).any()  # the fallback was needed, and taken
    elif path == "candidates":
        assert (n < rules.TOP_P_CANDIDATES).all()
    draws = [torch.multinomial(p, 1, generator=torch.Generator().manual_seed(1)) for p in (fast, ref)]
    assert torch.equal(*draws)  # same tokens from the same seed

"""The chunked exit loss (eetune.train.losses) against the whole-logits reference: loss, CE and
gradients on random inputs, for CE, dynamic weighting, distillation, soft-capping and bf16, and for
restricted-vocabulary heads (K ids + OTHER: folded distillation, mapped agreement)."""

import math

import pytest
import torch

from eetune.train.losses import chunked_eval, chunked_exit_loss, exit_loss_reference


def _inputs(seed, n=37, H=16, V=101, shared=False):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, H, generator=g) * 2).requires_grad_(True)
    w = torch.randn(V, H, generator=g) * 0.5
    if not shared:
        w.requires_grad_(True)
    bias = torch.randn(V, generator=g) * 0.1
    t = torch.randint(0, V, (n,), generator=g)
    fh = torch.randn(n, H, generator=g) * 2
    fw = torch.randn(V, H, generator=g) * 0.5
    return h, w, bias, t, fh, fw


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_equals_reference_in_fp32(alpha, dynamic, softcap, chunk):
    for shared in (False, True):
        h, w, b, t, fh, fw = _inputs(seed=int(alpha * 10) + chunk, shared=shared)
        kw = dict(final_h=fh, final_weight=fw, final_bias=b, softcap=softcap, alpha=alpha, dynamic=dynamic)
        ref_loss, ref_ce = exit_loss_reference(h, w, b, t, **kw)
        ref_grads = torch.autograd.grad(ref_loss, [h] + ([w] if not shared else []))
        loss, ce = chunked_exit_loss(h, w, b, t, chunk=chunk, **kw)
        grads = torch.autograd.grad(loss, [h] + ([w] if not shared else []))
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6) and torch.allclose(ce, ref_ce, rtol=1e-5)
        for a, r in zip(grads, ref_grads):
            assert torch.allclose(a, r, rtol=1e-4, atol=1e-6), (a - r).abs().max()


def test_chunked_matches_reference_in_bf16_within_tolerance():
    h, w, b, t, fh, fw = _inputs(seed=3, n=64, H=32, V=211)
    kw = dict(final_h=fh, final_weight=fw, final_bias=None, alpha=0.5, dtype=torch.bfloat16)
    ref_loss, _ = exit_loss_reference(h, w, None, t, **kw)
    rg = torch.autograd.grad(ref_loss, [h, w])
    loss, _ = chunked_exit_loss(h, w, None, t, chunk=16, **kw)
    g = torch.autograd.grad(loss, [h, w])
    assert abs(loss.item() - ref_loss.item()) <= 1e-2 * abs(ref_loss.item())
    for a, r in zip(g, rg):
        assert (a - r).norm() <= 2e-2 * r.norm()


def test_the_gradient_scales_with_the_upstream_gradient():
    h, w, b, t, _, _ = _inputs(seed=5)
    loss, _ = chunked_exit_loss(h, w, None, t, chunk=7)
    (g1,) = torch.autograd.grad(3.0 * loss, [h])
    loss, _ = chunked_exit_loss(h, w, None, t, chunk=7)
    (g2,) = torch.autograd.grad(loss, [h])
    assert torch.allclose(g1, 3.0 * g2)


def test_chunked_eval_sums_ce_and_counts_agreement():
    h, w, b, t, _, _ = _inputs(seed=7)
    with torch.no_grad():
        z = torch.nn.functional.linear(h, w, b)
        ref = torch.nn.functional.cross_entropy(z, t, reduction="sum").item()
        top1 = z.argmax(-1)
        top1[::3] = (top1[::3] + 1) % w.shape[0]  # a third disagree
    ce, agree = chunked_eval(h.detach(), w.detach(), b, t, top1, chunk=5)
    assert abs(ce - ref) <= 1e-4 * abs(ref) and agree == h.shape[0] - len(range(0, h.shape[0], 3))


# --- restricted-vocabulary heads: K token ids + OTHER (fold_ids) ------------------------------------
def _fold_inputs(seed, K, n=37, H=16, V=101, shared=False):
    """A restricted head's inputs: C = K (+ OTHER when K < V) rows and a bias of its own (OTHER's
    is trained), targets already mapped to its classes, the final layer over the whole vocabulary."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(V, generator=g)[:K]
    C = K + (K < V)
    h = (torch.randn(n, H, generator=g) * 2).requires_grad_(True)
    w = torch.randn(C, H, generator=g) * 0.5
    b = torch.randn(C, generator=g) * 0.1
    if not shared:
        w.requires_grad_(True)
    b.requires_grad_(True)
    vmap = torch.full((V,), K, dtype=torch.long)
    vmap[ids] = torch.arange(K)
    t = vmap[torch.randint(0, V, (n,), generator=g)]
    fh = torch.randn(n, H, generator=g) * 2
    fw = torch.randn(V, H, generator=g) * 0.5
    fb = torch.randn(V, generator=g) * 0.1
    return h, w, b, t, fh, fw, fb, ids


@pytest.mark.parametrize("K", [1, 30, 101])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 8, 1000])
def test_chunked_equals_reference_with_a_restricted_vocabulary(K, alpha, dynamic, softcap, chunk):
    """Loss, CE and the gradients of h, the head's rows and its bias (OTHER's bias trains: before,
    the chunked loss gave the bias no gradient) against the whole-logits reference."""
    for shared in (False, True):
        h, w, b, t, fh, fw, fb, ids = _fold_inputs(seed=K + chunk, K=K, shared=shared)
        kw = dict(final_h=fh, final_weight=fw, final_bias=fb, softcap=softcap, alpha=alpha, dynamic=dynamic,
                  fold_ids=ids)
        wrt = [h] + ([w] if not shared else []) + [b]
        ref_loss, ref_ce = exit_loss_reference(h, w, b, t, **kw)
        ref_grads = torch.autograd.grad(ref_loss, wrt)
        loss, ce = chunked_exit_loss(h, w, b, t, chunk=chunk, **kw)
        grads = torch.autograd.grad(loss, wrt)
        assert torch.allclose(loss, ref_loss, rtol=1e-5, atol=1e-6) and torch.allclose(ce, ref_ce, rtol=1e-5)
        for a, r in zip(grads, ref_grads):
            assert r.abs().max() > 0 and torch.allclose(a, r, rtol=1e-4, atol=1e-6), (a - r).abs().max()


def test_folded_distillation_by_hand():
    """The final distribution p over V = 5 folded onto ids [2, 0] + OTHER is [p2, p0, p1 + p3 + p4]:
    it sums to 1 and OTHER holds the mass outside; KL and its gradient as computed by hand. Where
    no mass is outside (final logits -inf there) OTHER's target is 0, without NaN."""
    from eetune.train.losses import fold_log_probs

    p = torch.tensor([[0.1, 0.2, 0.3, 0.15, 0.25]])
    ids = torch.tensor([2, 0])
    q = fold_log_probs(p.log(), ids).exp()
    assert torch.allclose(q, torch.tensor([[0.3, 0.1, 0.6]]), atol=1e-6)
    assert q.sum().item() == pytest.approx(1.0, abs=1e-6) and q[0, 2].item() == pytest.approx(0.2 + 0.15 + 0.25)
    assert torch.allclose(fold_log_probs(p.log(), torch.tensor([3, 1, 4, 0, 2])).exp(), p[:, [3, 1, 4, 0, 2]])

    e = torch.tensor([0.5, 0.25, 0.25])  # the exit's distribution over [id 2, id 0, OTHER]
    want = sum(qi * math.log(qi / ei) for qi, ei in zip([0.3, 0.1, 0.6], e.tolist()))
    for fn in (exit_loss_reference, lambda *a, **k: chunked_exit_loss(*a, chunk=1, **k)):
        h = e.log()[None].clone().requires_grad_(True)  # W = I: the logits are h
        loss, _ = fn(h, torch.eye(3), None, torch.tensor([2]), final_h=p.log(), final_weight=torch.eye(5),
                     alpha=1.0, fold_ids=ids)
        (g,) = torch.autograd.grad(loss, [h])
        assert loss.item() == pytest.approx(want, rel=1e-5)
        assert torch.allclose(g, (e - torch.tensor([0.3, 0.1, 0.6]))[None], atol=1e-6)

        # no mass outside the K ids: OTHER's target is exactly 0, the loss and gradients finite
        outside = torch.tensor([0.0, float("-inf"), 0.0, float("-inf"), float("-inf")])
        h = e.log()[None].clone().requires_grad_(True)
        loss, _ = fn(h, torch.eye(3), None, torch.tensor([0]), final_h=torch.log(torch.tensor([[0.25, 1, 0.75, 1, 1]])),
                     final_weight=torch.eye(5), final_bias=outside, alpha=1.0, fold_ids=ids)
        (g,) = torch.autograd.grad(loss, [h])
        want0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.25)
        assert math.isfinite(loss.item()) and loss.item() == pytest.approx(want0, rel=1e-5)
        assert torch.isfinite(g).all() and torch.allclose(g, (e - torch.tensor([0.75, 0.25, 0.0]))[None], atol=1e-6)


def test_chunked_eval_maps_the_top1_back_to_token_ids_and_other_never_agrees():
    """Agreement compares token ids: a restricted head's top-1 class c is the token ids[c], and
    OTHER (class K) agrees with nothing, not even a reference token whose id happens to be K."""
    K = 4
    ids = torch.tensor([7, 2, 9, 5])
    # one-hot logits picking classes 0, 1, 2, 3, 4 (OTHER), 0
    classes = torch.tensor([0, 1, 2, 3, 4, 0])
    h = torch.nn.functional.one_hot(classes, K + 1).float() * 5
    ref_tokens = torch.tensor([7, 2, 2, 5, K, 0])  # agree, agree, no (9 != 2), agree, OTHER vs id 4, no
    ce, agree = chunked_eval(h, torch.eye(K + 1), None, classes, ref_tokens, chunk=4, fold_ids=ids)
    assert agree == 3
    z = h.clone()
    assert ce == pytest.approx(torch.nn.functional.cross_entropy(z, classes, reduction="sum").item(), rel=1e-6)

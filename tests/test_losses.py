"""The chunked exit loss (eetune.train.losses) against the whole-logits reference: loss, CE and
gradients on random inputs, for CE, dynamic weighting, distillation, soft-capping and bf16."""

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

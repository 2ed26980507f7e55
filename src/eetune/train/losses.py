"""Exit losses computed a chunk of tokens at a time, so the (tokens x vocabulary) logits are never
held whole.

A tuning step's memory is dominated by vocabulary-sized buffers: for every exit its logits, their
log-softmax and the gradient of both, each `tokens x vocabulary` floats (2048 tokens x 49,152 on
SmolLM2 are 400 MB apiece), and with distillation the final layer's logits and log-probabilities
too. `chunked_exit_loss` computes, for `chunk` rows at a time, the exit's logits from its hidden
state and output weight, the loss (cross-entropy, the paper's dynamic token weighting, KL from
the final layer's distribution computed from its own hidden state, or a mix) and at once the
loss's gradients with respect to the hidden state and the output weight, which backward then
only scales. The FLOPs are those of an ordinary forward and backward (no recomputation); the
memory is one chunk's few buffers plus the two gradients.

**Restricted-vocabulary heads** (`fold_ids`, the head's K token ids; eetune.model.heads): the exit's
logits are over C classes, the K ids in that order then OTHER (C = K + 1; no OTHER when K is the
whole vocabulary). The caller gives the targets already mapped to classes (`ExitHead.classes_of`:
tokens outside K are OTHER), and distillation folds the final layer's distribution over the whole
vocabulary onto those classes (`fold_log_probs`): p[ids] for the K classes, and for OTHER the mass
outside them, computed as logsumexp(final logits outside K) - logsumexp(all final logits) (exact
where 1 - sum(p[ids]) would cancel; -inf, probability 0, where no mass is outside). The exit's
bias (a restricted head has its own: OTHER's is trained) gets its gradient too.

`exit_loss_reference` is the slow, obvious version (whole logits, autograd), kept to test this
one against (tests/test_losses.py): same loss and gradients within float tolerance.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None,
            dtype: torch.dtype) -> torch.Tensor:
    """Logits in fp32 of hidden states `h` (n, H) under an output projection computed in `dtype`
    (the compute dtype, as autocast would), with the model's final-logit soft-capping."""
    z = F.linear(h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).float()
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def fold_log_probs(z: torch.Tensor, fold_ids: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """Log-probabilities (n, C) of the final layer's logits `z` (n, V) folded onto a restricted
    head's classes: the K ids of `fold_ids` in that order, then (when K < V) OTHER with the log of
    the mass outside them, logsumexp(z outside K) - logsumexp(z), which is -inf (never NaN) where
    there is none. `fold_ids=None`: the plain log-softmax over V. `inplace`: `z` may be overwritten."""
    lse = torch.logsumexp(z, -1, keepdim=True)
    if fold_ids is None:
        return z.sub_(lse) if inplace else z - lse
    ids = fold_ids.to(z.device)
    inside = z.index_select(-1, ids) - lse
    if ids.numel() == z.shape[-1]:  # K = V: a permutation, no OTHER
        return inside
    rest = z.index_fill_(-1, ids, float("-inf")) if inplace else z.index_fill(-1, ids, float("-inf"))
    return torch.cat([inside, torch.logsumexp(rest, -1, keepdim=True) - lse], -1)


def _kl_terms(log_target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) elementwise for p = exp(log_target), 0 where p is 0 (log p = -inf)."""
    p = torch.exp(log_target)
    return torch.where(p > 0, p * (log_target - log_q), torch.zeros((), dtype=p.dtype, device=p.device))


def _check_fold(weight: torch.Tensor, fold_ids: torch.Tensor | None, final_weight: torch.Tensor | None) -> None:
    if fold_ids is None or final_weight is None:
        return
    K, V = fold_ids.numel(), final_weight.shape[0]
    if weight.shape[0] != K + (K < V):
        raise ValueError(f"a head restricted to {K} of {V} tokens has {K + (K < V)} classes, not {weight.shape[0]}")


def logits_loss(z: torch.Tensor, targets: torch.Tensor, ref_log_probs: torch.Tensor | None = None,
                alpha: float = 0.0, dynamic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, plain mean CE) of exit logits `z` (n, C) against class `targets` (n,), with
    `alpha > 0` mixed with KL(ref || exit) for the final layer's (folded) log-probabilities
    `ref_log_probs` (n, C): the whole-logits loss that the chunked one reproduces."""
    ce = F.cross_entropy(z, targets, reduction="none")
    if dynamic:
        with torch.no_grad():
            conf = torch.exp(z.amax(-1) - torch.logsumexp(z, -1))
        loss = (conf * ce).mean()
    else:
        loss = ce.mean()
    if alpha > 0:
        kl = _kl_terms(ref_log_probs, F.log_softmax(z, -1)).sum() / z.shape[0]
        loss = (1 - alpha) * loss + alpha * kl
    return loss, ce.mean().detach()


class _ChunkedExitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets, final_h, final_weight, final_bias, softcap, alpha, dynamic, chunk,
                dtype, fold_ids):
        ctx.h_dtype, ctx.w_dtype = h.dtype, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        with torch.autocast(h.device.type, enabled=False):  # casts are explicit: `dtype` for the logits
            return _ChunkedExitLoss._forward(ctx, h, weight, bias, targets, final_h, final_weight, final_bias,
                                             softcap, alpha, dynamic, chunk, dtype, fold_ids)

    @staticmethod
    def _forward(ctx, h, weight, bias, targets, final_h, final_weight, final_bias, softcap, alpha, dynamic, chunk,
                 dtype, fold_ids):
        n = h.shape[0]
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        grad_b = (torch.zeros(bias.shape, dtype=torch.float32, device=h.device)
                  if bias is not None and ctx.needs_input_grad[2] else None)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        ce_total = torch.zeros((), dtype=torch.float64, device=h.device)
        w_c = weight.to(dtype)  # cast once per exit, not per chunk
        fw_c = final_weight.to(dtype) if alpha > 0 else None
        for a in range(0, n, chunk):
            hc, t = h[a:a + chunk], targets[a:a + chunk]
            rows = torch.arange(hc.shape[0], device=h.device)
            z = project(hc, w_c, bias, softcap, dtype)
            lse = torch.logsumexp(z, -1)
            p = torch.exp(z - lse[:, None])
            ce = lse - z[rows, t]
            ce_total += ce.sum(dtype=torch.float64)
            g = p.clone()
            g[rows, t] -= 1.0  # d ce / d z
            if dynamic:  # the exit's detached confidence weights each token's CE
                conf = torch.exp(z.amax(-1) - lse)
                part = (conf * ce).sum(dtype=torch.float64)
                g *= conf[:, None]
            else:
                part = ce.sum(dtype=torch.float64)
            part = (1 - alpha) * part
            g *= 1 - alpha
            if alpha > 0:  # the final layer's distribution (folded onto a restricted head's classes)
                log_pf = fold_log_probs(project(final_h[a:a + chunk], fw_c, final_bias, softcap, dtype), fold_ids,
                                        inplace=True)
                pf = torch.exp(log_pf)
                part = part + alpha * _kl_terms(log_pf, z - lse[:, None]).sum(dtype=torch.float64)
                g += alpha * (p - pf)  # d KL(final || exit) / d z
                del log_pf, pf
            g /= n
            if softcap is not None:
                g *= 1 - (z / softcap) ** 2  # through z = c tanh(u / c)
            total += part
            grad_h[a:a + chunk] = g.to(dtype) @ w_c  # in the compute dtype, as autocast's backward
            if grad_w is not None:
                grad_w.addmm_(g.t(), hc.float())  # in place: no second vocab x hidden buffer
            if grad_b is not None:
                grad_b += g.sum(0)
            del z, p, g, lse
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0),
                              grad_b if grad_b is not None else torch.empty(0))
        ctx.has_w, ctx.has_b = grad_w is not None, grad_b is not None
        ce_mean = (ce_total / n).float()
        ctx.mark_non_differentiable(ce_mean)
        return (total / n).float(), ce_mean

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        gh = (grad_loss * grad_h).to(ctx.h_dtype)
        gw = (grad_loss * grad_w).to(ctx.w_dtype) if ctx.has_w else None
        gb = (grad_loss * grad_b).to(ctx.b_dtype) if ctx.has_b else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


def chunked_exit_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                      final_h: torch.Tensor | None = None, final_weight: torch.Tensor | None = None,
                      final_bias: torch.Tensor | None = None, softcap: float | None = None, alpha: float = 0.0,
                      dynamic: bool = False, chunk: int = 256, dtype: torch.dtype = torch.float32,
                      fold_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, plain mean CE) of one exit over `h` (n, H), the exit's hidden states
    just before its output projection `weight` (C, H) (+ `bias` (C,)), and next-token classes
    `targets` (n,). With `alpha > 0` the loss is (1 - alpha) CE + alpha KL(final || exit), the final
    layer's distribution computed from its normed hidden states `final_h` (n, H) and the LM head
    `final_weight`/`final_bias` (V rows). `dynamic`: each token's CE is scaled by the exit's
    detached max-softmax probability. `fold_ids`: a restricted head's K token ids (C = K, + OTHER
    when K < V; `targets` already mapped to its classes), onto which the final distribution is
    folded (`fold_log_probs`); None: C = V. `h`, `weight` and `bias` get gradients (where they
    require them)."""
    if alpha > 0 and (final_h is None or final_weight is None):
        raise ValueError("distillation (alpha > 0) needs the final layer's hidden states and LM head")
    _check_fold(weight, fold_ids, final_weight if alpha > 0 else None)
    loss, ce = _ChunkedExitLoss.apply(h, weight, bias, targets, final_h, final_weight, final_bias, softcap,
                                      float(alpha), bool(dynamic), int(chunk), dtype, fold_ids)
    return loss, ce


def exit_loss_reference(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                        final_h: torch.Tensor | None = None, final_weight: torch.Tensor | None = None,
                        final_bias: torch.Tensor | None = None, softcap: float | None = None, alpha: float = 0.0,
                        dynamic: bool = False, dtype: torch.dtype = torch.float32,
                        fold_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same loss, whole: every logit materialised and differentiated by autograd."""
    _check_fold(weight, fold_ids, final_weight if alpha > 0 else None)
    z = project(h, weight, bias, softcap, dtype)
    ref = fold_log_probs(project(final_h, final_weight, final_bias, softcap, dtype), fold_ids) if alpha > 0 else None
    return logits_loss(z, targets, ref, alpha, dynamic)


@torch.no_grad()
def chunked_eval(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                 reference_top1: torch.Tensor | None, softcap: float | None = None, chunk: int = 256,
                 dtype: torch.dtype = torch.float32, fold_ids: torch.Tensor | None = None) -> tuple[float, int]:
    """(summed next-token CE, number of rows whose top-1 equals `reference_top1`) over `h` (n, H),
    a chunk of rows at a time. `fold_ids`: a restricted head's K token ids; `targets` are then its
    classes, and its top-1 is mapped back to a token id before the comparison with the token ids
    of `reference_top1` (OTHER, class K, never agrees)."""
    ce_sum, agree = 0.0, 0
    ids = fold_ids.to(h.device) if fold_ids is not None else None
    for a in range(0, h.shape[0], chunk):
        z = project(h[a:a + chunk], weight, bias, softcap, dtype)
        ce_sum += F.cross_entropy(z, targets[a:a + chunk], reduction="sum").item()
        if reference_top1 is not None:
            top = z.argmax(-1)
            if ids is not None:
                K = ids.numel()
                top = torch.where(top < K, ids[top.clamp(max=K - 1)], torch.full_like(top, -1))
            agree += (top == reference_top1[a:a + chunk]).sum().item()
    return ce_sum, agree
